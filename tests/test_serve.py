"""``cxr-run serve`` (a real Triton server through PyTriton, on loopback) and ``cxr-run predict --server``."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="serving extra not installed (pip install 'cxr-edge[serve]')")
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from cxr.runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from cxr.runtime.card import read_card  # noqa: E402
from cxr.runtime.preprocess import load_and_preprocess  # noqa: E402
from cxr.runtime.serve_process import ServerProcess, free_port  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests.conftest import AUTO_CPU_BACKEND, IMAGE_SIZE, cli, one_line_error  # noqa: E402


@pytest.fixture(scope="module")
def server(bundle):
    with ServerProcess(bundle, "--max-batch", "16", "--instances", "2") as running:
        yield running


@pytest.fixture(scope="module")
def inputs(phantoms, tmp_path_factory) -> Path:
    """Some phantoms plus the bad files local predict already handles: each must fail the same way
    remotely."""
    folder = tmp_path_factory.mktemp("serve_inputs")
    for path in sorted(phantoms.rglob("*.png"))[::12]:
        (folder / f"{path.parent.name}_{path.name}").write_bytes(path.read_bytes())
    (folder / "not_an_image.png").write_bytes(b"hello")
    (folder / "empty.jpg").write_bytes(b"")
    png = next(phantoms.rglob("*.png")).read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "thumbnail.png").write_bytes(_thumbnail(phantoms))  # predicted, with a warning
    return folder


def _thumbnail(phantoms: Path) -> bytes:
    """A phantom shrunk under 64 px a side: read and predicted, with the runtime's thumbnail warning."""
    import cv2

    gray = cv2.imread(str(sorted(phantoms.rglob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    return cv2.imencode(".png", cv2.resize(gray, (40, 40), interpolation=cv2.INTER_AREA))[1].tobytes()


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _without_backend(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("backend", "precision")} for r in records]


@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_predict_through_the_server_equals_local(server, bundle, inputs, tmp_path, scheme):
    local = cli(
        "cxr-run",
        "predict",
        str(inputs),
        "--model",
        str(bundle),
        "--out",
        str(tmp_path / "local.jsonl"),
        check=2,
    )
    url = server.http_url if scheme == "http" else server.grpc_url
    remote = cli(
        "cxr-run",
        "predict",
        str(inputs),
        "--model",
        str(bundle),
        "--server",
        url,
        "--batch-size",
        "5",
        "--out",
        str(tmp_path / "remote.jsonl"),
        check=2,
    )
    mine, theirs = _records(tmp_path / "local.jsonl"), _records(tmp_path / "remote.jsonl")
    assert len(mine) == len(theirs) == len(list(inputs.iterdir()))
    assert [r["error"] for r in mine] == [r["error"] for r in theirs]
    assert [r["warnings"] for r in mine] == [r["warnings"] for r in theirs]
    assert sum(r["error"] is not None for r in theirs) == 3 and sum(bool(r["warnings"]) for r in theirs) == 1
    for a, b in zip(mine, theirs):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        if a["probs"]:
            assert max(abs(a["probs"][c] - b["probs"][c]) for c in a["probs"]) <= 2e-6
    assert {r["backend"] for r in theirs} == {f"triton:{AUTO_CPU_BACKEND}"} and theirs[0][
        "precision"
    ] == "fp32"
    assert "3 failed" in local.stderr and "3 failed" in remote.stderr
    metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert 'nv_inference_request_success{model="cxr"' in metrics


def test_encoded_bytes_are_decoded_on_the_server_one_bad_image_fails_alone(server, bundle, phantoms):
    good = sorted(phantoms.rglob("*.png"))[:2]
    thumbnail = _thumbnail(phantoms)
    data = np.array(
        [[good[0].read_bytes()], [b"GIF89a nonsense"], [good[1].read_bytes()], [thumbnail]], dtype=object
    )
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    request = httpclient.InferInput("data", list(data.shape), "BYTES")
    request.set_data_from_numpy(data)
    result = client.infer("cxr_encoded", [request])
    probs, errors = result.as_numpy("probs"), result.as_numpy("error")
    warnings = [json.loads(w) for w in result.as_numpy("warnings")[:, 0]]
    assert errors[1, 0].decode() == "request image: corrupt GIF header (UnidentifiedImageError)"
    assert errors[0, 0] == errors[2, 0] == errors[3, 0] == b"" and np.isnan(probs[1]).all()
    assert warnings[:3] == [[], [], []] and "under 64 px" in warnings[3][0]
    strict = httpclient.InferInput("strict", [4, 1], "BOOL")
    strict.set_data_from_numpy(np.array([[True]] * 4))
    result = client.infer("cxr_encoded", [request, strict])
    assert (
        result.as_numpy("error")[3, 0].decode().endswith("(--strict)")
        and np.isnan(result.as_numpy("probs")[3]).all()
    )
    np.testing.assert_array_equal(result.as_numpy("probs")[[0, 2]], probs[[0, 2]])
    pre = read_card(bundle).preprocessing
    assert pre.thorax_crop and pre.clahe  # the server must repeat the card's suppression steps
    pixels = np.stack([load_and_preprocess(p, IMAGE_SIZE, pre=pre) for p in good])[:, None]
    with OrtBackend(bundle / "model.onnx", "fp32") as local:
        np.testing.assert_allclose(probs[[0, 2]], local.run(pixels), atol=2e-6)


@pytest.mark.parametrize("strict", [False, True])
def test_encoded_records_through_the_client_equal_local_ones_warnings_included(
    server, bundle, inputs, strict
):
    """What ``TritonClientBackend.run_encoded`` returns per file is what local predict gives it: the same
    error (named by the file), the same warnings (the gate's included), the same probabilities and score."""
    from cxr.runtime.backends.select import open_classifier
    from cxr.runtime.backends.triton_client import TritonClientBackend
    from cxr.runtime.bundle import Bundle
    from cxr.runtime.ood import bundle_gate
    from cxr.runtime.predict import PredictOptions, predict_stream

    files = sorted(inputs.iterdir())
    opened = Bundle.open(bundle)
    backend, _ = open_classifier(opened, "auto", "fp32")  # what the server runs
    with backend:
        options = PredictOptions(strict=strict, gate=bundle_gate(opened))
        local = list(predict_stream(files, opened, backend, options))
    remote = TritonClientBackend(server.http_url).run_encoded(
        [p.read_bytes() for p in files], [str(p) for p in files], strict
    )
    assert [r.error for r in remote] == [record["error"] for record in local]
    assert [list(r.warnings) for r in remote] == [record["warnings"] for record in local]
    assert any(r.warnings for r in remote) and sum(r.error is not None for r in remote) >= 3 + strict
    for mine, theirs in zip(local, remote):
        if mine["probs"] is not None:
            got = dict(zip(opened.card.classes, theirs.probs.tolist()))
            assert all(abs(got[c] - mine["probs"][c]) < 2e-6 for c in got)
        if mine["ood_score"] is not None:
            assert abs(theirs.ood_score - mine["ood_score"]) < 1e-3


def test_the_served_card_names_no_local_path(server, bundle, tmp_path):
    """Neither through the server nor in ``public_dict`` of a card that carries paths in every section."""
    import re

    from cxr.runtime.card import public_dict

    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    query = httpclient.InferInput("query", [1, 1], "BYTES")
    query.set_data_from_numpy(np.array([[b"card"]], dtype=object))
    served = client.infer("cxr_card", [query]).as_numpy("card")[0, 0].decode()
    assert str(tmp_path.parent.parent) not in served and not re.search(r'"(/|~/|[A-Za-z]:\\\\)', served)
    card = read_card(bundle)
    card = card.replace(
        parity={"data": "/srv/parity", "n": 3, "backends": {"onnx": {"report": "../runs/x/parity.json"}}},
        provenance={**card.provenance, "note": "calibrated on C:\\scans\\dev", "by": "/home/ana/run"},
    )
    shown = json.dumps(public_dict(card))
    assert not any(p in shown for p in ("/srv/parity", "../runs", "C:\\\\scans", "/home/ana"))
    assert json.loads(shown)["files"] == card.files and json.loads(shown)["parity"]["n"] == 3


def _good_request(client_module, size: int = IMAGE_SIZE, count: int = 2):
    pixels = np.random.default_rng(0).integers(0, 256, (count, 1, size, size), dtype=np.uint8)
    request = client_module.InferInput("image", list(pixels.shape), "UINT8")
    request.set_data_from_numpy(pixels)
    return [request]


def _still_serving(server: ServerProcess) -> None:
    assert server.is_ready()
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    assert client.infer("cxr", _good_request(httpclient, count=1)).as_numpy("probs").shape == (1, 4)


@pytest.mark.parametrize(
    "shape, datatype, message",
    [
        ((2, 1, IMAGE_SIZE, IMAGE_SIZE), "FP32", "expects 'uint8'"),
        ((2, 1, 10, 10), "UINT8", "unexpected shape"),
        ((2, IMAGE_SIZE, IMAGE_SIZE), "UINT8", "unexpected shape"),
        ((40, 1, IMAGE_SIZE, IMAGE_SIZE), "UINT8", "with n 1..16"),  # beyond --max-batch
    ],
)
def test_malformed_tensors_are_refused_and_the_server_keeps_serving(server, shape, datatype, message):
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    request = httpclient.InferInput("image", list(shape), datatype)
    request.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.uint8))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("cxr", [request])
    assert message in str(caught.value).lower()
    _still_serving(server)


def test_garbage_and_disconnecting_clients_do_not_hurt_the_server(server):
    import urllib.error

    garbage = urllib.request.Request(
        f"{server.http_url}/v2/models/cxr/infer", data=b"{not json", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(garbage, timeout=10)
    assert caught.value.code == 400 and "error" in json.loads(caught.value.read())
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1, IMAGE_SIZE, IMAGE_SIZE],
                    "datatype": "UINT8",
                    "data": [0] * IMAGE_SIZE * IMAGE_SIZE,
                }
            ]
        }
    ).encode()
    for sent in (body[:100], body):  # hang up mid-body, and hang up before reading the reply
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
            sock.sendall(
                b"POST /v2/models/cxr/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + sent
            )
    time.sleep(0.5)
    _still_serving(server)


def test_missing_input_and_unknown_model_are_clear_errors(server):
    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    with pytest.raises(InferenceServerException, match="unknown model|not found"):
        client.infer("nope", _good_request(grpcclient))
    request = grpcclient.InferInput("wrong_name", [1, 1, IMAGE_SIZE, IMAGE_SIZE], "UINT8")
    request.set_data_from_numpy(np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), np.uint8))
    with pytest.raises(InferenceServerException, match="unexpected inference input|expected 1 inputs"):
        client.infer("cxr", [request])
    _still_serving(server)


def test_burst_beyond_the_queue_is_rejected_then_stop_leaves_nothing_behind(bundle):
    shm_before = set(os.listdir("/dev/shm"))
    with ServerProcess(bundle, "--max-batch", "1", "--max-queue", "1", "--max-queue-delay-us", "0") as server:
        address = server.grpc_url.removeprefix("grpc://")

        def one(_: int) -> str:
            client = grpcclient.InferenceServerClient(address)
            try:
                client.infer("cxr", _good_request(grpcclient, count=1))
                return "ok"
            except InferenceServerException as exc:
                return str(exc)
            finally:
                client.close()

        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(one, range(256)))
        rejected = [o for o in outcomes if o != "ok"]
        assert rejected and len(rejected) < len(outcomes), outcomes[:3]
        assert all("exceeds maximum queue size" in o.lower() for o in rejected), rejected[:3]
        _still_serving(server)
        port = server.http_port
    assert server.returncode == 0, server.tail()
    leftovers = [
        line for line in os.popen("ps -eo args").read().splitlines() if f"--http-port={port}" in line
    ]
    assert leftovers == []
    time.sleep(1)
    ours = [name for name in set(os.listdir("/dev/shm")) - shm_before if str(server.process.pid) in name]
    assert ours == []  # PyTriton's shared-memory segments carry the serving process id


def test_server_down_gives_one_error_per_file_and_exit_2(bundle, inputs):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("cxr-run", "predict", str(inputs), "--model", str(bundle), "--server", url, check=2)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == len(list(inputs.iterdir())) and all(r["error"] for r in records)
    down = [r for r in records if "Connection refused" in r["error"]]
    assert len(down) == len(records) - 3 and all(r["error"].startswith(f"server {url}: ") for r in down)
    assert "Traceback" not in result.stderr


def test_server_timing_out_gives_one_error_per_file(bundle, inputs):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts connections, never answers
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = cli(
            "cxr-run",
            "predict",
            str(inputs),
            "--model",
            str(bundle),
            "--server",
            url,
            "--timeout",
            "1",
            "--batch-size",
            "2",
            check=2,
        )
        records = [json.loads(line) for line in result.stdout.splitlines()]
        timed_out = [r for r in records if r["error"] and r["error"].startswith(f"server {url}")]
        assert len(timed_out) == len(records) - 3
        assert any("timed out" in r["error"].lower() or "timeout" in r["error"].lower() for r in timed_out), (
            timed_out[0]
        )
        assert (
            time.monotonic() - started < 30
        )  # gives up after 3 failures in a row instead of waiting per batch
    finally:
        silent.close()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--server", "ftp://x:1"], "--server must look like http://HOST:PORT"),
        (["--server", "http://localhost:99999"], "port is not a number"),
        (["--server", "http://127.0.0.1:1", "--explain"], "--explain runs on the local backend"),
        (["--server", "http://127.0.0.1:1", "--timeout", "0"], "--timeout must be above 0"),
    ],
)
def test_bad_client_options_are_one_line_errors(bundle, inputs, args, message):
    result = cli("cxr-run", "predict", str(inputs), "--model", str(bundle), *args, check=2)  # usage: exit 2
    assert message in one_line_error(result)


def test_server_for_another_model_is_refused(server, bundle, inputs, tmp_path):
    import shutil

    from cxr.runtime.card import read_card, write_card

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    card = read_card(other)
    write_card(other, card.replace(classes=tuple(reversed(card.classes))))
    result = cli(
        "cxr-run", "predict", str(inputs), "--model", str(other), "--server", server.http_url, check=1
    )
    assert "serves another model" in one_line_error(result) and "classes" in one_line_error(result)


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--model", "/no/such/bundle"], "not a folder", 1),
        (["--max-batch", "0"], "--max-batch and --instances must be at least 1", 2),
    ],
)
def test_bad_serve_options_are_one_line_errors(bundle, args, message, code):
    base = ["--model", str(bundle)] if args[0] != "--model" else []
    result = cli("cxr-run", "serve", *base, *args, "--http-port", str(free_port()), check=code)
    assert message in one_line_error(result)


def test_busy_port_and_missing_engine_are_one_line_errors(bundle):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        result = cli("cxr-run", "serve", "--model", str(bundle), "--http-port", port, check=1)
    assert f"--http-port {port} on 127.0.0.1" in one_line_error(result) and "in use" in one_line_error(result)
    result = cli(
        "cxr-run",
        "serve",
        "--model",
        str(bundle),
        "--backend",
        "tensorrt",
        "--http-port",
        str(free_port()),
        "--grpc-port",
        str(free_port()),
        "--metrics-port",
        str(free_port()),
        check=1,
    )
    assert "--backend tensorrt" in one_line_error(result)


@pytest.mark.parametrize("shape", [[1, 1, 1_000_000, 1_000_000], [1, 1, 100_000, 100_000]])
def test_a_huge_declared_shape_with_one_byte_does_not_hurt_the_server(server, shape):
    """~100 bytes declaring a terabyte: refused at once (fixed dims in the config), and the server keeps
    serving."""
    import urllib.error

    body = json.dumps(
        {"inputs": [{"name": "image", "shape": shape, "datatype": "UINT8", "data": [0]}]}
    ).encode()
    request = urllib.request.Request(f"{server.http_url}/v2/models/cxr/infer", data=body, method="POST")
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400 and time.monotonic() - started < 5
    _still_serving(server)


def test_serve_exits_non_zero_when_tritonserver_dies(bundle):
    import subprocess

    with ServerProcess(bundle) as dying:
        pids = subprocess.run(
            ["pgrep", "-f", f"tritonserver .*--grpc-port {dying.grpc_port} "], capture_output=True, text=True
        ).stdout.split()
        assert pids, "tritonserver not found"
        for pid in pids:
            os.kill(int(pid), signal.SIGKILL)
        dying.process.wait(timeout=120)
        assert dying.process.returncode == 1
        assert "tritonserver stopped by itself" in dying.tail(40)


def test_grpc_listens_on_loopback_unless_named():
    """Triton's gRPC is not behind the guarded front: --host 0.0.0.0 opens HTTP (guarded) but not gRPC."""
    from cxr.runtime.serve import ServeOptions, _triton_configs

    public, _ = _triton_configs(ServeOptions(host="0.0.0.0"), free_port())
    assert (public.http_address, public.grpc_address) == ("127.0.0.1", "127.0.0.1")
    named, _ = _triton_configs(ServeOptions(host="0.0.0.0", grpc_host="0.0.0.0"), free_port())
    assert named.grpc_address == "0.0.0.0"

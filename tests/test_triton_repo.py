"""``cxr-export triton``: a model repository validated against the graph it serves."""

import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from cxr.export.triton_repo import graph_io, read_config, validate_repository
from cxr.runtime.card import read_card, record_files
from cxr.runtime.engine_sidecar import write_sidecar

from tests.conftest import IMAGE_SIZE, cli, one_line_error


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_onnx_repository_matches_the_graph(bundle, tmp_path, precision):
    repo = tmp_path / "repo"
    cli(
        "cxr-export", "triton", str(bundle), "--out", str(repo), "--precision", precision, "--max-batch", "32"
    )
    model_dir = repo / "cxr"
    config = read_config(model_dir)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert [(t.name, list(t.dims)) for t in config.input] == [("image", [1, IMAGE_SIZE, IMAGE_SIZE])]
    assert [(t.name, list(t.dims)) for t in config.output][0] == ("probs", [4])
    assert [t.name for t in config.output][1:] == ["features"]  # the out-of-distribution gate reads them
    assert config.input[0].data_type == 2 and config.output[0].data_type == 11  # TYPE_UINT8, TYPE_FP32
    assert max(config.dynamic_batching.preferred_batch_size) == 32
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert (model_dir / "labels.txt").read_text().split() == list(read_card(bundle).classes)
    served = model_dir / "1" / "model.onnx"
    assert (
        served.read_bytes()
        == (bundle / ("model.onnx" if precision == "fp32" else f"model.{precision}.onnx")).read_bytes()
    )
    note = (model_dir / "CLIENTS.md").read_text()
    assert f"short side is {IMAGE_SIZE}" in note and "cropped to the body" in note and "CLAHE" in note
    assert validate_repository(repo, "cxr") == []
    assert "valid" in cli("cxr-export", "triton-check", str(repo)).stdout


def test_hand_edited_config_is_caught(bundle, tmp_path):
    repo = tmp_path / "repo"
    cli(
        "cxr-export",
        "triton",
        str(bundle),
        "--out",
        str(repo),
        "--precision",
        "fp32",
        "--kind",
        "cpu",
        "--max-batch",
        "8",
    )
    path = repo / "cxr" / "config.pbtxt"
    good = path.read_text()
    assert "KIND_CPU" in good
    path.write_text(
        good.replace("TYPE_UINT8", "TYPE_FP32")
        .replace(f"dims: {IMAGE_SIZE}", "dims: 99", 1)
        .replace('name: "probs"', 'name: "scores"')
    )
    problems = validate_repository(repo, "cxr")
    text = " | ".join(problems)
    assert "TYPE_FP32 but the graph has TYPE_UINT8" in text
    assert "dims [1, 99," in text
    assert "output names ['scores', 'features']" in text
    result = cli("cxr-export", "triton-check", str(repo), check=1)
    assert result.stdout.count("problem:") == len(problems) == 3
    path.write_text("max_batch_size: [oops")
    assert "not a valid Triton model config" in validate_repository(repo, "cxr")[0]
    (repo / "cxr" / "labels.txt").write_text("a\nb\n")
    path.write_text(good)
    assert validate_repository(repo, "cxr") == ["labels.txt: 2 labels for [4] outputs"]


def _bundle_with_plan(bundle: Path, tmp_path: Path, max_batch: int) -> Path:
    """A copy of the bundle with a recorded plan and sidecar. TensorRT is absent here, so the plan bytes
    are a placeholder: only the repository layout and batch limits are under test, not the engine."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    plan = copy / "model.fp16.engine"
    plan.write_bytes(b"placeholder plan")
    profile = {
        "image": {
            "min": [1, 1, IMAGE_SIZE, IMAGE_SIZE],
            "opt": [8, 1, IMAGE_SIZE, IMAGE_SIZE],
            "max": [max_batch, 1, IMAGE_SIZE, IMAGE_SIZE],
        }
    }
    write_sidecar(
        plan, {"graph": "model", "precision": "fp16", "profile": profile, "source_onnx": "model.fp16.onnx"}
    )
    record_files(copy, read_card(copy), [plan.name, f"{plan.name}.json"])
    return copy


def test_plan_repository_uses_the_engine_profile(bundle, tmp_path):
    with_plan = _bundle_with_plan(bundle, tmp_path, max_batch=16)
    repo = tmp_path / "repo"
    error = one_line_error(cli("cxr-export", "triton", str(with_plan), "--out", str(repo), check=2))
    assert "engine profile covers batches 1..16" in error and "--max-batch 16" in error
    cli("cxr-export", "triton", str(with_plan), "--out", str(repo), "--max-batch", "16")
    config = read_config(repo / "cxr")
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 16
    assert (repo / "cxr" / "1" / "model.plan").read_bytes() == b"placeholder plan"
    inputs, outputs = graph_io(with_plan / "model.fp16.onnx")
    assert [t.name for t in config.input] == [s.name for s in inputs]
    assert [list(t.dims) for t in config.output] == [list(s.dims) for s in outputs]
    path = repo / "cxr" / "config.pbtxt"
    path.write_text(path.read_text().replace("max_batch_size: 16", "max_batch_size: 64"))
    assert any("outside the engine profile 1..16" in p for p in validate_repository(repo, "cxr"))


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["--format", "tensorrt"], "no model.fp16.engine", 1),  # the bundle lacks it: not a usage error
        (["--kind", "tpu"], "--kind must be one of gpu, cpu", 2),
        (["--trt-accelerator", "--kind", "cpu"], "--trt-accelerator applies to the ONNX graph on a GPU", 2),
        (["--max-batch", "0"], "--max-batch and --instances must be at least 1", 2),
        (["--precision", "fp8"], "--precision must be one of", 2),
        (["--name", "../evil"], "--name must be letters", 2),
    ],
)
def test_bad_triton_options_are_one_line_errors(bundle, tmp_path, args, message, code):
    result = cli("cxr-export", "triton", str(bundle), "--out", str(tmp_path / "repo"), *args, check=code)
    assert message in one_line_error(result)


def _tritonserver_with_onnxruntime() -> tuple[str, str] | None:
    """A full Triton server (NGC container or install) with the ONNX Runtime backend; PyTriton's has none."""
    binary = os.environ.get(
        "TRITONSERVER", shutil.which("tritonserver") or "/opt/tritonserver/bin/tritonserver"
    )
    backends = os.environ.get("TRITON_BACKENDS", str(Path(binary).parent.parent / "backends"))
    if Path(binary).is_file() and (Path(backends) / "onnxruntime").is_dir():
        return binary, backends
    return None


def test_real_triton_server_loads_the_repository(bundle, tmp_path):
    found = _tritonserver_with_onnxruntime()
    if found is None:
        pytest.skip("no tritonserver with the onnxruntime backend (set TRITONSERVER / TRITON_BACKENDS)")
    import tritonclient.http as http
    from cxr.runtime.backends.onnxruntime import OrtBackend

    repo = tmp_path / "repo"
    cli("cxr-export", "triton", str(bundle), "--out", str(repo), "--precision", "fp32", "--kind", "cpu")
    binary, backends = found
    server = subprocess.Popen(
        [
            binary,
            "--model-repository",
            str(repo),
            "--backend-directory",
            backends,
            "--http-port",
            "18900",
            "--grpc-port",
            "18901",
            "--metrics-port",
            "18902",
        ]
    )
    try:
        client = http.InferenceServerClient("127.0.0.1:18900")
        for _ in range(120):
            try:
                if client.is_model_ready("cxr"):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        pixels = np.random.default_rng(0).integers(0, 256, (3, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
        request = http.InferInput("image", list(pixels.shape), "UINT8")
        request.set_data_from_numpy(pixels)
        probs = client.infer("cxr", [request]).as_numpy("probs")
        with OrtBackend(bundle / "model.onnx", "fp32") as local:
            np.testing.assert_allclose(probs, local.run(pixels), atol=1e-5)
    finally:
        server.terminate()
        server.wait(30)

"""The guarded HTTP front of ``cxr-run serve``: one strict reading of every request, bounded under load.

Three layers: the request reader alone (no sockets, property tests), the front against a recording stand-in
for Triton (small limits, fast), and a corpus of odd requests sent through the front to a real Triton, which
must be alive and answer a normal request correctly after each.
"""

from __future__ import annotations

import http.server
import json
import logging
import select
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("h11", reason="serving extra not installed (pip install 'cxr-edge[serve]')")
from cxr.runtime.serve_bounds import JSON_COST, Budget, Connections, GuardLimits  # noqa: E402
from cxr.runtime.serve_guard import GuardedFront  # noqa: E402
from cxr.runtime.serve_requests import Refused, read_infer, routes, serialize_bytes  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.conftest import IMAGE_SIZE  # noqa: E402

SIZE, CLASSES, MAX_BATCH = 8, 4, 4


def _models(size: int = SIZE, max_batch: int = MAX_BATCH):
    from cxr.runtime.serve_requests import ModelSpec, TensorSpec

    probs = TensorSpec("probs", "FP32", (CLASSES,))
    return (
        ModelSpec("cxr", (TensorSpec("image", "UINT8", (1, size, size)),), (probs,), max_batch),
        ModelSpec(
            "cxr_encoded",
            (TensorSpec("data", "BYTES", (1,)), TensorSpec("strict", "BOOL", (1,), optional=True)),
            (
                probs,
                TensorSpec("error", "BYTES", (1,)),
                TensorSpec("warnings", "BYTES", (1,)),
                TensorSpec("ood_score", "FP32", (1,)),
            ),
            max_batch,
        ),
    )


MODELS = _models()
PIXELS, ENCODED = MODELS


def test_the_spec_here_is_the_one_serve_binds():
    from cxr.runtime.serve import served_models

    assert served_models("cxr", SIZE, CLASSES, MAX_BATCH)[:2] == MODELS


def pixel_input(batch: int = 1, values: list | None = None, size: int = SIZE) -> dict:
    count = batch * size * size
    return {
        "name": "image",
        "shape": [batch, 1, size, size],
        "datatype": "UINT8",
        "data": values if values is not None else [(i * 7) % 256 for i in range(count)],
    }


def json_body(*inputs: dict, **extra: object) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, int]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), len(text)


def refused(body: bytes, header_length: int | None = None, model=PIXELS) -> Refused:
    with pytest.raises(Refused) as caught:
        read_infer(bytearray(body), header_length, model)
    return caught.value


# ---------------------------------------------------------------------------------------------------------
# The request reader alone


def test_a_json_request_reaches_triton_rebuilt_in_binary_with_only_known_fields():
    body = json_body(pixel_input(2), id="r1", parameters={"binary_data_output": True})
    header, parts = read_infer(bytearray(body), None, PIXELS).to_triton()
    assert json.loads(header) == {
        "id": "r1",
        "parameters": {"binary_data_output": True},
        "inputs": [
            {
                "name": "image",
                "shape": [2, 1, SIZE, SIZE],
                "datatype": "UINT8",
                "parameters": {"binary_data_size": 128},
            }
        ],
    }
    assert b"".join(parts) == bytes((i * 7) % 256 for i in range(128))


@pytest.mark.parametrize(
    "body, kind",
    [
        (b'{"inputs": [], "inputs": [{"name": "image"}]}', "duplicate JSON key"),
        (
            b'{"inputs": [{"name": "image", "name": "x", "shape": [1], "datatype": "UINT8", "data": [0]}]}',
            "duplicate",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": [NaN]}]}',
            "not JSON",
        ),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "UINT8", '
            b'"data": [-Infinity]}]}',
            "not JSON",
        ),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b'{"inputs": [{"name": "image", "shape": [1, 1, 8, ' + b"9" * 5000 + b"]}]}", "not JSON"),
        (
            b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 1e400], "datatype": "UINT8", "data": [0]}]}',
            "bad shape",
        ),
        (b'{"inputs": [], "evil": 1}', "unknown field"),
        (b'{"inputs": [{"name": "nope", "shape": [1], "datatype": "UINT8", "data": [0]}]}', "unknown input"),
    ],
)
def test_json_that_could_be_read_two_ways_is_refused(body, kind):
    refusal = refused(body)
    assert refusal.status == 400 and kind in refusal.kind


@pytest.mark.parametrize(
    "change, kind",
    [
        ({"shape": [1, 1, 1_000_000, 1_000_000], "data": [0]}, "bad shape"),
        ({"shape": [0, 1, SIZE, SIZE], "data": []}, "bad shape"),
        ({"shape": [MAX_BATCH + 1, 1, SIZE, SIZE]}, "bad shape"),
        ({"shape": [True, 1, SIZE, SIZE]}, "bad shape"),
        ({"shape": [1, 1, SIZE, SIZE], "data": [0] * (SIZE * SIZE - 1)}, "bad data"),
        ({"data": [[0] * SIZE] * SIZE}, "bad data"),
        ({"data": [99999] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"data": [256] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"data": [-1] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"data": [1.0] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"data": [True] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"data": ["1"] + [0] * (SIZE * SIZE - 1)}, "bad value"),
        ({"datatype": "INT64"}, "bad datatype"),
        ({"datatype": "FP32"}, "bad datatype"),
        ({"parameters": {"binary_data_size": 64}}, "bad request"),
        ({"parameters": {"shared_memory_region": "x"}}, "unknown field"),
    ],
)
def test_tensors_that_do_not_fit_the_model_exactly_are_refused(change, kind):
    refusal = refused(json_body({**pixel_input(), **change}))
    assert refusal.status == 400 and refusal.kind == kind


def test_uint8_values_at_the_edges_pass_unchanged():
    values = [0, 255] * (SIZE * SIZE // 2)
    _, parts = read_infer(bytearray(json_body(pixel_input(1, values))), None, PIXELS).to_triton()
    assert list(parts[0]) == values


def _binary_input(name: str, shape: list, datatype: str, size: int) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize("sent", [SIZE * SIZE - 1, SIZE * SIZE + 1])
def test_binary_pixels_must_be_exactly_the_bytes_their_shape_declares(sent):
    header = {"inputs": [_binary_input("image", [1, 1, SIZE, SIZE], "UINT8", sent)]}
    assert refused(*binary_body(header, bytes(sent))).kind == "binary size"
    header = {"inputs": [_binary_input("image", [1, 1, SIZE, SIZE], "UINT8", SIZE * SIZE)]}
    body, length = binary_body(header, bytes(sent))
    assert refused(body, length).kind == "binary size"  # the body carries more or less than declared


def test_binary_header_length_must_fit_the_body():
    body = json_body(pixel_input())
    assert refused(body, len(body) + 1).kind == "binary size"
    assert refused(body, 0).kind == "binary size"


def test_binary_bytes_and_bool_inputs_are_checked_element_by_element():
    images = serialize_bytes([b"png-1", b"png-2"])
    header = {
        "inputs": [
            _binary_input("data", [2, 1], "BYTES", len(images)),
            _binary_input("strict", [2, 1], "BOOL", 2),
        ]
    }
    body, length = binary_body(header, images, b"\x01\x00")
    header_out, parts = read_infer(bytearray(body), length, ENCODED).to_triton()
    assert [bytes(p) for p in parts] == [images, b"\x01\x00"]
    assert refused(*binary_body(header, images, b"\x02\x00"), model=ENCODED).kind == "bad value"
    cut = images[:-1] + b""
    header["inputs"][0]["parameters"]["binary_data_size"] = len(cut)
    assert refused(*binary_body(header, cut, b"\x01\x00"), model=ENCODED).kind == "binary size"
    lying = struct.pack("<I", 1 << 30) + b"x"
    header["inputs"][0]["parameters"]["binary_data_size"] = len(lying)
    assert refused(*binary_body(header, lying, b"\x01\x00"), model=ENCODED).kind == "binary size"


def test_json_strings_become_triton_bytes_elements_and_the_required_input_is_required():
    body = json_body({"name": "data", "shape": [2, 1], "datatype": "BYTES", "data": ["a", "\u00e9"]})
    _, parts = read_infer(bytearray(body), None, ENCODED).to_triton()
    assert parts == [serialize_bytes([b"a", "\u00e9".encode()])]
    only_strict = json_body({"name": "strict", "shape": [1, 1], "datatype": "BOOL", "data": [True]})
    assert "needs input 'data'" in refused(only_strict, model=ENCODED).message


def test_outputs_and_parameters_are_limited_to_what_the_model_has():
    good = read_infer(
        bytearray(
            json_body(pixel_input(), outputs=[{"name": "probs", "parameters": {"binary_data": False}}])
        ),
        None,
        PIXELS,
    )
    assert json.loads(good.to_triton()[0])["outputs"] == [
        {"name": "probs", "parameters": {"binary_data": False}}
    ]
    assert refused(json_body(pixel_input(), outputs=[{"name": "secret"}])).kind == "unknown output"
    assert refused(json_body(pixel_input(), parameters={"sequence_id": 1})).kind == "unknown field"
    assert refused(json_body(pixel_input(), parameters={"priority": 1.5})).kind == "bad parameter"


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, MAX_BATCH), seed=st.integers(0, 2**32 - 1), binary=st.booleans())
def test_any_valid_pixel_batch_reaches_triton_as_exactly_its_values(batch, seed, binary):
    values = np.random.default_rng(seed).integers(0, 256, (batch, 1, SIZE, SIZE), dtype=np.uint8)
    shape = list(values.shape)
    if binary:
        body, length = binary_body(
            {"inputs": [_binary_input("image", shape, "UINT8", values.size)]}, values.tobytes()
        )
    else:
        body, length = json_body(pixel_input(batch, values.reshape(-1).tolist())), None
    header, parts = read_infer(bytearray(body), length, PIXELS).to_triton()
    assert json.loads(header)["inputs"][0]["shape"] == shape and b"".join(parts) == values.tobytes()


def _documents():
    scalars = st.none() | st.booleans() | st.integers(-300, 1 << 40) | st.floats() | st.text(max_size=8)
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=5)
            | st.dictionaries(
                st.sampled_from(["inputs", "name", "shape", "datatype", "data", "parameters", "x"]), inner
            )
        ),
        max_leaves=30,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=_documents(), header_length=st.none() | st.integers(0, 400))
def test_any_document_is_read_or_refused_with_a_400_never_a_crash(document, header_length):
    body = bytearray(json.dumps(document).encode())
    try:
        request = read_infer(body, header_length, PIXELS)
    except Refused as refusal:
        assert refusal.status == 400 and "\n" not in refusal.message
        return
    assert request.inputs[0].shape[1:] == (1, SIZE, SIZE) and len(request.inputs[0].payload) == np.prod(
        request.inputs[0].shape
    )


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_any_bytes_are_read_or_refused_never_a_crash(data):
    try:
        read_infer(bytearray(data), None, PIXELS)
    except Refused as refusal:
        assert refusal.status == 400


def test_the_routes_are_exact_paths_of_the_served_models():
    table = routes(MODELS)
    assert (
        table["/v2/models/cxr/infer"].model is PIXELS
        and table["/v2/models/cxr_encoded/infer"].model is ENCODED
    )
    assert table["/v2/health/ready"].method == "GET" and "/v2/models/cxr/ready" in table
    assert not any("repository" in path or "logging" in path or "?" in path for path in table)


def test_the_budget_and_the_connection_cap_hold_under_many_threads():
    budget = Budget(1000)
    with ThreadPoolExecutor(16) as pool:
        taken = list(pool.map(lambda _: budget.reserve(300), range(16)))
    assert sum(taken) == 3 and budget.used == 900 and budget.peak <= budget.total
    connections = Connections(2)
    first, second = socket.socketpair()
    try:
        slots = [connections.admit(first, "a"), connections.admit(second, "b")]
        assert connections.enter(slots[0], "busy") and connections.enter(slots[1], "busy")
        assert connections.admit(first, "c") is None  # all busy: the newcomer is refused
        connections.enter(slots[1], "waiting")
        assert connections.admit(first, "d") is not None and slots[1].evicted  # the idle one gave way
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------------------------------------------
# The front against a recording stand-in for Triton


class Recorder(http.server.ThreadingHTTPServer):
    """A stand-in for Triton: records what reaches it, answers 200; ``hold`` keeps replies waiting."""

    daemon_threads = True

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict, bytes]] = []
        self.hold = threading.Event()
        self.hold.set()
        super().__init__(("127.0.0.1", 0), _RecorderHandler)


class _RecorderHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.command, self.path, dict(self.headers), body))
        self.server.hold.wait(30)
        out = b'{"model_name":"cxr","outputs":[]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _reply


@pytest.fixture(scope="module")
def recorder():
    server = Recorder()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@contextmanager
def front_on(recorder: Recorder, models=MODELS, **limits):
    with GuardedFront(
        "127.0.0.1", 0, recorder.server_address[1], models, GuardLimits.for_models(models, **limits)
    ) as front:
        yield front


@dataclass
class Answer:
    status: int  # 0: closed without an answer
    headers: dict[str, str]
    body: bytes
    seconds: float

    def error(self) -> str:
        assert self.body.endswith(b"\n") and self.body.count(b"\n") == 1, self.body  # one JSON line
        return json.loads(self.body)["error"]


class Reader:
    """Answers read off one connection in turn (bytes of the next one are kept)."""

    def __init__(self, sock: socket.socket, data: bytes = b"") -> None:
        self.sock, self.data = sock, data

    def recv(self, size: int) -> bytes:
        data, self.data = self.data, b""
        return data or self.sock.recv(size)

    def keep(self, data: bytes) -> None:
        self.data = data + self.data


def read_answer(sock: socket.socket | Reader, started: float) -> Answer:
    reader = sock if isinstance(sock, Reader) else Reader(sock)
    data = b""
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            lines = data[:head_end].decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
            }
            if status < 200:  # 100 Continue: the real answer follows
                data = data[head_end + 4 :]
                continue
            length = int(headers.get("content-length", 0))
            if len(data) >= head_end + 4 + length:
                body = data[head_end + 4 : head_end + 4 + length]
                reader.keep(data[head_end + 4 + length :])
                return Answer(status, headers, body, time.monotonic() - started)
        try:
            chunk = reader.recv(1 << 16)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            return Answer(0, {}, data, time.monotonic() - started)
        data += chunk


def exchange(port: int, *pieces: bytes, pause_s: float = 0.0, timeout_s: float = 30.0) -> Answer:
    """Send raw bytes (pieces ``pause_s`` apart) on a fresh connection and read one answer; an answer that
    comes before everything is sent stops the sending, as a careful client does."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            for i, piece in enumerate(pieces):
                if i and pause_s:
                    time.sleep(pause_s)
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_answer(sock, started)


def send_expecting(port: int, head: bytes, body: bytes) -> Answer:
    """A large body as careful clients send one: the head with ``Expect: 100-continue``, the body only once
    the server says it will read it."""
    started = time.monotonic()
    head = head.replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n", 1)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        first = sock.recv(1 << 16)
        if not first.startswith(b"HTTP/1.1 100"):
            return read_answer(Reader(sock, first), started)
        sock.sendall(body)
        return read_answer(sock, started)


def post(target: str, body: bytes, *headers: str) -> bytes:
    lines = [f"POST {target} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(target: str, *headers: str) -> bytes:
    return ("\r\n".join([f"GET {target} HTTP/1.1", "Host: x", *headers]) + "\r\n\r\n").encode()


def chunked(target: str, body: bytes, size: int, *headers: str) -> bytes:
    pieces = [
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    head = "\r\n".join([f"POST {target} HTTP/1.1", "Host: x", "Transfer-Encoding: chunked", *headers])
    return (head + "\r\n\r\n").encode() + b"".join(pieces) + b"0\r\n\r\n"


INFER = "/v2/models/cxr/infer"


def test_triton_receives_only_the_rebuilt_request_and_no_client_header(recorder):
    with front_on(recorder) as front:
        sent = post(
            INFER,
            json_body(pixel_input()),
            "X-Injected: 1",
            "Authorization: Bearer t",
            "Accept-Encoding: gzip",
        )
        answer = exchange(front.port, sent)
    method, path, headers, body = recorder.seen[-1]
    assert answer.status == 200 and (method, path) == ("POST", INFER)
    assert {k.lower() for k in headers} == {
        "host",
        "content-type",
        "inference-header-content-length",
        "content-length",
    }
    length = int(headers["Inference-Header-Content-Length"])
    assert json.loads(body[:length])["inputs"][0]["parameters"] == {"binary_data_size": SIZE * SIZE}


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (post(f"http://127.0.0.1{INFER}", json_body(pixel_input())), 404),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
        (get("/v2/models/cxr/../../v2/health/ready"), 404),
        (get("/v2/models/cxr%2Fready"), 404),
        (get("/v2/health/ready?verbose=1"), 404),
        (post(INFER + "?x=1", json_body(pixel_input())), 404),
        (post("/v2/models/nope/infer", json_body(pixel_input())), 404),
        (post("/v2/repository/index", b"{}"), 404),
        (get(INFER), 405),
        (post(INFER, json_body(pixel_input()), "Content-Length: 0"), 400),
        (post(INFER, json_body(pixel_input())).replace(b"Content-Length: ", b"Content-Length: 3, "), 400),
        (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: 2, 2"), 400),
        (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: two"), 400),
        (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: -2"), 400),
        (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: +2"), 400),
        (post(INFER, b"{}", "Transfer-Encoding: chunked"), 400),
        (chunked(INFER, json_body(pixel_input()), 100).replace(b"chunked", b"gzip, chunked"), 501),
        (post(INFER, b"{}", "Content-Encoding: gzip"), 415),
        (post(INFER, b"{}", "X-A: 1\rX-B: 2"), 400),
        (post(INFER, b"{}", "Content-Length : 2"), 400),
        (post(INFER, b"{}").replace(b"Host: x\r\n", b""), 400),
        (post(INFER, b"{}", "Inference-Header-Content-Length: 1x"), 400),
        (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", 400),
        (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    ],
    ids=[
        "absolute-form",
        "options-star",
        "dot-dot",
        "encoded-slash",
        "query-on-get",
        "query-on-infer",
        "unknown-model",
        "restricted-endpoint",
        "wrong-method",
        "two-content-lengths",
        "content-length-list",
        "content-length-same-twice",
        "non-numeric-length",
        "negative-length",
        "signed-length",
        "te-and-cl",
        "unknown-coding",
        "compressed-body",
        "bare-cr-in-header",
        "space-before-colon",
        "no-host",
        "bad-binary-header-length",
        "get-with-body",
        "oversized-head",
    ],
)
def test_odd_requests_are_refused_with_one_json_line_and_never_reach_triton(recorder, request_bytes, status):
    with front_on(recorder) as front:
        before = len(recorder.seen)
        answer = exchange(front.port, request_bytes)
    assert answer.status == status and answer.error()
    assert len(recorder.seen) == before
    if status == 405:
        assert answer.headers["allow"] == "POST"


def test_chunked_bodies_are_read_under_the_same_caps(recorder):
    with front_on(recorder) as front:
        assert exchange(front.port, chunked(INFER, json_body(pixel_input()), 7)).status == 200
        big = json_body(pixel_input()) + b" " * front.limits.max_json_bytes
        answer = exchange(front.port, chunked(INFER, big, 1 << 16))
        assert answer.status == 413 and "chunked body passed" in answer.error()
        declared = post(INFER, b"", f"Content-Length: {front.limits.max_json_bytes + 1}").replace(
            b"Content-Length: 0\r\n", b""
        )
        answer = exchange(front.port, declared)
        assert answer.status == 413 and "Inference-Header-Content-Length" in answer.error()


def test_expect_100_continue_and_pipelined_requests_are_answered_in_order(recorder):
    with front_on(recorder) as front:
        answer = exchange(front.port, post(INFER, json_body(pixel_input()), "Expect: 100-continue"))
        assert answer.status == 200
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as sock:
            sock.sendall(get("/v2/health/live") + get("/nope") + get("/v2/health/ready"))
            reader = Reader(sock)
            statuses = [read_answer(reader, time.monotonic()).status for _ in range(3)]
    assert statuses == [200, 404, 200]


def test_a_slow_head_and_a_stalled_body_are_cut_by_their_deadlines(recorder):
    with front_on(recorder, head_timeout_s=1.0) as front:
        slow = get("/v2/health/ready")
        answer = exchange(front.port, *[slow[i : i + 1] for i in range(len(slow))], pause_s=0.2)
        assert answer.status == 408 and 0.9 < answer.seconds < 3 and "request head" in answer.error()
        stalled = post(INFER, json_body(pixel_input()))[:-10]
        answer = exchange(front.port, stalled)
        assert answer.status == 408 and 0.9 < answer.seconds < 3 and "request body" in answer.error()
        assert front.budget.used == 0  # the stalled body's reservation was given back


def test_idle_connections_are_closed_and_give_way_to_new_ones_at_the_cap(recorder):
    with front_on(recorder, max_connections=4, idle_timeout_s=1.0) as front:
        idle = [socket.create_connection(("127.0.0.1", front.port)) for _ in range(12)]
        try:
            time.sleep(0.3)
            answer = exchange(front.port, post(INFER, json_body(pixel_input())))
            assert answer.status == 200 and front.connections.evictions >= 9
            idle[-1].settimeout(3)
            assert idle[-1].recv(1) == b""  # and the idle timeout closes the rest
        finally:
            for sock in idle:
                sock.close()


def test_busy_connections_at_the_cap_get_a_quick_503_with_retry_after(recorder):
    with front_on(recorder, max_connections=2) as front:
        recorder.hold.clear()
        try:
            with ThreadPoolExecutor(2) as pool:
                held = [pool.submit(exchange, front.port, get("/v2/health/ready")) for _ in range(2)]
                deadline = time.monotonic() + 10
                while len(front.connections.active) < 2 or any(
                    s.phase != "busy" for s in front.connections.active
                ):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                answer = exchange(front.port, get("/v2/health/ready"))
                assert answer.status == 503 and answer.headers["retry-after"] == "1" and answer.seconds < 2
                recorder.hold.set()
                assert [f.result().status for f in held] == [200, 200]
        finally:
            recorder.hold.set()


def test_bodies_beyond_the_memory_budget_get_503_and_the_budget_is_never_exceeded(recorder):
    body = json_body(pixel_input(MAX_BATCH))
    budget = 3 * JSON_COST * len(body)  # three such bodies at once
    with front_on(recorder, memory_budget=budget) as front:
        recorder.hold.clear()  # replies wait, so reservations pile up
        try:
            with ThreadPoolExecutor(8) as pool:
                answers = [pool.submit(exchange, front.port, post(INFER, body)) for _ in range(8)]
                time.sleep(1.0)
                recorder.hold.set()
                statuses = sorted(a.result().status for a in answers)
        finally:
            recorder.hold.set()
        assert statuses.count(200) == 3 and statuses.count(503) == 5
        assert front.budget.peak <= budget and front.budget.used == 0


def test_refusals_are_logged_by_reason_without_the_body_and_summed_at_shutdown(recorder, caplog):
    secret = "PATIENT-7f3a"
    with caplog.at_level(logging.INFO, logger="cxr.runtime"):
        with front_on(recorder) as front:
            dup = b'{"inputs": [], "inputs": [{"name": "' + secret.encode() + b'"}]}'
            exchange(front.port, post(INFER, dup))
            exchange(front.port, post(INFER, json_body({**pixel_input(), "datatype": "FP32"}, id=secret)))
    lines = [r.getMessage() for r in caplog.records]
    assert any("refused 400 (duplicate JSON key) from 127.0.0.1:" in line for line in lines)
    assert any("refused 400 (bad datatype)" in line for line in lines)
    assert lines[-1] == "front: 2 requests refused (duplicate JSON key 1, bad datatype 1)"
    assert not any(secret in line for line in lines)


def test_a_triton_that_does_not_answer_is_a_502(recorder):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    with GuardedFront("127.0.0.1", 0, port, MODELS) as front:
        answer = exchange(front.port, post(INFER, json_body(pixel_input())))
    assert answer.status == 502 and "Triton did not answer" in answer.error()


# ---------------------------------------------------------------------------------------------------------
# Through the front to a real Triton


@pytest.fixture(scope="module")
def server(bundle):
    pytest.importorskip("pytriton", reason="serving extra not installed (pip install 'cxr-edge[serve]')")
    from cxr.runtime.serve_process import ServerProcess

    with ServerProcess(bundle, "--max-batch", "16") as running:
        yield running


@pytest.fixture(scope="module")
def expected(bundle):
    """A fixed batch and what the bundle's fp32 graph says of it locally."""
    from cxr.runtime.backends.onnxruntime import OrtBackend

    pixels = np.random.default_rng(3).integers(0, 256, (2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    with OrtBackend(bundle / "model.onnx", "fp32") as local:
        return pixels, local.run(pixels)


def answers_correctly(server, expected) -> None:
    """The server is alive and a normal request gets the right probabilities."""
    import tritonclient.http as httpclient

    pixels, probs = expected
    assert server.process.poll() is None and server.is_ready(), server.tail()
    client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    request = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    request.set_data_from_numpy(pixels)
    np.testing.assert_allclose(client.infer("cxr", [request]).as_numpy("probs"), probs, atol=1e-5)
    client.close()


def _huge(shape=(1, 1, 1_000_000, 1_000_000)) -> dict:
    return {"name": "image", "shape": list(shape), "datatype": "UINT8", "data": [0]}


def _real(batch: int = 1, **change) -> dict:
    return {
        **pixel_input(batch, [(i * 5) % 256 for i in range(batch * IMAGE_SIZE * IMAGE_SIZE)], IMAGE_SIZE),
        **change,
    }


def _dup(first: dict, second: dict) -> bytes:
    return (
        b'{"inputs": ' + json.dumps([first]).encode() + b', "inputs": ' + json.dumps([second]).encode() + b"}"
    )


def _binary(sent: int, declared: int = IMAGE_SIZE * IMAGE_SIZE) -> bytes:
    body, length = binary_body(
        {"inputs": [_binary_input("image", [1, 1, IMAGE_SIZE, IMAGE_SIZE], "UINT8", declared)]}, bytes(sent)
    )
    return post(INFER, body, f"Inference-Header-Content-Length: {length}")


CORPUS = {  # what crashed or confused Triton through the old front, and its neighbours
    "duplicate-key-huge-last": (post(INFER, _dup(_real(), _huge())), 400),
    "duplicate-key-huge-first": (post(INFER, _dup(_huge(), _real())), 400),
    "absolute-form-huge": (post(f"http://127.0.0.1:1{INFER}", json_body(_huge())), 404),
    "absolute-form-get": (get("http://127.0.0.1/v2/health/ready"), 404),
    "options-star": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "dot-dot": (post("/v2/models/x/../cxr/infer", json_body(_huge())), 404),
    "encoded-slash": (post("/v2/models/cxr%2Finfer", json_body(_huge())), 404),
    "query-string": (post(INFER + "?a=b", json_body(_huge())), 404),
    "two-content-lengths": (post(INFER, json_body(_real()), "Content-Length: 1"), 400),
    "non-numeric-length": (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: x"), 400),
    "negative-length": (post(INFER, b"{}").replace(b"Content-Length: 2", b"Content-Length: -1"), 400),
    "te-with-cl": (post(INFER, json_body(_huge()), "Transfer-Encoding: chunked"), 400),
    "chunked-oversized": (chunked(INFER, json_body(_real()) + b" " * (2 << 20), 1 << 16), 413),
    "huge-shape": (post(INFER, json_body(_huge())), 400),
    "huge-shape-1e5": (post(INFER, json_body(_huge((1, 1, 100_000, 100_000)))), 400),
    "batch-beyond-max": (post(INFER, json_body(_huge((17, 1, IMAGE_SIZE, IMAGE_SIZE)))), 400),
    "shape-data-mismatch": (post(INFER, json_body(_real(data=[0] * 10))), 400),
    "uint8-99999": (post(INFER, json_body(_real(data=[99999] * IMAGE_SIZE * IMAGE_SIZE))), 400),
    "uint8-float": (post(INFER, json_body(_real(data=[0.5] * IMAGE_SIZE * IMAGE_SIZE))), 400),
    "wrong-datatype": (post(INFER, json_body(_real(datatype="FP32"))), 400),
    "binary-too-few": (_binary(IMAGE_SIZE * IMAGE_SIZE - 1), 400),
    "binary-declares-more": (_binary(10, 1 << 40), 400),
    "header-injection": (post(INFER, json_body(_huge()), "X-A: 1\rContent-Length: 5"), 400),
    "not-json": (post(INFER, b"{not json"), 400),
    "deep-nesting": (post(INFER, b"[" * 200_000), 400),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_odd_requests_through_the_front_leave_triton_alive_and_right(server, expected, name):
    request_bytes, status = CORPUS[name]
    answer = exchange(server.http_port, request_bytes)
    assert answer.status == status, answer
    assert answer.error()
    answers_correctly(server, expected)


def test_a_chunked_request_is_answered_as_a_plain_one(server, expected):
    pixels, probs = expected
    body = json_body(
        {
            "name": "image",
            "shape": list(pixels.shape),
            "datatype": "UINT8",
            "data": pixels.reshape(-1).tolist(),
        }
    )
    answer = exchange(server.http_port, chunked(INFER, body, 4096))
    assert answer.status == 200
    outputs = json.loads(answer.body)["outputs"]
    np.testing.assert_allclose(np.array(outputs[0]["data"]).reshape(probs.shape), probs, atol=1e-5)


def test_one_byte_a_second_is_cut_by_the_head_deadline(server, expected):
    slow = get("/v2/health/ready")
    answer = exchange(server.http_port, *[slow[i : i + 1] for i in range(len(slow))], pause_s=1.0)
    assert answer.status == 408 and 9 < answer.seconds < 14
    answers_correctly(server, expected)


def test_idle_connections_beyond_the_cap_do_not_lock_clients_out(server, expected):
    cap = GuardLimits.for_models(MODELS).max_connections
    idle = []
    try:
        for _ in range(cap + 44):
            idle.append(socket.create_connection(("127.0.0.1", server.http_port), timeout=5))
        time.sleep(0.5)
        answers_correctly(server, expected)
    finally:
        for sock in idle:
            sock.close()


def test_a_flood_of_large_bodies_keeps_the_front_within_its_memory_budget(server, expected):
    from cxr.runtime.serve import served_models
    from cxr.runtime.serve_process import status_kib

    limits = GuardLimits.for_models(served_models("cxr", IMAGE_SIZE, CLASSES, 16))
    pid = server.process.pid
    before = status_kib(pid, "VmRSS")["VmRSS"] << 10
    size = 40 << 20  # each would hold 80 MB while parsed: three fit the 256 MB budget at once
    header, length = binary_body(
        {"inputs": [_binary_input("image", [1, 1, IMAGE_SIZE, IMAGE_SIZE], "UINT8", size)]}
    )
    head = post(INFER, b"", f"Inference-Header-Content-Length: {length}").replace(
        b"Content-Length: 0", f"Content-Length: {length + size}".encode()
    )
    blob = header + bytes(size)
    with ThreadPoolExecutor(12) as pool:
        floods = list(pool.map(lambda _: send_expecting(server.http_port, head, blob), range(12)))
        big_json = post(INFER, b"[" + b"0," * (2 << 20) + b"0]")
        json_flood = list(pool.map(lambda _: exchange(server.http_port, big_json), range(6)))
    peak = status_kib(pid, "VmHWM")["VmHWM"] << 10
    assert {a.status for a in floods} <= {400, 503} and 503 in {a.status for a in floods}
    assert {a.status for a in json_flood} == {413}
    assert peak - before < limits.memory_budget + (96 << 20), (before >> 20, peak >> 20)
    answers_correctly(server, expected)


def test_refusals_reach_the_server_log_without_bodies(server):
    exchange(server.http_port, post(INFER, _dup(_real(id="PATIENT-SECRET-42"), _huge())))
    time.sleep(0.3)
    log = server.log.read_text()
    assert "refused 400 (duplicate JSON key) from 127.0.0.1:" in log
    assert "PATIENT-SECRET-42" not in log

"""One strict reading of every request the guarded front passes to Triton (KServe v2 over HTTP).

The front knows the served models exactly (``ModelSpec``): a request names one of them, gives each input
with the right datatype and a shape of batch 1..max_batch, and carries exactly as many values as its shape
declares, each valid for its datatype. What passes is rebuilt from the parsed values (known fields only, the
tensors in Triton's binary form) and only that is sent on, so no second parser ever reads the client's
bytes: duplicate JSON keys, odd numbers or absolute-form targets cannot mean one thing here and another
in Triton. Nothing here touches a socket: the front (``cxr.runtime.serve_guard``) reads, this judges.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

ITEM_BYTES = {"UINT8": 1, "BOOL": 1, "FP32": 4}  # fixed-size datatypes; BYTES elements carry their length
JSON_BYTES_PER_VALUE = 5  # "255, " as json.dumps (and tritonclient) writes a uint8 list
MAX_ID = 256
MAX_NAME_SHOWN = 40
REQUEST_KEYS = {"id", "parameters", "inputs", "outputs"}
INPUT_KEYS = {"name", "shape", "datatype", "data", "parameters"}
OUTPUT_KEYS = {"name", "parameters"}
INT_LIMIT = 1 << 31


class Refused(Exception):
    """A request the front answers itself: the HTTP status, a short kind (counted in the log) and one line.

    The message never quotes the body: only names and numbers the front has checked, shortened."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status, self.kind, self.message = status, kind, message


def bad(kind: str, message: str) -> Refused:
    return Refused(400, kind, message)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a served model: KServe v2 datatype and the shape of one batch item."""

    name: str
    datatype: str  # UINT8, BOOL, BYTES, FP32
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A bound model as the front knows it: what Triton was told in ``cxr.runtime.serve._bind_models``."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    def largest_input_elements(self) -> int:
        return self.max_batch * max(math.prod(spec.dims) for spec in self.inputs)


@dataclass(frozen=True)
class Route:
    """What an exact request target may do: GET passes through, POST infers on ``model``."""

    method: str
    model: ModelSpec | None = None


def routes(models: tuple[ModelSpec, ...]) -> dict[str, Route]:
    """The exact targets the front serves: health, server metadata, and per model its metadata, ready,
    config, statistics and infer. Anything else (other paths, queries, encodings, absolute form) is 404."""
    table = {path: Route("GET") for path in ("/v2", "/v2/health/live", "/v2/health/ready")}
    for model in models:
        base = f"/v2/models/{model.name}"
        table.update({f"{base}{tail}": Route("GET") for tail in ("", "/ready", "/config", "/stats")})
        table[f"{base}/infer"] = Route("POST", model)
    return table


@dataclass(frozen=True)
class Tensor:
    """An input as it will reach Triton: checked shape and its values in Triton's binary layout."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    payload: bytes | memoryview


@dataclass(frozen=True, kw_only=True)
class InferRequest:
    """A checked inference request, rebuilt from the parsed values only."""

    model: ModelSpec
    request_id: str | None
    parameters: dict[str, bool | int]
    inputs: tuple[Tensor, ...]
    outputs: tuple[tuple[str, bool | None], ...] | None  # (name, binary_data) as asked, None: all

    def to_triton(self) -> tuple[bytes, list[bytes | memoryview]]:
        """The JSON header (``Inference-Header-Content-Length`` bytes) and the binary tensors after it."""
        header: dict[str, Any] = {}
        if self.request_id is not None:
            header["id"] = self.request_id
        if self.parameters:
            header["parameters"] = self.parameters
        header["inputs"] = [
            {
                "name": t.name,
                "shape": list(t.shape),
                "datatype": t.datatype,
                "parameters": {"binary_data_size": len(t.payload)},
            }
            for t in self.inputs
        ]
        if self.outputs is not None:
            header["outputs"] = [
                {"name": name, **({"parameters": {"binary_data": binary}} if binary is not None else {})}
                for name, binary in self.outputs
            ]
        return json.dumps(header, separators=(",", ":")).encode(), [t.payload for t in self.inputs]


def shown(value: Any) -> str:
    """A client-given name as it may appear in a message or a log line: repr, shortened."""
    return repr(str(value)[:MAX_NAME_SHOWN])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise bad("duplicate JSON key", f"the request repeats the JSON key {shown(key)}")
        seen[key] = value
    return seen


def _no_constant(name: str) -> None:
    raise bad("not JSON", f"{name} is not JSON")


def parse_json(data: bytes | bytearray | memoryview) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity; anything else is a 400 naming the cause."""
    try:
        text = str(data, "utf-8")  # straight from the buffer: no copy of a large body
    except UnicodeDecodeError:
        raise bad("not JSON", "the request is not UTF-8 JSON") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # a Refused from the hooks passes through as it is
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise bad("not JSON", f"the request is not valid JSON ({message})") from None


def _only_keys(value: Any, allowed: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise bad("bad request", f"{what} must be a JSON object")
    extra = sorted(set(value) - allowed)
    if extra:
        raise bad("unknown field", f"{what} has a field the front does not pass on: {shown(extra[0])}")
    return value


def _is_int(value: Any) -> bool:
    return type(value) is int


def _parameters(value: Any) -> dict[str, bool | int]:
    params = _only_keys(value, {"binary_data_output", "priority", "timeout"}, "the request's parameters")
    for key, item in params.items():
        ok = type(item) is bool if key == "binary_data_output" else _is_int(item) and 0 <= item < INT_LIMIT
        if not ok:
            raise bad("bad parameter", f"request parameter {key!r} has a value of the wrong type or range")
    return dict(params)


def read_infer(body: bytes | bytearray, header_length: int | None, model: ModelSpec) -> InferRequest:
    """The checked request for ``model`` from an HTTP body (``header_length``: the binary extension's
    ``Inference-Header-Content-Length``; None: the body is all JSON). Raises ``Refused``."""
    if header_length is not None and not 0 < header_length <= len(body):
        raise bad("binary size", "Inference-Header-Content-Length does not fit the body")
    split = len(body) if header_length is None else header_length
    view = memoryview(body)
    request = _only_keys(parse_json(view[:split]), REQUEST_KEYS, "the request")
    request_id = request.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > MAX_ID):
        raise bad("bad request", f"the request id must be a string of at most {MAX_ID} characters")
    parameters = _parameters(request.get("parameters", {}))
    inputs = _inputs(request.get("inputs"), model, view[split:])
    outputs = _outputs(request.get("outputs"), model)
    return InferRequest(
        model=model, request_id=request_id, parameters=parameters, inputs=inputs, outputs=outputs
    )


def _inputs(items: Any, model: ModelSpec, binary: memoryview) -> tuple[Tensor, ...]:
    if not isinstance(items, list) or not items:
        raise bad("bad request", "the request has no inputs")
    tensors, offset = [], 0
    for index, item in enumerate(items):
        tensor, used = _input(item, model, binary[offset:])
        if any(t.name == tensor.name for t in tensors):
            raise bad("bad request", f"input {shown(tensor.name)} is given twice")
        tensors.append(tensor)
        offset += used
        items[index] = None  # the parsed list may be large: let it go once converted
    if offset != len(binary):
        raise bad(
            "binary size", f"the binary inputs declare {offset:,} bytes, the body carries {len(binary):,}"
        )
    missing = [spec.name for spec in model.inputs if not spec.optional and spec.name not in _names(tensors)]
    if missing:
        raise bad("bad request", f"model {shown(model.name)} needs input {shown(missing[0])}")
    if len({t.shape[0] for t in tensors}) > 1:
        raise bad("bad shape", "the inputs of one request must have the same batch size")
    return tuple(tensors)


def _names(tensors: list[Tensor]) -> set[str]:
    return {t.name for t in tensors}


def _input(item: Any, model: ModelSpec, binary: memoryview) -> tuple[Tensor, int]:
    """One input and how many bytes of the binary section it took."""
    item = _only_keys(item, INPUT_KEYS, "an input")
    name = item.get("name")
    spec = model.input(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(s.name for s in model.inputs)
        raise bad("unknown input", f"model {shown(model.name)} has no input {shown(name)} (it takes {known})")
    if item.get("datatype") != spec.datatype:
        raise bad(
            "bad datatype",
            f"input {shown(name)} has datatype {shown(item.get('datatype'))}; the model expects "
            f"{spec.datatype!r}",
        )
    shape = _shape(item.get("shape"), spec, model)
    count = math.prod(shape)
    parameters = _only_keys(
        item.get("parameters", {}), {"binary_data_size"}, f"input {shown(name)}'s parameters"
    )
    if ("data" in item) == ("binary_data_size" in parameters):
        raise bad("bad request", f"input {shown(name)} needs either 'data' or a 'binary_data_size' parameter")
    if "data" in item:
        return Tensor(name, spec.datatype, shape, json_values(item.pop("data"), spec, count)), 0
    size = parameters["binary_data_size"]
    if not _is_int(size) or not 0 <= size <= len(binary):
        raise bad("binary size", f"input {shown(name)}'s binary_data_size does not fit the body")
    payload = binary[:size]
    check_binary(payload, spec, count)
    return Tensor(name, spec.datatype, shape, payload), size


def _shape(value: Any, spec: TensorSpec, model: ModelSpec) -> tuple[int, ...]:
    expected = f"[N, {', '.join(map(str, spec.dims))}] with N 1..{model.max_batch}"
    if (
        not isinstance(value, list)
        or len(value) != len(spec.dims) + 1
        or not all(_is_int(d) for d in value)
        or not 1 <= value[0] <= model.max_batch
        or tuple(value[1:]) != spec.dims
    ):
        text = str(value[:6]) if isinstance(value, list) else shown(value)
        raise bad(
            "bad shape", f"unexpected shape {text[:80]} for input {shown(spec.name)}; expected {expected}"
        )
    return tuple(value)


def json_values(data: Any, spec: TensorSpec, count: int) -> bytes:
    """A flat JSON list of ``count`` values, each valid for ``spec``'s datatype, in Triton's binary layout."""
    if not isinstance(data, list) or len(data) != count:
        size = f"{len(data):,} values" if isinstance(data, list) else "not a flat list"
        raise bad(
            "bad data", f"input {shown(spec.name)}: its shape holds {count:,} values, 'data' has {size}"
        )
    kinds = set(map(type, data))
    if spec.datatype == "UINT8":
        if kinds != {int} or min(data) < 0 or max(data) > 255:
            raise bad("bad value", f"input {shown(spec.name)}: UINT8 values must be whole numbers 0..255")
        return np.array(data, dtype=np.uint8).tobytes()
    if spec.datatype == "BOOL":
        if kinds != {bool}:
            raise bad("bad value", f"input {shown(spec.name)}: BOOL values must be true or false")
        return np.array(data, dtype=np.bool_).tobytes()
    if spec.datatype == "BYTES":
        if kinds != {str}:
            raise bad("bad value", f"input {shown(spec.name)}: BYTES values must be JSON strings")
        try:
            return serialize_bytes([value.encode("utf-8") for value in data])
        except UnicodeEncodeError:
            raise bad("bad value", f"input {shown(spec.name)}: a string is not valid Unicode") from None
    raise bad("bad datatype", f"input {shown(spec.name)}: {spec.datatype} is not taken as JSON here")


def serialize_bytes(values: list[bytes]) -> bytes:
    """Triton's BYTES layout: each element as a 4-byte little-endian length and its bytes."""
    return b"".join(struct.pack("<I", len(value)) + value for value in values)


def check_binary(payload: memoryview, spec: TensorSpec, count: int) -> None:
    """Binary values must be exactly ``count`` elements of ``spec``'s datatype, no byte more or less."""
    if spec.datatype == "BYTES":
        elements = bytes_elements(payload)
        if elements != count:
            raise bad(
                "binary size", f"input {shown(spec.name)}: {count:,} BYTES elements declared, {elements} sent"
            )
        return
    size = ITEM_BYTES[spec.datatype] * count
    if len(payload) != size:
        raise bad(
            "binary size", f"input {shown(spec.name)}: its shape needs {size:,} bytes, {len(payload):,} sent"
        )
    if spec.datatype == "BOOL" and np.frombuffer(payload, dtype=np.uint8).max(initial=0) > 1:
        raise bad("bad value", f"input {shown(spec.name)}: BOOL bytes must be 0 or 1")


def bytes_elements(payload: memoryview) -> int:
    """How many length-prefixed elements ``payload`` holds; a 400 when they do not fill it exactly."""
    offset, count = 0, 0
    while offset < len(payload):
        if offset + 4 > len(payload):
            raise bad("binary size", "a BYTES element's length is cut off")
        (length,) = struct.unpack_from("<I", payload, offset)
        offset += 4 + length
        count += 1
    if offset != len(payload):
        raise bad("binary size", "a BYTES element runs past its input's binary_data_size")
    return count


def _outputs(items: Any, model: ModelSpec) -> tuple[tuple[str, bool | None], ...] | None:
    if items is None:
        return None
    if not isinstance(items, list) or not items:
        raise bad("bad request", "'outputs' must be a non-empty list")
    known = {spec.name for spec in model.outputs}
    chosen: list[tuple[str, bool | None]] = []
    for item in items:
        item = _only_keys(item, OUTPUT_KEYS, "an output")
        name = item.get("name")
        if name not in known or any(name == c[0] for c in chosen):
            raise bad("unknown output", f"model {shown(model.name)}: no output {shown(name)}, or asked twice")
        params = _only_keys(item.get("parameters", {}), {"binary_data"}, f"output {shown(name)}'s parameters")
        binary = params.get("binary_data")
        if binary is not None and type(binary) is not bool:
            raise bad("bad parameter", f"output {shown(name)}: binary_data must be true or false")
        chosen.append((name, binary))
    return tuple(chosen)


def max_body_bytes(models: tuple[ModelSpec, ...], floor: int = 64 << 20) -> int:
    """The largest body a legitimate request needs: every model's biggest batch in JSON, or ``floor`` (the
    encoded model's images have no size of their own)."""
    return max(floor, *(8 * m.largest_input_elements() for m in models))


def max_json_bytes(models: tuple[ModelSpec, ...], floor: int = 1 << 20) -> int:
    """The largest JSON part a legitimate request needs: the biggest pixel batch written as a JSON list."""
    return max(floor, *(JSON_BYTES_PER_VALUE * m.largest_input_elements() + (64 << 10) for m in models))

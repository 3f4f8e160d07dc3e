"""Check that every float weight of an ONNX graph is finite, from its bytes, without the onnx package.

A NaN or Inf weight (a corrupted copy, a careless edit, a diverged training run) can still give finite,
plausible probabilities on some backends (OpenVINO answered near-uniform ones with a label where ONNX Runtime
refused), so such a graph is refused before any backend sees it: at export and at every load.

The walk (protobuf field numbers of onnx.proto): ModelProto.graph = 7 and ModelProto.functions = 25;
GraphProto.node = 1, .initializer = 5, .sparse_initializer = 15 (SparseTensorProto.values = 1);
FunctionProto.node = 7; NodeProto.attribute = 5; AttributeProto.t = 5, .g = 6, .tensors = 10, .graphs = 11,
.sparse_tensor = 22, .sparse_tensors = 23 (Constant nodes' values, subgraphs of If/Loop/Scan). A TensorProto
keeps its values in raw_data = 9 (little-endian), float_data = 4, double_data = 10 or, for FLOAT16/BFLOAT16,
int32_data = 5 (one varint per value's 16 bits); data_type = 2. Values are viewed with ``np.frombuffer`` on
memoryview slices: a 150 MB graph is not copied, and is checked in ~30 ms (dpn92_se fp32, 2-core Xeon).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cxr.runtime.errors import BundleRefused
from cxr.runtime.onnx_meta import proto_fields

FLOAT, FLOAT16, DOUBLE, BFLOAT16 = 1, 10, 11, 16
# How raw_data of each float type is read: a float view, or the exponent bits of a 16-bit pattern (all ones:
# Inf or NaN). numpy has no bfloat16, so both 16-bit types are checked by their bits.
FLOAT_VIEWS = {FLOAT: np.dtype("<f4"), DOUBLE: np.dtype("<f8")}
EXPONENT_MASKS = {FLOAT16: 0x7C00, BFLOAT16: 0x7F80}
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
FUNCTION_NODE, NODE_ATTRIBUTE = 7, 5
ATTR_TENSOR, ATTR_GRAPH, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE, ATTR_SPARSES = 5, 6, 10, 11, 22, 23
TENSOR_TYPE, TENSOR_FLOATS, TENSOR_INT32S, TENSOR_NAME, TENSOR_RAW, TENSOR_DOUBLES = 2, 4, 5, 8, 9, 10
MAX_DEPTH = 16  # subgraphs nested deeper than this are not a model this project writes


@dataclass(frozen=True)
class WeightScan:
    """What the scan found: float values checked, non-finite values and the tensors holding them."""

    values: int = 0
    bad_values: int = 0
    bad_tensors: tuple[str, ...] = ()


def scan_weights(model: bytes | memoryview) -> WeightScan:
    """Count the float weights of a serialized ModelProto (initializers, Constant nodes, subgraphs) and the
    non-finite ones among them."""
    tally = _Tally()
    try:
        for number, wire, value in proto_fields(memoryview(model)):
            if wire == 2 and number == MODEL_GRAPH:
                _graph(value, tally, 0)
            elif wire == 2 and number == MODEL_FUNCTIONS:
                _nodes(value, FUNCTION_NODE, tally, 0)
    except (ValueError, IndexError) as exc:
        raise BundleRefused(f"not a readable ONNX graph ({exc})") from None
    return WeightScan(tally.values, tally.bad_values, tuple(tally.bad_tensors))


def check_weights(model: bytes | memoryview, path: Path | str) -> WeightScan:
    """Refuse, in one line naming the file, a graph with any non-finite float weight."""
    try:
        scan = scan_weights(model)
    except BundleRefused as exc:
        raise BundleRefused(f"{path}: {exc}") from None
    if scan.bad_values:
        shown = ", ".join(repr(name[:60]) for name in scan.bad_tensors[:3])
        more = f" and {len(scan.bad_tensors) - 3} more" if len(scan.bad_tensors) > 3 else ""
        raise BundleRefused(
            f"{path}: {scan.bad_values:,} of its {scan.values:,} float weights are NaN or Inf (in {shown}"
            f"{more}): a corrupted or edited graph; refused (re-export the bundle)"
        )
    return scan


_checked: set[str] = set()


def check_weights_once(model: bytes, path: Path | str, digest: str) -> None:
    """``check_weights`` once per process for each content (``digest``: the sha256 the bytes just matched)."""
    if digest in _checked:
        return
    check_weights(model, path)
    _checked.add(digest)


class _Tally:
    def __init__(self) -> None:
        self.values = 0
        self.bad_values = 0
        self.bad_tensors: list[str] = []

    def add(self, name: str, values: int, bad: int) -> None:
        self.values += values
        if bad:
            self.bad_values += bad
            self.bad_tensors.append(name or "(unnamed)")


def _graph(graph: memoryview, tally: _Tally, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"subgraphs nested more than {MAX_DEPTH} deep")
    for number, wire, value in proto_fields(graph):
        if wire != 2:
            continue
        if number == GRAPH_INITIALIZER:
            _tensor(value, tally)
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(value, tally)
        elif number == GRAPH_NODE:
            _node(value, tally, depth)


def _nodes(message: memoryview, field: int, tally: _Tally, depth: int) -> None:
    for number, wire, value in proto_fields(message):
        if number == field and wire == 2:
            _node(value, tally, depth)


def _node(node: memoryview, tally: _Tally, depth: int) -> None:
    for number, wire, value in proto_fields(node):
        if number == NODE_ATTRIBUTE and wire == 2:
            _attribute(value, tally, depth)


def _attribute(attribute: memoryview, tally: _Tally, depth: int) -> None:
    for number, wire, value in proto_fields(attribute):
        if wire != 2:
            continue
        if number in (ATTR_TENSOR, ATTR_TENSORS):
            _tensor(value, tally)
        elif number in (ATTR_SPARSE, ATTR_SPARSES):
            _sparse(value, tally)
        elif number in (ATTR_GRAPH, ATTR_GRAPHS):
            _graph(value, tally, depth + 1)


def _sparse(sparse: memoryview, tally: _Tally) -> None:
    for number, wire, value in proto_fields(sparse):
        if number == 1 and wire == 2:
            _tensor(value, tally)


def _tensor(tensor: memoryview, tally: _Tally) -> None:
    """Count one TensorProto's float values and its non-finite ones (other types are skipped)."""
    dtype, name, parts = 0, "", []
    for number, wire, value in proto_fields(tensor):
        if number == TENSOR_TYPE and wire == 0:
            dtype = value
        elif number == TENSOR_NAME and wire == 2:
            name = bytes(value[:200]).decode(errors="replace")
        elif number in (TENSOR_RAW, TENSOR_FLOATS, TENSOR_INT32S, TENSOR_DOUBLES):
            parts.append((number, wire, value))
    if dtype not in FLOAT_VIEWS and dtype not in EXPONENT_MASKS:
        return
    values = bad = 0
    for number, wire, value in parts:
        count, nonfinite = _count(dtype, number, wire, value)
        values, bad = values + count, bad + nonfinite
    tally.add(name, values, bad)


# Which data field holds which float type, and its wire types (packed, or one value per field)
FIELD_TYPES = {
    TENSOR_FLOATS: ({FLOAT}, (2, 5)),
    TENSOR_DOUBLES: ({DOUBLE}, (2, 1)),
    TENSOR_INT32S: (set(EXPONENT_MASKS), (2, 0)),
    TENSOR_RAW: ({FLOAT, DOUBLE, *EXPONENT_MASKS}, (2,)),
}


def _count(dtype: int, number: int, wire: int, value: memoryview | int) -> tuple[int, int]:
    """(values, non-finite values) of one data field of a float tensor (none for a field its type lacks)."""
    types, wires = FIELD_TYPES[number]
    if dtype not in types or wire not in wires:
        return 0, 0
    if number == TENSOR_INT32S:  # FLOAT16 / BFLOAT16 bit patterns, one varint each
        bits = _varints(value) if wire == 2 else np.array([value], dtype=np.uint64)
        return _bits_bad(bits, EXPONENT_MASKS[dtype])
    if dtype in EXPONENT_MASKS:  # raw 16-bit patterns
        return _bits_bad(np.frombuffer(value, dtype="<u2", count=len(value) // 2), EXPONENT_MASKS[dtype])
    view = FLOAT_VIEWS[dtype]
    array = np.frombuffer(value, dtype=view, count=len(value) // view.itemsize)
    return array.size, int(array.size - np.count_nonzero(np.isfinite(array)))


def _bits_bad(bits: np.ndarray, mask: int) -> tuple[int, int]:
    return bits.size, int(np.count_nonzero((bits & mask) == mask))


def _varints(data: memoryview) -> np.ndarray:
    """Packed protobuf varints, decoded at once with numpy (no Python loop over values)."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if raw[-1] & 0x80:
        raise ValueError("truncated packed varints")
    last = raw < 0x80
    group = np.concatenate(([0], np.cumsum(last[:-1])))
    starts = np.flatnonzero(np.concatenate(([True], last[:-1])))
    place = np.arange(raw.size) - starts[group]
    if place.max() > 9:
        raise ValueError("malformed packed varints")
    parts = (raw & 0x7F).astype(np.uint64) << (7 * place).astype(np.uint64)
    values = np.zeros(int(group[-1]) + 1, dtype=np.uint64)
    np.add.at(values, group, parts)
    return values

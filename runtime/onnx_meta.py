"""Read an ONNX graph's ``metadata_props`` from its bytes, without the onnx package (the runtime stays small).

ModelProto is a protobuf message: a sequence of (field number, wire type, value). ``metadata_props`` is field
14, each entry a StringStringEntryProto (key = 1, value = 2). Every other field, the graph included, is
skipped by its length, so reading a 150 MB graph's metadata costs microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

METADATA_FIELD = 14


Buffer = bytes | memoryview  # a memoryview keeps slices of a large graph free of copies


def _varint(data: Buffer, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def proto_fields(data: Buffer) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message level: an int for varints, else a slice of ``data``
    (bytes for bytes, a memoryview for a memoryview)."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf message")
        yield number, wire, value


def onnx_metadata(model: bytes) -> dict[str, str]:
    """``metadata_props`` of a serialized ONNX ModelProto as a dict (empty when it has none)."""
    found: dict[str, str] = {}
    for number, wire, value in proto_fields(model):
        if number == METADATA_FIELD and wire == 2:
            entry = {n: v for n, w, v in proto_fields(value) if w == 2}
            found[entry.get(1, b"").decode(errors="replace")] = entry.get(2, b"").decode(errors="replace")
    return found

"""Just enough of the protobuf wire format to read and amend an ONNX ModelProto's top level.

The runtime depends on numpy + onnxruntime only (no ``onnx`` package), yet must verify a
file's integrity and read its metadata from the very bytes it verified. ModelProto keeps the
graph in field 7 and metadata_props in field 14 (StringStringEntryProto: 1 = key,
2 = value); GraphProto keeps its initializers in field 5 and its doc_string in field 10;
TensorProto its data_type in 2, float_data in 4, name in 8 and raw_data in 9.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

GRAPH_FIELD = 7
METADATA_FIELD = 14
GRAPH_INITIALIZER = 5
GRAPH_DOC_STRING = 10
TENSOR_FLOAT = 1          # TensorProto.DataType FLOAT


def _varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


@dataclass(frozen=True)
class Record:
    """One top-level field occurrence: its number, wire type and byte spans in the message."""

    field: int
    wire: int
    start: int          # first byte of the tag
    value_start: int    # first byte of the payload (after the length for wire type 2)
    end: int            # one past the last byte


def records(data: bytes | memoryview) -> list[Record]:
    """Every top-level field of a serialized message, in order.

    Raises ValueError when the bytes are not a well-formed message.
    """
    buf = memoryview(data)
    out, pos = [], 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        value_start = pos
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value_start = pos
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated length-delimited field" if wire == 2 else "truncated message")
        out.append(Record(number, wire, start, value_start, pos))
    return out


def top_level_field(data: bytes, field: int) -> memoryview:
    """Raw bytes of the last length-delimited occurrence of ``field`` in a serialized message.

    Raises ValueError when the bytes are not a well-formed message or the field is absent.
    """
    buf = memoryview(data)
    found = [r for r in records(buf) if r.field == field and r.wire == 2]
    if not found:
        raise ValueError(f"field {field} not found")
    return buf[found[-1].value_start:found[-1].end]


def string_entry(payload: bytes | memoryview) -> tuple[str, str]:
    """Decode one StringStringEntryProto (metadata_props entry) into (key, value)."""
    buf = memoryview(payload)
    key = value = ""
    for r in records(buf):
        if r.wire == 2 and r.field in (1, 2):
            text = bytes(buf[r.value_start:r.end]).decode("utf-8")
            key, value = (text, value) if r.field == 1 else (key, text)
    return key, value


def encode_string_entry(key: str, value: str) -> bytes:
    """A whole metadata_props record (tag, length, entry) ready to append to a ModelProto."""
    k, v = key.encode("utf-8"), value.encode("utf-8")
    entry = b"\x0a" + encode_varint(len(k)) + k + b"\x12" + encode_varint(len(v)) + v
    return encode_varint(METADATA_FIELD << 3 | 2) + encode_varint(len(entry)) + entry


@dataclass(frozen=True)
class GraphFacts:
    """What the runtime reads from inside the graph: its doc_string and the scalar float
    initializers (name -> value), e.g. the ``threshold`` default."""

    doc_string: str
    scalars: dict[str, float]


def graph_facts(graph: bytes | memoryview) -> GraphFacts:
    """Read the doc_string and the one-element float initializers of a serialized GraphProto."""
    buf = memoryview(graph)
    doc, scalars = "", {}
    for r in records(buf):
        if r.wire != 2:
            continue
        if r.field == GRAPH_DOC_STRING:
            doc = bytes(buf[r.value_start:r.end]).decode("utf-8", errors="replace")
        elif r.field == GRAPH_INITIALIZER:
            name, value = _scalar_tensor(buf[r.value_start:r.end])
            if name is not None:
                scalars[name] = value
    return GraphFacts(doc, scalars)


def _packed_varints(v: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(v):
        n, pos = _varint(v, pos)
        out.append(n)
    return out


def _scalar_tensor(t: memoryview) -> tuple[str | None, float]:
    name, dtype, values, dims = None, None, [], []
    for r in records(t):
        v = t[r.value_start:r.end]
        if r.field == 1:                       # dims: one varint, or packed
            dims += [_varint(t, r.value_start)[0]] if r.wire == 0 else _packed_varints(v)
        elif r.field == 2 and r.wire == 0:
            dtype = _varint(t, r.value_start)[0]
        elif r.field == 4 and r.wire in (2, 5):  # float_data: packed, or one fixed32
            raw = bytes(v) if r.wire == 2 else bytes(t[r.value_start:r.value_start + 4])
            values += list(struct.unpack(f"<{len(raw) // 4}f", raw[:len(raw) // 4 * 4]))
        elif r.field == 8 and r.wire == 2:
            name = bytes(v).decode("utf-8", errors="replace")
        elif r.field == 9 and r.wire == 2:     # raw_data, little-endian
            raw = bytes(v)
            values += list(struct.unpack(f"<{len(raw) // 4}f", raw[:len(raw) // 4 * 4]))
    if dtype != TENSOR_FLOAT or len(values) != 1 or any(d != 1 for d in dims):
        return None, 0.0
    return name, values[0]

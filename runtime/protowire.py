"""Just enough of the protobuf wire format to find top-level fields of an ONNX ModelProto.

The runtime depends on numpy + onnxruntime only (no ``onnx`` package), yet must verify the
graph's sha256 at load time. ModelProto keeps the graph in field 7 and metadata_props in
field 14, so hashing the raw bytes of field 7 covers every node and constant while leaving
metadata (which holds the hash) out.
"""

from __future__ import annotations

GRAPH_FIELD = 7


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


def top_level_field(data: bytes, field: int) -> memoryview:
    """Raw bytes of the last length-delimited occurrence of ``field`` in a serialized message.

    Raises ValueError when the bytes are not a well-formed message or the field is absent.
    """
    buf = memoryview(data)
    pos, found = 0, None
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated length-delimited field")
            if number == field:
                found = buf[pos:pos + length]
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
    if found is None:
        raise ValueError(f"field {field} not found")
    return found

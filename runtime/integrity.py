"""Integrity of a detector file: what is covered, how it is sealed, how it is checked.

The one owner of this contract (FORMAT.md, "Integrity", is its prose). A format-2 file
carries two digests in its metadata:

- ``ufad.graph_sha256`` = sha256 of the serialized GraphProto (ModelProto field 7): every
  node and constant, the model's weights, the fitted statistics, the default threshold.
- ``ufad.content_sha256`` = sha256 of ``b"ufad-content-v2\\n"``, then the raw bytes of every
  other top-level ModelProto field except metadata_props (field 14), in file order (ir_version,
  opset_import, producer, ...), then every metadata entry but ``ufad.content_sha256`` and
  ``ufad.signature``, sorted by key, each as two netstrings ``len(key):key,len(value):value,``
  (lengths in UTF-8 bytes, decimal). The graph enters through ``ufad.graph_sha256``.

So editing any metadata value (the threshold, the classes, the input spec), adding or
removing an entry, touching the graph, or changing the opset makes the file fail. Metadata
is read from the same bytes that were hashed (never from a second parser), and a key that
appears twice, or a second graph, is refused: protobuf readers would merge or pick one.

A digest stops accidents and naive edits, not someone who recomputes it; a signature
(``signing.py``, ``ufad sign``) covers ``ufad.content_sha256`` with a key for that.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass

import numpy as np

from . import format as fmt
from . import protowire as pw
from .errors import FormatWarning, ModelFileError

CONTENT_DOMAIN = b"ufad-content-v2\n"
#: metadata entries outside the content digest: the digest itself and the signature over it
UNCOVERED = (fmt.KEY_CONTENT_SHA256, fmt.KEY_SIGNATURE)
#: the graph's doc_string names its format version, so a file cannot be passed off as an
#: older, less protected version by editing its metadata alone
GRAPH_MARKER = "ufad.format_version="


@dataclass(frozen=True)
class ModelParts:
    """A detector file's bytes split into what the runtime checks and reads."""

    data: bytes
    graph: memoryview
    metadata: dict[str, str]
    graph_sha256: str      # recomputed from the bytes
    content_sha256: str    # recomputed from the bytes


def _corrupt(path: str, why: object) -> ModelFileError:
    return ModelFileError(
        f"{path}: the file is not a well-formed ONNX model ({why}); it may be truncated or "
        "corrupt. Re-export it or copy it again."
    )


def _netstring(text: str) -> bytes:
    b = text.encode("utf-8")
    return str(len(b)).encode("ascii") + b":" + b + b","


def _content_sha256(data: bytes, recs: list[pw.Record], metadata: dict[str, str]) -> str:
    h = hashlib.sha256(CONTENT_DOMAIN)
    view = memoryview(data)
    for r in recs:
        if r.field not in (pw.GRAPH_FIELD, pw.METADATA_FIELD):
            h.update(view[r.start:r.end])
    for key in sorted((k for k in metadata if k not in UNCOVERED), key=lambda k: k.encode("utf-8")):
        h.update(_netstring(key) + _netstring(metadata[key]))
    return h.hexdigest()


def read_parts(data: bytes, path: str = "<model>") -> ModelParts:
    """Split a serialized ModelProto; refuse malformed bytes, two graphs, or a metadata key
    that appears twice."""
    try:
        recs = pw.records(data)
        graphs = [r for r in recs if r.field == pw.GRAPH_FIELD and r.wire == 2]
        metadata: dict[str, str] = {}
        for r in recs:
            if r.field == pw.METADATA_FIELD and r.wire == 2:
                key, value = pw.string_entry(memoryview(data)[r.value_start:r.end])
                if key in metadata:
                    raise ModelFileError(
                        f"{path}: metadata key {key!r} appears twice; readers would disagree on "
                        "its value, so the file was edited. Do not trust it; re-export it."
                    )
                metadata[key] = value
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, e) from None
    if len(graphs) != 1:
        raise _corrupt(path, "no graph" if not graphs else f"{len(graphs)} graphs")
    graph = memoryview(data)[graphs[0].value_start:graphs[0].end]
    return ModelParts(data=data, graph=graph, metadata=metadata,
                      graph_sha256=hashlib.sha256(graph).hexdigest(),
                      content_sha256=_content_sha256(data, recs, metadata))


def _facts(parts: ModelParts, path: str) -> pw.GraphFacts:
    try:
        return pw.graph_facts(parts.graph)
    except (ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"graph: {e}") from None


def check(parts: ModelParts, path: str) -> pw.GraphFacts:
    """Refuse a file whose graph or covered metadata changed after export; warn once for a
    format-1 file (its metadata is not covered). Runs before the metadata is parsed, so an
    edit is reported as an edit, not as whatever inconsistency it caused. Returns what was
    read from inside the graph, for ``check_threshold``."""
    version = fmt.parse_header(parts.metadata, path)
    recorded_graph = parts.metadata[fmt.KEY_GRAPH_SHA256]
    if parts.graph_sha256 != recorded_graph:
        raise ModelFileError(
            f"{path}: the graph's sha256 ({parts.graph_sha256[:16]}...) does not match the one "
            f"recorded in its metadata ({recorded_graph[:16]}...): the weights or "
            "statistics were modified after export. Do not trust this file; re-export it."
        )
    facts = _facts(parts, path)
    written = _marker_version(facts.doc_string)
    if written > version:
        raise ModelFileError(
            f"{path}: its metadata says ufad format version {version} but the graph "
            f"was written as version {written}: the metadata was edited to skip the newer "
            "integrity check. Do not trust this file; re-export it."
        )
    if version >= 2:
        recorded = parts.metadata.get(fmt.KEY_CONTENT_SHA256, "")
        if parts.content_sha256 != recorded:
            raise ModelFileError(
                f"{path}: the file's content sha256 ({parts.content_sha256[:16]}...) does not "
                f"match the one recorded in its metadata ({recorded[:16]}...): its metadata "
                "(threshold, classes, input spec, ...) or model header was edited after export. "
                "Do not trust this file; re-export it."
            )
    else:
        warnings.warn(
            f"{path} uses ufad format version 1: its metadata (threshold, classes, input spec) "
            "is not covered by the integrity check, only its graph. Re-export it with this ufad "
            "to protect the metadata too.", FormatWarning, stacklevel=4)
    return facts


def check_threshold(facts: pw.GraphFacts, info: fmt.FormatInfo, path: str) -> None:
    """The graph's default threshold (what a client that feeds none gets) must be the
    metadata's (what clients read and report); ``facts`` come from ``check``."""
    default = facts.scalars.get(fmt.INPUT_THRESHOLD)
    if default is not None and default != graph_threshold(info.threshold):
        raise ModelFileError(
            f"{path}: the graph's default threshold ({default:.6g}) differs from the metadata's "
            f"{fmt.KEY_THRESHOLD} ({info.threshold:.6g}); the file was edited. Do not trust it; "
            "re-export it."
        )


def _marker_version(doc: str) -> int:
    for part in doc.split():
        if part.startswith(GRAPH_MARKER):
            try:
                return int(part[len(GRAPH_MARKER):])
            except ValueError:
                return 0
    return 0


def graph_threshold(threshold: float) -> float:
    """The float32 value the graph's ``threshold`` initializer holds for ``threshold``
    (+inf is stored as the largest float32)."""
    if math.isinf(threshold) and threshold > 0:
        return float(np.finfo(np.float32).max)
    with np.errstate(over="ignore"):
        return float(np.float32(threshold))


def with_metadata(data: bytes, key: str, value: str | None) -> bytes:
    """The file's bytes with metadata ``key`` set to ``value`` (appended as the last entry)
    or removed (``None``); every other byte stays as it is."""
    view = memoryview(data)
    out = bytearray()
    for r in pw.records(data):
        if r.field == pw.METADATA_FIELD and r.wire == 2 and \
                pw.string_entry(view[r.value_start:r.end])[0] == key:
            continue
        out += view[r.start:r.end]
    if value is not None:
        out += pw.encode_string_entry(key, value)
    return bytes(out)


def seal(data: bytes) -> bytes:
    """Record the file's content digest in ``ufad.content_sha256`` (the exporter's last step)."""
    parts = read_parts(data)
    return with_metadata(data, fmt.KEY_CONTENT_SHA256, parts.content_sha256)

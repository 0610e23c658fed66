"""The ufad file format contract: metadata keys, output names and their parsing.

FORMAT.md is the prose version of this module; keep both in step. Every metadata value is
a string (JSON where structured) so any onnxruntime binding can read it. What the digests
cover and how they are checked is ``integrity.py``'s job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ModelFileError

FORMAT_VERSION = 2
#: versions this runtime reads (1: the graph is hashed, the metadata is not)
READABLE_VERSIONS = (1, 2)
SCORE_CONVENTION = "higher score = more anomalous; is_anomaly = not (score <= threshold)"

# Graph input / output names (stable contract).
INPUT_THRESHOLD = "threshold"
OUT_LOGITS = "logits"
OUT_PRED = "pred"
OUT_SCORE = "score"
OUT_IS_ANOMALY = "is_anomaly"
OUT_LAYER_SCORES = "layer_scores"
#: bool [B]: the row's values are all finite and within the range limits (a row that needs
#: no special handling). Optional (files exported before it lack it): a runtime that finds
#: it reads it instead of making its own pass over the input.
OUT_INPUT_OK = "input_ok"
ACTIVATION_PREFIX = "act_"

# metadata_props keys.
KEY_FORMAT_VERSION = "ufad.format_version"
KEY_METHOD = "ufad.method"
KEY_PARAMS = "ufad.params"
KEY_LAYERS = "ufad.layers"
KEY_CLASSES = "ufad.classes"
KEY_INPUT = "ufad.input"
KEY_OUTPUTS = "ufad.outputs"
KEY_THRESHOLD = "ufad.threshold"
KEY_CALIBRATION = "ufad.calibration"
KEY_GRAPH_SHA256 = "ufad.graph_sha256"
KEY_CONTENT_SHA256 = "ufad.content_sha256"
KEY_SIGNATURE = "ufad.signature"
KEY_PRODUCER = "ufad.producer"
KEY_CONVENTION = "ufad.score_convention"

REQUIRED_KEYS = (
    KEY_FORMAT_VERSION, KEY_METHOD, KEY_PARAMS, KEY_LAYERS, KEY_CLASSES, KEY_INPUT,
    KEY_OUTPUTS, KEY_THRESHOLD, KEY_CALIBRATION, KEY_GRAPH_SHA256,
)
REQUIRED_KEYS_V2 = REQUIRED_KEYS + (KEY_CONTENT_SHA256,)

#: what happens to inputs far outside the fitting data's value range (``ufad.input.range_policy``):
#: "refuse" (images: almost always a scaling mistake, refused with a hint) or "flag" (feature
#: vectors: scored, and flagged anomalous by the graph itself; never refused, never accepted)
RANGE_POLICIES = ("refuse", "flag")
#: the input dtypes a file may declare: float32 (images, features, signals) and int64 (token or
#: category ids, e.g. a text transformer's input; their range is the ids seen at fit)
INPUT_DTYPES = ("float32", "int64")


def activation_output_name(layer: str) -> str:
    """Graph output name of a monitored layer's reduced activation vector."""
    return ACTIVATION_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", layer)


@dataclass(frozen=True)
class LayerInfo:
    """One monitored layer: module name, reduced feature size, reduction, activation output."""

    name: str
    dim: int
    reduction: str
    output: str


@dataclass(frozen=True)
class InputSpec:
    """What the graph's data input accepts."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str
    value_range: tuple[float, float] | None
    range_policy: str = "refuse"

    @property
    def is_index(self) -> bool:
        """Integer ids (``int64``), not real values: no NaN, and the range is exact."""
        return self.dtype == "int64"

    @property
    def sample_shape(self) -> tuple[int | None, ...]:
        """The shape of one sample (``shape`` without the batch axis)."""
        return tuple(self.shape[1:])

    def to_json(self) -> dict[str, Any]:
        """The ``ufad.input`` object."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "range": list(self.value_range) if self.value_range else None,
                "range_policy": self.range_policy}


@dataclass(frozen=True)
class FormatInfo:
    """The ufad metadata of one detector file: the exporter writes it (``to_metadata``), the
    runtime reads it back (``parse_metadata``); one definition of every field."""

    format_version: int
    method: str
    params: dict[str, Any]
    layers: tuple[LayerInfo, ...]
    classes: tuple[str, ...]
    input: InputSpec
    outputs: dict[str, Any]
    threshold: float
    calibration: dict[str, Any]
    graph_sha256: str
    producer: dict[str, Any] = field(default_factory=dict)
    content_sha256: str = ""   # format >= 2
    signed: bool = False       # a ufad.signature entry is present (checked only against a key)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of everything parsed."""
        return {
            "format_version": self.format_version,
            "method": self.method,
            "params": self.params,
            "layers": [vars(l) for l in self.layers],
            "classes": list(self.classes),
            "input": self.input.to_json(),
            "outputs": self.outputs,
            "threshold": self.threshold,
            "calibration": self.calibration,
            "graph_sha256": self.graph_sha256,
            "content_sha256": self.content_sha256,
            "signed": self.signed,
            "producer": self.producer,
        }


    def to_metadata(self) -> dict[str, str]:
        """The metadata_props entries this info is written as: every value a string, JSON
        where structured. The integrity entries (``ufad.content_sha256``, ``ufad.signature``)
        are ``integrity.py``'s to write. ``parse_metadata`` reads exactly this back."""
        return {
            KEY_FORMAT_VERSION: str(self.format_version),
            KEY_METHOD: self.method,
            KEY_PARAMS: json.dumps(self.params),
            KEY_LAYERS: json.dumps([vars(l) for l in self.layers]),
            KEY_CLASSES: json.dumps(list(self.classes)),
            KEY_INPUT: json.dumps(self.input.to_json()),
            KEY_OUTPUTS: json.dumps(self.outputs),
            KEY_THRESHOLD: json.dumps(self.threshold),
            KEY_CALIBRATION: json.dumps(self.calibration),
            KEY_GRAPH_SHA256: self.graph_sha256,
            KEY_PRODUCER: json.dumps(self.producer),
            KEY_CONVENTION: SCORE_CONVENTION,
        }


def _json(meta: dict[str, str], key: str, path: str) -> Any:
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, TypeError) as e:
        raise ModelFileError(
            f"{path}: metadata {key!r} is not valid JSON ({e}); the file was edited or is "
            "corrupt. Re-export it with `ufad export`."
        ) from None


def parse_header(meta: dict[str, str], path: str = "<model>") -> int:
    """Check that ``meta`` is ufad metadata of a version this runtime reads, with every
    required key; return the format version."""
    if KEY_FORMAT_VERSION not in meta:
        raise ModelFileError(
            f"{path} is an ONNX model but not a ufad detector (no {KEY_FORMAT_VERSION!r} "
            "metadata). Export one with `ufad export MODEL --data DATASET -o OUT.onnx`."
        )
    try:
        version = int(meta[KEY_FORMAT_VERSION])
    except ValueError:
        raise ModelFileError(
            f"{path}: {KEY_FORMAT_VERSION}={meta[KEY_FORMAT_VERSION]!r} is not an integer."
        ) from None
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} uses ufad format version {version}, newer than this runtime understands "
            f"(<= {FORMAT_VERSION}). Upgrade ufad (`pip install -U ufad`)."
        )
    if version not in READABLE_VERSIONS:
        raise ModelFileError(f"{path}: invalid ufad format version {version}.")
    missing = [k for k in (REQUIRED_KEYS_V2 if version >= 2 else REQUIRED_KEYS) if k not in meta]
    if missing:
        raise ModelFileError(
            f"{path}: ufad metadata is incomplete, missing {missing}. Re-export the detector."
        )
    return version


def parse_metadata(meta: dict[str, str], path: str = "<model>") -> FormatInfo:
    """Validate and parse ufad metadata_props; raise ModelFileError saying what is wrong."""
    version = parse_header(meta, path)
    try:
        layers = tuple(
            LayerInfo(str(l["name"]), int(l["dim"]), str(l["reduction"]), str(l["output"]))
            for l in _json(meta, KEY_LAYERS, path)
        )
        inp = _json(meta, KEY_INPUT, path)
        if not isinstance(inp, dict):
            raise TypeError(f"{KEY_INPUT} must be a JSON object, got {type(inp).__name__}")
        rng = inp.get("range")
        policy = str(inp.get("range_policy", "refuse"))
        if policy not in RANGE_POLICIES:
            raise ValueError(f"range_policy {policy!r} is not one of {RANGE_POLICIES}")
        if str(inp["dtype"]) not in INPUT_DTYPES:
            raise ValueError(f"input dtype {inp['dtype']!r} is not one of {INPUT_DTYPES} "
                             "(a newer ufad wrote it? upgrade ufad)")
        spec = InputSpec(
            name=str(inp["name"]),
            shape=tuple(None if d is None else int(d) for d in inp["shape"]),
            dtype=str(inp["dtype"]),
            value_range=(float(rng[0]), float(rng[1])) if rng else None,
            range_policy=policy,
        )
        threshold = float(meta[KEY_THRESHOLD])
        if threshold != threshold:  # NaN would make every verdict "anomalous" silently
            raise ValueError(f"{KEY_THRESHOLD} is NaN")
        classes = tuple(str(c) for c in _json(meta, KEY_CLASSES, path))
        outputs = dict(_json(meta, KEY_OUTPUTS, path))
        params = dict(_json(meta, KEY_PARAMS, path))
        calibration = dict(_json(meta, KEY_CALIBRATION, path))
        if "threshold" in calibration and calibration["threshold"] is not None and \
                float(calibration["threshold"]) != threshold:
            raise ValueError(f"{KEY_CALIBRATION}.threshold {calibration['threshold']} differs from "
                             f"{KEY_THRESHOLD} {threshold}")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        if isinstance(e, ModelFileError):
            raise
        raise ModelFileError(
            f"{path}: ufad metadata is malformed ({type(e).__name__}: {e}). Re-export the detector."
        ) from None
    producer = _json(meta, KEY_PRODUCER, path) if KEY_PRODUCER in meta else {}
    return FormatInfo(
        format_version=version, method=meta[KEY_METHOD], params=params, layers=layers,
        classes=classes, input=spec, outputs=outputs, threshold=threshold,
        calibration=calibration, graph_sha256=meta[KEY_GRAPH_SHA256], producer=producer,
        content_sha256=meta.get(KEY_CONTENT_SHA256, ""), signed=KEY_SIGNATURE in meta,
    )

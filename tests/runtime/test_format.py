"""The format has one owner: ``FormatInfo.to_metadata`` writes what ``parse_metadata`` reads."""

from __future__ import annotations

import dataclasses
import math

from ufad.runtime import format as fmt
from ufad.runtime import integrity


def _info(**over) -> fmt.FormatInfo:
    base = fmt.FormatInfo(
        format_version=fmt.FORMAT_VERSION, method="uniform",
        params={"nu": 0.1, "gamma": [0.01, 0.5], "nested": {"a": [1, 2]}},
        layers=(fmt.LayerInfo("block1", 32, "max", "act_block1"),
                fmt.LayerInfo("@sqrt_softmax", 10, "none", "act__sqrt_softmax")),
        classes=("zéro", "one", "two, three"),
        input=fmt.InputSpec("input", (None, 1, 28, 28), "float32", (0.0, 0.99609375), "refuse"),
        outputs={"layer_scores": {"columns": ["block1", "@sqrt_softmax"]}},
        threshold=3.4197, calibration={"threshold": 3.4197, "target_tpr": 0.95},
        graph_sha256="ab" * 32, producer={"ufad": "0.1.0"}, content_sha256="cd" * 32, signed=False,
    )
    return dataclasses.replace(base, **over)


def test_every_field_round_trips():
    for info in (_info(), _info(input=fmt.InputSpec("x", (None, 30), "float32", None, "flag")),
                 _info(threshold=math.inf, calibration={"threshold": math.inf}),
                 _info(classes=tuple(str(i) for i in range(1000)))):
        meta = info.to_metadata()
        assert fmt.KEY_CONTENT_SHA256 not in meta and fmt.KEY_SIGNATURE not in meta  # integrity's job
        meta[fmt.KEY_CONTENT_SHA256] = info.content_sha256
        assert fmt.parse_metadata(meta) == info
    assert set(_info().to_metadata()) | {fmt.KEY_CONTENT_SHA256} >= set(fmt.REQUIRED_KEYS_V2)


def test_the_committed_file_is_exactly_what_to_metadata_writes(exported_path):
    meta = integrity.read_parts(exported_path.read_bytes()).metadata
    info = fmt.parse_metadata(meta)
    written = info.to_metadata()
    assert {k: v for k, v in meta.items() if k not in integrity.UNCOVERED} == written

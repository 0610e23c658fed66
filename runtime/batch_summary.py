"""A batch job's summary: inputs, flagged, flagged per predicted class, score quantiles, errors.

Accumulated block by block as rows are written, printed at the end and written beside OUT as
JSON (``audit.parquet`` -> ``audit.summary.json``). Scores are higher = more anomalous;
quantiles are sample values (no interpolation, so an ``inf`` score never becomes NaN).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .session import _json_float

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
MAX_LISTED_ERRORS = 100


class Summary:
    """Counts over the rows written (see the module docstring)."""

    def __init__(self, classes: Sequence[str], threshold: float):
        self.classes = list(classes)
        self.threshold = float(threshold)
        k = len(self.classes)
        self.per_class = np.zeros(k, np.int64)
        self.flagged_per_class = np.zeros(k, np.int64)
        self.inputs = self.flagged = self.nonfinite = self.out_of_range = self.error_rows = 0
        self.errors: dict[str, tuple[int, str]] = {}  # source -> (rows, first message)
        self._scores: list[np.ndarray] = []

    def add(self, block: dict[str, np.ndarray], paths: Sequence[str]) -> None:
        err = np.asarray(block["error"], object) != ""
        for i in np.flatnonzero(err):
            src = paths[int(block["file_id"][i])]
            n, msg = self.errors.get(src, (0, str(block["error"][i])))
            self.errors[src] = (n + 1, msg)
        self.error_rows += int(err.sum())
        ok = ~err
        pred, flag = block["pred"][ok], block["is_anomaly"][ok].astype(bool)
        known = (pred >= 0) & (pred < len(self.classes))
        self.per_class += np.bincount(pred[known], minlength=len(self.classes))
        self.flagged_per_class += np.bincount(pred[known & flag], minlength=len(self.classes))
        self.inputs += int(ok.sum())
        self.flagged += int(flag.sum())
        self.nonfinite += int(block["nonfinite"][ok].sum())
        self.out_of_range += int(block["out_of_range"][ok].sum())
        self._scores.append(np.asarray(block["score"][ok], np.float32))

    def quantiles(self) -> dict[str, float | str]:
        s = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
        if not len(s):
            return {}
        vals = np.quantile(s, QUANTILES, method="inverted_cdf")
        return {f"{q:g}": _json_float(v) for q, v in zip(QUANTILES, vals)}

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """The summary as JSON-ready dict; ``extra`` (model, source, out, timing) goes first."""
        listed = sorted(self.errors.items())[:MAX_LISTED_ERRORS]
        return {
            **extra,
            "rows": self.inputs + self.error_rows,
            "inputs": self.inputs,
            "flagged": self.flagged,
            "flagged_rate": self.flagged / self.inputs if self.inputs else 0.0,
            "threshold": _json_float(self.threshold),
            "flagged_per_class": {c: int(n) for c, n in zip(self.classes, self.flagged_per_class)},
            "inputs_per_class": {c: int(n) for c, n in zip(self.classes, self.per_class)},
            "score_quantiles": self.quantiles(),
            "nonfinite_inputs": self.nonfinite,
            "out_of_range_inputs": self.out_of_range,
            "error_rows": self.error_rows,
            "error_sources": len(self.errors),
            "errors": [{"source": s, "rows": n, "error": m} for s, (n, m) in listed],
        }


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_summary(d: dict[str, Any]) -> str:
    """The summary as a few lines of text (what ``ufad score --ray`` prints)."""
    q = d["score_quantiles"]
    per = ", ".join(f"{c}: {n}" for c, n in d["flagged_per_class"].items() if n)
    lines = [
        f"{d['rows']} rows -> {d.get('out', '')}: {d['inputs']} inputs scored, {d['flagged']} flagged "
        f"({100 * d['flagged_rate']:.1f}%, threshold {d['threshold']}), "
        + (f"{_count(d['error_rows'], 'error row')} from {_count(d['error_sources'], 'source')}"
           if d["error_rows"] else "no error rows"),
        f"flagged per predicted class: {per or 'none'}",
    ]
    if q:
        lines.append("score quantiles: " + ", ".join(f"{k}: {v if isinstance(v, str) else f'{v:.4g}'}"
                                                     for k, v in q.items()))
    for e in d["errors"][:5]:
        lines.append(f"error: {e['source']} ({_count(e['rows'], 'row')}): {e['error']}")
    if d["error_sources"] > 5:
        lines.append(f"... and {d['error_sources'] - 5} more sources with errors (see the summary file)")
    if "seconds" in d:
        lines.append(f"{d['seconds']:.1f} s, {d.get('inputs_per_second', 0):.0f} inputs/s on "
                     f"{d.get('workers', '?')} workers; summary: {d.get('summary', '')}")
    return "\n".join(lines)

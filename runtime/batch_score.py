"""Score one work item of a batch job into result columns (no Ray here: a Ray worker calls it).

A work item is a list of segments (``sources.plan_items``). Every input of it yields exactly
one row: scored, or an error row when its file cannot be read or the runtime refuses it. A
segment that cannot be read fails only its own inputs (one error row each, or one row with
index -1 when it was the whole file); a refused segment (values far outside the model's range)
is checked input by input, so only the refused inputs become error rows.

Columns (numpy, one entry per row): ``file_id``, ``index`` (-1: the whole file), ``pred``
(-1 on error rows), ``score`` (NaN on error rows), ``is_anomaly``, ``nonfinite``,
``out_of_range``, ``layer_scores`` [n, L], ``error`` ("" unless the row is an error).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError
from .inputs import check_batch
from .session import AnomalySession
from .sources import Segment, SourceFile, read_segment

COLUMNS = ("file_id", "index", "pred", "score", "is_anomaly", "nonfinite", "out_of_range", "layer_scores", "error")


def error_rows(file_id: int, indices: Sequence[int] | np.ndarray, message: str, n_layers: int) -> dict[str, np.ndarray]:
    """Error rows naming ``message`` for the given inputs of one file (index -1: the whole file)."""
    n = len(indices)
    return {
        "file_id": np.full(n, file_id, np.int64), "index": np.asarray(indices, np.int64),
        "pred": np.full(n, -1, np.int64), "score": np.full(n, np.nan, np.float32),
        "is_anomaly": np.zeros(n, bool), "nonfinite": np.zeros(n, bool), "out_of_range": np.zeros(n, bool),
        "layer_scores": np.full((n, n_layers), np.nan, np.float32), "error": np.full(n, message, object),
    }


def concat(blocks: Sequence[dict[str, np.ndarray]], n_layers: int) -> dict[str, np.ndarray]:
    """Rows of several blocks as one block."""
    if not blocks:
        return error_rows(0, [], "", n_layers)
    return {k: np.concatenate([b[k] for b in blocks]) for k in COLUMNS}


def _checked(seg: Segment, raw: np.ndarray, sess: AnomalySession, range_check: str,
             errors: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The segment's inputs the runtime accepts, and their indices; the rest become error rows."""
    spec, n_layers = sess.input_spec, len(sess.layer_names)
    idx = np.arange(seg.start, seg.stop)
    try:
        return check_batch(raw, spec, range_check)[0], idx
    except InputError as e:  # shapes and dtypes were checked when planning: a range refusal
        if len(idx) == 1:
            errors.append(error_rows(seg.file_id, idx, e.raw, n_layers))
            return np.zeros((0, *spec.shape[1:]), spec.dtype), idx[:0]
    keep, good = [], []
    for j, i in enumerate(idx):  # find the refused inputs; the others are scored
        try:
            keep.append(check_batch(raw[j:j + 1], spec, range_check)[0])
            good.append(i)
        except InputError as e:
            errors.append(error_rows(seg.file_id, [i], f"input {i}: {e.raw}", n_layers))
    if not keep:
        return np.zeros((0, *spec.shape[1:]), spec.dtype), idx[:0]
    return np.concatenate(keep), np.asarray(good, np.int64)


def score_item(sess: AnomalySession, files: Sequence[SourceFile], segments: Sequence[Segment], *,
               threshold: float | None = None, range_check: str = "error") -> dict[str, np.ndarray]:
    """Read, check and score one work item: one row per input (see the module docstring).

    All accepted inputs of the item go through the model in one call, so an item of
    ``batch_size`` inputs is one batch of that size."""
    spec, n_layers = sess.input_spec, len(sess.layer_names)
    errors: list[dict[str, np.ndarray]] = []
    xs, owners = [], []
    for seg in segments:
        f = files[seg.file_id]
        try:
            raw = read_segment(f, seg.start, seg.stop, spec)
        except InputError as e:
            whole = seg.start == 0 and seg.stop == f.count
            errors.append(error_rows(seg.file_id, [-1] if whole else np.arange(seg.start, seg.stop), e.raw, n_layers))
            continue
        x, idx = _checked(seg, raw, sess, range_check, errors)
        if len(idx):
            xs.append(x)
            owners.append((seg.file_id, idx))
    blocks = list(errors)
    if xs:
        x = xs[0] if len(xs) == 1 else np.concatenate(xs)
        res = sess.run(x, threshold=threshold, batch_size=max(len(x), 1))
        blocks.append({
            "file_id": np.concatenate([np.full(len(i), fid, np.int64) for fid, i in owners]),
            "index": np.concatenate([i for _, i in owners]).astype(np.int64),
            "pred": res.pred.astype(np.int64), "score": res.score.astype(np.float32),
            "is_anomaly": res.is_anomaly.astype(bool), "nonfinite": res.nonfinite.astype(bool),
            "out_of_range": np.asarray(res.out_of_range, bool),
            "layer_scores": res.layer_scores.astype(np.float32).reshape(len(x), n_layers),
            "error": np.full(len(x), "", object),
        })
    return concat(blocks, n_layers)

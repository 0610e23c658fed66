"""``ufad serve``'s requests without Ray: read a POST /score body, score a batch of requests.

    x, threshold = parse_score_request(body, spec)           # InputError -> HTTP 400
    answers = score_requests(sess, [(x, threshold), ...])    # one record list per request

A body is JSON: ``{"inputs": nested list}`` or ``{"npy_b64": base64 of a .npy file}``, with an
optional ``"threshold"``. Inputs follow ``AnomalySession.run``'s rules (JSON numbers are
float64, so integers are values, not uint8 pixels; a .npy keeps its dtype). A request's answer
is ``AnomalySession.run(x, threshold).records()`` plus ``provider``, the ``ufad score --json``
fields, **bit for bit**: requests batched together are scored so that every input goes through
the same graph path its request alone would take (see ``score_requests``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .format import InputSpec
from .inputs import check_batch

MAX_BODY_BYTES = 64 * 2 ** 20
MAX_INPUTS = 4096
#: A sample's scores must not depend on the requests it was batched with. In the uniform
#: head's graph (exporter/detectors/uniform_head.py) a batch of ONE input rounds differently
#: from larger batches (onnxruntime's MatMul takes its vector kernel for one row), so a
#: one-input piece is scored alone. Files exported before 2026-12-03 hold an ``If`` that takes
#: a gather-first branch for batches of at most SMALL_BATCH inputs, rounding differently from
#: the large-batch branch: small pieces are batched only with each other, in runs of at most
#: this size. With the two rules the answers of both kinds of file matched alone-scoring bit for
#: bit in the tests (tests/test_core.py, tests/test_ray.py); it is measured, not proven: onnxruntime
#: may still round a row differently in other batch sizes (BENCHMARKS.md).
SMALL_BATCH = 16
#: AnomalySession.run's default chunk: a larger request is scored in pieces of this size locally
RUN_CHUNK = 1024


class TooLarge(InputError):
    """A request over the size limits (HTTP 413)."""


def _threshold(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"threshold must be a number, got {value!r}")
    if math.isnan(value):
        raise InputError("threshold is NaN; pass a finite number or +inf")
    return float(value)


def _npy(data: bytes) -> np.ndarray:
    """A .npy file's array from bytes: never unpickled, and refused before any allocation
    when its header declares more data than the bytes hold."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(f)
    except ValueError as e:
        raise InputError(f"npy_b64 is not a .npy file ({e}); encode the bytes np.save writes") from None
    if dtype.hasobject:
        raise InputError("npy_b64 holds Python objects (pickled data), which are never loaded")
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > len(data) - f.tell():
        raise InputError(f"npy_b64 declares a {dtype} array of shape {shape} ({need} bytes) but holds only "
                         f"{len(data) - f.tell()} bytes of data; it is truncated")
    f.seek(0)
    return np.load(f, allow_pickle=False)


def parse_score_request(body: bytes, spec: InputSpec, range_check: str = "error") -> tuple[np.ndarray, float | None]:
    """The checked batch (float32, or int64 ids) and threshold of a POST /score body (InputError if bad)."""
    if len(body) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is {len(body)} bytes, over the {MAX_BODY_BYTES} byte limit; send fewer inputs")
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"request body is not JSON ({e}); send {{\"inputs\": [...]}} or {{\"npy_b64\": \"...\"}}") from None
    if not isinstance(req, dict) or ("inputs" in req) == ("npy_b64" in req):
        raise InputError('request body must be a JSON object with one of "inputs" (nested list) or '
                         '"npy_b64" (base64 of a .npy file), and optionally "threshold"')
    unknown = sorted(set(req) - {"inputs", "npy_b64", "threshold"})
    if unknown:
        raise InputError(f"unknown request fields {unknown}; expected inputs or npy_b64, and threshold")
    threshold = _threshold(req.get("threshold"))
    if "inputs" in req:
        raw = req["inputs"]
        if not isinstance(raw, list):
            raise InputError(f'"inputs" must be a nested list of numbers, got {type(raw).__name__}')
        try:
            arr = np.asarray(raw)
        except ValueError as e:  # ragged lists
            raise InputError(f'"inputs" cannot be read as an array ({e})') from None
        if arr.dtype.kind in "iu" and not spec.is_index:
            arr = arr.astype(np.float64)  # JSON numbers are values, never 8-bit pixels (ids stay ids)
    else:
        if not isinstance(req["npy_b64"], str):
            raise InputError('"npy_b64" must be a base64 string')
        try:
            arr = _npy(base64.b64decode(req["npy_b64"], validate=True))
        except (binascii.Error, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f'"npy_b64" is not valid base64 ({e})') from None
    x, _ = check_batch(arr, spec, range_check)
    if len(x) > MAX_INPUTS:
        raise TooLarge(f"request holds {len(x)} inputs, over the {MAX_INPUTS} limit; split it")
    return x, threshold


def _runs(pieces: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
    """Group pieces (request, start, stop) into model calls: a one-input piece alone, pieces
    over SMALL_BATCH inputs together in one call, the others together in calls of at most
    SMALL_BATCH inputs (see SMALL_BATCH)."""
    big = [p for p in pieces if p[2] - p[1] > SMALL_BATCH]
    runs = [big] if big else []
    runs += [[p] for p in pieces if p[2] - p[1] == 1]
    cur, n = [], 0
    for p in (p for p in pieces if 1 < p[2] - p[1] <= SMALL_BATCH):
        if cur and n + p[2] - p[1] > SMALL_BATCH:
            runs.append(cur)
            cur, n = [], 0
        cur.append(p)
        n += p[2] - p[1]
    if cur:
        runs.append(cur)
    return runs


def score_requests(sess, requests: Sequence[tuple[np.ndarray, float | None]]) -> list[list[dict[str, Any]]]:
    """Score a batch of requests with few model calls; answer each as if scored alone.

    Each request is cut where ``AnomalySession.run`` would cut it (pieces of ``RUN_CHUNK``);
    pieces with the same threshold share calls, large with large and small with small, and a
    one-input piece has a call of its own (see ``SMALL_BATCH``), so that every record is the one
    ``sess.run(x, threshold).records()`` gives for its request alone."""
    answers: list[list[dict[str, Any]]] = [[] for _ in requests]
    by_threshold: dict[float | None, list[tuple[int, int, int]]] = defaultdict(list)
    for r, (x, thr) in enumerate(requests):
        for s in range(0, len(x), RUN_CHUNK):
            by_threshold[thr].append((r, s, min(s + RUN_CHUNK, len(x))))
    parts: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for thr, pieces in by_threshold.items():
        for run in _runs(pieces):
            xs = [requests[r][0][s:e] for r, s, e in run]
            x = xs[0] if len(xs) == 1 else np.concatenate(xs)
            res = sess.run(x, threshold=thr, batch_size=max(1, len(x)))
            recs = res.records()
            at = 0
            for r, s, e in run:
                parts[(r, s)] = recs[at:at + e - s]
                at += e - s
    for r, (x, _) in enumerate(requests):
        out = answers[r]
        for s in range(0, len(x), RUN_CHUNK):
            out += parts[(r, s)]
        for i, rec in enumerate(out):
            rec["index"] = i
            rec["provider"] = sess.provider
    return answers

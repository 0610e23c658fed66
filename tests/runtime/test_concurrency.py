"""One AnomalySession shared by 8 threads x 500 calls gives exactly the serial results.

The calls mix real MNIST test images, uniform noise and NaN-poisoned inputs in small
batches, with per-call thresholds and activations on/off, so any per-call state kept on the
session (or shared between concurrent onnxruntime runs) would show up as a mismatch.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ufad.runtime import AnomalySession, ScoreResult

THREADS = 8
CALLS = 500
POOL = 64  # distinct calls, each repeated by every thread in its own order


@pytest.fixture(scope="module")
def calls(mnist) -> list[dict]:
    rng = np.random.default_rng(0)
    xt = mnist["test"][0]
    out = []
    for i in range(POOL):
        b = int(rng.integers(1, 5))
        real = xt[rng.choice(len(xt), b, replace=False)]
        noise = rng.uniform(0, 1, real.shape).astype(np.float32)
        x = np.where(rng.random((b, 1, 1, 1)) < 0.5, real, noise).astype(np.float32)
        if i % 7 == 0:
            x[0, 0, int(rng.integers(28)), int(rng.integers(28))] = np.nan
        out.append({
            "x": x,
            "threshold": [None, 0.0, 2.5, np.inf][i % 4],
            "activations": i % 3 == 0,
        })
    return out


def _run(sess: AnomalySession, call: dict) -> ScoreResult:
    return sess.run(call["x"], threshold=call["threshold"], activations=call["activations"])


def _equal(a: ScoreResult, b: ScoreResult) -> bool:
    return (a.threshold == b.threshold
            and all(np.array_equal(getattr(a, k), getattr(b, k), equal_nan=True)
                    for k in ("score", "pred", "is_anomaly", "layer_scores", "logits", "nonfinite"))
            and a.activations.keys() == b.activations.keys()
            and all(np.array_equal(a.activations[k], b.activations[k], equal_nan=True) for k in a.activations))


def test_shared_session_8_threads_500_calls(session, calls):
    serial = [_run(session, c) for c in calls]
    # The pool must exercise both verdicts, or "identical" would prove little.
    flags = np.concatenate([r.is_anomaly for r in serial])
    assert 0.1 < flags.mean() < 0.9
    assert any(r.activations for r in serial) and any(r.nonfinite.any() for r in serial)

    start = threading.Barrier(THREADS)

    def worker(t: int) -> list[int]:
        start.wait()  # all threads hammer the session at the same moment
        bad = []
        for k in range(CALLS):
            i = (k * (2 * t + 1) + 13 * t) % POOL  # a different order in every thread
            if not _equal(_run(session, calls[i]), serial[i]):
                bad.append(i)
        return bad

    with ThreadPoolExecutor(THREADS) as ex:
        results = list(ex.map(worker, range(THREADS)))
    mismatches = sum(len(r) for r in results)
    assert mismatches == 0, f"{mismatches} of {THREADS * CALLS} concurrent calls differ from serial scoring"

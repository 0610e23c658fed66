"""The timing loop and session options, shared by the bench process and its torch-free
timing workers (imported by both, so (a), (b) and (c) are timed the same way)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np


def ort_session_options(threads: int, profile_prefix: str | None = None):
    """The session options both (a) and (b) run with (AnomalySession's, fixed threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def summarize(times_s: Sequence[float], batch: int) -> dict[str, float]:
    t = np.asarray(times_s) * 1e3
    med = float(np.median(t))
    return {
        "median_ms": med, "p95_ms": float(np.percentile(t, 95)), "mean_ms": float(t.mean()),
        "min_ms": float(t.min()), "n": int(len(t)),
        "throughput_per_s": batch / (med / 1e3) if med > 0 else float("inf"),
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved in small blocks so that a noisy
    neighbour slows every variant alike (the ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    block = max(1, min(10, repeats // 10))
    times: dict[str, list[float]] = {k: [] for k in fns}
    while any(len(v) < repeats for v in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times

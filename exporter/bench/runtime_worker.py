"""The torch-free runtime's start-up and memory, in a fresh process where torch is blocked:
``python -m ufad.exporter.bench.runtime_worker DETECTOR.onnx INPUTS.npy THREADS`` prints one
JSON line (import and session times, RSS after scoring the inputs)."""

from __future__ import annotations

import time

t0 = time.perf_counter()  # before numpy: its import is part of what a deployment pays

from . import no_torch  # noqa: E402

no_torch.block()

import json  # noqa: E402
import sys  # noqa: E402


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024
    return float("nan")


def main(detector: str, inputs: str, threads: int) -> dict:
    import numpy as np

    t1 = time.perf_counter()
    import onnxruntime  # noqa: F401

    t2 = time.perf_counter()
    from ufad.runtime import AnomalySession

    t3 = time.perf_counter()
    sess = AnomalySession(detector, provider="cpu", threads=threads)
    t4 = time.perf_counter()
    res = sess.run(np.load(inputs))
    t5 = time.perf_counter()
    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    return {
        "import_numpy_s": t1 - t0, "import_onnxruntime_s": t2 - t1, "import_ufad_runtime_s": t3 - t2,
        "import_s": t3 - t0, "session_s": t4 - t3, "score_256_s": t5 - t4,
        "rss_mb": _status_mb("VmRSS"), "peak_rss_mb": _status_mb("VmHWM"),
        "torch_blocked": blocked, "torch_in_modules": no_torch.torch_loaded(),
        "n_scored": int(len(res.score)),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]))))

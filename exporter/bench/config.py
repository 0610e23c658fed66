"""What ``ufad bench`` measures and on what: its settings, the variants, the machine."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "ufad.bench/1"
VARIANTS = ("bare", "ufad", "host")
VARIANT_LABELS = {
    "bare": "(a) bare classifier .onnx, onnxruntime",
    "ufad": "(b) ufad detector .onnx, AnomalySession.run",
    "host": "(c) torch eager + hooks + sklearn OneClassSVM",
}
# Agreement of (c) with (b): float32 graph vs float64 scikit-learn.
AGREE_RTOL = 1e-3


@dataclass
class BenchConfig:
    """What to benchmark and how hard. ``repeats``/``warmup`` None = per-batch defaults."""

    model: str = "ufad.models.mnist_cnn:pretrained"
    data: str = "mnist"
    batches: tuple[int, ...] = (1, 32, 256)
    repeats: int | None = None
    warmup: int | None = None
    threads: int = 2
    limit: int | None = None          # fitting samples (None = the whole train split)
    calib_limit: int | None = None    # calibration samples (None = the whole valid split)
    max_points: int = 1000
    seed: int = 0
    quick: bool = False
    runtime_runs: int = 3             # subprocess launches for the torch-free runtime figures
    rounds: int = 3                   # alternating (a)/(b) pairs of timing processes
    workdir: str | None = None        # keep the .onnx files here (default: a temp dir)

    def repeats_for(self, batch: int) -> int:
        if self.repeats is not None:
            return max(1, int(self.repeats))
        if self.quick:
            return 5
        return 300 if batch <= 1 else 100 if batch <= 32 else 40

    def warmup_for(self, batch: int) -> int:
        if self.warmup is not None:
            return max(0, int(self.warmup))
        if self.quick:
            return 2
        return 30 if batch <= 1 else 10 if batch <= 32 else 5


def machine_info() -> dict[str, Any]:
    """CPU model, core counts and library versions of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("ufad", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript",
                "numpy", "scikit-learn"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": affinity,
            "platform": platform.platform(), "versions": versions}

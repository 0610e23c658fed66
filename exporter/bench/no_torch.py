"""Make ``import torch`` fail in a benchmark worker, so what it times is the torch-free runtime.

Imported first by the torch-free workers (``python -m ufad.exporter.bench.time_worker``, ...).
``python -m`` imports the parent packages before the worker runs; they import no torch, and
each worker reports ``torch_in_modules`` so that the bench refuses a result where one did.
"""

from __future__ import annotations

import sys


class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this benchmark worker", name=name)
        return None


def block() -> None:
    """Install the blocker (idempotent)."""
    if not any(isinstance(f, _NoTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoTorch())


def torch_loaded() -> bool:
    return any(m == "torch" or m.startswith("torch.") for m in sys.modules)

"""``ufad bench``: what the detector costs on top of the bare model, measured in one run.

``config`` (settings, variants, machine), ``timing`` (the timing loop, shared with the
workers), ``host`` ((c): eager torch + hooks + scikit-learn), ``run`` (orchestration),
``report`` (tables, markdown), and the workers that run as their own processes:
``fit_worker`` (fit + export), ``time_worker`` and ``runtime_worker`` (torch blocked).
The names below load on first use: a torch-free worker imports this package too.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BenchConfig": ".config", "VARIANTS": ".config", "VARIANT_LABELS": ".config", "SCHEMA": ".config",
    "HostDetector": ".host", "agreement": ".host",
    "run_bench": ".run", "check_result": ".run",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

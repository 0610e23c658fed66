"""ufad exporter (needs torch): fit detectors on ID data and export them as one .onnx file.

The names below load on first use, so the torch-free parts of this package (the evaluation
metrics and report, the benchmark's timing workers) import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "default_layers": ".auto_layers",
    "ActivationCapture": ".taps", "Tap": ".taps", "module_names": ".taps", "resolve_taps": ".taps",
    "Detector": ".detector", "DetectorModule": ".detector",
    "UniformDetector": ".detectors",
    "ExportReport": ".onnx_export",
}

__all__ = [*_EXPORTS, "DETECTORS"]


def __getattr__(name: str) -> Any:
    if name == "DETECTORS":  # the registry's view, computed when asked (see registry.py)
        from .registry import detectors

        return detectors()
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

"""ufad exporter (needs torch): fit detectors on ID data and export them as one .onnx file."""

from .auto_layers import default_layers
from .taps import ActivationCapture, Tap, module_names, resolve_taps
from .detector import Detector, DetectorModule
from .detectors import UniformDetector
from .onnx_export import ExportReport

__all__ = [
    "ActivationCapture", "Tap", "resolve_taps", "Detector", "DetectorModule", "DETECTORS", "ExportReport",
    "UniformDetector", "default_layers", "module_names",
]


def __getattr__(name: str):
    if name == "DETECTORS":  # the registry's view, computed when asked (see registry.py)
        from .registry import detectors

        return detectors()
    raise AttributeError(name)

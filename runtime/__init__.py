"""ufad runtime: load a ufad .onnx detector and score inputs (numpy + onnxruntime only)."""

from .errors import (DependencyError, ExportError, InputError, ModelFileError, ProviderError,
                     UfadError)
from .files import load_inputs
from .format import FORMAT_VERSION, FormatInfo
from .session import AnomalySession, ScoreResult

__all__ = [
    "AnomalySession", "ScoreResult", "load_inputs", "FORMAT_VERSION", "FormatInfo",
    "UfadError", "InputError", "ModelFileError", "ProviderError", "ExportError", "DependencyError",
]

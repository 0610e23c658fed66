"""ufad runtime: load a ufad .onnx detector and score inputs (numpy + onnxruntime only)."""

from .errors import (DependencyError, EvaluationError, ExportError, FormatWarning, InputError, ModelFileError,
                     OutputError, ProviderError, SignatureError, UfadError)
from .files import load_inputs
from .format import FORMAT_VERSION, FormatInfo
from .session import AnomalySession, ScoreResult

__all__ = [
    "AnomalySession", "ScoreResult", "load_inputs", "FORMAT_VERSION", "FormatInfo",
    "UfadError", "InputError", "ModelFileError", "SignatureError", "OutputError", "ProviderError",
    "ExportError", "EvaluationError", "DependencyError", "FormatWarning",
]

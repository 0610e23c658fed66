"""One error hierarchy for everything ufad raises on purpose.

Every message says what was wrong, what was expected and what to do. The CLI prints
``error: <message>`` and exits non-zero for any ``UfadError``; anything else is a bug.
"""

from __future__ import annotations


class UfadError(Exception):
    """Base class of every error ufad raises for a user mistake or a bad file."""

    exit_code = 2


class InputError(UfadError, ValueError):
    """An input array or input file cannot be scored as given (shape, dtype, values, format)."""


class ModelFileError(UfadError):
    """The .onnx file is missing, unreadable, not a ufad detector, or fails its integrity check."""


class ProviderError(UfadError):
    """The requested onnxruntime execution provider is not available."""


class ExportError(UfadError):
    """The model, layers or data given to the exporter cannot produce a detector."""


class DependencyError(UfadError):
    """An optional dependency needed for this operation is not installed."""

"""One error hierarchy for everything ufad raises on purpose, and one way to name options.

Every message says what was wrong, what was expected and what to do. The CLI prints
``error: <message>`` and exits non-zero for any ``UfadError``; anything else is a bug.

Messages name the interface in use. A message never spells an option itself: it embeds
``opt("min_points")`` or ``opt("range_check", "off")``, and the error renders that
reference when it is printed. Python callers see keyword arguments (``range_check='off'``);
the CLI renders the same error with its own flags (``--no-range-check``), looked up in the
command that was run (``render(cli_flags)``). One message, two spellings, no copies.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

NO_VALUE = object()
# Option references are framed by two ASCII control characters that never occur in text a
# user would write, so rendering cannot touch anything but the references.
_OPEN, _SEP, _CLOSE = "\x02", "\x1f", "\x03"
_REF = re.compile(f"{_OPEN}([^{_SEP}{_CLOSE}]*)(?:{_SEP}([^{_CLOSE}]*))?{_CLOSE}")

#: renders one option reference: (keyword name, value or NO_VALUE) -> text
Renderer = Callable[[str, Any], str]


def opt(name: str, value: Any = NO_VALUE) -> str:
    """A reference to the user-facing option ``name`` (a keyword argument's name), optionally
    with the value to pass, for use inside an error message."""
    if value is NO_VALUE:
        return f"{_OPEN}{name}{_CLOSE}"
    return f"{_OPEN}{name}{_SEP}{json.dumps(value)}{_CLOSE}"


def capped(items, limit: int) -> str:
    """``items`` comma-separated for a message, the first ``limit`` of them and the count
    when there are more (a 1000-class model can miss hundreds of classes)."""
    items = [str(i) for i in items]
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def python_style(name: str, value: Any) -> str:
    """``name`` or ``name='value'``: how a Python caller passes the option."""
    return name if value is NO_VALUE else f"{name}={value!r}"


def render(message: str, renderer: Renderer = python_style) -> str:
    """Replace every option reference in ``message`` with ``renderer``'s spelling."""
    def sub(m: re.Match) -> str:
        value = NO_VALUE if m.group(2) is None else json.loads(m.group(2))
        return renderer(m.group(1), value)
    return _REF.sub(sub, message)


def option_names(message: str) -> list[str]:
    """The option names a message refers to."""
    return [m.group(1) for m in _REF.finditer(message)]


class UfadError(Exception):
    """Base class of every error ufad raises for a user mistake or a bad file."""

    exit_code = 2

    @property
    def raw(self) -> str:
        """The message with its option references unrendered."""
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return render(self.raw)

    def render(self, renderer: Renderer) -> str:
        """The message with options spelt by ``renderer`` (the CLI passes its flags)."""
        return render(self.raw, renderer)


class InputError(UfadError, ValueError):
    """An input array or input file cannot be scored as given (shape, dtype, values, format)."""


class ModelFileError(UfadError):
    """The .onnx file is missing, unreadable, not a ufad detector, or fails its integrity check."""


class SignatureError(ModelFileError):
    """A signature was asked for and the file is unsigned, signed by another key, or forged."""


class OutputError(UfadError):
    """An output file cannot be written where it was asked for."""


class ProviderError(UfadError):
    """The requested onnxruntime execution provider is not available."""


class ExportError(UfadError):
    """The model, layers or data given to the exporter cannot produce a detector."""


class EvaluationError(UfadError):
    """An evaluation or benchmark run (``ufad eval``, ``ufad bench``) cannot go on."""


class DependencyError(UfadError):
    """An optional dependency needed for this operation is not installed."""


class ClusterError(UfadError):
    """A Ray cluster cannot be reached, or a distributed job cannot finish with every row."""


class FormatWarning(UserWarning):
    """A detector file loads but lacks a protection newer files have (format version 1)."""

"""Detectors register themselves and declare their options; nothing else lists them.

A detector is one class with ``method = "name"`` and ``options = (Option(...), ...)`` (its own
keyword arguments, beyond the ones every detector takes). Defining the class registers it
(``Detector.__init_subclass__``), so adding a detector means adding one file:

- under ``ufad/exporter/detectors/`` (every module there is imported), or
- in any installed package that declares an entry point in the group ``ufad.detectors``
  (``[project.entry-points."ufad.detectors"] mydet = "mypkg.mydet"``).

``ufad export`` builds ``--method`` and one flag per declared option from here, and refuses a
flag the chosen method does not declare.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ufad.runtime.errors import ExportError

ENTRY_POINT_GROUP = "ufad.detectors"


@dataclass(frozen=True)
class Option:
    """One keyword argument of a detector, as the CLI offers it (``--name-with-dashes``)."""

    name: str
    type: Any        # a click type: float, int, str, click.Choice([...])
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_REGISTRY: dict[str, type] = {}
_loaded = False


def register(cls: type) -> type:
    """Add a detector class under its ``method`` name (called by ``Detector.__init_subclass__``)."""
    other = _REGISTRY.get(cls.method)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ExportError(f"two detectors are named {cls.method!r}: {other.__module__}.{other.__qualname__} "
                          f"and {cls.__module__}.{cls.__qualname__}; rename one (its `method`).")
    _REGISTRY[cls.method] = cls
    return cls


def _load() -> None:
    global _loaded
    if _loaded:
        return
    from . import detectors

    for mod in pkgutil.iter_modules(detectors.__path__, detectors.__name__ + "."):
        importlib.import_module(mod.name)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # a broken plugin must not take the built-in detectors down
            raise ExportError(f"the detector plugin {ep.name!r} ({ep.value}) failed to load: "
                              f"{type(e).__name__}: {e}") from e
    _loaded = True


def detectors() -> dict[str, type]:
    """Every registered detector, by method name, in their declared ``rank`` order."""
    _load()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (getattr(kv[1], "rank", 100), kv[0])))


def get(name: str) -> type:
    """The detector class registered as ``name`` (an ExportError lists the others)."""
    found = detectors().get(name)
    if found is None:
        raise ExportError(f"unknown method {name!r}; available: {sorted(detectors())}")
    return found


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every declared option by name, with the methods that take it (first declaration's help)."""
    out: dict[str, tuple[Option, list[str]]] = {}
    for method, cls in detectors().items():
        for o in cls.all_options():
            if o.name in out:
                out[o.name][1].append(method)
            else:
                out[o.name] = (o, [method])
    return out

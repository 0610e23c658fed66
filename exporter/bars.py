"""Judge a result dict against bars read from a file (``--bars tools/bars.json``): the library
measures, the project's policy file says what passes."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ufad.runtime.errors import InputError, opt


@dataclass
class Bar:
    name: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    unit: str = ""

    @property
    def ok(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = self.ok
        return d


def load_bars(path: str | Path, section: str) -> Any:
    """``section`` (``"bench"`` or ``"eval"``) of a bars file."""
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"{opt('bars')} {p}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{opt('bars')} {p}: not valid JSON ({e})") from None
    if not isinstance(spec, dict) or section not in spec:
        raise InputError(f"{opt('bars')} {p}: expected a JSON object with a {section!r} section")
    return spec[section]


def lookup(result: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of ``result`` (None where it is absent)."""
    node: Any = result
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def judge(result: dict[str, Any], specs: list[dict[str, Any]]) -> list[Bar]:
    """One ``Bar`` per spec ``{name, value (dotted path), op, limit, unit, scale}``."""
    bars = []
    for s in specs:
        if s.get("op") not in ("<=", ">=") or "value" not in s or "limit" not in s:
            raise InputError(f"{opt('bars')}: each bar needs 'value', 'op' ('<=' or '>=') and 'limit', got {s}")
        v = lookup(result, s["value"])
        v = None if v is None else float(v) * float(s.get("scale", 1.0))
        bars.append(Bar(s.get("name", s["value"]), v, float(s["limit"]), s["op"], s.get("unit", "")))
    return bars

"""Which part of a model's output holds the logits.

Models return a tensor, a tuple / list, a dict, a NamedTuple, or a HuggingFace-style output
object (a dict subclass with attributes, e.g. ``ModelOutput``). ``logits=`` (CLI
``--logits``) names the part: an index for sequences, a key or attribute name otherwise.
Without it the choice is made only when it is unambiguous: the output itself when it is a
tensor, its ``logits`` entry when it has one, or its only 2-D floating tensor. Otherwise the
error lists what the model returned.
"""

from __future__ import annotations

from typing import Any

import torch

from ufad.runtime.errors import ExportError, opt

LogitsKey = int | str | None


def parse_key(text: str | int | None) -> LogitsKey:
    """``"0"`` -> 0, ``"logits"`` -> ``"logits"`` (the CLI passes text)."""
    if text is None or isinstance(text, int):
        return text
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _parts(out: Any) -> list[tuple[str | int, Any]]:
    """Named parts of a structured output, in order."""
    if isinstance(out, dict):
        return list(out.items())
    if isinstance(out, tuple) and hasattr(out, "_fields"):     # NamedTuple
        return list(zip(out._fields, out))
    if isinstance(out, (tuple, list)):
        return list(enumerate(out))
    return [(k, v) for k, v in vars(out).items() if isinstance(v, torch.Tensor)] if hasattr(out, "__dict__") else []


def describe(out: Any) -> str:
    """A short description of a model output, e.g. ``tuple(0: Tensor[8, 10], 1: Tensor[8, 64])``."""
    def one(v: Any) -> str:
        return f"Tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
    if isinstance(out, torch.Tensor):
        return one(out)
    parts = _parts(out)
    shown = ", ".join(f"{k}: {one(v)}" for k, v in parts[:12]) + (", ..." if len(parts) > 12 else "")
    return f"{type(out).__name__}({shown})"


def output_kind(logits: torch.Tensor) -> str:
    """What a model's "logits" are: ``"log_probabilities"`` (log_softmax: every row's logsumexp
    is 0), ``"probabilities"`` (softmax: rows of non-negative numbers summing to 1) or
    ``"logits"``. Told from a few rows (a few probe samples suffice: raw logits that happen to
    pass either test on every row are not a real case)."""
    x = logits.double()
    if not len(x):
        return "logits"
    if bool((torch.logsumexp(x, dim=1).abs() <= 1e-4).all()):
        return "log_probabilities"
    if bool((x >= 0).all()) and bool(((x.sum(dim=1) - 1).abs() <= 1e-4).all()):
        return "probabilities"
    return "logits"


def check_logits(logits: torch.Tensor) -> None:
    """Refuse logits that are not floating ``[B, classes]``, saying what to change."""
    shape = "[B" + "".join(f", {d}" for d in logits.shape[1:]) + "]"   # the probe's batch size means nothing to a user
    if logits.dim() > 2 and logits.is_floating_point() and all(d == 1 for d in logits.shape[2:]):
        raise ExportError(
            f"the model's logits have shape {shape} (a convolutional head); "
            "ufad needs them as [B, classes]: flatten them at the end of the model's "
            "forward (torch.flatten(out, 1)).")
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ExportError(
            f"the model's logits have shape {shape} ({logits.dtype}); "
            f"expected floating logits [B, classes]. If the model returns several "
            f"tensors, say which holds the logits with {opt('logits')}."
        )


def pick_logits(out: Any, key: LogitsKey = None) -> torch.Tensor:
    """The logits tensor of a model output (see the module docstring)."""
    if key is None and isinstance(out, torch.Tensor):
        return out
    parts = _parts(out)
    if key is not None:
        if isinstance(key, int):
            found = [out[key]] if isinstance(out, (tuple, list)) and -len(out) <= key < len(out) else []
        else:
            found = [v for k, v in parts if k == key]
            if not found and not isinstance(out, dict) and hasattr(out, key):
                found = [getattr(out, key)]
        if not found or not isinstance(found[0], torch.Tensor):
            raise ExportError(
                f"{opt('logits', key)} does not name a tensor of the model's output, which is "
                f"{describe(out)}; pass the index or key of the logits."
            )
        return found[0]
    named = [v for k, v in parts if k == "logits" and isinstance(v, torch.Tensor)]
    if not named and hasattr(out, "logits") and isinstance(getattr(out, "logits"), torch.Tensor):
        named = [out.logits]
    if named:
        return named[0]
    candidates = [(k, v) for k, v in parts if isinstance(v, torch.Tensor) and v.dim() == 2
                  and v.is_floating_point()]
    if len(candidates) == 1:
        return candidates[0][1]
    # Name every 2-D float candidate: suggesting only the first one sent users to a features
    # tensor returned before the logits ((features, logits) is a common pair).
    choices = [opt("logits", k) for k, _ in candidates[:6]] or [opt("logits", 0)]
    raise ExportError(
        f"the model returned {describe(out)}, not one logits tensor [B, classes]; say which part "
        f"holds the logits with {' or '.join(choices)}."
    )

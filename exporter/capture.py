"""Capture the activations of named modules of a PyTorch model with forward hooks.

The same capture runs eagerly (fitting, the torch reference) and under ``torch.onnx.export``
(non-strict tracing runs the hooks as plain Python), so both see the same tensors.

Besides module names, ``layers`` may hold ``SOFTMAX`` (``"@sqrt_softmax"``): the classifier's
output distribution as ``sqrt(softmax(logits))`` (its Hellinger embedding: Euclidean distance
there is the Hellinger distance between output distributions, and near-zero probabilities
keep a usable spread, so its region is not numerically degenerate). It is not a module (most
models return logits), so it is computed from the logits rather than hooked; ``@`` cannot
start a module name, so it never collides with one.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ufad.runtime.errors import ExportError

from .reductions import REDUCTIONS, reduce


SOFTMAX = "@sqrt_softmax"


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule of ``model`` (the names ``layers=`` accepts, with ``SOFTMAX``)."""
    return [n for n, _ in model.named_modules() if n]


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> list[nn.Module | None]:
    """Look up modules by name (None for ``SOFTMAX``); unknown names raise an ExportError
    listing the valid ones."""
    modules = dict(model.named_modules())
    unknown = [l for l in layers if l != SOFTMAX and (l not in modules or not l)]
    if unknown:
        valid = module_names(model)
        shown = ", ".join(valid[:60]) + (" ..." if len(valid) > 60 else "")
        raise ExportError(f"unknown layer name(s) {unknown}. Valid module names: {shown} "
                          f"(and {SOFTMAX!r}, sqrt(softmax(logits)))")
    if len(set(layers)) != len(layers):
        raise ExportError(f"layer names must be unique, got {list(layers)}")
    return [None if l == SOFTMAX else modules[l] for l in layers]


def run_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, with a failure on the data (typically a wrong input shape) turned into
    an ExportError that says what was passed."""
    try:
        return model(x)
    except ExportError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise ExportError(
            f"the model fails on a data batch of shape {tuple(x.shape)} "
            f"({type(e).__name__}: {msg[0][:300] if msg else ''}); pass data shaped like the "
            "model's training input, [N, C, H, W] for a CNN."
        ) from e


def default_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """A sensible default: the output of each top-level block that yields a feature map,
    plus the penultimate top-level module (the one feeding the final classifier).

    Decided by a probe forward pass on ``example`` (e.g. the first batch).
    """
    root = model
    prefix = ""
    children = list(root.named_children())
    # Descend through single wrappers (e.g. a model that is one Sequential).
    while len(children) == 1:
        prefix += children[0][0] + "."
        root = children[0][1]
        children = list(root.named_children())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in children:
        def hook(_m, _i, out, name=name):
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape)
        hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    called = [n for n, _ in children if n in shapes]
    if len(called) < 2:
        raise ExportError(
            "could not pick default layers: the model has fewer than two top-level modules "
            "that return tensors. Pass layers=[...] explicitly (see `module_names(model)`)."
        )
    mods = dict(children)
    passthrough = (nn.Dropout, nn.Identity, nn.Flatten)
    maps = [n for n in called[:-1] if len(shapes[n]) == 4]
    vectors = [n for n in called[:-1] if len(shapes[n]) == 2 and shapes[n][1] > 1
               and not isinstance(mods[n], passthrough)]
    chosen = maps + vectors[-1:]
    if not chosen:
        chosen = called[-2:-1]
    return [prefix + n for n in chosen]


class ActivationCapture:
    """Registers forward hooks on ``layers`` and keeps their reduced outputs of the last call.

    Use ``capture.collect(logits)`` after a forward pass; the list follows the order of
    ``layers`` (``SOFTMAX`` is computed from ``logits``).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], reduction: str = "max"):
        if reduction not in REDUCTIONS:
            raise ExportError(f"unknown reduction {reduction!r}; choose one of {sorted(REDUCTIONS)}")
        self.layers = list(layers)
        self.reduction = reduction
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, mod in zip(self.layers, resolve_layers(model, self.layers)):
            if mod is not None:
                self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor):
                raise ExportError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; monitor a "
                    "module whose output is a single tensor (e.g. a submodule of it)."
                )
            if output.dim() not in (2, 3, 4, 5):
                raise ExportError(
                    f"layer {name!r} returns a tensor of shape {tuple(output.shape)}; expected "
                    "[B, D] or a feature map [B, C, ...]."
                )
            self._out[name] = reduce(output, self.reduction)
        return hook

    def collect(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """The reduced activations of the last forward pass, in ``layers`` order."""
        missing = [l for l in self.layers if l != SOFTMAX and l not in self._out]
        if missing:
            raise ExportError(
                f"layer(s) {missing} were not called during the forward pass; monitor modules "
                "that the model's forward() actually runs."
            )
        return [torch.sqrt(torch.softmax(logits.float(), dim=1)) if l == SOFTMAX else self._out[l]
                for l in self.layers]

    def clear(self) -> None:
        self._out.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

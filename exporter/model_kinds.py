"""Which kinds of ``nn.Module`` ufad can fit and export, checked before anything runs.

ufad hooks the eager model's modules (taps) and exports it with ``torch.export``. A
``torch.compile`` wrapper runs its forward without those hooks, so the eager module inside it
is used instead (same weights); TorchScript and quantized modules support neither hooks nor
``torch.export`` and are refused with what to pass instead.

A ``torch.export`` program and a ``torch.fx`` graph are turned into modules whose layers run
again by ``graph_models.py``.
"""

from __future__ import annotations

from torch import nn

from ufad.runtime.errors import ExportError, capped

from .graph_models import is_exported_program, unflattened, with_scope_calls

#: the name prefix torch.compile gives the wrapped model's modules (``_orig_mod.layer1``)
COMPILED_PREFIX = "_orig_mod."
_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``), told by name so torch._dynamo is not imported."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def eager_model(model: object) -> nn.Module:
    """``model`` as ufad fits it: the eager module inside a ``torch.compile`` wrapper, the
    module tree of a ``torch.export`` program, or ``model`` itself; an ExportError for what
    cannot be hooked or exported."""
    if is_exported_program(model):
        return unflattened(model)
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while is_compiled(model):
        model = model._orig_mod
    import torch

    if isinstance(model, torch.fx.GraphModule):
        if hasattr(model, "_in_spec") and hasattr(model, "_out_spec"):
            raise ExportError(
                "the model is the .module() of a torch.export program: one flat graph whose layers are not modules "
                "that run, so ufad cannot tap them (and it cannot be put in eval mode). Pass the ExportedProgram "
                "itself (what torch.export.export or torch.export.load returns): ufad rebuilds its layers with "
                "torch.export.unflatten.")
        model = with_scope_calls(model)

    scripted = _outermost(n for n, m in model.named_modules() if isinstance(m, torch.jit.ScriptModule))
    if scripted:
        what = ("the model is a TorchScript module" if scripted == ["(the model)"]
                else f"the model holds TorchScript modules ({capped(scripted, 4)})")
        raise ExportError(
            f"{what}, made by torch.jit.script or torch.jit.trace. ufad taps the layers of an eager model and exports it with torch.export, "
            "which TorchScript supports neither; pass the nn.Module before scripting, with its weights.")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if type(m).__module__.startswith(_QUANTIZED)}
    quantized = [f"{n}: {kinds.get(n if n != '(the model)' else '', '')}" for n in _outermost(kinds)]
    if quantized:
        raise ExportError(
            f"the model holds quantized modules ({capped(quantized, 4)}); torch.export cannot export them "
            "to ONNX. Fit and export the float32 model (before quantize_dynamic / convert): the detector "
            "is fitted on its activations and the file is float32.")
    return model


def eager_layer_name(name: str) -> str:
    """A layer name as the eager model spells it (``_orig_mod.layer1`` -> ``layer1``); what is
    not a string is left for the layer checks to refuse."""
    while isinstance(name, str) and name.startswith(COMPILED_PREFIX):
        name = name[len(COMPILED_PREFIX):]
    return name


def _outermost(names) -> list[str]:
    """``names`` without those inside another one (``fc._packed_params`` when ``fc`` is listed)."""
    kept: list[str] = []
    for n in names:
        if n == "":
            return ["(the model)"]
        if not any(n.startswith(k + ".") for k in kept):
            kept.append(n)
    return kept

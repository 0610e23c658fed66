"""Which kinds of ``nn.Module`` ufad can fit and export, checked before anything runs.

ufad hooks the eager model's modules (taps) and exports it with ``torch.export``. A
``torch.compile`` wrapper runs its forward without those hooks, so the eager module inside it
is used instead (same weights); TorchScript and quantized modules support neither hooks nor
``torch.export`` and are refused with what to pass instead.

A ``torch.export`` program (``torch.export.export(...)`` or ``torch.export.load(path)``: a
model shipped without its Python code) is one flat graph: its layers are not modules that run.
``torch.export.unflatten`` rebuilds the module tree, each submodule running its own part of
the graph, so hooks see every layer again; the original classes are read from the graph's
``nn_module_stack`` and kept as ``module_type`` for the choice of taps. Its ``.module()`` is
refused (flat, and it cannot be put in eval mode), saying to pass the program itself.
"""

from __future__ import annotations

import warnings

from torch import nn

from ufad.runtime.errors import ExportError, capped

#: the name prefix torch.compile gives the wrapped model's modules (``_orig_mod.layer1``)
COMPILED_PREFIX = "_orig_mod."
_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper (``OptimizedModule``), told by name so torch._dynamo is not imported."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def is_exported_program(model: object) -> bool:
    """A ``torch.export.ExportedProgram``, told by name so torch.export is not imported for
    every model."""
    return type(model).__name__ == "ExportedProgram" and hasattr(model, "graph_module")


def module_type(module: nn.Module) -> type:
    """The class a module stands for: its own, or, for a submodule of an unflattened
    ``torch.export`` program (an ``InterpreterModule``), the class the program was exported from."""
    return getattr(module, UNFLATTENED_TYPE, None) or type(module)


def is_a(module: nn.Module, types: type | tuple[type, ...]) -> bool:
    """``isinstance`` by ``module_type``: what the tap choice asks of every module."""
    return issubclass(module_type(module), types)


def eager_model(model: object) -> nn.Module:
    """``model`` as ufad fits it: the eager module inside a ``torch.compile`` wrapper, the
    module tree of a ``torch.export`` program, or ``model`` itself; an ExportError for what
    cannot be hooked or exported."""
    if is_exported_program(model):
        return _unflattened(model)
    if not isinstance(model, nn.Module):
        raise ExportError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    while is_compiled(model):
        model = model._orig_mod
    import torch

    if isinstance(model, torch.fx.GraphModule) and hasattr(model, "_in_spec") and hasattr(model, "_out_spec"):
        raise ExportError(
            "the model is the .module() of a torch.export program: one flat graph whose layers are not modules "
            "that run, so ufad cannot tap them (and it cannot be put in eval mode). Pass the ExportedProgram "
            "itself (what torch.export.export or torch.export.load returns): ufad rebuilds its layers with "
            "torch.export.unflatten.")

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


#: where an unflattened program's submodule keeps the class it was exported from
UNFLATTENED_TYPE = "_ufad_exported_type"
_TRAINING_OPS = ("dropout", "batch_norm")


def _unflattened(program) -> nn.Module:
    """``torch.export.unflatten(program)`` in eval mode, each submodule tagged with its
    original class; a program exported in training mode is refused."""
    import torch

    graph = program.graph_module.graph
    training = sorted({str(n.target) for n in graph.nodes if n.op == "call_function" and _trains(n)})
    if training:
        raise ExportError(
            f"the torch.export program was exported in training mode ({capped(training, 4)}: dropout / "
            "batch-norm statistics would make activations random); export it again after model.eval().")
    classes: dict[str, str] = {}
    for n in graph.nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            classes.setdefault(path, cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
    try:
        with warnings.catch_warnings():   # torch's own deprecation notices about its tree specs
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.export.unflatten(program)
    except Exception as e:   # torch's own refusal: say what failed, in one line
        raise ExportError(f"torch.export.unflatten could not rebuild the program's layers "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    for name, m in model.named_modules():
        cls = _loaded_class(classes.get(name, ""))
        if cls is not None:
            object.__setattr__(m, UNFLATTENED_TYPE, cls)
    return model.eval()


def _loaded_class(path: str) -> type | None:
    """The ``nn.Module`` class named ``module.Class``, from modules already imported only (the
    names come from the program's file: reading one must not import anything)."""
    import sys

    mod, _, name = path.rpartition(".")
    obj = getattr(sys.modules[mod], name, None) if mod in sys.modules else None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def _trains(node) -> bool:
    """A dropout or batch-norm node of the training mode (its ``train`` / ``training`` flag set)."""
    name = str(node.target)
    if "_no_training" in name or not any(op in name for op in _TRAINING_OPS):
        return False
    if "_native_batch_norm_legit_functional" in name or "native_dropout" in name:
        return True
    flag = node.kwargs.get("train", node.kwargs.get("training"))
    if flag is None:
        flags = [a for a in node.args if isinstance(a, bool)]
        flag = flags[0] if flags else False
    return bool(flag)


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

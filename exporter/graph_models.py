"""Models given as graphs: a ``torch.export`` program and a ``torch.fx`` ``GraphModule``, made
into modules whose layers run as modules again, so that ufad's hooks see them.

- A ``torch.export`` program (``torch.export.export(...)`` or ``torch.export.load(path)``: a
  model shipped without its Python code) is one flat graph. ``torch.export.unflatten``
  rebuilds the module tree, each submodule running its own part of the graph; the original
  classes are read from the graph's ``nn_module_stack`` and kept as ``module_type`` for the
  choice of taps (the rebuilt submodules are all ``InterpreterModule``).
- A ``torch.fx`` graph (``torch.fx.symbolic_trace``) calls its leaf layers (Conv2d, Linear)
  as modules but inlines every container: a ResNet stage or a Sequential block never runs as
  a module, so only leaves could be tapped. ``with_scope_calls`` adds, after the last node of
  each container's scope, a call of that container as an identity, so its hook sees the
  container's output (the class is kept: an identity subclass of it).
"""

from __future__ import annotations

import copy
import sys
import warnings

from torch import nn

from ufad.runtime.errors import ExportError, capped


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


#: where an unflattened program's submodule keeps the class it was exported from
UNFLATTENED_TYPE = "_ufad_exported_type"
_TRAINING_OPS = ("dropout", "batch_norm")


def unflattened(program) -> nn.Module:
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


def with_scope_calls(gm: nn.Module) -> nn.Module:
    """A copy of the fx ``GraphModule`` ``gm`` in which every container module that the graph
    inlines is called, as an identity, on its scope's last value (``nn_module_stack``); ``gm``
    itself when there is none to add (already done, or a graph without that metadata)."""
    graph = gm.graph
    called = {n.target for n in graph.nodes if n.op == "call_module"}
    last: dict[str, object] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        for path, _ in (n.meta.get("nn_module_stack") or {}).values():
            if path and path not in called:
                last[path] = n
    if not last:
        return gm
    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    # Outer scopes first: each insertion goes right after the scope's last node, so an inner
    # scope ending at the same node is called before the outer one, as in the eager model.
    for path in sorted(last, key=lambda p: p.count(".")):
        m = modules.get(path)
        if m is None:
            continue
        m.__class__ = _identity_class(type(m))
        node = nodes[last[path].name]
        with graph.inserting_after(node):
            call = graph.call_module(path, (node,))
        node.replace_all_uses_with(call, delete_user_cb=lambda user, call=call: user is not call)
    graph.lint()
    gm.recompile()
    return gm


_IDENTITIES: dict[type, type] = {}


def _identity_class(cls: type) -> type:
    """``cls`` with a forward that returns its input: a container that fx inlined, called on
    its own output so that hooks on it fire; still an instance of ``cls`` for the tap choice."""
    if getattr(cls, "_ufad_scope_identity", False):
        return cls
    if cls not in _IDENTITIES:
        _IDENTITIES[cls] = type(cls.__name__, (cls,), {
            "forward": lambda self, x: x, "_ufad_scope_identity": True,
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return _IDENTITIES[cls]

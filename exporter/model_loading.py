"""Load a user's model from ``package.module:factory`` plus optional weights, safely.

``package.module:factory`` IMPORTS AND RUNS that user code (it is how the model class is
defined); only point it at code you trust. Weights are never unpickled: ``.safetensors``
files load through safetensors, ``.pt``/``.pth`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import collections
import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from ufad.runtime.errors import ExportError

from .graph_models import is_exported_program
from .model_kinds import eager_model


def load_factory(spec: str) -> nn.Module:
    """Import ``module:callable`` (cwd is importable) and call it; returns an nn.Module (a
    ``torch.export`` program's module tree when it returns one, ``model_kinds.eager_model``)."""
    if ":" not in spec:
        raise ExportError(f"model {spec!r} must look like package.module:factory, e.g. ufad.models.mnist_cnn:pretrained")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    if not mod_name or mod_name.startswith(".") or not attr:
        raise ExportError(f"model {spec!r} must look like package.module:factory (absolute module name and a factory name)")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ExportError(f"cannot import module {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    except Exception as e:  # the user's module itself is broken (SyntaxError, its own errors)
        raise ExportError(f"importing {mod_name!r} failed: {type(e).__name__}: {e}") from e
    fn = getattr(module, attr, None)
    if fn is None:
        raise ExportError(f"module {mod_name!r} has no attribute {attr!r}")
    try:
        model = fn() if callable(fn) and not isinstance(fn, nn.Module) else fn
    except Exception as e:
        raise ExportError(f"{spec}() raised {type(e).__name__}: {e}") from e
    if is_exported_program(model):   # a torch.export program: its layers, rebuilt as modules
        return eager_model(model)
    if not isinstance(model, nn.Module):
        raise ExportError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module "
                          "or a torch.export program")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from ``.safetensors`` or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(
            f"cannot load weights from {path} safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "Save them with safetensors or torch.save(model.state_dict()) (no pickled objects)."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = getattr(model.state_dict(), "_metadata", None)
    if isinstance(state, dict) and own is not None and getattr(state, "_metadata", None) is None:
        # safetensors keeps tensors only, not the per-module versions torch.save writes; modules
        # that migrate old checkpoints by version (torchvision's MNASNet) refuse a state without
        # one. The weights were made by this code, so its own versions are the right ones.
        state = collections.OrderedDict(state)
        state._metadata = own
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError) as e:
        # torch puts the useful part (missing keys, size mismatch) after the first line
        raise ExportError(f"weights in {path} do not fit the model: {' '.join(str(e).split())[:400]}") from None
    return model

"""Edit detector files the way a person (or an attacker) with the onnx package would."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import onnx


def with_metadata(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Re-save ``src`` with its metadata dict edited by ``edit`` (graph bytes untouched)."""
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    edit(meta)
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst


def with_model(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], None]) -> Path:
    """Re-save ``src`` after ``edit`` changed the loaded ModelProto in place."""
    model = onnx.load(str(src))
    edit(model)
    onnx.save(model, str(dst))
    return dst

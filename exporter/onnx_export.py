"""Turn a fitted detector into ONE verified, self-contained .onnx file.

Steps: torch.onnx.export (dynamo, dynamic batch) of the DetectorModule -> the threshold
input gets its calibrated default as an initializer -> metadata_props -> onnx full check ->
onnxruntime vs torch reference parity -> optional onnxsim pass, kept only if verified ->
atomic write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ufad.runtime import format as fmt
from ufad.runtime.errors import ExportError

PARITY_RTOL = 1e-4
TWO_GB = 2 ** 31


@dataclass
class ExportReport:
    """What ``export`` produced and verified."""

    path: Path
    size_bytes: int
    parity_max_rel_diff: float
    parity_samples: int
    simplified: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


def _versions() -> dict[str, str]:
    import onnx

    out = {"torch": torch.__version__, "onnx": onnx.__version__}
    try:
        from importlib.metadata import version

        out["ufad"] = version("ufad")
        out["onnxscript"] = version("onnxscript")
    except Exception:
        pass
    return out


def _default_check_inputs(det, n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(det.seed)
    lo, hi = det.input_range or (0.0, 1.0)
    return rng.uniform(lo, hi, size=(n, *det.input_shape)).astype(np.float32)


def _torch_export(module, example: torch.Tensor, names: list[str], verbose: bool):
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    thr = torch.tensor(0.0, dtype=torch.float32)
    sink = io.StringIO()
    # torch's exporter logs optional-registry warnings (e.g. "torchvision is not installed").
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(sink)
    try:
        with warnings.catch_warnings(), redirect:
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example, thr), f=None, input_names=["input", fmt.INPUT_THRESHOLD],
                output_names=names, dynamic_shapes=({0: batch}, None), dynamo=True,
                external_data=False, optimize=True, verbose=verbose,
            )
    except ExportError:
        raise
    except Exception as e:  # torch's own messages are long; keep the gist and the hint
        msg = str(e).strip().splitlines()
        raise ExportError(
            f"torch.onnx.export failed: {type(e).__name__}: {msg[0] if msg else ''}. "
            "The model's forward must be traceable by torch.export (no data-dependent Python "
            "control flow on tensor values). Run with verbose=True for the full log."
        ) from e
    model = program.model_proto
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_from_string(model.SerializeToString())
    return model


def _set_threshold_default(model, threshold: float) -> None:
    """Give the optional ``threshold`` input its calibrated default (an initializer of the
    same name, which onnxruntime uses unless the caller feeds the input)."""
    from onnx import numpy_helper

    g = model.graph
    for init in list(g.initializer):
        if init.name == fmt.INPUT_THRESHOLD:
            g.initializer.remove(init)
    value = np.array(threshold if np.isfinite(threshold) else np.finfo(np.float32).max, np.float32)
    g.initializer.append(numpy_helper.from_array(value, fmt.INPUT_THRESHOLD))


def _set_metadata(model, meta: dict[str, Any]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key = k
        entry.value = v if isinstance(v, str) else json.dumps(v)


def _ort_outputs(model_bytes: bytes, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(x), 256):
        outs.append(sess.run(names, {"input": x[i:i + 256]}))
    return {n: np.concatenate([o[k] for o in outs]) for k, n in enumerate(names)}


def parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], threshold: float) -> float:
    """Max relative difference of the float outputs, ``|a - b| / max(1, |b|)``; raises
    ExportError when pred / is_anomaly disagree beyond what float ties explain."""
    worst = 0.0
    for name, ref in reference.items():
        out = got[name]
        if ref.shape != out.shape:
            raise ExportError(f"parity: output {name!r} has shape {out.shape}, torch gives {ref.shape}")
        if ref.dtype.kind == "f":
            both_inf = np.isinf(ref) & (ref == out)
            d = np.abs(ref.astype(np.float64) - out) / np.maximum(1.0, np.abs(ref))
            d = np.where(both_inf, 0.0, d)
            worst = max(worst, float(np.nanmax(d)) if d.size else 0.0)
    score = reference[fmt.OUT_SCORE]
    near = np.abs(score - threshold) <= PARITY_RTOL * np.maximum(1.0, np.abs(score))
    bad = (reference[fmt.OUT_IS_ANOMALY] != got[fmt.OUT_IS_ANOMALY]) & ~near
    if bad.any():
        raise ExportError(f"parity: is_anomaly differs on {int(bad.sum())} inputs between torch and onnxruntime")
    logits = reference[fmt.OUT_LOGITS]
    top2 = np.sort(logits, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) <= 1e-4 * np.maximum(1.0, np.abs(top2[:, 1]))
    bad = (reference[fmt.OUT_PRED] != got[fmt.OUT_PRED]) & ~tie
    if bad.any():
        raise ExportError(f"parity: pred differs on {int(bad.sum())} inputs between torch and onnxruntime")
    return worst


def _verify(model_bytes: bytes, det, check_x: np.ndarray, reference: dict[str, np.ndarray]) -> float:
    got = _ort_outputs(model_bytes, check_x, list(reference))
    worst = parity(reference, got, det.threshold)
    if worst > PARITY_RTOL:
        raise ExportError(
            f"parity: onnxruntime and the torch reference differ by {worst:.3g} (relative) "
            f"> {PARITY_RTOL}; the export is numerically wrong and was not written."
        )
    return worst


def _finalize(model, det, meta: dict[str, Any]) -> bytes:
    import onnx

    _set_threshold_default(model, det.threshold)
    model.doc_string = "ufad anomaly detector: " + fmt.SCORE_CONVENTION
    _set_metadata(model, {})
    graph_hash = fmt.graph_sha256(model.SerializeToString())
    meta = dict(meta)
    meta[fmt.KEY_GRAPH_SHA256] = graph_hash
    _set_metadata(model, meta)
    data = model.SerializeToString()
    if fmt.graph_sha256(data) != graph_hash:  # metadata must not move graph bytes
        raise ExportError("internal: graph hash changed after adding metadata")
    if len(data) >= TWO_GB:
        raise ExportError("the detector is over 2 GB; lower max_points or monitor fewer layers.")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    return data


def export_detector(det, path: Path, *, example=None, simplify: bool = False,
                    check_inputs=None, verbose: bool = False) -> ExportReport:
    """Export, verify and write ``det`` to ``path`` (see module docstring)."""
    t0 = time.time()
    notes: list[str] = []
    check_x = np.ascontiguousarray(
        _default_check_inputs(det) if check_inputs is None else np.asarray(check_inputs, np.float32))
    if example is None:
        example = check_x[:2] if len(check_x) >= 2 else np.repeat(check_x, 2, axis=0)
    example = torch.as_tensor(np.asarray(example, np.float32))
    reference = det.score(check_x)
    names = det.output_names()
    module = det.module()
    try:
        model = _torch_export(module, example, names, verbose)
    finally:
        module.capture.remove()
    got = [o.name for o in model.graph.output]
    if got != names:
        raise ExportError(f"internal: exported outputs {got} != expected {names}")

    meta: dict[str, Any] = {fmt.KEY_FORMAT_VERSION: str(fmt.FORMAT_VERSION)}
    meta.update(det.metadata())
    meta[fmt.KEY_PRODUCER] = _versions()
    meta[fmt.KEY_CONVENTION] = fmt.SCORE_CONVENTION
    data = _finalize(model, det, meta)
    worst = _verify(data, det, check_x, reference)
    simplified = False
    if simplify:
        try:
            import onnxsim

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                simp, ok = onnxsim.simplify(model)
            if ok:
                simp_data = _finalize(simp, det, meta)
                worst_s = _verify(simp_data, det, check_x, reference)
                data, worst, simplified = simp_data, max(worst, worst_s), True
            else:
                notes.append("onnxsim could not validate its result; kept the unsimplified graph")
        except ImportError:
            notes.append("onnxsim is not installed (pip install 'ufad[simplify]'); not simplified")
        except ExportError as e:
            notes.append(f"simplified graph failed verification ({e}); kept the unsimplified graph")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return ExportReport(path=path, size_bytes=len(data), parity_max_rel_diff=worst,
                        parity_samples=len(check_x), simplified=simplified,
                        seconds=time.time() - t0, notes=notes)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

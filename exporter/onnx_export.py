"""Turn a fitted detector into ONE verified, self-contained .onnx file.

Steps: torch.onnx.export (dynamo, dynamic batch) of the DetectorModule -> the threshold
input gets its calibrated default as an initializer -> metadata_props -> onnx full check ->
onnxruntime vs torch reference parity -> optional onnxsim pass, kept only if verified ->
atomic write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ufad.runtime import format as fmt
from ufad.runtime import integrity
from ufad.runtime.files import write_atomically
from ufad.runtime.errors import ExportError, opt

from .data import Rows, as_input, input_array

PARITY_RTOL = 1e-4
NOISE_FACTOR = 10   # tolerance on the noise check inputs, relative to PARITY_RTOL
N_NOISE_CHECK = 32
TWO_GB = 2 ** 31


@dataclass
class ExportReport:
    """What ``export`` produced and verified."""

    path: Path
    size_bytes: int
    parity_max_rel_diff: float       # on the held-out ID check inputs
    parity_samples: int
    simplified: bool
    seconds: float
    notes: list[str] = field(default_factory=list)
    parity_noise_max_rel_diff: float = 0.0   # on the noise check inputs
    #: the torch reference's own float32 error on the ID check inputs (vs the model in float64;
    #: 0 when it cannot run in float64): the parity bar is parity_rtol + 4x this
    model_float32_error: float = 0.0


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
    if det.input_dtype == "int64":   # random ids over the ids seen at fit
        return rng.integers(int(lo), int(hi), size=(n, *det.input_shape), endpoint=True, dtype=np.int64)
    return rng.uniform(lo, hi, size=(n, *det.input_shape)).astype(np.float32)


@contextlib.contextmanager
def quiet_torch_export(verbose: bool = False):
    """Around ``torch.onnx.export``: its loggers, warnings and stdout, silenced unless
    ``verbose`` (it logs optional-registry warnings such as "torchvision is not installed")."""
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    redirect = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), redirect:
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _torchlib_registry_built_once():
    """Around ``torch.onnx.export``: its table of ATen -> ONNX functions built once per
    process and opset. torch rebuilds it on every call (~1.1 s of a ~4 s export; pinned torch
    2.13); the table is only read when no ``custom_translation_table`` is given, as here.
    Without the private hook (another torch) this does nothing."""
    try:
        from torch.onnx._internal.exporter import _registration

        cls = _registration.ONNXRegistry
        build = cls.__dict__["from_torchlib"].__func__
    except (ImportError, AttributeError, KeyError):
        yield
        return
    # An export in another thread may have its wrapper in place: wrap (and restore) torch's own.
    build = getattr(build, "_ufad_original", build)

    def cached(klass, opset_version=_registration._constants.TORCHLIB_OPSET):
        key = (klass, opset_version)
        if key not in _REGISTRIES:
            _REGISTRIES[key] = build(klass, opset_version)
        return _REGISTRIES[key]

    cached._ufad_original = build
    cls.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        cls.from_torchlib = classmethod(build)


_REGISTRIES: dict = {}


def _torch_export(module, example: torch.Tensor, names: list[str], verbose: bool):
    import onnx

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    thr = torch.tensor(0.0, dtype=torch.float32)
    try:
        with quiet_torch_export(verbose), _torchlib_registry_built_once():
            program = torch.onnx.export(
                module, (example, thr), f=None, input_names=["input", fmt.INPUT_THRESHOLD],
                output_names=names, dynamic_shapes=({0: batch}, None), dynamo=True,
                external_data=False, optimize=True, verbose=verbose,
            )
    except ExportError:
        raise
    except Exception as e:  # torch's own messages are long; keep the gist and the hint
        raise ExportError(
            f"torch.onnx.export failed: {_gist(e)}. "
            "The model's forward must be traceable by torch.export (typically: no Python control "
            f"flow on tensor values). Pass {opt('verbose', True)} for torch's full log."
        ) from e
    model = program.model_proto
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load_from_string(model.SerializeToString())
    return model


def _gist(e: BaseException) -> str:
    """torch's error in one line: its first sentence, and the innermost cause it wraps (torch
    puts the real reason, e.g. an unsupported operator, at the end of a chain)."""
    def first(x: BaseException) -> str:
        lines = re.sub(r"\x1b\[[0-9;]*m", "", str(x)).strip().splitlines()   # torch colours its text
        line = lines[0] if lines else ""
        return f"{type(x).__name__}: {line.removesuffix('Next steps:').strip()[:300]}"
    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return first(e) if root is e else f"{first(e)} (cause: {first(root)})"


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


def _strip_debug_metadata(graph) -> None:
    """Drop the exporter's per-node debug metadata (stack traces with absolute source paths
    and per-process counters): it leaks build paths and makes the graph hash differ between
    two exports of identical statistics."""
    del graph.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_debug_metadata(attr.g)
            for sub in attr.graphs:
                _strip_debug_metadata(sub)


def _set_metadata(model, meta: dict[str, str]) -> None:
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)


def _ort_outputs(model_bytes: bytes, x: np.ndarray, names: list[str], chunk: int = 256) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    rows = Rows(len(x))
    for i in range(0, len(x), chunk):
        rows.add(sess.run(names, {"input": x[i:i + chunk]}))
    return dict(zip(names, rows.result()))


GLOBAL_POOLS = {"ReduceMean": "GlobalAveragePool", "ReduceMax": "GlobalMaxPool"}


def _spatial_means_as_global_pool(model) -> int:
    """Rewrite ``ReduceMean`` / ``ReduceMax`` over every spatial axis of a feature map (the
    ``mean`` / ``max`` reduction of a monitored conv layer) as ``GlobalAveragePool`` /
    ``GlobalMaxPool`` (+ ``Flatten``).

    Same math. onnxruntime runs GlobalAveragePool in its blocked (NCHWc) conv layout, so a
    monitored block's output is no longer reordered back to NCHW just to be averaged (a
    full copy of the feature map per monitored layer). Returns the number of rewrites.
    """
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return 0
    ranks = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
            ranks[v.name] = len(v.type.tensor_type.shape.dim)
    nodes, count = [], 0
    for n in g.node:
        rank = ranks.get(n.input[0]) if n.input else None
        attrs = {a.name: a.i for a in n.attribute}
        axes = consts.get(n.input[1]) if n.op_type in GLOBAL_POOLS and len(n.input) == 2 else None
        if (n.domain in ("", "ai.onnx") and axes is not None and rank is not None and rank >= 3
                and sorted(int(a) % rank for a in np.ravel(axes)) == list(range(2, rank))
                and not attrs.get("noop_with_empty_axes", 0)):
            pooled = n.output[0] + "__gap" if attrs.get("keepdims", 1) == 0 else n.output[0]
            nodes.append(helper.make_node(GLOBAL_POOLS[n.op_type], [n.input[0]], [pooled], name=n.name + "__gap"))
            if pooled != n.output[0]:
                nodes.append(helper.make_node("Flatten", [pooled], [n.output[0]], name=n.name + "__flat", axis=1))
            count += 1
        else:
            nodes.append(n)
    if count:
        del g.node[:]
        g.node.extend(nodes)
        used = {i for n in _all_nodes(g) for i in n.input}
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)   # the rewritten nodes' axes
    return count


def _all_nodes(graph):
    """Every node of ``graph`` and of its subgraphs (If / Loop bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g.node:
                yield from _all_nodes(a.g)
            for sub in a.graphs:
                yield from _all_nodes(sub)


#: a correct float32 export may differ from the float32 reference by this many times the
#: reference's own float32 error (its distance to the same model run in float64): two float32
#: evaluations of one model each err by about that much, in different directions
FLOAT32_ERROR_FACTOR = 4


def _row_rel(a: np.ndarray, b: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per input: max |a - b| relative to that input's magnitude in ``ref``
    (``max(1, max |ref row|)``: a logit of 143 next to one of 0.1 is judged on the scale of 143);
    equal infinities count as equal."""
    r64 = ref.astype(np.float64)
    finite = np.where(np.isfinite(r64), np.abs(r64), 0.0)
    flat = lambda t: t.reshape(len(ref), -1)  # noqa: E731
    scale = np.maximum(1.0, flat(finite).max(axis=1))
    a64, b64 = flat(a.astype(np.float64)), flat(b.astype(np.float64))
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    d = np.where(same, 0.0, np.abs(a64 - b64))
    return np.nan_to_num(d, nan=np.inf).max(axis=1) / scale


def _own_error(ref: np.ndarray, exact: np.ndarray | None) -> float:
    """The float32 reference's own error on these inputs: its largest per-input distance to
    the float64 model's, relative to the input's magnitude (0 without a float64 run). Taken
    over all inputs, not per input: two float32 evaluations err independently, so where
    torch happens to land on the exact value onnxruntime need not."""
    if exact is None or not ref.size:
        return 0.0
    e = _row_rel(ref, exact, ref)
    e = e[np.isfinite(e)]
    return float(e.max()) if e.size else 0.0


def parity(reference: dict[str, np.ndarray], got: dict[str, np.ndarray], threshold: float,
           rtol: float = PARITY_RTOL, exact: dict[str, np.ndarray] | None = None,
           own: float = 0.0) -> tuple[float, float, float]:
    """Judge onnxruntime's outputs ``got`` against the float32 torch ``reference``.

    Per input and float output, the difference relative to the output's magnitude may reach
    ``rtol`` plus ``FLOAT32_ERROR_FACTOR`` x the reference's own float32 error on these
    inputs (the largest ``_own_error`` of its outputs), measured against ``exact`` (the same
    inputs through a float64 copy of the model, when it runs): a model whose float32 value is itself 3e-4 from its exact value is not exported wrongly
    when onnxruntime lands 2e-4 from torch. pred / is_anomaly must agree except where the
    margin (top-2 logit gap, distance to the threshold) is within that same tolerance.
    ``own``: an own error measured on more inputs (a few of them checked again one at a time
    keep the bound of the whole set). Returns (largest relative difference, largest excess
    over the tolerance, largest own float32 error); raises ExportError on a disagreement."""
    k = FLOAT32_ERROR_FACTOR
    floats = [n for n, ref in reference.items() if ref.dtype.kind == "f" and ref.size]
    for name, ref in reference.items():
        if ref.shape != got[name].shape:
            raise ExportError(f"parity: output {name!r} has shape {got[name].shape}, torch gives {ref.shape}")
    # One bound for the whole model: an output's own error may be small by luck of rounding
    # direction while the features it is computed from carry more (the score of a model whose
    # penultimate features are 3% off in float32 can land 0.1% from exact in torch, 0.6% in
    # onnxruntime).
    own = max([own] + [_own_error(reference[n], None if exact is None else exact[n]) for n in floats])
    worst = max([float(_row_rel(reference[n], got[n], reference[n]).max()) for n in floats], default=0.0)
    excess = worst - k * own
    score = reference[fmt.OUT_SCORE]
    near = np.abs(score - threshold) <= (rtol + k * own) * np.maximum(1.0, np.abs(score))
    bad = (reference[fmt.OUT_IS_ANOMALY] != got[fmt.OUT_IS_ANOMALY]) & ~near
    if bad.any():
        raise ExportError(f"parity: is_anomaly differs on {int(bad.sum())} inputs between torch and onnxruntime, "
                          "away from the threshold; the export is wrong and was not written.")
    logits = reference[fmt.OUT_LOGITS]
    top2 = np.sort(logits, axis=1)[:, -2:]      # two or more classes: refused at fit otherwise
    row_scale = np.maximum(1.0, np.abs(logits).max(axis=1))
    tie = (top2[:, 1] - top2[:, 0]) <= (rtol + 2 * k * own) * row_scale
    bad = (reference[fmt.OUT_PRED] != got[fmt.OUT_PRED]) & ~tie
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ExportError(
            f"parity: pred differs on {int(bad.sum())} inputs between torch and onnxruntime (input {i}: "
            f"top-2 logit gap {top2[i, 1] - top2[i, 0]:.3g}, logits differ by "
            f"{_row_rel(logits[i:i + 1], got[fmt.OUT_LOGITS][i:i + 1], logits[i:i + 1])[0]:.3g} of their "
            f"magnitude, the model's own float32 error on these inputs {own:.3g}); the export is wrong and was "
            f"not written. If this model is known to be this sensitive, pass a larger "
            f"{opt('parity_rtol')} (default {PARITY_RTOL})."
        )
    ok = reference.get(fmt.OUT_INPUT_OK)
    if ok is not None and (ok != got[fmt.OUT_INPUT_OK]).any():
        raise ExportError(f"parity: input_ok differs on {int((ok != got[fmt.OUT_INPUT_OK]).sum())} inputs between "
                          "torch and onnxruntime; the export is wrong and was not written.")
    return worst, excess, own


def _verify(model_bytes: bytes, det, check_x: np.ndarray, reference: dict[str, np.ndarray],
            n_id: int, rtol: float, exact: dict[str, np.ndarray] | None) -> tuple[float, float, float]:
    """(worst on the ID check inputs, worst on the noise ones, the model's own float32 error
    on the ID ones). Noise drives activations far beyond the data's, where float32
    differences between two correct kernels grow: it is held to ``NOISE_FACTOR`` x the
    tolerance, the verdicts to exact agreement."""
    got = _ort_outputs(model_bytes, check_x, list(reference))
    part = lambda d, s: None if d is None else {n: v[s] for n, v in d.items()}  # noqa: E731
    ids, noise = slice(0, n_id), slice(n_id, None)
    res_id = parity(part(reference, ids), part(got, ids), det.threshold, rtol, part(exact, ids))
    res_noise = (parity(part(reference, noise), part(got, noise), det.threshold, rtol * NOISE_FACTOR,
                        part(exact, noise)) if len(check_x) > n_id else (0.0, 0.0, 0.0))
    # Serving runs batches of one, where shapes that depend on the batch's content (the
    # uniform head's set of predicted classes) are smallest: check a few inputs one at a time.
    k = min(8, n_id)
    one = parity(part(reference, slice(0, k)), _ort_outputs(model_bytes, check_x[:k], list(reference), chunk=1),
                 det.threshold, rtol, part(exact, slice(0, k)), own=res_id[2])
    res_id = tuple(max(a, b) for a, b in zip(res_id, one))
    for (worst, excess, own), bar, what in ((res_id, rtol, "held-out ID inputs"),
                                            (res_noise, rtol * NOISE_FACTOR, "noise inputs")):
        if excess > bar:
            own_note = (f"; the model's own float32 error there (torch float32 vs float64) is {own:.3g}, "
                        f"and {FLOAT32_ERROR_FACTOR}x that is allowed on top" if exact is not None else
                        "; the model could not run in float64 to measure its own float32 error")
            raise ExportError(
                f"parity: onnxruntime and the torch reference differ by {worst:.3g} (relative to "
                f"each output's magnitude) on {what}, > {bar:.3g}{own_note}. The export is "
                f"numerically wrong and was not written. If this model is known to be this "
                f"sensitive, pass a larger {opt('parity_rtol')} (default {PARITY_RTOL})."
            )
    return res_id[0], res_noise[0], res_id[2]


def _finalize(model, det, info: fmt.FormatInfo) -> bytes:
    """The file's bytes: default threshold, format marker, metadata, both digests. The
    runtime's own ``FormatInfo.to_metadata`` and ``integrity.seal`` write them, so writer and
    reader cannot drift."""
    import onnx

    _set_threshold_default(model, det.threshold)
    model.doc_string = "ufad anomaly detector: " + fmt.SCORE_CONVENTION
    _strip_debug_metadata(model.graph)
    model.graph.doc_string = f"{integrity.GRAPH_MARKER}{fmt.FORMAT_VERSION}"
    info = dataclasses.replace(info, graph_sha256=hashlib.sha256(model.graph.SerializeToString()).hexdigest())
    meta = info.to_metadata()
    _set_metadata(model, meta)
    data = integrity.seal(model.SerializeToString())
    parts = integrity.read_parts(data)
    if parts.graph_sha256 != meta[fmt.KEY_GRAPH_SHA256]:  # the graph must serialize the same inside the model
        raise ExportError("internal: graph hash changed after adding metadata")
    if len(data) >= TWO_GB:
        raise ExportError(f"the detector is over 2 GB; lower {opt('max_points')} or monitor fewer layers.")
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except Exception as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    return data


def export_detector(det, path: Path, *, example=None, simplify: bool = False,
                    check_inputs=None, parity_rtol: float = PARITY_RTOL, verbose: bool = False) -> ExportReport:
    """Export, verify and write ``det`` to ``path`` (see module docstring)."""
    t0 = time.time()
    notes: list[str] = []
    if not parity_rtol > 0:
        raise ExportError(f"{opt('parity_rtol')} must be > 0, got {parity_rtol}")
    id_x = check_inputs if check_inputs is not None else det.check_sample
    noise = _default_check_inputs(det, N_NOISE_CHECK)
    id_x = noise if id_x is None else input_array(id_x)
    if id_x.dtype != noise.dtype:
        raise ExportError(f"the parity check's inputs are {id_x.dtype} but the detector was fitted on "
                          f"{noise.dtype} data; pass check inputs of the fitting data's type.")
    check_x = np.ascontiguousarray(np.concatenate([id_x, noise]))
    n_id = len(id_x)
    if example is None:
        example = check_x[:2] if len(check_x) >= 2 else np.repeat(check_x, 2, axis=0)
    example = as_input(example)
    reference = det.score(check_x)
    exact = det.score_float64_model(check_x)
    if exact is None:
        notes.append("the model does not run in float64: parity judged against the float32 reference alone")
    names = det.output_names()
    module = det.module()
    try:
        model = _torch_export(module, example, names, verbose)
    finally:
        module.capture.remove()
    _spatial_means_as_global_pool(model)
    got = [o.name for o in model.graph.output]
    if got != names:
        raise ExportError(f"internal: exported outputs {got} != expected {names}")

    info = det.format_info(producer=_versions())
    data = _finalize(model, det, info)
    worst, worst_noise, own = _verify(data, det, check_x, reference, n_id, parity_rtol, exact)
    simplified = False
    if simplify:
        try:
            import onnxsim

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                simp, ok = onnxsim.simplify(model)
            if ok:
                simp_data = _finalize(simp, det, info)
                worst_s, noise_s, _ = _verify(simp_data, det, check_x, reference, n_id, parity_rtol, exact)
                data, simplified = simp_data, True
                worst, worst_noise = max(worst, worst_s), max(worst_noise, noise_s)
            else:
                notes.append("onnxsim could not validate its result; kept the unsimplified graph")
        except ImportError:
            notes.append("onnxsim is not installed (pip install 'ufad[simplify]'); not simplified")
        except ExportError as e:
            notes.append(f"simplified graph failed verification ({e}); kept the unsimplified graph")
    write_atomically(path, data)
    return ExportReport(path=path, size_bytes=len(data), parity_max_rel_diff=worst,
                        parity_samples=n_id, parity_noise_max_rel_diff=worst_noise, simplified=simplified,
                        seconds=time.time() - t0, notes=notes, model_float32_error=own)

"""``AnomalySession``: load a ufad .onnx detector and score numpy arrays (no torch).

    from ufad.runtime import AnomalySession
    det = AnomalySession("detector.onnx", provider="auto")   # "cpu" | "cuda" | "auto"
    res = det.run(x)               # x: float32 [B, 1, 28, 28]
    res.score, res.is_anomaly, res.pred, det.provider

Thread safety: one session may be used from many threads at once; ``run`` keeps no
per-call state on the object and onnxruntime's ``InferenceSession.run`` is thread-safe
(tests/test_concurrency.py: 8 threads x 500 calls on one session == serial scoring, bit for bit).
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import format as fmt
from . import integrity, signing
from .errors import InputError, ModelFileError, ProviderError, opt
from .inputs import RANGE_CHECKS, batch_checker, check_values, out_of_range

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
MAX_FILE_BYTES = 2 ** 31


@dataclass
class ScoreResult:
    """Scores of one batch. Higher ``score`` = more anomalous; ``is_anomaly`` = not (score <= threshold)."""

    pred: np.ndarray          # int64 [B]
    score: np.ndarray         # float32 [B]
    is_anomaly: np.ndarray    # bool [B]
    layer_scores: np.ndarray  # float32 [B, L]
    logits: np.ndarray        # float32 [B, classes]
    threshold: float
    classes: tuple[str, ...]
    layer_names: tuple[str, ...]
    provider: str
    nonfinite: np.ndarray     # bool [B]: the input held NaN/Inf (always anomalous)
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    out_of_range: np.ndarray | None = None  # bool [B]: far outside the range (policy "flag": anomalous)

    def __post_init__(self) -> None:
        if self.out_of_range is None:
            self.out_of_range = np.zeros(len(self.score), bool)

    def __len__(self) -> int:
        return len(self.score)

    @property
    def labels(self) -> list[str]:
        """Class name of each prediction."""
        return [self.classes[int(p)] if 0 <= int(p) < len(self.classes) else str(int(p)) for p in self.pred]

    def records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per input (the ``ufad score --json`` schema).

        Non-finite numbers are written as the strings "inf", "-inf" and "nan" so the output
        stays strict JSON (NaN/Infinity literals break most parsers)."""
        out = []
        labels = self.labels
        for i in range(len(self)):
            out.append({
                "index": i,
                "pred": int(self.pred[i]),
                "label": labels[i],
                "score": _json_float(self.score[i]),
                "is_anomaly": bool(self.is_anomaly[i]),
                "threshold": _json_float(self.threshold),
                "layer_scores": {n: _json_float(v) for n, v in zip(self.layer_names, self.layer_scores[i])},
                "nonfinite_input": bool(self.nonfinite[i]),
                "out_of_range_input": bool(self.out_of_range[i]),
            })
        return out


def _json_float(v: Any) -> float | str:
    v = float(v)
    if np.isfinite(v):
        return v
    return "nan" if np.isnan(v) else ("inf" if v > 0 else "-inf")


def _available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(provider: str) -> list[str]:
    """Map ``auto``/``cpu``/``cuda`` to onnxruntime providers; refuse what is not available."""
    provider = provider.lower()
    available = _available_providers()
    if provider == "auto":
        return [p for p in (PROVIDERS["cuda"], PROVIDERS["cpu"]) if p in available] or available[:1]
    if provider not in PROVIDERS:
        raise ProviderError(f"unknown provider {provider!r}; choose auto, cpu or cuda")
    want = PROVIDERS[provider]
    if want not in available:
        hint = (" Install the GPU runtime instead of the CPU one: pip uninstall -y onnxruntime && "
                "pip install 'ufad[gpu]' (needs an NVIDIA driver and CUDA)."
                if provider == "cuda" else "")
        raise ProviderError(
            f"{want} is not available in this onnxruntime (available: {available}).{hint} "
            f"Use {opt('provider', 'cpu')} or {opt('provider', 'auto')} to run on what is available."
        )
    return [want, PROVIDERS["cpu"]] if provider == "cuda" else [want]


def read_model_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a detector file, with clear errors for a missing / oversized / unreadable one."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{path}: no such file")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory, expected a .onnx file")
    if path.stat().st_size >= MAX_FILE_BYTES:
        raise ModelFileError(f"{path}: over 2 GB; ufad files are single self-contained protobufs")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ModelFileError(f"{path}: cannot read it ({e.strerror})") from None


def verified_parts(data: bytes, path: str, verify: bool = True) -> tuple[integrity.ModelParts, fmt.FormatInfo]:
    """Split, parse and (``verify``) integrity-check a detector file's bytes.

    The metadata is read from the bytes that were hashed, never from a second parser."""
    parts = integrity.read_parts(data, path)
    facts = integrity.check(parts, path) if verify else None
    info = fmt.parse_metadata(parts.metadata, path)
    if facts is not None:
        integrity.check_threshold(facts, info, path)
    return parts, info


class AnomalySession:
    """One loaded detector. See the module docstring for use.

    Args:
        path: the ufad .onnx file.
        provider: ``"auto"`` (CUDA when available, else CPU), ``"cpu"`` or ``"cuda"``
            (an error when CUDA cannot run; never a silent CPU fallback).
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        verify: check the file's digests (graph, metadata, header) against the ones it
            records: a file edited after export is refused. Not recommended to turn off.
        verify_key: an Ed25519 public key (PEM path or bytes, or a key object): the file must
            carry a valid signature by it (``ufad sign``), else ``SignatureError``.
        range_check: ``"error"`` applies the file's range policy (images: refuse values far
            outside the recorded range); ``"off"`` scores them as they are.
    """

    def __init__(self, path: str | os.PathLike, provider: str = "auto", *, threads: int | None = None,
                 verify: bool = True, verify_key: Any = None, range_check: str = "error",
                 session_options: Any = None):
        import onnxruntime as ort

        if range_check not in RANGE_CHECKS:
            raise InputError(f"range_check must be one of {RANGE_CHECKS}, got {range_check!r}")
        if verify_key is not None and not verify:
            # Python-only options (the CLI always verifies), so spelt as keywords here.
            raise InputError("verify_key= needs the integrity check: drop verify=False.")
        self.path = Path(path)
        data = read_model_bytes(self.path)
        parts, self.info = verified_parts(data, str(self.path), verify)
        #: every metadata entry, as read from the verified bytes
        self.metadata: dict[str, str] = dict(parts.metadata)
        self.signer = signing.verify(parts, verify_key, str(self.path)) if verify_key is not None else None
        self.verified = verify
        providers = resolve_providers(provider)
        so = session_options or ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads is not None:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        try:
            self._sess = ort.InferenceSession(data, so, providers=providers)
        except Exception as e:
            raise ModelFileError(
                f"{self.path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:300]}). "
                "The file is corrupt, truncated or not an ONNX model; re-export it."
            ) from None
        self._check_io()
        self.providers = list(self._sess.get_providers())
        self.provider = self.providers[0]
        if provider.lower() == "cuda" and self.provider != PROVIDERS["cuda"]:
            raise ProviderError(
                f"CUDA was requested but onnxruntime runs this model on {self.provider} "
                "(the CUDA provider failed to initialise: driver, CUDA or cuDNN missing?). "
                f"Use {opt('provider', 'cpu')} to run on CPU deliberately."
            )
        if provider.lower() == "auto" and PROVIDERS["cuda"] in providers and self.provider != PROVIDERS["cuda"]:
            warnings.warn(f"CUDA is installed but could not be used; running on {self.provider}", RuntimeWarning)
        self.range_check = range_check
        # A file that judges its input itself (input_ok) spares the per-call pass over it.
        self._graph_checks = fmt.OUT_INPUT_OK in {o.name for o in self._sess.get_outputs()}
        self._check = batch_checker(self.info.input, range_check, deferred=self._graph_checks)
        # The calibrated threshold is the graph's own default (an initializer, covered by the
        # graph digest and checked equal to the metadata's): it is fed only to override it.
        self.threshold = self.info.threshold
        self._in_name = self.info.input.name
        self._out_names = [fmt.OUT_LOGITS, fmt.OUT_PRED, fmt.OUT_SCORE, fmt.OUT_IS_ANOMALY, fmt.OUT_LAYER_SCORES]
        if self._graph_checks:
            self._out_names.append(fmt.OUT_INPUT_OK)
        self._act_names = [l.output for l in self.info.layers]
        self._flag_range = self.info.input.range_policy == "flag"
        # The binding's own run: InferenceSession.run adds ~3 us of Python checks per call
        # (a visible share at batch 1: BENCHMARKS.md) and, on a provider failure, silently
        # retries on CPU, which ufad must never do.
        inner = getattr(self._sess, "_sess", None)
        self._run_fn = inner.run if inner is not None and hasattr(inner, "run") else self._sess.run
        if hasattr(self._sess, "disable_fallback"):
            self._sess.disable_fallback()
        self.classes = self.info.classes
        ls = self.info.outputs.get(fmt.OUT_LAYER_SCORES)
        cols = ls.get("columns") if isinstance(ls, dict) else None
        self.layer_names = (tuple(str(c) for c in cols) if isinstance(cols, list)
                            else tuple(l.name for l in self.info.layers))
        self._fast = self._fast_runner() if self._graph_checks else None

    def _check_io(self) -> None:
        graph_inputs = {i.name: i for i in self._sess.get_inputs()}
        inputs = set(graph_inputs)
        outputs = {o.name for o in self._sess.get_outputs()}
        need_out = {fmt.OUT_LOGITS, fmt.OUT_PRED, fmt.OUT_SCORE, fmt.OUT_IS_ANOMALY, fmt.OUT_LAYER_SCORES}
        need_out |= {l.output for l in self.info.layers}
        if self.info.input.name not in inputs or not need_out <= outputs:
            raise ModelFileError(
                f"{self.path}: graph inputs {sorted(inputs)} / outputs {sorted(outputs)} do not "
                "match its ufad metadata; the file was edited. Re-export it."
            )
        # A format-1 file's metadata is not hashed: an edited input shape would only fail
        # inside onnxruntime. (Format 2 covers it; the check is cheap and stays.)
        got = graph_inputs[self.info.input.name].shape
        want = self.info.input.shape
        if len(got) != len(want) or any(isinstance(g, int) and w is not None and g != w
                                        for g, w in zip(got, want)):
            raise ModelFileError(
                f"{self.path}: the graph's input shape {list(got)} does not match the metadata's "
                f"{list(want)}; the file was edited. Re-export it."
            )

    @property
    def input_spec(self) -> fmt.InputSpec:
        return self.info.input

    def run(self, x: Any, threshold: float | None = None, *, batch_size: int = 1024,
            activations: bool = False) -> ScoreResult:
        """Score a batch ``x`` (see ``ufad.runtime.inputs`` for accepted shapes/dtypes)."""
        if batch_size.__class__ is not int:
            try:
                batch_size = operator.index(batch_size)
            except TypeError:
                raise InputError(f"batch_size must be an integer, got {batch_size!r}") from None
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        arr, all_finite = self._check(x)
        if threshold is None and not activations and self._fast is not None and 0 < len(arr) <= batch_size:
            return self._fast(arr, all_finite)
        thr, extra = self._threshold_feed(threshold)
        names = self._out_names + (self._act_names if activations else [])
        if len(arr) <= batch_size:
            cols = self._run(names, {self._in_name: arr, **extra}) if len(arr) else None
        else:
            chunks = [self._run(names, {self._in_name: arr[i:i + batch_size], **extra})
                      for i in range(0, len(arr), batch_size)]
            cols = [np.concatenate([c[k] for c in chunks]) for k in range(len(names))]
        if cols is None:
            return self._empty(thr, self._act_names if activations else [])
        return self._result(arr, cols, all_finite, thr, activations)

    def _result(self, arr: np.ndarray, cols: list[np.ndarray], all_finite: bool | None, thr: float,
                activations: bool) -> ScoreResult:
        """The result of the graph's outputs ``cols`` (in the order of ``_out_names``, then the
        activations) for the input ``arr``; ``all_finite``: what the input check learnt (None:
        nothing, the graph's ``input_ok`` decides, and rows it rejects get the exact check)."""
        # At batch 1 the model's weights have just flushed the caches, so every Python object
        # and numpy call here costs ~10x its warm time (BENCHMARKS.md): unpack, don't build dicts.
        logits, pred, score, flagged, layer_scores = cols[:5]   # the order of self._out_names
        if all_finite is None and self._graph_checks:
            # The graph's input_ok: all true settles it; else the exact check (it may refuse).
            all_finite = True if cols[5].all() else check_values(arr, self.info.input, self.range_check)
        nonfinite, oor = np.zeros((2, len(arr)), bool)   # one allocation, two independent rows
        if all_finite:
            is_anomaly = flagged
        else:
            nonfinite = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
            # The graph already gives these +inf; OR-ing keeps the rule true for threshold=+inf
            # and for files exported before the graph did it too.
            is_anomaly = flagged | nonfinite | np.isnan(score)
        if self._flag_range:   # the graph flags these itself; reported so a caller sees why
            oor = out_of_range(arr, self.info.input)
        return ScoreResult(
            logits=logits, pred=pred, score=score, is_anomaly=is_anomaly, layer_scores=layer_scores,
            threshold=thr, classes=self.classes, layer_names=self.layer_names, provider=self.provider,
            nonfinite=nonfinite, out_of_range=oor,
            activations=dict(zip(self._act_names, cols[len(self._out_names):])) if activations else {},
        )

    def _fast_runner(self) -> Callable[[np.ndarray, bool | None], ScoreResult]:
        """The end of ``run`` for the common call, its constants resolved once (as
        ``batch_checker``): a checked batch ``arr`` of one call's worth of rows, the calibrated
        threshold, no activations. When the check left the values to the graph and every row
        is ``input_ok``, the result needs nothing more; else ``_result`` finishes it exactly.
        At batch 1 each Python attribute and numpy call after the graph costs ~10x its warm
        time (the model has just flushed the caches: BENCHMARKS.md), so this reads locals and
        one bool per row, and makes no numpy reduction."""
        zeros = np.zeros
        names, in_name, run, result = list(self._out_names), self._in_name, self._run, self._result
        thr, classes, layer_names, provider = self.threshold, self.classes, self.layer_names, self.provider

        def fast(arr: np.ndarray, all_finite: bool | None) -> ScoreResult:
            cols = run(names, {in_name: arr})
            logits, pred, score, flagged, layer_scores, ok = cols
            if all_finite is not None or b"\x00" in ok.tobytes():   # numpy bools are bytes 0 / 1: no reduction
                return result(arr, cols, all_finite, thr, False)   # checked on conversion, or a row needing care
            nonfinite, oor = zeros((2, len(arr)), bool)
            return ScoreResult(logits=logits, pred=pred, score=score, is_anomaly=flagged, layer_scores=layer_scores,
                               threshold=thr, classes=classes, layer_names=layer_names, provider=provider,
                               nonfinite=nonfinite, out_of_range=oor)
        return fast

    def _threshold_feed(self, threshold: Any) -> tuple[float, dict[str, np.ndarray]]:
        """The threshold a result reports and the feed that overrides the graph's default
        (none when the caller does not override it)."""
        if threshold is None:
            return self.threshold, {}
        try:
            thr = float(threshold)
        except (TypeError, ValueError):
            raise InputError(f"threshold must be a number, got {threshold!r}") from None
        if math.isnan(thr):
            raise InputError("threshold is NaN; pass a finite number or +inf")
        with np.errstate(over="ignore"):  # |threshold| beyond float32 means +-inf, as intended
            return thr, {fmt.INPUT_THRESHOLD: np.array(thr, dtype=np.float32)}

    def _run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run_fn(names, feeds, None)
        except Exception as e:  # a provider failure at run time (e.g. CUDA out of memory)
            if not type(e).__module__.startswith("onnxruntime"):
                raise
            raise ProviderError(
                f"onnxruntime failed to run the detector on {self.provider}: "
                f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}. "
                f"With CUDA, try a smaller {opt('batch_size')} or {opt('provider', 'cpu')}."
            ) from None

    __call__ = run

    def _empty(self, thr: float, act_names: Sequence[str]) -> ScoreResult:
        n_cls, n_l = len(self.classes), len(self.layer_names)
        dims = {l.output: l.dim for l in self.info.layers}
        return ScoreResult(
            logits=np.zeros((0, n_cls), np.float32), pred=np.zeros(0, np.int64),
            score=np.zeros(0, np.float32), is_anomaly=np.zeros(0, bool),
            layer_scores=np.zeros((0, n_l), np.float32), threshold=thr, classes=self.classes,
            layer_names=self.layer_names, provider=self.provider, nonfinite=np.zeros(0, bool),
            activations={n: np.zeros((0, dims[n]), np.float32) for n in act_names},
        )

    def describe(self) -> dict[str, Any]:
        """Everything ``ufad inspect --json`` shows."""
        d = self.info.to_json()
        d["file"] = str(self.path)
        d["size_bytes"] = self.path.stat().st_size
        d["verified"] = self.verified
        d["signature_verified_key"] = self.signer
        d["providers"] = self.providers
        d["graph_inputs"] = [{"name": i.name, "shape": i.shape, "type": i.type} for i in self._sess.get_inputs()]
        d["graph_outputs"] = [{"name": o.name, "shape": o.shape, "type": o.type} for o in self._sess.get_outputs()]
        return d

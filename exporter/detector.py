"""The detector base class: capture, fit, calibrate, torch reference, export.

A concrete detector (one file each under ``detectors/``) says how to fit its statistics from
streamed ID features and returns its scoring math as a torch ``head`` module. This class
does the rest the same way for all of them, in the manner of pytorch-ood / scikit-learn:

    det = UniformDetector(model).fit(x_train, y_train).calibrate(x_valid)
    det.export("detector.onnx")
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufad.runtime import format as fmt
from ufad.runtime.errors import ExportError, capped, opt
from ufad.runtime.inputs import range_limits

from .auto_layers import default_layers
from .model_kinds import eager_layer_name, eager_model
from .data import ArrayLike, Data, Rows, as_input, check_labels, check_tpr, input_array, iter_batches, progress
from .onnx_export import PARITY_RTOL
from .outputs import LogitsKey, check_logits, output_kind, parse_key, pick_logits
from .registry import Option, register
from .taps import (ENERGY, PROBE_SAMPLES, SOFTMAX, SOFTMAX_TOP, TOP_K, ActivationCapture, Tap, check_map_reduction,
                   resolve_layers, resolve_taps, run_model)

RANGE_POLICIES = ("auto", *fmt.RANGE_POLICIES)


class DetectorModule(nn.Module):
    """Model + capture + head: the exact module exported to ONNX and the torch reference.

    forward(x, threshold) -> (logits, pred, score, is_anomaly, layer_scores, *activations, input_ok)

    ``flag_limits`` (range policy "flag"): samples with a value below / above them score +inf
    and are anomalous, so every client of the file applies the rule. ``id_range`` (integer
    inputs): ids are clamped into it before the model, so no client can feed an embedding an
    index it lacks (ONNX Gather fails on one); with ``flag_limits`` such rows are flagged.
    ``input_limits`` (the range limits, either policy): ``input_ok`` is false for a row with a
    value beyond them, as it is for a row holding NaN/Inf: a row that needs no special handling.
    """

    def __init__(self, model: nn.Module, taps: Sequence[Tap], head: nn.Module,
                 logits: LogitsKey = None, flag_limits: tuple[float, float] | None = None,
                 id_range: tuple[int, int] | None = None,
                 input_limits: tuple[float, float] | None = None):
        super().__init__()
        self.id_range = id_range
        self.model = model
        self.head = head
        self.logits_key = logits
        self.flag_limits = flag_limits
        self.input_limits = input_limits
        self.capture = ActivationCapture(model, taps)

    def forward(self, x: torch.Tensor, threshold: torch.Tensor):
        self.capture.clear()
        raw = x
        if self.id_range is not None:
            x = x.clamp(*self.id_range)
        logits = pick_logits(self.model(x), self.logits_key)
        if logits.dtype == torch.float64:   # the float64 copy of parity's reference: the head stays float32
            logits = logits.float()
        feats = self.capture.collect(logits) if self.capture.layers else []
        pred = logits.argmax(dim=1)
        score, layer_scores = self.head(logits, pred, feats)
        # Documented rule: an input holding NaN/Inf, or any NaN score, scores +inf, so it is
        # always flagged (and is_anomaly = "not accepted" is true for NaN as well).
        # x * 0 is 0 where x is finite and NaN where it is NaN/Inf, so `probe` equals the
        # score on good rows and is NaN exactly on bad ones: comparing `probe` instead of
        # the score flags bad rows even when the caller feeds threshold = +inf (NaN <= t is
        # false). 6 cheap graph nodes instead of 10 (isfinite/all/or).
        if x.is_floating_point():
            dims = tuple(range(1, x.dim()))
            nan_rows = (x * 0.0).sum(dim=dims)
            probe = nan_rows + score
            score = score.masked_fill(torch.isnan(probe), float("inf"))
            # input_ok lets a runtime skip its own pass over the input (two numpy reductions
            # cost ~30 us at batch 1 after a model has flushed the caches: BENCHMARKS.md). One
            # distance from the limits' middle, plus nan_rows: a NaN anywhere makes it false.
            # The half-width is shrunk by more than float32 rounding: true means inside, and a
            # runtime judges a false row exactly itself.
            lo, hi = self.input_limits or (0.0, 0.0)
            mid, half = (lo + hi) / 2, (hi - lo) / 2
            half = half - 1e-5 * (abs(mid) + half) if self.input_limits else float(np.finfo(np.float32).max)
            input_ok = ((x - mid).abs().amax(dim=dims) + nan_rows) <= half
        else:   # ids hold no NaN; only the score can be NaN
            probe = score
            score = score.masked_fill(torch.isnan(score), float("inf"))
            input_ok = torch.ones_like(pred, dtype=torch.bool)
            if self.input_limits is not None:
                flat = raw.flatten(1)
                input_ok = ((flat >= self.input_limits[0]) & (flat <= self.input_limits[1])).all(dim=1)
        is_anomaly = torch.logical_not(probe <= threshold)
        if self.flag_limits is not None:
            flat = raw.flatten(1)
            oor = ((flat < self.flag_limits[0]) | (flat > self.flag_limits[1])).any(dim=1)
            score = score.masked_fill(oor, float("inf"))
            is_anomaly = is_anomaly | oor
        return (logits, pred, score, is_anomaly, layer_scores, *feats, input_ok)


@dataclass
class Calibration:
    """Threshold chosen on held-out ID data so that ``target_tpr`` of it is accepted."""

    threshold: float
    target_tpr: float
    n: int
    accepted: float
    quantiles: dict[str, float]
    source: str = "user data"

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold, "target_tpr": self.target_tpr, "n_samples": self.n,
            "id_accept_rate": self.accepted, "id_score_quantiles": self.quantiles,
            "source": self.source,
        }


class Detector:
    """Base class. Subclasses set ``method`` and implement ``_fit`` and ``head``.

    A subclass that sets ``method`` registers itself (``registry.py``); ``options`` declares
    its own keyword arguments (the CLI offers each as a flag), ``rank`` orders listings.
    """

    method = "base"
    options: tuple[Option, ...] = ()
    rank = 100
    uses_layers = True
    #: threshold of the detector's own boundary rule, if it has one (None otherwise)
    boundary_threshold: float | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "method" in cls.__dict__:
            register(cls)

    @classmethod
    def option(cls, name: str) -> Option:
        """The declared option ``name`` (StopIteration if this detector has none)."""
        return next(o for o in cls.all_options() if o.name == name)

    @classmethod
    def all_options(cls) -> list[Option]:
        """The options this detector takes: its own and its bases', nearest first."""
        seen, out = set(), []
        for klass in cls.__mro__:
            for o in klass.__dict__.get("options", ()):
                if o.name not in seen:
                    seen.add(o.name)
                    out.append(o)
        return out

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        *,
        reduction: str = "max",
        class_names: Sequence[str] | None = None,
        batch_size: int = 256,
        seed: int = 0,
        progress: bool = True,
        logits: LogitsKey | str = None,
        range_policy: str = "auto",
    ):
        model = eager_model(model)   # torch.compile's wrapper -> its eager module; TorchScript refused
        if range_policy not in RANGE_POLICIES:
            raise ExportError(f"{opt('range_policy')} must be one of {RANGE_POLICIES}, got {range_policy!r}")
        self.model = model
        self.logits = parse_key(logits)
        self.range_policy = range_policy
        self.layers = None if layers is None else [eager_layer_name(l) for l in layers]
        if self.layers is not None:
            resolve_layers(model, self.layers)
        check_map_reduction(reduction)
        self.reduction = reduction
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ExportError(f"{opt('batch_size')} must be >= 1, got {batch_size}")
        self.seed = int(seed)
        self.progress = progress
        self.calibration: Calibration | None = None
        #: held-out ID inputs the export's parity check runs on (set by calibrate)
        self.check_sample: np.ndarray | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.input_range: tuple[float, float] | None = None
        self.input_dtype = "float32"   # "int64" when the data are integer ids (data.as_input)
        self.num_classes: int | None = None
        self.dims: list[int] = []
        self._fitted = False

    # ----------------------------------------------------------------- fitting
    def _check_model(self) -> None:
        training = [n or "(the model)" for n, m in self.model.named_modules() if m.training]
        if training:
            # A submodule left in training mode would update batch-norm statistics during the
            # fit and make dropout random: the regions would describe another model.
            raise ExportError(
                f"the model is in training mode ({capped(training, 8)}: dropout / batch-norm statistics would make "
                "activations random); call model.eval() before fitting or exporting."
            )
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self.model.parameters() if t.is_floating_point()}
                        - {"float32"})
        if dtypes:
            raise ExportError(
                f"the model's weights are {', '.join(dtypes)}; ufad fits and exports float32 models. "
                "Call model.float() first (the detector's file is float32 either way)."
            )

    def _prepare(self, first: torch.Tensor) -> None:
        self.input_shape = tuple(first.shape[1:])
        self.input_dtype = "float32" if first.is_floating_point() else "int64"
        if self.uses_layers and self.layers is None:
            self.layers = self.automatic_layers(first)
        if not self.uses_layers:
            self.layers = []
        with torch.no_grad():
            kind = output_kind(pick_logits(run_model(self.model, first[:PROBE_SAMPLES]), self.logits))
        self.taps = resolve_taps(self.model, [*self.layers, *self.source_taps()], first, self.reduction,
                                 kind == "probabilities")

    def source_taps(self) -> list[str]:
        """Taps read by the head but given no column of their own (after ``layers`` in the
        graph's activation outputs); none by default."""
        return []

    def automatic_layers(self, example: torch.Tensor) -> list[str]:
        """The taps used when none are given (``taps.default_layers``; detectors that read
        fewer or other points override this)."""
        return default_layers(self.model, example, self.logits)

    def _stream(self, data: Data, labels: ArrayLike | None, desc: str):
        """Yield ``(x, y, logits, feats)`` per batch with features captured, no grad."""
        batches, total = iter_batches(data, labels, self.batch_size)
        capture = None
        lo, hi = math.inf, -math.inf
        try:
            for x, y in progress(batches, total, desc, self.progress):
                if capture is None:
                    self._prepare(x)
                    capture = ActivationCapture(self.model, self.taps)
                if tuple(x.shape[1:]) != self.input_shape:
                    raise ExportError(
                        f"batch of shape {tuple(x.shape)} does not match the first batch's "
                        f"input shape {self.input_shape}"
                    )
                if not torch.isfinite(x).all():
                    # Caught per batch, before the statistics are poisoned and the fit fails late.
                    raise ExportError(
                        "the ID data holds NaN or Inf values; fit on finite inputs only "
                        "(e.g. x[np.isfinite(x).reshape(len(x), -1).all(1)])."
                    )
                with torch.no_grad():
                    capture.clear()
                    logits = pick_logits(run_model(self.model, x), self.logits)
                    check_logits(logits)
                    feats = capture.collect(logits) if self.layers else []
                self._check_classes(logits, int(y.max()) if y is not None and len(y) else None)
                if self.num_classes is None:  # recorded here, so no detector's _fit has to
                    self.num_classes = int(logits.shape[1])
                    self.dims = [int(f.shape[1]) for f in feats]
                lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
                yield x, y, logits, feats
        finally:
            if capture is not None:
                capture.remove()
        if capture is None:
            raise ExportError("data yielded no batches; pass at least one batch of ID samples.")
        self._seen_range = (lo, hi)

    def fit(self, data: Data, labels: ArrayLike | None = None) -> "Detector":
        """Fit the statistics on ID data (arrays + labels, or a loader of (x, y) batches)."""
        self._check_model()
        self.num_classes, self.dims = None, []   # a refit starts over
        if labels is not None:
            lab = check_labels(labels, len(data) if isinstance(data, (np.ndarray, torch.Tensor)) else None)
            if len(lab) and isinstance(data, (np.ndarray, torch.Tensor)):
                # one small forward pass, so a label the model has no output for is named as
                # such, not as a class with too few samples
                with torch.no_grad():
                    out = pick_logits(run_model(self.model, as_input(data[:2])), self.logits)
                self._check_classes(out, int(lab.max()))
            self._check_labels(lab)
        self._fit(self._stream(data, labels, f"fit {self.method}"))
        self.input_range = getattr(self, "_seen_range", None)
        if self.range_policy == "auto":
            # Images: far-out values are a scaling mistake to refuse; feature vectors and
            # ids never seen at fit: an anomaly.
            self.range_policy = ("refuse" if len(self.input_shape) == 3 and self.input_dtype == "float32"
                                 else "flag")
        if self.class_names is None:
            self.class_names = [str(i) for i in range(self.num_classes)]
        elif len(self.class_names) != self.num_classes:
            raise ExportError(
                f"{len(self.class_names)} class names given but the model has "
                f"{self.num_classes} outputs."
            )
        self._fitted = True
        return self

    @staticmethod
    def _check_classes(logits: torch.Tensor, largest: int | None) -> None:
        """Two or more classes, and no label beyond them (``largest``: the largest label)."""
        if logits.dim() == 2 and logits.shape[1] < 2:
            raise ExportError(
                f"the model returns {logits.shape[1]} logit per input; ufad needs one per class "
                "(a softmax over two or more). For a binary classifier with one logit z "
                "(sigmoid / BCEWithLogits), wrap it to return torch.cat([torch.zeros_like(z), z], "
                "dim=1): its softmax is (1 - sigmoid(z), sigmoid(z)).")
        if largest is not None and logits.dim() == 2 and largest >= logits.shape[1]:
            raise ExportError(
                f"labels hold class {largest} but the model has {logits.shape[1]} outputs "
                f"(classes 0..{logits.shape[1] - 1}); pass labels as the model's class indices.")

    def _check_labels(self, labels: np.ndarray) -> None:
        """Hook for early label checks (before any forward pass)."""

    def _fit(self, stream) -> None:
        """Fit the method's statistics from ``stream`` (``(x, y, logits, feats)`` batches);
        ``num_classes`` and ``dims`` are already recorded by the stream."""
        raise NotImplementedError

    def head(self) -> nn.Module:
        """The scoring math as a torch module: ``(logits, pred, feats) -> (score, layer_scores)``."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Method parameters recorded in the file's metadata."""
        return {}

    def layer_score_names(self) -> list[str]:
        """Names of the columns of the ``layer_scores`` output."""
        return list(self.layers) if self.layers else [self.method]

    # ---------------------------------------------------------- torch reference
    def _require_fitted(self) -> None:
        if not self._fitted:
            raise ExportError(f"{type(self).__name__} is not fitted; call fit(...) first.")

    def module(self) -> DetectorModule:
        """The export module (model + capture hooks + head). Call ``.capture.remove()`` when done."""
        self._require_fitted()
        return DetectorModule(self.model, self.taps, self.head(), self.logits, self._flag_limits(),
                              self._id_range(), range_limits(self.input_spec())).eval()

    def _id_range(self) -> tuple[int, int] | None:
        """The ids seen at fit, which the graph clamps integer inputs into (None: float inputs)."""
        if self.input_dtype != "int64":
            return None
        return int(self.input_range[0]), int(self.input_range[1])

    def input_spec(self) -> fmt.InputSpec:
        """The input spec recorded in the file (shape, dtype, value range, range policy)."""
        self._require_fitted()
        return fmt.InputSpec(name="input", shape=(None, *self.input_shape), dtype=self.input_dtype,
                             value_range=self.input_range, range_policy=self.range_policy)

    def _flag_limits(self) -> tuple[float, float] | None:
        limits = range_limits(self.input_spec())
        return limits if self.range_policy == "flag" else None

    def score(self, x: ArrayLike, threshold: float | None = None) -> dict[str, np.ndarray]:
        """Torch reference scoring of ``x``: dict with logits, pred, score, is_anomaly,
        layer_scores and one activation array per layer (the ONNX outputs, same names)."""
        self._check_model()
        return self._run_module(self.module(), x, threshold)

    def score_float64_model(self, x: ArrayLike) -> dict[str, np.ndarray] | None:
        """``score`` with a float64 copy of the model (the head stays float32): how far the
        float32 model is from its own exact value on ``x``, so how far a correct float32
        export may drift from the float32 reference (the export's parity check). None when
        the model cannot run in float64."""
        self._require_fitted()
        try:
            with warnings.catch_warnings():   # torch's notices about copying its graph metadata (an unflattened program)
                warnings.simplefilter("ignore")
                model64 = copy.deepcopy(self.model).double()
            mod = DetectorModule(model64, self.taps, self.head(), self.logits, self._flag_limits(),
                                 self._id_range(), range_limits(self.input_spec())).eval()
        except Exception:
            return None
        try:
            return self._run_module(mod, x, None, to_float64=True)
        except Exception:
            return None

    def _run_module(self, mod: DetectorModule, x: ArrayLike, threshold: float | None,
                    to_float64: bool = False) -> dict[str, np.ndarray]:
        thr = torch.tensor(self.threshold if threshold is None else threshold, dtype=torch.float32)
        rows = Rows(len(x) if isinstance(x, (np.ndarray, torch.Tensor)) else None)
        try:
            batches, total = iter_batches(x, None, self.batch_size)
            with torch.no_grad():
                for xb, _ in progress(batches, total, "score (torch)", self.progress and (total or 0) > 8):
                    if to_float64 and xb.is_floating_point():
                        xb = xb.double()
                    rows.add([t.float().numpy() if t.dtype == torch.float64 else t.numpy() for t in mod(xb, thr)])
        finally:
            mod.capture.remove()
        return dict(zip(self.output_names(), rows.result()))

    def output_names(self) -> list[str]:
        return [fmt.OUT_LOGITS, fmt.OUT_PRED, fmt.OUT_SCORE, fmt.OUT_IS_ANOMALY,
                fmt.OUT_LAYER_SCORES] + [fmt.activation_output_name(t.spec) for t in self.taps] + [fmt.OUT_INPUT_OK]

    # --------------------------------------------------------------- calibrate
    @property
    def threshold(self) -> float:
        if self.calibration is not None:
            return self.calibration.threshold
        if self.boundary_threshold is not None:
            return self.boundary_threshold
        return math.inf

    def calibrate(self, data: ArrayLike, tpr: float = 0.95, source: str = "user data") -> "Detector":
        """Set the threshold so that a fraction ``tpr`` of held-out ID ``data`` is accepted.

        Use ID data the detector was not fitted on (e.g. a validation split).
        """
        self._require_fitted()
        check_tpr(tpr)
        if isinstance(data, (np.ndarray, torch.Tensor)):
            arr = data.detach().cpu().numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            bad = 0 if arr.dtype.kind != "f" else int((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1).sum())
            if bad:
                # Their scores are +inf by the graph's rule: the threshold would ignore them, and
                # the export's parity check would then run on them.
                raise ExportError(
                    f"the calibration data holds NaN or Inf values ({bad} of {len(arr)} samples); "
                    "calibrate on finite ID inputs only (e.g. x[np.isfinite(x).reshape(len(x), -1).all(1)]).")
        scores = self.score(data, threshold=math.inf)[fmt.OUT_SCORE].astype(np.float64)
        if isinstance(data, (np.ndarray, torch.Tensor)):
            self.check_sample = input_array(data[:192])
        finite = scores[np.isfinite(scores)]
        if len(finite) < 20:
            raise ExportError(f"calibration needs at least 20 ID samples with finite scores, got {len(finite)}")
        thr = float(np.quantile(finite, tpr, method="higher"))
        qs = {str(q): float(np.quantile(finite, q)) for q in (0.01, 0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)}
        self.calibration = Calibration(
            threshold=thr, target_tpr=tpr, n=len(scores),
            accepted=float(np.mean(scores <= thr)), quantiles=qs, source=source,
        )
        return self

    # ------------------------------------------------------------------ export
    def format_info(self, producer: dict[str, str] | None = None) -> fmt.FormatInfo:
        """What the file's metadata says about this detector (the graph digest is filled in
        by the exporter once the graph exists)."""
        self._require_fitted()
        dims = self.dims or []
        layers = tuple(
            fmt.LayerInfo(name=t.spec, dim=int(d), reduction=t.reduction,
                          output=fmt.activation_output_name(t.spec))
            for t, d in zip(self.taps, dims)
        )
        cal = self.calibration.to_json() if self.calibration else {
            "threshold": self.threshold, "target_tpr": None, "n_samples": 0,
            "source": "uncalibrated: boundary rule" if self.boundary_threshold is not None else "uncalibrated",
        }
        cal["boundary_threshold"] = self.boundary_threshold
        outputs = {
            fmt.OUT_LOGITS: "float32 [B, classes]: the classifier's logits",
            fmt.OUT_PRED: "int64 [B]: argmax of logits",
            fmt.OUT_SCORE: "float32 [B]: anomaly score, higher = more anomalous (+inf for NaN)",
            fmt.OUT_IS_ANOMALY: "bool [B]: not (score <= threshold)",
            fmt.OUT_LAYER_SCORES: {"shape": "float32 [B, L]", "columns": self.layer_score_names()},
            fmt.OUT_INPUT_OK: "bool [B]: every value finite and within the range limits (false: refused or flagged, per range_policy)",
            "activations": {l.output: f"float32 [B, {l.dim}]: " + (
                "sqrt(softmax(logits))" if l.name == SOFTMAX else
                "-logsumexp(logits)" if l.name == ENERGY else
                f"the {TOP_K} largest of sqrt(softmax(logits)), sorted" if l.name == SOFTMAX_TOP
                else f"{l.reduction}-reduced {l.name}")
                for l in layers},
        }
        return fmt.FormatInfo(
            format_version=fmt.FORMAT_VERSION, method=self.method, params=self.params(),
            layers=layers, classes=tuple(self.class_names), input=self.input_spec(), outputs=outputs,
            threshold=float(self.threshold), calibration=cal, graph_sha256="",
            producer=dict(producer or {}),
        )

    def export(self, path: str | Path, *, example: ArrayLike | None = None, simplify: bool = False,
               check_inputs: ArrayLike | None = None, parity_rtol: float = PARITY_RTOL,
               verbose: bool = False) -> "ExportReport":
        """Write the detector as ONE self-contained .onnx file and verify it.

        ``check_inputs`` (default: the first 192 held-out ID inputs given to ``calibrate``) and
        32 uniform-noise inputs are scored by both the torch reference and onnxruntime; the
        export fails if verdicts or predictions disagree, or floats differ by more than
        ``parity_rtol`` (relative to each output's magnitude; 10x that on the noise inputs,
        whose activations lie far beyond the data's). ``simplify`` runs onnxsim and keeps it
        only if verified.
        """
        from .onnx_export import export_detector

        self._require_fitted()
        self._check_model()
        return export_detector(self, Path(path), example=example, simplify=simplify,
                               check_inputs=check_inputs, parity_rtol=parity_rtol, verbose=verbose)


from .onnx_export import ExportReport  # noqa: E402  (re-export for type hints)

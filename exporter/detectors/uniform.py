"""The uniform detector of Zhao et al. (arXiv 2110.03092): per-class, per-layer bounded regions.

Fit (ID data only): for each monitored layer, map the reduced activations with ID statistics
(``feature_maps``: standardize, or whiten with the tied class covariance on the penultimate
layer); for each class c, take training samples of class c that the model classifies
correctly (at most ``max_points`` of them, a seeded uniform subsample) and fit a region with
``nu`` = 0.1: an RBF one-class SVM / SVDD (default) or a plain ball. By default the monitored
layers are each top-level feature block, the penultimate layer, the classifier's output
layer as ``sqrt(softmax(logits))`` (``@sqrt_softmax``, see ``taps``) and the logits' energy
``-logsumexp(logits)`` (``@energy``).

Score: c^ = argmax logits. At layer l, ``raw_l`` says how far the input lies outside the
region of class c^ (> 0 outside, < 0 inside); ``layer_score_l`` is ``raw_l`` z-scored with
the median and spread of ``raw_l`` over that class's own fitting points, so layers are
comparable. ``@energy`` is a score already (no region): it is put on the scale of the
other layers' max by matching its median and 95% quantile on held-out ID fitting points, the
``HOLDOUT`` correctly classified points no region was fitted on. ``score = max_l
layer_score_l``. Adversarial inputs are caught because early layers still look like the true
class while the prediction says c^, because their output layer sits between classes, and
because small-budget attacks lower the logits' scale (the energy); noise and OOD inputs fall
outside every region.

``raw`` for the RBF region, with K(x, s) = exp(-gamma ||x - s||^2), weights a_i normalised
to sum 1 and rho' = rho / sum(alpha):   raw = log rho' - log sum_i a_i K(x, s_i)
(the log of the one-class SVM decision ratio; > 0 exactly where the SVM says "outside").
For the ball: raw = ||x - centre|| - radius.

Opt-in columns from per-class ridge regressions of the last module layer on an earlier tap:
``consistency`` (the predicted class's residual) and ``contrast`` (its log residual minus the
best other class's); see ``UniformDetector``.

The scoring math is in ``uniform_head.py`` (``UniformHead``: the torch reference and what
``torch.onnx.export`` turns into the graph; see BENCHMARKS.md for why it is shaped so).
This file fits it.

Many classes: the exact regions store every class's support vectors at every layer
(``[C, m, D]``, and ``D = C`` at ``@sqrt_softmax``), which grows with C^2. Above
``MANY_CLASSES`` the automatic output tap is ``@sqrt_softmax_top10`` (class-agnostic, 10
dimensions), and ``regions="auto"`` switches to ``CodebookLayerRegions`` (prototypes shared by
all classes) when the exact form would exceed ``EXACT_BUDGET`` floats or a quarter of the
model's own parameters, whichever is larger.
"""

from __future__ import annotations

from typing import Any, Sequence

import click
import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError, capped, opt

from .. import boundaries
from ..taps import ENERGY, OUTPUT_TAPS, SOFTMAX, SOFTMAX_TOP, parse_spec, resolve_layers, run_model
from ..detector import Detector
from ..outputs import output_kind, pick_logits
from ..registry import Option
from ..feature_maps import MAX_WHITEN_DIM, LayerMoments
from .uniform_head import (BallLayerRegions, CodebookLayerRegions, ConsistencyLayerRegions, ContrastLayerRegions,
                           CONTRAST_EPS, RBFLayerRegions, ScoreLayerRegions, UniformHead, region_taps)

# Floor of a (layer, class) spread of raw. raw is a log kernel-density ratio; a class whose
# fitting points all sit in one spot of a layer (a very confident class at @sqrt_softmax)
# can have a spread of 1e-3, and 1/spread would turn float32 rounding into score noise.
SCALE_FLOOR = 0.01
#: above this many classes the automatic output tap is the class-agnostic @sqrt_softmax_top10
MANY_CLASSES = 100
#: the exact regions are kept up to this many stored floats (or a quarter of the model's)
EXACT_BUDGET = 4_000_000
#: floor of a dimension's spread at @sqrt_softmax_top10: its lower entries are square roots of
#: tiny probabilities, whose float32 rounding a smaller spread would blow up into the score
TOP_STD_FLOOR = 1e-3
#: prototypes of its codebook a class keeps (CodebookLayerRegions)
CODEBOOK_PER_CLASS = 32
#: correctly classified fitting points set aside (not in any region), over all classes: the
#: held-out ID data that puts the score layers (``@energy``) on the other layers' scale
HOLDOUT = 2000
#: the ID quantiles of a score layer that are matched to those of the other layers' max
ALIGN_QUANTILES = (0.5, 0.95)
#: ridge penalty of the consistency / contrast regressions, on standardized features, per source dimension
#: (``consistency_alpha="auto"``: D_src / 16, at least 1). A wide source (a map on a grid of cells,
#: 1568 dims on the Fashion-MNIST ResNet) fitted on ~1000 points per class needs a strong penalty:
#: a weak one fits the fine detail that faint noise moves (docs/design.md, session 21).
CONSISTENCY_ALPHA_PER_DIM = 1 / 16
#: ``consistency`` / ``contrast`` values that are not a tap spec
CONSISTENCY = ("none", "penultimate")
#: the two columns that read a per-class regression to the last module layer, by option name
REGRESSIONS = {"consistency": ConsistencyLayerRegions, "contrast": ContrastLayerRegions}
#: a contrast column's name: its regression's ``a>b`` and this
CONTRAST_SUFFIX = " vs other classes"


def _inputs(region: nn.Module, li: int, fs: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """The per-tap arrays ``fs`` that region ``li`` reads (``region_taps``), as tensors."""
    return [torch.tensor(fs[i], dtype=torch.float32) for i in region_taps(region, li)]


def _ids(ids: Sequence[int], cap: int = 12) -> str:
    """A list of class ids for a message, capped (a 1000-class model can miss hundreds)."""
    return f"[{capped(ids, cap)}]"


class UniformDetector(Detector):
    """Per-class, per-layer one-class regions (the paper's uniform framework).

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers: module names to monitor, ``"@sqrt_softmax"`` for sqrt(softmax(logits))
            or ``"@energy"`` for -logsumexp(logits) (default: each top-level feature block, the
            penultimate layer, ``@sqrt_softmax`` and ``@energy``).
        nu: fraction of ID fitting points allowed outside each region (paper: 0.1).
        boundary: ``"rbf"`` (one-class SVM / SVDD, default) or ``"ball"`` (tiny, linear).
        gamma: RBF width on the mapped features; ``"scale"`` = 1 / D.
        whiten: which layers are whitened with the tied class covariance instead of
            standardized: ``"penultimate"`` (the last monitored module, default), ``"all"``
            (every monitored module) or ``"none"``. ``@sqrt_softmax`` is always standardized
            (its covariance is singular: the squares sum to 1).
        shrinkage: added to the covariance's eigenvalues, as a fraction of their mean.
        max_points: cap of fitting points per class (keeps the graph small and fit fast).
        min_points: fewer correctly classified points than this for a class is an error.
        consistency: ``"penultimate"`` adds one more score column, ``"<a>><b>"``: how far the
            last monitored module's features (b) lie from what the predicted class's own
            fitting points predict from the module before it (a), by a per-class linear
            regression (``C x D_a x D_b`` weights). A tap spec instead of ``"penultimate"``
            (e.g. ``"layer1:grid7"``: an early block's map averaged on a 7 x 7 grid) makes that
            tap the source a: it is tapped too (an activation output) but gets no region of
            its own. ``"none"`` (default): no such column.
        contrast: one more column from the same kind of regression (its own fit), read for every
            class: how much better the best other class's regression from tap a (a value like
            ``consistency``'s, e.g. ``"layer3"``) explains the last module layer than the predicted
            class's does (log residual of the predicted class minus the smallest other one).
            Minimal attacks (CW, DeepFool) leave their source class explaining better. ``"none"``
            (default): no such column.
        consistency_alpha: the regressions' ridge penalty on standardized features;
            ``"auto"``: D_a / 16, at least 1 (each regression its own).

    Fitted attributes (after ``fit``): ``feature_maps_`` (one ``FeatureMap`` per layer),
    ``gammas_`` (RBF gamma per layer; empty for the ball), ``fit_points_`` (class ->
    per-layer reduced activations the regions were fitted on), ``fit_counts_``,
    ``centres_`` / ``scales_`` (``[L, C]`` median and spread of raw per layer and class),
    ``consistency_alpha_`` / ``contrast_alpha_`` (the penalty each regression was fitted with).
    """

    method = "uniform"
    rank = 0
    options = (
        Option("nu", float, 0.1, "fraction of ID fitting points allowed outside each region"),
        Option("boundary", click.Choice(["rbf", "ball"]), "rbf", "region: RBF one-class SVM, or a ball"),
        Option("whiten", click.Choice(["penultimate", "all", "none"]), "penultimate",
               "layers whitened with the tied class covariance"),
        Option("shrinkage", float, 0.01, "covariance shrinkage, as a fraction of its mean eigenvalue"),
        Option("max_points", int, 1000, "fitting points per class"),
        Option("min_points", int, 20, "fewest correctly classified fitting points a class may have"),
        Option("regions", click.Choice(["auto", "exact", "codebook"]), "auto",
               "RBF regions: each class's own support vectors, or prototypes shared by all classes"),
        Option("codebook_size", int, 512, "prototypes per layer of the shared codebook"),
        Option("consistency", str, "none",
               "also score the last module layer against what an earlier tap predicts, per class: "
               "'penultimate' (the module before it) or a tap spec such as layer1:grid7"),
        Option("contrast", str, "none",
               "also score whether another class's regression from this tap (like --consistency's) to the last "
               "module layer explains the input better than the predicted class's, e.g. layer3"),
        Option("consistency_alpha", str, "auto", "ridge penalty of the regressions ('auto': D/16 of each source)"),
    )
    WHITEN = ("penultimate", "all", "none")

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, nu: float = 0.1,
                 boundary: str = "rbf", gamma: float | str = "scale", whiten: str = "penultimate",
                 shrinkage: float = 0.01, max_points: int = 1000, min_points: int = 20,
                 regions: str = "auto", codebook_size: int = 512, consistency: str = "none",
                 consistency_alpha: float | str = "auto", contrast: str = "none", **kwargs: Any):
        super().__init__(model, layers, **kwargs)
        if not 0.0 < nu < 1.0:
            raise ExportError(f"{opt('nu')} must be in (0, 1), got {nu}")
        if boundary not in ("rbf", "ball"):
            raise ExportError(f"boundary must be 'rbf' or 'ball', got {boundary!r}")
        if whiten not in self.WHITEN:
            raise ExportError(f"whiten must be one of {self.WHITEN}, got {whiten!r}")
        if not shrinkage > 0.0:
            raise ExportError(f"shrinkage must be > 0, got {shrinkage}")
        self.consistency, self.contrast = consistency, contrast
        self._sources = {name: self._check_source(name, value)
                         for name, value in (("consistency", consistency), ("contrast", contrast))}
        self.consistency_alpha = self._check_alpha(consistency_alpha)
        if regions not in ("auto", "exact", "codebook"):
            raise ExportError(f"{opt('regions')} must be 'auto', 'exact' or 'codebook', got {regions!r}")
        for name, value in (("max_points", max_points), ("min_points", min_points), ("codebook_size", codebook_size)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ExportError(f"{opt(name)} must be an integer >= 1, got {value!r}")
        if min_points > max_points:
            raise ExportError(f"{opt('min_points')}={min_points} exceeds {opt('max_points')}={max_points}; "
                              "lower the first or raise the second.")
        self.nu, self.boundary, self.gamma = float(nu), boundary, gamma
        self.whiten, self.shrinkage = whiten, float(shrinkage)
        self.max_points, self.min_points = int(max_points), int(min_points)
        self.regions, self.codebook_size = regions, int(codebook_size)
        if self.layers is not None:
            self._regression_layers()   # explicit layers: a wrong setting fails before any work
        self.boundary_threshold: float | None = None
        self._head: UniformHead | None = None

    def _check_source(self, name: str, value: Any) -> str | None:
        """The source tap spec of a ``consistency`` / ``contrast`` given as one (None for the named values)."""
        if not isinstance(value, str) or not value:
            raise ExportError(f"{opt(name)} must be one of {list(CONSISTENCY)} or a tap spec, got {value!r}")
        if value in CONSISTENCY:
            return None
        try:
            if parse_spec(value).is_softmax:
                raise ExportError(f"the source of the {name} regression must be a module of the model "
                                  "(e.g. layer1:grid7), not an output tap")
            resolve_layers(self.model, [value])
        except ExportError as e:
            raise ExportError(f"{opt(name, value)} is neither one of {list(CONSISTENCY)} nor a tap "
                              f"of this model: {e}") from None
        return value

    @staticmethod
    def _check_alpha(alpha: Any) -> float | None:
        if alpha in ("auto", None):
            return None
        try:
            value = float(alpha)
        except (TypeError, ValueError):
            value = float("nan")
        if not value > 0.0 or not np.isfinite(value):
            raise ExportError(f"{opt('consistency_alpha')} must be 'auto' or a number > 0, got {alpha!r}")
        return value

    def _alpha(self, d_src: int) -> float:
        """A consistency / contrast regression's ridge penalty for a source of ``d_src`` dimensions."""
        if self.consistency_alpha is not None:
            return self.consistency_alpha
        return max(1.0, d_src * CONSISTENCY_ALPHA_PER_DIM)

    def source_taps(self) -> list[str]:
        """The regression sources given as tap specs that are not monitored layers: tapped after
        the layers, with no region (no column)."""
        srcs = [s for s in self._sources.values() if s is not None and s not in self.layers]
        return list(dict.fromkeys(srcs))

    def automatic_layers(self, example: torch.Tensor) -> list[str]:
        with torch.no_grad():
            logits = pick_logits(run_model(self.model, example[:2]), self.logits)
        # A model that returns (log-)probabilities (softmax / log_softmax) has an energy of 0 up to
        # rounding: a column of pure rounding noise, rescaled to the other layers', would decide
        # the score.
        energy = [] if output_kind(logits) != "logits" else [ENERGY]
        return [*super().automatic_layers(example), SOFTMAX if logits.shape[1] <= MANY_CLASSES else SOFTMAX_TOP,
                *energy]

    def _whitened(self, dims: Sequence[int]) -> list[bool]:
        modules = [i for i, l in enumerate(self.layers) if l not in OUTPUT_TAPS]
        chosen = set(modules[-1:] if self.whiten == "penultimate" else modules if self.whiten == "all" else [])
        return [i in chosen and d <= MAX_WHITEN_DIM for i, d in enumerate(dims)]

    def params(self) -> dict[str, Any]:
        return {
            "nu": self.nu, "boundary": self.boundary,
            "gamma": [None if g is None else float(g) for g in self.gammas_] if self.boundary == "rbf" else None,
            "feature_maps": [m.kind for m in self.feature_maps_], "whiten": self.whiten,
            "shrinkage": self.shrinkage,
            "max_points_per_class": self.max_points, "reduction": self.reduction,
            "combine": "max",
            "layer_score": "(raw - median) / std of raw over the predicted class's own fitting points",
            **({"score_layer": f"{ENERGY}: -logsumexp(logits), matched at its held-out ID quantiles "
                               f"{list(ALIGN_QUANTILES)} to the other layers' max"} if ENERGY in self.layers else {}),
            "uncalibrated_threshold": "(1 - nu) quantile of the fitting points' scores",
            "support_vectors": [int(r.max_sv) for r in self._head.regions] if self.boundary == "rbf" else None,
            **self._regression_params(),
            "fit_points_per_class": self.fit_counts_, "seed": self.seed,
            "regions": self.regions_kind_,
            "codebook_size": [int(r.codebook_size) for r in self._head.regions]
            if self.regions_kind_ == "codebook" else None,
        }

    def _regression_params(self) -> dict[str, str]:
        """``params()``'s formula of each consistency / contrast column, under its option's name."""
        names = dict(zip(self._head.regions, self.layer_score_names()))
        out = {}
        for r in self._head.regions:
            if not isinstance(r, ConsistencyLayerRegions):
                continue
            if isinstance(r, ContrastLayerRegions):
                out["contrast"] = (f"{names[r]}: log(r_c + {CONTRAST_EPS:g}) - min over k != c of log(r_k + {CONTRAST_EPS:g}), "
                                   f"r_k = ||b * s - (a @ W_k + w_k)||^2 with class k's ridge regression (alpha {r.alpha:g}) "
                                   "of b on a over its fitting points; matched like the score layer")
            else:
                out["consistency"] = (f"{names[r]}: ||b * s - (a @ W_c + w_c)||^2, a per-class ridge regression "
                                      f"(alpha {r.alpha:g}) of b on a over the class's fitting points; matched like "
                                      "the score layer")
        return out

    def _check_labels(self, labels: np.ndarray) -> None:
        counts = np.bincount(labels.astype(np.int64).ravel()) if labels.size else np.zeros(0)
        low = [int(c) for c in np.flatnonzero((counts > 0) & (counts < self.min_points))]
        if low:
            raise ExportError(
                f"class(es) {_ids(low)} have fewer than {opt('min_points')}={self.min_points} samples "
                f"in the fitting data; add data for them or lower {opt('min_points')}."
            )

    def _fit(self, stream) -> None:
        rng = np.random.default_rng(self.seed)
        keys: dict[int, np.ndarray] = {}
        kept: dict[int, list[np.ndarray]] = {}
        moments: list[LayerMoments] | None = None
        for _x, y, logits, feats in stream:
            pred = logits.argmax(1).numpy()
            ok = np.ones(len(pred), bool) if y is None else (pred == y.numpy())
            f_np = [f.numpy().astype(np.float64) for f in feats]
            if moments is None:
                kind = output_kind(logits)
                if ENERGY in self.layers and kind != "logits":
                    what = "log-probabilities (log_softmax" if kind == "log_probabilities" else "probabilities (softmax, read as log p"
                    raise ExportError(
                        f"{ENERGY!r} is -logsumexp(logits), and this model returns {what}: logsumexp = 0 "
                        "for every input), so it would be a column of "
                        f"rounding noise; drop {ENERGY!r} from {opt('layers')}.")
                self._regression_layers()   # a wrong setting fails at the first batch, not after the pass
                moments = [LayerMoments(d, self.num_classes, w) for d, w in zip(self.dims, self._whitened(self.dims))]
                # Each class's reservoir holds its max_points region points (the smallest keys)
                # and, next in key order, its share of the HOLDOUT points: the region points are
                # the same as without them.
                cap = self.max_points + max(1, HOLDOUT // self.num_classes)
            for mom, f in zip(moments, f_np):
                mom.add(f[ok], pred[ok])
            r = rng.random(len(pred))  # priority-sampling keys: keep the smallest per class
            for c in np.unique(pred[ok]):
                sel = np.flatnonzero(ok & (pred == c))
                k = np.concatenate([keys.get(c, np.empty(0)), r[sel]])
                fs = [np.concatenate([kept[c][i], f[sel]]) if c in kept else f[sel] for i, f in enumerate(f_np)]
                if len(k) > cap:
                    top = np.argpartition(k, cap)[:cap]
                    k, fs = k[top], [f[top] for f in fs]
                keys[c], kept[c] = k, fs
        if not self.layers:
            raise ExportError("the uniform detector needs at least one monitored layer.")
        missing = [c for c in range(self.num_classes) if len(keys.get(c, ())) < self.min_points]
        if missing:
            top = max(keys, default=-1)   # the largest class with fitting samples
            features = (self.num_classes > 2 * (top + 1)
                        and set(range(top + 1, self.num_classes)) <= set(missing))
            raise ExportError(
                f"class(es) {_ids(missing)} have fewer than {opt('min_points')}={self.min_points} "
                f"correctly classified fitting samples; add data for them, lower {opt('min_points')}, "
                "or check that the labels match the model's outputs."
                + (f" The model returns {self.num_classes} values per input and no class above {top} "
                   "has samples: if those are features, not logits (a classifier replaced by "
                   "nn.Identity), ufad needs the model that returns one logit per class."
                   if features else "")
            )
        held: dict[int, list[np.ndarray]] = {}
        for c in list(kept):
            order = np.argsort(keys[c], kind="stable")
            kept[c], held[c] = [f[order[:self.max_points]] for f in kept[c]], [f[order[self.max_points:]] for f in kept[c]]
            keys[c] = keys[c][order[:self.max_points]]
        self.fit_counts_ = [int(len(keys[c])) for c in range(self.num_classes)]
        self.feature_maps_ = [m.feature_map(self.shrinkage, TOP_STD_FLOOR if layer == SOFTMAX_TOP else 1e-6)
                              for m, layer in zip(moments, self.layers)]
        # Kept (sklearn's support_vectors_ spirit): the points the regions were fitted on, so a
        # reference implementation (ufad bench's host path) can refit on exactly the same data.
        self.fit_points_ = {int(c): [np.asarray(f, np.float32) for f in fs] for c, fs in kept.items()}
        self._fit_regions(kept, held)

    def _fit_regions(self, kept, held) -> None:
        from tqdm.auto import tqdm

        regions, self.gammas_ = [], []
        jobs = tqdm(total=len(self.layers) * self.num_classes, desc=f"fit {self.boundary} regions",
                    disable=not self.progress, leave=False)
        for li, fmap in enumerate(self.feature_maps_):
            fits = []
            gamma = boundaries.resolve_gamma(self.gamma, len(fmap.mean))
            if self.layers[li] == ENERGY:   # a score already: no region to fit
                regions.append(None)
                if self.boundary == "rbf":
                    self.gammas_.append(None)
                jobs.update(self.num_classes)
                continue
            for c in range(self.num_classes):
                z = fmap.apply(kept[c][li])
                fits.append(boundaries.fit_rbf(z, self.nu, gamma) if self.boundary == "rbf"
                            else boundaries.fit_ball(z, self.nu))
                jobs.update()
            if self.boundary == "rbf":
                self.gammas_.append(gamma)
            regions.append(fits)
        jobs.close()
        self.regions_kind_ = self._regions_kind(regions) if self.boundary == "rbf" else "ball"
        regions = [self._layer_regions(fmap, fits) for fmap, fits in zip(self.feature_maps_, regions)]
        for name, (src, dst) in self._regression_layers().items():
            alpha = self._alpha(self.dims[src])
            setattr(self, f"{name}_alpha_", alpha)
            regions.append(REGRESSIONS[name](src, dst, boundaries.fit_consistency(
                [kept[c][src] for c in range(self.num_classes)], [kept[c][dst] for c in range(self.num_classes)],
                alpha), alpha))
        score_layers = [li for li, r in enumerate(regions)
                        if isinstance(r, (ScoreLayerRegions, ConsistencyLayerRegions))]
        # Centre and scale of each (layer, class): median and spread of raw over that class's
        # own fitting points, computed with the very modules that get exported.
        scales = np.ones((len(regions), self.num_classes))
        centres = np.zeros((len(regions), self.num_classes))
        with torch.no_grad():
            for c in range(self.num_classes):
                for li, reg in enumerate(regions):
                    f = _inputs(reg, li, kept[c])
                    raw = reg.raw_for(*f, torch.full((len(f[0]),), c, dtype=torch.int64)).numpy().astype(np.float64)
                    centres[li, c] = float(np.median(raw))
                    scales[li, c] = max(float(np.std(raw)), SCALE_FLOOR)
        if score_layers and len(score_layers) < len(regions):
            has_held = any(len(h[0]) for h in held.values())
            points = held if has_held else kept
            plain = [li for li in score_layers if isinstance(regions[li], ScoreLayerRegions)]
            rest = [li for li in range(len(regions)) if li not in score_layers]
            # the score layers are matched to the region layers' max; then the consistency
            # column to the max of all of those (what it competes with in the score)
            if plain:
                self._align(regions, centres, scales, plain, rest, points)
            cons = [li for li in score_layers if li not in plain]
            if cons:
                self._align(regions, centres, scales, cons, rest + plain, points, cross_fit=not has_held)
        self.centres_, self.scales_ = centres, scales
        self._head = UniformHead(regions, scales, centres)
        # Uncalibrated threshold: flag what lies beyond the (1 - nu) quantile of the fitting
        # points' own scores (calibrate() on held-out ID data replaces it).
        with torch.no_grad():
            fit_scores = np.concatenate([
                self._head(None, torch.full((len(kept[c][0]),), c, dtype=torch.int64),
                           [torch.tensor(f, dtype=torch.float32) for f in kept[c]])[0].numpy()
                for c in range(self.num_classes)])
        self.boundary_threshold = float(np.quantile(fit_scores, 1.0 - self.nu))

    def _align(self, regions, centres: np.ndarray, scales: np.ndarray, score_layers: list[int],
               others: list[int], points: dict[int, list[np.ndarray]], cross_fit: bool = False) -> None:
        """Put each score layer on the scale of the other layers' max: on held-out ID points
        (``points``), its median and 95% quantile land on theirs. A z-score against its own
        spread would leave it under the max of several layers on ID data, so it would rarely
        decide; matched quantiles make "as unusual as the most unusual other layer" the rule.
        One centre and scale for all classes: the energy's scale is the model's, not a class's.
        With no held-out points (no class has more than ``max_points``), the region points
        (``cross_fit``): a consistency layer then takes its out-of-fold raw, since its
        regression was fitted on those very points (in-sample residuals are ~1.7x smaller on
        6000 MNIST images, and a column matched on them would dominate the max). The region
        layers' max is in-sample then too, so the score layers come out somewhat low: they
        decide less often, never more."""
        head = UniformHead([regions[li] for li in others], scales[others], centres[others])
        u, raw = [], {li: [] for li in score_layers}
        classes = sorted(points)
        cross = {li: dict(zip(classes, boundaries.consistency_cross_raw(
            [points[c][r.src] for c in classes], [points[c][r.dst] for c in classes], r.alpha)))
            for li, r in enumerate(regions) if cross_fit and isinstance(r, ConsistencyLayerRegions)}
        with torch.no_grad():
            for c, fs in points.items():
                if not len(fs[0]):
                    continue
                cls = torch.full((len(fs[0]),), c, dtype=torch.int64)
                u.append(head(None, cls, [torch.tensor(fs[li], dtype=torch.float32) for li in others])[0].numpy())
                for li in score_layers:
                    if li in cross:
                        own = torch.from_numpy(cross[li][c])
                        raw[li].append(regions[li].raw_given_own(own, *_inputs(regions[li], li, fs), cls).numpy())
                    else:
                        raw[li].append(regions[li].raw_for(*_inputs(regions[li], li, fs), cls).numpy())
        qu = np.quantile(np.concatenate(u).astype(np.float64), ALIGN_QUANTILES)
        for li in score_layers:
            qr = np.quantile(np.concatenate(raw[li]).astype(np.float64), ALIGN_QUANTILES)
            if qu[1] - qu[0] <= 0.0 or qr[1] - qr[0] <= 0.0:
                continue   # degenerate (all points alike): keep the per-class z-score
            scale = (qr[1] - qr[0]) / (qu[1] - qu[0])
            centres[li, :], scales[li, :] = qr[0] - qu[0] * scale, scale

    def _regression_layers(self) -> dict[str, tuple[int, int]]:
        """Each set ``consistency`` / ``contrast`` column's regression (source, target) tap
        indices: the last monitored module and the one before it, or the tap named by the option
        (a tap spec), which follows the monitored layers when it is not one of them."""
        modules = [i for i, l in enumerate(self.layers) if l not in OUTPUT_TAPS]
        extra = self.source_taps()
        out = {}
        for name, src in self._sources.items():
            value = getattr(self, name)
            if value == "none":
                continue
            if src is not None:
                if not modules:
                    raise ExportError(
                        f"{opt(name, value)} predicts the last monitored module layer, but the "
                        f"layers {self.layers} hold none; monitor one, or set {opt(name, 'none')}.")
                if src == self.layers[modules[-1]]:
                    raise ExportError(
                        f"{opt(name, value)} names the last monitored module layer itself, "
                        "the one it predicts; name an earlier tap (e.g. an early block on a grid, layer1:grid7).")
                out[name] = (self.layers.index(src) if src in self.layers else len(self.layers) + extra.index(src),
                             modules[-1])
                continue
            if len(modules) < 2:
                raise ExportError(
                    f"{opt(name, value)} predicts the last monitored module layer from "
                    f"the one before it, but the layers {self.layers} hold {len(modules)} module layer(s); "
                    f"monitor two or more, or set {opt(name, 'none')}.")
            out[name] = (modules[-2], modules[-1])
        return out

    def layer_score_names(self) -> list[str]:
        names = super().layer_score_names()
        if self._head is None:
            return names
        return names + [f"{self.taps[r.src].spec}>{self.taps[r.dst].spec}"
                        + (CONTRAST_SUFFIX if isinstance(r, ContrastLayerRegions) else "")
                        for r in self._head.regions if isinstance(r, ConsistencyLayerRegions)]

    def _regions_kind(self, fits: list[list[boundaries.RBFRegion]]) -> str:
        """``regions="auto"``: exact while its ``[C, m, D]`` weights stay within budget."""
        if self.regions != "auto":
            return self.regions
        m = max(len(r.alpha) for layer in fits if layer is not None for r in layer)
        exact = self.num_classes * m * sum(self.dims[:len(self.layers)])   # a consistency source has no region
        budget = max(EXACT_BUDGET, sum(p.numel() for p in self.model.parameters()) // 4)
        return "exact" if exact <= budget else "codebook"

    def _layer_regions(self, fmap, fits) -> nn.Module:
        if fits is None:
            return ScoreLayerRegions(self.num_classes)
        if self.boundary == "ball":
            return BallLayerRegions(fmap, fits)
        if self.regions_kind_ == "codebook":
            return CodebookLayerRegions(fmap, fits, self.codebook_size, CODEBOOK_PER_CLASS, self.seed)
        return RBFLayerRegions(fmap, fits)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

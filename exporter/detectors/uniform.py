"""The uniform detector of Zhao et al. (arXiv 2110.03092): per-class, per-layer bounded regions.

Fit (ID data only): for each monitored layer, map the reduced activations with ID statistics
(``feature_maps``: standardize, or whiten with the tied class covariance on the penultimate
layer); for each class c, take training samples of class c that the model classifies
correctly (at most ``max_points`` of them, a seeded uniform subsample) and fit a region with
``nu`` = 0.1: an RBF one-class SVM / SVDD (default) or a plain ball. By default the monitored
layers are each top-level feature block, the penultimate layer and the classifier's output
layer, as ``sqrt(softmax(logits))`` (``@sqrt_softmax``, see ``capture``).

Score: c^ = argmax logits. At layer l, ``raw_l`` says how far the input lies outside the
region of class c^ (> 0 outside, < 0 inside); ``layer_score_l`` is ``raw_l`` z-scored with
the median and spread of ``raw_l`` over that class's own fitting points, so layers are
comparable. ``score = max_l layer_score_l``. Adversarial inputs are caught because early
layers still look like the true class while the prediction says c^, and because their output
layer sits between classes; noise and OOD inputs fall outside every region.

``raw`` for the RBF region, with K(x, s) = exp(-gamma ||x - s||^2), weights a_i normalised
to sum 1 and rho' = rho / sum(alpha):   raw = log rho' - log sum_i a_i K(x, s_i)
(the log of the one-class SVM decision ratio; > 0 exactly where the SVM says "outside").
For the ball: raw = ||x - centre|| - radius.

``UniformHead`` below IS the scoring math: it is the torch reference and it is what
``torch.onnx.export`` turns into the graph (fused across layers and classes; see its docstring
and BENCHMARKS.md for why it is shaped the way it is).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import click
import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError, opt

from .. import boundaries
from ..taps import SOFTMAX
from ..detector import Detector
from ..registry import Option
from ..feature_maps import MAX_WHITEN_DIM, Affine, FeatureMap, LayerMoments

PAD_LOGIT = -1e30  # log-weight of padding support vectors: exp() of it is exactly 0
# Up to this batch size the head gathers the predicted class's support vectors before the
# matmul (measured crossover on 2 cores: ~16 for the reference CNN; see BENCHMARKS.md).
SMALL_BATCH = 16
# Floor of a (layer, class) spread of raw. raw is a log kernel-density ratio; a class whose
# fitting points all sit in one spot of a layer (a very confident class at @sqrt_softmax)
# can have a spread of 1e-3, and 1/spread would turn float32 rounding into score noise.
SCALE_FLOOR = 0.01


def _ids(ids: Sequence[int], cap: int = 12) -> str:
    """A list of class ids for a message, capped (a 1000-class model can miss hundreds)."""
    shown = ", ".join(str(i) for i in ids[:cap])
    return f"[{shown}{f', ... ({len(ids)} in all)' if len(ids) > cap else ''}]"


class RBFLayerRegions(nn.Module):
    """All classes' RBF regions of one layer. ``forward(f [B,D]) -> raw [B, C]``.

    The feature map and sqrt(gamma) are one affine map u = f . A + b (``Affine``), and
    ||u - s||^2 = ||u||^2 - 2 u.s + ||s||^2 turns the kernel sums of every class into one
    matmul: ``log sum_i a_i K = logsumexp(2 u.s_i + log a_i - ||s_i||^2) - ||u||^2``.
    """

    def __init__(self, fmap: FeatureMap, regions: Sequence[boundaries.RBFRegion]):
        super().__init__()
        c, d = len(regions), len(fmap.mean)
        m = max(len(r.alpha) for r in regions)
        g = math.sqrt(regions[0].gamma)
        sv = np.zeros((c, m, d))
        log_a = np.full((c, m), PAD_LOGIT)
        log_rho = np.zeros(c)
        for k, r in enumerate(regions):
            n = len(r.alpha)
            sv[k, :n] = r.support_vectors * g
            log_a[k, :n] = np.log(r.alpha / r.alpha.sum())
            log_rho[k] = math.log(r.rho / r.alpha.sum())
        bias = log_a - np.where(log_a > PAD_LOGIT, (sv ** 2).sum(-1), 0.0)
        self.num_classes, self.max_sv = c, m
        self.fmap = fmap.scaled(g)                 # u = fmap(f) * sqrt(gamma)
        self.affine = Affine(self.fmap)
        self.register_buffer("sv2", torch.tensor(2.0 * sv.reshape(c * m, d).T, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias.reshape(c * m), dtype=torch.float32))
        self.register_buffer("log_rho", torch.tensor(log_rho, dtype=torch.float32))
        # float64 copies for UniformHead's fused graph (folded before the float32 cast).
        self._f64 = {"sv2": 2.0 * sv, "bias": bias, "log_rho": log_rho}

    def fused(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The affine map and log rho folded in, padded to ``m`` support vectors per class:
        ``z_k = f @ W[k] + c[k]`` with ``W [C, D, m]``, ``c [C, m]``, so that
        ``logsumexp_i z_k[i] = log sum_i a_i K(x, s_i) - ||u||^2 - log rho'_k``."""
        p = self._f64
        c, d = self.num_classes, len(self.fmap.mean)
        sv2 = np.zeros((c, m, d))
        sv2[:, :self.max_sv] = p["sv2"]
        real = np.zeros((c, m), bool)
        real[:, :self.max_sv] = p["bias"] > PAD_LOGIT
        bias = np.pad(p["bias"], ((0, 0), (0, m - self.max_sv)))
        const = sv2 @ self.fmap.bias() + bias - p["log_rho"][:, None]   # b . 2s + bias - log rho'
        const = np.where(real, const, PAD_LOGIT)
        t = self.fmap.transform
        if t.ndim == 2:
            w = np.einsum("de,cme->cdm", t, sv2)                         # A @ 2s, [C, D, m]
        else:
            w = (sv2 * t).transpose(0, 2, 1)                             # diag(w) @ 2s, [C, D, m]
        return np.ascontiguousarray(w), const

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        u = self.affine(f)
        z = torch.matmul(u, self.sv2) + self.bias
        lse = torch.logsumexp(z.reshape(-1, self.num_classes, self.max_sv), dim=2)
        return (u * u).sum(dim=1, keepdim=True) - lse + self.log_rho


class BallLayerRegions(nn.Module):
    """All classes' balls of one layer. ``forward(f [B,D]) -> raw [B, C] = ||h - c|| - r``."""

    def __init__(self, fmap: FeatureMap, regions: Sequence[boundaries.BallRegion]):
        super().__init__()
        self.affine = Affine(fmap)
        self.register_buffer("centers", torch.tensor(np.stack([r.center for r in regions]), dtype=torch.float32))
        self.register_buffer("radius", torch.tensor([r.radius for r in regions], dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        # The differences themselves, not ||h||^2 - 2 h.c + ||c||^2: near a centre that
        # expansion cancels and sqrt() turns the float32 rounding into visible noise.
        diff = self.affine(f).unsqueeze(1) - self.centers                  # [B, C, D]
        return torch.sqrt((diff * diff).sum(dim=2)) - self.radius


class UniformHead(nn.Module):
    """``(logits, pred, feats) -> (score [B], layer_scores [B, L])``; higher = more anomalous.

    layer_score_l = (raw_l[c^] - centre_l[c^]) / scale_l[c^]; score = max over layers.

    With RBF regions the graph is fused across layers (few ops: at batch 1 onnxruntime's
    per-node cost and the weight reads dominate, not the arithmetic): the feature map,
    sqrt(gamma), log rho and the centre are folded into one weight ``W_l [C, D_l, m]`` and
    one constant per layer, the kernel logits of the predicted class come from
    ``_kernel_logits`` (an ``If`` on the batch size in the graph), one ReduceLogSumExp covers
    all layers, and ||u||^2 of every layer is one MatMul of the squared centred features (a
    whitened layer enters that concat as f @ A, one MatMul with its D x D map). The per-layer region
    modules (``raw``) stay the unfused reference; both give the same numbers up to float error.
    """

    def __init__(self, regions: Sequence[nn.Module], scales: np.ndarray, centres: np.ndarray):
        super().__init__()
        self.regions = nn.ModuleList(regions)
        # [L, C] -> stored as [C, L] so one gather picks the predicted class for every layer.
        self.register_buffer("inv_scale", torch.tensor(1.0 / scales.T, dtype=torch.float32))
        self.register_buffer("centre", torch.tensor(centres.T, dtype=torch.float32))
        self.fused = bool(regions) and all(isinstance(r, RBFLayerRegions) for r in regions)
        #: the small-batch branch (torch.cond); the exporter turns it off for a model whose
        #: own graph torch.export cannot trace together with a cond (e.g. some RNNs)
        self.branching = True
        if self.fused:
            self._build_fused(regions, centres)

    def _build_fused(self, regions: Sequence["RBFLayerRegions"], centres: np.ndarray) -> None:
        m = max(r.max_sv for r in regions)
        self.num_classes, self.max_sv = regions[0].num_classes, m
        dims = [len(r.fmap.mean) for r in regions]
        w2 = np.zeros((sum(dims), len(regions)))
        consts, start, self.whitened, centre_of = [], 0, [], []
        for li, (r, d) in enumerate(zip(regions, dims)):
            t = r.fmap.transform
            if t.ndim == 2:   # its segment of the concat holds f A, "centred" by -b: u = f A + b
                self.whitened.append(li)
                self.register_buffer(f"wh_a{li}", torch.tensor(t, dtype=torch.float32))
                centre_of.append(-r.fmap.bias())
                w2[start:start + d, li] = 1.0
            else:             # ||u_l||^2 = sum_{d in l} w_d^2 (f_d - mean_d)^2
                centre_of.append(r.fmap.mean)
                w2[start:start + d, li] = t ** 2
            w, c = r.fused(m)
            self.register_buffer(f"sv_w{li}", torch.tensor(w, dtype=torch.float32))   # [C, D_l, m]
            # logsumexp(z + centre) = logsumexp(z) + centre: the centre costs no graph node.
            consts.append(np.where(c > PAD_LOGIT, c + centres[li][:, None], PAD_LOGIT))
            start += d
        self.register_buffer("sv_c", torch.tensor(np.stack(consts, axis=1), dtype=torch.float32))  # [C, L, m]
        self.register_buffer("feat_mean", torch.tensor(np.concatenate(centre_of), dtype=torch.float32))
        self.register_buffer("norm_w", torch.tensor(w2, dtype=torch.float32))         # [D, L]

    def raw(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw outside-ness of every layer for every class: ``[B, L, C]``."""
        return torch.stack([r(f) for r, f in zip(self.regions, feats)], dim=1)

    def _kernel_logits(self, pred: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        """``f_l @ W_l[pred]`` of every layer, ``[B, L, m]``. Small batches gather the
        predicted class's support vectors first (reads ~1/C of the weights: that is what
        costs at batch 1); large ones run one matmul per layer over all classes and gather
        after (a gathered copy per input would cost more than the matmul). Same math."""
        ws = [getattr(self, f"sv_w{li}") for li in range(len(feats))]
        n_layers, m = len(feats), self.max_sv

        def gather_first(pred, *feats):
            return torch.cat([torch.matmul(f.unsqueeze(1), torch.index_select(w, 0, pred))
                              for f, w in zip(feats, ws)], dim=1)                    # [B, L, m]

        def matmul_first(pred, *feats):
            z = torch.cat([torch.matmul(f, w) for f, w in zip(feats, ws)], dim=2)     # [C, B, L*m]
            idx = pred.reshape(1, -1, 1).expand(1, -1, z.shape[2])
            return z.gather(0, idx).reshape(-1, n_layers, m)

        if not self.branching:
            return matmul_first(pred, *feats)
        return torch.cond(pred.shape[0] <= SMALL_BATCH, gather_first, matmul_first, (pred, *feats))

    def _fused_raw(self, pred: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Centred raw outside-ness of the predicted class at every layer: ``[B, L]``."""
        g = torch.cat([torch.matmul(f, getattr(self, f"wh_a{li}")) if li in self.whitened else f
                       for li, f in enumerate(feats)], dim=1) - self.feat_mean
        norms = torch.matmul(g * g, self.norm_w)                                       # [B, L]
        z = self._kernel_logits(pred, *feats) + torch.index_select(self.sv_c, 0, pred)  # [B, L, m]
        return norms - torch.logsumexp(z, dim=2)

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        if self.fused:
            layer_scores = self._fused_raw(pred, feats) * torch.index_select(self.inv_scale, 0, pred)
            return layer_scores.amax(dim=1), layer_scores
        raw = self.raw(feats)                                        # [B, L, C]
        idx = pred.reshape(-1, 1, 1).expand(-1, raw.shape[1], 1)     # [B, L, 1]
        layer_scores = (raw.gather(2, idx).squeeze(2) - self.centre[pred]) * self.inv_scale[pred]  # [B, L]
        return layer_scores.amax(dim=1), layer_scores


class UniformDetector(Detector):
    """Per-class, per-layer one-class regions (the paper's uniform framework).

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers: module names to monitor, ``"@sqrt_softmax"`` for sqrt(softmax(logits))
            (default: each top-level feature block, the penultimate layer and ``@sqrt_softmax``).
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

    Fitted attributes (after ``fit``): ``feature_maps_`` (one ``FeatureMap`` per layer),
    ``gammas_`` (RBF gamma per layer; empty for the ball), ``fit_points_`` (class ->
    per-layer reduced activations the regions were fitted on), ``fit_counts_``,
    ``centres_`` / ``scales_`` (``[L, C]`` median and spread of raw per layer and class).
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
    )
    WHITEN = ("penultimate", "all", "none")

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, nu: float = 0.1,
                 boundary: str = "rbf", gamma: float | str = "scale", whiten: str = "penultimate",
                 shrinkage: float = 0.01, max_points: int = 1000, min_points: int = 20, **kwargs: Any):
        super().__init__(model, layers, **kwargs)
        if not 0.0 < nu < 1.0:
            raise ExportError(f"{opt('nu')} must be in (0, 1), got {nu}")
        if boundary not in ("rbf", "ball"):
            raise ExportError(f"boundary must be 'rbf' or 'ball', got {boundary!r}")
        if whiten not in self.WHITEN:
            raise ExportError(f"whiten must be one of {self.WHITEN}, got {whiten!r}")
        if not shrinkage > 0.0:
            raise ExportError(f"shrinkage must be > 0, got {shrinkage}")
        for name, value in (("max_points", max_points), ("min_points", min_points)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ExportError(f"{opt(name)} must be an integer >= 1, got {value!r}")
        if min_points > max_points:
            raise ExportError(f"{opt('min_points')}={min_points} exceeds {opt('max_points')}={max_points}; "
                              "lower the first or raise the second.")
        self.nu, self.boundary, self.gamma = float(nu), boundary, gamma
        self.whiten, self.shrinkage = whiten, float(shrinkage)
        self.max_points, self.min_points = int(max_points), int(min_points)
        self.boundary_threshold: float | None = None
        self._head: UniformHead | None = None

    def automatic_layers(self, example: torch.Tensor) -> list[str]:
        return [*super().automatic_layers(example), SOFTMAX]

    def _whitened(self, dims: Sequence[int]) -> list[bool]:
        modules = [i for i, l in enumerate(self.layers) if l != SOFTMAX]
        chosen = set(modules[-1:] if self.whiten == "penultimate" else modules if self.whiten == "all" else [])
        return [i in chosen and d <= MAX_WHITEN_DIM for i, d in enumerate(dims)]

    def params(self) -> dict[str, Any]:
        return {
            "nu": self.nu, "boundary": self.boundary,
            "gamma": [float(g) for g in self.gammas_] if self.boundary == "rbf" else None,
            "feature_maps": [m.kind for m in self.feature_maps_], "whiten": self.whiten,
            "shrinkage": self.shrinkage,
            "max_points_per_class": self.max_points, "reduction": self.reduction,
            "combine": "max",
            "layer_score": "(raw - median) / std of raw over the predicted class's own fitting points",
            "uncalibrated_threshold": "(1 - nu) quantile of the fitting points' scores",
            "support_vectors": [int(r.max_sv) for r in self._head.regions] if self.boundary == "rbf" else None,
            "fit_points_per_class": self.fit_counts_, "seed": self.seed,
        }

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
                moments = [LayerMoments(d, self.num_classes, w) for d, w in zip(self.dims, self._whitened(self.dims))]
            for mom, f in zip(moments, f_np):
                mom.add(f[ok], pred[ok])
            r = rng.random(len(pred))  # priority-sampling keys: keep the smallest per class
            for c in np.unique(pred[ok]):
                sel = np.flatnonzero(ok & (pred == c))
                k = np.concatenate([keys.get(c, np.empty(0)), r[sel]])
                fs = [np.concatenate([kept[c][i], f[sel]]) if c in kept else f[sel] for i, f in enumerate(f_np)]
                if len(k) > self.max_points:
                    top = np.argpartition(k, self.max_points)[:self.max_points]
                    k, fs = k[top], [f[top] for f in fs]
                keys[c], kept[c] = k, fs
        if not self.layers:
            raise ExportError("the uniform detector needs at least one monitored layer.")
        missing = [c for c in range(self.num_classes) if len(keys.get(c, ())) < self.min_points]
        if missing:
            raise ExportError(
                f"class(es) {_ids(missing)} have fewer than {opt('min_points')}={self.min_points} "
                f"correctly classified fitting samples; add data for them, lower {opt('min_points')}, "
                "or check that the labels match the model's outputs."
            )
        self.fit_counts_ = [int(len(keys[c])) for c in range(self.num_classes)]
        self.feature_maps_ = [m.feature_map(self.shrinkage) for m in moments]
        # Kept (sklearn's support_vectors_ spirit): the points the regions were fitted on, so a
        # reference implementation (ufad bench's host path) can refit on exactly the same data.
        self.fit_points_ = {int(c): [np.asarray(f, np.float32) for f in fs] for c, fs in kept.items()}
        self._fit_regions(kept)

    def _fit_regions(self, kept) -> None:
        from tqdm.auto import tqdm

        regions, self.gammas_ = [], []
        jobs = tqdm(total=len(self.layers) * self.num_classes, desc=f"fit {self.boundary} regions",
                    disable=not self.progress, leave=False)
        for li, fmap in enumerate(self.feature_maps_):
            fits = []
            gamma = boundaries.resolve_gamma(self.gamma, len(fmap.mean))
            for c in range(self.num_classes):
                z = fmap.apply(kept[c][li])
                fits.append(boundaries.fit_rbf(z, self.nu, gamma) if self.boundary == "rbf"
                            else boundaries.fit_ball(z, self.nu))
                jobs.update()
            if self.boundary == "rbf":
                self.gammas_.append(gamma)
                regions.append(RBFLayerRegions(fmap, fits))
            else:
                regions.append(BallLayerRegions(fmap, fits))
        jobs.close()
        # Centre and scale of each (layer, class): median and spread of raw over that class's
        # own fitting points, computed with the very modules that get exported.
        scales = np.ones((len(self.layers), self.num_classes))
        centres = np.zeros((len(self.layers), self.num_classes))
        with torch.no_grad():
            for c in range(self.num_classes):
                for li, reg in enumerate(regions):
                    raw = reg(torch.tensor(kept[c][li], dtype=torch.float32))[:, c].numpy().astype(np.float64)
                    centres[li, c] = float(np.median(raw))
                    scales[li, c] = max(float(np.std(raw)), SCALE_FLOOR)
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

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

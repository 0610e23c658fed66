"""The uniform detector of Zhao et al. (arXiv 2110.03092): per-class, per-layer bounded regions.

Fit (ID data only): for each monitored layer, standardize the reduced activations with ID
statistics; for each class c, take training samples of class c that the model classifies
correctly (at most ``max_points`` of them, a seeded uniform subsample) and fit a region with
``nu`` = 0.1: an RBF one-class SVM / SVDD (default) or a plain ball.

Score: c^ = argmax logits. At layer l, ``raw_l`` says how far the input lies outside the
region of class c^ (> 0 outside, < 0 inside) and is divided by the spread of ``raw_l`` over
that class's own ID points, so layers are comparable. ``score = max_l layer_score_l``.
Adversarial inputs are caught because early layers still look like the true class while the
prediction says c^; noise and OOD inputs fall outside every region.

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

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError

from .. import boundaries
from ..detector import Detector

PAD_LOGIT = -1e30  # log-weight of padding support vectors: exp() of it is exactly 0
# Up to this batch size the head gathers the predicted class's support vectors before the
# matmul (measured crossover on 2 cores: ~16 for the reference CNN; see BENCHMARKS.md).
SMALL_BATCH = 16


class RBFLayerRegions(nn.Module):
    """All classes' RBF regions of one layer. ``forward(f [B,D], pred [B]) -> raw [B, C]``.

    The standardization and sqrt(gamma) are folded into one affine map u = f * w + b, and
    ||u - s||^2 = ||u||^2 - 2 u.s + ||s||^2 turns the kernel sums of every class into one
    matmul: ``log sum_i a_i K = logsumexp(2 u.s_i + log a_i - ||s_i||^2) - ||u||^2``.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, regions: Sequence[boundaries.RBFRegion]):
        super().__init__()
        c, d = len(regions), len(mean)
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
        self.register_buffer("w", torch.tensor(g / std, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(-mean * g / std, dtype=torch.float32))
        self.register_buffer("sv2", torch.tensor(2.0 * sv.reshape(c * m, d).T, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias.reshape(c * m), dtype=torch.float32))
        self.register_buffer("log_rho", torch.tensor(log_rho, dtype=torch.float32))
        # float64 copies for UniformHead's fused graph (folded before the float32 cast).
        self._f64 = {"mean": np.asarray(mean, np.float64), "w": g / np.asarray(std, np.float64),
                     "sv2": 2.0 * sv, "bias": bias, "log_rho": log_rho}

    def fused(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """The affine map and log rho folded in, padded to ``m`` support vectors per class:
        ``z_k = f @ W[k] + c[k]`` with ``W [C, D, m]``, ``c [C, m]``, so that
        ``logsumexp_i z_k[i] = log sum_i a_i K(x, s_i) - ||u||^2 - log rho'_k``."""
        p = self._f64
        c, d = self.num_classes, len(p["mean"])
        sv2 = np.zeros((c, m, d))
        sv2[:, :self.max_sv] = p["sv2"]
        real = np.zeros((c, m), bool)
        real[:, :self.max_sv] = p["bias"] > PAD_LOGIT
        bias = np.pad(p["bias"], ((0, 0), (0, m - self.max_sv)))
        const = sv2 @ (-p["mean"] * p["w"]) + bias - p["log_rho"][:, None]   # b @ sv2 + bias - log rho'
        const = np.where(real, const, PAD_LOGIT)
        w = np.ascontiguousarray((sv2 * p["w"]).transpose(0, 2, 1))           # diag(w) @ sv2, [C, D, m]
        return w, const

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        u = f * self.w + self.b
        z = torch.matmul(u, self.sv2) + self.bias
        lse = torch.logsumexp(z.reshape(-1, self.num_classes, self.max_sv), dim=2)
        return (u * u).sum(dim=1, keepdim=True) - lse + self.log_rho


class BallLayerRegions(nn.Module):
    """All classes' balls of one layer. ``forward(f [B,D]) -> raw [B, C] = ||h - c|| - r``."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, regions: Sequence[boundaries.BallRegion]):
        super().__init__()
        centers = np.stack([r.center for r in regions])
        self.register_buffer("w", torch.tensor(1.0 / std, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(-mean / std, dtype=torch.float32))
        self.register_buffer("c2", torch.tensor(2.0 * centers.T, dtype=torch.float32))
        self.register_buffer("cc", torch.tensor((centers ** 2).sum(1), dtype=torch.float32))
        self.register_buffer("radius", torch.tensor([r.radius for r in regions], dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        h = f * self.w + self.b
        d2 = (h * h).sum(dim=1, keepdim=True) - torch.matmul(h, self.c2) + self.cc
        return torch.sqrt(torch.clamp(d2, min=0.0)) - self.radius


class UniformHead(nn.Module):
    """``(logits, pred, feats) -> (score [B], layer_scores [B, L])``; higher = more anomalous.

    layer_score_l = raw_l[c^] / scale_l[c^]; score = max over layers.

    With RBF regions the graph is fused across layers (few ops: at batch 1 onnxruntime's
    per-node cost and the weight reads dominate, not the arithmetic): standardisation,
    sqrt(gamma) and log rho are folded into one weight ``W_l [C, D_l, m]`` per layer, the
    kernel logits of the predicted class come from ``_kernel_logits`` (an ``If`` on the
    batch size in the graph), one ReduceLogSumExp covers all layers, and ||u||^2 of every
    layer is one MatMul of the squared centred features. The per-layer region modules
    (``raw``) stay the unfused reference; both give the same numbers up to float error.
    """

    def __init__(self, regions: Sequence[nn.Module], scales: np.ndarray):
        super().__init__()
        self.regions = nn.ModuleList(regions)
        # [L, C] -> stored as [C, L] so one gather picks the predicted class for every layer.
        self.register_buffer("inv_scale", torch.tensor(1.0 / scales.T, dtype=torch.float32))
        self.fused = bool(regions) and all(isinstance(r, RBFLayerRegions) for r in regions)
        if self.fused:
            self._build_fused(regions)

    def _build_fused(self, regions: Sequence["RBFLayerRegions"]) -> None:
        m = max(r.max_sv for r in regions)
        self.num_classes, self.max_sv = regions[0].num_classes, m
        dims = [len(r._f64["mean"]) for r in regions]
        w2 = np.zeros((sum(dims), len(regions)))
        consts, start = [], 0
        for li, (r, d) in enumerate(zip(regions, dims)):
            w2[start:start + d, li] = r._f64["w"] ** 2   # ||u_l||^2 = sum_{d in l} w_d^2 (f_d - mean_d)^2
            w, c = r.fused(m)
            self.register_buffer(f"sv_w{li}", torch.tensor(w, dtype=torch.float32))   # [C, D_l, m]
            consts.append(c)
            start += d
        self.register_buffer("sv_c", torch.tensor(np.stack(consts, axis=1), dtype=torch.float32))  # [C, L, m]
        self.register_buffer("feat_mean", torch.tensor(np.concatenate([r._f64["mean"] for r in regions]),
                                                       dtype=torch.float32))
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

        return torch.cond(pred.shape[0] <= SMALL_BATCH, gather_first, matmul_first, (pred, *feats))

    def _fused_raw(self, pred: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw outside-ness of the predicted class at every layer: ``[B, L]``."""
        g = torch.cat(list(feats), dim=1) - self.feat_mean
        norms = torch.matmul(g * g, self.norm_w)                                       # [B, L]
        z = self._kernel_logits(pred, *feats) + torch.index_select(self.sv_c, 0, pred)  # [B, L, m]
        return norms - torch.logsumexp(z, dim=2)

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        if self.fused:
            layer_scores = self._fused_raw(pred, feats) * torch.index_select(self.inv_scale, 0, pred)
            return layer_scores.amax(dim=1), layer_scores
        raw = self.raw(feats)                                        # [B, L, C]
        idx = pred.reshape(-1, 1, 1).expand(-1, raw.shape[1], 1)     # [B, L, 1]
        layer_scores = raw.gather(2, idx).squeeze(2) * self.inv_scale[pred]  # [B, L]
        return layer_scores.amax(dim=1), layer_scores


class UniformDetector(Detector):
    """Per-class, per-layer one-class regions (the paper's uniform framework).

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers: module names to monitor (default: each top-level feature block + penultimate).
        nu: fraction of ID fitting points allowed outside each region (paper: 0.1).
        boundary: ``"rbf"`` (one-class SVM / SVDD, default) or ``"ball"`` (tiny, linear).
        gamma: RBF width on standardized features; ``"scale"`` = 1 / D.
        max_points: cap of fitting points per class (keeps the graph small and fit fast).
        min_points: fewer correctly classified points than this for a class is an error.
    """

    method = "uniform"
    boundary_threshold = 0.0  # the pure nu rule: outside any region of the predicted class

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *, nu: float = 0.1,
                 boundary: str = "rbf", gamma: float | str = "scale", max_points: int = 1000,
                 min_points: int = 20, **kwargs: Any):
        super().__init__(model, layers, **kwargs)
        if not 0.0 < nu < 1.0:
            raise ExportError(f"nu must be in (0, 1), got {nu}")
        if boundary not in ("rbf", "ball"):
            raise ExportError(f"boundary must be 'rbf' or 'ball', got {boundary!r}")
        self.nu, self.boundary, self.gamma = float(nu), boundary, gamma
        self.max_points, self.min_points = int(max_points), int(min_points)
        self._head: UniformHead | None = None

    def params(self) -> dict[str, Any]:
        return {
            "nu": self.nu, "boundary": self.boundary,
            "gamma": [float(g) for g in self._gammas] if self.boundary == "rbf" else None,
            "max_points_per_class": self.max_points, "reduction": self.reduction,
            "combine": "max", "layer_score": "raw / scale of the predicted class's region",
            "support_vectors": [int(r.max_sv) for r in self._head.regions] if self.boundary == "rbf" else None,
            "fit_points_per_class": self._counts, "seed": self.seed,
        }

    def _check_labels(self, labels: np.ndarray) -> None:
        counts = np.bincount(labels.astype(np.int64).ravel()) if labels.size else np.zeros(0)
        low = [int(c) for c in np.flatnonzero((counts > 0) & (counts < self.min_points))]
        if low:
            raise ExportError(
                f"class(es) {low} have fewer than min_points={self.min_points} samples in the "
                "fitting data; add data for them or lower min_points."
            )

    def _fit(self, stream) -> None:
        rng = np.random.default_rng(self.seed)
        keys: dict[int, np.ndarray] = {}
        kept: dict[int, list[np.ndarray]] = {}
        sums = sq = None
        n_total = 0
        for _x, y, logits, feats in stream:
            pred = logits.argmax(1).numpy()
            self.num_classes = logits.shape[1]
            ok = np.ones(len(pred), bool) if y is None else (pred == y.numpy())
            f_np = [f.numpy().astype(np.float64) for f in feats]
            if sums is None:
                sums = [np.zeros(f.shape[1]) for f in f_np]
                sq = [np.zeros(f.shape[1]) for f in f_np]
                self.dims = [f.shape[1] for f in f_np]
            for i, f in enumerate(f_np):
                sums[i] += f[ok].sum(0)
                sq[i] += (f[ok] ** 2).sum(0)
            n_total += int(ok.sum())
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
                f"class(es) {missing} have fewer than min_points={self.min_points} correctly "
                "classified fitting samples; add data for them, lower min_points, or check "
                "that the labels match the model's outputs."
            )
        self._counts = [int(len(keys[c])) for c in range(self.num_classes)]
        means = [s / n_total for s in sums]
        stds = []
        for s2, m in zip(sq, means):
            std = np.sqrt(np.maximum(s2 / n_total - m ** 2, 0.0))
            # Dead channels (constant on ID) would give infinite z-scores: floor the spread.
            stds.append(np.maximum(std, max(1e-2 * float(np.median(std)), 1e-6)))
        self._fit_regions(kept, means, stds)

    def _fit_regions(self, kept, means, stds) -> None:
        from tqdm.auto import tqdm

        regions, self._gammas = [], []
        jobs = tqdm(total=len(self.layers) * self.num_classes, desc=f"fit {self.boundary} regions",
                    disable=not self.progress, leave=False)
        for li in range(len(self.layers)):
            z = [(kept[c][li] - means[li]) / stds[li] for c in range(self.num_classes)]
            if self.boundary == "rbf":
                gamma = boundaries.resolve_gamma(self.gamma, len(means[li]))
                self._gammas.append(gamma)
                fits = []
                for zc in z:
                    fits.append(boundaries.fit_rbf(zc, self.nu, gamma))
                    jobs.update()
                regions.append(RBFLayerRegions(means[li], stds[li], fits))
            else:
                fits = []
                for zc in z:
                    fits.append(boundaries.fit_ball(zc, self.nu))
                    jobs.update()
                regions.append(BallLayerRegions(means[li], stds[li], fits))
        jobs.close()
        # Scale of each (layer, class): spread of raw over that class's own fitting points,
        # computed with the very head that gets exported.
        scales = np.ones((len(self.layers), self.num_classes))
        with torch.no_grad():
            for c in range(self.num_classes):
                for li, reg in enumerate(regions):
                    raw = reg(torch.tensor(kept[c][li], dtype=torch.float32))[:, c].numpy()
                    scales[li, c] = max(float(np.std(raw)), 1e-6)
        self._head = UniformHead(regions, scales)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

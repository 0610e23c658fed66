"""The uniform detector's scoring math, as torch modules: this IS the torch reference and it
is what ``torch.onnx.export`` turns into the graph.

Per layer, the regions of every class (``raw`` = how far outside, > 0 outside):

- ``RBFLayerRegions``: each class's own support vectors (the exact one-class SVM). With
  K(x, s) = exp(-gamma ||x - s||^2), weights a_i normalised to sum 1 and rho' = rho / sum(alpha):
  raw = log rho' - log sum_i a_i K(x, s_i).
- ``CodebookLayerRegions``: the same density over prototypes shared by all classes (k-means of
  every class's support vectors); class c keeps the weights of at most ``per_class`` of them.
  Stored as ``[K, D]`` + ``[C, per_class]``: linear in the number of classes, where the exact
  form is ``[C, m, D]`` (and ``D = C`` at ``@sqrt_softmax``).
- ``BallLayerRegions``: raw = ||x - centre|| - radius.
- ``ScoreLayerRegions``: a one-dimensional tap that is a score already (``@energy``): raw =
  the value itself, for every class.
- ``ConsistencyLayerRegions``: no tap of its own: how far one tap's features lie from what
  the class's own points predict from an earlier tap's (``consistency="penultimate"``).
- ``ContrastLayerRegions``: the same regressions, read for every class: how much better the
  best other class explains that tap than the predicted class does (``contrast="layer3"``).

``UniformHead`` z-scores the predicted class's raw per layer and takes the max.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .. import boundaries
from ..feature_maps import Affine, FeatureMap

PAD_LOGIT = -1e30  # log-weight of padding support vectors: exp() of it is exactly 0
#: added to a contrast column's residuals before the log: residuals are sums of squares of
#: standardized features (~D_dst on ID data), so this only keeps log() finite at 0
CONTRAST_EPS = 1e-6

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


    def raw_for(self, f: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """raw of class ``cls[i]`` for row i, ``[B]``."""
        return self(f).gather(1, cls.reshape(-1, 1)).squeeze(1)


class CodebookLayerRegions(nn.Module):
    """All classes' RBF regions of one layer over one shared codebook (see the module
    docstring). ``forward(f [B, D]) -> raw [B, C]``; ``raw_for(f, cls) -> [B]`` reads only the
    given classes' weights, which is what the graph runs."""

    def __init__(self, fmap: FeatureMap, regions: Sequence[boundaries.RBFRegion], size: int,
                 per_class: int, seed: int = 0):
        super().__init__()
        g = math.sqrt(regions[0].gamma)
        book, assign = boundaries.codebook([r.support_vectors * g for r in regions], size, seed)
        c, t = len(regions), max(1, min(per_class, max(len(a) for a in assign)))
        idx = np.zeros((c, t), np.int32)   # int32 halves the largest per-class table; cast after the gather
        log_a = np.full((c, t), PAD_LOGIT)
        log_rho = np.zeros(c)
        for k, (r, a) in enumerate(zip(regions, assign)):
            # each support vector's weight moves to its prototype; a class keeps its t heaviest
            w = np.bincount(a, weights=r.alpha, minlength=len(book))
            top = np.argsort(-w)[:t]
            top = top[w[top] > 0]
            idx[k, :len(top)] = top
            log_a[k, :len(top)] = np.log(w[top] / w[top].sum())
            log_rho[k] = math.log(r.rho / r.alpha.sum())
        # Anchored at the class's heaviest prototype q: ||u - p||^2 = ||w||^2 - 2 w.p + 2 w.q +
        # ||p - q||^2 with w = u - q small for the class's own inputs, and ||p - q||^2 folded
        # in float64. Expanding around 0 instead (||u||^2 - 2 u.p + ||p||^2) subtracts large
        # numbers: on tight, far-apart classes float32 rounding then reaches 1e-3 of the score.
        anchor = book[idx[:, 0]]
        log_a = log_a - ((book[idx] - anchor[:, None, :]) ** 2).sum(-1)
        self.num_classes, self.max_sv, self.codebook_size = c, t, len(book)
        self.affine = Affine(fmap.scaled(g))                 # u = fmap(f) * sqrt(gamma)
        self.register_buffer("book", torch.tensor(book, dtype=torch.float32))              # [K, D]
        self.register_buffer("idx", torch.tensor(idx))                                     # [C, t]
        self.register_buffer("log_a", torch.tensor(log_a, dtype=torch.float32))           # [C, t]
        self.register_buffer("log_rho", torch.tensor(log_rho, dtype=torch.float32))       # [C]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Every class's raw (the reference; the graph runs ``raw_for``): ``[B, C]``."""
        return torch.stack([self.raw_for(f, torch.full((len(f),), c, dtype=torch.int64))
                            for c in range(self.num_classes)], dim=1)

    def raw_for(self, f: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        idx = torch.index_select(self.idx, 0, cls).long()                                 # [B, t]
        q = torch.index_select(self.book, 0, idx[:, 0])                                   # [B, D]
        w = self.affine(f) - q
        zc = 2.0 * torch.gather(torch.matmul(w, self.book.T), 1, idx)                     # [B, t]
        zc = zc - 2.0 * (w * q).sum(dim=1, keepdim=True) + torch.index_select(self.log_a, 0, cls)
        return (w * w).sum(dim=1) - torch.logsumexp(zc, dim=1) + torch.index_select(self.log_rho, 0, cls)


class BallLayerRegions(nn.Module):
    """All classes' balls of one layer. ``forward(f [B,D]) -> raw [B, C] = ||h - c|| - r``."""

    def __init__(self, fmap: FeatureMap, regions: Sequence[boundaries.BallRegion]):
        super().__init__()
        self.fmap, self.num_classes = fmap, len(regions)
        self.affine = Affine(fmap)
        # float64 copies for UniformHead's fused graph (folded before the float32 cast).
        self._f64 = {"centers": np.stack([r.center for r in regions]), "radius": np.array([r.radius for r in regions])}
        self.register_buffer("centers", torch.tensor(self._f64["centers"], dtype=torch.float32))
        self.register_buffer("radius", torch.tensor(self._f64["radius"], dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        # The differences themselves, not ||h||^2 - 2 h.c + ||c||^2: near a centre that
        # expansion cancels and sqrt() turns the float32 rounding into visible noise.
        diff = self.affine(f).unsqueeze(1) - self.centers                  # [B, C, D]
        return torch.sqrt((diff * diff).sum(dim=2)) - self.radius

    def raw_for(self, f: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return self(f).gather(1, cls.reshape(-1, 1)).squeeze(1)


class ScoreLayerRegions(nn.Module):
    """A tap whose one value is a score already (``@energy``). ``forward(f [B,1]) -> raw [B, C]``
    = that value for every class: no region is fitted; its centre and scale (set by
    ``UniformDetector``) make it comparable with the other layers."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.max_sv = self.codebook_size = 0   # what params() reports per layer: none stored

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f[:, :1].expand(-1, self.num_classes)

    def raw_for(self, f: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return f[:, 0]


class ConsistencyLayerRegions(nn.Module):
    """Layer-to-layer consistency (``consistency="penultimate"``): how far layer ``dst``'s
    features lie from what class c's own fitting points predict from layer ``src``'s (a
    per-class ridge regression, ``boundaries.fit_consistency``); raw = ||residual||^2 of the
    standardized features. An input whose later features do not follow from its earlier ones
    the way the predicted class's do (an attack that moved the prediction, not the evidence
    below it) has a large residual. ``raw_for(f_src, f_dst, cls) -> [B]``; like a score layer,
    one centre and scale for all classes (set by ``UniformDetector``)."""

    def __init__(self, src: int, dst: int, fit: boundaries.ConsistencyFit, alpha: float):
        super().__init__()
        self.src, self.dst = int(src), int(dst)
        self.alpha = float(alpha)   # the ridge penalty it was fitted with (an out-of-fold refit uses it)
        self.num_classes = len(fit.weight)
        self.max_sv = self.codebook_size = 0   # what params() reports per layer: none stored
        self.register_buffer("weight", torch.tensor(fit.weight, dtype=torch.float32))        # [C, D_src, D_dst]
        self.register_buffer("bias", torch.tensor(fit.bias, dtype=torch.float32))            # [C, D_dst]
        self.register_buffer("dst_scale", torch.tensor(fit.dst_scale, dtype=torch.float32))  # [D_dst]

    def forward(self, f_src: torch.Tensor, f_dst: torch.Tensor) -> torch.Tensor:
        """raw of every class, ``[B, C]``."""
        pred = torch.einsum("bd,cde->bce", f_src, self.weight) + self.bias
        r = (f_dst * self.dst_scale).unsqueeze(1) - pred
        return (r * r).sum(dim=2)

    def raw_for(self, f_src: torch.Tensor, f_dst: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        # Only the classes present in the batch are read (at batch 1: one class's weights).
        pred = per_class_matmul([(f_src, self.weight)], cls) + torch.index_select(self.bias, 0, cls)
        r = f_dst * self.dst_scale - pred
        return (r * r).sum(dim=1)

    def raw_given_own(self, own: torch.Tensor, f_src: torch.Tensor, f_dst: torch.Tensor,
                      cls: torch.Tensor) -> torch.Tensor:
        """raw of class ``cls[i]`` when its own residual is ``own[i]`` (an out-of-fold residual of a
        fitting point: ``UniformDetector`` matches the column on those when no point was held out)."""
        return own


class ContrastLayerRegions(ConsistencyLayerRegions):
    """The consistency regression's contrast (``contrast="layer3"``): with r_k the residual of
    class k's regression (``ConsistencyLayerRegions``' raw), raw = log(r_c + eps) - min over
    k != c of log(r_k + eps). < 0 where the predicted class c explains the later tap from the
    earlier one best; > 0 where another class explains it better: a minimal attack (CW,
    DeepFool) moves the prediction across the nearest boundary while the evidence below still
    follows the true class's regression. Reads every class's weights (``C x D_src x D_dst`` per
    input, so it suits a small source such as a block's spatial max)."""

    def _log_residuals(self, f_src: torch.Tensor, f_dst: torch.Tensor) -> torch.Tensor:
        return torch.log(super().forward(f_src, f_dst) + CONTRAST_EPS)          # [B, C]

    def forward(self, f_src: torch.Tensor, f_dst: torch.Tensor) -> torch.Tensor:
        """raw of every class, ``[B, C]`` (as if that class were predicted); the reference, not
        what the graph runs (``raw_for``)."""
        logr = self._log_residuals(f_src, f_dst)
        return torch.stack([self._contrast(logr, torch.full((len(logr),), k, dtype=torch.int64))
                            for k in range(self.num_classes)], dim=1)

    def raw_for(self, f_src: torch.Tensor, f_dst: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return self._contrast(self._log_residuals(f_src, f_dst), cls)

    def raw_given_own(self, own: torch.Tensor, f_src: torch.Tensor, f_dst: torch.Tensor,
                      cls: torch.Tensor) -> torch.Tensor:
        logr = torch.where(self._is_own(cls), torch.log(own + CONTRAST_EPS).unsqueeze(1),
                           self._log_residuals(f_src, f_dst))
        return self._contrast(logr, cls)

    def _is_own(self, cls: torch.Tensor) -> torch.Tensor:
        """``[B, C]``: true at each row's class ``cls[i]``."""
        return cls.reshape(-1, 1) == torch.arange(self.num_classes, device=cls.device)

    def _contrast(self, logr: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """log r_cls - min over the other classes of log r, ``[B]``."""
        others = logr.masked_fill(self._is_own(cls), float("inf")).amin(dim=1)
        return logr.gather(1, cls.reshape(-1, 1)).squeeze(1) - others


def per_class_matmul(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], cls: torch.Tensor) -> torch.Tensor:
    """For each ``(f [B, D_k], w [C, D_k, E_k])``, row i of ``f`` times ``w[cls[i]]``, side by
    side: ``[B, sum E_k]``, reading only the classes present in the batch: at batch 1 that is
    1/C of the weights (what costs there); at large batches every class once, in one matmul
    per pair, gathered after (a gathered copy of the weights per input would cost more than
    the matmul). Same math for every batch size and no branch: an ``If`` on the batch size ran
    no faster on the reference CNN (BENCHMARKS.md) and its ``torch.cond`` cost ~4.5 s of every
    export's trace."""
    classes, row_class = torch.unique(cls, sorted=True, return_inverse=True)
    zs = [torch.matmul(f, torch.index_select(w, 0, classes)) for f, w in pairs]    # [U, B, E_k]
    z = zs[0] if len(zs) == 1 else torch.cat(zs, dim=2)
    idx = row_class.reshape(1, -1, 1).expand(1, -1, z.shape[2])
    return z.gather(0, idx).squeeze(0)


def region_taps(region: nn.Module, li: int) -> tuple[int, ...]:
    """The taps (indices into the per-tap features) that region ``li`` reads: its own, or a
    consistency column's two (consistency columns come after the taps' columns)."""
    return (region.src, region.dst) if isinstance(region, ConsistencyLayerRegions) else (li,)


class UniformHead(nn.Module):
    """``(logits, pred, feats) -> (score [B], layer_scores [B, L])``; higher = more anomalous.

    layer_score_l = (raw_l[c^] - centre_l[c^]) / scale_l[c^]; score = max over layers.

    With RBF regions the graph is fused across layers (few ops: at batch 1 onnxruntime's
    per-node cost and the weight reads dominate, not the arithmetic): the feature map,
    sqrt(gamma), log rho and the centre are folded into one weight ``W_l [C, D_l, m_l]`` and
    one constant per layer, the kernel logits of the predicted class come from
    ``_kernel_logits`` (only the classes present in the batch are read), one ReduceLogSumExp per
    layer over that layer's own width, and ||u||^2 of every layer is one MatMul of the squared
    centred features (a whitened layer enters that concat as f @ A, one MatMul with its D x D
    map). Ball regions share that concat: the predicted class's centres are one gathered row
    of a ``[C, sum D_l]`` constant (the radius and centre one ``[C, L]``), so the ball head is
    ~15 nodes for any number of layers. A score layer (``ScoreLayerRegions``) joins the fused
    layers' columns as its value minus its centre. The per-layer region modules (``raw``) stay
    the unfused reference; both give the same numbers up to float error.
    """

    def __init__(self, regions: Sequence[nn.Module], scales: np.ndarray, centres: np.ndarray):
        super().__init__()
        self.regions = nn.ModuleList(regions)
        # [L, C] -> stored as [C, L] so one gather picks the predicted class for every layer.
        self.register_buffer("inv_scale", torch.tensor(1.0 / scales.T, dtype=torch.float32))
        self.register_buffer("centre", torch.tensor(centres.T, dtype=torch.float32))
        self.region_layers = [i for i, r in enumerate(regions) if isinstance(r, (RBFLayerRegions, BallLayerRegions))]
        self.ball = any(isinstance(regions[i], BallLayerRegions) for i in self.region_layers)
        self.fused = bool(self.region_layers) and all(
            isinstance(r, (RBFLayerRegions, BallLayerRegions, ScoreLayerRegions, ConsistencyLayerRegions))
            for r in regions) and len({type(regions[i]) for i in self.region_layers}) == 1
        if self.fused:
            self._build_fused([regions[i] for i in self.region_layers], centres[self.region_layers])

    def _build_fused(self, regions: Sequence[nn.Module], centres: np.ndarray) -> None:
        """Both kinds read the same concat of the layers' features (a whitened layer as f A)
        minus a point, squared, summed per layer by one MatMul with ``norm_w [D, L]`` (1 for a
        whitened segment, w_d^2 for a standardized one): ||u_l - p_l||^2 per layer."""
        self.num_classes = regions[0].num_classes
        dims = [len(r.fmap.mean) for r in regions]
        w2 = np.zeros((sum(dims), len(regions)))
        start, self.whitened, points = 0, [], []
        for li, (r, d) in enumerate(zip(regions, dims)):
            t = r.fmap.transform
            # The point (in f-space for a standardized segment, in f A-space for a whitened one)
            # whose mapped value u is 0 (RBF: ||u||^2) or the class's ball centre c ([C, D]).
            c = r._f64["centers"] if self.ball else 0.0
            if t.ndim == 2:   # its segment of the concat holds f A: u = f A + b
                self.whitened.append(li)
                self.register_buffer(f"wh_a{li}", torch.tensor(t, dtype=torch.float32))
                points.append(c - r.fmap.bias())
                w2[start:start + d, li] = 1.0
            else:             # u_d = w_d (f_d - mean_d)
                points.append(r.fmap.mean + c / t)
                w2[start:start + d, li] = t ** 2
            start += d
        self.register_buffer("norm_w", torch.tensor(w2, dtype=torch.float32))         # [D, L]
        if self.ball:     # one point per class: [C, D], gathered for the predicted class
            points = [np.broadcast_to(p, (self.num_classes, d)) for p, d in zip(points, dims)]
            self.register_buffer("feat_centre", torch.tensor(np.concatenate(points, axis=1), dtype=torch.float32))
            radius = np.stack([r._f64["radius"] for r in regions], axis=1)             # [C, L]
            self.register_buffer("radius_c", torch.tensor(radius + centres.T, dtype=torch.float32))
            return
        self.register_buffer("feat_mean", torch.tensor(np.concatenate(points), dtype=torch.float32))
        # Each layer keeps its own width (its most support vectors over classes): padding every
        # layer to the widest one read up to 2x the weights at batch 1 (zoo ResNet-18: 498 ->
        # 354 KB per class).
        self.widths = [int(r.max_sv) for r in regions]
        consts = []
        for li, r in enumerate(regions):
            w, c = r.fused(self.widths[li])
            self.register_buffer(f"sv_w{li}", torch.tensor(w, dtype=torch.float32))   # [C, D_l, m_l]
            # logsumexp(z + centre) = logsumexp(z) + centre: the centre costs no graph node.
            consts.append(np.where(c > PAD_LOGIT, c + centres[li][:, None], PAD_LOGIT))
        self.register_buffer("sv_c", torch.tensor(np.concatenate(consts, axis=1), dtype=torch.float32))  # [C, sum m_l]

    def _inputs(self, li: int, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The features region ``li`` reads (``region_taps``)."""
        return tuple(feats[i] for i in region_taps(self.regions[li], li))

    def raw(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Raw outside-ness of every layer for every class: ``[B, L, C]``."""
        return torch.stack([r(*self._inputs(li, feats)) for li, r in enumerate(self.regions)], dim=1)

    def _kernel_logits(self, pred: torch.Tensor, *feats: torch.Tensor) -> torch.Tensor:
        """``f_l @ W_l[pred]`` of every layer side by side, ``[B, sum m_l]`` (``per_class_matmul``).

        A batch of one rounds differently from larger ones (onnxruntime's MatMul takes its
        vector kernel for a single row): the serving batcher (``runtime/serve_requests.py``)
        gives one-input requests a call of their own."""
        return per_class_matmul([(f, getattr(self, f"sv_w{li}")) for li, f in enumerate(feats)], pred)

    def _fused_raw(self, pred: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Centred raw outside-ness of the predicted class at every layer: ``[B, L]``."""
        g = torch.cat([torch.matmul(f, getattr(self, f"wh_a{li}")) if li in self.whitened else f
                       for li, f in enumerate(feats)], dim=1)
        if self.ball:   # ||u - c|| - radius - centre; the differences, not an expansion (see BallLayerRegions)
            g = g - torch.index_select(self.feat_centre, 0, pred)
            return torch.sqrt(torch.matmul(g * g, self.norm_w)) - torch.index_select(self.radius_c, 0, pred)
        g = g - self.feat_mean
        norms = torch.matmul(g * g, self.norm_w)                                       # [B, L]
        z = self._kernel_logits(pred, *feats) + torch.index_select(self.sv_c, 0, pred)  # [B, sum m_l]
        lse = [torch.logsumexp(zl, dim=1, keepdim=True) for zl in torch.split(z, self.widths, dim=1)]
        return norms - torch.cat(lse, dim=1)

    def _with_score_layers(self, pred: torch.Tensor, fused: torch.Tensor,
                           feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused layers' centred raw ``[B, L_regions]`` with the score and consistency layers'
        columns put in layer order (raw - centre); consecutive fused layers stay one slice."""
        if len(self.region_layers) == len(self.regions):
            return fused
        pieces, k = [], 0
        for is_region, run in itertools.groupby(range(len(self.regions)), key=lambda i: i in self.region_layers):
            run = list(run)
            if is_region:
                pieces.append(fused[:, k:k + len(run)])
                k += len(run)
            else:
                pieces += [self._raw_column(i, pred, feats) - torch.index_select(self.centre[:, i], 0, pred).unsqueeze(1)
                           for i in run]
        return torch.cat(pieces, dim=1)

    def _raw_column(self, li: int, pred: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """raw ``[B, 1]`` of a layer outside the fused region block, for the predicted class."""
        if isinstance(self.regions[li], ScoreLayerRegions):
            return feats[li][:, :1]
        return self.regions[li].raw_for(*self._inputs(li, feats), pred).unsqueeze(1)

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        if self.fused:
            fused = self._fused_raw(pred, [feats[i] for i in self.region_layers])
            raw = self._with_score_layers(pred, fused, feats)
            layer_scores = raw * torch.index_select(self.inv_scale, 0, pred)
            return layer_scores.amax(dim=1), layer_scores
        raw = torch.stack([r.raw_for(*self._inputs(li, feats), pred) for li, r in enumerate(self.regions)], dim=1)   # [B, L]
        layer_scores = (raw - torch.index_select(self.centre, 0, pred)) * torch.index_select(self.inv_scale, 0, pred)
        return layer_scores.amax(dim=1), layer_scores

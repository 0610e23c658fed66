"""Mahalanobis baselines (Lee et al., NeurIPS 2018), without input preprocessing and
without the logistic regression on anomaly data (ufad fits on ID data only).

Fit: on correctly classified ID samples (all samples if no labels are given, with the
predicted class as label), one mean per class and one covariance shared by all classes
(tied, divided by N). Its precision is ``V diag(1 / (w + ridge)) V^T`` with ``ridge`` =
``ridge_rel * mean eigenvalue``: units that are constant on ID data (dead ReLUs) get a
large but finite precision instead of an infinite one. The default ``ridge_rel = 1e-9``
is about what pytorch-ood's fixed ``1e-6`` on the unnormalised scatter matrix amounts to
(Lee et al.'s code uses a pseudo-inverse); on the reference CNN AUROC does not move
between 1e-10 and 1e-6, but scores of inputs along near-constant directions do.

Score: ``d(x) = min_c sqrt((f - mu_c)^T P (f - mu_c))`` (the distance, not its half square;
same ranking). ``MultiLayerMahalanobisDetector`` computes ``d_l`` for each monitored
layer, standardises it with its mean / std over ID fitting samples, and combines the
layers by their sum (default) or max.

The head folds everything into one matmul per layer: with ``P = L L^T``, ``c`` the ID
mean, ``g = (f - c) L`` and ``m_k = (mu_k - c) L``:
``d_k^2 = |g|^2 - 2 g.m_k + |m_k|^2`` and ``[g | g.m] = f @ [L | L m^T] - [cL | cL m^T]``.
"""

from __future__ import annotations

from typing import Any, Sequence

import click
import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError

from ..detector import Detector
from ..registry import Option
from ._common import FeatureDetector, Subsample


class ClassGaussians:
    """Streaming per-class sums and a shared scatter matrix in float64.

    Rows are shifted by the first batch's mean before accumulating, so the one-pass
    ``E[ff^T] - mu mu^T`` does not lose the small variances to cancellation.
    """

    def __init__(self, num_classes: int, dim: int):
        self.n = np.zeros(num_classes)
        self.s = np.zeros((num_classes, dim))
        self.ss = np.zeros((dim, dim))
        self.shift: np.ndarray | None = None

    def add(self, f: np.ndarray, labels: np.ndarray) -> None:
        if self.shift is None:
            self.shift = f.mean(0)
        z = f - self.shift
        np.add.at(self.n, labels, 1.0)
        np.add.at(self.s, labels, z)
        self.ss += z.T @ z

    def fit(self, ridge_rel: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(means [C, D], whitening L [D, D] with L L^T = precision, eigenvalues)``."""
        missing = np.flatnonzero(self.n == 0)
        if len(missing):
            raise ExportError(
                f"class(es) {missing.tolist()} have no correctly classified fitting samples; "
                "add data for them or check that the labels match the model's outputs."
            )
        n = self.n.sum()
        mz = self.s / self.n[:, None]
        cov = (self.ss - (mz * self.n[:, None]).T @ mz) / n
        cov = (cov + cov.T) / 2
        w, v = np.linalg.eigh(cov)
        w = np.maximum(w, 0.0)
        ridge = ridge_rel * max(float(w.mean()), 1e-12)
        return mz + self.shift, v / np.sqrt(w + ridge), w


class MahalanobisLayer(nn.Module):
    """One layer's class Gaussians. ``forward(f [B, D]) -> distances [B, C]``."""

    def __init__(self, means: np.ndarray, whiten: np.ndarray, center: np.ndarray):
        super().__init__()
        d = whiten.shape[0]
        m = (means - center) @ whiten                  # [C, D] class means, whitened
        cl = center @ whiten                           # [D]
        self.dim = d
        self.register_buffer("w", torch.tensor(np.concatenate([whiten, whiten @ m.T], 1), dtype=torch.float32))
        self.register_buffer("b", torch.tensor(-np.concatenate([cl, cl @ m.T]), dtype=torch.float32))
        self.register_buffer("mm", torch.tensor((m ** 2).sum(1), dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = torch.matmul(f, self.w) + self.b
        g, gm = z[:, :self.dim], z[:, self.dim:]
        d2 = (g * g).sum(dim=1, keepdim=True) - 2.0 * gm + self.mm
        return torch.sqrt(torch.clamp(d2, min=0.0))


class MahalanobisHead(nn.Module):
    """``score = min_c d_c`` of one layer; ``layer_scores`` = the score, ``[B, 1]``."""

    def __init__(self, layer: MahalanobisLayer):
        super().__init__()
        self.layer = layer

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        s = self.layer(feats[0]).amin(dim=1)
        return s, s.unsqueeze(1)


class MultiMahalanobisHead(nn.Module):
    """``layer_scores_l = (min_c d_lc - loc_l) / scale_l``; score = their sum or max."""

    def __init__(self, layers: Sequence[MahalanobisLayer], loc: np.ndarray, scale: np.ndarray,
                 combine: str):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.combine = combine
        self.register_buffer("loc", torch.tensor(loc, dtype=torch.float32))
        self.register_buffer("inv_scale", torch.tensor(1.0 / scale, dtype=torch.float32))

    def raw(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Unstandardised min-distance of every layer, ``[B, L]``."""
        return torch.stack([m(f).amin(dim=1) for m, f in zip(self.layers, feats)], dim=1)

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        layer_scores = (self.raw(feats) - self.loc) * self.inv_scale
        score = layer_scores.sum(dim=1) if self.combine == "sum" else layer_scores.amax(dim=1)
        return score, layer_scores


def _accumulate(det: Detector, stream, keep: Subsample | None) -> tuple[list[ClassGaussians], int]:
    """Feed correctly classified rows (all rows, labelled by prediction, if no labels) of
    every monitored layer into per-layer class Gaussians; offer all rows to ``keep``.
    Returns the Gaussians and how many rows went into them."""
    stats: list[ClassGaussians] | None = None
    n_fit = 0
    for _x, y, logits, feats in stream:
        pred = logits.argmax(1).numpy()
        ok = np.ones(len(pred), bool) if y is None else pred == y.numpy()
        f64 = [f.numpy().astype(np.float64) for f in feats]
        if stats is None:
            stats = [ClassGaussians(det.num_classes, f.shape[1]) for f in f64]
        for st, f in zip(stats, f64):
            if ok.any():
                st.add(f[ok], pred[ok])
        n_fit += int(ok.sum())
        if keep is not None:
            keep.add(*[f.astype(np.float32) for f in f64])
    return stats, n_fit


def _check_ridge(ridge: float) -> float:
    if not ridge > 0:
        raise ExportError(f"ridge must be > 0 (relative to the mean covariance eigenvalue), got {ridge}")
    return float(ridge)


class MahalanobisDetector(FeatureDetector):
    """Min Mahalanobis distance to the class means of one feature layer (tied covariance).

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers / layer: the feature layer (default: the penultimate module).
        ridge: added to the covariance eigenvalues, relative to their mean.
    """

    method = "mahalanobis"
    rank = 40
    options = (Option("ridge", float, 1e-9, "added to the covariance eigenvalues, relative to their mean"),)

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 layer: str | None = None, ridge: float = 1e-9, **kwargs: Any):
        self.ridge = _check_ridge(ridge)
        super().__init__(model, layers, layer=layer, **kwargs)
        self._head: MahalanobisHead | None = None

    def _fit(self, stream) -> None:
        (st,), self._n_fit = _accumulate(self, stream, None)
        means, whiten, eig = st.fit(self.ridge)
        self._eig = eig
        self.means, self.precision = means, whiten @ whiten.T
        self._head = MahalanobisHead(MahalanobisLayer(means, whiten, means.mean(0)))

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

    def params(self) -> dict[str, Any]:
        return {
            "layer": self.layers[0], "score": "min over classes of the Mahalanobis distance",
            "covariance": "tied, from correctly classified fitting samples", "ridge_rel": self.ridge,
            "fit_samples": self._n_fit, "reduction": self.reduction,
        }


class MultiLayerMahalanobisDetector(Detector):
    """Mahalanobis distance at several layers, each standardised on ID data, combined.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers: modules to monitor (default: as the uniform detector).
        combine: ``"sum"`` (default; additive like Lee et al.'s ensemble, with equal weights
            after standardisation) or ``"max"``.
        ridge: added to each layer's covariance eigenvalues, relative to their mean.
        max_points: ID fitting samples (seeded subsample) used for the standardisation.
    """

    method = "mahalanobis_multi"
    rank = 50
    options = (Option("combine", click.Choice(["sum", "max"]), "sum", "how the standardised layer distances combine"),
               Option("ridge", float, 1e-9, "added to the covariance eigenvalues, relative to their mean"),
               Option("max_points", int, 5000, "ID fitting samples for the standardisation"))

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 combine: str = "sum", ridge: float = 1e-9, max_points: int = 5000, **kwargs: Any):
        if combine not in ("sum", "max"):
            raise ExportError(f"combine must be 'sum' or 'max', got {combine!r}")
        self.combine, self.ridge, self.max_points = combine, _check_ridge(ridge), int(max_points)
        super().__init__(model, layers, **kwargs)
        self._head: MultiMahalanobisHead | None = None

    def _fit(self, stream) -> None:
        keep = Subsample(self.max_points, self.seed)
        stats, self._n_fit = _accumulate(self, stream, keep)
        if not self.layers:
            raise ExportError("mahalanobis_multi needs at least one monitored layer.")
        mods = []
        for st in stats:
            means, whiten, _eig = st.fit(self.ridge)
            mods.append(MahalanobisLayer(means, whiten, means.mean(0)))
        head = MultiMahalanobisHead(mods, np.zeros(len(mods)), np.ones(len(mods)), self.combine)
        # Standardise with the very head that gets exported.
        with torch.no_grad():
            raw = head.raw([torch.from_numpy(f) for f in keep.rows]).double().numpy()
        self._std_points = len(keep)
        loc, scale = raw.mean(0), np.maximum(raw.std(0), 1e-6)
        self._head = MultiMahalanobisHead(mods, loc, scale, self.combine)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

    def params(self) -> dict[str, Any]:
        return {
            "score": f"{self.combine} over layers of (min-class Mahalanobis distance - ID mean) / ID std",
            "combine": self.combine, "covariance": "tied per layer, from correctly classified fitting samples",
            "ridge_rel": self.ridge, "fit_samples": self._n_fit,
            "standardisation_samples": self._std_points, "reduction": self.reduction, "seed": self.seed,
        }

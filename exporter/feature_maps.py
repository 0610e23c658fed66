"""How a monitored layer's features enter the uniform detector's regions.

Two maps, both fitted on correctly classified ID samples only:

- **standardize**: ``h = (f - mean) / std`` per dimension (dead dimensions get a floor);
- **whiten**: ``h = (f - mean) @ P`` with ``P P^T = (Sigma + s I)^-1``, where ``Sigma`` is
  the tied (shared) covariance of the class-centred features, the covariance Mahalanobis
  detectors use, and ``s`` = ``shrinkage`` x its mean eigenvalue keeps weak directions from
  dominating. In ``h``-space the class clusters are round, so an RBF region with one
  ``gamma`` fits them; on the penultimate layer this is what lets the regions catch
  adversarial inputs that move along directions of small ID variance.

``LayerMoments`` accumulates what both need in one streaming pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

#: whitening needs a D x D eigendecomposition and a D x D matrix in the graph; above this
#: dimension the layer is standardized instead (and the metadata says so).
MAX_WHITEN_DIM = 4096


@dataclass
class FeatureMap:
    """``h = (f - mean) * transform`` (vector: standardize) or ``(f - mean) @ transform``
    (matrix: whiten)."""

    mean: np.ndarray
    transform: np.ndarray

    @property
    def kind(self) -> str:
        return "whiten" if self.transform.ndim == 2 else "standardize"

    def apply(self, f: np.ndarray) -> np.ndarray:
        g = np.asarray(f, np.float64) - self.mean
        return g @ self.transform if self.transform.ndim == 2 else g * self.transform

    def scaled(self, s: float) -> "FeatureMap":
        """The same map followed by a multiplication by ``s`` (e.g. sqrt(gamma))."""
        return FeatureMap(self.mean, self.transform * s)

    def bias(self) -> np.ndarray:
        """``b`` of the affine form ``h = f . transform + b``."""
        return -(self.mean @ self.transform) if self.transform.ndim == 2 else -self.mean * self.transform


class Affine(nn.Module):
    """A ``FeatureMap`` as a torch module: ``forward(f [B, D]) -> h [B, D]``."""

    def __init__(self, fmap: FeatureMap):
        super().__init__()
        self.matrix = fmap.transform.ndim == 2
        self.register_buffer("t", torch.tensor(fmap.transform, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(fmap.bias(), dtype=torch.float32))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return (torch.matmul(f, self.t) if self.matrix else f * self.t) + self.b


class LayerMoments:
    """Streaming first and second moments of one layer's features (float64).

    ``add(f, cls)`` takes a batch of features and their classes; the full second moment and
    per-class sums are kept only when ``whiten`` is set (D x D memory).
    """

    def __init__(self, dim: int, num_classes: int, whiten: bool):
        self.n = 0
        self.sum = np.zeros(dim)
        self.sq = np.zeros(dim)
        self.whiten = whiten
        if whiten:
            self.outer = np.zeros((dim, dim))
            self.class_sum = np.zeros((num_classes, dim))
            self.class_n = np.zeros(num_classes)

    def add(self, f: np.ndarray, cls: np.ndarray) -> None:
        self.n += len(f)
        self.sum += f.sum(0)
        self.sq += (f ** 2).sum(0)
        if self.whiten:
            self.outer += f.T @ f
            np.add.at(self.class_sum, cls, f)
            self.class_n += np.bincount(cls, minlength=len(self.class_n))

    def feature_map(self, shrinkage: float, min_std: float = 1e-6) -> FeatureMap:
        """The fitted map: whitening when this layer accumulated for it, else standardization
        (each spread floored at ``min_std`` and at 1% of the median spread)."""
        mean = self.sum / self.n
        if not self.whiten:
            std = np.sqrt(np.maximum(self.sq / self.n - mean ** 2, 0.0))
            # Dead dimensions (constant on ID) would give infinite z-scores: floor the spread.
            return FeatureMap(mean, 1.0 / np.maximum(std, max(1e-2 * float(np.median(std)), min_std)))
        seen = self.class_n > 0
        class_mean = self.class_sum[seen] / self.class_n[seen, None]
        tied = (self.outer - (class_mean.T * self.class_n[seen]) @ class_mean) / self.n
        eig, vec = np.linalg.eigh((tied + tied.T) / 2)
        eig = np.maximum(eig, 0.0)
        eig = eig + max(shrinkage * float(eig.mean()), 1e-12)
        return FeatureMap(mean, vec / np.sqrt(eig))

"""Deep nearest neighbours (Sun et al., ICML 2022).

Fit: L2-normalised features of one layer (default: penultimate) of a seeded uniform
subsample of the ID fitting data (``bank_size`` rows, so the graph stays small).
Score: distance of the normalised input feature to its k-th nearest bank row. For unit
vectors ``|z - b|^2 = 2 - 2 z.b``, so the graph is one matmul and a TopK.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError

from ..registry import Option
from ._common import FeatureDetector, Subsample

EPS = 1e-12


class KNNHead(nn.Module):
    """``score = sqrt(2 - 2 * kth_largest(z @ bank^T))`` with ``z = f / |f|``."""

    def __init__(self, bank: np.ndarray, k: int):
        super().__init__()
        self.k = int(k)
        self.register_buffer("bank_t", torch.tensor(bank.T, dtype=torch.float32))  # [D, N], unit columns

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        f = feats[0]
        z = f / torch.clamp(torch.linalg.vector_norm(f, dim=1, keepdim=True), min=EPS)
        sim = torch.matmul(z, self.bank_t)
        kth = torch.topk(sim, self.k, dim=1).values[:, self.k - 1]
        s = torch.sqrt(torch.clamp(2.0 - 2.0 * kth, min=0.0))
        return s, s.unsqueeze(1)


class KNNDetector(FeatureDetector):
    """Distance to the k-th nearest ID neighbour in normalised feature space.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers / layer: the feature layer (default: the penultimate module).
        k: which neighbour (paper: 50).
        bank_size: ID rows kept (seeded uniform subsample of the fitting data).
    """

    method = "knn"
    rank = 60
    options = (Option("k", int, 50, "which nearest ID neighbour"),
               Option("bank_size", int, 5000, "ID rows kept as neighbours"))

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 layer: str | None = None, k: int = 50, bank_size: int = 5000, **kwargs: Any):
        if k < 1:
            raise ExportError(f"k must be >= 1, got {k}")
        if bank_size < k:
            raise ExportError(f"bank_size ({bank_size}) must be >= k ({k})")
        self.k, self.bank_size = int(k), int(bank_size)
        super().__init__(model, layers, layer=layer, **kwargs)
        self._head: KNNHead | None = None

    def _fit(self, stream) -> None:
        keep = Subsample(self.bank_size, self.seed)
        for _x, _y, _logits, feats in stream:
            keep.add(feats[0].numpy().astype(np.float64))
        (f,) = keep.rows
        if len(f) < self.k:
            raise ExportError(
                f"only {len(f)} fitting samples but k={self.k}; pass more ID data or lower k.")
        self.bank = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), EPS)
        self._head = KNNHead(self.bank, self.k)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

    def params(self) -> dict[str, Any]:
        return {
            "layer": self.layers[0], "k": self.k, "bank_size": int(len(self.bank)),
            "score": "L2 distance of the normalised feature to its k-th nearest normalised ID feature",
            "reduction": self.reduction, "seed": self.seed,
        }

"""Energy baseline (Liu et al., NeurIPS 2020): score = E(x) = -T * logsumexp(logits / T).

The energy itself is the anomaly score (the paper's ID score is its negation).
"""

from __future__ import annotations

import torch

from ._common import LogitHead, TemperedLogitDetector


class EnergyHead(LogitHead):
    """``score = -T * logsumexp(logits / T)``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("t", torch.tensor(temperature, dtype=torch.float32))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return -self.t * torch.logsumexp(logits / self.t, dim=1)


class EnergyDetector(TemperedLogitDetector):
    """Free energy of the logits; higher = more anomalous.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        temperature: T (the paper uses 1).
    """

    method = "energy"
    rank = 30
    head_class = EnergyHead
    formula = "-T * logsumexp(logits / T)"

"""MSP baseline (Hendrycks & Gimpel, ICLR 2017): score = -max softmax probability.

No statistics: the head is the formula. Higher = more anomalous (a confident prediction
scores near -1, a flat softmax near -1/C).
"""

from __future__ import annotations

import torch

from ._common import LogitHead, TemperedLogitDetector


class MSPHead(LogitHead):
    """``score = -max_c softmax(logits / T)_c``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("inv_t", torch.tensor(1.0 / temperature, dtype=torch.float32))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return -torch.softmax(logits * self.inv_t, dim=1).amax(dim=1)


class MSPDetector(TemperedLogitDetector):
    """Maximum softmax probability, negated so that higher = more anomalous.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        temperature: softmax temperature T (1 = the plain baseline).
    """

    method = "msp"
    rank = 10
    head_class = MSPHead
    formula = "-max softmax(logits / T)"

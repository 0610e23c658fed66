"""Energy baseline (Liu et al., NeurIPS 2020): score = E(x) = -T * logsumexp(logits / T).

The energy itself is the anomaly score (the paper's ID score is its negation).
"""

from __future__ import annotations

from typing import Any

import torch

from ufad.runtime.errors import ExportError

from ._common import LogitDetector, LogitHead


class EnergyHead(LogitHead):
    """``score = -T * logsumexp(logits / T)``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("t", torch.tensor(temperature, dtype=torch.float32))

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return -self.t * torch.logsumexp(logits / self.t, dim=1)


class EnergyDetector(LogitDetector):
    """Free energy of the logits; higher = more anomalous.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        temperature: T (the paper uses 1).
    """

    method = "energy"

    def __init__(self, model, layers=None, *, temperature: float = 1.0, **kwargs: Any):
        if not temperature > 0:
            raise ExportError(f"temperature must be > 0, got {temperature}")
        super().__init__(model, layers, **kwargs)
        self.temperature = float(temperature)

    def head(self) -> EnergyHead:
        self._require_fitted()
        return EnergyHead(self.temperature)

    def params(self) -> dict[str, Any]:
        return {"score": "-T * logsumexp(logits / T)", "temperature": self.temperature}

"""MaxLogit baseline (Hendrycks et al., ICML 2022): score = -max logit."""

from __future__ import annotations

from typing import Any

import torch

from ._common import LogitDetector, LogitHead


class MaxLogitHead(LogitHead):
    """``score = -max_c logits_c``."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:
        return -logits.amax(dim=1)


class MaxLogitDetector(LogitDetector):
    """Maximum logit, negated so that higher = more anomalous."""

    method = "maxlogit"
    rank = 20
    head_class = MaxLogitHead

    def params(self) -> dict[str, Any]:
        return {"score": "-max logit"}

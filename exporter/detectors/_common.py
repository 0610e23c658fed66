"""Shared pieces of the baseline detectors: logit-only and single-feature-layer bases, and a
seeded bounded subsample of streamed rows.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError

from ..auto_layers import default_layers
from ..detector import Detector
from ..registry import Option


class LogitHead(nn.Module):
    """Wraps a ``logits [B, C] -> score [B]`` function into the head signature;
    ``layer_scores`` is the score itself, ``[B, 1]``."""

    def score(self, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        s = self.score(logits)
        return s, s.unsqueeze(1)


class LogitDetector(Detector):
    """Base of the logit-only baselines (MSP, MaxLogit, Energy): nothing to fit but the
    number of classes; no monitored layers. Subclasses set ``method`` and ``head_class``."""

    uses_layers = False
    head_class: type[LogitHead] = LogitHead

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, **kwargs: Any):
        if layers:
            raise ExportError(
                f"{self.method} scores the logits only and monitors no layers, but layers="
                f"{list(layers)} was given; drop layers= (or --layers)."
            )
        super().__init__(model, None, **kwargs)

    def _fit(self, stream) -> None:
        # The whole stream is consumed so the recorded input range covers all the data.
        for _batch in stream:
            pass

    def head(self) -> nn.Module:
        self._require_fitted()
        return self.head_class()

    def layer_score_names(self) -> list[str]:
        return [self.method]


class TemperedLogitDetector(LogitDetector):
    """A logit-only baseline with a temperature T (MSP, Energy). Subclasses set ``method``,
    ``head_class`` (constructed with T) and ``formula`` (recorded in the metadata)."""

    options = (Option("temperature", float, 1.0, "softmax temperature T"),)

    formula = ""

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 temperature: float = 1.0, **kwargs: Any):
        if not temperature > 0:
            raise ExportError(f"temperature must be > 0, got {temperature}")
        super().__init__(model, layers, **kwargs)
        self.temperature = float(temperature)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self.head_class(self.temperature)

    def params(self) -> dict[str, Any]:
        return {"score": self.formula, "temperature": self.temperature}


class FeatureDetector(Detector):
    """Base of the detectors that read ONE feature layer (default: the last of
    ``default_layers``, i.e. the penultimate module feeding the classifier).

    ``layers`` (a one-element list, the generic signature) and ``layer`` (a name) are
    alternatives.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 layer: str | None = None, **kwargs: Any):
        chosen = None if layers is None else list(layers)
        if layer is not None:
            if chosen is not None and chosen != [layer]:
                raise ExportError(f"layer={layer!r} and layers={chosen} disagree; pass only one.")
            chosen = [layer]
        if chosen is not None and len(chosen) != 1:
            raise ExportError(
                f"{self.method} reads exactly one feature layer, got {chosen}; pass layer='name' "
                "(default: the penultimate module, the one feeding the classifier)."
            )
        super().__init__(model, chosen, **kwargs)

    def automatic_layers(self, example: torch.Tensor) -> list[str]:
        return default_layers(self.model, example, self.logits)[-1:]


class Subsample:
    """A seeded uniform subsample of at most ``cap`` streamed rows (priority sampling:
    every row gets a random key, the ``cap`` smallest keys are kept), independent of
    how the data is batched."""

    def __init__(self, cap: int, seed: int):
        if cap < 1:
            raise ExportError(f"subsample size must be >= 1, got {cap}")
        self.cap = int(cap)
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0)
        self._rows: list[np.ndarray] | None = None

    def add(self, *arrays: np.ndarray) -> None:
        """Offer one batch (several aligned arrays, same first dimension)."""
        k = np.concatenate([self._keys, self._rng.random(len(arrays[0]))])
        rows = list(arrays) if self._rows is None else [
            np.concatenate([old, new]) for old, new in zip(self._rows, arrays)]
        if len(k) > self.cap:
            top = np.argpartition(k, self.cap)[:self.cap]
            top.sort()  # keep stream order: the result does not depend on argpartition internals
            k, rows = k[top], [r[top] for r in rows]
        self._keys, self._rows = k, rows

    @property
    def rows(self) -> list[np.ndarray]:
        if self._rows is None:
            raise ExportError("no samples were seen; pass at least one batch of ID samples.")
        return self._rows

    def __len__(self) -> int:
        return len(self._keys)

"""ViM, virtual-logit matching (Wang et al., CVPR 2022).

Needs the classifier's final Linear layer (W, b) and the feature that feeds it
(default: the penultimate module). Fit on ID data:
- origin ``u = -pinv(W) b``;
- principal subspace: top ``dim`` eigenvectors of the uncentred covariance of ``f - u``
  (paper: dim = 1000 for features >= 2048, 512 for >= 768, else half the feature size);
  ``R`` = the remaining eigenvectors, so the residual is ``(f - u) R``;
- ``alpha = mean max-logit / mean |residual|`` over the fitting data.
Score: ``alpha * |(f - u) R| - logsumexp(logits)`` (the negated ViM ID score), higher =
more anomalous.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError

from ..registry import Option
from ._common import FeatureDetector, Subsample


def paper_dim(feature_dim: int) -> int:
    """Principal-subspace size as in the ViM reference code."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


class ViMHead(nn.Module):
    """``score = alpha * |f @ R - u @ R| - logsumexp(logits)``."""

    def __init__(self, residual: np.ndarray, origin: np.ndarray, alpha: float):
        super().__init__()
        self.register_buffer("r", torch.tensor(residual, dtype=torch.float32))               # [D, D - dim]
        self.register_buffer("ur", torch.tensor(origin @ residual, dtype=torch.float32))     # [D - dim]
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, pred: torch.Tensor, feats: Sequence[torch.Tensor]):
        res = torch.matmul(feats[0], self.r) - self.ur
        s = self.alpha * torch.linalg.vector_norm(res, dim=1) - torch.logsumexp(logits, dim=1)
        return s, s.unsqueeze(1)


class ViMDetector(FeatureDetector):
    """Virtual-logit matching on the feature feeding the final Linear layer.

    Args:
        model: trained classifier in eval mode, returning logits ``[B, classes]``.
        layers / layer: the module whose output is the classifier's input (default: the
            penultimate module). Checked on the first batch: its output times W plus b
            must give the logits.
        classifier: name of the final ``nn.Linear`` (default: the last one in the model).
        dim: principal-subspace size (default: as in the paper, see ``paper_dim``).
        max_points: fitting rows (seeded subsample) used for the mean residual norm.
    """

    method = "vim"
    rank = 70
    options = (Option("dim", int, None, "principal-subspace size (default: as in the paper)"),
               Option("classifier", str, None, "module name of the final nn.Linear (default: the last one)"),
               Option("max_points", int, 20000, "fitting rows for the mean residual norm"))

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, *,
                 layer: str | None = None, classifier: str | None = None, dim: int | None = None,
                 max_points: int = 20000, **kwargs: Any):
        super().__init__(model, layers, layer=layer, **kwargs)
        self.classifier = classifier or self._last_linear()
        lin = dict(model.named_modules()).get(self.classifier)
        if not isinstance(lin, nn.Linear):
            raise ExportError(
                f"classifier={self.classifier!r} is not an nn.Linear module of the model; ViM "
                "needs the final Linear layer (pass its module name)."
            )
        self.weight = lin.weight.detach().double().numpy()
        self.bias = (lin.bias.detach().double().numpy() if lin.bias is not None
                     else np.zeros(lin.out_features))
        self.dim, self.max_points = dim, int(max_points)
        self._head: ViMHead | None = None

    def _last_linear(self) -> str:
        names = [n for n, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise ExportError("ViM needs a final nn.Linear classifier; the model has no nn.Linear module.")
        return names[-1]

    def _check_feeds_classifier(self, f: np.ndarray, logits: np.ndarray) -> None:
        rebuilt = f @ self.weight.T + self.bias
        err = float(np.abs(rebuilt - logits).max())
        if err > 1e-3 * (1.0 + float(np.abs(logits).max())):
            raise ExportError(
                f"ViM: the output of layer {self.layers[0]!r} times the weights of "
                f"{self.classifier!r} does not give the model's logits (max error {err:.3g}); "
                "pass layer= the module whose output feeds the final Linear layer, and "
                "classifier= that Linear layer."
            )

    def _fit(self, stream) -> None:
        u = -np.linalg.pinv(self.weight) @ self.bias
        scatter = None
        n, sum_maxlogit = 0, 0.0
        keep = Subsample(self.max_points, self.seed)
        for _x, _y, logits, feats in stream:
            f = feats[0].numpy().astype(np.float64)
            lg = logits.numpy().astype(np.float64)
            if scatter is None:
                if f.shape[1] != self.weight.shape[1]:
                    raise ExportError(
                        f"ViM: layer {self.layers[0]!r} gives {f.shape[1]} features but "
                        f"{self.classifier!r} takes {self.weight.shape[1]}; pass layer= the "
                        "module feeding the final Linear layer."
                    )
                self._check_feeds_classifier(f, lg)
                scatter = np.zeros((f.shape[1], f.shape[1]))
            z = f - u
            scatter += z.T @ z
            n += len(f)
            sum_maxlogit += float(lg.max(1).sum())
            keep.add(z)
        d = f.shape[1]
        dim = paper_dim(d) if self.dim is None else int(self.dim)
        if not 0 < dim < d:
            raise ExportError(f"ViM dim must be in [1, {d - 1}] for {d} features, got {dim}")
        self.principal_dim = dim
        _w, v = np.linalg.eigh(scatter / n)              # ascending eigenvalues
        residual = v[:, :d - dim]                        # the d - dim smallest directions
        (zk,) = keep.rows
        mean_norm = float(np.linalg.norm(zk @ residual, axis=1).mean())
        if mean_norm <= 0:
            raise ExportError("ViM: the ID features have no residual outside the principal subspace; lower dim.")
        self.alpha = (sum_maxlogit / n) / mean_norm
        self.origin = u
        self._head = ViMHead(residual, u, self.alpha)

    def head(self) -> nn.Module:
        self._require_fitted()
        return self._head

    def params(self) -> dict[str, Any]:
        return {
            "layer": self.layers[0], "classifier": self.classifier, "principal_dim": self.principal_dim,
            "alpha": self.alpha, "score": "alpha * |residual of (f - u)| - logsumexp(logits)",
            "reduction": self.reduction, "seed": self.seed,
        }

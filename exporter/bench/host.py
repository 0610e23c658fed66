"""(c) the host way: the detector's math as a user without ufad writes it (eager torch +
hooks + scikit-learn), and how close its scores come to the exported detector's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .config import AGREE_RTOL

if TYPE_CHECKING:
    from ..feature_maps import FeatureMap


class HostDetector:
    """The detector math done on the host, as a user without ufad writes it.

    Eager model + forward hooks (the detector's spatial reduction of each monitored layer;
    sqrt(softmax(logits)) for ``@sqrt_softmax``) -> numpy -> the detector's feature maps
    (standardise, or whiten with its matrix) -> per predicted class and layer, scikit-learn
    ``OneClassSVM`` ``decision_function`` d -> raw = log(rho) - log(d + rho) (> 0 outside)
    -> minus the median, divided by the spread of raw over that class's fitting points ->
    max over layers. A score layer (``@energy``, -logsumexp(logits)) has no SVM: raw is its
    value, with the detector's own centre and scale. NaN/Inf inputs score +inf, as in the
    detector.
    """

    def __init__(self, model, layers: Sequence[str], maps: Sequence[FeatureMap], svms,
                 centres: np.ndarray, scales: np.ndarray, reduction: str = "max"):
        from ..taps import OUTPUT_TAPS, Tap, parse_spec

        self.model, self.layers, self.reduction = model, list(layers), reduction
        self._taps = {n: Tap(n, n, "output", reduction) for n in self.layers}
        self.maps, self.svms, self.centres, self.scales = list(maps), svms, centres, scales
        self._acts: dict[str, Any] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(name))
                       for name in self.layers if name not in OUTPUT_TAPS]
        self._outputs = {n: parse_spec(n) for n in self.layers if n in OUTPUT_TAPS}

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._acts[name] = self._taps[name].features(output)
        return hook

    @classmethod
    def refit(cls, model, fit: dict[str, Any], fit_data: dict[str, np.ndarray]) -> "HostDetector":
        """Fit scikit-learn OneClassSVMs on the detector's own fitting points (same nu,
        gamma, tolerance), and each (layer, class) scale as the detector defines it."""
        from sklearn.svm import OneClassSVM

        from ..detectors.uniform import SCALE_FLOOR
        from ..feature_maps import FeatureMap

        n_cls, layers = fit["num_classes"], fit["layers"]
        maps = [FeatureMap(fit_data[f"mean_{l}"], fit_data[f"transform_{l}"]) for l in range(len(layers))]
        svms: list[list[Any]] = []
        scales, centres = np.ones((len(layers), n_cls)), np.zeros((len(layers), n_cls))
        for li, fmap in enumerate(maps):
            row = []
            if str(li) in fit.get("score_layers", {}):
                centres[li, :], scales[li, :] = fit["score_layers"][str(li)]
                svms.append(None)
                continue
            for c in range(n_cls):
                z = fmap.apply(fit_data[f"kept_{li}_{c}"])
                svm = OneClassSVM(kernel="rbf", nu=fit["nu"], gamma=fit["gammas"][li], tol=1e-4,
                                  cache_size=200).fit(z)
                row.append(svm)
                raw = cls._raw(svm, z)
                centres[li, c], scales[li, c] = float(np.median(raw)), max(float(np.std(raw)), SCALE_FLOOR)
            svms.append(row)
        return cls(model, layers, maps, svms, centres, scales, reduction=fit["reduction"])

    @staticmethod
    def _raw(svm, z: np.ndarray) -> np.ndarray:
        rho = float(np.ravel(svm.offset_)[0])
        with np.errstate(divide="ignore"):
            return math.log(rho) - np.log(np.maximum(svm.decision_function(z) + rho, 0.0))

    def score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits, pred, score)`` of a float32 batch; higher score = more anomalous."""
        import torch

        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
        acts = [self._outputs[name].output_features(logits).numpy() if name in self._outputs else self._acts[name].numpy()
                for name in self.layers]
        logits_np = logits.numpy()
        pred = logits_np.argmax(axis=1)
        layer_scores = np.empty((len(x), len(self.layers)))
        for c in np.unique(pred):
            rows = np.flatnonzero(pred == c)
            for li, a in enumerate(acts):
                svm = self.svms[li]
                raw = a[rows, 0] if svm is None else self._raw(svm[c], self.maps[li].apply(a[rows]))
                layer_scores[rows, li] = (raw - self.centres[li, c]) / self.scales[li, c]
        score = layer_scores.max(axis=1)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) | np.isnan(score)
        score[bad] = np.inf
        return logits_np, pred, score

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def agreement(ufad_score: np.ndarray, host_score: np.ndarray, ufad_pred: np.ndarray,
              host_pred: np.ndarray) -> dict[str, Any]:
    """How close (c)'s scores are to (b)'s: max relative diff ``|b - c| / max(1, |c|)``."""
    fin = np.isfinite(ufad_score) & np.isfinite(host_score)
    both_inf = np.isinf(ufad_score) & (ufad_score == host_score)
    d = np.abs(ufad_score[fin].astype(np.float64) - host_score[fin]) / np.maximum(1.0, np.abs(host_score[fin]))
    worst = float(d.max()) if d.size else 0.0
    return {
        "n": int(len(ufad_score)), "n_compared": int(fin.sum()), "n_both_inf": int(both_inf.sum()),
        "n_mismatched_inf": int((~fin & ~both_inf).sum()),
        "pred_agree": float(np.mean(ufad_pred == host_pred)),
        "max_rel_diff": worst, "rtol": AGREE_RTOL,
        "ok": bool(worst <= AGREE_RTOL and (~fin & ~both_inf).sum() == 0),
    }

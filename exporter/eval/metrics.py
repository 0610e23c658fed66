"""Detection metrics for anomaly scores (numpy + scikit-learn only).

Convention (written into every report): scores are "higher = more anomalous". For the
threshold-free metrics, **ID is the positive class** (as in the OOD literature: TPR = fraction
of ID inputs accepted), so an ID sample is "predicted positive" when its score is LOW:

- ``auroc``: area under the ROC curve; 1.0 = every anomaly scores above every ID input,
  0.5 = chance. (Symmetric: it is the same with anomalies as the positive class.)
- ``aupr_in``: average precision with ID as positive, ranked by ``-score``.
- ``aupr_out``: average precision with the anomalies as positive, ranked by ``score``.
- ``fpr_at_95_tpr``: fraction of anomalies accepted (score <= t) at the threshold t that
  accepts 95% of ID inputs (lower is better).
- ``detection_accuracy``: max over thresholds of 0.5 * (TPR_ID + TNR_anomaly), i.e. the best
  balanced accuracy (Liang et al.'s "detection error" = 1 - this).

At a deployed threshold ``t`` (an input is flagged when ``not score <= t``):
``id_accept_rate`` = mean(score_id <= t), ``detection_rate`` = mean(not score_anomaly <= t).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONVENTION = ("scores: higher = more anomalous; threshold-free metrics take ID as the positive "
              "class (AUROC, AUPR-IN with ID positive, AUPR-OUT with anomalies positive, "
              "FPR@95%TPR = anomalies accepted when 95% of ID is accepted)")


def _clean(scores: np.ndarray) -> np.ndarray:
    """float64 scores with +inf mapped to a finite value above every finite score (so that
    sklearn accepts them and the ordering is kept); NaN counts as most anomalous."""
    s = np.asarray(scores, np.float64).ravel()
    s = np.where(np.isnan(s), np.inf, s)
    finite = s[np.isfinite(s)]
    top = (finite.max() if finite.size else 0.0)
    bottom = (finite.min() if finite.size else 0.0)
    span = max(top - bottom, 1.0)
    return np.clip(s, bottom - span, top + span)


def _labels_scores(id_scores: np.ndarray, ano_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(id_scores).ravel(), np.asarray(ano_scores).ravel()
    if a.size == 0 or b.size == 0:
        raise ValueError(f"need ID and anomaly scores, got {a.size} ID and {b.size} anomaly scores")
    s = _clean(np.concatenate([a, b]))
    y_id = np.concatenate([np.ones(a.size, np.int64), np.zeros(b.size, np.int64)])
    return y_id, s


def auroc(id_scores: np.ndarray, ano_scores: np.ndarray) -> float:
    """AUROC separating ID (positive, low score) from anomalies (high score)."""
    from sklearn.metrics import roc_auc_score

    y_id, s = _labels_scores(id_scores, ano_scores)
    return float(roc_auc_score(y_id, -s))


def aupr_in(id_scores: np.ndarray, ano_scores: np.ndarray) -> float:
    """Average precision with ID as the positive class (ranked by -score)."""
    from sklearn.metrics import average_precision_score

    y_id, s = _labels_scores(id_scores, ano_scores)
    return float(average_precision_score(y_id, -s))


def aupr_out(id_scores: np.ndarray, ano_scores: np.ndarray) -> float:
    """Average precision with the anomalies as the positive class (ranked by score)."""
    from sklearn.metrics import average_precision_score

    y_id, s = _labels_scores(id_scores, ano_scores)
    return float(average_precision_score(1 - y_id, s))


def fpr_at_tpr(id_scores: np.ndarray, ano_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Fraction of anomalies accepted at the smallest threshold accepting >= ``tpr`` of ID."""
    y_id, s = _labels_scores(id_scores, ano_scores)
    sid, sano = s[y_id == 1], s[y_id == 0]
    t = float(np.quantile(sid, tpr, method="higher"))
    return float(np.mean(sano <= t))


def roc_curve(id_scores: np.ndarray, ano_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` with ID positive: tpr = ID accepted, fpr = anomalies accepted."""
    from sklearn.metrics import roc_curve as _roc

    y_id, s = _labels_scores(id_scores, ano_scores)
    fpr, tpr, _ = _roc(y_id, -s)
    return fpr, tpr


def detection_accuracy(id_scores: np.ndarray, ano_scores: np.ndarray) -> float:
    """Best balanced accuracy ``max_t 0.5 * (P(id <= t) + P(anomaly > t))``."""
    fpr, tpr = roc_curve(id_scores, ano_scores)
    return float(np.max(0.5 * (tpr + 1.0 - fpr)))


def at_threshold(scores: np.ndarray, threshold: float) -> float:
    """Fraction flagged: ``mean(not score <= threshold)`` (NaN and +inf are flagged)."""
    s = np.asarray(scores, np.float64).ravel()
    if s.size == 0:
        return float("nan")
    return float(np.mean(~(s <= threshold)))


def all_metrics(id_scores: np.ndarray, ano_scores: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """Every metric above for one (ID, anomaly set) pair, plus ``detection_rate`` at ``threshold``."""
    out: dict[str, Any] = {
        "auroc": auroc(id_scores, ano_scores),
        "aupr_in": aupr_in(id_scores, ano_scores),
        "aupr_out": aupr_out(id_scores, ano_scores),
        "fpr_at_95_tpr": fpr_at_tpr(id_scores, ano_scores, 0.95),
        "detection_accuracy": detection_accuracy(id_scores, ano_scores),
        "n_id": int(np.asarray(id_scores).size),
        "n_anomaly": int(np.asarray(ano_scores).size),
    }
    if threshold is not None:
        out["detection_rate"] = at_threshold(ano_scores, threshold)
    return out

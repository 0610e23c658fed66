"""Adaptive attacks: an attacker who knows the detector and wants a misclassified input that
the detector ACCEPTS.

Threat model. The attacker has the classifier and the fitted detector (white box: the torch
reference, which computes the same score as the exported file; black box: only the .onnx,
queried for logits and score), an L-inf budget ``eps`` around a correctly classified ID test
image, and a fixed number of steps / queries. The attacker wins an attempt when the final
input is misclassified AND scores at or below the calibrated threshold. The defender wins
("robust detection") when the input ends correctly classified or flagged.

Objectives (minimised), ``t`` = the calibrated threshold:

- ``"ce"``: ``J = -CE(logits, y) + lam * score`` (``lam = 0``: the gradient ignores the detector;
  only the choice of iterate below uses it).
  A large ``lam`` lets the score term win everywhere, so the input stays in distribution and
  correctly classified: a weak attacker.
- ``"hinge"``: ``J = max(m, -kappa) + lam * max(score - t, 0)`` with the CW margin
  ``m = z_y - max_{j != y} z_j``: each term stops pulling once its goal is reached
  (misclassified by ``kappa``, score under the threshold), so the two goals do not fight;
  the stronger attacker, and the one the black-box variant uses.

Every iterate is checked against the detector's own verdict
and a sample keeps the first iterate on which the attacker wins (as a real attacker would), or
else the last one; the verdicts reported are those of the shipped file (``AnomalySession``).

    res = adaptive_pgd(det, x, y, eps=0.1, lam=1.0, steps=40)      # white box, torch
    res = adaptive_square(session, x, y, eps=0.1, lam=1.0, queries=300)   # black box, .onnx
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ufad.runtime.errors import EvaluationError

from .attacks import frozen_weights, perturbation_norms


@dataclass
class AdaptiveResult:
    """One adaptive attack run over N clean-correct inputs (all arrays [N])."""

    name: str
    params: dict[str, Any]
    x_adv: np.ndarray
    misclassified: np.ndarray
    flagged: np.ndarray
    linf: np.ndarray
    l2: np.ndarray

    def summary(self) -> dict[str, Any]:
        """JSON-ready rates. ``robust_detection`` = fraction ending correct or flagged."""
        evaded = self.misclassified & ~self.flagged
        n = len(evaded)
        return {
            "attack": self.name, "params": self.params, "n": int(n),
            "misclassified_rate": float(self.misclassified.mean()) if n else None,
            "evasion_rate": float(evaded.mean()) if n else None,
            "robust_detection": float(1.0 - evaded.mean()) if n else None,
            "flagged_rate_of_misclassified": (float(self.flagged[self.misclassified].mean())
                                              if self.misclassified.any() else None),
            "mean_linf_evaded": float(self.linf[evaded].mean()) if evaded.any() else None,
            "mean_l2_evaded": float(self.l2[evaded].mean()) if evaded.any() else None,
            "mean_linf": float(self.linf.mean()) if n else None,
            "mean_l2": float(self.l2.mean()) if n else None,
        }


def _finish(name: str, params: dict[str, Any], x: np.ndarray, x_adv: np.ndarray, y: np.ndarray,
            verdict: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]) -> AdaptiveResult:
    pred, flagged = verdict(x_adv)
    return AdaptiveResult(name, params, x_adv, pred != y, flagged, *perturbation_norms(x, x_adv))


LOSSES = ("ce", "hinge")
KAPPA = 1.0


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise EvaluationError(f"loss must be one of {LOSSES}, got {loss!r}")


def _objective(loss: str, logits, y, score, thr: float, lam: float, xp):
    """``J`` per sample (see the module docstring); ``xp`` is torch or numpy."""
    rows = xp.arange(len(y))
    true = logits[rows, y]
    if loss == "ce":
        zmax = logits.max(1, keepdims=True) if xp is np else logits.amax(1, keepdim=True)
        lse = xp.log(xp.exp(logits - zmax).sum(1)) + zmax[:, 0]
        return -(lse - true) + lam * score
    other = logits.copy() if xp is np else logits.clone()
    other[rows, y] = -np.inf
    margin = true - (other.max(1) if xp is np else other.amax(1))
    relu = (lambda v: np.maximum(v, 0.0)) if xp is np else (lambda v: v.clamp(min=0.0))
    return relu(margin + KAPPA) - KAPPA + lam * relu(score - thr)


def session_verdict(session, batch_size: int = 512) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``x -> (pred, is_anomaly)`` of the shipped file at its calibrated threshold."""
    def verdict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        preds, flags = [], []
        for i in range(0, len(x), batch_size):
            r = session.run(x[i:i + batch_size])
            preds.append(r.pred)
            flags.append(r.is_anomaly)
        return np.concatenate(preds), np.concatenate(flags)
    return verdict


def adaptive_pgd(det, x: np.ndarray, y: np.ndarray, *, eps: float, lam: float, loss: str = "ce",
                 steps: int = 40, alpha: float | None = None, batch_size: int = 250, seed: int = 0,
                 verdict: Callable | None = None) -> AdaptiveResult:
    """White-box L-inf PGD with a random start on ``J`` (``loss``) through the
    detector's torch reference (``det.module()``, the module that was exported). ``verdict``
    (default: the torch reference at ``det.threshold``) gives the reported verdicts."""
    import torch

    _check_loss(loss)
    mod = det.module()
    thr = torch.tensor(det.threshold, dtype=torch.float32)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    gen = torch.Generator().manual_seed(seed)
    out = []
    try:
        with frozen_weights(mod):
            for i in range(0, len(x), batch_size):
                xb = torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)
                yb = torch.as_tensor(y[i:i + batch_size], dtype=torch.long)
                adv = (xb + eps * (torch.rand(xb.shape, generator=gen) * 2 - 1)).clamp(0, 1)
                best = adv.clone()
                won = torch.zeros(len(xb), dtype=torch.bool)
                for _ in range(steps + 1):
                    adv = adv.detach().requires_grad_(True)
                    with torch.enable_grad():
                        logits, pred, score, flagged, *_ = mod(adv, thr)
                        score = torch.nan_to_num(score, posinf=1e6)
                        obj = _objective(loss, logits, yb, score, float(thr), lam, torch)
                        (g,) = torch.autograd.grad(obj.sum(), adv)
                    with torch.no_grad():
                        # a sample that has not won yet keeps its latest iterate; once this
                        # iterate wins, it is never replaced
                        best[~won] = adv.detach()[~won]
                        won |= (pred != yb) & ~flagged
                        adv = adv - alpha * g.sign()
                        adv = torch.min(torch.max(adv, xb - eps), xb + eps).clamp(0, 1)
                out.append(best.numpy())
    finally:
        mod.capture.remove()
    x_adv = np.concatenate(out).astype(np.float32)
    verdict = verdict or _torch_verdict(det)
    return _finish("pgd_adaptive", {"eps": eps, "lam": lam, "loss": loss, "steps": steps}, x, x_adv, y, verdict)


def _torch_verdict(det) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    def verdict(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = det.score(x)
        return r["pred"], r["is_anomaly"]
    return verdict


def adaptive_square(session, x: np.ndarray, y: np.ndarray, *, eps: float, lam: float, loss: str = "hinge",
                    queries: int = 300, p_init: float = 0.1, seed: int = 0) -> AdaptiveResult:
    """Black-box L-inf Square attack (Andriushchenko et al. 2020) on ``J`` (``loss``),
    querying only the .onnx file (``session``: an ``AnomalySession``) for logits and score.
    One query per active sample per iteration; a sample stops once the attacker wins."""
    if x.ndim != 4:
        raise EvaluationError(f"adaptive_square needs image batches [N, C, H, W], got shape {x.shape}")
    _check_loss(loss)
    rng = np.random.default_rng(seed)
    n, c, h, w = x.shape
    thr = float(session.threshold)

    def objective(xa: np.ndarray, ya: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = session.run(xa)
        score = np.nan_to_num(r.score.astype(np.float64), posinf=1e6)
        won = (r.pred != ya) & ~r.is_anomaly
        return _objective(loss, r.logits.astype(np.float64), ya, score, thr, lam, np), won

    # vertical stripes of +-eps: the paper's initialisation
    adv = np.clip(x + eps * rng.choice([-1.0, 1.0], size=(n, c, 1, w)), 0, 1).astype(np.float32)
    best, won = objective(adv, y)
    for it in range(queries):
        active = np.flatnonzero(~won)
        if len(active) == 0:
            break
        side = max(1, int(round(np.sqrt(_p_schedule(p_init, it, queries) * h * w))))
        side = min(side, h, w)
        cand = adv[active].copy()
        for k, j in enumerate(active):
            r0, c0 = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            delta = eps * rng.choice([-1.0, 1.0], size=(c, 1, 1))
            window = x[j, :, r0:r0 + side, c0:c0 + side] + delta
            cand[k, :, r0:r0 + side, c0:c0 + side] = np.clip(window, 0, 1)
        new_loss, new_won = objective(cand, y[active])
        better = (new_loss < best[active]) | new_won
        adv[active[better]] = cand[better]
        best[active[better]] = new_loss[better]
        won[active] |= new_won
    verdict = session_verdict(session)
    return _finish("square_adaptive", {"eps": eps, "lam": lam, "loss": loss, "queries": queries}, x, adv, y, verdict)


def _p_schedule(p_init: float, it: int, total: int) -> float:
    """The Square attack's schedule of the window's area fraction, rescaled to ``total``
    queries (the paper's breakpoints are for 10 000 queries)."""
    t = int(it * 10000 / max(total, 1))
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if t <= bound:
            return p_init / div
    return p_init / 512


def run_adaptive(det, session, x: np.ndarray, y: np.ndarray, eps_list, runs, *, steps: int = 30,
                 queries: int = 300, seed: int = 0, progress: bool = False) -> list[dict[str, Any]]:
    """Every ``(variant, loss, lam)`` of ``runs`` ("pgd": white box, "square": black box) at
    every eps, on the inputs of ``(x, y)`` that the file classifies correctly. Returns the
    summaries (plus ``eps`` and ``seconds``), verdicts from ``session`` (the shipped file)."""
    import time

    verdict = session_verdict(session)
    pred, _ = verdict(x)
    x, y = x[pred == y], y[pred == y]
    out = []
    for eps in eps_list:
        for variant, loss, lam in runs:
            t0 = time.time()
            if variant == "pgd":
                res = adaptive_pgd(det, x, y, eps=eps, lam=lam, loss=loss, steps=steps, seed=seed, verdict=verdict)
            elif variant == "square":
                res = adaptive_square(session, x, y, eps=eps, lam=lam, loss=loss, queries=queries, seed=seed)
            else:
                raise EvaluationError(f"adaptive variant must be 'pgd' or 'square', got {variant!r}")
            info = {**res.summary(), "variant": variant, "eps": eps, "seconds": round(time.time() - t0, 2)}
            out.append(info)
            if progress:
                from tqdm.auto import tqdm

                tqdm.write(f"  adaptive {variant} {loss} lam={lam:g} eps={eps:g}: robust detection "
                           f"{info['robust_detection']:.3f}, misclassified {info['misclassified_rate']:.3f} "
                           f"in {info['seconds']:.1f}s")
    return out


__all__ = ["AdaptiveResult", "adaptive_pgd", "adaptive_square", "run_adaptive", "session_verdict", "LOSSES"]

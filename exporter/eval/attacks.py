"""White-box adversarial attacks in plain torch: FGSM, BIM, PGD (L-inf), CW-L2, DeepFool.

All attacks work on batches of inputs in ``[0, 1]`` (``eps`` is in pixel units), keep the
result in ``[0, 1]``, are deterministic for a given ``seed`` and return an ``AttackResult``:
the adversarial inputs plus a mask of *successful* attacks, where success means the clean
input was classified correctly AND the adversarial one is not. Only successful attacks are
meaningful anomalies to score (a failed attack is just an ID image).

    res = run_attack("pgd", model, x, y, eps=0.1, steps=20, seed=0)
    x_adv = res.x_adv[res.success]; res.success_rate
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ufad.runtime.errors import EvaluationError


@dataclass
class AttackResult:
    """Adversarial inputs ``x_adv`` [N, ...] and masks over the N inputs.

    ``clean_correct``: the model classified the clean input correctly. ``success``:
    clean_correct and the adversarial input is misclassified. ``success_rate`` =
    success / clean_correct (attacks on misclassified inputs are not counted).
    """

    name: str
    params: dict[str, Any]
    x_adv: np.ndarray
    success: np.ndarray
    clean_correct: np.ndarray
    adv_pred: np.ndarray
    linf: np.ndarray = field(default_factory=lambda: np.zeros(0))
    l2: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def success_rate(self) -> float:
        n = int(self.clean_correct.sum())
        return float(self.success.sum() / n) if n else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts and perturbation sizes of the successful attacks."""
        ok = self.success
        return {
            "attack": self.name, "params": self.params, "n_inputs": int(len(self.success)),
            "n_clean_correct": int(self.clean_correct.sum()), "n_success": int(ok.sum()),
            "success_rate": self.success_rate,
            "mean_linf": float(self.linf[ok].mean()) if ok.any() else None,
            "mean_l2": float(self.l2[ok].mean()) if ok.any() else None,
        }


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """Gradients w.r.t. the inputs only: the weights stop requiring grad for the duration, and
    their ``requires_grad`` and any ``.grad`` (which ART's ``zero_grad()`` would drop) come back."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    for p, _, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, req, grad in saved:
            p.requires_grad_(req)
            p.grad = grad


def perturbation_norms(x: np.ndarray, x_adv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-input L-inf and L2 norms of ``x_adv - x``."""
    d = (np.asarray(x_adv, np.float32) - np.asarray(x, np.float32)).reshape(len(x), -1)
    return np.abs(d).max(1), np.linalg.norm(d, axis=1)


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, **_: Any) -> torch.Tensor:
    """Fast gradient sign method (Goodfellow et al.): one step of size ``eps`` along sign(grad)."""
    return (x + eps * _grad(model, x, y).sign()).clamp(0.0, 1.0).detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10,
        alpha: float | None = None, random_start: bool = True,
        generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al.); ``random_start=False`` is BIM
    (Kurakin et al.). Step ``alpha`` defaults to 2.5 * eps / steps."""
    alpha = 2.5 * eps / steps if alpha is None else alpha
    adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1
        adv = (x + eps * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        adv = adv + alpha * _grad(model, adv, y).sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
    return adv


def bim(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10,
        alpha: float | None = None, **kw: Any) -> torch.Tensor:
    """Basic iterative method: PGD without the random start, step eps / steps * 1.25."""
    alpha = 1.25 * eps / steps if alpha is None else alpha
    return pgd(model, x, y, eps=eps, steps=steps, alpha=alpha, random_start=False)


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, c: float = 10.0, steps: int = 50,
          lr: float = 0.1, kappa: float = 0.0, search_steps: int = 3, **_: Any) -> torch.Tensor:
    """Carlini-Wagner L2 (untargeted) in tanh space with Adam, a short binary search over c
    (per sample), keeping the smallest successful perturbation found."""
    n = len(x)
    xc = x.clamp(1e-6, 1 - 1e-6)
    w0 = torch.atanh(xc * 2 - 1)
    lo = torch.zeros(n)
    hi = torch.full((n,), 1e10)
    cs = torch.full((n,), float(c))
    best = x.clone()
    best_l2 = torch.full((n,), float("inf"))
    onehot = F.one_hot(y, num_classes=model(x[:1]).shape[1]).bool()
    for _ in range(max(1, search_steps)):
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.Adam([w], lr=lr)
        found = torch.zeros(n, dtype=torch.bool)
        for _ in range(steps):
            with torch.enable_grad():
                adv = (torch.tanh(w) + 1) / 2
                logits = model(adv)
                real = logits[onehot]
                other = logits.masked_fill(onehot, -1e9).amax(1)
                f = torch.clamp(real - other + kappa, min=0.0)
                l2 = ((adv - x) ** 2).flatten(1).sum(1)
                loss = (l2 + cs * f).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                wrong = logits.argmax(1) != y
                better = wrong & (l2 < best_l2)
                best_l2 = torch.where(better, l2, best_l2)
                best[better] = adv[better].detach()
                found |= wrong
        # binary search on c: smaller where it worked, larger where it did not
        hi = torch.where(found, torch.minimum(hi, cs), hi)
        lo = torch.where(found, lo, torch.maximum(lo, cs))
        cs = torch.where(hi < 1e9, (lo + hi) / 2, cs * 10)
    return best.detach()


def deepfool(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 30,
             overshoot: float = 0.02, candidates: int = 4, **_: Any) -> torch.Tensor:
    """DeepFool (Moosavi-Dezfooli et al.), L2. As in the paper's implementation, only the
    ``candidates`` classes with the highest clean logits are considered (the true class
    first), which costs ``candidates`` gradients per step; samples stop once fooled."""
    n = len(x)
    with torch.no_grad():
        clean = model(x)
    k_all = min(candidates, clean.shape[1])
    # true label first, then the highest other logits
    others = clean.scatter(1, y[:, None], float("-inf")).topk(k_all - 1, dim=1).indices
    cand = torch.cat([y[:, None], others], 1)                  # [N, K]
    r_tot = torch.zeros_like(x)
    active = torch.ones(n, dtype=torch.bool)
    for _ in range(steps):
        ai = active.nonzero().ravel()
        if len(ai) == 0:
            break
        xa = (x[ai] + (1 + overshoot) * r_tot[ai]).clamp(0, 1).detach().requires_grad_(True)
        ca = cand[ai]
        with torch.enable_grad():
            logits = model(xa)
            picked = logits.gather(1, ca)                          # [b, K]
            grads = [torch.autograd.grad(picked[:, k].sum(), xa, retain_graph=k < k_all - 1)[0]
                     for k in range(k_all)]
        logits, picked = logits.detach(), picked.detach()
        still = logits.argmax(1) == y[ai]
        active[ai[~still]] = False
        if not still.any():
            break
        sel = still.nonzero().ravel()
        g = torch.stack(grads, 1)[sel].flatten(2)                  # [b, K, D]
        w = g[:, 1:] - g[:, :1]
        f = picked[sel, 1:] - picked[sel, :1]                      # < 0 while still correct
        wn = w.norm(dim=2) + 1e-8
        ratio = f.abs() / wn
        k = ratio.argmin(1)
        ar = torch.arange(len(sel))
        r = ((ratio[ar, k] + 1e-4) / wn[ar, k]).unsqueeze(1) * w[ar, k]
        r_tot[ai[sel]] += r.reshape(-1, *x.shape[1:])
    return (x + (1 + overshoot) * r_tot).clamp(0, 1).detach()


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": fgsm, "bim": bim, "pgd": pgd, "cw_l2": cw_l2, "deepfool": deepfool,
}


def run_attack(name: str, model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
               seed: int = 0, progress: bool = False, **params: Any) -> AttackResult:
    """Run attack ``name`` (see ``ATTACKS``) on ``(x, y)`` in batches; see ``AttackResult``."""
    if name not in ATTACKS:
        raise EvaluationError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    if model.training:
        raise EvaluationError("the model is in training mode; call model.eval() before attacking it.")
    fn = ATTACKS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    advs, preds, clean = [], [], []
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"attack {name}", unit="batch", leave=False)
    with frozen_weights(model):
        for i in starts:
            xb = torch.as_tensor(x[i:i + batch_size], dtype=torch.float32)
            yb = torch.as_tensor(y[i:i + batch_size], dtype=torch.long)
            with torch.no_grad():
                clean.append((model(xb).argmax(1) == yb).numpy())
            adv = fn(model, xb, yb, generator=gen, **params)
            with torch.no_grad():
                preds.append(model(adv).argmax(1).numpy())
            advs.append(adv.numpy().astype(np.float32))
    x_adv = np.concatenate(advs)
    adv_pred = np.concatenate(preds)
    clean_correct = np.concatenate(clean)
    success = clean_correct & (adv_pred != np.asarray(y))
    linf, l2 = perturbation_norms(x, x_adv)
    return AttackResult(name=name, params=params, x_adv=x_adv, success=success,
                        clean_correct=clean_correct, adv_pred=adv_pred, linf=linf, l2=l2)

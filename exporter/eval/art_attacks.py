"""The same attacks from the Adversarial Robustness Toolbox (ART), with the ``run_attack`` contract.

A second, independent implementation to check our own attacks against (and to borrow one we
do not have: Square, a score-based black-box attack). ``run_art_attack`` takes and returns
exactly what ``attacks.run_attack`` does; its params are ART's own argument names:

    res = run_art_attack("pgd", model, x, y, eps=0.1, eps_step=0.0125, max_iter=20, seed=0)
    res.success_rate; res.summary()   # summary()["attack"] == "art_pgd"

ART is an optional dependency (``pip install 'ufad[art]'``), imported only when an attack runs.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import EvaluationError

from .attacks import AttackResult, frozen_weights, perturbation_norms


# Builders: (ART classifier, batch_size, verbose, **params) -> (ART attack, resolved params).
# Defaults follow our own attacks' defaults in evaluate.ATTACKS_FULL, so the two compare as-is.
def _fgsm(clf: Any, batch_size: int, verbose: bool, *, eps: float = 0.1) -> tuple[Any, dict]:
    from art.attacks.evasion import FastGradientMethod

    return FastGradientMethod(clf, norm=np.inf, eps=eps, eps_step=eps, batch_size=batch_size), {"eps": eps}


def _pgd(clf: Any, batch_size: int, verbose: bool, *, eps: float = 0.1, eps_step: float | None = None,
         max_iter: int = 20, num_random_init: int = 1) -> tuple[Any, dict]:
    from art.attacks.evasion import ProjectedGradientDescent

    # ART's default step (0.1) is as large as eps; ours (2.5 * eps / steps) is Madry et al.'s.
    eps_step = 2.5 * eps / max_iter if eps_step is None else eps_step
    p = {"eps": eps, "eps_step": eps_step, "max_iter": max_iter, "num_random_init": num_random_init}
    return ProjectedGradientDescent(clf, norm=np.inf, batch_size=batch_size, verbose=verbose, **p), p


def _cw_l2(clf: Any, batch_size: int, verbose: bool, *, confidence: float = 0.0, max_iter: int = 50,
           binary_search_steps: int = 3, learning_rate: float = 0.01, initial_const: float = 10.0,
           max_halving: int = 5, max_doubling: int = 5) -> tuple[Any, dict]:
    from art.attacks.evasion import CarliniL2Method

    p = {"confidence": confidence, "max_iter": max_iter, "binary_search_steps": binary_search_steps,
         "learning_rate": learning_rate, "initial_const": initial_const,
         "max_halving": max_halving, "max_doubling": max_doubling}
    return CarliniL2Method(clf, batch_size=batch_size, verbose=verbose, **p), p


def _deepfool(clf: Any, batch_size: int, verbose: bool, *, max_iter: int = 30, epsilon: float = 0.02,
              nb_grads: int = 4) -> tuple[Any, dict]:
    from art.attacks.evasion import DeepFool

    p = {"max_iter": max_iter, "epsilon": epsilon, "nb_grads": nb_grads}
    return DeepFool(clf, batch_size=batch_size, verbose=verbose, **p), p


def _square(clf: Any, batch_size: int, verbose: bool, *, eps: float = 0.1, max_iter: int = 100,
            nb_restarts: int = 1, p_init: float = 0.8) -> tuple[Any, dict]:
    from art.attacks.evasion import SquareAttack

    p = {"eps": eps, "max_iter": max_iter, "nb_restarts": nb_restarts, "p_init": p_init}
    return SquareAttack(clf, norm=np.inf, batch_size=batch_size, verbose=verbose, **p), p


ART_ATTACKS: dict[str, Callable[..., tuple[Any, dict]]] = {
    "fgsm": _fgsm, "pgd": _pgd, "cw_l2": _cw_l2, "deepfool": _deepfool, "square": _square,
}


def _predict(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.as_tensor(x[i:i + batch_size])).argmax(1).numpy()
                               for i in range(0, len(x), batch_size)])


def run_art_attack(name: str, model: nn.Module, x: np.ndarray, y: np.ndarray, *, batch_size: int = 256,
                   seed: int = 0, progress: bool = False, **params: Any) -> AttackResult:
    """Run ART's attack ``name`` (see ``ART_ATTACKS``) on ``(x, y)``; see ``attacks.AttackResult``.

    ``params`` are the ART arguments the builder accepts; the result records them with their
    defaults filled in. Deterministic for a given ``seed``.
    """
    if name not in ART_ATTACKS:
        raise EvaluationError(f"unknown ART attack {name!r}; choose one of {sorted(ART_ATTACKS)}")
    if model.training:
        raise EvaluationError("the model is in training mode; call model.eval() before attacking it.")
    builder = ART_ATTACKS[name]
    allowed = [k for k in inspect.signature(builder).parameters if k not in ("clf", "batch_size", "verbose")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise EvaluationError(f"ART attack {name!r} does not take {unknown}; it takes {allowed}")
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as e:
        raise EvaluationError(f"ART attacks need the Adversarial Robustness Toolbox: pip install 'ufad[art]' ({e})") from e

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    np_state, py_state = np.random.get_state(), random.getstate()
    # ART backprops a loss through the model (filling .grad) and zero_grad()s it:
    # frozen_weights puts the caller's requires_grad and .grad back afterwards.
    try:
        with frozen_weights(model):
            # ART draws its randomness (PGD start, Square's squares) from the global numpy RNG.
            np.random.seed(seed)
            random.seed(seed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                with torch.no_grad():
                    nb_classes = int(model(torch.as_tensor(x[:1])).shape[1])
                clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                        nb_classes=nb_classes, clip_values=(0.0, 1.0), device_type="cpu")
                attack, resolved = builder(clf, batch_size, progress, **params)
                x_adv = np.asarray(attack.generate(x, y=y), dtype=np.float32)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        model.eval()  # ART switches train(False)/eval() itself; make sure it is left as found
    # Predictions from our own model, in batches, exactly as run_attack makes them.
    clean_correct = _predict(model, x, batch_size) == y
    adv_pred = _predict(model, x_adv, batch_size)
    success = clean_correct & (adv_pred != y)
    linf, l2 = perturbation_norms(x, x_adv)
    return AttackResult(name=f"art_{name}", params=resolved, x_adv=x_adv, success=success,
                        clean_correct=clean_correct, adv_pred=adv_pred, linf=linf, l2=l2)


__all__ = ["ART_ATTACKS", "run_art_attack"]

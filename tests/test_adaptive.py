"""Adaptive attacks (an attacker who knows the detector) on the real MNIST reference detector:
the budgets hold, knowing the detector helps the attacker, and the verdicts that count are
those of the shipped .onnx."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.eval   # its own tier: pytest -m eval (CI runs it after the default run)

from ufad.runtime.errors import EvaluationError


@pytest.fixture(scope="module")
def targets(mnist, session):
    from ufad.exporter.eval.adaptive import session_verdict

    x, y = mnist["test"]
    x, y = x[:50], y[:50]
    pred, _ = session_verdict(session)(x)
    return x[pred == y], y[pred == y]


def test_white_box_stays_in_budget_and_beats_the_unaware_attack(fitted_detector, session, targets):
    from ufad.exporter.eval.adaptive import adaptive_pgd, session_verdict

    x, y = targets
    verdict = session_verdict(session)
    plain = adaptive_pgd(fitted_detector, x, y, eps=0.1, lam=0.0, loss="ce", steps=20, verdict=verdict)
    aware = adaptive_pgd(fitted_detector, x, y, eps=0.1, lam=0.1, loss="hinge", steps=20, verdict=verdict)
    for r in (plain, aware):
        assert r.linf.max() <= 0.1 + 1e-5
        assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    p, a = plain.summary(), aware.summary()
    assert p["misclassified_rate"] > 0.8           # PGD at eps 0.1 breaks the CNN...
    assert p["flagged_rate_of_misclassified"] > 0.6  # ...and the detector catches most of it
    # An attacker who knows the detector must do at least as well as one who does not;
    # otherwise the adaptive attack (not the detector) is what is broken.
    assert a["evasion_rate"] >= p["evasion_rate"]
    assert p["robust_detection"] == pytest.approx(1 - p["evasion_rate"])


def test_torch_reference_and_file_agree_on_adversarial_inputs(fitted_detector, session, targets):
    from ufad.exporter.eval.adaptive import adaptive_pgd, session_verdict

    x, y = targets
    r = adaptive_pgd(fitted_detector, x, y, eps=0.1, lam=0.1, loss="hinge", steps=10)   # torch verdicts
    pred, flagged = session_verdict(session)(r.x_adv)
    assert np.mean(pred == y) == pytest.approx(1 - r.misclassified.mean(), abs=0.03)
    assert np.mean(flagged == r.flagged) >= 0.95


def test_black_box_square_queries_only_the_file(session, targets):
    from ufad.exporter.eval.adaptive import adaptive_square

    x, y = targets
    r = adaptive_square(session, x[:40], y[:40], eps=0.2, lam=0.1, queries=60, seed=0)
    assert r.linf.max() <= 0.2 + 1e-5 and r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    assert r.misclassified.mean() > 0.1
    again = adaptive_square(session, x[:40], y[:40], eps=0.2, lam=0.1, queries=60, seed=0)
    np.testing.assert_array_equal(r.x_adv, again.x_adv)


def test_unknown_objective_is_refused(session, targets):
    from ufad.exporter.eval.adaptive import adaptive_square

    x, y = targets
    with pytest.raises(EvaluationError, match="loss must be one of"):
        adaptive_square(session, x[:2], y[:2], eps=0.1, lam=1.0, loss="l2")

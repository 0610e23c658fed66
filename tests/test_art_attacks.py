"""ART's attacks (``exporter/eval/art_attacks.py``) on the real reference model and real MNIST
test images: budgets hold, results are deterministic, and ART agrees with our own attacks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.eval   # its own tier: pytest -m eval (CI runs it after the default run)

pytest.importorskip("art")

from ufad.exporter.eval.art_attacks import run_art_attack  # noqa: E402
from ufad.exporter.eval.attacks import run_attack  # noqa: E402
from ufad.runtime.errors import EvaluationError  # noqa: E402


@pytest.fixture(scope="module")
def data():
    from ufad.models import datasets

    x, y = datasets.load("mnist", "test")
    return x[:64], y[:64]


def _in_budget(res, eps):
    assert res.x_adv.dtype == np.float32 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert not (res.success & ~res.clean_correct).any()
    if eps is not None:
        assert res.linf.max() <= eps + 1e-5


def test_fgsm_and_pgd_agree_with_ours(reference_model, data):
    x, y = data
    ours = run_attack("fgsm", reference_model, x, y, eps=0.1)
    art = run_art_attack("fgsm", reference_model, x, y, eps=0.1)
    _in_budget(art, 0.1)
    assert art.name == "art_fgsm" and art.params == {"eps": 0.1}
    assert 0.3 < art.success_rate < 0.95
    assert abs(art.success_rate - ours.success_rate) <= 0.15
    # FGSM is deterministic and both take sign(grad CE): the same images, up to float noise
    assert np.mean(np.abs(art.x_adv - ours.x_adv) < 1e-5) > 0.99
    ours = run_attack("pgd", reference_model, x, y, eps=0.1, steps=10, seed=0)
    art = run_art_attack("pgd", reference_model, x, y, eps=0.1, max_iter=10, seed=0)
    _in_budget(art, 0.1)
    assert art.params["eps_step"] == pytest.approx(0.025)  # ours' default 2.5 * eps / steps
    assert art.success_rate > 0.8
    assert abs(art.success_rate - ours.success_rate) <= 0.15


def test_cw_l2_and_deepfool(reference_model, data):
    x, y = data[0][:16], data[1][:16]
    cw = run_art_attack("cw_l2", reference_model, x, y, max_iter=8, binary_search_steps=1)
    _in_budget(cw, None)
    assert cw.success_rate > 0.8
    assert 0.5 < cw.l2[cw.success].mean() < 6.0
    assert (cw.linf[~cw.success & cw.clean_correct] == 0).all()  # failures come back clean
    df = run_art_attack("deepfool", reference_model, x, y, max_iter=10)
    _in_budget(df, None)
    assert df.success_rate > 0.8
    assert 0.3 < df.l2[df.success].mean() < 4.0
    # a minimal-perturbation attack: far below the L2 of an eps=0.1 L-inf sign step (~2.2)
    assert df.l2[df.success].mean() < 0.8 * run_attack("fgsm", reference_model, x, y, eps=0.1).l2.mean()


def test_square_black_box_and_determinism(reference_model, data):
    x, y = data[0][:16], data[1][:16]
    sq = run_art_attack("square", reference_model, x, y, eps=0.3, max_iter=20, seed=0)
    _in_budget(sq, 0.3)
    assert sq.success_rate > 0.5
    # seeded: the same seed gives the same squares, another seed others
    a, b, c = (run_art_attack("square", reference_model, x[:8], y[:8], eps=0.3, max_iter=10, seed=s).x_adv
               for s in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_errors_and_model_left_as_found(reference_model, data):
    x, y = data[0][:4], data[1][:4]
    with pytest.raises(EvaluationError, match="choose one of"):
        run_art_attack("bim", reference_model, x, y)
    with pytest.raises(EvaluationError, match="does not take"):
        run_art_attack("pgd", reference_model, x, y, steps=10)
    req = [p.requires_grad for p in reference_model.parameters()]
    run_art_attack("fgsm", reference_model, x, y, eps=0.1)
    assert [p.requires_grad for p in reference_model.parameters()] == req
    assert all(p.grad is None for p in reference_model.parameters())
    assert not reference_model.training
    reference_model.train()
    try:
        with pytest.raises(EvaluationError, match="training mode"):
            run_art_attack("fgsm", reference_model, x, y, eps=0.1)
    finally:
        reference_model.eval()


def test_without_art_the_module_imports_and_says_how_to_install():
    code = (
        "import sys; sys.modules['art'] = None\n"
        "import numpy as np, torch\n"
        "from ufad.exporter.eval.art_attacks import run_art_attack\n"
        "from ufad.runtime.errors import EvaluationError\n"
        "try:\n"
        "    run_art_attack('fgsm', torch.nn.Linear(4, 2).eval(), np.zeros((1, 4), np.float32), np.zeros(1))\n"
        "except EvaluationError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'ufad[art]'" in out.stdout, out.stderr

"""The contrast column (``contrast="block3"``) beside a grid consistency column, on the real
MNIST CNN: what the exported file computes (recomputed from its own activations with an
independent least-squares fit of every class's regression), that minimal adversarial inputs
(just across the nearest boundary) are explained better by another class's regression than by
the predicted one's, and its errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from consistency_reference import consistency_raw, fit_export_probe  # noqa: E402
from ufad.exporter import UniformDetector  # noqa: E402
from ufad.exporter.eval import metrics  # noqa: E402
from ufad.runtime import format as fmt  # noqa: E402
from ufad.runtime.errors import ExportError  # noqa: E402

GRID, SOURCE = "block1:grid4", "block3"
NAME = f"{SOURCE}>penultimate vs other classes"
EPS = 1e-6


@pytest.fixture(scope="module")
def both(reference_model, mnist, fashion_test, tmp_path_factory):
    """6000 fitting images: under ``max_points`` per class, so the columns are matched on
    out-of-fold residuals (the contrast's own class replaced by its out-of-fold residual)."""
    return fit_export_probe(reference_model, mnist, fashion_test, tmp_path_factory.mktemp("contrast"), 7,
                            consistency=GRID, contrast=SOURCE)


def test_the_column_is_how_much_better_another_class_explains_the_input(both):
    det, sess, x = both
    assert sess.layer_names == (*det.layers, f"{GRID}>penultimate", NAME)
    assert [l.name for l in sess.info.layers] == [*det.layers, GRID]   # block3 is monitored: no extra tap
    assert det.contrast_alpha_ == 128 / 16 and det.consistency_alpha_ == 512 / 16
    res = sess.run(x, activations=True)
    a = res.activations[fmt.activation_output_name(SOURCE)]
    b = res.activations[fmt.activation_output_name("penultimate")]
    src, dst = det.layers.index(SOURCE), det.layers.index("penultimate")
    logr = np.log(np.column_stack([consistency_raw(det.fit_points_, src, dst, 8.0, a, b, np.full(len(x), k))
                                   for k in range(10)]) + EPS)
    own = logr[np.arange(len(x)), res.pred]
    logr[np.arange(len(x)), res.pred] = np.inf
    raw = own - logr.min(axis=1)
    centre, scale = det.centres_[-1], det.scales_[-1]
    np.testing.assert_allclose(res.layer_scores[:, -1], (raw - centre[0]) / scale[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(res.score, res.layer_scores.max(1))
    # the torch reference of every class ([B, C]) agrees with the predicted class's column
    region = det.head().regions[-1]
    with torch.no_grad():
        every = region(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(every[np.arange(len(x)), res.pred], raw, rtol=1e-3, atol=1e-3)
    # one input at a time gives what the batch gives
    one = np.concatenate([sess.run(x[i:i + 1]).layer_scores for i in range(0, len(x), 25)])
    np.testing.assert_allclose(one, res.layer_scores[::25], rtol=1e-4, atol=1e-4)
    # on ID digits the predicted class explains best (the contrast < 0) almost always
    assert np.mean(raw[:300] < 0) >= 0.95
    assert sess.info.params["contrast"].startswith(f"{NAME}: log(r_c + 1e-06) - min over k != c of log(r_k + 1e-06)")
    assert "alpha 8" in sess.info.params["contrast"] and "alpha 32" in sess.info.params["consistency"]


def _deepfool_like(model, x: np.ndarray, y: np.ndarray, steps: int = 40, step: float = 0.01) -> np.ndarray:
    """Inputs pushed across the nearest boundary by a few signed-gradient steps on the logit
    margin, stopped as soon as the prediction changes (minimal perturbations); unsuccessful
    rows are dropped."""
    xt = torch.tensor(x, requires_grad=True)
    done = np.zeros(len(x), bool)
    out = x.copy()
    for _ in range(steps):
        logits = model(xt)
        pred = logits.argmax(1).numpy()
        flipped = (pred != y) & ~done
        out[flipped] = xt.detach().numpy()[flipped]
        done |= flipped
        if done.all():
            break
        top2 = logits.topk(2, dim=1).values
        margin = logits.gather(1, torch.tensor(y).reshape(-1, 1)).squeeze(1) - torch.where(
            top2[:, 0] == logits.gather(1, torch.tensor(y).reshape(-1, 1)).squeeze(1), top2[:, 1], top2[:, 0])
        (grad,) = torch.autograd.grad(margin.sum(), xt)
        with torch.no_grad():
            xt -= step * grad.sign() * torch.tensor(~done, dtype=torch.float32).reshape(-1, 1, 1, 1)
            xt.clamp_(0, 1)
    return out[done]


def test_minimal_attacks_are_what_it_separates(both, reference_model, mnist):
    det, sess, _ = both
    x, y = mnist["test"][0][1000:1400], mnist["test"][1][1000:1400]
    adv = _deepfool_like(reference_model, x, y)
    assert len(adv) >= 200
    clean = sess.run(mnist["test"][0][2000:2500]).layer_scores
    attacked = sess.run(adv).layer_scores
    assert metrics.auroc(clean[:, -1], attacked[:, -1]) >= 0.95
    # raw > 0: another class (the attack's source, mostly) explains the penultimate features better
    raw = attacked[:, -1] * det.scales_[-1, 0] + det.centres_[-1, 0]
    assert np.mean(raw > 0) >= 0.5, np.mean(raw > 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(contrast="block9"), r"contrast='block9' is neither one of \['none', 'penultimate'\] "
                              r"nor a tap of this model: unknown layer name\(s\) \['block9'\]"),
    (dict(contrast="@sqrt_softmax"), r"contrast='@sqrt_softmax'.*must be a module of the model .*not an output tap"),
    (dict(layers=["block2", "block3"], contrast="block3"), r"contrast='block3' names the last monitored module layer itself"),
    (dict(layers=["penultimate", "@energy"], contrast="penultimate"),
     r"contrast='penultimate' predicts the last monitored module layer from the one before it, .* hold 1 module "
     r"layer\(s\); monitor two or more, or set contrast='none'"),
])
def test_contrast_errors_before_any_work(reference_model, kwargs, match):
    with pytest.raises(ExportError, match=match):
        UniformDetector(reference_model, kwargs.pop("layers", None), **kwargs)

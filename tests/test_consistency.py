"""The consistency column (``consistency="penultimate"``) on the real MNIST CNN: what the
exported file computes (recomputed here from its own activations with an independent
least-squares fit), how the column is put on the other layers' scale on ID data no part of
the fit saw, and its errors."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from consistency_reference import consistency_raw  # noqa: E402
from ufad.exporter import UniformDetector  # noqa: E402
from ufad.runtime import AnomalySession  # noqa: E402
from ufad.runtime import format as fmt  # noqa: E402
from ufad.runtime.errors import ExportError  # noqa: E402

NAME = "block3>penultimate"


def _fit(model, mnist, n: int) -> UniformDetector:
    x, y = mnist["train"]
    det = UniformDetector(model, consistency="penultimate", progress=False)
    return det.fit(x[:n], y[:n]).calibrate(mnist["valid"][0][:3000])


@pytest.fixture(scope="module")
def small(reference_model, mnist):
    """6000 fitting images: under ``max_points`` per class, so nothing is held out and the
    column is matched on out-of-fold residuals of the region points."""
    return _fit(reference_model, mnist, 6000)


@pytest.fixture(scope="module")
def large(reference_model, mnist):
    """15000 fitting images: ~1500 per class, so each class holds points out for the matching."""
    return _fit(reference_model, mnist, 15000)


@pytest.fixture(scope="module")
def exported(small, mnist, fashion_test, tmp_path_factory):
    path = tmp_path_factory.mktemp("consistency") / "c.onnx"
    small.export(path)
    rng = np.random.default_rng(3)
    x = np.concatenate([mnist["test"][0][:300], fashion_test[0][:200],
                        rng.uniform(0, 1, (50, 1, 28, 28)).astype(np.float32)])
    return AnomalySession(path, provider="cpu"), x


def test_the_file_scores_the_residual_of_each_class_regression(small, exported):
    """The column = (||residual||^2 - centre) / scale, one centre and scale for all classes,
    where the residual is the predicted class's standardized penultimate features minus their
    ridge prediction from its block3 features, fitted on that class's region points."""
    sess, x = exported
    assert sess.layer_names == (*small.layers, NAME)
    assert small.layers == ["block1", "block2", "block3", "penultimate", "@sqrt_softmax", "@energy"]
    res = sess.run(x, activations=True)
    assert fmt.activation_output_name(NAME) not in res.activations
    assert small.consistency_alpha_ == 128 / 16   # 'auto': D_a / 16 (block3: 128 channels)
    raw = consistency_raw(small.fit_points_, small.layers.index("block3"), small.layers.index("penultimate"),
                          small.consistency_alpha_, res.activations[fmt.activation_output_name("block3")],
                          res.activations[fmt.activation_output_name("penultimate")], res.pred)
    centre, scale = small.centres_[-1], small.scales_[-1]
    assert np.ptp(centre) == 0 and np.ptp(scale) == 0 and scale[0] > 0
    np.testing.assert_allclose(res.layer_scores[:, -1], (raw - centre[0]) / scale[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(res.score, res.layer_scores.max(1))
    # one input at a time (one class's weights read) gives what the batch gives
    one = np.concatenate([sess.run(x[i:i + 1]).layer_scores for i in range(0, len(x), 25)])
    np.testing.assert_allclose(one, res.layer_scores[::25], rtol=1e-4, atol=1e-4)
    # off the data: the column says what the other layers say about noise
    noise = res.layer_scores[-50:]
    assert (noise[:, -1] > sess.threshold).mean() >= 0.95


def _quantiles(det, mnist):
    test = det.score(mnist["test"][0][:4000])["layer_scores"].astype(np.float64)
    return np.quantile(test[:, -1], [0.5, 0.95]), np.quantile(test[:, :-1].max(axis=1), [0.5, 0.95])


def test_the_column_is_matched_to_the_other_layers_on_unseen_id_data(large, mnist):
    """With held-out fitting points, the column's median and 95% quantile on MNIST test images
    (neither fit nor calibration saw them) are those of the max of the other columns."""
    q_c, q_o = _quantiles(large, mnist)
    assert np.abs(q_c - q_o).max() <= 0.25 * (q_o[1] - q_o[0]), (q_c, q_o)


def test_without_held_out_points_the_column_is_matched_on_out_of_fold_residuals(small, mnist):
    """Nothing held out: the regression's residuals on its own points are smaller than on
    unseen ones, so the matching takes out-of-fold residuals; and the column does not sit
    above the other columns' max on unseen ID data (the region layers are matched in-sample,
    which leans the same safe way: the column decides less, never more)."""
    from ufad.exporter import boundaries

    region = small.head().regions[-1]
    pts = small.fit_points_
    src, dst = [pts[c][region.src] for c in range(10)], [pts[c][region.dst] for c in range(10)]
    with torch.no_grad():
        inside = np.concatenate([region.raw_for(torch.tensor(a), torch.tensor(b), torch.full((len(a),), c))
                                 .numpy() for c, (a, b) in enumerate(zip(src, dst))])
    out_of_fold = np.concatenate(boundaries.consistency_cross_raw(src, dst, small.consistency_alpha_))
    assert np.median(out_of_fold) > 1.4 * np.median(inside), (np.median(out_of_fold), np.median(inside))
    q_c, q_o = _quantiles(small, mnist)
    assert np.all(q_c <= q_o + 0.25 * (q_o[1] - q_o[0])), (q_c, q_o)


def test_consistency_needs_two_module_layers(reference_model):
    with pytest.raises(ExportError, match=r"consistency='penultimate' predicts the last monitored module layer "
                                          r".*hold 1 module layer\(s\).*set consistency='none'"):
        UniformDetector(reference_model, ["penultimate", "@sqrt_softmax"], consistency="penultimate")
    with pytest.raises(ExportError, match=r"consistency='last' is neither one of \['none', 'penultimate'\] nor a tap "
                                          r"of this model: unknown layer name\(s\) \['last'\]"):
        UniformDetector(reference_model, consistency="last")
    det = UniformDetector(reference_model, ["block3", "penultimate"], consistency="penultimate")
    assert det.layer_score_names() == ["block3", "penultimate"]   # the column exists once fitted

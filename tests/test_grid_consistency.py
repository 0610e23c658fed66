"""A consistency column whose source is a tap of its own (``consistency="block1:grid4"``): an
early block's feature map averaged on a grid of cells, tapped beside the monitored layers but
given no region. On the real MNIST CNN, checked against the torch model's own block1 output
(hooked here, cells cut by hand) and an independent least-squares refit of the regression."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from consistency_reference import consistency_raw, fit_export_probe  # noqa: E402
from ufad.exporter import UniformDetector  # noqa: E402
from ufad.runtime import format as fmt  # noqa: E402
from ufad.runtime.errors import ExportError  # noqa: E402

SOURCE = "block1:grid4"
NAME = f"{SOURCE}>penultimate"


@pytest.fixture(scope="module")
def grid(reference_model, mnist, fashion_test, tmp_path_factory):
    return fit_export_probe(reference_model, mnist, fashion_test, tmp_path_factory.mktemp("grid"), 5,
                            consistency=SOURCE)


def _cells(fmap: np.ndarray, k: int) -> np.ndarray:
    """Per-channel means over k x k cells, cut as adaptive average pooling cuts them
    (cell i spans floor(i H / k) .. ceil((i + 1) H / k)), channel-major."""
    n, c, h, w = fmap.shape
    out = np.empty((n, c, k, k))
    for i in range(k):
        for j in range(k):
            rows = slice(i * h // k, math.ceil((i + 1) * h / k))
            cols = slice(j * w // k, math.ceil((j + 1) * w / k))
            out[:, :, i, j] = fmap[:, :, rows, cols].mean(axis=(2, 3))
    return out.reshape(n, -1)


def test_the_source_is_tapped_on_its_grid_but_has_no_region(grid, reference_model):
    det, sess, x = grid
    assert det.layers == ["block1", "block2", "block3", "penultimate", "@sqrt_softmax", "@energy"]
    assert sess.layer_names == (*det.layers, NAME)   # one column for the pair, none for the source
    assert [l.name for l in sess.info.layers] == [*det.layers, SOURCE]
    assert sess.info.layers[-1].reduction == "grid4" and sess.info.layers[-1].dim == 32 * 16
    res = sess.run(x, activations=True)
    got = res.activations[fmt.activation_output_name(SOURCE)]
    seen = []
    hook = reference_model.block1.register_forward_hook(lambda m, i, o: seen.append(o.numpy()))
    try:
        with torch.no_grad():
            reference_model(torch.from_numpy(x))
    finally:
        hook.remove()
    np.testing.assert_allclose(got, _cells(seen[0], 4), rtol=1e-4, atol=1e-5)


def test_the_column_is_the_residual_of_each_class_regression_from_the_grid(grid):
    det, sess, x = grid
    assert det.consistency_alpha_ == 512 / 16   # 'auto': D_source / 16
    res = sess.run(x, activations=True)
    raw = consistency_raw(det.fit_points_, len(det.layers), det.layers.index("penultimate"), det.consistency_alpha_,
                          res.activations[fmt.activation_output_name(SOURCE)],
                          res.activations[fmt.activation_output_name("penultimate")], res.pred)
    centre, scale = det.centres_[-1], det.scales_[-1]
    np.testing.assert_allclose(res.layer_scores[:, -1], (raw - centre[0]) / scale[0], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(res.score, res.layer_scores.max(1))
    # ID accepted at the calibrated rate, uniform noise flagged (by this column as well)
    assert np.mean(~res.is_anomaly[:300]) >= 0.9
    assert res.is_anomaly[-50:].all() and (res.layer_scores[-50:, -1] > sess.threshold).mean() >= 0.9


def test_the_params_name_the_source_and_penalty(grid):
    det, sess, _ = grid
    assert sess.info.params["consistency"].startswith(f"{NAME}: ||b * s - (a @ W_c + w_c)||^2")
    assert "alpha 32" in sess.info.params["consistency"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(consistency="block9:grid4"), r"consistency='block9:grid4' is neither one of \['none', 'penultimate'\] "
                                       r"nor a tap of this model: unknown layer name\(s\) \['block9:grid4'\]"),
    (dict(consistency="block1:grid"), r"consistency='block1:grid' .*unknown reduction 'grid'.*or grid<k>"),
    (dict(consistency="@energy"), r"consistency='@energy'.*must be a module of the model .*not an output tap"),
    (dict(consistency="block1:grid4", consistency_alpha="-1"), r"consistency_alpha must be 'auto' or a number > 0, got '-1'"),
    (dict(layers=["block2", "block3"], consistency="block3"), r"consistency='block3' names the last monitored module "
                                                              r"layer itself"),
])
def test_consistency_source_errors_before_any_work(reference_model, kwargs, match):
    with pytest.raises(ExportError, match=match):
        UniformDetector(reference_model, kwargs.pop("layers", None), **kwargs)


@pytest.mark.parametrize("source, match", [
    ("block3:grid4", r"tap 'block3:grid4': grid4 averages a feature map over 4 cells per spatial axis, and 'block3' "
                     r"gives \(2, 128, 3, 3\) \(3x3 positions\): choose grid3 or less"),
    ("penultimate:grid2", r"tap 'penultimate:grid2': reduction 'grid2' does not fit a vector output"),
])
def test_a_grid_that_does_not_fit_the_map_is_refused_at_the_first_batch(reference_model, mnist, source, match):
    x, y = mnist["train"]
    det = UniformDetector(reference_model, consistency=source, progress=False)
    with pytest.raises(ExportError, match=match):
        det.fit(x[:512], y[:512])

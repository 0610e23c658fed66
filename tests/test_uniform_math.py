"""The uniform detector's math: the fused head that is exported computes exactly the
per-layer reference regions, and those agree with scikit-learn's one-class SVM."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ufad.exporter import boundaries  # noqa: E402
from ufad.exporter.detectors.uniform import RBFLayerRegions, UniformHead  # noqa: E402
from ufad.exporter.feature_maps import FeatureMap, LayerMoments  # noqa: E402
from ufad.runtime import format as fmt  # noqa: E402


@pytest.fixture(scope="module")
def features(fitted_detector, mnist, fashion_test):
    """Reduced activations of real ID, OOD and noise inputs, and their predictions."""
    xt, _ = mnist["test"]
    x = np.concatenate([xt[:200], fashion_test[0][:200],
                        np.random.default_rng(5).uniform(0, 1, (50, 1, 28, 28)).astype(np.float32)])
    ref = fitted_detector.score(x)
    feats = [torch.tensor(ref[fmt.activation_output_name(l)]) for l in fitted_detector.layers]
    return ref, feats, torch.tensor(ref["pred"])


def test_fused_head_equals_per_layer_reference(fitted_detector, features):
    ref, feats, pred = features
    head: UniformHead = fitted_detector.head()
    assert head.fused
    with torch.no_grad():
        raw = head.raw(feats)                                          # [B, L, C], unfused
        per_layer = (raw[torch.arange(len(pred)), :, pred] - head.centre[pred]) * head.inv_scale[pred]
    # the default layers: conv blocks, a whitened penultimate layer, sqrt(softmax), the energy
    assert fitted_detector.layers[-2:] == ["@sqrt_softmax", "@energy"]
    assert fitted_detector.params()["feature_maps"] == ["standardize"] * 3 + ["whiten"] + ["standardize"] * 2
    assert head.whitened == [3] and head.region_layers == [0, 1, 2, 3, 4] and not head.ball
    with torch.no_grad():
        for batch in (1, 7, 16, 17, len(pred)):                        # both If branches
            got = torch.cat([head(None, pred[i:i + batch], [f[i:i + batch] for f in feats])[1]
                             for i in range(0, len(pred), batch)])
            rel = (got - per_layer).abs() / per_layer.abs().clamp(min=1.0)
            assert float(rel.max()) <= 1e-4, (batch, float(rel.max()))
    np.testing.assert_allclose(ref["layer_scores"], per_layer.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref["score"], per_layer.numpy().max(1), rtol=1e-4, atol=1e-4)


def test_fused_ball_head_equals_per_layer_reference(reference_model, mnist, features):
    """Ball regions take the same fused path (one concat, one gathered row of centres): its
    layer scores are the per-layer ``BallLayerRegions``' own, at batch 1 and larger."""
    from ufad.exporter import UniformDetector

    x, y = mnist["train"]
    det = UniformDetector(reference_model, boundary="ball", progress=False).fit(x[:3000], y[:3000])
    _, feats, pred = features
    head: UniformHead = det.head()
    assert head.fused and head.ball and head.whitened == [3]
    with torch.no_grad():
        raw = head.raw(feats)
        per_layer = (raw[torch.arange(len(pred)), :, pred] - head.centre[pred]) * head.inv_scale[pred]
        for batch in (1, 16, len(pred)):
            got = torch.cat([head(None, pred[i:i + batch], [f[i:i + batch] for f in feats])[1]
                             for i in range(0, len(pred), batch)])
            rel = (got - per_layer).abs() / per_layer.abs().clamp(min=1.0)
            assert float(rel.max()) <= 1e-4, (batch, float(rel.max()))
    assert float(per_layer.std(0).min()) > 0.1   # real, varying scores in every column


def test_energy_layer_is_on_the_scale_of_the_other_layers(fitted_detector, features, mnist):
    """@energy's column is (-logsumexp(logits) - centre) / scale, one centre and scale for all
    classes, chosen on held-out fitting points so that its median and 95% quantile are those
    of the other layers' max: checked on MNIST test images, which neither fit nor calibration saw."""
    from scipy.special import logsumexp

    ref, _, _ = features
    li = fitted_detector.layers.index("@energy")
    centre, scale = fitted_detector.centres_[li], fitted_detector.scales_[li]
    assert np.ptp(centre) == 0 and np.ptp(scale) == 0 and scale[0] > 0
    energy = -logsumexp(ref["logits"].astype(np.float64), axis=1)
    np.testing.assert_allclose(ref["layer_scores"][:, li], (energy - centre[0]) / scale[0], rtol=1e-4, atol=1e-4)
    assert ref[fmt.activation_output_name("@energy")].shape[1] == 1

    test = fitted_detector.score(mnist["test"][0][:4000])["layer_scores"].astype(np.float64)
    others = np.delete(test, li, axis=1).max(axis=1)
    q_e, q_o = np.quantile(test[:, li], [0.5, 0.95]), np.quantile(others, [0.5, 0.95])
    assert np.abs(q_e - q_o).max() <= 0.25 * (q_o[1] - q_o[0]), (q_e, q_o)


def test_rbf_region_sign_matches_sklearn_decision_function():
    """raw > 0 exactly where OneClassSVM.decision_function < 0 (outside), on real-ish data."""
    from sklearn.svm import OneClassSVM

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    probe = np.concatenate([rng.normal(size=(200, 8)), rng.normal(scale=3.0, size=(200, 8))])
    region = boundaries.fit_rbf(x, nu=0.1, gamma=1 / 8)
    layer = RBFLayerRegions(FeatureMap(np.zeros(8), np.ones(8)), [region])
    with torch.no_grad():
        raw = layer(torch.tensor(probe, dtype=torch.float32))[:, 0].numpy()
    svm = OneClassSVM(kernel="rbf", nu=0.1, gamma=1 / 8, tol=1e-4).fit(x)
    dec = svm.decision_function(probe)
    clear = np.abs(dec) > 1e-4
    np.testing.assert_array_equal((raw > 0)[clear], (dec < 0)[clear])
    # and raw is exactly the log-ratio of the SVM's kernel sum to its offset
    expected = np.log(svm.offset_[0]) - np.log(svm.score_samples(probe))
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-4)
    # nu: about 10% of the fitting points fall outside
    with torch.no_grad():
        inside = layer(torch.tensor(x, dtype=torch.float32))[:, 0].numpy() <= 0
    assert 0.85 <= inside.mean() <= 0.95


def test_whitening_map_is_the_tied_class_covariance():
    """The streamed whitening map equals numpy's: (f - mean) @ P has identity tied
    class-centred covariance (up to the shrinkage), and the RBF region on whitened features
    gives the raw that sklearn's OneClassSVM gives on the same whitened points."""
    from sklearn.svm import OneClassSVM

    rng = np.random.default_rng(1)
    mix = rng.normal(size=(6, 6))
    cls = rng.integers(0, 3, 3000)
    f = rng.normal(size=(3000, 6)) @ mix + 4.0 * cls[:, None] + 2.0
    mom = LayerMoments(6, 3, whiten=True)
    for i in range(0, 3000, 512):                      # streamed in batches, as in fit()
        mom.add(f[i:i + 512], cls[i:i + 512])
    fmap = mom.feature_map(shrinkage=1e-9)
    centred = f - np.stack([f[cls == c].mean(0) for c in range(3)])[cls]
    tied = centred.T @ centred / len(f)
    np.testing.assert_allclose(fmap.transform.T @ tied @ fmap.transform, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(fmap.mean, f.mean(0), atol=1e-9)

    z = fmap.apply(f[cls == 0][:400])
    region = boundaries.fit_rbf(z, nu=0.1, gamma=1 / 6)
    layer = RBFLayerRegions(fmap, [region])
    probe = np.concatenate([f[cls == 0][400:600], f[cls == 1][:100]])
    with torch.no_grad():
        raw = layer(torch.tensor(probe, dtype=torch.float32))[:, 0].numpy()
    svm = OneClassSVM(kernel="rbf", nu=0.1, gamma=1 / 6, tol=1e-4).fit(z)
    # (sklearn's kernel sum underflows to 0 for the far class-1 points; ours is in log space)
    expected = np.log(svm.offset_[0]) - np.log(svm.score_samples(fmap.apply(probe[:200])))
    np.testing.assert_allclose(raw[:200], expected, rtol=1e-3, atol=1e-3)
    assert (raw[:200] > 0).mean() < 0.3 and (raw[200:] > 0).all()  # class 1 lies outside class 0's region

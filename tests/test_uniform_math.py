"""The uniform detector's math: the fused head that is exported computes exactly the
per-layer reference regions, and those agree with scikit-learn's one-class SVM."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ufad.exporter import boundaries  # noqa: E402
from ufad.exporter.detectors.uniform import RBFLayerRegions, UniformHead  # noqa: E402
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
        per_layer = raw[torch.arange(len(pred)), :, pred] * head.inv_scale[pred]
        for batch in (1, 7, 16, 17, len(pred)):                        # both If branches
            got = torch.cat([head(None, pred[i:i + batch], [f[i:i + batch] for f in feats])[1]
                             for i in range(0, len(pred), batch)])
            rel = (got - per_layer).abs() / per_layer.abs().clamp(min=1.0)
            assert float(rel.max()) <= 1e-4, (batch, float(rel.max()))
    np.testing.assert_allclose(ref["layer_scores"], per_layer.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ref["score"], per_layer.numpy().max(1), rtol=1e-4, atol=1e-4)


def test_rbf_region_sign_matches_sklearn_decision_function():
    """raw > 0 exactly where OneClassSVM.decision_function < 0 (outside), on real-ish data."""
    from sklearn.svm import OneClassSVM

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    probe = np.concatenate([rng.normal(size=(200, 8)), rng.normal(scale=3.0, size=(200, 8))])
    region = boundaries.fit_rbf(x, nu=0.1, gamma=1 / 8)
    layer = RBFLayerRegions(np.zeros(8), np.ones(8), [region])
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

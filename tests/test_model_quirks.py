"""Models as users write them, found by a sweep over models nobody here designed (session 16):
log-probability outputs, a softmax module at the end, a single logit, a submodule left in
training mode, float64 weights, labels beyond the model's classes, and exports whose float32
drift is the model's own, not the exporter's. Each once gave a traceback, a refusal of a
correct export, or a silently different model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from ufad.exporter import UniformDetector
from ufad.exporter import onnx_export
from ufad.runtime import AnomalySession
from ufad.runtime import format as fmt
from ufad.runtime.errors import ExportError

REFERENCE_TAPS = ["block1", "block2", "block3", "penultimate"]   # the MNIST CNN's automatic hidden taps


@pytest.fixture(scope="module")
def data(mnist):
    x, y = mnist["train"]
    return x[:3000], y[:3000]


@pytest.fixture(scope="module")
def held_out(mnist):
    return mnist["valid"][0][:600]


@pytest.mark.parametrize("last", [nn.LogSoftmax(dim=1), nn.Softmax(dim=1)])
def test_a_softmax_module_at_the_end_is_looked_through(reference_model, data, held_out, tmp_path, last):
    model = nn.Sequential(reference_model, last).eval()
    det = UniformDetector(model, progress=False).fit(*data).calibrate(held_out)
    hidden = [l for l in det.layers if not l.startswith("@")]
    # the penultimate features are the CNN's own, not the (log-)probabilities
    assert hidden == [f"0.{t}" for t in REFERENCE_TAPS], det.layers
    # log-probabilities have logsumexp 0, and so do probabilities, read as log p: an energy
    # column would be rounding noise
    assert "@energy" not in det.layers
    rep = det.export(tmp_path / "d.onnx")
    # (probabilities read as p made a narrow energy column whose rescaling showed float32
    # rounding: 2e-3 of the layer score)
    assert 0 < rep.model_float32_error < 1e-2 and rep.parity_max_rel_diff <= 1e-4
    sess = AnomalySession(tmp_path / "d.onnx", provider="cpu")
    noise = np.random.default_rng(0).uniform(0, 1, (300, 1, 28, 28)).astype(np.float32)
    assert sess.run(noise).is_anomaly.mean() >= 0.95
    assert sess.run(held_out[:300]).is_anomaly.mean() <= 0.1


def test_energy_asked_for_on_log_probabilities_is_refused(reference_model, data):
    model = nn.Sequential(reference_model, nn.LogSoftmax(dim=1)).eval()
    with pytest.raises(ExportError, match=r"returns log-probabilities.*drop '@energy' from layers"):
        UniformDetector(model, ["0.block1", "@energy"], progress=False).fit(*data)


def test_a_single_logit_is_refused_with_the_two_class_recipe(data):
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 1)).eval()
    with pytest.raises(ExportError, match=r"returns 1 logit per input.*torch.cat\(\[torch.zeros_like\(z\), z\]"):
        UniformDetector(model, progress=False).fit(data[0], (data[1] == 3).astype(np.int64))


def test_a_submodule_in_training_mode_is_refused_and_left_untouched(reference_model, data):
    model = copy.deepcopy(reference_model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    name = next(n for n, m in model.named_modules() if m is bn)
    bn.train()
    before = bn.running_mean.clone()
    with pytest.raises(ExportError, match=rf"training mode \({name}: .*model\.eval\(\)"):
        UniformDetector(model, progress=False).fit(*data)
    assert torch.equal(bn.running_mean, before) and bn.training


def test_float64_weights_are_refused(reference_model, data):
    with pytest.raises(ExportError, match=r"weights are float64.*model\.float\(\)"):
        UniformDetector(copy.deepcopy(reference_model).double(), progress=False).fit(*data)


def test_labels_beyond_the_models_classes_are_refused(reference_model, data):
    x, y = data
    y = y.copy()
    y[17] = 12
    with pytest.raises(ExportError, match=r"labels hold class 12 but the model has 10 outputs"):
        UniformDetector(reference_model, progress=False).fit(x, y)


# ---------------------------------------------------------------- parity judges the export
def _outputs(n: int, rng, drift: float, own: float | None):
    """reference / onnxruntime / float64 outputs of n inputs whose floats differ by ``drift``
    (relative) between torch and onnxruntime and by ``own`` between torch and float64."""
    logits = rng.normal(0, 5, (n, 10)).astype(np.float32)
    logits[:, 0] += 30.0                                        # no ties: pred is clear everywhere
    ref = {fmt.OUT_LOGITS: logits, fmt.OUT_PRED: logits.argmax(1), fmt.OUT_SCORE: rng.normal(0, 1, n).astype(np.float32),
           fmt.OUT_IS_ANOMALY: np.zeros(n, bool), fmt.OUT_LAYER_SCORES: rng.normal(0, 1, (n, 3)).astype(np.float32)}
    ref[fmt.OUT_SCORE] -= 10.0                                  # far under the threshold 0: verdicts are clear
    shift = lambda d, r: {k: (v * (1 + r)).astype(v.dtype) if v.dtype.kind == "f" else v for k, v in d.items()}  # noqa: E731
    return ref, shift(ref, drift), None if own is None else shift(ref, own)


def test_parity_allows_the_models_own_float32_error_and_no_more():
    rng = np.random.default_rng(0)
    # onnxruntime 3e-4 from torch; torch itself 2e-4 from the exact value: a correct export
    ref, got, exact = _outputs(64, rng, 3e-4, 2e-4)
    worst, excess, own = onnx_export.parity(ref, got, 0.0, 1e-4, exact)
    assert worst == pytest.approx(3e-4, rel=0.05) and own == pytest.approx(2e-4, rel=0.05) and excess < 1e-4
    # the same drift from a model that is exact to 1e-7 in float32: the export is wrong
    ref, got, exact = _outputs(64, rng, 3e-4, 1e-7)
    assert onnx_export.parity(ref, got, 0.0, 1e-4, exact)[1] > 1e-4
    # and without a float64 run, only rtol counts
    ref, got, _ = _outputs(64, rng, 3e-4, None)
    assert onnx_export.parity(ref, got, 0.0, 1e-4, None)[1] > 1e-4


def test_an_export_that_drifts_beyond_the_models_float32_error_is_refused(fitted_detector, held_out, tmp_path,
                                                                         monkeypatch):
    real = onnx_export._ort_outputs

    def drifting(*args, **kwargs):   # what a wrong kernel would give: 1% on every layer score
        out = real(*args, **kwargs)
        out[fmt.OUT_LAYER_SCORES] = out[fmt.OUT_LAYER_SCORES] * np.float32(1.01)
        return out

    monkeypatch.setattr(onnx_export, "_ort_outputs", drifting)
    with pytest.raises(ExportError, match=r"differ by 0\.0\d+ .*own float32 error there \(torch float32 vs "
                                          r"float64\) is [0-9.e-]+, and 4x that is allowed"):
        fitted_detector.export(tmp_path / "d.onnx", check_inputs=held_out[:192])
    assert not (tmp_path / "d.onnx").exists()

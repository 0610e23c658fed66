"""CUDA execution provider: verdicts agree with CPU on 1,000 inputs (``-m gpu``; skipped where
onnxruntime has no CUDAExecutionProvider), and asking for CUDA where it cannot run is a
ProviderError with an actionable message, never a silent CPU fallback.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from ufad.runtime import AnomalySession, ProviderError
from ufad.runtime.cli import main
from ufad.runtime.session import resolve_providers


def _cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.fixture(scope="module")
def inputs(mnist, fashion_test) -> np.ndarray:
    """1,000 inputs: 600 MNIST test (ID), 250 Fashion-MNIST (OOD), 150 uniform noise."""
    rng = np.random.default_rng(0)
    return np.concatenate([
        mnist["test"][0][:600], fashion_test[0][:250],
        rng.uniform(0, 1, (150, 1, 28, 28)).astype(np.float32),
    ])


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(),
                    reason="onnxruntime has no CUDAExecutionProvider (install ufad[gpu] on a CUDA machine)")
def test_cuda_matches_cpu(exported_path, session, inputs):
    cuda = AnomalySession(exported_path, provider="cuda")
    assert cuda.provider == "CUDAExecutionProvider"
    assert AnomalySession(exported_path, provider="auto").provider == "CUDAExecutionProvider"
    rc, rg = session.run(inputs), cuda.run(inputs)
    assert rg.provider == "CUDAExecutionProvider" and rc.provider == "CPUExecutionProvider"
    # Verdicts may differ only where the score sits on the threshold within float noise,
    # predictions only where the top two logits tie.
    near = np.abs(rc.score - rc.threshold) <= 1e-3 * np.maximum(1.0, np.abs(rc.score))
    assert np.all((rc.is_anomaly == rg.is_anomaly) | near)
    top2 = np.sort(rc.logits, axis=1)[:, -2:]
    tie = top2[:, 1] - top2[:, 0] <= 1e-3
    assert np.all((rc.pred == rg.pred) | tie)
    np.testing.assert_allclose(rg.score, rc.score, rtol=1e-3, atol=1e-3)
    assert (rc.is_anomaly == rg.is_anomaly).mean() >= 0.999
    assert 0.3 < rg.is_anomaly.mean() < 0.8  # ID mostly accepted, OOD/noise mostly flagged
    bad = inputs[:4].copy()
    bad[:, 0, 0, 0] = np.nan
    rn = cuda.run(bad)
    assert (rn.score == np.inf).all() and rn.is_anomaly.all()


def test_cuda_on_cpu_only_runtime_is_a_provider_error(exported_path):
    if _cuda_available():
        pytest.skip("this onnxruntime has CUDA; the refusal is tested on CPU-only installs")
    with pytest.raises(ProviderError) as e:
        AnomalySession(exported_path, provider="cuda")
    msg = str(e.value)
    assert "CUDAExecutionProvider is not available" in msg
    assert "pip install 'ufad[gpu]'" in msg and "provider='cpu'" in msg
    # auto means "CUDA when it can run": here that is CPU, with no error.
    assert AnomalySession(exported_path, provider="auto").provider == "CPUExecutionProvider"


def test_cli_provider_cuda_on_cpu_only_runtime(exported_path, tmp_path, mnist):
    if _cuda_available():
        pytest.skip("this onnxruntime has CUDA")
    np.save(tmp_path / "x.npy", mnist["test"][0][:2])
    res = CliRunner().invoke(main, ["score", str(exported_path), str(tmp_path / "x.npy"), "--provider", "cuda"])
    assert res.exit_code == 2 and res.stdout == ""
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "ufad[gpu]" in err


def test_unknown_provider_is_refused():
    with pytest.raises(ProviderError, match="choose auto, cpu or cuda"):
        resolve_providers("tpu")
    assert resolve_providers("CPU") == ["CPUExecutionProvider"]


def test_runtime_failure_inside_onnxruntime_is_a_provider_error(exported_path, mnist):
    """A failure while onnxruntime runs (e.g. CUDA out of memory) surfaces as a ProviderError
    that names the provider, never as a raw traceback, and never as a silent CPU retry
    (onnxruntime's InferenceSession.run would retry on CPU: the session turns that off)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    sess = AnomalySession(exported_path, provider="cpu")
    assert sess._sess._enable_fallback is False
    calls = []

    def failing(names, feeds, options):
        calls.append(len(feeds))
        raise Fail("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 2: out of memory")

    sess._run_fn = failing
    with pytest.raises(ProviderError, match="CPUExecutionProvider.*out of memory.*smaller batch_size"):
        sess.run(mnist["test"][0][:4])
    # one attempt, no retry; and only the input is fed: the default threshold is the graph's own
    assert calls == [1]

"""Core bars (issue 2): real model, real MNIST, exported .onnx scored through onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ufad.runtime import AnomalySession
from ufad.runtime import format as fmt


def auroc(id_scores: np.ndarray, anomaly_scores: np.ndarray) -> float:
    """AUROC with anomalies as the positive class (higher score = more anomalous)."""
    y = np.r_[np.zeros(len(id_scores)), np.ones(len(anomaly_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, anomaly_scores]))


def fgsm_successes(model, x, y, eps):
    """FGSM (eps in [0,1] pixel units) on correctly classified x; successful attacks only."""
    xt = torch.tensor(x, requires_grad=True)
    logits = model(xt)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y))
    (g,) = torch.autograd.grad(loss, xt)
    xa = (xt + eps * g.sign()).clamp(0, 1).detach()
    with torch.no_grad():
        pa = model(xa).argmax(1).numpy()
    ok = (logits.argmax(1).numpy() == y) & (pa != y)
    return xa.numpy()[ok]


@pytest.fixture(scope="module")
def id_result(session, mnist):
    xt, _ = mnist["test"]
    return session.run(xt)


def test_id_acceptance_at_calibrated_threshold(id_result):
    accepted = float(np.mean(~id_result.is_anomaly))
    assert accepted >= 0.94, f"only {accepted:.3f} of MNIST test accepted"


def test_auroc_fashion_mnist(session, id_result, fashion_test):
    xf, _ = fashion_test
    a = auroc(id_result.score, session.run(xf).score)
    assert a >= 0.97, f"AUROC vs Fashion-MNIST {a:.4f}"


def test_auroc_uniform_noise(session, id_result):
    noise = np.random.default_rng(1).uniform(0, 1, (2000, 1, 28, 28)).astype(np.float32)
    a = auroc(id_result.score, session.run(noise).score)
    assert a >= 0.99, f"AUROC vs uniform noise {a:.4f}"


def test_auroc_fgsm(session, id_result, reference_model, mnist):
    xt, yt = mnist["test"]
    xa = fgsm_successes(reference_model, xt[:2000], yt[:2000], 0.1)
    assert len(xa) >= 200, "FGSM produced too few successful attacks to measure"
    a = auroc(id_result.score, session.run(xa).score)
    assert a >= 0.90, f"AUROC vs FGSM eps=0.1 {a:.4f}"


def test_torch_reference_matches_onnxruntime(fitted_detector, session, mnist, fashion_test):
    xt, _ = mnist["test"]
    xf, _ = fashion_test
    x = np.concatenate([xt[:300], xf[:300], np.random.default_rng(2).uniform(0, 1, (100, 1, 28, 28)).astype(np.float32)])
    ref = fitted_detector.score(x)
    got = session.run(x, activations=True)
    for name, a, b in [("score", ref["score"], got.score), ("layer_scores", ref["layer_scores"], got.layer_scores),
                       ("logits", ref["logits"], got.logits)]:
        rel = np.abs(a - b) / np.maximum(1.0, np.abs(a))
        assert rel.max() <= 1e-4, f"{name}: max rel diff {rel.max():.2e}"
    for layer in fitted_detector.layers:
        out = fmt.activation_output_name(layer)
        np.testing.assert_allclose(got.activations[out], ref[out], rtol=1e-4, atol=1e-5)
    assert (ref["pred"] == got.pred).all()
    assert (ref["is_anomaly"] == got.is_anomaly).all()


def test_reference_scores_a_loader_as_it_scores_the_array(fitted_detector, mnist):
    """Rows come back in input order whether the data is one array (gathered into one
    preallocated array per output) or an iterable of uneven (x, y) batches (concatenated)."""
    xt, yt = mnist["test"]
    x, y = xt[:700], yt[:700]
    whole = fitted_detector.score(x)
    loader = [(x[i:j], y[i:j]) for i, j in [(0, 5), (5, 300), (300, 301), (301, 700)]]
    parts = fitted_detector.score(loader)
    assert whole.keys() == parts.keys() and len(whole["score"]) == 700
    for name in whole:
        assert whole[name].dtype == parts[name].dtype and whole[name].shape == parts[name].shape
        # The batches differ in size (5 / 295 / 1 / 399 rows against the array's own chunks),
        # so float32 GEMMs block differently: a layer score near 0 moved by 2e-5 in a serial
        # run. A row out of order would differ by O(1).
        np.testing.assert_allclose(parts[name], whole[name], rtol=1e-5, atol=1e-4, err_msg=name)
    assert (whole["pred"] == fitted_detector.model(torch.tensor(x)).argmax(1).numpy()).all()


def test_batched_requests_are_answered_bit_for_bit_as_alone(session, mnist):
    """The serving batcher (torch-free, no Ray) on a file this checkout exports: requests of
    mixed sizes scored together answer exactly what each request alone gets, every field
    (a batch of one rounds differently in the uniform head: the batcher gives it a call of
    its own)."""
    from ufad.runtime.serve_requests import score_requests

    xt, _ = mnist["test"]
    sizes, at, requests = (1, 1, 2, 3, 1, 16, 17, 5, 40, 2, 1), 0, []
    for k, n in enumerate(sizes):
        requests.append((xt[at:at + n], None if k % 3 else 4.0))
        at += n
    for (x, thr), answer in zip(requests, score_requests(session, requests)):
        local = session.run(x, threshold=thr).records()
        for rec in local:
            rec["provider"] = session.provider
        assert answer == local


def test_file_is_one_self_contained_onnx(exported_path):
    import onnx

    assert not list(exported_path.parent.glob("*.data")), "side .onnx.data file written"
    model = onnx.load(str(exported_path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    outs = [o.name for o in model.graph.output]
    assert outs[:5] == ["logits", "pred", "score", "is_anomaly", "layer_scores"]
    assert {"act_block1", "act_block2", "act_block3", "act_penultimate"} <= set(outs)
    inputs = {i.name: i for i in model.graph.input}
    assert inputs["input"].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    inits = {i.name for i in model.graph.initializer}
    assert "threshold" in inits  # optional input with the calibrated default
    meta = {p.key: p.value for p in model.metadata_props}
    for key in fmt.REQUIRED_KEYS + (fmt.KEY_PRODUCER,):
        assert key in meta, key
    cal = json.loads(meta[fmt.KEY_CALIBRATION])
    assert cal["target_tpr"] == 0.95 and cal["n_samples"] == 10000
    assert float(meta[fmt.KEY_THRESHOLD]) == pytest.approx(cal["threshold"])
    params = json.loads(meta[fmt.KEY_PARAMS])
    assert params["nu"] == 0.1 and params["boundary"] == "rbf"


def test_no_per_class_unrolled_head(exported_path):
    """Statistics are vectorised: a handful of matmuls, not one subgraph per class."""
    import onnx

    model = onnx.load(str(exported_path))
    ops = [n.op_type for n in model.graph.node]
    layers = AnomalySession(exported_path, provider="cpu").layer_names
    assert ops.count("ReduceLogSumExp") <= len(layers) < 10  # one per monitored layer, not per class
    assert len(ops) < 200


def test_threshold_input_overrides_default(session, mnist):
    xt, _ = mnist["test"]
    r0 = session.run(xt[:200])
    r_lo = session.run(xt[:200], threshold=-1e9)
    r_hi = session.run(xt[:200], threshold=1e9)
    assert r_lo.is_anomaly.all() and not r_hi.is_anomaly.any()
    np.testing.assert_array_equal(r0.is_anomaly, r0.score > session.threshold)
    # the nu boundary rule (threshold 0): outside any region of the predicted class
    r_nu = session.run(xt[:200], threshold=0.0)
    np.testing.assert_array_equal(r_nu.is_anomaly, (r_nu.layer_scores > 0).any(axis=1))


def test_ball_boundary_exports_and_detects(reference_model, mnist, fashion_test, tmp_path):
    from ufad.exporter import UniformDetector

    x, y = mnist["train"]
    xv, _ = mnist["valid"]
    det = UniformDetector(reference_model, boundary="ball", progress=False).fit(x[:5000], y[:5000]).calibrate(xv[:3000])
    det.export(tmp_path / "ball.onnx", check_inputs=xv[:128])
    sess = AnomalySession(tmp_path / "ball.onnx", provider="cpu")
    xt, _ = mnist["test"]
    a = auroc(sess.run(xt[:3000]).score, sess.run(fashion_test[0][:3000]).score)
    assert a >= 0.95, f"ball boundary AUROC vs Fashion-MNIST {a:.4f}"


def test_runtime_works_without_torch(exported_path, mnist, tmp_path):
    xt, _ = mnist["test"]
    np.save(tmp_path / "x.npy", xt[:64])
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked for this test")
        sys.meta_path.insert(0, Block())
        import numpy as np
        from ufad.runtime import AnomalySession
        s = AnomalySession({str(exported_path)!r}, provider="cpu")
        r = s.run(np.load({str(tmp_path / 'x.npy')!r}))
        assert "torch" not in sys.modules
        print(int((~r.is_anomaly).sum()), r.provider)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    n_ok, provider = out.stdout.split()
    assert int(n_ok) >= 55 and provider == "CPUExecutionProvider"


def test_cli_export_score_inspect(tmp_path, mnist):
    """The documented interface: ufad export / score --json / inspect --json, as subprocesses."""
    xt, _ = mnist["test"]
    x = np.concatenate([xt[:20], np.random.default_rng(3).uniform(0, 1, (5, 1, 28, 28)).astype(np.float32)])
    np.save(tmp_path / "inputs.npy", x)
    xv, yv = mnist["valid"]
    np.savez(tmp_path / "calib.npz", x=xv[:2000], y=yv[:2000])
    out = tmp_path / "det.onnx"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cli = [sys.executable, "-m", "ufad.runtime.cli"]
    r = subprocess.run(cli + ["export", "ufad.models.mnist_cnn:pretrained", "--data", "mnist", "-o", str(out),
                              "--limit", "4000", "--max-points", "300", "--calib-data", str(tmp_path / "calib.npz"),
                              "--quiet"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.exists() and "wrote" in r.stdout
    r = subprocess.run(cli + ["score", str(out), str(tmp_path / "inputs.npy"), "--json"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 25
    assert {"pred", "score", "is_anomaly", "threshold", "layer_scores", "label"} <= set(rows[0])
    assert sum(not row["is_anomaly"] for row in rows[:20]) >= 17
    assert all(row["is_anomaly"] for row in rows[20:])
    r = subprocess.run(cli + ["inspect", str(out), "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["method"] == "uniform" and len(info["layers"]) == 6 and info["threshold"] > 0
    assert [(l["name"], l["dim"]) for l in info["layers"][-2:]] == [("@sqrt_softmax", 10), ("@energy", 1)]
    assert info["calibration"]["n_samples"] == 2000 and "calib.npz" in info["calibration"]["source"]
    r = subprocess.run(cli + ["score", str(tmp_path / "missing.onnx"), str(tmp_path / "inputs.npy")],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_provider_is_reported(session):
    assert session.provider == "CPUExecutionProvider"
    assert session.run(np.zeros((1, 1, 28, 28), np.float32)).provider == "CPUExecutionProvider"

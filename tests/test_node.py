"""The Node.js client (examples/node/score.js, onnxruntime-node) gives the same verdicts as the
Python runtime on 1000 real inputs: MNIST test (ID), Fashion-MNIST (OOD), uniform and gaussian
noise, and FGSM adversarial digits made here with torch.

Skips when node/npm are absent or the npm packages cannot be installed (no registry).
Score differences use the project's parity convention |a - b| / max(1, |b|).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from npm_packages import npm_ready

torch = pytest.importorskip("torch")

NODE_DIR = Path(__file__).resolve().parents[1] / "examples" / "node"
REL_TOL = 1e-4


def run_client(model: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run score.js from its own folder (node resolves `require` from there)."""
    proc = subprocess.run(["node", "score.js", str(model), *map(str, args)], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"node client failed ({proc.returncode}): {proc.stderr}")
    return proc


def fgsm(model, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """One-step FGSM on the classifier's cross-entropy, clipped to the [0, 1] pixel range."""
    xt = torch.tensor(x, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(xt), torch.as_tensor(y))
    (grad,) = torch.autograd.grad(loss, xt)
    return (xt + eps * grad.sign()).clamp(0.0, 1.0).detach().numpy().astype(np.float32)


@pytest.fixture(scope="session")  # session scope: skip before the slow shared fixtures
def node_ready():
    npm_ready(NODE_DIR, ("onnxruntime-node",))


@pytest.fixture(scope="module")
def thousand_inputs(mnist, fashion_test, reference_model):
    """1000 real inputs: 400 ID, 300 OOD, 100 uniform, 100 gaussian noise, 100 FGSM."""
    xt, yt = mnist["test"]
    xf, _ = fashion_test
    rng = np.random.default_rng(5)
    uniform = rng.uniform(0, 1, (100, 1, 28, 28)).astype(np.float32)
    gauss = np.clip(rng.normal(0.5, 0.3, (100, 1, 28, 28)), 0, 1).astype(np.float32)
    adv = fgsm(reference_model, xt[400:500], yt[400:500], eps=0.15)
    x = np.concatenate([xt[:400], xf[:300], uniform, gauss, adv]).astype(np.float32)
    kinds = ["mnist"] * 400 + ["fashion"] * 300 + ["uniform"] * 100 + ["gaussian"] * 100 + ["fgsm"] * 100
    return x, np.array(kinds)


def test_node_client_matches_python_runtime(node_ready, exported_path, session, thousand_inputs, tmp_path):
    x, kinds = thousand_inputs
    path = tmp_path / "inputs.npy"
    np.save(path, x)
    proc = run_client(exported_path, path, "--threads", "2")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    ref = session.run(x).records()
    assert len(rows) == len(ref) == 1000

    pred_js = np.array([r["pred"] for r in rows])
    anom_js = np.array([r["is_anomaly"] for r in rows])
    score_js = np.array([r["score"] for r in rows], dtype=np.float64)
    pred_py = np.array([r["pred"] for r in ref])
    anom_py = np.array([r["is_anomaly"] for r in ref])
    score_py = np.array([r["score"] for r in ref], dtype=np.float64)
    assert (pred_js == pred_py).sum() == 1000
    assert (anom_js == anom_py).sum() == 1000
    rel = np.abs(score_js - score_py) / np.maximum(1.0, np.abs(score_py))
    assert rel.max() <= REL_TOL, f"max relative score diff {rel.max():.3g}"

    for a, b in zip(rows, ref):
        assert a["index"] == b["index"] and a["label"] == b["label"]
        assert a["threshold"] == b["threshold"] == session.threshold
        assert a["nonfinite_input"] is b["nonfinite_input"] is False
        assert list(a["layer_scores"]) == list(b["layer_scores"]) == list(session.layer_names)
        la, lb = np.array(list(a["layer_scores"].values())), np.array(list(b["layer_scores"].values()))
        assert np.all(np.abs(la - lb) / np.maximum(1.0, np.abs(lb)) <= REL_TOL)
        assert a["source"] == str(path) and a["provider"] == "CPUExecutionProvider"
    # The verdicts themselves must be meaningful, else agreement would prove little.
    flagged = {k: anom_js[kinds == k].mean() for k in np.unique(kinds)}
    assert flagged["mnist"] < 0.15 and flagged["fashion"] > 0.8 and flagged["fgsm"] > 0.5, flagged
    assert flagged["uniform"] > 0.9 and flagged["gaussian"] > 0.9, flagged


def test_node_client_threshold_nonfinite_uint8_and_errors(node_ready, exported_path, session, mnist, tmp_path):
    xt, _ = mnist["test"]
    # uint8 pixels are divided by 255 exactly as the Python runtime does; NaN scores +inf.
    u8 = np.round(xt[:4, 0] * 255).astype(np.uint8)             # [B, H, W]: channel axis added
    nan = xt[4:6].copy()
    nan[1, 0, 3, 3] = np.nan
    np.save(tmp_path / "u8.npy", u8)
    np.save(tmp_path / "nan.npy", nan)
    thr = 0.5
    proc = run_client(exported_path, tmp_path / "u8.npy", tmp_path / "nan.npy", "--threshold", thr)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    ref = session.run(u8, threshold=thr).records() + session.run(nan, threshold=thr).records()
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 0, 1]
    for a, b in zip(rows, ref):
        assert a["pred"] == b["pred"] and a["is_anomaly"] == b["is_anomaly"], (a, b)
        assert a["threshold"] == thr and a["nonfinite_input"] == b["nonfinite_input"]
        if isinstance(b["score"], str):
            assert a["score"] == b["score"] == "inf"
        else:
            assert abs(a["score"] - b["score"]) <= REL_TOL * max(1.0, abs(b["score"]))
            assert a["is_anomaly"] == (not a["score"] <= thr)
    assert rows[-1]["nonfinite_input"] is True and rows[-1]["is_anomaly"] is True

    # A NaN image stays anomalous even with an infinite threshold (as in the Python runtime).
    rows = [json.loads(line) for line in run_client(exported_path, tmp_path / "nan.npy", "--threshold", "inf").stdout.splitlines()]
    ref = session.run(nan, threshold=float("inf")).records()
    assert [r["is_anomaly"] for r in rows] == [r["is_anomaly"] for r in ref] == [False, True]
    assert rows[1]["score"] == "inf" and rows[0]["threshold"] == "inf"
    assert set(rows[1]["layer_scores"].values()) <= {"nan", "inf"}  # strict JSON: no NaN tokens

    # Metadata through the JS protobuf reader equals the Python parse.
    info = json.loads(run_client(exported_path, "--info").stdout)
    py = session.info.to_json()
    for key in ("format_version", "method", "classes", "input", "threshold", "graph_sha256", "content_sha256",
                "signed", "layers", "params"):
        assert info[key] == py[key], key
    assert info["verified"] is True and info["layer_names"] == list(session.layer_names)

    # User mistakes: one line `error: ...`, exit 2, no stack trace.
    np.save(tmp_path / "pixels255.npy", (xt[:2] * 255).astype(np.float32))
    np.save(tmp_path / "badshape.npy", np.zeros((2, 3, 28, 28), np.float32))
    tampered = bytearray(exported_path.read_bytes())
    i = tampered.find(np.float32(session.threshold).tobytes())  # a byte inside the graph
    assert i > 0
    tampered[i] ^= 1
    (tmp_path / "tampered.onnx").write_bytes(bytes(tampered))
    # The attack: one metadata value edited with onnx (the graph untouched).
    from filetools import with_metadata

    with_metadata(exported_path, tmp_path / "defused.onnx", lambda m: m.update({"ufad.threshold": "1e9"}))
    with_metadata(exported_path, tmp_path / "added.onnx", lambda m: m.update({"ufad.note": "x"}))

    def downgrade(m):
        m["ufad.format_version"] = "1"
        m.pop("ufad.content_sha256")
    with_metadata(exported_path, tmp_path / "downgraded.onnx", downgrade)
    cases = [
        ((exported_path, tmp_path / "pixels255.npy"), "divide by 255"),
        ((exported_path, tmp_path / "badshape.npy"), "expected float32 [B, 1, 28, 28]"),
        ((exported_path, tmp_path / "missing.npy"), "no such file"),
        ((tmp_path / "tampered.onnx", tmp_path / "u8.npy"), "sha256"),
        ((tmp_path / "defused.onnx", tmp_path / "u8.npy"), "content sha256"),
        ((tmp_path / "added.onnx", tmp_path / "u8.npy"), "edited after export"),
        ((tmp_path / "downgraded.onnx", tmp_path / "u8.npy"), "graph was written as version 2"),
        ((tmp_path / "u8.npy", tmp_path / "u8.npy"), "not"),
    ]
    for args, needle in cases:
        p = run_client(*args, check=False)
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.startswith("error: ") and needle in p.stderr and "    at " not in p.stderr, p.stderr


def test_node_client_scores_a_detector_that_reads_ids(node_ready, tmp_path):
    """tokens_small.onnx (an embedding model on digits as 64 ids; tests/runtime/data): int64 and
    int32 .npy files give the Python runtime's scores and verdicts, an unseen id is flagged, and
    floats are refused with one line."""
    from ufad.runtime import AnomalySession

    data = Path(__file__).resolve().parent / "runtime" / "data"
    model = data / "tokens_small.onnx"
    ids = np.load(data / "tokens.npy")[:40].copy()
    ids[3, 7] = 99                                   # never seen at fit: flagged, not fed to the embedding
    ref = AnomalySession(model, provider="cpu").run(ids)
    for dtype in (np.int64, np.int32):
        np.save(tmp_path / "ids.npy", ids.astype(dtype))
        rows = [json.loads(line) for line in run_client(model, tmp_path / "ids.npy").stdout.splitlines()]
        assert [r["pred"] for r in rows] == ref.pred.tolist()
        assert [r["is_anomaly"] for r in rows] == ref.is_anomaly.tolist()
        assert [r["out_of_range_input"] for r in rows] == ref.out_of_range.tolist()
        assert rows[3]["score"] == "inf" and rows[3]["out_of_range_input"]
        finite = [i for i in range(len(rows)) if i != 3]
        got = np.array([rows[i]["score"] for i in finite], np.float64)
        assert np.all(np.abs(got - ref.score[finite]) <= REL_TOL * np.maximum(1.0, np.abs(ref.score[finite])))
    np.save(tmp_path / "f.npy", ids.astype(np.float32))
    proc = run_client(model, tmp_path / "f.npy", check=False)
    assert proc.returncode != 0 and "reads integer ids" in proc.stderr and "at " not in proc.stderr.strip().splitlines()[-1]

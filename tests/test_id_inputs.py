"""Models that read integer ids (token / category indices through an embedding): the data
stay int64 from fit to file to runtime, the file says so, and ids the detector never saw are
flagged, not fed to an embedding that lacks them. Real data: scikit-learn's digits read as
64 tokens (each a block's pixel count, 0..16)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from torch import nn

from ufad.exporter import UniformDetector
from ufad.runtime import AnomalySession
from ufad.runtime.cli import main
from ufad.runtime.errors import ExportError, InputError
from ufad.runtime.serve_requests import parse_score_request

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_runtime_fixture import train_token_mlp  # noqa: E402  (the committed runtime fixture's model)


@pytest.fixture(scope="module")
def digits_ids():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm].astype(np.int64), y[perm]


@pytest.fixture(scope="module")
def id_model(digits_ids):
    x, y = digits_ids
    return train_token_mlp(x[:1200], y[:1200])


@pytest.fixture(scope="module")
def id_file(tmp_path_factory, id_model, digits_ids):
    x, y = digits_ids
    det = UniformDetector(id_model, progress=False).fit(x[:1200], y[:1200]).calibrate(x[1200:1500])
    path = tmp_path_factory.mktemp("ids") / "ids.onnx"
    det.export(path)
    return det, path


def test_ids_stay_integers_from_fit_to_runtime(id_file, digits_ids):
    det, path = id_file
    x, y = digits_ids
    sess = AnomalySession(path, provider="cpu")
    spec = sess.input_spec
    assert (spec.dtype, spec.value_range, spec.range_policy) == ("int64", (0.0, 16.0), "flag")
    res = sess.run(x[1500:])
    assert np.mean(res.pred == y[1500:]) >= 0.9           # the model learnt
    assert res.is_anomaly.mean() <= 0.15                  # calibrated at 95% of held-out ID
    ref = det.score(x[1500:])
    np.testing.assert_allclose(res.score, ref["score"], rtol=1e-4, atol=1e-4)
    noise = sess.run(np.random.default_rng(1).integers(0, 17, (300, 64)))
    assert noise.is_anomaly.mean() >= 0.9                 # random tokens are not digits


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.uint8, np.uint16])
def test_any_integer_width_is_read_as_the_same_ids(id_file, digits_ids, dtype):
    sess = AnomalySession(id_file[1], provider="cpu")
    x = digits_ids[0][1500:1540]
    np.testing.assert_array_equal(sess.run(x.astype(dtype)).score, sess.run(x).score)


@pytest.mark.parametrize("bad", [np.float32, np.float64, bool])
def test_floats_and_bools_are_refused_with_what_to_pass(id_file, digits_ids, bad):
    sess = AnomalySession(id_file[1], provider="cpu")
    with pytest.raises(InputError, match=r"reads integer ids.*int64 \[B, 64\].*astype\(np.int64\)"):
        sess.run(digits_ids[0][:4].astype(bad))


def test_unseen_ids_are_flagged_and_never_reach_the_embedding(id_file, digits_ids):
    sess = AnomalySession(id_file[1], provider="cpu")
    x = digits_ids[0][1500:1506].copy()
    clean = sess.run(x)
    x[1, 5], x[3, 0], x[4, 63] = 17, -1, 10 ** 12          # the embedding has rows 0..16 only
    res = sess.run(x)
    assert res.out_of_range.tolist() == [False, True, False, True, True, False]
    assert np.isinf(res.score[[1, 3, 4]]).all() and res.is_anomaly[[1, 3, 4]].all()
    np.testing.assert_array_equal(res.score[[0, 2, 5]], clean.score[[0, 2, 5]])
    # a client that skips the Python checks still gets a verdict, not an onnxruntime error
    raw = sess._sess.run(["score", "is_anomaly", "input_ok"], {"input": x})
    assert np.isinf(raw[0][[1, 3, 4]]).all() and raw[1][[1, 3, 4]].all()
    assert raw[2].tolist() == [True, False, True, False, False, True]   # the rows needing care


def test_refuse_policy_names_the_ids(tmp_path, id_model, digits_ids):
    x, y = digits_ids
    det = UniformDetector(id_model, progress=False, range_policy="refuse").fit(x[:1200], y[:1200])
    det.calibrate(x[1200:1500]).export(tmp_path / "refuse.onnx")
    sess = AnomalySession(tmp_path / "refuse.onnx", provider="cpu")
    bad = x[1500:1503].copy()
    bad[0, 0], bad[2, 7] = 40, -1
    with pytest.raises(InputError, match=r"ids span \[-1, 40\], beyond the ids seen at fit \[0, 16\]"):
        sess.run(bad)
    assert sess._sess.run(["input_ok"], {"input": bad})[0].tolist() == [False, True, False]
    scored = AnomalySession(tmp_path / "refuse.onnx", provider="cpu", range_check="off").run(bad)
    assert np.isfinite(scored.score).all()                # clamped into the range, scored


def test_a_dtype_mismatch_says_which_dtype_to_pass(id_model, digits_ids):
    x, y = digits_ids
    with pytest.raises(ExportError, match=r"dtype float32.*embedding reads integer ids.*astype\(np.int64\)"):
        UniformDetector(id_model, progress=False).fit(x[:300].astype(np.float32), y[:300])
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with pytest.raises(ExportError, match=r"dtype int64.*pass floats \(x.astype\(np.float32\)\)"):
        UniformDetector(mlp, progress=False).fit(x[:300], y[:300])


def test_cli_exports_and_scores_ids(tmp_path, id_model, digits_ids, monkeypatch):
    from safetensors.torch import save_file

    x, y = digits_ids
    (tmp_path / "idmodel.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom make_runtime_fixture import TokenMLP\n\n"
        "def build():\n    return TokenMLP()\n" % str(Path(__file__).resolve().parents[1] / "tools"))
    save_file(id_model.state_dict(), str(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "train.npz", x=x[:1500], y=y[:1500])
    np.save(tmp_path / "ids.npy", x[1500:1510].astype(np.int32))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["export", "idmodel:build", "--weights", "w.safetensors", "--data",
                                    "train.npz", "-o", "d.onnx", "--quiet"])
    assert out.exit_code == 0, out.output
    listed = CliRunner().invoke(main, ["layers", "idmodel:build", "--data", "train.npz"])
    assert listed.exit_code == 0 and "embed" in listed.output, listed.output
    listed = CliRunner().invoke(main, ["layers", "idmodel:build", "--input-shape", "64"])
    assert listed.exit_code == 2 and "pass --data with an .npz whose x holds integer ids" in listed.output
    res = CliRunner().invoke(main, ["score", "d.onnx", "ids.npy", "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in res.stdout.splitlines()]
    assert [r["pred"] for r in rows] == AnomalySession(tmp_path / "d.onnx").run(x[1500:1510]).pred.tolist()


def test_a_served_request_of_ids_is_read_as_ids(id_file, digits_ids):
    spec = AnomalySession(id_file[1], provider="cpu").input_spec
    arr, _ = parse_score_request(json.dumps({"inputs": digits_ids[0][:2].tolist()}).encode(), spec)
    assert arr.dtype == np.int64 and arr.shape == (2, 64)
    with pytest.raises(InputError, match="reads integer ids"):
        parse_score_request(json.dumps({"inputs": [[0.5] * 64]}).encode(), spec)


# ------------------------------------------------------------------ padded token sequences
PAD = 17


class PaddedText(nn.Module):
    """A text transformer over padded id sequences, as such models are written: the embedding
    declares its pad id, attention ignores pads, the head averages the real tokens."""

    def __init__(self, d: int = 32):
        super().__init__()
        import torch

        self.embed = nn.Embedding(PAD + 1, d, padding_idx=PAD)
        self.pos = nn.Parameter(0.1 * torch.randn(1, 64, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 10)

    def forward(self, ids):
        pad = ids == PAD
        h = self.encoder(self.embed(ids) + self.pos[:, :ids.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


def test_token_taps_leave_the_embeddings_pad_positions_out(digits_ids, tmp_path):
    import torch

    from ufad.exporter.eval import metrics
    from ufad.exporter.taps import ActivationCapture

    x, y = digits_ids
    rng = np.random.default_rng(0)

    def padded(ids: np.ndarray) -> np.ndarray:   # each sequence cut to 40..64 real ids
        ids = ids.copy()
        for row, n in zip(ids, rng.integers(40, 65, len(ids))):
            row[n:] = PAD
        return ids

    x = padded(x)
    torch.manual_seed(0)
    model = PaddedText()
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(15):
        for i in range(0, 1500, 50):
            loss = nn.functional.cross_entropy(model(torch.as_tensor(x[i:i + 50])), torch.as_tensor(y[i:i + 50]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    det = UniformDetector(model, progress=False).fit(x[:1200], y[:1200]).calibrate(x[1200:1500])
    assert det.layers[:3] == ["embed", "encoder.layers.0", "encoder.layers.1"], det.layers
    assert [t.pad_id for t in det.taps[:3]] == [PAD] * 3
    # a padded sentence reads like its unpadded self: the taps average its real tokens only
    # (before: the mean over all 64 positions, pads included, moved with the sentence's length)
    row = x[1500]
    n = int((row != PAD).sum())
    cap = ActivationCapture(model, det.taps[:3])
    feats = []
    with torch.no_grad():
        for ids in (row[None], row[None, :n]):
            model(torch.as_tensor(ids))
            feats.append([f.numpy() for f in cap.collect(None)])
    cap.remove()
    assert n < 64
    for a, b in zip(*feats):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    det.export(tmp_path / "padded.onnx")
    sess = AnomalySession(tmp_path / "padded.onnx", provider="cpu")
    res = sess.run(x[1500:])
    np.testing.assert_allclose(res.score, det.score(x[1500:])["score"], rtol=1e-3, atol=1e-3)
    noise = sess.run(padded(rng.integers(0, PAD, (300, 64))))
    # AUROC, higher score = more anomalous, random ids (padded alike) positive: 0.9999 when
    # written (0.9965 averaging the pads too)
    assert metrics.auroc(res.score, noise.score) >= 0.99 and noise.is_anomaly.mean() >= 0.95

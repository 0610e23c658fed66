"""Input hardening of the runtime: shapes, dtypes, NaN/Inf, ranges, layouts, and input files
through ``ufad score`` (one ``error:`` line, non-zero exit, never a traceback).

Everything runs on the real exported reference detector (``session`` / ``exported_path``)
with real MNIST test images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from ufad.runtime import AnomalySession, InputError, ScoreResult
from ufad.runtime.cli import main


@pytest.fixture(scope="module")
def x(mnist) -> np.ndarray:
    """32 real MNIST test images, float32 [32, 1, 28, 28] in [0, 1]."""
    return np.ascontiguousarray(mnist["test"][0][:32])


@pytest.fixture(scope="module")
def ref(session, x) -> ScoreResult:
    return session.run(x)


RTOL = 1e-4  # the exporter's own torch/onnxruntime parity bar: |a - b| <= RTOL * max(1, |b|)


def _close(a: ScoreResult, b: ScoreResult) -> None:
    """The same samples scored inside batches of another size. onnxruntime may then run other
    kernels (the uniform head takes a gather path for small batches), so floats agree to
    rounding (measured: <= 1e-5 relative) and decisions exactly, except a score sitting on
    the threshold."""
    np.testing.assert_array_equal(a.pred, b.pred)
    np.testing.assert_array_equal(a.nonfinite, b.nonfinite)
    near = np.abs(b.score - b.threshold) <= RTOL * np.maximum(1.0, np.abs(b.score))
    assert np.all((a.is_anomaly == b.is_anomaly) | near)
    for k in ("score", "layer_scores", "logits"):
        np.testing.assert_allclose(getattr(a, k), getattr(b, k), rtol=RTOL, atol=RTOL, err_msg=k)


def _same(a: ScoreResult, b: ScoreResult) -> None:
    """The same batch (same size) through another input path: bit-identical."""
    np.testing.assert_array_equal(a.score, b.score)
    np.testing.assert_array_equal(a.pred, b.pred)
    np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)
    np.testing.assert_array_equal(a.layer_scores, b.layer_scores)
    np.testing.assert_array_equal(a.logits, b.logits)


def test_reference_scores_are_sane(ref, mnist):
    """Guard for every comparison below: real digits are mostly accepted and well classified."""
    y = mnist["test"][1][:32]
    assert (ref.pred == y).mean() >= 0.95
    assert ref.is_anomaly.mean() <= 0.25
    assert np.isfinite(ref.score).all() and not ref.nonfinite.any()


# ------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [
    (784,), (2, 784), (2, 1, 1, 28, 28), (2, 2, 28, 28), (2, 1, 28, 27), (2, 3, 28, 28),
    (2, 28, 28, 1), (1, 1, 28), (), (0,), (5, 0, 28, 28),
])
def test_wrong_rank_or_shape_is_refused(session, shape):
    arr = np.zeros(shape, np.float32)
    with pytest.raises(InputError, match=r"expected float32 \[B, 1, 28, 28\]"):
        session.run(arr)


def test_single_sample_and_channel_axis_are_added(session, x, ref):
    one = session.run(x[3:4])
    _same(session.run(x[3, 0]), one)  # [28, 28]
    _same(session.run(x[3]), one)     # [1, 28, 28]: a single sample
    assert len(one) == 1 and one.pred[0] == ref.pred[3]
    np.testing.assert_allclose(one.score[0], ref.score[3], rtol=RTOL, atol=RTOL)
    _same(session.run(x[:, 0]), ref)  # [B, 28, 28] for a one-channel model


def test_lists_are_accepted_like_arrays(session, x, ref):
    _same(session.run(x[:4].tolist()), session.run(x[:4]))


# ------------------------------------------------------------------------- dtypes
def test_float64_and_float16_are_cast(session, x, ref):
    _same(session.run(x.astype(np.float64)), ref)
    _same(session.run(x.astype(">f4")), ref)  # big-endian float32: same values
    x16 = x.astype(np.float16)
    r16 = session.run(x16)
    _same(r16, session.run(x16.astype(np.float32)))  # cast exactly, nothing else changes
    assert (r16.pred == ref.pred).mean() >= 0.95


def test_uint8_is_divided_by_255(session, x):
    u8 = np.round(x * 255).astype(np.uint8)
    _same(session.run(u8), session.run(u8.astype(np.float32) / np.float32(255)))


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.int8, bool, np.complex64,
                                   np.complex128, object, "datetime64[s]", "U3", "S3"])
def test_other_dtypes_are_refused(session, x, dtype):
    arr = np.zeros((2, 1, 28, 28), dtype=dtype)
    with pytest.raises(InputError, match=r"unsupported dtype .*x\.astype\(np\.float32\)"):
        session.run(arr)


@pytest.mark.parametrize("value", ["a string", b"bytes", None, {"a": 1}, [[1, 2], [3]]])
def test_non_arrays_are_refused(session, value):
    with pytest.raises(InputError):
        session.run(value)


# ------------------------------------------------------------------------- NaN / Inf
def _poisoned(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    bad = x[:8].copy()
    bad[0, 0, 0, 0] = np.nan
    bad[1, 0, 14, 14] = np.inf
    bad[2, 0, 27, 27] = -np.inf
    bad[3] = np.nan
    bad[4, 0, ::2] = np.inf
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], bool)
    return bad, mask


@pytest.mark.parametrize("threshold", [None, 0.0, 1e30, np.inf, -np.inf])
def test_nan_inf_are_anomalous_in_runtime(session, x, ref, threshold):
    bad, mask = _poisoned(x)
    res = session.run(bad, threshold=threshold)
    assert np.all(res.score[mask] == np.inf)
    assert res.is_anomaly[mask].all(), "a NaN/Inf input was reported normal"
    np.testing.assert_array_equal(res.nonfinite, mask)
    # Clean rows of the same batch are scored as without the poisoned ones.
    clean = session.run(x[:8], threshold=threshold)
    np.testing.assert_array_equal(res.score[~mask], clean.score[~mask])
    np.testing.assert_allclose(res.score[~mask], ref.score[:8][~mask], rtol=RTOL, atol=RTOL)
    recs = res.records()
    assert [r["score"] for r in recs[:5]] == ["inf"] * 5
    assert all(r["nonfinite_input"] for r in recs[:5])
    json.dumps(recs, allow_nan=False)  # strict JSON: NaN layer scores / inf threshold as strings


@pytest.mark.parametrize("feed_threshold", [False, True])
def test_nan_inf_are_anomalous_in_raw_graph(exported_path, x, feed_threshold):
    """The rule lives in the graph itself, so any onnxruntime client gets it."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(exported_path), providers=["CPUExecutionProvider"])
    bad, mask = _poisoned(x)
    feeds = {"input": bad}
    if feed_threshold:
        feeds["threshold"] = np.array(np.inf, np.float32)  # even "accept everything"
    score, is_anomaly = sess.run(["score", "is_anomaly"], feeds)
    assert np.all(score[mask] == np.inf)
    assert is_anomaly[mask].all()
    assert not np.isnan(score).any()


def test_the_graph_judges_the_values_as_the_runtime_does(exported_path, session, x):
    """``input_ok``: the file checks its input itself (false on a row holding NaN/Inf or a
    value beyond the range limits), so the session reads one bool per row instead of making
    its own pass over the input; rows it rejects get the exact check (same refusal as before)."""
    import onnxruntime as ort

    from ufad.runtime.inputs import range_limits

    low, high = range_limits(session.info.input)
    rows = np.repeat(x[:1], 8, axis=0)
    rows[1, 0, 3, 3] = np.nan
    rows[2, 0, 0, 0] = np.inf
    rows[3, 0, 5, 5] = -np.inf
    rows[4, 0, 2, 2] = high + 0.01 * (high - low)
    rows[5, 0, 2, 2] = low - 0.01 * (high - low)
    rows[6, 0, 2, 2] = high - 0.01 * (high - low)   # inside, near the limits
    rows[7, 0, 2, 2] = low + 0.01 * (high - low)
    sess = ort.InferenceSession(str(exported_path), providers=["CPUExecutionProvider"])
    (ok,) = sess.run(["input_ok"], {"input": rows})
    assert ok.tolist() == [True, False, False, False, False, False, True, True]
    for bad in (4, 5):
        with pytest.raises(InputError, match="far outside the model's range"):
            session.run(rows[[0, bad]])
    res = session.run(rows[[0, 1, 2, 3, 6, 7]])
    assert res.nonfinite.tolist() == [False, True, True, True, False, False]
    assert res.is_anomaly[1:4].all() and np.isfinite(res.score[[0, 4, 5]]).all()


def test_a_batch_the_graph_accepts_is_not_read_again(session, x, monkeypatch):
    """The point of input_ok: with every row ok the session makes no value check of its own
    (at batch 1 that pass cost ~30 us, BENCHMARKS.md), on the lean path or the general one."""
    import ufad.runtime.session as session_module

    calls = []
    monkeypatch.setattr(session_module, "check_values", lambda *a, **k: calls.append(1))
    session.run(x[:1])
    session.run(x, threshold=session.threshold, activations=True)   # the general path
    assert calls == []
    bad = x[:2].copy()
    bad[1, 0, 0, 0] = np.nan
    session.run(bad)
    assert calls == [1]   # a row the graph rejects is checked exactly, once
    # The conversion step leaves the values to the graph: it does not even see 0..255 pixels.
    from ufad.runtime.inputs import batch_checker

    assert batch_checker(session.info.input, "error", deferred=True)(x * 255)[1] is None
    with pytest.raises(InputError, match="divide by 255"):
        batch_checker(session.info.input, "error")(x * 255)


# ------------------------------------------------------------------------- ranges
def test_0_255_pixels_are_refused_with_hint(session, x):
    with pytest.raises(InputError, match="divide by 255"):
        session.run(x * 255)


def test_far_negative_values_are_refused(session, x):
    with pytest.raises(InputError, match="far outside the model's range") as e:
        session.run(x - 5.0)
    assert "255" not in str(e.value)


def test_float64_overflow_is_refused_not_turned_into_inf(session, x):
    big = x.astype(np.float64)
    big[0, 0, 0, 0] = 1e300  # would become inf in float32
    with pytest.raises(InputError, match="far outside"):
        session.run(big)


def test_slightly_out_of_range_is_scored(session, x):
    res = session.run(np.clip(x * 1.5 - 0.25, -0.3, 1.3))
    assert len(res) == len(x) and np.isfinite(res.score).all()


def test_range_check_off_scores_anything(exported_path, x):
    sess = AnomalySession(exported_path, provider="cpu", range_check="off")
    res = sess.run(np.concatenate([x[:2] * 255, x[:2] * -1e6, np.full((1, 1, 28, 28), 3e38, np.float32)]))
    assert not np.isnan(res.score).any()
    assert res.is_anomaly.all(), "inputs 255x or 1e6x off the ID range must be flagged"


def test_bad_range_check_and_threshold_are_refused(exported_path, session, x):
    with pytest.raises(InputError, match="range_check"):
        AnomalySession(exported_path, provider="cpu", range_check="warn").run(x)
    with pytest.raises(InputError, match="NaN"):
        session.run(x, threshold=float("nan"))
    with pytest.raises(InputError, match="number"):
        session.run(x, threshold="high")


# ------------------------------------------------------------------------- batching / layout
def test_empty_batch_gives_empty_result_with_right_shapes(session):
    for empty in (np.zeros((0, 1, 28, 28), np.float32), np.zeros((0, 28, 28), np.float64)):
        res = session.run(empty, activations=True)
        assert len(res) == 0
        assert res.logits.shape == (0, 10) and res.pred.shape == (0,) and res.pred.dtype == np.int64
        assert res.layer_scores.shape == (0, len(session.layer_names))
        assert res.is_anomaly.dtype == bool and res.score.dtype == np.float32
        assert set(res.activations) == {l.output for l in session.info.layers}
        assert all(a.shape == (0, l.dim) for l, a in zip(session.info.layers, res.activations.values()))
        assert res.records() == []


def test_batch_larger_than_batch_size_is_chunked(session, mnist):
    rng = np.random.default_rng(0)
    xs = np.concatenate([mnist["test"][0][:200], rng.uniform(0, 1, (57, 1, 28, 28)).astype(np.float32)])
    xs[7, 0, 1, 1] = np.nan
    one_shot = session.run(xs, batch_size=4096, activations=True)
    assert 0.1 < one_shot.is_anomaly.mean() < 0.5  # both verdicts present
    for bs in (1, 64, 100):
        chunked = session.run(xs, batch_size=bs, activations=True)
        assert len(chunked) == len(xs)
        _close(chunked, one_shot)
        for k in one_shot.activations:  # the classifier part is batch-independent
            np.testing.assert_allclose(chunked.activations[k], one_shot.activations[k], rtol=1e-5, atol=1e-6)
        # Chunking itself adds nothing: the same chunks scored one by one give the same bits.
        if bs == 64:
            parts = [session.run(xs[i:i + bs]) for i in range(0, len(xs), bs)]
            np.testing.assert_array_equal(chunked.score, np.concatenate([p.score for p in parts]))


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", None])
def test_bad_batch_size_is_refused(session, x, bad):
    with pytest.raises(InputError, match="batch_size"):
        session.run(x, batch_size=bad)


def test_non_contiguous_arrays(session, x, ref):
    views = {
        "fortran": np.asfortranarray(x),
        "transposed view": np.ascontiguousarray(x.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2),
        "strided": np.repeat(x, 2, axis=0)[::2],
        "channel slice": np.concatenate([x, x], axis=1)[:, 1:2],
        "flipped twice": x[:, :, ::-1][:, :, ::-1].copy(order="F")[:, :, ::-1][:, :, ::-1],
    }
    for name, v in views.items():
        assert not v.flags.c_contiguous, name
        np.testing.assert_array_equal(v, x)
        _same(session.run(v), ref)
    rev = session.run(x[::-1])  # negative batch stride
    np.testing.assert_array_equal(rev.score, ref.score[::-1])
    _same(session.run(x[::3]), session.run(x[::3].copy()))


# ------------------------------------------------------------------------- files via the CLI
def _png(path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


try:
    from PIL import Image
except ImportError:  # the runtime-only install: every image is then a DependencyError
    Image = None
IMAGE_ERROR = "not a readable image" if Image else "reading images needs Pillow: pip install 'ufad[images]'"


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, x):
    """name -> (path, a fragment the error must contain)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    out = {}

    def add(name, data, fragment):
        p = d / name
        p.write_bytes(data)
        out[name] = (p, fragment)

    buf = io.BytesIO()
    np.save(buf, x[:4])
    npy = buf.getvalue()
    add("garbage.npy", os.urandom(700), "not a .npy file")
    add("empty.npy", b"", "not a .npy file")
    add("truncated.npy", npy[: len(npy) // 3], "truncated")
    # A header that claims 10^11 images: refused before numpy tries to allocate them.
    hdr = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000, 1, 28, 28), }"
    hdr = (hdr + " " * (117 - len(hdr)) + "\n").encode()
    add("huge_header.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr + b"\0" * 64, "truncated")
    pk = io.BytesIO()
    np.save(pk, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    add("pickled.npy", pk.getvalue(), "cannot be loaded when allow_pickle=False")
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("x.npy", pk.getvalue())
    add("pickled.npz", z.getvalue(), "allow_pickle=False")
    add("garbage.npz", os.urandom(700), "not a .npz file")
    zc = io.BytesIO()
    np.savez_compressed(zc, x=x)
    bad = bytearray(zc.getvalue())
    for i in range(120, 1200):
        bad[i] ^= 0x5A  # corrupt the deflate stream, keep the zip directory
    add("corrupt_deflate.npz", bytes(bad), "not a readable .npz")
    zm = io.BytesIO()
    np.savez(zm, a=x[:1], b=x[:1])
    add("two_arrays.npz", zm.getvalue(), "expected an array named 'x'")
    _png(d / "small.png", 28, 28)
    png = (d / "small.png").read_bytes()
    add("truncated.png", png[: len(png) // 2], IMAGE_ERROR)
    add("garbage.png", os.urandom(300), IMAGE_ERROR)
    add("garbage.jpg", b"\xff\xd8\xff" + os.urandom(300), IMAGE_ERROR)
    _png(d / "bomb.png", 60000, 60000)  # 3.6 gigapixels declared: PIL's bomb guard
    out["bomb.png"] = (d / "bomb.png", IMAGE_ERROR)
    add("notes.txt", b"hello", "unsupported file type")
    (d / "folder.npy").mkdir()
    out["folder.npy"] = (d / "folder.npy", "is a directory")
    out["missing.npy"] = (d / "missing.npy", "no such file")
    np.save(d / "uint16.npy", (x[:2] * 60000).astype(np.uint16))
    out["uint16.npy"] = (d / "uint16.npy", "unsupported dtype uint16")
    np.save(d / "pixels255.npy", x[:2] * 255)
    out["pixels255.npy"] = (d / "pixels255.npy", "divide by 255")
    np.save(d / "flat.npy", x[:2].reshape(2, -1))
    out["flat.npy"] = (d / "flat.npy", "expected float32 [B, 1, 28, 28]")
    return out


def _assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and fragment in err, err


@pytest.mark.parametrize("name", [
    "garbage.npy", "empty.npy", "truncated.npy", "huge_header.npy", "pickled.npy", "pickled.npz",
    "garbage.npz", "corrupt_deflate.npz", "two_arrays.npz", "truncated.png", "garbage.png",
    "garbage.jpg", "bomb.png", "notes.txt", "folder.npy", "missing.npy", "uint16.npy",
    "pixels255.npy", "flat.npy",
])
def test_cli_score_bad_input_files(exported_path, bad_files, name):
    path, fragment = bad_files[name]
    result = CliRunner().invoke(main, ["score", str(exported_path), str(path)])
    _assert_one_line_error(result, fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_cli_score_unreadable_file(exported_path, tmp_path, x):
    p = tmp_path / "locked.npy"
    np.save(p, x[:2])
    p.chmod(0)
    try:
        _assert_one_line_error(CliRunner().invoke(main, ["score", str(exported_path), str(p)]), "locked.npy")
    finally:
        p.chmod(0o600)


def test_cli_score_good_files(exported_path, tmp_path, x, ref):
    if Image is None:
        pytest.skip("image inputs need the images extra (Pillow)")

    np.save(tmp_path / "a.npy", x[:3])
    np.savez(tmp_path / "b.npz", x=x[3:5])
    Image.fromarray(np.round(x[5, 0] * 255).astype(np.uint8)).save(tmp_path / "c.png")
    nan = x[:1].copy()
    nan[0, 0, 3, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    files = [str(tmp_path / n) for n in ("a.npy", "b.npz", "c.png", "nan.npy")]
    result = CliRunner().invoke(main, ["score", str(exported_path), *files, "--json", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(l) for l in result.stdout.splitlines()]
    assert len(rows) == 7
    np.testing.assert_allclose([r["score"] for r in rows[:5]], ref.score[:5], rtol=RTOL, atol=RTOL)
    assert rows[5]["pred"] == int(ref.pred[5])
    assert rows[6]["score"] == "inf" and rows[6]["is_anomaly"] and rows[6]["nonfinite_input"]


def test_cli_score_subprocess_pickled_npy(exported_path, bad_files):
    """A real process: `ufad score` on a pickled .npy prints one line and exits 2."""
    path, _ = bad_files["pickled.npy"]
    exe = shutil.which("ufad")
    cmd = [exe] if exe else [sys.executable, "-m", "ufad.runtime.cli"]
    proc = subprocess.run([*cmd, "score", str(exported_path), str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "allow_pickle" in lines[0], proc.stderr
    assert proc.stdout == ""

"""A committed real detector through the runtime alone: it detects, it refuses edits made
without the onnx package (bytes and protobuf records only), and its range policy holds."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from ufad.runtime import FORMAT_VERSION, AnomalySession, InputError, ModelFileError, integrity
from ufad.runtime.cli import main


def _one_line_error(res) -> str:
    err = res.stderr.strip()
    assert res.exit_code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), res.output
    assert "Traceback" not in res.output
    return err


def test_the_small_detector_detects(session, mnist, fashion):
    x, y = mnist["test"]
    ident = session.run(x)
    assert (ident.pred == y).mean() >= 0.98
    assert 0.85 <= 1 - ident.is_anomaly.mean() <= 1.0
    noise = np.random.default_rng(0).uniform(0, 1, (128, 1, 28, 28)).astype(np.float32)
    assert session.run(noise).is_anomaly.mean() >= 0.95
    assert session.run(fashion).is_anomaly.mean() >= 0.9
    assert session.info.format_version == FORMAT_VERSION, "stale fixture: python tools/make_runtime_fixture.py"
    assert session.info.input.range_policy == "refuse"


@pytest.mark.parametrize("key", ["ufad.threshold", "ufad.classes", "ufad.input", "ufad.layers",
                                 "ufad.params", "ufad.calibration", "ufad.method", "ufad.outputs"])
def test_an_edited_value_is_refused(exported_path, tmp_path, key):
    data = exported_path.read_bytes()
    meta = integrity.read_parts(data).metadata
    value = json.loads(meta[key]) if meta[key][:1] in "[{" else meta[key]
    edited = json.dumps(value, indent=1) if not isinstance(value, str) else value + " "
    p = tmp_path / "edited.onnx"
    p.write_bytes(integrity.with_metadata(data, key, edited))
    with pytest.raises(ModelFileError, match="edited after export"):
        AnomalySession(p, provider="cpu")
    res = CliRunner().invoke(main, ["inspect", str(p)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "edited after export" in res.stderr


def test_an_added_entry_or_a_duplicate_key_is_refused(exported_path, tmp_path):
    data = exported_path.read_bytes()
    added = tmp_path / "added.onnx"
    added.write_bytes(integrity.with_metadata(data, "vendor.note", "harmless?"))
    with pytest.raises(ModelFileError, match="edited after export"):
        AnomalySession(added, provider="cpu")
    from ufad.runtime import protowire

    dup = tmp_path / "dup.onnx"
    dup.write_bytes(data + protowire.encode_string_entry("ufad.threshold", "1e9"))
    with pytest.raises(ModelFileError, match="appears twice"):
        AnomalySession(dup, provider="cpu")


def test_a_copy_and_a_byte_identical_rewrite_load(exported_path, tmp_path, session, mnist):
    p = tmp_path / "copy.onnx"
    shutil.copy(exported_path, p)
    rewritten = tmp_path / "rewritten.onnx"
    meta = integrity.read_parts(p.read_bytes()).metadata
    # removing and re-appending an entry with the same value changes order, not content
    rewritten.write_bytes(integrity.with_metadata(p.read_bytes(), "ufad.method", meta["ufad.method"]))
    x = mnist["test"][0][:8]
    for f in (p, rewritten):
        np.testing.assert_array_equal(AnomalySession(f, provider="cpu").run(x).score, session.run(x).score)


def test_feature_vectors_are_flagged_never_refused(tabular_path, tabular):
    sess = AnomalySession(tabular_path, provider="cpu")
    assert sess.info.input.range_policy == "flag" and sess.info.classes == ("malignant", "benign")
    ident = sess.run(tabular)
    assert ident.is_anomaly.mean() <= 0.2 and not ident.out_of_range.any()
    noise = np.random.default_rng(1).normal(0, 10, (300, 30)).astype(np.float32)
    res = sess.run(noise)
    assert res.is_anomaly.all()
    assert res.out_of_range.any() and np.isinf(res.score[res.out_of_range]).all()
    assert sess.run(noise, threshold=1e30).is_anomaly[res.out_of_range].all()
    recs = res.records()
    assert sum(r["out_of_range_input"] for r in recs) == int(res.out_of_range.sum())


def test_images_far_out_of_range_are_refused_with_the_flag_named(session, exported_path, tmp_path):
    x = np.full((2, 1, 28, 28), 200.0, np.float32)
    with pytest.raises(InputError, match=r"range_check='off'"):
        session.run(x)
    np.save(tmp_path / "x.npy", x)
    res = CliRunner().invoke(main, ["score", str(exported_path), str(tmp_path / "x.npy")])
    assert res.exit_code == 2 and "--no-range-check" in res.stderr and "range_check=" not in res.stderr


def test_provider_error_names_the_flag(session, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 28, 28), np.float32))
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    err = _one_line_error(CliRunner().invoke(main, ["score", str(session.path), str(tmp_path / "x.npy"),
                                                   "--provider", "cuda"]))
    assert "--provider cpu" in err and "provider='cpu'" not in err


def test_signing_roundtrip_through_the_cli(exported_path, tmp_path):
    pytest.importorskip("cryptography", reason="signatures need the sign extra")
    runner = CliRunner()
    key = tmp_path / "k"
    assert runner.invoke(main, ["keygen", str(key)]).exit_code == 0
    signed = tmp_path / "signed.onnx"
    res = runner.invoke(main, ["sign", str(exported_path), "--key", str(key), "-o", str(signed)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["verify", str(signed), "--key", f"{key}.pub"])
    assert res.exit_code == 0 and "signature: valid" in res.stdout
    bad = bytearray(signed.read_bytes())
    bad[len(bad) // 2] ^= 0x10
    (tmp_path / "bad.onnx").write_bytes(bytes(bad))
    res = runner.invoke(main, ["verify", str(tmp_path / "bad.onnx"), "--key", f"{key}.pub"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")

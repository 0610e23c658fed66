"""Trust in the file: any edit after export is refused, signatures prove who exported it,
the runtime obeys only what the digests cover, and v1 files still load (with a warning).

Every file is derived from the real exported reference detector (``exported_path``).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
pytest.importorskip("cryptography")
from onnx import numpy_helper  # noqa: E402

from filetools import with_metadata, with_model  # noqa: E402
from ufad.runtime import (AnomalySession, FormatWarning, ModelFileError, SignatureError,  # noqa: E402
                          integrity, signing)
from ufad.runtime.cli import main  # noqa: E402

REFUSED = r"edited after export|modified after export|appears twice|downgraded|skip the newer"


@pytest.fixture(scope="module")
def src(exported_path, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("trust") / "good.onnx"
    shutil.copy(exported_path, p)   # never edit the shared fixture
    return p


def _keys(src: Path) -> list[str]:
    return [p.key for p in onnx.load(str(src)).metadata_props]


def _nudge(value: str) -> str:
    """A minimal edit that keeps the value well-formed (so only the digest can catch it)."""
    try:
        v = json.loads(value)
    except json.JSONDecodeError:
        return value + "0"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return json.dumps(v * 1e9 if v else 1.0)
    return json.dumps(v, indent=1)     # same JSON value, other bytes: still an edit


def test_every_metadata_value_is_covered(src, tmp_path):
    """Editing any single metadata value (threshold, classes, input spec, ...) is refused."""
    keys = _keys(src)
    assert {"ufad.threshold", "ufad.classes", "ufad.input", "ufad.content_sha256"} <= set(keys)
    for key in keys:
        dst = with_metadata(src, tmp_path / "edited.onnx", lambda m: m.update({key: _nudge(m[key])}))
        with pytest.raises(ModelFileError, match=REFUSED + "|not an integer|newer than"):
            AnomalySession(dst, provider="cpu")


def test_threshold_edit_cannot_defuse_the_detector(src, tmp_path, fashion_test):
    """The issue's attack: ufad.threshold 3.42 -> 1e9 made every Fashion-MNIST image 'normal'."""
    dst = with_metadata(src, tmp_path / "defused.onnx", lambda m: m.update({"ufad.threshold": "1e9"}))
    with pytest.raises(ModelFileError, match="content sha256 .* does not match .*edited after export"):
        AnomalySession(dst, provider="cpu")
    np.save(tmp_path / "f.npy", fashion_test[0][:8])
    res = CliRunner().invoke(main, ["score", str(dst), str(tmp_path / "f.npy")])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "edited after export" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("edit", ["add_entry", "remove_entry", "duplicate_key", "opset", "producer"])
def test_header_and_entry_edits_are_refused(src, tmp_path, edit):
    def change(model):
        if edit == "add_entry":
            model.metadata_props.add(key="ufad.note", value="trust me")
        elif edit == "remove_entry":
            entry = next(p for p in model.metadata_props if p.key == "ufad.producer")
            model.metadata_props.remove(entry)
        elif edit == "duplicate_key":
            model.metadata_props.add(key="ufad.threshold", value="1e9")
        elif edit == "opset":
            model.opset_import[0].version += 1
        else:
            model.producer_name = "someone else"
    dst = with_model(src, tmp_path / f"{edit}.onnx", change)
    with pytest.raises(ModelFileError, match=REFUSED) as e:
        AnomalySession(dst, provider="cpu")
    assert str(dst) in str(e.value)


@pytest.mark.parametrize("edit", ["initializer", "node"])
def test_graph_edits_are_refused(src, tmp_path, edit):
    def change(model):
        if edit == "initializer":
            init = next(i for i in model.graph.initializer if i.name == "threshold")
            init.CopyFrom(numpy_helper.from_array(np.array(1e9, np.float32), "threshold"))
        else:
            node = next(n for n in model.graph.node if n.op_type == "ReduceMax" or n.op_type == "Max")
            node.name += "_x"
    dst = with_model(src, tmp_path / f"{edit}.onnx", change)
    with pytest.raises(ModelFileError, match="graph's sha256 .* modified after export"):
        AnomalySession(dst, provider="cpu")


def test_a_resave_with_nothing_changed_still_verifies(src, tmp_path, session, mnist):
    dst = with_model(src, tmp_path / "resaved.onnx", lambda m: None)
    x = mnist["test"][0][:16]
    np.testing.assert_array_equal(AnomalySession(dst, provider="cpu").run(x).score, session.run(x).score)


def _as_v1(src: Path, dst: Path, threshold: str | None = None) -> Path:
    """What a format-1 exporter wrote: no graph marker, no content digest, version 1."""
    import hashlib

    model = onnx.load(str(src))
    model.graph.doc_string = ""
    graph_hash = hashlib.sha256(model.graph.SerializeToString()).hexdigest()
    meta = {p.key: p.value for p in model.metadata_props}
    meta.pop("ufad.content_sha256")
    meta.update({"ufad.format_version": "1", "ufad.graph_sha256": graph_hash})
    if threshold is not None:
        meta["ufad.threshold"] = threshold
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(dst))
    return dst


def test_version_1_files_load_with_one_warning(src, tmp_path, session, mnist):
    v1 = _as_v1(src, tmp_path / "v1.onnx")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = AnomalySession(v1, provider="cpu")
    msgs = [w for w in caught if issubclass(w.category, FormatWarning)]
    assert len(msgs) == 1 and "format version 1" in str(msgs[0].message) and "not covered" in str(msgs[0].message)
    x = mnist["test"][0][:32]
    np.testing.assert_array_equal(old.run(x).is_anomaly, session.run(x).is_anomaly)


def test_a_v1_file_with_an_edited_threshold_is_still_refused(src, tmp_path):
    """v1 metadata is unhashed, but the threshold a client acts on must equal the graph's."""
    v1 = _as_v1(src, tmp_path / "v1t.onnx", threshold="1e9")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatWarning)
        with pytest.raises(ModelFileError, match="calibration.threshold .* differs|default threshold"):
            AnomalySession(v1, provider="cpu")


def test_a_downgraded_v2_file_is_refused(src, tmp_path):
    def downgrade(m):
        m["ufad.format_version"] = "1"
        m.pop("ufad.content_sha256")
    dst = with_metadata(src, tmp_path / "down.onnx", downgrade)
    with pytest.raises(ModelFileError, match="graph was written as version 2"):
        AnomalySession(dst, provider="cpu")


def test_the_runtime_feeds_no_threshold_unless_overridden(src, mnist):
    sess = AnomalySession(src, provider="cpu")
    fed = []
    real = sess._run_fn
    sess._run_fn = lambda names, feeds, opts: fed.append(sorted(feeds)) or real(names, feeds, opts)
    x = mnist["test"][0][:4]
    default = sess.run(x)
    over = sess.run(x, threshold=-1e9)
    assert fed == [["input"], ["input", "threshold"]]
    assert over.is_anomaly.all() and default.threshold == sess.info.threshold


# --------------------------------------------------------------------------- signatures
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return signing.generate_keypair(d / "k"), signing.generate_keypair(d / "other")


@pytest.fixture(scope="module")
def signed(src, keys, tmp_path_factory) -> Path:
    (priv, _), _ = keys
    out = tmp_path_factory.mktemp("signed") / "signed.onnx"
    res = CliRunner().invoke(main, ["sign", str(src), "--key", str(priv), "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_signed_file_verifies_in_python_and_cli(signed, keys, mnist, session):
    (_, pub), _ = keys
    sess = AnomalySession(signed, provider="cpu", verify_key=pub)
    assert sess.signer == signing.key_id(signing.load_public_key(pub))
    x = mnist["test"][0][:8]
    np.testing.assert_array_equal(sess.run(x).score, session.run(x).score)
    res = CliRunner().invoke(main, ["verify", str(signed), "--key", str(pub)])
    assert res.exit_code == 0 and "signature: valid" in res.stdout
    np.save(Path(signed).with_name("x.npy"), x)
    res = CliRunner().invoke(main, ["score", str(signed), str(Path(signed).with_name("x.npy")),
                                    "--verify-key", str(pub), "--json"])
    assert res.exit_code == 0 and len(res.stdout.splitlines()) == 8


def test_unsigned_or_other_key_is_refused(src, signed, keys):
    (_, pub), (_, other_pub) = keys
    with pytest.raises(SignatureError, match="not signed"):
        AnomalySession(src, provider="cpu", verify_key=pub)
    with pytest.raises(SignatureError, match="signed by key .* not by the given key"):
        AnomalySession(signed, provider="cpu", verify_key=other_pub)
    res = CliRunner().invoke(main, ["verify", str(src), "--key", str(pub)])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "not signed" in res.stderr


def test_any_one_byte_change_to_a_signed_file_fails(signed, keys, tmp_path):
    """Flip one byte at many places (graph, header, every metadata entry, the signature): the
    file never verifies, and never with a traceback."""
    (_, pub), _ = keys
    data = signed.read_bytes()
    rng = np.random.default_rng(0)
    positions = set(rng.integers(0, len(data), 40).tolist())
    positions |= set(range(len(data) - 400, len(data), 7))   # the metadata and the signature
    positions |= {0, 1, len(data) - 1}
    for pos in sorted(positions):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        p = tmp_path / "flip.onnx"
        p.write_bytes(bytes(bad))
        with pytest.raises(ModelFileError):
            AnomalySession(p, provider="cpu", verify_key=pub)


def test_a_forged_signature_is_refused(signed, keys, tmp_path):
    """Someone who edits the file and recomputes both digests still cannot sign it."""
    (_, pub), _ = keys
    relabel = json.dumps(["cat"] * 10)   # a consistent edit: the parser cannot object to it
    forged = with_metadata(signed, tmp_path / "forged.onnx", lambda m: m.update({"ufad.classes": relabel}))
    data = integrity.seal(forged.read_bytes())
    entry = json.loads(integrity.read_parts(data).metadata["ufad.signature"])
    entry["content_sha256"] = integrity.read_parts(data).content_sha256
    forged.write_bytes(integrity.with_metadata(data, "ufad.signature", json.dumps(entry)))
    with pytest.raises(SignatureError, match="does not verify"):
        AnomalySession(forged, provider="cpu", verify_key=pub)


def test_keygen_and_sign_errors_are_one_line(tmp_path, src):
    runner = CliRunner()
    (tmp_path / "ro").write_text("a file where a folder should be")
    assert runner.invoke(main, ["keygen", str(tmp_path / "k")]).exit_code == 0
    for args, match in [
        (["keygen", str(tmp_path / "k")], "exists; refusing to overwrite"),
        (["sign", str(src), "--key", str(tmp_path / "nope")], "no such file"),
        (["sign", str(src), "--key", str(tmp_path / "k.pub")], "not an unencrypted PEM private key"),
        (["verify", str(src), "--key", str(tmp_path / "k")], "not signed"),   # a private key is accepted as the public one
        (["sign", str(src), "--key", str(tmp_path / "k"), "-o", str(tmp_path / "ro" / "x.onnx")], "cannot write"),
    ]:
        res = runner.invoke(main, args)
        err = res.stderr.strip()
        assert res.exit_code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), (args, res.output)
        assert match in err and "Traceback" not in res.output, (args, err)

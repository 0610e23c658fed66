"""Bad detector files: each is refused at load time with a clear ModelFileError, and
``ufad inspect`` prints one ``error:`` line and exits non-zero (never a traceback).

Every bad file is derived from the real exported reference detector (``exported_path``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from filetools import with_metadata as _with_metadata  # noqa: E402
from ufad.runtime import integrity, protowire  # noqa: E402
from ufad.runtime import AnomalySession, ModelFileError  # noqa: E402
from ufad.runtime.cli import main  # noqa: E402


def _resealed(src: Path, dst: Path, edit) -> Path:
    """Edit the metadata and recompute the content digest, as someone who knows the format
    would: the file then passes its integrity check and the metadata parser is what is tested."""
    _with_metadata(src, dst, edit)
    dst.write_bytes(integrity.seal(dst.read_bytes()))
    return dst


def _plain_onnx(dst: Path) -> Path:
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 1, 28, 28])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 784])
    shape = numpy_helper.from_array(np.array([-1, 784], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["input", "shape"], ["logits"])],
                              "plain", [x], [y], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(dst))
    return dst


def _tamper_statistics(src: Path, dst: Path) -> Path:
    """Change one float of the fitted statistics and re-save, metadata (and its hash) kept."""
    model = onnx.load(str(src))
    # The smallest float tensor of the head is a per-class / per-layer statistic (no padding
    # entries whose change would be invisible), whatever the head's internal layout.
    stats = [i for i in model.graph.initializer if i.name.startswith("head.")
             and i.data_type == TensorProto.FLOAT and int(np.prod(i.dims)) >= 2]
    init = min(stats, key=lambda i: int(np.prod(i.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = arr.flat[0] * 1.5 + 0.5
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(dst))
    return dst


def _bytes(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


# name -> (builder(src, dir) -> path, regex the message must match)
CASES = {
    "plain_onnx": (lambda s, d: _plain_onnx(d / "plain.onnx"), r"not a ufad detector"),
    "truncated": (lambda s, d: _bytes(d / "t.onnx", s.read_bytes()[: s.stat().st_size // 2]),
                  r"truncated or corrupt"),
    "truncated_tail": (lambda s, d: _bytes(d / "tt.onnx", s.read_bytes()[:-7]), r"truncated or corrupt"),
    "random_bytes": (lambda s, d: _bytes(d / "r.onnx", np.random.default_rng(1).bytes(50_000)),
                     r"not a well-formed ONNX model|onnxruntime cannot load it"),
    "empty": (lambda s, d: _bytes(d / "e.onnx", b""), r"not a well-formed ONNX model"),
    "text": (lambda s, d: _bytes(d / "x.onnx", b"this is not a model\n"), r"not a well-formed ONNX model"),
    "missing_key": (lambda s, d: _resealed(s, d / "mk.onnx", lambda m: m.pop("ufad.layers")),
                    r"metadata is incomplete, missing \['ufad.layers'\]"),
    "missing_hash": (lambda s, d: _with_metadata(s, d / "mh.onnx", lambda m: m.pop("ufad.graph_sha256")),
                     r"missing \['ufad.graph_sha256'\]"),
    "malformed_json": (lambda s, d: _resealed(s, d / "mj.onnx", lambda m: m.update({"ufad.layers": "[{"})),
                       r"'ufad.layers' is not valid JSON"),
    "input_not_object": (lambda s, d: _resealed(s, d / "io.onnx", lambda m: m.update({"ufad.input": "[]"})),
                         r"metadata is malformed"),
    "bad_range": (lambda s, d: _resealed(s, d / "br.onnx", lambda m: m.update(
        {"ufad.input": json.dumps({"name": "input", "shape": [None, 1, 28, 28], "dtype": "float32", "range": [0]})})),
        r"metadata is malformed"),
    "nan_threshold": (lambda s, d: _resealed(s, d / "nt.onnx", lambda m: m.update({"ufad.threshold": "NaN"})),
                      r"metadata is malformed.*NaN"),
    "edited_input_shape": (lambda s, d: _resealed(s, d / "es.onnx", lambda m: m.update(
        {"ufad.input": json.dumps({"name": "input", "shape": [None, 3, 32, 32], "dtype": "float32", "range": [0, 1]})})),
        r"input shape .* does not match the metadata"),
    "future_version": (lambda s, d: _with_metadata(s, d / "fv.onnx", lambda m: m.update({"ufad.format_version": "99"})),
                       r"format version 99, newer than this runtime.*pip install -U ufad"),
    "version_not_int": (lambda s, d: _with_metadata(s, d / "vn.onnx", lambda m: m.update({"ufad.format_version": "1.x"})),
                        r"not an integer"),
    "no_version": (lambda s, d: _with_metadata(s, d / "nv.onnx", lambda m: m.pop("ufad.format_version")),
                   r"not a ufad detector"),
    "statistics_tampered": (lambda s, d: _tamper_statistics(s, d / "tampered.onnx"),
                            r"sha256 .* does not match .*modified after export"),
    "metadata_edited": (lambda s, d: _with_metadata(s, d / "me.onnx", lambda m: m.update({"ufad.threshold": "1e9"})),
                        r"content sha256 .* does not match .*edited after export"),
    "threshold_resealed": (lambda s, d: _resealed(s, d / "tr.onnx", lambda m: m.update(
        {"ufad.threshold": "1e9", "ufad.calibration": json.dumps({**json.loads(m["ufad.calibration"]), "threshold": 1e9})})),
        r"graph's default threshold .* differs from the metadata's"),
    "duplicate_key": (lambda s, d: _bytes(d / "dk.onnx", s.read_bytes() + protowire.encode_string_entry(
        "ufad.threshold", "1e9")), r"'ufad.threshold' appears twice"),
    "downgraded": (lambda s, d: _with_metadata(s, d / "dg.onnx", lambda m: (
        m.update({"ufad.format_version": "1"}), m.pop("ufad.content_sha256"))), r"graph was written as version 2"),
    "hash_edited": (lambda s, d: _with_metadata(s, d / "he.onnx", lambda m: m.update({"ufad.graph_sha256": "0" * 64})),
                    r"does not match the one recorded"),
    "missing_file": (lambda s, d: d / "nope.onnx", r"no such file"),
}


@pytest.fixture(scope="module")
def bad_models(exported_path, tmp_path_factory) -> dict[str, Path]:
    src = tmp_path_factory.mktemp("src") / "good.onnx"
    shutil.copy(exported_path, src)  # never edit the shared fixture file
    d = tmp_path_factory.mktemp("bad_models")
    return {name: build(src, d) for name, (build, _) in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_model_file_is_refused_at_load(bad_models, name):
    with pytest.raises(ModelFileError, match=CASES[name][1]) as e:
        AnomalySession(bad_models[name], provider="cpu")
    assert str(bad_models[name]) in str(e.value), "the message must name the file"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_inspect_bad_model_file(bad_models, name):
    result = CliRunner().invoke(main, ["inspect", str(bad_models[name])])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert result.stdout == ""


def test_cli_score_refuses_tampered_file(bad_models, tmp_path, mnist):
    np.save(tmp_path / "x.npy", mnist["test"][0][:2])
    result = CliRunner().invoke(main, ["score", str(bad_models["statistics_tampered"]), str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "modified after export" in result.stderr


def test_tampering_changes_scores_so_the_check_matters(bad_models, session, mnist):
    """With verification off the tampered file loads and its scores differ: the sha256 check,
    not luck, is what stops it."""
    x = mnist["test"][0][:200]
    tampered = AnomalySession(bad_models["statistics_tampered"], provider="cpu", verify=False)
    assert not np.array_equal(tampered.run(x).layer_scores, session.run(x).layer_scores)


def test_good_copy_still_loads(exported_path, tmp_path, session):
    """The copies above fail for their defect only: an untouched copy (and a re-save through
    onnx with unchanged metadata) loads and scores exactly like the original."""
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 28, 28)).astype(np.float32)
    copy = tmp_path / "copy.onnx"
    shutil.copy(exported_path, copy)
    resaved = _with_metadata(exported_path, tmp_path / "resaved.onnx", lambda m: None)
    for p in (copy, resaved):
        np.testing.assert_array_equal(AnomalySession(p, provider="cpu").run(x).score, session.run(x).score)


def test_directory_and_cli_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="is a directory"):
        AnomalySession(tmp_path, provider="cpu")
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "no such file" in result.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter is enough here
def test_torch_exported_plain_model_is_not_a_detector(tmp_path):
    """A real torch.onnx.export of a plain classifier is refused with the `ufad export` hint."""
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)).eval()
    path = tmp_path / "plain_torch.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False,
                      input_names=["input"], output_names=["logits"])
    with pytest.raises(ModelFileError, match=r"not a ufad detector.*ufad export"):
        AnomalySession(path, provider="cpu")
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 2 and "not a ufad detector" in result.stderr

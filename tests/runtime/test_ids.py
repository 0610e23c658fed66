"""A detector whose model reads integer ids (the committed ``tokens_small.onnx``: an embedding
then an MLP, on scikit-learn's digits read as 64 tokens 0..16), scored with no torch: ids
of any integer width, floats refused, unseen ids flagged and never fed to the embedding, and
the CLI reading an integer .npy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ufad.runtime import AnomalySession, InputError
from ufad.runtime.cli import main
from ufad.runtime.errors import ModelFileError

from conftest import DATA

TOKENS = DATA / "tokens_small.onnx"


@pytest.fixture(scope="module")
def sess() -> AnomalySession:
    return AnomalySession(TOKENS, provider="cpu")


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.load(DATA / "tokens.npy")


def test_the_file_declares_int64_ids(sess, ids):
    spec = sess.input_spec
    assert (spec.dtype, spec.shape, spec.value_range, spec.range_policy) == ("int64", (None, 64), (0.0, 16.0), "flag")
    assert ids.dtype == np.int64
    res = sess.run(ids)
    assert res.is_anomaly.mean() <= 0.2                     # held-out digits: calibrated at 95%
    noise = sess.run(np.random.default_rng(0).integers(0, 17, (300, 64)))
    assert noise.is_anomaly.mean() >= 0.9                   # random tokens are not digits


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.uint8, np.uint64])
def test_integers_of_any_width_score_the_same(sess, ids, dtype):
    np.testing.assert_array_equal(sess.run(ids[:20].astype(dtype)).score, sess.run(ids[:20]).score)


@pytest.mark.parametrize("bad", [np.float32, np.float64, np.bool_])
def test_floats_and_bools_are_refused(sess, ids, bad):
    with pytest.raises(InputError, match=r"got \w+ data but this model reads integer ids; expected int64 \[B, 64\]"):
        sess.run(ids[:3].astype(bad))


def test_unseen_ids_are_flagged_not_crashed_on(sess, ids):
    x = ids[:4].copy()
    x[0, 0], x[2, 10] = 17, np.iinfo(np.int64).min
    res = sess.run(x)
    assert res.out_of_range.tolist() == [True, False, True, False]
    assert res.is_anomaly[[0, 2]].all() and np.isinf(res.score[[0, 2]]).all()
    np.testing.assert_array_equal(res.score[[1, 3]], sess.run(ids[:4]).score[[1, 3]])
    huge = ids[:1].astype(np.uint64)
    huge[0, 5] = np.iinfo(np.uint64).max                     # beyond int64: still an unseen id
    assert sess.run(huge).out_of_range.tolist() == [True]


def test_cli_scores_an_integer_npy_and_refuses_floats(tmp_path, ids):
    np.save(tmp_path / "ids.npy", ids[:5].astype(np.int32))
    res = CliRunner().invoke(main, ["score", str(TOKENS), str(tmp_path / "ids.npy"), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(l) for l in res.stdout.splitlines()]
    assert [r["pred"] for r in rows] == AnomalySession(TOKENS).run(ids[:5]).pred.tolist()
    np.save(tmp_path / "f.npy", ids[:5].astype(np.float32))
    res = CliRunner().invoke(main, ["score", str(TOKENS), str(tmp_path / "f.npy")])
    assert res.exit_code == 2 and "reads integer ids" in res.output and "Traceback" not in res.output


def test_inspect_shows_the_id_range_as_ids():
    res = CliRunner().invoke(main, ["inspect", str(TOKENS)])
    assert res.exit_code == 0, res.output
    assert "int64 [None, 64] range [0, 16] (ids seen at fit)" in res.output
    assert "ids outside the range are scored and flagged anomalous" in res.output


def test_an_unknown_input_dtype_is_refused_by_the_reader(sess):
    from ufad.runtime import format as fmt

    meta = dict(sess._sess.get_modelmeta().custom_metadata_map)
    assert fmt.parse_metadata(meta).input.dtype == "int64"
    spec = json.loads(meta[fmt.KEY_INPUT])
    meta[fmt.KEY_INPUT] = json.dumps({**spec, "dtype": "bfloat16"})
    with pytest.raises(ModelFileError, match=r"input dtype 'bfloat16' is not one of \('float32', 'int64'\)"):
        fmt.parse_metadata(meta)

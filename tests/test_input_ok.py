"""The file's own value check (``input_ok``) on feature vectors (range policy ``flag``): false
on rows holding NaN/Inf or a value beyond the range limits (those are scored and flagged, not
refused), and a session on it answers exactly as one on a file exported before the output
existed (the committed runtime fixture, which the session checks in numpy)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ufad.runtime import AnomalySession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_runtime_fixture import tabular_small  # noqa: E402  (the committed fixture's recipe)


def test_feature_vectors_input_ok_and_the_session_agrees_with_an_older_file(tmp_path):
    tabular_small(tmp_path)   # the committed fixture's recipe: same seed, same model
    new = AnomalySession(tmp_path / "tabular_small.onnx", provider="cpu")
    old = AnomalySession(ROOT / "tests" / "runtime" / "data" / "tabular_small.onnx", provider="cpu")
    assert new.info.input.range_policy == "flag"
    assert "input_ok" in {o.name for o in new._sess.get_outputs()}
    assert "input_ok" not in {o.name for o in old._sess.get_outputs()}

    rows = np.repeat(np.load(tmp_path / "tabular.npy")[:1], 5, axis=0)
    rows[1, 3], rows[2, 0], rows[3, 29], rows[4, 5] = np.nan, np.inf, 1e6, -3e38
    (ok,) = new._sess.run(["input_ok"], {"input": rows})
    assert ok.tolist() == [True, False, False, False, False]

    a, b = new.run(rows), old.run(rows)
    assert a.nonfinite.tolist() == b.nonfinite.tolist() == [False, True, True, False, False]
    assert a.out_of_range.tolist() == b.out_of_range.tolist() == [False, False, True, True, True]   # +inf too
    np.testing.assert_array_equal(a.is_anomaly, b.is_anomaly)
    assert a.is_anomaly[1:].all() and np.isinf(a.score[1:]).all()

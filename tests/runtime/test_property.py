"""Property tests: arbitrary arrays fed to ``AnomalySession.run`` never crash it.

Every outcome is a ScoreResult that obeys the output contract, or a UfadError (InputError)
with a message. 1,150 generated cases in total (400 + 400 + 250 + 100), small arrays, on
the real exported reference detector.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
import hypothesis.extra.numpy as hnp  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ufad.runtime import AnomalySession, ScoreResult, UfadError  # noqa: E402

COMMON = dict(deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])

SAMPLE = (1, 28, 28)
SPECIAL = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-38, 3.4e38, -3.4e38, 1e300,
           -1e300, 255.0, -1.0, 2.0, 0.5]
DTYPES = [np.float32, np.float64, np.float16, np.uint8, np.int32, np.int64, np.bool_,
          np.complex64, np.uint16, np.int8]


def check_outcome(sess: AnomalySession, x) -> str:
    """Run ``x``; return "ok" or "error" and assert the contract either way."""
    try:
        res = sess.run(x)
    except UfadError as e:
        assert str(e), "an error must say what was wrong"
        event(f"refused: {type(e).__name__}")
        return "error"
    assert isinstance(res, ScoreResult)
    n = len(res)
    event("scored, some input non-finite" if res.nonfinite.any() else "scored")
    assert res.score.shape == (n,) and res.score.dtype == np.float32
    assert res.pred.shape == (n,) and res.pred.dtype == np.int64
    assert res.is_anomaly.shape == (n,) and res.is_anomaly.dtype == np.bool_
    assert res.logits.shape == (n, len(sess.classes))
    assert res.layer_scores.shape == (n, len(sess.layer_names))
    assert not np.isnan(res.score).any(), "a NaN score escaped the +inf rule"
    assert ((res.pred >= 0) & (res.pred < len(sess.classes))).all()
    # The documented rule: an input holding NaN/Inf scores +inf and is anomalous.
    assert (res.score[res.nonfinite] == np.inf).all()
    assert res.is_anomaly[res.nonfinite].all()
    # is_anomaly = not (score <= threshold), plus the non-finite rule.
    np.testing.assert_array_equal(res.is_anomaly, ~(res.score <= res.threshold) | res.nonfinite)
    return "ok"


@st.composite
def shaped_arrays(draw) -> np.ndarray:
    """Valid-looking shapes (batch of samples, one sample, [B, H, W]) and broken ones, any
    dtype, values drawn from regimes: in range, huge, tiny, negative, specials sprinkled."""
    b = draw(st.integers(0, 3))
    # Weighted towards accepted shapes/dtypes/values so both outcomes get many cases.
    shape = draw(st.one_of(
        st.sampled_from([(b, *SAMPLE), SAMPLE, (28, 28), (b, 28, 28)]),
        st.sampled_from([(b, 1, 28, 27), (b, 2, 28, 28), (b, 784), (b, 1, 1, 28, 28), (b, 28, 28, 1)])))
    dtype = draw(st.one_of(st.sampled_from([np.float32, np.float64, np.float16, np.uint8]),
                           st.sampled_from(DTYPES)))
    regime = draw(st.one_of(st.sampled_from(["unit", "unit", "tiny", "constant"]),
                            st.sampled_from(["huge", "negative", "wide"])))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    size = int(np.prod(shape))
    base = {
        "unit": lambda: rng.uniform(0, 1, size),
        "huge": lambda: rng.uniform(-1, 1, size) * 10.0 ** rng.uniform(3, 300, size),
        "tiny": lambda: rng.uniform(-1, 1, size) * 10.0 ** -rng.uniform(5, 320, size),
        "negative": lambda: -rng.uniform(0, 1e3, size),
        "wide": lambda: rng.normal(0.5, 2.0, size),
        "constant": lambda: np.full(size, draw(st.sampled_from(SPECIAL))),
    }[regime]()
    n_special = draw(st.integers(0, 4))
    for _ in range(n_special if size else 0):
        base[draw(st.integers(0, size - 1))] = draw(st.sampled_from(SPECIAL))
    with np.errstate(all="ignore"):
        if np.dtype(dtype).kind in "iub":
            arr = np.nan_to_num(base, nan=0, posinf=0, neginf=0).clip(-1e9, 1e9).astype(dtype)
        else:
            arr = base.astype(dtype)
    arr = arr.reshape(shape)
    if draw(st.booleans()) and arr.ndim >= 2:
        arr = np.asfortranarray(arr)  # non-contiguous layouts too
    return arr


@pytest.fixture(scope="module")
def unchecked(exported_path) -> AnomalySession:
    """A session with the range check off: every value reaches the graph."""
    return AnomalySession(exported_path, provider="cpu", range_check="off")


@settings(max_examples=400, **COMMON)
@given(x=shaped_arrays())
def test_structured_arrays_never_crash(session, x):
    outcome = check_outcome(session, x)
    valid = (x.dtype.kind == "f" or x.dtype == np.uint8) and (
        (x.ndim == 4 and x.shape[1:] == SAMPLE) or x.shape in (SAMPLE, (28, 28))
        or (x.ndim == 3 and x.shape[1:] == (28, 28)))
    if valid and x.size:
        with np.errstate(all="ignore"):
            v = x.astype(np.float64) / (255.0 if x.dtype == np.uint8 else 1.0)
        fin = v[np.isfinite(v)]
        if fin.size == 0 or (fin.min() >= -0.9 and fin.max() <= 1.9):
            assert outcome == "ok", "a valid, in-range input was refused"


@settings(max_examples=400, **COMMON)
@given(x=hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.uint8, np.int16, np.bool_,
                           np.complex128, np.dtype("U2"), np.dtype("S2"), np.dtype("O"),
                           np.dtype("datetime64[s]"), np.dtype([("a", "f4")])]),
    shape=hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=4)))
def test_arbitrary_small_arrays_never_crash(session, x):
    check_outcome(session, x)


@settings(max_examples=250, **COMMON)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(1), st.just(28), st.just(28)),
                    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
                    fill=st.sampled_from([0.0, 0.5, 1e-30, 3e38, -3e38, 1e6, np.nan])))
def test_graph_survives_any_float32_values(unchecked, x):
    """Range check off: extreme finite values go through the convs; the score may be +inf,
    never NaN, and the call never fails."""
    assert check_outcome(unchecked, x) == "ok"


@settings(max_examples=100, **COMMON)
@given(threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10 ** 6, 10 ** 6),
                           st.sampled_from([None, "1.0", "x", [1.0], np.float16(2.0)])),
       batch_size=st.one_of(st.integers(-2, 5), st.sampled_from([1.5, "2", None, True])))
def test_threshold_and_batch_size_arguments(session, threshold, batch_size):
    x = np.linspace(0, 0.9, 3 * 784, dtype=np.float32).reshape(3, 1, 28, 28)
    x[1, 0, 0, 0] = np.nan
    try:
        res = session.run(x, threshold=threshold, batch_size=batch_size)
    except UfadError:
        return
    assert res.is_anomaly[1] and res.score[1] == np.inf

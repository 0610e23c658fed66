"""Validate and convert user arrays to what a detector's graph accepts.

Rules (documented in README "Errors and limits"):
- dtype: float32 is used as is; float16/float64 are cast to float32; uint8 is read as an
  8-bit image and divided by 255 when the model's recorded input range lies in [0, 1];
  any other dtype (ints, bool, complex, strings, objects) is refused. A file whose input is
  ``int64`` (token or category ids) takes integer arrays of any width, cast to int64, and
  refuses floats and bools.
- shape: ``[B, *sample]`` as recorded; a single sample ``sample`` gets a batch axis; for
  one-channel models ``[B, H, W]`` gets the channel axis. Anything else is refused.
- values: NaN/Inf are allowed and always reported anomalous (score = +inf, is_anomaly true
  whatever the threshold). Values far outside the recorded input range (more than one
  range-width beyond it) follow the file's range policy: ``refuse`` (images) refuses them,
  since they almost always mean a scaling mistake (e.g. 0..255 instead of 0..1); ``flag``
  (feature vectors) scores them, and the graph flags them anomalous (``out_of_range``). The
  check reads the values before the float32 cast, so a float64 1e300 is refused, not turned
  into inf (with ``range_check="off"`` it becomes inf and is scored as a non-finite input).
- ids (``int64`` inputs): the recorded range is the ids seen at fit, exactly; an id outside
  it is out of range (``flag``, the default for ids: scored with the id clamped into the
  range, and flagged anomalous, so a client never feeds an embedding an index it lacks).
- memory layout: non-contiguous arrays are copied to C order.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np

from .errors import InputError, opt
from .format import InputSpec

RANGE_CHECKS = ("error", "off")


@functools.lru_cache(maxsize=64)  # built on every call for the messages; specs are few and frozen
def _describe(spec: InputSpec) -> str:
    dims = ", ".join("B" if d is None else str(d) for d in spec.shape)
    rng = f" with values in [{spec.value_range[0]:g}, {spec.value_range[1]:g}]" if spec.value_range else ""
    return f"{spec.dtype} [{dims}]{rng}"


def range_limits(spec: InputSpec) -> tuple[float, float] | None:
    """The values beyond which an input counts as far outside the recorded range:
    one range-width below its minimum and above its maximum; for ids, the range itself
    (None: no range recorded)."""
    if not spec.value_range:
        return None
    lo, hi = spec.value_range
    if spec.is_index:
        return lo, hi
    width = max(hi - lo, 1e-6)
    return lo - width, hi + width


def out_of_range(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Per sample: does any finite value lie far outside the recorded range? (bool [B])"""
    limits = range_limits(spec)
    if limits is None or not x.size:
        return np.zeros(len(x), bool)
    flat = x.reshape(len(x), -1)
    return ((flat < limits[0]) | (flat > limits[1])).any(axis=1)


def check_batch(x: Any, spec: InputSpec, range_check: str = "error") -> tuple[np.ndarray, bool | None]:
    """``x`` as a C-contiguous float32 batch matching ``spec`` (or an InputError), plus what
    the range check learnt for free: True when every value is
    finite, False when some is NaN/Inf, None when not looked at (``range_check="off"``)."""
    return batch_checker(spec, range_check)(x)


@functools.lru_cache(maxsize=64)
def batch_checker(spec: InputSpec, range_check: str = "error",
                  deferred: bool = False) -> Callable[[Any], tuple[np.ndarray, bool | None]]:
    """``check_batch`` for one spec, its constants resolved once: at batch 1 the model has
    just flushed the caches, and each attribute or call of the per-call path costs ~10x its
    warm time (BENCHMARKS.md), so the common case (a batch of the spec's dtype, C-order, of
    the right shape whose values lie within the range limits) reads only locals and two
    reductions. ``deferred``: the graph judges the values (its ``input_ok`` output), so that
    case reads no value at all and returns None; the caller checks the rows the graph
    rejects with ``check_values``."""
    if range_check not in RANGE_CHECKS:
        raise InputError(f"range_check must be one of {RANGE_CHECKS}, got {range_check!r}")
    ndim, sample, f32 = len(spec.shape), spec.sample_shape, np.dtype(spec.dtype)
    limits = range_limits(spec) if range_check == "error" else None
    low, high = limits or (0.0, 0.0)

    def check(x: Any) -> tuple[np.ndarray, bool | None]:
        if (type(x) is np.ndarray and x.dtype == f32 and x.ndim == ndim and x.shape[1:] == sample
                and x.flags.c_contiguous):
            if deferred:
                return x, None
            if limits is not None and x.size and low <= x.min() and x.max() <= high:
                return x, True    # within the limits: finite (NaN fails the comparison) and never refused
            return x, _check_range(x, spec, range_check)
        return _convert(x, spec, range_check)
    return check


def _convert(x: Any, spec: InputSpec, range_check: str) -> tuple[np.ndarray, bool | None]:
    expected = _describe(spec)
    if isinstance(x, (str, bytes)):
        raise InputError(f"got a {type(x).__name__}, expected an array {expected}; load files with ufad.runtime.load_inputs")
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise InputError(f"input cannot be read as an array ({e}); expected {expected}") from None
    kind = arr.dtype.kind
    sample = tuple(spec.shape[1:])
    if spec.is_index:
        return _convert_ids(arr, spec, range_check, expected)
    src = arr  # the range check reads the values before a float64 -> float32 cast can overflow
    if kind == "f":
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32, copy=False)
    elif arr.dtype == np.uint8:
        lo, hi = spec.value_range or (0.0, 1.0)
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise InputError(
                f"got uint8 data but the model's input range is [{lo:g}, {hi:g}], so the scaling is "
                f"ambiguous; convert to float32 yourself. Expected {expected}."
            )
        arr = arr.astype(np.float32) / np.float32(255.0)
    else:
        raise InputError(
            f"unsupported dtype {arr.dtype}; expected {expected} (float16/float64 are cast, "
            "uint8 images are divided by 255). Convert with x.astype(np.float32)."
        )
    if arr.shape == sample:
        arr = arr[None]
    elif len(sample) == 3 and sample[0] == 1 and arr.ndim == 3 and arr.shape[1:] == sample[1:]:
        arr = arr[:, None]
    elif len(sample) == 3 and sample[0] == 1 and arr.shape == sample[1:]:
        arr = arr[None, None]
    if arr.ndim != len(spec.shape) or tuple(arr.shape[1:]) != sample:
        raise InputError(f"input has shape {tuple(arr.shape)}, expected {expected}")
    finite = _check_range(src if kind == "f" else arr, spec, range_check)
    return np.ascontiguousarray(arr), finite


def _convert_ids(arr: np.ndarray, spec: InputSpec, range_check: str, expected: str) -> tuple[np.ndarray, bool | None]:
    """Integer ids of any width as int64; floats are refused, not rounded: 3.7 is no id."""
    if arr.dtype.kind not in "iu":
        raise InputError(
            f"got {arr.dtype} data but this model reads integer ids; expected {expected}. "
            "Pass the token / category ids as an integer array (x.astype(np.int64))."
        )
    sample = tuple(spec.shape[1:])
    if arr.shape == sample:
        arr = arr[None]
    if arr.ndim != len(spec.shape) or tuple(arr.shape[1:]) != sample:
        raise InputError(f"input has shape {tuple(arr.shape)}, expected {expected}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        arr = np.minimum(arr, np.iinfo(np.int64).max)   # beyond any range: still out of range after the cast
    ids = np.ascontiguousarray(arr, dtype=np.int64)
    return ids, _check_range(ids, spec, range_check)


def check_values(x: np.ndarray, spec: InputSpec, range_check: str = "error") -> bool | None:
    """The value check of ``check_batch`` alone, for an array it deferred: refuses values far
    outside the range (policy ``refuse``, ``range_check="error"``); returns whether all are
    finite (None when not checked)."""
    return _check_range(x, spec, range_check)


def _check_range(vals: np.ndarray, spec: InputSpec, range_check: str) -> bool | None:
    """Refuse values far outside the recorded range when the file's policy is ``refuse``
    (``vals`` are the values before any float32 cast); return whether all of them are
    finite (None when not checked)."""
    if range_check != "error" or not spec.value_range or not vals.size:
        return None
    lo, hi = spec.value_range
    # min/max propagate NaN and show +-Inf: two reductions settle the all-finite case
    amin, amax = float(vals.min()), float(vals.max())
    finite = math.isfinite(amin) and math.isfinite(amax)
    if not finite:
        vals = vals[np.isfinite(vals)]
        amin = float(vals.min()) if vals.size else lo
        amax = float(vals.max()) if vals.size else hi
    low, high = range_limits(spec)
    if spec.range_policy == "refuse" and (amin < low or amax > high) and spec.is_index:
        raise InputError(
            f"input ids span [{amin:g}, {amax:g}], beyond the ids seen at fit [{lo:g}, {hi:g}]. "
            f"Map unknown ids to a known one, or pass {opt('range_check', 'off')} to score them "
            "anyway (the graph clamps them into the range)."
        )
    if spec.range_policy == "refuse" and (amin < low or amax > high):
        hint = " (looks like 0..255 pixels: divide by 255)" if 2 < amax <= 256 and hi <= 1.0 + 1e-6 else ""
        raise InputError(
            f"input values span [{amin:g}, {amax:g}], far outside the model's range "
            f"[{lo:g}, {hi:g}]{hint}. Rescale the input, or pass {opt('range_check', 'off')} to "
            "score it anyway."
        )
    return finite

"""``ufad bench``: a smoke run of the benchmark library (small fit, few repeats) that checks the
JSON schema, that every timing is a positive finite number, and that the host-side reference
(c) scores exactly what the exported detector (b) scores. The full benchmark is slow-marked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.eval   # its own tier: pytest -m eval (CI runs it after the default run)

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from ufad.exporter.bars import judge, load_bars  # noqa: E402
from ufad.exporter.bench import VARIANTS, BenchConfig, agreement, check_result, run_bench  # noqa: E402

BARS = Path(__file__).resolve().parents[1] / "tools" / "bars.json"


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    cfg = BenchConfig(quick=True, limit=1500, calib_limit=500, max_points=150, batches=(1, 4, 32),
                      repeats=3, warmup=1, runtime_runs=1,
                      workdir=str(tmp_path_factory.mktemp("bench")))
    return run_bench(cfg)


def test_schema_and_numbers(quick_result):
    res = quick_result
    assert check_result(res) == []
    assert res["schema"] == "ufad.bench/1"
    json.loads(json.dumps(res, default=str))  # JSON-ready
    assert res["threads"]["onnxruntime_intra_op"] == 2 and res["threads"]["torch_intra_op"] == 2
    for b in ("1", "4", "32"):
        for key in ("b_over_a", "c_over_b"):
            v = res["ratios"][b][key]
            assert math.isfinite(v) and v > 0
    fx = res["fit_export"]
    assert fx["n_train"] == 1500 and fx["total_s"] > 0 and fx["peak_rss_mb"] > 50
    assert res["size"]["detector_bytes"] > res["size"]["bare_bytes"] > 0
    rt = res["runtime_no_torch"]
    assert rt["torch_blocked"] is True
    assert 0 < rt["import_s"] < 30 and 0 < rt["session_s"] < 30 and 20 < rt["rss_mb"] < 2000
    assert "bars" not in res   # the library measures; the bars file judges
    assert res["cuda"]["available"] in (True, False)


def test_host_reference_agrees_with_detector(quick_result):
    """(c) refits scikit-learn on the detector's own fitting points: same scores."""
    ag = quick_result["agreement"]
    assert ag["ok"], ag
    assert ag["n_compared"] == ag["n"] >= 32
    assert ag["max_rel_diff"] <= 1e-3 and ag["pred_agree"] == 1.0
    assert ag["bare_logits_max_abs_diff"] < 1e-3  # (a) is the same classifier


def test_bars_file_judges_the_result(quick_result):
    specs = load_bars(BARS, "bench")
    bars = {b.name: b for b in judge(quick_result, specs)}
    assert len(bars) == len(specs) == 9
    rss = bars["runtime RSS after a 256 batch (no torch)"]
    assert rss.value == quick_result["runtime_no_torch"]["rss_mb"] and rss.ok is (rss.value <= 200.0)
    size = bars[".onnx size - bare model .onnx"]
    assert size.value == pytest.approx(quick_result["size"]["extra_bytes"] / 1e6)
    missing = judge(quick_result, [{"value": "ratios.999.b_over_a", "op": "<=", "limit": 1}])[0]
    assert missing.value is None and missing.ok is None


def test_cli_exit_status_says_whether_every_bar_passed(quick_result, tmp_path, monkeypatch):
    """``ufad bench --bars``: exit 0 when every bar passes, 1 (naming the failed bars) when one
    fails, so a CI step can gate on it."""
    import json

    from click.testing import CliRunner

    import ufad.exporter.bench.run as bench_run
    from ufad.runtime.cli import main

    monkeypatch.setattr(bench_run, "run_bench", lambda cfg, log=None: dict(quick_result))
    size_mb = quick_result["size"]["extra_bytes"] / 1e6
    for limit, code in ((size_mb * 2, 0), (size_mb / 2, 1)):
        bars = tmp_path / f"bars_{code}.json"
        bars.write_text(json.dumps({"bench": [{"name": "extra size", "value": "size.extra_bytes", "scale": 1e-6,
                                               "op": "<=", "limit": limit}]}))
        out = CliRunner().invoke(main, ["bench", "--bars", str(bars)])
        assert out.exit_code == code, out.output
        assert ("1 bar(s) of" in out.output and "failed: extra size" in out.output) is (code == 1), out.output


def test_bad_bars_file_is_a_clear_error(tmp_path):
    from click.testing import CliRunner

    from ufad.runtime.cli import main

    bad = tmp_path / "bars.json"
    bad.write_text("{not json")
    out = CliRunner().invoke(main, ["bench", "--bars", str(bad)])
    assert out.exit_code == 2 and "--bars" in out.output and "not valid JSON" in out.output
    assert "Traceback" not in out.output


def test_agreement_flags_a_mismatch():
    s = np.array([0.5, 1.0, np.inf], np.float32)
    p = np.array([1, 2, 3])
    assert agreement(s, s.astype(np.float64), p, p)["ok"]
    assert not agreement(s, np.array([0.5, 1.1, np.inf]), p, p)["ok"]
    assert not agreement(s, np.array([0.5, 1.0, 7.0]), p, p)["ok"]  # inf vs finite


def test_markdown_and_cli_render(quick_result, tmp_path):
    from ufad.exporter.bench.report import render_markdown, tables

    md = render_markdown(quick_result)
    for v in VARIANTS:
        assert v in json.dumps(quick_result["latency"])
    assert "| variant | batch |" in md and "b/a =" in md and "c/b =" in md
    assert [t[0] for t in tables(quick_result)] == ["Latency (CPU, same run; (a) and (b) alternate in fresh torch-free processes)",
                                                  "Fit, size, runtime"]
    judged = dict(quick_result, bars=[b.to_json() for b in judge(quick_result, load_bars(BARS, "bench"))])
    assert [t[0] for t in tables(judged)][-1] == "Bars" and "| bar | measured |" in render_markdown(judged)


def test_cli_is_lazy_loaded():
    from click.testing import CliRunner

    from ufad.runtime.cli import main

    out = CliRunner().invoke(main, ["bench", "--help"])
    assert out.exit_code == 0 and "--json" in out.output and "--quick" in out.output
    out = CliRunner().invoke(main, ["bench", "--batches", "0,x"])
    assert out.exit_code != 0 and "--batches" in out.output


@pytest.mark.slow
def test_full_benchmark_bars(tmp_path):
    """The real thing (minutes): full 50k fit, default repeats. Bars that depend on timing
    are reported, not asserted, on a shared machine; the deterministic ones are asserted."""
    res = run_bench(BenchConfig(workdir=str(tmp_path)))
    assert check_result(res) == [] and res["agreement"]["ok"]
    bars = {b.name: b for b in judge(res, load_bars(BARS, "bench"))}
    assert bars[".onnx size - bare model .onnx"].ok
    assert bars["fit+calibrate+export peak RSS"].ok
    assert bars["runtime RSS after a 256 batch (no torch)"].ok

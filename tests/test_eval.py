"""``ufad eval``: metrics on known cases, attacks, anomaly sets, and a real quick evaluation of
the MNIST setup (fit -> export -> score the .onnx with onnxruntime -> metrics -> files)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ufad.exporter.eval import metrics

# ----------------------------------------------------------------------------- metrics


def test_metrics_perfect_and_reversed():
    id_s, ano = np.array([0.0, 1.0, 2.0]), np.array([3.0, 4.0])
    assert metrics.auroc(id_s, ano) == 1.0
    assert metrics.aupr_in(id_s, ano) == 1.0
    assert metrics.aupr_out(id_s, ano) == 1.0
    assert metrics.fpr_at_tpr(id_s, ano) == 0.0
    assert metrics.detection_accuracy(id_s, ano) == 1.0
    # anomalies scoring LOWER than ID is the worst case (convention: higher = anomalous)
    assert metrics.auroc(ano, id_s) == 0.0
    assert metrics.fpr_at_tpr(ano, id_s) == 1.0


def test_metrics_known_values():
    # pairs (id, ano) with ano > id: 3 of 4 -> AUROC 0.75
    id_s, ano = np.array([1.0, 3.0]), np.array([2.0, 4.0])
    assert metrics.auroc(id_s, ano) == pytest.approx(0.75)
    # ranking by score (anomaly positive): 4(a) 3(i) 2(a) 1(i): AP = (1/1 + 2/3) / 2
    assert metrics.aupr_out(id_s, ano) == pytest.approx((1 + 2 / 3) / 2)
    # ranking by -score (ID positive): 1(i) 2(a) 3(i) 4(a): AP = (1 + 2/3) / 2
    assert metrics.aupr_in(id_s, ano) == pytest.approx((1 + 2 / 3) / 2)
    # threshold accepting 95% of ID = the larger ID score (3.0): anomaly 2.0 accepted
    assert metrics.fpr_at_tpr(id_s, ano) == pytest.approx(0.5)
    # best balanced accuracy: t in [1, 2): 0.5 * (1/2 + 1) = 0.75
    assert metrics.detection_accuracy(id_s, ano) == pytest.approx(0.75)
    assert metrics.at_threshold(np.array([0.0, 1.0, np.inf, np.nan]), 0.5) == pytest.approx(0.75)


def test_metrics_inf_scores_and_ties():
    assert metrics.auroc(np.zeros(4), np.full(3, np.inf)) == 1.0
    assert metrics.auroc(np.zeros(5), np.zeros(5)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.auroc(np.zeros(0), np.ones(3))
    m = metrics.all_metrics(np.zeros(10), np.ones(5), threshold=0.5)
    assert m["detection_rate"] == 1.0 and m["n_id"] == 10 and m["n_anomaly"] == 5


# ------------------------------------------------------------------- attacks / sets


@pytest.mark.eval
def test_attacks_succeed_within_budget(reference_model, mnist):
    from ufad.exporter.eval.attacks import run_attack

    x, y = mnist["test"][0][:64], mnist["test"][1][:64]
    fg = run_attack("fgsm", reference_model, x, y, eps=0.3, seed=0)
    assert fg.linf[fg.success].max() <= 0.3 + 1e-6
    assert fg.x_adv.min() >= 0 and fg.x_adv.max() <= 1
    assert fg.success_rate > 0.5
    pgd = run_attack("pgd", reference_model, x, y, eps=0.1, steps=5, seed=0)
    pgd2 = run_attack("pgd", reference_model, x, y, eps=0.1, steps=5, seed=0)
    np.testing.assert_array_equal(pgd.x_adv, pgd2.x_adv)  # deterministic for a seed
    assert pgd.linf.max() <= 0.1 + 1e-6
    df = run_attack("deepfool", reference_model, x[:16], y[:16], steps=20, seed=0)
    assert df.success_rate > 0.8
    # only correctly classified inputs can count as successes
    assert not (df.success & ~df.clean_correct).any()


def test_anomaly_sets_shapes_and_range(mnist):
    from ufad.exporter.eval import anomalies

    x_tr = mnist["train"][0][:2000]
    sets = anomalies.ood_sets("mnist", "test", n=50) + anomalies.noise_sets(x_tr, x_tr[:100], "test", n=20)
    kinds = {s.name: s.kind for s in sets}
    assert kinds["fashion_mnist"] == "OOD" and kinds["sklearn_digits"] == "shift" and kinds["uniform_noise"] == "NS"
    for s in sets:
        assert s.x.dtype == np.float32 and s.x.shape[1:] == (1, 28, 28), s.name
        assert s.x.min() >= 0 and s.x.max() <= 1, s.name
    # the valid split is built from different data than the test split
    v = {s.name: s for s in anomalies.ood_sets("mnist", "valid", n=50)}
    t = {s.name: s for s in sets}
    assert not np.array_equal(v["photo_patches"].x, t["photo_patches"].x)
    assert not np.array_equal(v["fashion_mnist"].x, t["fashion_mnist"].x)


# --------------------------------------------------------------------- quick eval


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    from ufad.exporter.eval.evaluate import ATTACKS_QUICK, Sizes, evaluate

    out = tmp_path_factory.mktemp("eval")
    # Smaller than --quick to fit the test budget; same code path.
    sizes = Sizes(n_fit=4000, n_calib=1000, n_test=1000, n_ood=400, n_noise=200, n_attack=150, n_attack_slow=48)
    plan = [a for a in ATTACKS_QUICK if a[0] in ("fgsm_eps0.1", "pgd_eps0.1", "deepfool")]
    res = evaluate("mnist_cnn", out, quick=True, detectors=["uniform", "msp"], sizes=sizes,
                   attack_plan=plan, threads=2, progress=False, command="pytest")
    return out, res


@pytest.mark.eval
def test_quick_eval_numbers(quick_results):
    _, res = quick_results
    r = res["setups"]["mnist_cnn"]
    assert r["errors"] == {}
    u = r["detectors"]["uniform"]
    # scores come from the exported file
    assert u["onnx_file"].endswith("uniform.onnx") and u["parity_max_rel_diff"] < 1e-4
    assert u["sets"]["fashion_mnist"]["auroc"] >= 0.97
    assert u["sets"]["uniform_noise"]["auroc"] >= 0.99
    assert u["sets"]["fgsm_eps0.1"]["auroc"] >= 0.9
    assert u["id_accuracy"] > 0.98
    assert 0.9 <= u["id_accept_rate"] <= 0.99  # calibrated to 95% on valid
    assert r["attacks"]["fgsm_eps0.1"]["success_rate"] > 0.3
    assert r["attacks"]["pgd_eps0.1"]["success_rate"] > r["attacks"]["fgsm_eps0.1"]["success_rate"]
    for name, d in r["detectors"].items():
        for kind in ("OOD", "AD", "NS"):
            assert 0.0 <= d["mean_auroc"][kind] <= 1.0, (name, kind)
        assert 0.0 <= d["benign"]["false_alarm_rate"] <= 1.0


@pytest.mark.eval
def test_eval_cli_prints_its_bars_and_fails_on_one(quick_results, tmp_path, monkeypatch):
    """``ufad eval --bars``: the pass / FAIL lines of report.md on the console too, and exit
    status 1 when a bar fails (here: an OOD bar above what the detector reached)."""
    from click.testing import CliRunner

    import ufad.exporter.eval.evaluate as ev
    from ufad.runtime.cli import main

    _, res = quick_results
    ood = res["setups"]["mnist_cnn"]["detectors"]["uniform"]["mean_auroc"]["OOD"]
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: res)
    for limit, code in ((ood - 0.01, 0), (min(ood + 0.01, 1.0001), 1)):
        bars = tmp_path / f"bars_{code}.json"
        bars.write_text(json.dumps({"eval": {"detector": "uniform", "min_mean_auroc": {"OOD": limit}}}))
        out = CliRunner().invoke(main, ["eval", "--setup", "mnist_cnn", "-o", str(tmp_path / "o"), "--bars", str(bars)])
        assert out.exit_code == code, out.output
        assert f"mean AUROC OOD {ood:.3f} {'>=' if code == 0 else '<'} {limit:g}: {'pass' if code == 0 else 'FAIL'}" \
            in out.output, out.output
        assert ("1 bar(s) of" in out.output) is (code == 1)


@pytest.mark.eval
def test_quick_eval_files_and_schema(quick_results):
    out, res = quick_results
    for f in ("report.md", "results.json", "roc_mnist_cnn.png", "hist_mnist_cnn.png",
              "detectors/mnist_cnn/uniform.onnx", "detectors/mnist_cnn/msp.onnx"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    data = json.loads((out / "results.json").read_text())
    assert data["convention"] == metrics.CONVENTION
    r = data["setups"]["mnist_cnn"]
    keys = {"auroc", "aupr_in", "aupr_out", "fpr_at_95_tpr", "detection_accuracy", "detection_rate", "kind"}
    for d in r["detectors"].values():
        assert set(d["mean_auroc"]) == {"OOD", "AD", "NS", "overall"}
        for m in d["sets"].values():
            assert keys <= set(m)
        assert "_scores" not in d
    assert (out / "roc_mnist_cnn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "| uniform |" in md and "fashion_mnist" in md and "Regenerate with" in md


def test_eval_cli_rejects_unknown_detector(tmp_path):
    from click.testing import CliRunner

    from ufad.runtime.cli import main

    res = CliRunner().invoke(main, ["eval", "--setup", "mnist_cnn", "--detector", "nope", "-o", str(tmp_path)])
    assert res.exit_code != 0
    assert "unknown detector" in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------ the report, torch-free
def test_results_md_renders_from_results_json_without_torch(tmp_path):
    """RESULTS.md is exactly what the report module renders from the committed results.json
    (one owner of the report; the bars come from the data file recorded in it), and that
    rendering needs neither torch nor a fit."""
    from pathlib import Path

    from torchless import run_without_torch

    root = Path(__file__).resolve().parents[1]
    script = (
        "import json, sys; from ufad.exporter.eval.report import render_markdown\n"
        f"r = json.load(open({str(root / 'results' / 'results.json')!r}))\n"
        "sys.stdout.write(render_markdown(r, 'results/'))\n"
        "assert 'torch' not in sys.modules\n"
    )
    proc = run_without_torch(["python", "-c", script], cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (root / "RESULTS.md").read_text()
    bars = json.loads((root / "tools" / "bars.json").read_text())["eval"]
    assert json.loads((root / "results" / "results.json").read_text())["bars"] == bars
    assert "Bars for `uniform` on fashion_resnet:" in proc.stdout

"""``ufad eval``: fit every registered detector, export it, and measure the SHIPPED .onnx file.

For each setup (a reference model under ``ufad.models`` and its ID dataset): every detector in
``DETECTORS`` is fitted on the ID train split, calibrated on the ID valid split (95% of ID
accepted), exported to one .onnx file, and then every number is computed from scores produced
by ``ufad.runtime.AnomalySession`` (onnxruntime) on that file, never from the torch reference.

Anomaly sets: see ``anomalies`` (OOD, NS, controls) and ``attacks`` (AD: successful attacks
on correctly classified ID test images; the attacks target the classifier, not the detector).
Nothing here is tuned on anomaly data: all detector settings are their defaults unless the
caller passes ``detector_kwargs``; ``split="valid"`` evaluates on disjoint validation anomaly
sets (ID = second half of the valid split, calibration = first half) for any such tuning.

    from ufad.exporter.eval.evaluate import evaluate
    results = evaluate("mnist_cnn", "eval_out", quick=True)
"""

from __future__ import annotations

import importlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ufad.models import datasets
from ufad.runtime.errors import EvaluationError

from . import anomalies, metrics
from .attacks import run_attack

SETUPS = ("mnist_cnn", "fashion_resnet")


@dataclass(frozen=True)
class Sizes:
    """How many samples each part uses (None = the whole split)."""

    n_fit: int | None          # ID train samples to fit on
    n_calib: int | None        # ID valid samples to calibrate on
    n_test: int | None         # ID test samples (the positives)
    n_ood: int | None          # per OOD set
    n_noise: int               # per noise set
    n_attack: int              # ID test images attacked by the fast attacks
    n_attack_slow: int         # ... by CW-L2 and DeepFool


FULL = Sizes(n_fit=None, n_calib=None, n_test=None, n_ood=None, n_noise=2000, n_attack=1000, n_attack_slow=500)
QUICK = Sizes(n_fit=5000, n_calib=1000, n_test=1000, n_ood=500, n_noise=300, n_attack=200, n_attack_slow=100)

# (set name, attack, params, slow? or a number of images) -- eps in [0, 1] pixel units (L-inf)
ATTACKS_FULL: list[tuple[str, str, dict[str, Any], bool | int]] = [
    ("fgsm_eps0.05", "fgsm", {"eps": 0.05}, False),
    ("fgsm_eps0.1", "fgsm", {"eps": 0.1}, False),
    ("fgsm_eps0.2", "fgsm", {"eps": 0.2}, False),
    ("fgsm_eps0.3", "fgsm", {"eps": 0.3}, False),
    ("bim_eps0.1", "bim", {"eps": 0.1, "steps": 10}, False),
    ("pgd_eps0.1", "pgd", {"eps": 0.1, "steps": 20}, False),
    ("pgd_eps0.3", "pgd", {"eps": 0.3, "steps": 20}, False),
    ("cw_l2", "cw_l2", {"steps": 50, "search_steps": 3, "c": 10.0, "lr": 0.1}, True),
    ("deepfool", "deepfool", {"steps": 30, "overshoot": 0.02, "candidates": 4}, True),
    # The same families from the Adversarial Robustness Toolbox (an implementation nobody here
    # wrote), plus its score-based black-box Square attack; successful attacks only, as ours.
    # ART's CW-L2 and DeepFool cost 10-20x ours per image on 2 cores (DeepFool: 700 s for 500
    # Fashion images), so they run on fewer images (the last element: a count).
    ("art_fgsm_eps0.1", "art_fgsm", {"eps": 0.1}, False),
    ("art_pgd_eps0.1", "art_pgd", {"eps": 0.1, "max_iter": 20}, False),
    ("art_cw_l2", "art_cw_l2", {"max_iter": 30, "binary_search_steps": 2, "learning_rate": 0.01,
                                "initial_const": 10.0}, 100),
    ("art_deepfool", "art_deepfool", {"max_iter": 30, "epsilon": 0.02, "nb_grads": 4}, 100),
    ("art_square_eps0.1", "art_square", {"eps": 0.1, "max_iter": 200}, True),
]
ART_PREFIX = "art_"
ATTACKS_QUICK: list[tuple[str, str, dict[str, Any], bool | int]] = [
    ("fgsm_eps0.1", "fgsm", {"eps": 0.1}, False),
    ("fgsm_eps0.3", "fgsm", {"eps": 0.3}, False),
    ("pgd_eps0.1", "pgd", {"eps": 0.1, "steps": 10}, False),
    ("cw_l2", "cw_l2", {"steps": 30, "search_steps": 1, "c": 20.0, "lr": 0.1}, True),
    ("deepfool", "deepfool", {"steps": 20, "overshoot": 0.02, "candidates": 4}, True),
]


# Adaptive attacks (``--adaptive``) on the uniform detector: L-inf budgets per setup (the
# issue's: MNIST is easier to perturb than Fashion-MNIST) and (variant, loss, lambda) runs.
ADAPTIVE_EPS = {"mnist_cnn": (0.05, 0.1, 0.2), "fashion_resnet": (0.03, 0.05, 0.1)}
ADAPTIVE_RUNS: list[tuple[str, str, float]] = [
    ("pgd", "ce", 0.0),       # the gradient ignores the detector (only the iterate choice uses it)
    ("pgd", "ce", 1.0),
    ("pgd", "hinge", 0.1),
    ("pgd", "hinge", 1.0),
    ("square", "hinge", 0.1),
]
ADAPTIVE_SIZES = {"full": {"n": 200, "steps": 40, "queries": 500}, "quick": {"n": 60, "steps": 10, "queries": 100}}
ADAPTIVE_DETECTOR = "uniform"


def _log(msg: str, progress: bool) -> None:
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def _take(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= len(x):
        return x, y
    idx = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
    return x[idx], y[idx]


def load_setup(setup: str):
    """``(model, dataset name)`` of a reference setup (its committed weights, eval mode)."""
    if setup not in SETUPS:
        raise EvaluationError(f"unknown setup {setup!r}; choose one of {list(SETUPS)} or 'all'")
    mod = importlib.import_module(f"ufad.models.{setup}")
    if not Path(mod.WEIGHTS).exists():
        raise EvaluationError(f"{mod.WEIGHTS} is missing; train it: python -m ufad.models.train {setup}")
    return mod.pretrained(), mod.DATASET


def setup_options(setup: str, detector_kwargs: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Detector options of a reference setup (its module's ``DETECTOR_OPTIONS``, chosen on its
    validation sets), overridden per option by ``detector_kwargs``."""
    mod = importlib.import_module(f"ufad.models.{setup}")
    out = {name: dict(kw) for name, kw in getattr(mod, "DETECTOR_OPTIONS", {}).items()}
    for name, kw in (detector_kwargs or {}).items():
        out[name] = {**out.get(name, {}), **kw}
    return out


def build_data(model, dataset: str, sizes: Sizes, split: str, seed: int) -> dict[str, Any]:
    """The ID arrays of one run: fit, calibration and ID evaluation sets (see ``split``)."""
    x_tr, y_tr = datasets.load(dataset, "train")
    x_va, y_va = datasets.load(dataset, "valid")
    if split == "test":
        x_cal, _ = _take(x_va, y_va, sizes.n_calib, seed)
        x_id, y_id = _take(*datasets.load(dataset, "test"), sizes.n_test, seed + 1)
    elif split == "valid":
        half = len(x_va) // 2
        x_cal, _ = _take(x_va[:half], y_va[:half], sizes.n_calib, seed)
        x_id, y_id = _take(x_va[half:], y_va[half:], sizes.n_test, seed + 1)
    else:
        raise EvaluationError(f"split must be 'test' or 'valid', got {split!r}")
    x_fit, y_fit = _take(x_tr, y_tr, sizes.n_fit, seed + 2)
    return {"x_fit": x_fit, "y_fit": y_fit, "x_cal": x_cal, "x_id": x_id, "y_id": y_id, "x_train_all": x_tr}


def build_anomaly_sets(model, dataset: str, data: dict[str, Any], sizes: Sizes, attack_plan, split: str,
                       seed: int, progress: bool) -> tuple[list[anomalies.AnomalySet], dict[str, Any]]:
    """All anomaly / control sets of one setup, plus the attack summaries."""
    sets = anomalies.ood_sets(dataset, split, sizes.n_ood, seed)
    sets += anomalies.noise_sets(data["x_train_all"], data["x_id"], split, sizes.n_noise, seed)
    attack_info: dict[str, Any] = {}
    x_id, y_id = data["x_id"], data["y_id"]
    for name, attack, params, slow in attack_plan:
        n = slow if type(slow) is int else (sizes.n_attack_slow if slow else sizes.n_attack)
        t0 = time.time()
        if attack.startswith(ART_PREFIX):   # the same attack family from ART, an outside implementation
            from .art_attacks import run_art_attack

            res = run_art_attack(attack[len(ART_PREFIX):], model, x_id[:n], y_id[:n], seed=seed,
                                 progress=progress, **params)
        else:
            res = run_attack(attack, model, x_id[:n], y_id[:n], seed=seed, progress=progress, **params)
        info = res.summary()
        info["seconds"] = round(time.time() - t0, 2)
        attack_info[name] = info
        _log(f"  attack {name}: success {info['n_success']}/{info['n_clean_correct']} "
             f"({info['success_rate']:.1%}) in {info['seconds']:.1f}s", progress)
        if res.success.any():
            sets.append(anomalies.AnomalySet(name, "AD", res.x_adv[res.success],
                                             f"{attack} {params}: successful attacks only", info=info))
    sets.append(anomalies.benign_set(model, x_id, y_id, 0.05, split, seed))
    return sets, attack_info


def _check_inputs(data: dict[str, Any], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([data["x_cal"][:192], rng.uniform(0, 1, (64, *data["x_cal"].shape[1:])).astype(np.float32)])


def run_detector(name: str, cls, model, class_names: list[str], data: dict[str, Any],
                 sets: Sequence[anomalies.AnomalySet], onnx_path: Path, *, seed: int, threads: int,
                 progress: bool, kwargs: dict[str, Any] | None = None,
                 adaptive: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit, calibrate, export one detector; score everything with AnomalySession on the file.
    ``adaptive`` (eps, runs, n, steps, queries): also attack this detector adaptively."""
    from ufad.runtime import AnomalySession

    out: dict[str, Any] = {"kwargs": kwargs or {}}
    t0 = time.time()
    kw = dict(kwargs or {})
    det = cls(model, kw.pop("layers", None), class_names=class_names, progress=progress, seed=seed, **kw)
    det.fit(data["x_fit"], data["y_fit"])
    t1 = time.time()
    det.calibrate(data["x_cal"], tpr=0.95, source="ID valid split")
    t2 = time.time()
    rep = det.export(onnx_path, check_inputs=_check_inputs(data, seed))
    t3 = time.time()
    sess = AnomalySession(onnx_path, provider="cpu", threads=threads)
    thr = float(sess.threshold)
    res_id = sess.run(data["x_id"])
    s_id = res_id.score
    out.update({
        "layers": list(det.layers or []), "threshold": thr, "onnx_file": str(onnx_path),
        "onnx_bytes": rep.size_bytes, "parity_max_rel_diff": rep.parity_max_rel_diff,
        "id_accuracy": float(np.mean(res_id.pred == data["y_id"])),
        "id_accept_rate": float(np.mean(s_id <= thr)),
        "calibration_accept_rate": det.calibration.accepted,
        "sets": {},
    })
    scores = {"ID": s_id}
    for s in sets:
        sc = sess.run(s.x).score
        scores[s.name] = sc
        if s.kind == "benign":
            out["benign"] = {
                "set": s.name, "n": int(len(sc)), "false_alarm_rate": metrics.at_threshold(sc, thr),
                "id_rejection_rate": metrics.at_threshold(s_id, thr),
                "auroc_id_vs_benign": metrics.auroc(s_id, sc),
            }
            continue
        m = metrics.all_metrics(s_id, sc, thr)
        m["kind"] = s.kind
        out["sets"][s.name] = m
    t4 = time.time()
    out["seconds"] = {"fit": round(t1 - t0, 2), "calibrate": round(t2 - t1, 2), "export": round(t3 - t2, 2),
                      "score_onnx": round(t4 - t3, 2)}
    if adaptive:
        from .adaptive import run_adaptive

        n = adaptive["n"]
        out["adaptive"] = run_adaptive(det, sess, data["x_id"][:n], data["y_id"][:n], adaptive["eps"],
                                       adaptive["runs"], steps=adaptive["steps"], queries=adaptive["queries"],
                                       seed=seed, progress=progress)
        out["seconds"]["adaptive"] = round(time.time() - t4, 2)
    by_kind = {k: [m["auroc"] for m in out["sets"].values() if m["kind"] == k] for k in anomalies.KINDS}
    out["mean_auroc"] = {k: (float(np.mean(v)) if v else None) for k, v in by_kind.items()}
    present = [v for v in out["mean_auroc"].values() if v is not None]
    out["mean_auroc"]["overall"] = float(np.mean(present)) if present else None
    out["_scores"] = scores
    return out


def evaluate_setup(setup: str, out_dir: Path, *, quick: bool = False, detectors: Sequence[str] | None = None,
                   detector_kwargs: dict[str, dict[str, Any]] | None = None, split: str = "test",
                   sizes: Sizes | None = None, attack_plan=None, seed: int = 0, threads: int = 2,
                   progress: bool = True, adaptive: bool = False) -> dict[str, Any]:
    """Evaluate every selected detector on one setup; returns its results (scores under ``_scores``).
    ``adaptive``: also run the adaptive attacks (``ADAPTIVE_*``) on the uniform detector."""
    from ..detectors import DETECTORS

    names = list(DETECTORS) if detectors is None else list(detectors)
    unknown = [n for n in names if n not in DETECTORS]
    if unknown:
        raise EvaluationError(f"unknown detector(s) {unknown}; registered: {sorted(DETECTORS)}")
    sizes = sizes or (QUICK if quick else FULL)
    attack_plan = attack_plan if attack_plan is not None else (ATTACKS_QUICK if quick else ATTACKS_FULL)
    t0 = time.time()
    model, dataset = load_setup(setup)
    detector_kwargs = setup_options(setup, detector_kwargs)
    class_names = datasets.class_names(dataset)
    _log(f"[{setup}] ID = {dataset}; building data and anomaly sets ({'quick' if quick else 'full'}, split={split})", progress)
    data = build_data(model, dataset, sizes, split, seed)
    sets, attack_info = build_anomaly_sets(model, dataset, data, sizes, attack_plan, split, seed, progress)
    t_data = time.time() - t0
    res: dict[str, Any] = {
        "setup": setup, "id_dataset": dataset, "split": split, "quick": quick, "sizes": asdict(sizes),
        "n_id": int(len(data["x_id"])), "n_fit": int(len(data["x_fit"])), "n_calib": int(len(data["x_cal"])),
        "sets": {s.name: {"kind": s.kind, "n": int(len(s.x)), "description": s.description, **({"info": s.info} if s.info else {})}
                 for s in sets},
        "attacks": attack_info, "detectors": {}, "errors": {},
        "seconds_data": round(t_data, 2),
    }
    for name in names:
        _log(f"[{setup}] detector {name}", progress)
        path = Path(out_dir) / "detectors" / setup / f"{name}.onnx"
        try:
            res["detectors"][name] = run_detector(
                name, DETECTORS[name], model, class_names, data, sets, path, seed=seed, threads=threads,
                progress=progress, kwargs=(detector_kwargs or {}).get(name),
                adaptive=_adaptive_plan(setup, quick) if adaptive and name == ADAPTIVE_DETECTOR else None)
        except Exception as e:  # one broken detector must not hide the others' numbers
            res["errors"][name] = f"{type(e).__name__}: {e}"
            _log(f"[{setup}] detector {name} FAILED: {type(e).__name__}: {e}", True)
            continue
        d = res["detectors"][name]
        _log(f"[{setup}] {name}: mean AUROC OOD {_f(d['mean_auroc']['OOD'])} AD {_f(d['mean_auroc']['AD'])} "
             f"NS {_f(d['mean_auroc']['NS'])}; ID accept {d['id_accept_rate']:.3f}; "
             f"fit {d['seconds']['fit']}s export {d['seconds']['export']}s", progress)
    res["seconds_total"] = round(time.time() - t0, 2)
    return res


def _adaptive_plan(setup: str, quick: bool) -> dict[str, Any]:
    return {"eps": ADAPTIVE_EPS[setup], "runs": ADAPTIVE_RUNS, **ADAPTIVE_SIZES["quick" if quick else "full"]}


def _f(v: float | None, nd: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def _strip(res: dict[str, Any]) -> dict[str, Any]:
    out = dict(res)
    out["detectors"] = {k: {kk: vv for kk, vv in d.items() if kk != "_scores"} for k, d in res["detectors"].items()}
    return out


def evaluate(setup: str | Sequence[str], out_dir: str | Path, quick: bool = False, *,
             detectors: Sequence[str] | None = None, detector_kwargs: dict[str, dict[str, Any]] | None = None,
             split: str = "test", sizes: Sizes | None = None, attack_plan=None, seed: int = 0, threads: int = 2,
             progress: bool = True, plots: bool = True, command: str | None = None,
             results_md: str | Path | None = None, reuse: bool = False,
             bars: dict[str, Any] | None = None, adaptive: bool = False) -> dict[str, Any]:
    """Evaluate ``setup`` (a name, a list, or "all") and write report.md, results.json and
    PNG plots into ``out_dir`` (and the report to ``results_md`` when given). Returns the
    results dict (what results.json holds).

    Each setup's results are also saved as ``setup_<name>.json`` + ``scores_<name>.npz``;
    with ``reuse=True`` a setup already evaluated in ``out_dir`` with the same configuration
    is loaded instead of recomputed (to resume, or to run setups in parallel and assemble).
    ``bars`` (the ``eval`` section of a bars file) is kept in results.json and judged in the report.
    ``adaptive``: also attack the uniform detector with an attacker who knows it (``adaptive.py``)."""
    setups = list(SETUPS) if setup == "all" else ([setup] if isinstance(setup, str) else list(setup))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    per = {}
    config = {"quick": quick, "split": split, "seed": seed, "detectors": None if detectors is None else list(detectors),
              "detector_kwargs": detector_kwargs or {}, "sizes": asdict(sizes) if sizes else None,
              "attack_plan": None if attack_plan is None else [list(a) for a in attack_plan],
              **({"adaptive": True} if adaptive else {})}
    for s in setups:
        # a setup's own detector options are part of what its cached result was made with
        config = {**config, "detector_kwargs": setup_options(s, detector_kwargs)}
        cached = _load_setup_result(out_dir, s, config) if reuse else None
        if cached is not None:
            _log(f"[{s}] reusing {out_dir / f'setup_{s}.json'} (same configuration)", progress)
            per[s] = cached
            continue
        per[s] = evaluate_setup(s, out_dir, quick=quick, detectors=detectors, detector_kwargs=detector_kwargs,
                                split=split, sizes=sizes, attack_plan=attack_plan, seed=seed, threads=threads,
                                progress=progress, adaptive=adaptive)
        _save_setup_result(out_dir, per[s], config)
    if plots:
        from .report import write_plots

        for s, r in per.items():
            r["plots"] = write_plots(r, out_dir)
    results = {
        "convention": metrics.CONVENTION,
        "command": command,
        "quick": quick, "split": split, "seed": seed,
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "torch_threads": threads, "cpu_count": _cpu_count()},
        # sum of the setups' own times, so that a run assembled with reuse reports the real cost
        "seconds_total": round(sum(r["seconds_total"] for r in per.values()), 2),
        "seconds_this_run": round(time.time() - t0, 2),
        "setups": {s: _strip(r) for s, r in per.items()},
    }
    if bars is not None:
        results["bars"] = bars
    from .report import render_markdown

    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_default) + "\n")
    md = render_markdown(results)
    (out_dir / "report.md").write_text(md)
    if results_md is not None:
        import os

        rel = os.path.relpath(out_dir.resolve(), Path(results_md).resolve().parent)
        Path(results_md).write_text(render_markdown(results, "" if rel == "." else rel + "/"))
    return results


def _save_setup_result(out_dir: Path, res: dict[str, Any], config: dict[str, Any]) -> None:
    name = res["setup"]
    data = _strip(res)
    data["config"] = config
    (out_dir / f"setup_{name}.json").write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    arrays = {f"{det}/{k}": v for det, d in res["detectors"].items() for k, v in d["_scores"].items()}
    np.savez_compressed(out_dir / f"scores_{name}.npz", **arrays)


def _load_setup_result(out_dir: Path, name: str, config: dict[str, Any]) -> dict[str, Any] | None:
    jp, sp = out_dir / f"setup_{name}.json", out_dir / f"scores_{name}.npz"
    if not (jp.exists() and sp.exists()):
        return None
    data = json.loads(jp.read_text())
    if json.loads(json.dumps(config, default=_json_default)) != data.pop("config", None):
        return None
    with np.load(sp) as z:
        for key in z.files:
            det, set_name = key.split("/", 1)
            data["detectors"][det].setdefault("_scores", {})[set_name] = z[key]
    return data


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


__all__ = ["evaluate", "evaluate_setup", "Sizes", "FULL", "QUICK", "ATTACKS_FULL", "ATTACKS_QUICK", "SETUPS",
           "ADAPTIVE_EPS", "ADAPTIVE_RUNS"]

"""Render ``ufad eval`` results: the markdown report and the PNG plots (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics

KIND_COLORS = {"OOD": "tab:blue", "AD": "tab:red", "NS": "tab:green", "shift": "tab:purple", "benign": "tab:gray"}


def _f(v: Any, nd: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}%"


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, max(1, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return plt, fig, axes.ravel()


def _save(plt, fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def write_plots(res: dict[str, Any], out_dir: Path) -> list[str]:
    """ROC curves (one panel per detector, one curve per set) and score histograms
    (ID vs each anomaly kind) of one setup. Returns the written file names."""
    setup = res["setup"]
    dets = [(n, d) for n, d in res["detectors"].items() if "_scores" in d]
    if not dets:
        return []
    files = []
    plt, fig, axes = _grid(len(dets))
    for ax, (name, d) in zip(axes, dets):
        sc = d["_scores"]
        for set_name, m in d["sets"].items():
            fpr, tpr = metrics.roc_curve(sc["ID"], sc[set_name])
            ax.plot(fpr, tpr, lw=1, color=KIND_COLORS.get(m["kind"], "k"), alpha=0.7)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{name} (mean AUROC {_f(d['mean_auroc']['overall'])})", fontsize=9)
        ax.set_xlabel("anomalies accepted (FPR)", fontsize=8)
        ax.set_ylabel("ID accepted (TPR)", fontsize=8)
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in KIND_COLORS.items() if k not in ("benign",)]
    fig.legend(handles=handles, loc="lower right", fontsize=8)
    fig.suptitle(f"{setup}: ROC per anomaly set (ID = {res['id_dataset']}, ID positive)", fontsize=10)
    files.append(_save(plt, fig, Path(out_dir) / f"roc_{setup}.png"))

    plt, fig, axes = _grid(len(dets))
    for ax, (name, d) in zip(axes, dets):
        sc = d["_scores"]
        groups = {"ID": sc["ID"]}
        for kind in ("OOD", "AD", "NS"):
            parts = [sc[s] for s, m in d["sets"].items() if m["kind"] == kind]
            if parts:
                groups[kind] = np.concatenate(parts)
        if "benign" in d:
            groups["benign"] = sc[d["benign"]["set"]]
        allv = np.concatenate([g[np.isfinite(g)] for g in groups.values()])
        lo, hi = np.quantile(allv, [0.005, 0.995]) if allv.size else (0.0, 1.0)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for k, g in groups.items():
            ax.hist(np.clip(g[np.isfinite(g)], lo, hi), bins=bins, density=True, histtype="step",
                    color="black" if k == "ID" else KIND_COLORS[k], label=k, lw=1.2)
        ax.axvline(d["threshold"], color="k", ls="--", lw=0.8)
        ax.set_title(f"{name}: scores (dashed = threshold)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{setup}: anomaly scores (higher = more anomalous; clipped to 0.5-99.5%)", fontsize=10)
    files.append(_save(plt, fig, Path(out_dir) / f"hist_{setup}.png"))
    return files + write_adaptive_plot(res, out_dir)


THREAT_MODEL = (
    "Threat model: the attacker knows the classifier and the fitted detector. White box: L-inf PGD "
    "with a random start through the detector's torch reference (the module that was exported, so "
    "the same score as the file). Black box: the Square attack querying only the .onnx for logits "
    "and score. Budget `eps` (pixels in [0, 1]) around a correctly classified ID test image; the "
    "attacker keeps the first iterate that is misclassified AND accepted. Objectives (minimised): "
    "`ce`: -CE + lam * score; `hinge`: max(margin, -1) + lam * max(score - threshold, 0), whose "
    "terms stop pulling once each goal is met. With `ce`, lam = 0 the gradient ignores the detector "
    "and only the choice of iterate uses it (the fully detector-unaware attacks are the AD sets above). "
    "Robust detection = fraction of attempts that end correctly classified or flagged at the "
    "calibrated threshold (verdicts of the shipped file); evasion = 1 - robust detection.")


def _adaptive_md(r: dict[str, Any], name: str = "uniform") -> list[str]:
    runs = r["detectors"].get(name, {}).get("adaptive")
    if not runs:
        return []
    L = [f"### Adaptive attacks on `{name}` (the attacker knows the detector)\n", THREAT_MODEL + "\n"]
    L.append("| eps | attack | objective | lam | n | robust detection | misclassified | evaded | "
             "flagged of misclassified | mean L-inf / L2 of evading | s |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for a in runs:
        p = a["params"]
        kind = "white-box PGD" if a["variant"] == "pgd" else "black-box Square"
        budget = f"{p['steps']} steps" if "steps" in p else f"{p['queries']} queries"
        L.append(f"| {a['eps']:g} | {kind}, {budget} | {p['loss']} | {p['lam']:g} | {a['n']} | "
                 f"**{_pct(a['robust_detection'])}** | {_pct(a['misclassified_rate'])} | {_pct(a['evasion_rate'])} | "
                 f"{_pct(a['flagged_rate_of_misclassified'])} | {_f(a['mean_linf_evaded'])} / {_f(a['mean_l2_evaded'])} | "
                 f"{a['seconds']:.0f} |")
    worst = {}
    for a in runs:
        worst[a["eps"]] = min(worst.get(a["eps"], 1.0), a["robust_detection"])
    L.append("")
    L.append("Worst case over the attacks above (robust detection): "
             + ", ".join(f"eps {e:g}: **{_pct(v)}**" for e, v in worst.items()) + ".\n")
    return L


def write_adaptive_plot(res: dict[str, Any], out_dir: Path, name: str = "uniform") -> list[str]:
    """Robust detection vs eps, one line per attack configuration (empty without adaptive runs)."""
    runs = res["detectors"].get(name, {}).get("adaptive")
    if not runs:
        return []
    plt, fig, (ax,) = _grid(1)
    lines: dict[str, list[tuple[float, float]]] = {}
    for a in runs:
        key = f"{a['variant']} {a['params']['loss']} lam={a['params']['lam']:g}"
        lines.setdefault(key, []).append((a["eps"], a["robust_detection"]))
    for key, pts in lines.items():
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", lw=1.2, ls="--" if key.startswith("square") else "-", label=key)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("L-inf budget eps", fontsize=8)
    ax.set_ylabel("robust detection (correct or flagged)", fontsize=8)
    ax.set_title(f"{res['setup']}: adaptive attacks on {name}", fontsize=9)
    ax.legend(fontsize=7)
    return [_save(plt, fig, Path(out_dir) / f"adaptive_{res['setup']}.png")]


def _setup_md(r: dict[str, Any], image_prefix: str = "") -> list[str]:
    L: list[str] = []
    dets = r["detectors"]
    L.append(f"## {r['setup']} (ID = {r['id_dataset']})\n")
    L.append(f"Fit on {r['n_fit']} ID train images, calibrated on {r['n_calib']} ID valid images "
             f"(threshold = 95% of them accepted), evaluated on {r['n_id']} ID "
             f"{'test' if r['split'] == 'test' else 'held-out valid'} images. Data + attacks: "
             f"{r['seconds_data']:.0f} s; setup total {r['seconds_total']:.0f} s.\n")
    if r["errors"]:
        L.append("**Detectors that failed:**\n")
        for n, e in r["errors"].items():
            L.append(f"- `{n}`: {e}")
        L.append("")
    if not dets:
        return L
    base = {n: d for n, d in dets.items() if n != "uniform"}
    L.append("### Summary: mean AUROC per anomaly type (ID positive)\n")
    L.append("Overall = mean of the three type means. ID accept = fraction of ID test accepted at the "
             "calibrated threshold; benign FA = fraction of benign noisy ID images flagged.\n")
    L.append("| detector | OOD | AD | NS | overall | ID acc. (clf) | ID accept | benign FA | fit s | export s | .onnx KB |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, d in sorted(dets.items(), key=lambda kv: -(kv[1]["mean_auroc"]["overall"] or 0)):
        m = d["mean_auroc"]
        L.append(f"| {n} | {_f(m['OOD'])} | {_f(m['AD'])} | {_f(m['NS'])} | **{_f(m['overall'])}** | "
                 f"{_pct(d['id_accuracy'])} | {_pct(d['id_accept_rate'])} | {_pct(d.get('benign', {}).get('false_alarm_rate'))} | "
                 f"{d['seconds']['fit']:.1f} | {d['seconds']['export']:.1f} | {d['onnx_bytes'] / 1024:.0f} |")
    L.append("")
    if "uniform" in dets and base:
        best = max(base.items(), key=lambda kv: kv[1]["mean_auroc"]["overall"] or 0)
        u = dets["uniform"]["mean_auroc"]["overall"]
        b = best[1]["mean_auroc"]["overall"]
        verdict = "beats" if u > b else ("ties" if u == b else "does NOT beat")
        L.append(f"Uniform overall {_f(u, 4)} {verdict} the best baseline (`{best[0]}`, {_f(b, 4)}).\n")
    set_names = list(next(iter(dets.values()))["sets"])
    L.append("### AUROC per set (rows) and detector (columns)\n")
    L.append("| set | kind | n | " + " | ".join(dets) + " |")
    L.append("|---|---|---|" + "---|" * len(dets))
    for s in set_names:
        L.append(f"| {s} | {r['sets'][s]['kind']} | {r['sets'][s]['n']} | "
                 + " | ".join(_f(d["sets"].get(s, {}).get("auroc")) for d in dets.values()) + " |")
    L.append("")
    L.append("### Benign control (ID + N(0, 0.05^2), still correctly classified): must be accepted\n")
    L.append("| detector | benign false-alarm rate | ID rejection rate | AUROC ID vs benign |")
    L.append("|---|---|---|---|")
    for n, d in dets.items():
        b = d.get("benign", {})
        L.append(f"| {n} | {_pct(b.get('false_alarm_rate'))} | {_pct(b.get('id_rejection_rate'))} | {_f(b.get('auroc_id_vs_benign'))} |")
    L.append("")
    L.append("### Attacks (on correctly classified ID images; white-box on the classifier, detector-unaware)\n")
    L.append("| set | attack | params | success rate | successful | mean L-inf | mean L2 | s |")
    L.append("|---|---|---|---|---|---|---|---|")
    for s, a in r["attacks"].items():
        params = ", ".join(f"{k}={v}" for k, v in a["params"].items())
        L.append(f"| {s} | {a['attack']} | {params} | {_pct(a['success_rate'])} | {a['n_success']}/{a['n_clean_correct']} | "
                 f"{_f(a['mean_linf'])} | {_f(a['mean_l2'])} | {a['seconds']:.1f} |")
    L.append("")
    L.extend(_adaptive_md(r))
    L.append("### All metrics per detector and set\n")
    L.append("AUROC, AUPR-IN (ID positive), AUPR-OUT (anomaly positive), FPR@95%TPR (anomalies accepted "
             "when 95% of ID is accepted; lower is better), detection accuracy (best balanced accuracy), "
             "detection rate at the calibrated threshold.\n")
    for n, d in dets.items():
        opts = "".join(f", {k}={v}" for k, v in d.get("kwargs", {}).items() if k != "layers")
        L.append(f"#### {n} (threshold {d['threshold']:.4g}, layers: {', '.join(d['layers']) or '-'}{opts})\n")
        L.append("| set | kind | AUROC | AUPR-IN | AUPR-OUT | FPR@95TPR | det. acc. | detected @thr |")
        L.append("|---|---|---|---|---|---|---|---|")
        for s, m in d["sets"].items():
            L.append(f"| {s} | {m['kind']} | {_f(m['auroc'])} | {_f(m['aupr_in'])} | {_f(m['aupr_out'])} | "
                     f"{_f(m['fpr_at_95_tpr'])} | {_f(m['detection_accuracy'])} | {_pct(m['detection_rate'])} |")
        L.append("")
    L.append("### Anomaly sets\n")
    for s, info in r["sets"].items():
        L.append(f"- `{s}` ({info['kind']}, n={info['n']}): {info['description']}")
    L.append("")
    if r.get("plots"):
        L.append(" ".join(f"![{p}]({image_prefix}{p})" for p in r["plots"]) + "\n")
    return L


def bar_checks(r: dict[str, Any], spec: dict[str, Any]) -> list[tuple[str, bool]]:
    """``(what was compared, passed)`` for one detector against each bar of ``spec`` (the
    ``eval`` section of a bars file, e.g. tools/bars.json); empty when the detector is absent."""
    dets, name = r["detectors"], spec.get("detector", "uniform")
    if name not in dets:
        return []
    u = dets[name]
    m = u["mean_auroc"]
    out = []
    for t, limit in spec.get("min_mean_auroc", {}).items():
        ok = (m.get(t) or 0) >= limit
        out.append((f"mean AUROC {t} {_f(m.get(t))} {'>=' if ok else '<'} {limit:g}", ok))
    base = {n: d["mean_auroc"]["overall"] or 0 for n, d in dets.items() if n != name}
    if spec.get("beat_best_baseline") and base:
        best = max(base, key=base.get)
        out.append((f"overall {_f(m['overall'], 4)} vs best baseline `{best}` {_f(base[best], 4)}",
                    (m["overall"] or 0) >= base[best]))
    fa, margin = u.get("benign", {}).get("false_alarm_rate"), spec.get("benign_false_alarm_margin")
    if fa is not None and margin is not None:
        rej = 1.0 - u["id_accept_rate"]
        out.append((f"benign false alarms {_pct(fa)} vs ID rejection {_pct(rej)} + {100 * margin:g} pp",
                    fa <= rej + margin))
    return out


def bar_lines(r: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """Markdown pass/fail lines of ``bar_checks``."""
    checks = bar_checks(r, spec)
    if not checks:
        return []
    return ["", f"Bars for `{spec.get('detector', 'uniform')}` on {r['setup']}:"] + \
        [f"- {text}: **{'pass' if ok else 'FAIL'}**" for text, ok in checks]


def render_markdown(results: dict[str, Any], image_prefix: str = "") -> str:
    """The whole report as markdown; plot links get ``image_prefix`` (a relative folder)."""
    L = ["# ufad evaluation results\n"]
    if results.get("command"):
        L.append(f"Regenerate with:\n\n```\n{results['command']}\n```\n")
    L.append(f"Mode: {'quick (subsampled)' if results['quick'] else 'full'}; anomaly split: {results['split']}; "
             f"seed {results['seed']}; total {results['seconds_total']:.0f} s on {results['environment']['cpu_count']} "
             f"CPU core(s), torch threads {results['environment']['torch_threads']}.\n")
    L.append(f"Convention: {results['convention']}. Every score comes from the exported .onnx file run "
             "by `ufad.runtime.AnomalySession` (onnxruntime, CPU). "
             + ("No setting was tuned on these test anomaly sets" if results["split"] == "test"
                else "These are the validation anomaly sets that settings are chosen on")
             + ": every detector uses its defaults, except the options a setup chose on its validation "
             "sets (`DETECTOR_OPTIONS` in its model module, listed with the detector below and under kwargs "
             "in results.json).\n")
    for r in results["setups"].values():
        L.append("## Overview: " + r["setup"])
        dets = r["detectors"]
        if dets:
            L.append("")
            L.append("| detector | OOD | AD | NS | overall | ID accept | benign FA |")
            L.append("|---|---|---|---|---|---|---|")
            for n, d in dets.items():
                m = d["mean_auroc"]
                L.append(f"| {n} | {_f(m['OOD'])} | {_f(m['AD'])} | {_f(m['NS'])} | {_f(m['overall'])} | "
                         f"{_pct(d['id_accept_rate'])} | {_pct(d.get('benign', {}).get('false_alarm_rate'))} |")
            for n, e in r["errors"].items():
                L.append(f"| {n} | FAILED: {e} | | | | | |")
            if results.get("bars"):
                L.extend(bar_lines(r, results["bars"]))
            loud = [n for n, d in dets.items() if d.get("benign", {}).get("false_alarm_rate", 0) > 0.2]
            if loud:
                L.append(f"\n**Benign control failed** (more than 20% of ID images + N(0, 0.05^2) noise flagged, "
                         f"vs ~5% of clean ID): {', '.join(f'`{n}`' for n in loud)}.")
        L.append("")
    if not results["quick"]:
        L.append("How the uniform detector's defaults were chosen, on validation data only, and what "
                 "was tried and not kept: `docs/design.md` in the ufad repository. Evaluations of earlier "
                 "versions of the reference models, kept for comparison: `results/history/` (each folder's "
                 "README says what changed).\n")
    for r in results["setups"].values():
        L.extend(_setup_md(r, image_prefix))
    return "\n".join(L) + "\n"

"""Render a ``ufad bench`` result: the same tables as rich output or markdown (BENCHMARKS.md)."""

from __future__ import annotations

import math
from typing import Any

import click

from .config import VARIANT_LABELS, VARIANTS


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def tables(res: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The result as ``(title, header, rows)`` tables (shared by the rich and markdown output)."""
    out = []
    batches = res["settings"]["batches"]
    rows = []
    for v in VARIANTS:
        for b in batches:
            st = res["latency"][v][str(b)]
            r = res["ratios"][str(b)]
            ratio = {"bare": "1.00 (a)", "ufad": f"b/a = {r['b_over_a']:.2f}",
                     "host": f"c/b = {r['c_over_b']:.2f}"}[v]
            rows.append([VARIANT_LABELS[v], str(b), _fmt(st["median_ms"]), _fmt(st["p95_ms"]),
                         f"{st['throughput_per_s']:.0f}", ratio, str(st["n"])])
    out.append(("Latency (CPU, same run; (a) and (b) alternate in fresh torch-free processes)",
                ["variant", "batch", "median ms", "p95 ms", "inputs/s", "ratio", "calls"], rows))
    fx, sz, rt, ag = res["fit_export"], res["size"], res["runtime_no_torch"], res["agreement"]
    rows = [
        ["fit (train)", f"{fx['fit_s']:.1f} s", f"{fx['n_train']} images"],
        ["calibrate (valid)", f"{fx['calibrate_s']:.1f} s", f"{fx['n_calib']} images"],
        ["export + verify", f"{fx['export_s']:.1f} s", f"parity {fx['parity_max_rel_diff']:.1e}"],
        ["fit + calibrate + export", f"{fx['total_s']:.1f} s wall", f"{fx['cpu_s']:.1f} s CPU (process)"],
        ["peak RSS (fit/export process)", f"{fx['peak_rss_mb']:.0f} MB", f"data load {fx['load_s']:.1f} s not counted"],
        ["detector .onnx", f"{sz['detector_bytes'] / 1e6:.2f} MB", f"bare model .onnx {sz['bare_bytes'] / 1e6:.2f} MB (+{sz['extra_bytes'] / 1e6:.2f} MB)"],
        ["runtime import (no torch)", f"{rt['import_s'] * 1e3:.0f} ms",
         f"numpy {rt['import_numpy_s'] * 1e3:.0f} + onnxruntime {rt['import_onnxruntime_s'] * 1e3:.0f} + ufad.runtime {rt['import_ufad_runtime_s'] * 1e3:.0f} ms"],
        ["session creation", f"{rt['session_s'] * 1e3:.0f} ms", f"import + session {rt['import_plus_session_s'] * 1e3:.0f} ms"],
        ["RSS after scoring 256 (no torch)", f"{rt['rss_mb']:.0f} MB", f"torch blocked: {rt['torch_blocked']}"],
        ["(c) vs (b) scores", f"max rel diff {ag['max_rel_diff']:.1e}",
         f"{ag['n_compared']} inputs, pred agree {ag['pred_agree']:.3f}, ok={ag['ok']}"],
    ]
    cuda = res["cuda"]
    if cuda.get("available"):
        for b, r in cuda["ratios"].items():
            rows.append([f"CUDA batch {b}", f"a {cuda['latency']['bare'][b]['median_ms']:.3f} ms / "
                         f"b {cuda['latency']['ufad'][b]['median_ms']:.3f} ms", f"b/a = {r['b_over_a']:.2f}"])
    else:
        rows.append(["CUDA", "skipped", cuda.get("reason", "")])
    out.append(("Fit, size, runtime", ["what", "value", "notes"], rows))
    if res.get("bars"):
        rows = [[b["name"], f"{_fmt(b['value'])} {b['unit']}", f"{b['op']} {b['limit']:g} {b['unit']}",
                 {True: "PASS", False: "FAIL", None: "n/a"}[b["pass"]]] for b in res["bars"]]
        out.append(("Bars", ["bar", "measured", "limit", "result"], rows))
    return out


def render_markdown(res: dict[str, Any]) -> str:
    """The result as markdown (what BENCHMARKS.md quotes)."""
    m, th = res["machine"], res["threads"]
    lines = [
        f"Model `{res['model']}`, data `{res['data']}`. CPU: {m['cpu']}, {m['usable_cores']} usable cores; "
        f"threads: onnxruntime intra-op {th['onnxruntime_intra_op']} / inter-op {th['onnxruntime_inter_op']}, "
        f"torch intra-op {th['torch_intra_op']} / inter-op {th['torch_inter_op']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".", "",
    ]
    for title, header, rows in tables(res):
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def print_rich(res: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        click.echo(render_markdown(res))
        return
    console = Console()
    for title, header, rows in tables(res):
        t = Table(title=title)
        for h in header:
            t.add_column(h)
        for r in rows:
            t.add_row(*r)
        console.print(t)
    th = res["threads"]
    console.print(f"threads: onnxruntime {th['onnxruntime_intra_op']}, torch {th['torch_intra_op']}; "
                  f"CPU: {res['machine']['cpu']} ({res['machine']['usable_cores']} cores)")

"""``ufad eval``: the evaluation command (needs the export + eval extras)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


@click.command("eval")
@click.option("--setup", "setup", type=click.Choice(["all", "mnist_cnn", "fashion_resnet"]), default="all",
              show_default=True, help="reference model (and its ID dataset) to evaluate")
@click.option("--quick", is_flag=True, help="subsampled sets and fewer attacks (< 3 min on 2 cores)")
@click.option("--out-dir", "-o", type=click.Path(file_okay=False, path_type=Path), default=Path("eval_results"),
              show_default=True, help="where report.md, results.json, PNGs and the .onnx files go")
@click.option("--detector", "detectors", multiple=True,
              help="evaluate only this registered detector (repeatable; default: all in DETECTORS)")
@click.option("--results-md", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the report here (e.g. RESULTS.md at the repo root)")
@click.option("--split", type=click.Choice(["test", "valid"]), default="test", show_default=True,
              help="'valid' builds disjoint validation anomaly sets (for tuning; never report them as test)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--bars", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="judge the uniform detector against the 'eval' bars of this file (the project's: tools/bars.json); "
                   "exit status 1 when one fails")
@click.option("--adaptive", is_flag=True,
              help="also attack the uniform detector with an attacker who knows it (white-box PGD on the "
                   "torch reference, black-box Square on the .onnx): the robust-detection table")
@click.option("--threads", type=int, default=2, show_default=True, help="torch / onnxruntime threads")
@click.option("--no-plots", is_flag=True, help="skip the PNG plots")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--reuse", is_flag=True,
              help="load setups already evaluated in --out-dir with the same options instead of recomputing")
def eval_command(setup, quick, out_dir, detectors, results_md, split, seed, bars, adaptive, threads, no_plots, quiet, reuse):
    """Fit every registered detector on ID data, export it to .onnx and measure the exported
    file (onnxruntime) on OOD, adversarial and noise sets. Writes report.md, results.json and
    ROC / histogram PNGs into --out-dir."""
    import torch

    from ..bars import load_bars
    from ..eval.evaluate import evaluate

    spec = load_bars(bars, "eval") if bars else None   # a bad file fails before the run
    torch.set_num_threads(threads)
    # --reuse / --quiet do not change any number, so the recorded regenerate command leaves it out
    args = [a for a in sys.argv[2:] if a not in ("--reuse", "--quiet")]
    command = "ufad eval " + " ".join(shlex.quote(a) for a in args) if args else "ufad eval"
    res = evaluate(setup, out_dir, quick=quick, detectors=list(detectors) or None, split=split, seed=seed,
                   threads=threads, progress=not quiet, plots=not no_plots, command=command,
                   results_md=results_md, reuse=reuse, bars=spec,
                   adaptive=adaptive)
    for name, r in res["setups"].items():
        for det, d in r["detectors"].items():
            m = d["mean_auroc"]
            click.echo(f"{name:15s} {det:12s} AUROC OOD {m['OOD'] or float('nan'):.3f}  AD {m['AD'] or float('nan'):.3f}  "
                       f"NS {m['NS'] or float('nan'):.3f}  overall {m['overall'] or float('nan'):.3f}")
        for det, e in r["errors"].items():
            click.echo(f"{name:15s} {det:12s} FAILED: {e}", err=True)
    failed = 0
    if spec is not None:
        from ..eval.report import bar_checks

        for r in res["setups"].values():
            checks = bar_checks(r, spec)
            if checks:
                click.echo(f"Bars for `{spec.get('detector', 'uniform')}` on {r['setup']}:")
            for text, ok in checks:
                click.echo(f"- {text}: {'pass' if ok else 'FAIL'}")
            failed += sum(not ok for _, ok in checks)
    click.echo(f"wrote {out_dir / 'report.md'} and {out_dir / 'results.json'}"
               + (f" and {results_md}" if results_md else ""))
    if failed:
        click.echo(f"{failed} bar(s) of {bars} failed (exit status 1)", err=True)
    if failed or any(r["errors"] for r in res["setups"].values()):
        sys.exit(1)

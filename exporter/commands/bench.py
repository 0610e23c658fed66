"""``ufad bench``: the detector's cost on top of the bare model, as a table (and JSON/markdown).

    ufad bench                                   # reference MNIST CNN, full 50k fit, 2 threads
    ufad bench --quick --limit 2000              # a smoke run (seconds, not minutes)
    ufad bench --json bench.json --markdown bench.md --bars tools/bars.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ufad.runtime.errors import InputError

from ..bench.config import BenchConfig


def _batches(value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--batches must be comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise InputError(f"--batches needs positive batch sizes, got {value!r}")
    return out


@click.command("bench")
@click.option("--model", "model_spec", default="ufad.models.mnist_cnn:pretrained", show_default=True,
              help="package.module:factory of the classifier (this RUNS that code).")
@click.option("--data", default="mnist", show_default=True, help="ID dataset (train split fits, valid calibrates, test is timed).")
@click.option("--batches", default="1,32,256", show_default=True, help="Comma-separated batch sizes.")
@click.option("--repeats", type=click.IntRange(1), default=None, help="Timed calls per variant and batch (default: 300/100/40 by batch size).")
@click.option("--warmup", type=click.IntRange(0), default=None, help="Warm-up calls per variant and batch.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Alternating pairs of fresh processes that time (a) and (b); each takes 1/rounds of the calls.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True, help="Intra-op threads for onnxruntime AND torch.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Fit on the first N training images only.")
@click.option("--calib-limit", type=click.IntRange(20), default=None, help="Calibrate on the first N valid images only.")
@click.option("--quick", is_flag=True, help="Few repeats (a smoke run for tests; not for numbers).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the full result as JSON.")
@click.option("--markdown", "md_path", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the tables as markdown.")
@click.option("--bars", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Judge the result against the 'bench' bars of this file (the project's: tools/bars.json); "
                   "exit status 1 when one fails.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Keep the .onnx files here.")
def bench_command(model_spec, data, batches, repeats, warmup, rounds, threads, limit, calib_limit, quick,
                  json_path, md_path, bars, workdir):
    """Measure what the detector costs on top of the bare model, in ONE run: (a) the bare
    classifier .onnx in onnxruntime, (b) the ufad detector via AnomalySession.run, (c) torch
    eager + hooks + scikit-learn OneClassSVM on the host; plus fit/export time and memory,
    file sizes and the torch-free runtime's start-up and memory."""
    from ..bars import judge, load_bars
    from ..bench.report import print_rich, render_markdown
    from ..bench.run import run_bench

    specs = load_bars(bars, "bench") if bars else None   # a bad file fails before the run
    cfg = BenchConfig(model=model_spec, data=data, batches=_batches(batches), repeats=repeats,
                      warmup=warmup, rounds=rounds, threads=threads, limit=limit, calib_limit=calib_limit,
                      quick=quick, workdir=str(workdir) if workdir else None)
    res = run_bench(cfg, log=lambda s: click.echo(s, err=True))
    if specs is not None:
        res["bars"] = [b.to_json() for b in judge(res, specs)]
    print_rich(res)
    if json_path:
        json_path.write_text(json.dumps(res, indent=1, default=str))
    if md_path:
        md_path.write_text(render_markdown(res) + "\n")
    if not res["agreement"]["ok"]:
        raise click.ClickException(f"(c) and (b) scores disagree: {res['agreement']}")
    failed = [b["name"] for b in res.get("bars", []) if b["pass"] is False]
    if failed:
        click.echo(f"{len(failed)} bar(s) of {bars} failed: {', '.join(failed)} (exit status 1)", err=True)
        sys.exit(1)

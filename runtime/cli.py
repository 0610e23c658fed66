"""The ``ufad`` command line.

    ufad export MODEL --data mnist -o OUT.onnx   # MODEL = package.module:factory
    ufad score OUT.onnx INPUTS.npy --json
    ufad inspect OUT.onnx --json
    ufad demo                                    # reference model end to end
    ufad eval / ufad bench                       # see `ufad eval --help`, `ufad bench --help`

Every user mistake prints one line ``error: ...`` and exits non-zero (never a traceback).
``score`` and ``inspect`` need only numpy + onnxruntime; ``export``, ``demo``, ``eval`` and
``bench`` need the ``export`` extra (torch).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import click

from .errors import DependencyError, UfadError

# Commands that need torch live next to the exporter and load only when called, so
# `ufad score` and `ufad inspect` start fast and work with torch absent.
LAZY_COMMANDS = {
    "export": ("ufad.exporter.cli_export", "export_command"),
    "demo": ("ufad.exporter.demo", "demo_command"),
    "eval": ("ufad.exporter.evaluate_cli", "eval_command"),
    "bench": ("ufad.exporter.bench_cli", "bench_command"),
    "triton": ("ufad.runtime.triton", "triton_command"),
}


def _missing_extra(name: str, err: ImportError) -> DependencyError:
    return DependencyError(
        f"`ufad {name}` needs the export extra ({err.name or err} is missing): "
        "pip install 'ufad[export]' (torch pinned to the CPU wheel)."
    )


class UfadGroup(click.Group):
    """A click group that lazy-loads torch commands and turns UfadError into one line."""

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx, name):
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name]
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as e:
                if e.name and e.name.startswith("ufad."):
                    return None  # command not built in this version
                err = _missing_extra(name, e)

                @click.command(name, context_settings={"ignore_unknown_options": True})
                @click.argument("args", nargs=-1, type=click.UNPROCESSED)
                def missing(args):
                    raise err
                missing.help = f"(unavailable: {err})"
                return missing
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UfadError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except MemoryError:
            click.echo("error: out of memory; lower --batch-size or score fewer inputs at once", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=UfadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ufad")
def main() -> None:
    """ufad: one .onnx file that classifies AND says when the input is garbage
    (out-of-distribution, adversarial or noise)."""


def _fmt_score(s: float) -> str:
    return "inf" if math.isinf(s) else f"{s:.4f}"


@main.command("score")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON lines).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threshold", type=float, default=None, help="Override the calibrated threshold.")
@click.option("--batch-size", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime intra-op threads.")
@click.option("--no-range-check", is_flag=True, help="Score values far outside the model's input range too.")
def score_command(model, inputs, as_json, provider, threshold, batch_size, threads, no_range_check):
    """Score INPUTS (.npy / .npz with array x / image files) with the detector MODEL."""
    from .files import load_inputs
    from .session import AnomalySession

    sess = AnomalySession(model, provider=provider, threads=threads,
                          range_check="off" if no_range_check else "error")
    arrays, sources = load_inputs(inputs, sess.input_spec)
    rows = []
    for arr, src in zip(arrays, sources):
        res = sess.run(arr, threshold=threshold, batch_size=batch_size)
        for rec in res.records():
            rec["source"] = src
            rec["provider"] = res.provider
            rows.append(rec)
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    _print_table(rows, sess.provider)


def _print_table(rows: list[dict], provider: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            verdict = "ANOMALY" if r["is_anomaly"] else "ok"
            click.echo(f"{r['source']}[{r['index']}]\tpred={r['label']}\tscore={r['score']}\t{verdict}")
        return
    table = Table(title=f"ufad verdicts (provider: {provider})")
    for col in ("source", "#", "pred", "score", "threshold", "verdict"):
        table.add_column(col, justify="right" if col in ("#", "score", "threshold") else "left")
    for r in rows:
        s = r["score"] if isinstance(r["score"], str) else _fmt_score(r["score"])
        verdict = "[bold red]ANOMALY[/]" if r["is_anomaly"] else "[green]ok[/]"
        thr = r["threshold"] if isinstance(r["threshold"], str) else f"{r['threshold']:.4f}"  # "inf" when overridden
        table.add_row(Path(r["source"]).name, str(r["index"]), r["label"], s, thr, verdict)
    Console().print(table)
    n_bad = sum(r["is_anomaly"] for r in rows)
    click.echo(f"{n_bad} of {len(rows)} inputs flagged as anomalous")


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def inspect_command(model, as_json):
    """Show a detector's method, layers, classes, input spec, threshold and sizes."""
    from .session import AnomalySession

    sess = AnomalySession(model, provider="cpu")
    d = sess.describe()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    cal = d["calibration"]
    click.echo(f"file        {d['file']} ({d['size_bytes'] / 1e6:.2f} MB, format v{d['format_version']})")
    click.echo(f"method      {d['method']}  {json.dumps({k: v for k, v in d['params'].items() if k in ('nu', 'boundary', 'reduction', 'combine')})}")
    click.echo(f"input       {d['input']['name']} {d['input']['dtype']} {d['input']['shape']} range {d['input']['range']}")
    click.echo(f"classes     {len(d['classes'])}: {', '.join(d['classes'][:12])}")
    click.echo(f"threshold   {d['threshold']:.6g}  (target ID acceptance {cal.get('target_tpr')}, "
               f"{cal.get('n_samples')} calibration samples, source: {cal.get('source')})")
    click.echo("layers")
    for l in d["layers"]:
        click.echo(f"  {l['name']:<24} dim {l['dim']:<5} {l['reduction']:<8} -> {l['output']}")
    click.echo(f"sha256      {d['graph_sha256']} (graph, verified)")
    click.echo(f"producer    {json.dumps(d['producer'])}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

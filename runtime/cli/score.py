"""``ufad score``: score input files with a detector (numpy + onnxruntime only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click


def _fmt_score(s: float | str) -> str:
    if isinstance(s, str):
        return s          # "inf" / "nan" as the JSON spells them
    return "inf" if math.isinf(s) else f"{s:.4f}"


@click.command("score")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per input (JSON lines).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threshold", type=float, default=None, help="Override the calibrated threshold.")
@click.option("--batch-size", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime intra-op threads.")
@click.option("--no-range-check", is_flag=True,
              help="Score image values far outside the model's input range instead of refusing them.")
@click.option("--verify-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ed25519 public key (PEM): refuse MODEL unless it carries a valid signature by it.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Score on Ray Data: INPUTS are folders, globs or files (.npy/.npz/.parquet/images); "
                   "ADDRESS is a cluster (host:port), none: RAY_ADDRESS or a local instance. Needs -o.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --ray: one row per input to OUT (.parquet or .jsonl), summary beside it.")
@click.option("--overwrite", is_flag=True, help="With --ray: replace an existing OUT.")
@click.option("--workers", type=click.IntRange(1), default=None,
              help="With --ray: scoring actors (default: the cluster's CPUs).")
@click.option("--column", default=None, help="With --ray: the array column of Parquet inputs.")
def score_command(model, inputs, as_json, provider, threshold, batch_size, threads, no_range_check, verify_key,
                  ray_address, output, overwrite, workers, column):
    """Score INPUTS (.npy / .npz with array x / image files) with the detector MODEL."""
    if ray_address is not None or output is not None:
        return _score_on_ray(model, inputs, as_json, provider, threshold, batch_size, threads, no_range_check,
                             verify_key, ray_address, output, overwrite, workers, column)
    from ..files import load_inputs
    from ..session import AnomalySession

    sess = AnomalySession(model, provider=provider, threads=threads, verify_key=verify_key,
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


def _score_on_ray(model, sources, as_json, provider, threshold, batch_size, threads, no_range_check, verify_key,
                  address, output, overwrite, workers, column) -> None:
    """``ufad score --ray``: the job of ``ray_batch.score_dataset``; prints its summary."""
    from ..errors import InputError, opt
    from ..ray_batch import score_dataset
    from . import cli_renderer

    if address is None:
        raise InputError(f"{opt('output')} writes the table of a Ray job: add {opt('ray_address', 'ADDRESS')} "
                         f"(or --ray alone for a local one), or use {opt('as_json')} and redirect the output")
    if output is None:
        raise InputError(f"a Ray job writes its rows to a file: add {opt('output', 'OUT.parquet')}")
    summary = score_dataset(model, list(sources), output, address=address or None, overwrite=overwrite,
                            batch_size=batch_size, workers=workers, threads=threads, threshold=threshold,
                            provider=provider, range_check="off" if no_range_check else "error",
                            verify_key=verify_key, column=column, progress=not as_json,
                            renderer=cli_renderer(score_command),
                            echo=None if as_json else lambda text: click.echo(text, err=True))
    if as_json:
        click.echo(json.dumps(summary, indent=2))


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
        verdict = "[bold red]ANOMALY[/]" if r["is_anomaly"] else "[green]ok[/]"
        if r.get("out_of_range_input"):
            verdict += " (out of range)"
        elif r.get("nonfinite_input"):
            verdict += " (NaN/Inf)"
        table.add_row(Path(r["source"]).name, str(r["index"]), r["label"], _fmt_score(r["score"]),
                      _fmt_score(r["threshold"]), verdict)
    Console().print(table)
    n_bad = sum(r["is_anomaly"] for r in rows)
    click.echo(f"{n_bad} of {len(rows)} inputs flagged as anomalous")

"""``ufad inspect``: what a detector file holds (numpy + onnxruntime only)."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def inspect_command(model, as_json):
    """Show a detector's method, layers, classes, input spec, threshold and sizes."""
    from ..session import AnomalySession

    sess = AnomalySession(model, provider="cpu")
    d = sess.describe()
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
        return
    cal = d["calibration"]
    inp = d["input"]
    classes = d["classes"]
    click.echo(f"file        {d['file']} ({d['size_bytes'] / 1e6:.2f} MB, format v{d['format_version']})")
    click.echo(f"method      {d['method']}  {json.dumps({k: v for k, v in d['params'].items() if k in ('nu', 'boundary', 'reduction', 'combine')})}")
    ids = inp["dtype"] == "int64"
    rng = inp["range"]
    shown = f"[{int(rng[0])}, {int(rng[1])}] (ids seen at fit)" if ids and rng else rng
    click.echo(f"input       {inp['name']} {inp['dtype']} {inp['shape']} range {shown}")
    click.echo(f"range rule  {inp['range_policy']}: " + ("ids outside the range are " if ids else
                                                         "values far outside the range are ")
               + ("refused (a scaling mistake)" if inp["range_policy"] == "refuse" and not ids else
                  "refused" if inp["range_policy"] == "refuse" else "scored and flagged anomalous"))
    click.echo(f"classes     {len(classes)}: {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}")
    click.echo(f"threshold   {d['threshold']:.6g}  (target ID acceptance {cal.get('target_tpr')}, "
               f"{cal.get('n_samples')} calibration samples, source: {cal.get('source')})")
    click.echo("layers")
    for l in d["layers"]:
        click.echo(f"  {l['name']:<24} dim {l['dim']:<5} {l['reduction']:<8} -> {l['output']}")
    click.echo(f"sha256      graph {d['graph_sha256']} (verified)")
    if d["format_version"] >= 2:
        click.echo(f"            content {d['content_sha256']} (metadata and header, verified)")
    else:
        click.echo("            format v1: the metadata is NOT covered by an integrity check; re-export")
    click.echo(f"signature   {'present (check it with: ufad verify FILE --key KEY.pub)' if d['signed'] else 'none'}")
    click.echo(f"producer    {json.dumps(d['producer'])}")

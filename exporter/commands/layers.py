"""``ufad layers``: every module a detector could tap, with its output, and the automatic choice."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ufad.runtime.errors import ExportError, InputError, opt


def _example(data: str | None, input_shape: str | None) -> np.ndarray:
    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.split(","))
        except ValueError:
            raise InputError(f"{opt('input_shape')} must be comma-separated integers such as 3,32,32, "
                             f"got {input_shape!r}") from None
        return np.random.default_rng(0).uniform(0, 1, (2, *shape)).astype(np.float32)
    if not data:
        raise InputError(f"pass {opt('data')} (a dataset name or an .npz with x) or {opt('input_shape')} "
                         "so the model can be run once.")
    from ..data import load_data

    x, _, _ = load_data(data, "train", 2)
    return x[:2]


@click.command("layers")
@click.argument("model_spec", metavar="MODEL")
@click.option("--data", default=None, help="ID data to probe with: built-in dataset or an .npz with x, y.")
@click.option("--input-shape", default=None, help="Or the shape of one input, e.g. 3,32,32.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--logits", default=None, metavar="INDEX|KEY", help="Which output holds the logits.")
@click.option("--all", "show_all", is_flag=True, help="Also list lone activations, norms, pools and dropout.")
def layers_command(model_spec, data, input_shape, weights, logits, show_all):
    """List the modules of MODEL (package.module:factory; this RUNS that code) with their
    output shape and kind, and mark the layers ufad export picks automatically (*)."""
    import torch
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..graph_models import is_a, module_type
    from ..model_kinds import eager_model
    from ..model_loading import load_factory, load_weights
    from ..outputs import parse_key
    from ..auto_layers import choose
    from ..taps import DEFAULTS, LONE_OPS, PROBE_SAMPLES, is_time_major, resolve_taps

    x = _example(data, input_shape)
    model = eager_model(load_factory(model_spec))
    if weights:
        load_weights(model, weights)
    model.eval()
    try:
        c = choose(model, torch.from_numpy(x), parse_key(logits))
    except ExportError as e:
        if input_shape and "integer ids" in e.raw:   # the made-up example is float32
            raise InputError(f"{e.raw} With {opt('input_shape')} the example input is float32: for a model "
                             f"that reads ids, pass {opt('data')} with an .npz whose x holds integer ids.") from None
        raise
    chosen = c.layers
    # the automatic taps as the detector resolves them (an RNN read over time: "gru:tokens_max")
    taps = resolve_taps(model, chosen, torch.from_numpy(x), records=c.records)
    picked = {t.module: t.reduction for t in taps if t.point == "output"}
    # Text, not a str: a spec such as pkg:cancer must not become markup or an emoji
    table = Table(title=Text(f"{model_spec}: {c.family} (automatic: {', '.join(chosen) or 'none'}; the uniform "
                             "detector adds @sqrt_softmax and @energy)"))
    for col in ("", "module", "type", "output", "kind", "reduction"):
        table.add_column(col, overflow="fold")   # long module names wrap, never cut to "bert.enc…"
    seen = set()
    for r in sorted(c.records, key=lambda r: r.order):
        if r.name in seen or (not show_all and is_a(r.module, LONE_OPS) and r.name not in picked):
            continue
        seen.add(r.name)
        kind, shape = r.kind or "-", r.out_type
        if r.out_shape:
            major = r.kind in ("tokens", "sequence") and is_time_major(r.module, r.out_shape, min(len(x), PROBE_SAMPLES))
            shape = "x".join(str(d) for i, d in enumerate(r.out_shape) if i != (1 if major else 0))
            kind += " (time-major)" if major else ""
        table.add_row("*" if r.name in picked else "", r.name, module_type(r.module).__name__, shape,
                      kind, picked.get(r.name) or DEFAULTS.get(r.kind or "", "-"))
    for t in taps:
        if t.point == "input":
            head = t.spec == c.penultimate
            table.add_row("*", t.spec, "(input of the head)" if head else f"(input of {t.module})", "",
                          "vector" if t.reduction == "none" else "tokens", t.reduction)
    Console().print(table)

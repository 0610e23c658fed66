"""``ufad export``: fit a detector on ID data and write one .onnx file."""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from ufad.runtime.errors import ExportError, InputError, opt
from ufad.runtime.files import check_output_path

from .. import registry
from ..data import calibration_split, input_array, load_data
from ..onnx_export import PARITY_RTOL


def _check_inputs(path: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    """--check-data: an .npy, or an .npz with x, of inputs shaped like the fitting data."""
    from ufad.runtime.files import load_inputs
    from ufad.runtime.format import InputSpec

    spec = InputSpec("input", (None, *sample_shape), "float32", None)
    arrays, _ = load_inputs([path], spec)
    x = input_array(arrays[0])
    if x.shape[1:] != tuple(sample_shape):
        raise InputError(f"--check-data {path}: inputs of shape {x.shape[1:]}, the data has {tuple(sample_shape)}")
    return x[:512]


@click.command("export")
@click.argument("model_spec", metavar="MODEL")
@click.option("--data", required=True, help="ID data: built-in dataset (mnist, fashion_mnist) or an .npz with x, y.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="State dict (.safetensors, or .pt loaded with weights_only=True).")
@click.option("--calib-data", default=None, help="Held-out ID data for the threshold (default: the dataset's valid split; for an .npz, a seeded stratified 20%).")
@click.option("--method", default="uniform", show_default=True, help="Detector (uniform or a baseline).")
@click.option("--layers", default=None, help="Comma-separated module names to monitor, @sqrt_softmax for the output layer (default: automatic).")
@click.option("--reduction", default="max", show_default=True, type=click.Choice(["mean", "max", "flatten"]))
@click.option("--logits", default=None, metavar="INDEX|KEY",
              help="Which part of the model's output holds the logits, when it returns a tuple / dict / object.")
@click.option("--range-policy", default="auto", show_default=True, type=click.Choice(["auto", "refuse", "flag"]),
              help="Inputs far outside the data's value range: refuse them (images: a scaling mistake) or "
                   "flag them anomalous (feature vectors). auto: refuse for [C, H, W] inputs, else flag.")
@click.option("--tpr", default=0.95, show_default=True, type=float, help="Fraction of held-out ID data accepted.")
@click.option("--limit", default=None, type=int, help="Use only the first N fitting samples.")
@click.option("--simplify", is_flag=True, help="Run onnxsim, kept only if verified.")
@click.option("--check-data", default=None,
              help="Inputs (.npy, or .npz with x) for the torch-vs-onnxruntime parity check (default: 192 "
                   "held-out ID inputs; 32 noise inputs are always added).")
@click.option("--parity-rtol", default=PARITY_RTOL, show_default=True, type=float,
              help="Largest float difference the parity check accepts, relative to each output's magnitude.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--verbose", is_flag=True, help="Print torch.export's full log (when the model does not trace).")
def export_command(model_spec, data, output, weights, calib_data, method, layers, reduction, logits,
                   range_policy, tpr, limit, simplify, check_data, parity_rtol, seed, quiet, verbose,
                   **method_options):
    """Fit a detector for MODEL (package.module:factory; this RUNS that code) on ID data
    and write it as one self-contained .onnx file. Method options (below --quiet) come from
    the detectors themselves; each says which methods take it."""
    import torch

    from ..data import check_tpr
    from ..model_loading import load_factory, load_weights

    cls = registry.get(method)
    # Everything that can be known up front fails before the model, the data or the fit.
    own = {o.name for o in cls.all_options()}
    given = {k: v for k, v in method_options.items() if v is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        takes = registry.all_options()
        raise ExportError("; ".join(
            f"{opt(k)} is an option of {', '.join(takes[k][1])}, not of {method}" for k in foreign)
            + f". Drop it, or choose {opt('method')} accordingly.")
    check_tpr(tpr)
    if limit is not None and limit < 1:
        raise ExportError(f"{opt('limit')} must be >= 1, got {limit}")
    check_output_path(output, "-o/--output")
    for path in (data, calib_data):
        if path and Path(path).suffix == ".npz" and not Path(path).is_file():
            raise InputError(f"{path}: no such file")
    t0 = time.time()
    model = load_factory(model_spec)
    if weights:
        load_weights(model, weights)
    model.eval()
    kwargs = dict(seed=seed, progress=not quiet, reduction=reduction, logits=logits,
                  range_policy=range_policy, **given)
    layer_list = [l.strip() for l in layers.split(",") if l.strip()] if layers else None
    # Built before the data loads so bad layers / options fail fast; classes come later.
    det = cls(model, layer_list, **kwargs)
    x, y, classes = load_data(data, "train", limit)
    det.class_names = None if classes is None else [str(c) for c in classes]
    if calib_data:
        xc, _, _ = load_data(calib_data, "valid", None)
    elif Path(data).suffix == ".npz":
        fit_idx, cal_idx = calibration_split(y, 0.2, seed)
        x, y, xc = x[fit_idx], y[fit_idx], x[cal_idx]
    else:
        xc, _, _ = load_data(data, "valid", None)
    torch.manual_seed(seed)
    det.fit(x, y)
    det.calibrate(xc, tpr=tpr, source=f"{calib_data or data} held-out split ({len(xc)} samples)")
    check = _check_inputs(check_data, x.shape[1:]) if check_data else xc[:192]
    rep = det.export(output, simplify=simplify, check_inputs=check, parity_rtol=parity_rtol, verbose=verbose)
    extra = det.layer_score_names()[len(det.layers):] if det.layers else []   # e.g. a consistency column
    click.echo(
        f"wrote {rep.path} ({rep.size_bytes / 1e6:.2f} MB): method={method} layers={det.layers} "
        f"{f'+ columns {extra} ' if extra else ''}"
        f"threshold={det.threshold:.4f} (ID accept {det.calibration.accepted:.3f} on held-out data), "
        f"torch/onnxruntime parity {rep.parity_max_rel_diff:.2e} on {rep.parity_samples} ID inputs "
        f"({rep.parity_noise_max_rel_diff:.2e} on noise; the model's own float32 error "
        f"{rep.model_float32_error:.1e})"
        f"{', simplified' if rep.simplified else ''}; {time.time() - t0:.1f} s"
    )
    for note in rep.notes:
        click.echo(f"note: {note}")


def _add_method_options(command: click.Command) -> click.Command:
    """One flag per option any registered detector declares (default: the detector's own)."""
    for name, (o, methods) in registry.all_options().items():
        defaults = ", ".join(f"{m}: {registry.get(m).option(name).default}" for m in methods)
        command.params.append(click.Option(
            [o.flag, name], type=o.type, default=None,
            help=f"{o.help[:1].upper()}{o.help[1:]} ({defaults})."))
    return command


_add_method_options(export_command)

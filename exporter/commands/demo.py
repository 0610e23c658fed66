"""``ufad demo``: the whole product on the built-in default, end to end.

Fits the uniform detector for the reference MNIST CNN on real MNIST, exports it as one .onnx
file (once; reused afterwards), then scores a handful of real digits, Fashion-MNIST items,
noise images and FGSM adversarial digits through the torch-free runtime and prints a table.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np


def fgsm(model, x: np.ndarray, y: np.ndarray, eps: float = 0.1) -> np.ndarray:
    """Successful one-step FGSM attacks (the evaluation's own attack) on correctly classified inputs."""
    from ..eval.attacks import run_attack

    res = run_attack("fgsm", model, x, y, eps=eps)
    return res.x_adv[res.success]


def demo_inputs(model, seed: int = 0) -> list[tuple[str, str, np.ndarray]]:
    """(kind, description, image [1,28,28]) for a few ID, OOD, noise and adversarial inputs."""
    from ufad.models import datasets

    rng = np.random.default_rng(seed)
    xt, yt = datasets.load("mnist", "test")
    items: list[tuple[str, str, np.ndarray]] = []
    for i in rng.choice(len(xt), 6, replace=False):
        items.append(("ID", f"MNIST digit {yt[i]}", xt[i]))
    try:
        xf, yf = datasets.load("fashion_mnist", "test")
        names = datasets.class_names("fashion_mnist")
        for i in rng.choice(len(xf), 4, replace=False):
            items.append(("OOD", f"Fashion-MNIST {names[yf[i]]}", xf[i]))
    except datasets.DatasetMissingError as e:
        click.echo(f"note: skipping Fashion-MNIST ({e})")
    shape = (1, 28, 28)
    items.append(("NS", "uniform noise", rng.uniform(0, 1, shape).astype(np.float32)))
    items.append(("NS", "Gaussian noise", np.clip(rng.normal(0.5, 0.25, shape), 0, 1).astype(np.float32)))
    sp = (rng.random(shape) < 0.1).astype(np.float32)
    items.append(("NS", "salt-and-pepper", sp))
    items.append(("NS", "constant grey", np.full(shape, 0.5, np.float32)))
    # Adversarial: FGSM eps 0.1 on correctly classified digits; keep successful ones.
    from ..eval.attacks import run_attack

    idx = rng.choice(len(xt), 64, replace=False)
    res = run_attack("fgsm", model, xt[idx], yt[idx], eps=0.1)
    for j in np.flatnonzero(res.success)[:4]:
        items.append(("AD", f"FGSM(eps=0.1) of a {yt[idx][j]}", res.x_adv[j]))
    return items


def _rates(sess, model) -> str:
    """The same verdicts on whole sets, so a handful of rows is not read as the whole story."""
    from ufad.models import datasets

    rng = np.random.default_rng(1)
    xt, yt = datasets.load("mnist", "test")
    lines = [f"On whole sets: {np.mean(~sess.run(xt).is_anomaly):.1%} of the 10000 MNIST test digits accepted"]
    try:
        xf, _ = datasets.load("fashion_mnist", "test")
        lines.append(f"{np.mean(sess.run(xf).is_anomaly):.1%} of 10000 Fashion-MNIST items flagged")
    except datasets.DatasetMissingError:
        pass
    noise = rng.uniform(0, 1, (1000, 1, 28, 28)).astype(np.float32)
    lines.append(f"{np.mean(sess.run(noise).is_anomaly):.1%} of 1000 uniform-noise images flagged")
    xa = fgsm(model, xt[:1000], yt[:1000], 0.1)
    lines.append(f"{np.mean(sess.run(xa).is_anomaly):.1%} of {len(xa)} successful FGSM(eps=0.1) attacks flagged")
    return "; ".join(lines) + "."


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ufad-demo"),
              show_default=True, help="Where the detector and inputs are written.")
@click.option("--refit", is_flag=True, help="Refit and re-export even if the detector exists.")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--fit-samples", type=click.IntRange(1000, 50000), default=50000, show_default=True,
              help="Fit on the first N MNIST training images (fewer: faster, a little less accurate).")
def demo_command(out: Path, refit: bool, provider: str, fit_samples: int) -> None:
    """Export the reference MNIST detector and score digits, Fashion-MNIST, noise and
    adversarial inputs with it."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from ufad.models import datasets, mnist_cnn
    from ufad.runtime import AnomalySession
    from ufad.runtime.files import check_output_path

    from ..detectors import UniformDetector

    torch.manual_seed(0)
    console = Console()
    model = mnist_cnn.pretrained()
    path = out / ("mnist_cnn.onnx" if fit_samples == 50000 else f"mnist_cnn_{fit_samples}.onnx")
    if refit or not path.exists():
        check_output_path(path, "--out")
        t0 = time.time()
        x, y = datasets.load("mnist", "train")
        x, y = x[:fit_samples], y[:fit_samples]
        xv, _ = datasets.load("mnist", "valid")
        console.print(f"Fitting the uniform detector on {len(x)} real MNIST training images ...")
        det = UniformDetector(model, class_names=datasets.class_names("mnist")).fit(x, y)
        det.calibrate(xv, source="mnist valid split (10000 held-out images)")
        check = np.concatenate([xv[:192], np.random.default_rng(0).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32)])
        rep = det.export(path, check_inputs=check)
        console.print(f"Exported {path} ({rep.size_bytes / 1e6:.2f} MB) in {time.time() - t0:.1f} s; "
                      f"torch vs onnxruntime max rel. diff {rep.parity_max_rel_diff:.1e}")
    else:
        console.print(f"Using the existing {path} (--refit to rebuild)")
    sess = AnomalySession(path, provider=provider)
    items = demo_inputs(model)
    batch = np.stack([im for _, _, im in items]).astype(np.float32)
    np.save(out / "demo_inputs.npy", batch)
    res = sess.run(batch)
    table = Table(title=f"ufad verdicts - threshold {res.threshold:.3f} (calibrated: 95% of held-out MNIST accepted), "
                        f"provider {res.provider}")
    for col in ("kind", "input", "pred", "score", "verdict"):
        table.add_column(col, justify="right" if col == "score" else "left")
    for (kind, desc, _), label, s, bad in zip(items, res.labels, res.score, res.is_anomaly):
        right = (kind == "ID") != bool(bad)
        verdict = ("[bold red]ANOMALY[/]" if bad else "[green]ok[/]") + ("" if right else "  [yellow](miss)[/]")
        table.add_row(kind, desc, label, f"{s:.2f}", verdict)
    console.print(table)
    console.print("kinds: ID = in-distribution (should be ok), OOD = other dataset, NS = noise, "
                  "AD = adversarial (all should be ANOMALY)")
    console.print(_rates(sess, model))
    console.print(f"Try it yourself: ufad score {path} {out / 'demo_inputs.npy'} --json ; ufad inspect {path}")

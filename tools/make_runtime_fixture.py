"""Build the files the torch-free runtime tests run on (tests/runtime/data/).

    python tools/make_runtime_fixture.py          # needs the export extra and the datasets

- ``mnist_small.onnx``: the uniform detector of the reference MNIST CNN, fitted on the first
  5000 training images (100 points per class), calibrated on 2000 held-out ones: a real
  detector of a real model, small enough to commit (~2 MB) and load in milliseconds.
- ``tabular_small.onnx``: the uniform detector of an MLP trained on standardised
  breast-cancer features (scikit-learn's bundled data): a feature-vector model, range
  policy "flag".
- ``digits.npy`` / ``digit_labels.npy``: the first 256 MNIST test digits and their labels,
  ``fashion.npy``: 64 Fashion-MNIST test items, ``tabular.npy``: 100 held-out breast-cancer
  rows, so the runtime tier needs no dataset package.

Deterministic: the same versions of torch / onnx / ufad write the same bytes.
tests/exporter/test_runtime_fixture.py checks the committed files match the current format.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "runtime" / "data"


def mnist_small(out: Path) -> None:
    from ufad.exporter import UniformDetector
    from ufad.models import datasets, mnist_cnn

    x, y = datasets.load("mnist", "train")
    xv, _ = datasets.load("mnist", "valid")
    xt, yt = datasets.load("mnist", "test")
    xf, _ = datasets.load("fashion_mnist", "test")
    det = UniformDetector(mnist_cnn.pretrained(), max_points=100, progress=False,
                          class_names=datasets.class_names("mnist"))
    det.fit(x[:5000], y[:5000]).calibrate(xv[:2000], source="mnist valid split (2000 held-out images)")
    det.export(out / "mnist_small.onnx", check_inputs=xv[:128])
    np.save(out / "digits.npy", xt[:256])
    np.save(out / "digit_labels.npy", yt[:256])
    np.save(out / "fashion.npy", xf[:64])


def tabular_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2))


def tabular_small(out: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    from ufad.exporter import UniformDetector

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    torch.manual_seed(0)
    model = tabular_mlp()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.tensor(x[:380]), torch.tensor(y[:380])
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    det = UniformDetector(model, ["1", "3", "@sqrt_softmax"], progress=False,
                          class_names=["malignant", "benign"])
    det.fit(x[:380], y[:380]).calibrate(x[380:469], source="breast cancer held-out rows (89)")
    det.export(out / "tabular_small.onnx", check_inputs=x[380:469])
    np.save(out / "tabular.npy", x[469:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    mnist_small(args.out)
    tabular_small(args.out)
    for p in sorted(args.out.iterdir()):
        print(f"{p} {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

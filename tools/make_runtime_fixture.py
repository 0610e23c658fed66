"""Build the files the torch-free runtime tests run on (tests/runtime/data/).

    python tools/make_runtime_fixture.py          # needs the export extra and the datasets

- ``mnist_small.onnx``: the uniform detector of the reference MNIST CNN, fitted on the first
  5000 training images (100 points per class), calibrated on 2000 held-out ones: a real
  detector of a real model, small enough to commit (~2 MB) and load in milliseconds.
- ``tabular_small.onnx``: the uniform detector of an MLP trained on standardised
  breast-cancer features (scikit-learn's bundled data): a feature-vector model, range
  policy "flag".
- ``tokens_small.onnx``: the uniform detector of a model that reads integer ids (an
  embedding, then an MLP) trained on scikit-learn's digits read as 64 tokens (pixel counts
  0..16): an int64-input file; ``tokens.npy``: 100 held-out digits as ids.
- ``digits.npy`` / ``digit_labels.npy``: the first 256 MNIST test digits and their labels,
  ``fashion.npy``: 64 Fashion-MNIST test items, ``tabular.npy``: 100 held-out breast-cancer
  rows, so the runtime tier needs no dataset package.

Deterministic: the same versions of torch / onnx / ufad write the same bytes.
``mnist_small.onnx`` carries the ``input_ok`` output; ``tabular_small.onnx`` and
``tokens_small.onnx`` were written before it existed and are kept so: they cover the
runtime's own value check for such files (``tests/test_input_ok.py`` says if one is rebuilt).
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


class TokenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(17, 4)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(ids)))


def train_token_mlp(x: np.ndarray, y: np.ndarray, epochs: int = 20) -> TokenMLP:
    """A TokenMLP trained on ids ``x`` (int64 [N, 64]) and labels ``y``, seeded, in eval mode."""
    torch.manual_seed(0)
    model = TokenMLP()
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(epochs):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    return model.eval()


def tokens_small(out: Path) -> None:
    from sklearn.datasets import load_digits

    from ufad.exporter import UniformDetector

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm].astype(np.int64), y[perm]
    model = train_token_mlp(x[:1200], y[:1200])
    det = UniformDetector(model, max_points=60, progress=False)
    det.fit(x[:1200], y[:1200]).calibrate(x[1200:1600], source="digits held-out rows (400)")
    det.export(out / "tokens_small.onnx", check_inputs=x[1200:1392])
    np.save(out / "tokens.npy", x[1600:1700])


FIXTURES = {"mnist_small": mnist_small, "tabular_small": tabular_small, "tokens_small": tokens_small}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", choices=sorted(FIXTURES), action="append",
                    help="build only this fixture (repeatable); default: all")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for name in args.only or FIXTURES:
        FIXTURES[name](args.out)
    for p in sorted(args.out.iterdir()):
        print(f"{p} {p.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

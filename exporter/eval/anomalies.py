"""The anomaly sets of the evaluation, all built offline from real data or seeded noise.

Kinds (the paper's three anomaly types, plus two controls):
- ``OOD``: real images from another distribution: the other 28x28 dataset (Fashion-MNIST
  for an MNIST model, MNIST for a Fashion-MNIST model), scikit-learn's 8x8 digits upscaled
  to the MNIST format (OOD only for a non-digit model), and random crops of the two bundled
  scikit-learn photos (grayscale natural-image patches).
- ``NS``: synthetic noise: uniform, Gaussian, salt-and-pepper (binary), constant images, and
  two with ID-like pixel statistics (ID images with their pixels shuffled; per-pixel Gaussian
  with the ID training mean and std).
- ``AD``: adversarial examples (built in ``evaluate`` with ``attacks``).
- ``shift`` (reported, not averaged into any type): sklearn digits for a digit model: the
  same classes at low resolution, a covariate shift rather than OOD.
- ``benign`` (control, must NOT be flagged): ID images + Gaussian noise (sigma 0.05) that the
  model still classifies correctly.

Every set is float32 ``[N, 1, 28, 28]`` clipped to ``[0, 1]``. ``split="test"`` builds the sets
reported in results; ``split="valid"`` builds disjoint ones (other sources / halves / seeds) for
any tuning, so that no choice is ever made on the test anomalies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ufad.models import datasets

OTHER = {"mnist": "fashion_mnist", "fashion_mnist": "mnist"}
DIGIT_DATASETS = {"mnist"}
KINDS = ("OOD", "AD", "NS")


@dataclass
class AnomalySet:
    """One named set of inputs with its kind and a one-line description."""

    name: str
    kind: str
    x: np.ndarray
    description: str
    y: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _rng(seed: int, split: str, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, 0 if split == "test" else 1, salt])


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    import torch
    from torch.nn import functional as F

    t = torch.as_tensor(x, dtype=torch.float32)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True).numpy()


def _subsample(x: np.ndarray, n: int | None, rng: np.random.Generator) -> np.ndarray:
    if n is None or n >= len(x):
        return x
    return x[np.sort(rng.choice(len(x), n, replace=False))]


def sklearn_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1797 8x8 digits in the MNIST format (20x20 digit centred in 28x28, white on
    black). ``test`` = odd indices, ``valid`` = even indices."""
    from sklearn.datasets import load_digits

    d = load_digits()
    sel = slice(1, None, 2) if split == "test" else slice(0, None, 2)
    x = (d.images[sel] / 16.0).astype(np.float32)[:, None]
    x = np.pad(_resize(x, 20), ((0, 0), (0, 0), (4, 4), (4, 4)))
    return np.clip(x, 0, 1).astype(np.float32), d.target[sel].astype(np.int64)


def photo_patches(split: str, n: int, seed: int) -> np.ndarray:
    """Random square crops (side 28..160 px) of one sklearn sample photo, grayscale, resized
    to 28x28. ``test`` crops flower.jpg, ``valid`` crops china.jpg."""
    from sklearn.datasets import load_sample_images

    imgs = load_sample_images()
    name = "flower.jpg" if split == "test" else "china.jpg"
    img = next(im for im, f in zip(imgs.images, imgs.filenames) if f.endswith(name))
    gray = (img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    rng = _rng(seed, split, 11)
    h, w = gray.shape
    out = np.empty((n, 1, 28, 28), np.float32)
    for i in range(n):
        s = int(rng.integers(28, 161))
        r, c = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out[i] = _resize(gray[None, None, r:r + s, c:c + s], 28)[0]
    return np.clip(out, 0, 1)


def ood_sets(id_dataset: str, split: str = "test", n: int | None = None, seed: int = 0) -> list[AnomalySet]:
    """OOD (and covariate-shift) sets for a model trained on ``id_dataset``."""
    other = OTHER[id_dataset]
    rng = _rng(seed, split, 1)
    xo, _ = datasets.load(other, "test" if split == "test" else "valid")
    sets = [AnomalySet(other, "OOD", _subsample(xo, n, rng),
                       f"{other} {'test' if split == 'test' else 'valid'} split (real, other dataset)")]
    xd, yd = sklearn_digits(split)
    idx = np.sort(rng.choice(len(xd), min(n or len(xd), len(xd)), replace=False))
    kind = "shift" if id_dataset in DIGIT_DATASETS else "OOD"
    sets.append(AnomalySet("sklearn_digits", kind, xd[idx], "sklearn 8x8 digits upscaled to 20x20 in 28x28"
                           + (" (same classes: covariate shift)" if kind == "shift" else ""), y=yd[idx]))
    sets.append(AnomalySet("photo_patches", "OOD", photo_patches(split, min(n or 2000, 2000), seed),
                           "random crops of an sklearn sample photo, grayscale, resized to 28x28"))
    return sets


def noise_sets(x_train: np.ndarray, x_ref: np.ndarray, split: str = "test", n: int = 2000,
               seed: int = 0) -> list[AnomalySet]:
    """Synthetic noise sets. ``x_train`` gives per-pixel ID statistics; ``x_ref`` are the ID
    images whose pixels get shuffled (use the ID evaluation images of the same split)."""
    shape = (n, *x_train.shape[1:])
    rng = _rng(seed, split, 2)
    mean, std = x_train.mean(0), x_train.std(0)
    p = rng.uniform(0.05, 0.5, size=(n, 1, 1, 1))
    ref = x_ref[rng.choice(len(x_ref), n, replace=len(x_ref) < n)].reshape(n, -1)
    shuffled = np.take_along_axis(ref, rng.permuted(np.tile(np.arange(ref.shape[1]), (n, 1)), axis=1), axis=1)
    raw = [
        ("uniform_noise", rng.uniform(0, 1, shape), "U(0, 1) per pixel"),
        ("gaussian_noise", rng.normal(0.5, 0.25, shape), "N(0.5, 0.25^2) per pixel, clipped"),
        ("salt_pepper", (rng.uniform(0, 1, shape) < p).astype(np.float32),
         "binary images: each pixel 1 with probability p ~ U(0.05, 0.5)"),
        ("constant", np.broadcast_to(rng.uniform(0, 1, (n, 1, 1, 1)), shape), "one value U(0, 1) per image"),
        ("pixel_shuffle", shuffled.reshape(shape), "ID images with their pixels randomly permuted (ID histogram)"),
        ("id_pixel_gaussian", rng.normal(mean, std, shape), "per-pixel N(ID mean, ID std), clipped"),
    ]
    return [AnomalySet(name, "NS", np.clip(x, 0, 1).astype(np.float32), desc) for name, x, desc in raw]


def benign_set(model, x: np.ndarray, y: np.ndarray, sigma: float = 0.05, split: str = "test",
               seed: int = 0) -> AnomalySet:
    """ID images + N(0, sigma^2) noise, kept only where the model still predicts the label."""
    import torch

    rng = _rng(seed, split, 3)
    xb = np.clip(x + rng.normal(0, sigma, x.shape), 0, 1).astype(np.float32)
    with torch.no_grad():
        pred = np.concatenate([model(torch.from_numpy(xb[i:i + 1000])).argmax(1).numpy()
                               for i in range(0, len(xb), 1000)])
    keep = pred == y
    return AnomalySet(f"benign_gauss_{sigma:g}", "benign", xb[keep],
                      f"ID images + N(0, {sigma:g}^2) noise still classified correctly (control: should be accepted)",
                      y=y[keep], info={"kept": int(keep.sum()), "of": int(len(x))})

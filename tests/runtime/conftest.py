"""The runtime tier: numpy + onnxruntime only, no torch, no onnx, no dataset packages.

Its detector is committed (``data/``, written by ``tools/make_runtime_fixture.py``): a real
uniform detector of the reference MNIST CNN (fitted on 5000 images, 100 points per class) and
one of a tabular MLP, with real test inputs. These fixtures override the exporter tier's
(``exported_path``, ``session``, ``mnist``), so the tests read the same either way and never
wait for a fit. Every test here is marked ``runtime`` (``pytest -m runtime``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ufad.runtime import AnomalySession

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def exported_path() -> Path:
    """The committed MNIST detector (read-only: copy it before editing)."""
    return DATA / "mnist_small.onnx"


@pytest.fixture(scope="session")
def session(exported_path) -> AnomalySession:
    return AnomalySession(exported_path, provider="cpu")


@pytest.fixture(scope="session")
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The committed real MNIST test digits, spelt like the exporter tier's fixture."""
    return {"test": (np.load(DATA / "digits.npy"), np.load(DATA / "digit_labels.npy"))}


@pytest.fixture(scope="session")
def fashion() -> np.ndarray:
    return np.load(DATA / "fashion.npy")


@pytest.fixture(scope="session")
def tabular_path() -> Path:
    return DATA / "tabular_small.onnx"


@pytest.fixture(scope="session")
def tabular() -> np.ndarray:
    return np.load(DATA / "tabular.npy")

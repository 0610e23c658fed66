"""Shared fixtures of the exporter tier: the real reference model, real MNIST splits, one
exported detector.

Fitting the uniform detector on the full 50k MNIST training split and exporting it takes
~40 s on 2 cores; it is done once per test session, only when a test asks for it. Nothing here
imports torch at collection time, so the runtime tier (tests/runtime/, marked ``runtime``)
collects and runs where torch is absent; its own conftest overrides ``exported_path``,
``session`` and ``mnist`` with a committed small detector.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

RUNTIME_DIR = Path(__file__).resolve().parent / "runtime"
# Under pytest-xdist each worker gets its share of the cores: with a torch pool per worker on
# every core, 2 workers on 2 cores spun twice the CPU time and were no faster than one run.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, (os.cpu_count() or 2) // WORKERS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_configure(config):
    # torchvision from the package index cannot load its compiled ops beside the CPU torch;
    # make its (and timm's) model code importable before anything imports it (pytorch-ood).
    import importlib.util

    if importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision"):
        from vision_imports import import_torchvision

        import_torchvision()


# Under pytest-xdist (``-n auto --dist loadgroup``, the README's test command) every test that
# needs the 50k-image reference fit runs on one worker, so the fit is built once; the other
# tests go by file, so a module's fixtures are built once too.
REFERENCE_FIT = {"fitted_detector", "exported_path", "session"}


@pytest.hookimpl(tryfirst=True)   # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {}
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if RUNTIME_DIR in path.parents:
            item.add_marker(pytest.mark.runtime)
            groups[item.nodeid] = str(path)
        else:
            groups[item.nodeid] = "reference-fit" if REFERENCE_FIT & set(item.fixturenames) else str(path)
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    if WORKERS > 1:
        # The reference-fit group is the longest unit (~2 min): scheduled first, the other
        # workers fill in around it instead of one worker starting it last.
        items.sort(key=lambda it: groups[it.nodeid] != "reference-fit")


def _torch():
    return pytest.importorskip("torch", reason="the exporter tier needs torch (pip install '.[export]')")


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST splits: dict of (x, y) for train / valid / test."""
    from ufad.models import datasets

    return {s: datasets.load("mnist", s) for s in ("train", "valid", "test")}


@pytest.fixture(scope="session")
def fashion_test():
    from ufad.models import datasets

    return datasets.load("fashion_mnist", "test")


@pytest.fixture(scope="session")
def reference_model():
    from ufad.models import mnist_cnn

    _torch().set_num_threads(THREADS)
    return mnist_cnn.pretrained()


@pytest.fixture(scope="session")
def fitted_detector(reference_model, mnist):
    """UniformDetector fitted on all 50k MNIST train images, calibrated on the 10k valid split."""
    _torch()
    from ufad.exporter import UniformDetector

    x, y = mnist["train"]
    xv, _ = mnist["valid"]
    det = UniformDetector(reference_model, progress=False, class_names=[str(i) for i in range(10)])
    return det.fit(x, y).calibrate(xv, source="mnist valid")


@pytest.fixture(scope="session")
def exported_path(fitted_detector, mnist, tmp_path_factory):
    """Path of the reference detector exported to .onnx (verified at export)."""
    xv, _ = mnist["valid"]
    path = tmp_path_factory.mktemp("export") / "mnist_cnn.onnx"
    rng = np.random.default_rng(0)
    check = np.concatenate([xv[:192], rng.uniform(0, 1, (64, 1, 28, 28)).astype(np.float32)])
    fitted_detector.export(path, check_inputs=check)
    return path


@pytest.fixture(scope="session")
def session(exported_path):
    """An AnomalySession (CPU) on the exported reference detector."""
    from ufad.runtime import AnomalySession

    return AnomalySession(exported_path, provider="cpu")

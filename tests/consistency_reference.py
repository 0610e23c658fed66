"""Shared by the consistency and contrast tests: an independent recomputation of the
consistency column's raw value from a file's own activations (each class's ridge regression
solved as one stacked least-squares problem, not the normal equations the exporter solves, on
the region points the detector kept), and the fitted, exported detector they check."""

from __future__ import annotations

import numpy as np


def ridge(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """min ||[a 1] W - b||^2 + alpha ||W||^2 by least squares on the stacked system."""
    a1 = np.c_[a, np.ones(len(a))]
    return np.linalg.lstsq(np.r_[a1, np.sqrt(alpha) * np.eye(a1.shape[1])],
                           np.r_[b, np.zeros((a1.shape[1], b.shape[1]))], rcond=None)[0]


def consistency_raw(points: dict, src: int, dst: int, alpha: float,
                    a: np.ndarray, b: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """||standardized b - ridge prediction from standardized a||^2 under each row's predicted
    class; ``points``: the detector's ``fit_points_`` (class -> per-tap arrays), ``src`` / ``dst``
    their tap indices, ``a`` / ``b`` the file's activations at those taps."""
    classes = sorted(points)
    a_all = np.concatenate([points[c][src] for c in classes]).astype(np.float64)
    b_all = np.concatenate([points[c][dst] for c in classes]).astype(np.float64)
    ma, sa, mb, sb = a_all.mean(0), a_all.std(0) + 1e-6, b_all.mean(0), b_all.std(0) + 1e-6
    coef = {c: ridge((points[c][src] - ma) / sa, (points[c][dst] - mb) / sb, alpha) for c in classes}
    a, b = (a.astype(np.float64) - ma) / sa, (b.astype(np.float64) - mb) / sb
    return np.array([np.sum((b[i] - np.r_[a[i], 1.0] @ coef[int(c)]) ** 2) for i, c in enumerate(pred)])


def fit_export_probe(model, mnist: dict, fashion_test, folder, seed: int, **options):
    """The uniform detector with ``options`` on 6000 MNIST training images (under ``max_points``
    per class: the columns are matched out of fold), calibrated, exported to ``folder``; its
    runtime session; and probe inputs: 300 MNIST test digits, 200 Fashion-MNIST items, 50
    uniform-noise images."""
    from ufad.exporter import UniformDetector
    from ufad.runtime import AnomalySession

    x, y = mnist["train"]
    det = UniformDetector(model, progress=False, **options)
    det.fit(x[:6000], y[:6000]).calibrate(mnist["valid"][0][:3000])
    det.export(folder / "d.onnx")
    rng = np.random.default_rng(seed)
    probe = np.concatenate([mnist["test"][0][:300], fashion_test[0][:200],
                            rng.uniform(0, 1, (50, 1, 28, 28)).astype(np.float32)])
    return det, AnomalySession(folder / "d.onnx", provider="cpu"), probe

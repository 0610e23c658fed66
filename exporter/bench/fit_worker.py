"""Fit + calibrate + export exactly as ``ufad export`` does, in a fresh process so that its
wall time, CPU time and peak RSS are its own:
``python -m ufad.exporter.bench.fit_worker CONFIG.json``. Writes ``fit_result.json`` (the
timings and the detector's fitted parameters) and ``fit_data.npz`` (the feature maps and the
points every region was fitted on, so that (c) can refit scikit-learn on the same data)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def main(cfg_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    out = Path(cfg["out_dir"])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(cfg["threads"])
    from ..data import load_data
    from ..detectors.uniform import UniformDetector
    from ..detectors.uniform_head import ScoreLayerRegions
    from ..model_loading import load_factory

    model = load_factory(cfg["model"]).eval()
    x, y, classes = load_data(cfg["data"], "train", cfg["limit"])
    xc, _, _ = load_data(cfg["data"], "valid", cfg["calib_limit"])
    t1 = time.perf_counter()
    c0 = time.process_time()
    det = UniformDetector(model, class_names=classes, seed=cfg["seed"], max_points=cfg["max_points"],
                          progress=False)
    torch.manual_seed(cfg["seed"])
    det.fit(x, y)
    t2 = time.perf_counter()
    det.calibrate(xc, source=f"{cfg['data']} valid")
    t3 = time.perf_counter()
    rng = np.random.default_rng(cfg["seed"])
    noise = (rng.integers(int(x.min()), int(x.max()), size=(64, *x.shape[1:]), endpoint=True)
             if x.dtype.kind == "i" else rng.uniform(float(x.min()), float(x.max()), size=(64, *x.shape[1:])))
    check = np.concatenate([xc[:192], noise.astype(x.dtype)])
    rep = det.export(out / "detector.onnx", check_inputs=check)
    t4 = time.perf_counter()
    cpu = time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # before anything extra
    arrays: dict[str, np.ndarray] = {}
    for li, fmap in enumerate(det.feature_maps_):
        arrays[f"mean_{li}"], arrays[f"transform_{li}"] = fmap.mean, fmap.transform
        for c, points in det.fit_points_.items():
            arrays[f"kept_{li}_{c}"] = points[li]
    np.savez(out / "fit_data.npz", **arrays)
    params = det.params()
    result = {
        "n_train": int(len(x)), "n_calib": int(len(xc)),
        "load_s": t1 - t0, "fit_s": t2 - t1, "calibrate_s": t3 - t2, "export_s": t4 - t3,
        "total_s": t4 - t1, "cpu_s": cpu, "peak_rss_mb": peak_mb,
        "parity_max_rel_diff": rep.parity_max_rel_diff, "threshold": det.threshold,
        "layers": det.layers, "reduction": det.reduction, "num_classes": det.num_classes,
        "nu": det.nu, "gammas": [None if g is None else float(g) for g in det.gammas_], "dims": det.dims,
        "classes": det.class_names, "support_vectors": params["support_vectors"],
        # a score layer's centre and scale are the detector's (one for all classes), not refitted
        "score_layers": {str(li): [float(det.centres_[li, 0]), float(det.scales_[li, 0])]
                         for li, r in enumerate(det.head().regions) if isinstance(r, ScoreLayerRegions)},
    }
    (out / "fit_result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])

"""Which map, at which spatial resolution, should the consistency regression read? Offline, on
VALIDATION sets (docs/design.md, session 21).

    python tools/offline_maps.py --cache /tmp/om            # ~10 min on 2 cores, ~4 GB of RAM

Fits the Fashion-MNIST setup's uniform detector without a consistency column on the train split,
exports it and scores the ID validation halves and the validation anomaly sets of
``tools/sweep.py`` through onnxruntime (its layer scores are the base columns). The torch model's
unreduced maps (stem .. layer3, penultimate, logits) of the same images and of the train split
are hooked directly. For each candidate source (a map reduced on a grid of cells, a spatial max or
mean, a whole map), a per-class ridge regression to the penultimate features is fitted on the
correctly classified training images (standardized features; the penalty scaled to 1000
points per class), its squared residual mapped like ``@energy`` (held-out ID median and 95%
quantile on those of the base columns' max) and max-ed with them, reported as
``offline_columns.py`` reports its candidates (alone and max-ed: mean AUROC per kind, higher
score = more anomalous, anomaly positive; the benign false alarms at a threshold accepting 95%
of held-out ID). Then, for the chosen source: rank-r
truncations of each class's regression, and the runner-up contrast of the layer3 regression
(log residual under the predicted class minus under the runner-up) beside it.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from offline_columns import _mapped, _report
from sweep import _sets
from ufad.exporter.eval import evaluate as ev

SETUP = "fashion_resnet"
MAPS = {"stem": (24, 28), "layer1": (32, 14), "layer2": (64, 7), "layer3": (128, 4)}   # channels, side


def _base(cache: Path, model, dataset, data, sets) -> dict:
    """The detector without a consistency column: layer scores and predictions per set."""
    path = cache / "offline_maps_base.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    from ufad.exporter.detectors import DETECTORS
    from ufad.models import datasets
    from ufad.runtime import AnomalySession

    kw = {**ev.setup_options(SETUP).get("uniform", {}), "consistency": "none"}
    det = DETECTORS["uniform"](model, kw.pop("layers", None), class_names=datasets.class_names(dataset),
                               progress=True, seed=0, **kw)
    det.fit(data["x_fit"], data["y_fit"])
    det.calibrate(data["x_cal"], tpr=0.95)
    det.export(cache / "offline_maps_base.onnx")
    sess = AnomalySession(cache / "offline_maps_base.onnx", provider="cpu", threads=2)
    out = {}
    for name, x, kind in [("CAL", data["x_cal"], "cal"), ("ID", data["x_id"], "id")] + [(s.name, s.x, s.kind) for s in sets]:
        r = sess.run(x)
        out[name] = {"kind": kind, "ls": r.layer_scores.astype(np.float64), "pred": r.pred}
    path.write_bytes(pickle.dumps(out))
    return out


def _maps(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """The model's unreduced block outputs, flattened, and its logits (float32)."""
    import torch

    feats: dict[str, list[np.ndarray]] = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, i, o, n=n: feats.setdefault(n, []).append(o.detach().flatten(1).numpy()))
        for n in (*MAPS, "penultimate")]
    logits = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), 1000):
                logits.append(model(torch.as_tensor(x[i:i + 1000])).numpy())
    finally:
        for h in hooks:
            h.remove()
    return {"logits": np.concatenate(logits), **{k: np.concatenate(v) for k, v in feats.items()}}


def _source(m: dict[str, np.ndarray], spec: str) -> np.ndarray:
    """``block:gridK`` / ``block:max`` / ``block:mean`` / ``block`` (the whole map) of a set's maps."""
    import torch
    from torch.nn import functional as F

    block, _, how = spec.partition(":")
    c, side = MAPS[block]
    t = m[block].reshape(-1, c, side, side)
    if how.startswith("grid"):
        return F.adaptive_avg_pool2d(torch.from_numpy(t), int(how[4:])).flatten(1).numpy()
    if how in ("max", "mean"):
        return t.max((2, 3)) if how == "max" else t.mean((2, 3))
    return m[block]


class Regression:
    """Per-class ridge from a source to the penultimate features (standardized; penalty
    ``alpha`` at 1000 points per class, scaled with the class's count); ``rank``: each class's
    coefficients truncated to their leading singular directions."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, y: np.ndarray, alpha: float, rank: int = 0):
        self.mx, self.sx = src.mean(0), src.std(0) + 1e-6
        self.my, self.sy = dst.mean(0), dst.std(0) + 1e-6
        self.w, self.b = [], []
        for c in range(int(y.max()) + 1):
            xs, ys = (src[y == c] - self.mx) / self.sx, (dst[y == c] - self.my) / self.sy
            xm, ym = xs.mean(0), ys.mean(0)
            xc, yc = xs - xm, ys - ym
            w = np.linalg.solve(xc.T @ xc + alpha * len(xc) / 1000 * np.eye(xc.shape[1]), xc.T @ yc)
            if rank:
                u, s, vt = np.linalg.svd(w, full_matrices=False)
                w = (u[:, :rank] * s[:rank]) @ vt[:rank]
            self.w.append(w)
            self.b.append(ym - xm @ w)

    def residual(self, src: np.ndarray, dst: np.ndarray, cls: np.ndarray) -> np.ndarray:
        xs, ys = (src - self.mx) / self.sx, (dst - self.my) / self.sy
        r = np.empty(len(cls))
        for c in np.unique(cls):
            m = cls == c
            e = ys[m] - (xs[m] @ self.w[c] + self.b[c])
            r[m] = (e * e).sum(1)
        return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="folder for the built sets and the base detector's outputs")
    p.add_argument("--points", type=int, default=0, help="fitting points per class (default: every correctly classified one)")
    a = p.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    model, dataset, data, sets = _sets(SETUP, 0, a.cache)
    base = _base(a.cache, model, dataset, data, sets)
    fit = _maps(model, data["x_fit"])
    ok = fit["logits"].argmax(1) == data["y_fit"]
    if a.points:
        rng, keep = np.random.default_rng(0), np.zeros(len(ok), bool)
        for c in np.unique(data["y_fit"]):
            idx = np.flatnonzero(ok & (data["y_fit"] == c))
            keep[rng.choice(idx, min(a.points, len(idx)), replace=False)] = True
        ok = keep
    y = data["y_fit"][ok]
    maps = {"CAL": _maps(model, data["x_cal"]), "ID": _maps(model, data["x_id"])}
    maps.update({s.name: _maps(model, s.x) for s in sets})
    out = {n: {"kind": d["kind"], "score": d["ls"].max(1)} for n, d in base.items()}
    rows = slice(len(out["CAL"]["score"]) * 7 // 10, None)   # the CAL rows the columns are mapped on
    _report("no consistency column", out, {n: d["score"] for n, d in out.items()}, rows)

    def column(spec: str, alpha: float, rank: int = 0) -> dict[str, np.ndarray]:
        reg = Regression(_source(fit, spec)[ok], fit["penultimate"][ok], y, alpha, rank)
        return {n: reg.residual(_source(m, spec), m["penultimate"], base[n]["pred"]) for n, m in maps.items()}

    for spec, alpha in [("layer3:max", 8), ("layer3:mean", 10), ("layer3:grid2", 10), ("layer3", 10),
                        ("layer2:grid2", 10), ("layer2:grid4", 10), ("layer2", 10),
                        ("layer1:grid4", 30), ("layer1:grid7", 30), ("layer1:grid7", 100), ("layer1:grid7", 300),
                        ("layer1", 100), ("layer1", 1000)]:
        _report(f"{spec} -> penultimate, penalty {alpha}", out, column(spec, alpha), rows)
    for rank in (64, 32, 16):
        _report(f"layer1:grid7, penalty 98, rank {rank}", out, column("layer1:grid7", 98, rank), rows)
    grid = column("layer1:grid7", 98)
    reg = Regression(_source(fit, "layer3:max")[ok], fit["penultimate"][ok], y, 8.0)

    def contrast(m: dict[str, np.ndarray]) -> np.ndarray:
        order = np.argsort(-m["logits"], axis=1)
        src = _source(m, "layer3:max")
        return (np.log(reg.residual(src, m["penultimate"], order[:, 0]) + 1e-9)
                - np.log(reg.residual(src, m["penultimate"], order[:, 1]) + 1e-9))

    _report("layer1:grid7, penalty 98", out, grid, rows)
    # both columns mapped onto the base columns' max, then all max-ed
    score = {n: d["score"] for n, d in out.items()}
    g, c = _mapped(grid, score, rows), _mapped({n: contrast(m) for n, m in maps.items()}, score, rows)
    both = {n: {**d, "score": np.maximum(np.maximum(d["score"], g[n]), c[n])} for n, d in out.items()}
    _report("layer1:grid7 + runner-up contrast (layer3)", both, {n: d["score"] for n, d in both.items()}, rows)


if __name__ == "__main__":
    main()

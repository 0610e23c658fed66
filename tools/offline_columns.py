"""Try a candidate score column offline, on VALIDATION sets, before building it into the graph.

    python tools/offline_columns.py --setup fashion_resnet --cache /tmp/oc

Fits the setup's shipped uniform detector (its ``DETECTOR_OPTIONS``) on the train split,
exports it, and scores the ID validation halves and the validation anomaly sets of
``tools/sweep.py`` through onnxruntime (cached in ``--cache``). Each candidate column is then
mapped the way ``@energy`` is (its median and 95% quantile on held-out ID put on those of the
shipped score) and max-ed with the shipped score. Prints mean AUROC per kind (higher score =
more anomalous; anomaly positive), the candidate alone, and the benign false alarms at a
threshold accepting 95% of held-out ID. Candidates: confidence columns from the logits (MSP,
logit margin, entropy), class-agnostic cosine kNN over the taps' activations, and layer
agreement probes (a logistic regression from an earlier tap to the model's own prediction,
fitted on ID with no labels; column = -log p_probe(predicted class)), and kNN distances
conditioned on the prediction (to the predicted class's correctly classified training points,
or to those whose top two classes are the input's, in the whitened penultimate space), and the
runner-up contrast of the consistency regression (does an earlier tap's evidence fit the
runner-up class better than the predicted one?).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

from sweep import _sets
from ufad.exporter.eval import evaluate as ev, metrics

Q = (0.5, 0.95)


def _outputs(setup: str, cache: Path) -> dict:
    path = cache / f"offline_outputs_{setup}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    from ufad.exporter.detectors import DETECTORS
    from ufad.models import datasets
    from ufad.runtime import AnomalySession

    model, dataset, data, sets = _sets(setup, 0, cache)
    kw = dict(ev.setup_options(setup).get("uniform", {}))
    det = DETECTORS["uniform"](model, kw.pop("layers", None), class_names=datasets.class_names(dataset),
                               progress=True, seed=0, **kw)
    det.fit(data["x_fit"], data["y_fit"])
    det.calibrate(data["x_cal"], tpr=0.95)
    onnx = cache / f"offline_{setup}.onnx"
    det.export(onnx, check_inputs=ev._check_inputs(data, 0))
    sess = AnomalySession(onnx, provider="cpu", threads=2)
    out = {}
    for name, x, kind in [("CAL", data["x_cal"], "cal"), ("ID", data["x_id"], "id")] + [(s.name, s.x, s.kind) for s in sets]:
        r = sess.run(x, activations=True)
        out[name] = {"kind": kind, "score": r.score.astype(np.float64), "logits": r.logits.astype(np.float64),
                     "acts": {k: v.astype(np.float64) for k, v in r.activations.items()}}
    path.write_bytes(pickle.dumps(out))
    return out


def _fit_outputs(setup: str, cache: Path) -> dict:
    """The shipped detector's logits and activations on the whole train split, with labels."""
    path = cache / f"offline_fit_{setup}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    from ufad.models import datasets
    from ufad.runtime import AnomalySession

    x, y = datasets.load(ev.load_setup(setup)[1], "train")
    sess = AnomalySession(cache / f"offline_{setup}.onnx", provider="cpu", threads=2)
    runs = [sess.run(x[i:i + 1000], activations=True) for i in range(0, len(x), 1000)]
    out = {"y": y, "logits": np.concatenate([r.logits for r in runs]).astype(np.float64),
           "acts": {k: np.concatenate([r.activations[k] for r in runs]).astype(np.float64) for k in runs[0].activations}}
    path.write_bytes(pickle.dumps(out))
    return out


def _conditional_knn(out: dict, fit: dict, taps: list[str], k: int, pair: bool, per_class: int = 2000) -> dict[str, np.ndarray]:
    """Distance to the k-th nearest correctly classified training point of the predicted class
    (``pair``: of the same top-two classes, where >= 4k such points exist), after whitening
    with the class-centred tied covariance (as the shipped penultimate layer is)."""
    def feats(d):
        return np.concatenate([d["acts"][f"act_{t}"] for t in taps], axis=1)

    def top2(logits):
        order = np.argsort(-logits, axis=1)
        return order[:, 0], order[:, 1]
    ok = fit["logits"].argmax(1) == fit["y"]
    f, (p, r) = feats(fit)[ok], top2(fit["logits"][ok])
    classes = range(fit["logits"].shape[1])
    centred = f - np.stack([f[p == c].mean(0) for c in classes])[p]
    cov = centred.T @ centred / len(f)
    w, v = np.linalg.eigh(cov + 0.01 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    a = v / np.sqrt(w)
    wf = f @ a
    rng = np.random.default_rng(0)
    banks = {c: wf[p == c][rng.permutation(int((p == c).sum()))[:per_class]] for c in classes}

    def kth(x, bank):
        d2 = (x ** 2).sum(1)[:, None] - 2 * x @ bank.T + (bank ** 2).sum(1)[None]
        return np.sqrt(np.maximum(np.sort(d2, axis=1)[:, k - 1], 0.0))
    cols = {}
    for n, d in out.items():
        x, (pd, rd) = feats(d) @ a, top2(d["logits"])
        col = np.zeros(len(x))
        for c in classes:
            for c2 in (classes if pair else [None]):
                rows = (pd == c) & ((rd == c2) if pair else True)
                if rows.any():
                    same = (p == c) & (r == c2) if pair else None
                    bank = wf[same] if pair and same.sum() >= 4 * k else banks[c]
                    col[rows] = kth(x[rows], bank)
        cols[n] = col
    return cols


def _runner_up_contrast(out: dict, fit: dict, src: list[str], alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Does the earlier taps' evidence fit the runner-up class better than the predicted one?
    Per-class ridge (``alpha``, standardized features, correctly classified training points)
    from the ``src`` taps to the penultimate tap, as the shipped consistency column fits it;
    column = log residual under the predicted class - log residual under the runner-up."""
    acts, y, logits = fit["acts"], fit["y"], fit["logits"]
    ok = logits.argmax(1) == y
    xs_all = np.concatenate([acts[f"act_{t}"] for t in src], 1)
    target = acts["act_" + [t for t in out["ID"]["acts"] if not t.startswith("act__")][-1][len("act_"):]]
    mx, sx = xs_all[ok].mean(0), xs_all[ok].std(0) + 1e-6
    my, sy = target[ok].mean(0), target[ok].std(0) + 1e-6
    w, b = [], []
    for c in range(logits.shape[1]):
        m = ok & (y == c)
        xs, ys = (xs_all[m] - mx) / sx, (target[m] - my) / sy
        xc, yc = xs - xs.mean(0), ys - ys.mean(0)
        w.append(np.linalg.solve(xc.T @ xc + alpha * np.eye(xc.shape[1]), xc.T @ yc))
        b.append(ys.mean(0) - xs.mean(0) @ w[-1])
    w, b = np.stack(w), np.stack(b)
    pen = [t for t in out["ID"]["acts"] if not t.startswith("act__")][-1]

    def log_resid(d: dict, cls: np.ndarray) -> np.ndarray:
        xs = (np.concatenate([d["acts"][f"act_{t}"] for t in src], 1) - mx) / sx
        r = (d["acts"][pen] - my) / sy - (np.einsum("nd,nde->ne", xs, w[cls]) + b[cls])
        return np.log((r * r).sum(1) + 1e-9)

    col = {}
    for n, d in out.items():
        order = np.argsort(-d["logits"], axis=1)
        col[n] = log_resid(d, order[:, 0]) - log_resid(d, order[:, 1])
    return col


def _confidence(d: dict) -> dict[str, np.ndarray]:
    z = d["logits"] - d["logits"].max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    zs = np.sort(d["logits"], 1)
    return {"msp": -p.max(1), "margin": zs[:, -2] - zs[:, -1], "entropy": -(p * np.log(p + 1e-30)).sum(1)}


def _knn(out: dict, taps: list[str], k: int, bank: int) -> dict[str, np.ndarray]:
    def feats(d, rows=slice(None)):
        return np.concatenate([f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
                               for f in (d["acts"][f"act_{t}"][rows] for t in taps)], axis=1)
    ref = feats(out["CAL"], slice(0, bank))
    return {n: -np.sort(feats(d) @ ref.T, axis=1)[:, -k] for n, d in out.items()}


def _probe(out: dict, taps: list[str], bank: int, c: float) -> dict[str, np.ndarray]:
    """-log p(prediction | taps) under a linear probe fitted on the first ``bank`` CAL rows,
    with the model's predictions as labels (DkNN's question: do the earlier layers agree?)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def feats(d, rows=slice(None)):
        return np.concatenate([d["acts"][f"act_{t}"][rows] for t in taps], axis=1)
    scaler = StandardScaler().fit(feats(out["CAL"], slice(0, bank)))
    probe = LogisticRegression(C=c, max_iter=2000).fit(
        scaler.transform(feats(out["CAL"], slice(0, bank))), out["CAL"]["logits"][:bank].argmax(1))
    cols = {}
    for n, d in out.items():
        logp = probe.predict_log_proba(scaler.transform(feats(d)))
        cols[n] = -logp[np.arange(len(logp)), d["logits"].argmax(1)]
    return cols


def _mapped(col: dict[str, np.ndarray], score: dict[str, np.ndarray], mapping_rows: slice) -> dict[str, np.ndarray]:
    """``col`` put on ``score``'s scale the way ``@energy`` is: its median and 95% quantile on
    ``mapping_rows`` of CAL land on those of ``score``."""
    qs, qc = np.quantile(score["CAL"][mapping_rows], Q), np.quantile(col["CAL"][mapping_rows], Q)
    scale = (qc[1] - qc[0]) / (qs[1] - qs[0])
    return {n: (v - qc[0]) / scale + qs[0] for n, v in col.items()}


def _report(label: str, out: dict, col: dict[str, np.ndarray], mapping_rows: slice) -> None:
    """The candidate alone and max-ed with the shipped score (mapped on ``mapping_rows`` of CAL)."""
    mapped = _mapped(col, {n: d["score"] for n, d in out.items()}, mapping_rows)
    for how, f in (("alone", lambda n: col[n]),
                   ("max", lambda n: np.maximum(out[n]["score"], mapped[n]))):
        thr = np.quantile(f("CAL")[mapping_rows], 0.95)
        by_kind: dict[str, list[float]] = {"OOD": [], "AD": [], "NS": []}
        fa = float("nan")
        for n, d in out.items():
            if n in ("CAL", "ID"):
                continue
            if d["kind"] == "benign":
                fa = float(np.mean(f(n) > thr))
            else:
                by_kind[d["kind"]].append(metrics.auroc(f("ID"), f(n)))
        m = {k: float(np.mean(v)) for k, v in by_kind.items()}
        print(f"{label:44s} {how:5s} OOD {m['OOD']:.4f} AD {m['AD']:.4f} NS {m['NS']:.4f} "
              f"overall {np.mean(list(m.values())):.4f} benign FA {fa:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=ev.SETUPS, required=True)
    p.add_argument("--cache", type=Path, required=True, help="folder for the built sets and the detector's outputs")
    a = p.parse_args()
    a.cache.mkdir(parents=True, exist_ok=True)
    out = _outputs(a.setup, a.cache)
    bank = len(out["CAL"]["score"]) * 7 // 10           # kNN bank; the rest of CAL maps the columns
    rows = slice(bank, None)
    _report("shipped detector", out, {n: d["score"] for n, d in out.items()}, rows)
    conf = {n: _confidence(d) for n, d in out.items()}
    for key in ("msp", "margin", "entropy"):
        _report(key, out, {n: c[key] for n, c in conf.items()}, rows)
    taps = [t[len("act_"):] for t in out["ID"]["acts"] if not t.startswith("act__")]
    for chosen in (taps[-1:], taps[-2:], taps):
        for k in (10, 50):
            _report(f"kNN k={k} {chosen}", out, _knn(out, chosen, k, bank), rows)
    for chosen in (taps[-2:-1], taps[-3:-2], taps[-3:-1]):   # the taps before the penultimate
        for c in (0.1, 1.0):
            _report(f"probe C={c} {chosen}", out, _probe(out, chosen, bank, c), rows)
    fit = _fit_outputs(a.setup, a.cache)
    for chosen in (taps[-1:], taps[-2:], taps[-1:] + ["_sqrt_softmax"]):   # penultimate (+ layer3 / output layer)
        for k in (5, 20):
            for pair in (False, True):
                _report(f"{'pair' if pair else 'class'} kNN k={k} {chosen}", out,
                        _conditional_knn(out, fit, chosen, k, pair), rows)
    for src in (taps[-2:-1], taps[-3:-1]):   # layer3 / layer2 + layer3 -> penultimate
        _report(f"runner-up contrast {src}", out, _runner_up_contrast(out, fit, src), rows)


if __name__ == "__main__":
    main()

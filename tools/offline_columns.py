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
fitted on ID with no labels; column = -log p_probe(predicted class)).
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


def _report(label: str, out: dict, col: dict[str, np.ndarray], mapping_rows: slice) -> None:
    """The candidate alone and max-ed with the shipped score (mapped on ``mapping_rows`` of CAL)."""
    cal = out["CAL"]
    qs, qc = np.quantile(cal["score"][mapping_rows], Q), np.quantile(col["CAL"][mapping_rows], Q)
    scale = (qc[1] - qc[0]) / (qs[1] - qs[0])
    for how, f in (("alone", lambda n: col[n]),
                   ("max", lambda n: np.maximum(out[n]["score"], (col[n] - qc[0]) / scale + qs[0]))):
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


if __name__ == "__main__":
    main()

"""Compare settings of a detector on VALIDATION anomaly sets, the way its defaults are chosen.

    python tools/sweep.py --setup fashion_resnet --grid '{"shrinkage": [0.01, 0.1, 1.0]}'
    python tools/sweep.py --setup mnist_cnn --grid '{"whiten": ["penultimate", "none"]}' --json sweep.json

The ID validation split is halved (calibration / ID evaluation), the anomaly sets are the
validation ones of ``ufad eval --split valid`` (attacks on ID valid images, Fashion-MNIST /
MNIST train images as OOD, fresh noise seeds); they are built once (and cached with
``--cache``), then every grid point is fitted on the full train split, calibrated, exported and
scored through onnxruntime, exactly as ``ufad eval`` does. Never tune on ``--split test``.
Prints one row per setting: mean AUROC per kind (higher score = more anomalous, anomaly
positive), benign false alarms vs ID rejection (the benign bar), and the weakest AD sets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

from ufad.exporter.eval import evaluate as ev

SIZES = ev.Sizes(n_fit=None, n_calib=None, n_test=None, n_ood=2000, n_noise=1000, n_attack=500, n_attack_slow=250)


def _sets(setup: str, seed: int, cache: Path | None):
    model, dataset = ev.load_setup(setup)
    data = ev.build_data(model, dataset, SIZES, "valid", seed)
    path = cache / f"sweep_sets_{setup}_{seed}.pkl" if cache else None
    if path is not None and path.exists():
        sets = pickle.loads(path.read_bytes())
    else:
        sets, _ = ev.build_anomaly_sets(model, dataset, data, SIZES, ev.ATTACKS_FULL, "valid", seed, True)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(sets))
    return model, dataset, data, sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", choices=ev.SETUPS, required=True)
    p.add_argument("--detector", default="uniform")
    p.add_argument("--grid", default="{}", help="JSON: option -> list of values (every combination is run)")
    p.add_argument("--base", default="{}", help="JSON: options fixed for every run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="folder to keep the built anomaly sets in")
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    a = p.parse_args()
    from ufad.exporter.detectors import DETECTORS
    from ufad.models import datasets

    grid, base = json.loads(a.grid), json.loads(a.base)
    model, dataset, data, sets = _sets(a.setup, a.seed, a.cache)
    names = datasets.class_names(dataset)
    rows = []
    keys = sorted(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        kw = {**ev.setup_options(a.setup).get(a.detector, {}), **base, **dict(zip(keys, values))}
        t0 = time.time()
        out = ev.run_detector(a.detector, DETECTORS[a.detector], model, names, data, sets,
                              Path(tempfile.gettempdir()) / f"sweep_{a.setup}.onnx", seed=a.seed, threads=2, progress=False,
                              kwargs=dict(kw))
        m, b = out["mean_auroc"], out.get("benign", {})
        ad = sorted((s["auroc"], n) for n, s in out["sets"].items() if s["kind"] == "AD")
        row = {"kwargs": kw, "mean_auroc": m, "benign_false_alarm": b.get("false_alarm_rate"),
               "id_rejection": b.get("id_rejection_rate"), "sets": {n: s["auroc"] for n, s in out["sets"].items()},
               "seconds": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{json.dumps(kw):50s} OOD {m['OOD']:.4f} AD {m['AD']:.4f} NS {m['NS']:.4f} overall {m['overall']:.4f} "
              f"| benign FA {row['benign_false_alarm']:.3f} vs ID rej {row['id_rejection']:.3f} "
              f"| weakest AD {', '.join(f'{n} {v:.3f}' for v, n in ad[:3])} | {row['seconds']:.0f}s", flush=True)
    if a.json:
        a.json.write_text(json.dumps({"setup": a.setup, "detector": a.detector, "split": "valid",
                                      "command": "python tools/sweep.py " + " ".join(sys.argv[1:]), "runs": rows},
                                     indent=1) + "\n")


if __name__ == "__main__":
    main()

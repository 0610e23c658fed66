"""Issue 12: the zoo ResNet-18 with four uniform-detector heads (RBF / ball, whitened or not),
their detection quality and their latency over the bare model (BENCHMARKS.md, session 15).

    python tools/head_variants.py fit  --work /tmp/hv          # train once, fit + export 4 detectors (~3 min)
    python tools/head_variants.py time --work /tmp/hv --rounds 9  # ufad bench's timing, ~3 min per variant

Quality: AUROC (higher score = more anomalous; 500 MNIST test images are the negatives)
against 500 Fashion-MNIST test images and 500 uniform-noise images, and the fractions flagged
at the calibrated threshold. Latency: ``tools/model_table.py``'s ``_time_pair`` (fresh
torch-free processes, bare and detector alternating, the detector through
``AnomalySession.run``), medians at batch 1 and 64.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

VARIANTS = {"rbf_whitened": {}, "rbf_none": {"whiten": "none"},
            "ball_whitened": {"boundary": "ball"}, "ball_none": {"boundary": "ball", "whiten": "none"}}


def fit(work: Path) -> None:
    import test_zoo as tz
    from model_table import _bare

    from ufad.exporter import UniformDetector
    from ufad.runtime import AnomalySession

    x, y, xt, _, xf, noise = tz.zoo_data("resnet18")
    ns: dict = {}
    exec(tz.ZOO, ns)
    torch.manual_seed(0)
    model = tz.train(ns["resnet18"](), x, y, tz.EPOCHS["resnet18"])
    _bare(model, x[:2], work / "bare.onnx")
    cut = int(len(x) * 0.8)
    for name, kw in VARIANTS.items():
        det = UniformDetector(model, progress=False, **kw).fit(x[:cut], y[:cut]).calibrate(x[cut:])
        det.export(work / f"{name}.onnx")
        sess = AnomalySession(work / f"{name}.onnx", provider="cpu")
        s_id, s_noise = sess.run(xt), sess.run(noise)
        print(json.dumps({"variant": name, "layers": det.layers, "kb": (work / f"{name}.onnx").stat().st_size // 1024,
                          "auroc_noise": tz.auroc(s_id.score, s_noise.score),
                          "auroc_fashion": tz.auroc(s_id.score, sess.run(xf).score),
                          "noise_flagged": float(s_noise.is_anomaly.mean()),
                          "id_flagged": float(s_id.is_anomaly.mean())}), flush=True)


def time_variants(work: Path, rounds: int, names: list[str]) -> None:
    import test_zoo as tz
    from model_table import _time_pair

    _, _, xt, _, _, _ = tz.zoo_data("resnet18")
    for name in names:
        tb, td = _time_pair(work / "bare.onnx", work / f"{name}.onnx", xt, None, work, rounds)
        print(json.dumps({"variant": name, "bare_ms": tb, "detector_ms": td,
                          "batch1_ratio": td["1"] / tb["1"], "batch64_ratio": td["64"] / tb["64"]}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["fit", "time"])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    fit(a.work) if a.mode == "fit" else time_variants(a.work, a.rounds, a.variants)

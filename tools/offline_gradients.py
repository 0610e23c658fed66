"""Issue 13, tried and not kept (docs/design.md, session 16): gradient norms as a score column.

    python tools/offline_gradients.py --cache /tmp/oc     # the cache of tools/offline_columns.py

For each VALIDATION input of the Fashion-MNIST ResNet setup (tools/sweep.py's sets), the norm of
the gradient of the predicted class's log-probability with respect to the input (L1, L2) and to
each stage's output (L2): adversarial inputs sit where the model is steep, is the idea (GraN,
Lust & Condurache 2020). Each log-norm is mapped and max-ed with the shipped score exactly as
tools/offline_columns.py maps its candidates, and reported alone and max-ed (mean AUROC per
kind, higher score = more anomalous, anomaly the positive class; benign false alarms at 95%
held-out ID acceptance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from offline_columns import _outputs, _report
from sweep import _sets

STAGES = ("stem", "layer1", "layer2", "layer3", "penultimate")


def gradient_norms(model: torch.nn.Module, x: np.ndarray, batch: int = 500) -> dict[str, np.ndarray]:
    acts: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n in STAGES]
    out: dict[str, list] = {k: [] for k in ("input_l1", "input_l2", *STAGES)}
    try:
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[i:i + batch], np.float32)).requires_grad_(True)
            logits = model(xb)
            logp = torch.log_softmax(logits, 1).gather(1, logits.argmax(1, keepdim=True)).sum()
            grads = torch.autograd.grad(logp, [xb] + [acts[n] for n in STAGES])
            out["input_l1"].append(grads[0].abs().flatten(1).sum(1))
            out["input_l2"].append(grads[0].flatten(1).norm(dim=1))
            for n, g in zip(STAGES, grads[1:]):
                out[n].append(g.flatten(1).norm(dim=1))
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v).detach().numpy().astype(np.float64) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="folder for the built sets and the detector's outputs")
    a = p.parse_args()
    torch.set_num_threads(2)
    out = _outputs("fashion_resnet", a.cache)
    model, _, data, sets = _sets("fashion_resnet", 0, a.cache)
    model.eval()
    xs = {"CAL": data["x_cal"], "ID": data["x_id"], **{s.name: s.x for s in sets}}
    norms = {n: gradient_norms(model, x) for n, x in xs.items()}
    rows = slice(len(out["CAL"]["score"]) * 7 // 10, None)   # offline_columns' mapping rows
    _report("shipped detector", out, {n: d["score"] for n, d in out.items()}, rows)
    for key in norms["ID"]:
        _report(f"gradient norm {key}", out, {n: np.log(norms[n][key] + 1e-20) for n in out}, rows)


if __name__ == "__main__":
    main()

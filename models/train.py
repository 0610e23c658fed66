"""Train a reference model on its real, offline dataset and write its safetensors weights.

    python -m ufad.models.train mnist_cnn            # -> models/mnist_cnn.safetensors
    python -m ufad.models.train fashion_resnet --epochs 22 --threads 1 --log   # 93.3%, ~25 min

Deterministic for a given seed on CPU. Prints test accuracy at the end.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ufad.models import datasets


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            logits = model(torch.from_numpy(x[i:i + batch]))
            correct += int((logits.argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(x)

AUGMENTATIONS = ("shift", "crop_flip", "crop_flip_noise")   # what augment() knows, in one place
LOSSES = ("ce", "rce")


def rce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reverse cross-entropy (Pang et al., NeurIPS 2018, "Towards Robust Detection of Adversarial
    Examples"): softmax(-logits) is trained towards the reversed label (0 on the true class,
    1 / (C - 1) on every other), so the model's own ``logits`` still predict by argmax and the
    non-maximal entries of its softmax are pushed to be uniform on ID data, which makes
    adversarial inputs stand out in the feature space the detector monitors."""
    c = logits.shape[1]
    target = torch.full_like(logits, 1.0 / (c - 1))
    target.scatter_(1, y.view(-1, 1), 0.0)
    return -(target * torch.log_softmax(-logits, dim=1)).sum(dim=1).mean()


def augment(xb: torch.Tensor, rng: np.random.Generator, kind: str) -> torch.Tensor:
    """A training batch, augmented as the model module asks (``AUGMENT``).

    ``"shift"``: one random roll of up to 2 pixels for the whole batch (digits: no flips).
    ``"crop_flip"``: per image, a random 28x28 crop of the 2-pixel zero-padded image and a
    horizontal flip with probability 1/2 (clothing is left/right symmetric).
    ``"crop_flip_noise"``: the same, then half of the images get Gaussian pixel noise of a
    random sigma in [0, 0.1] (clipped to [0, 1]), so that faint sensor noise does not move
    the features the detector monitors.
    """
    if kind == "shift":
        dx, dy = rng.integers(-2, 3, size=2)
        return torch.roll(xb, shifts=(int(dx), int(dy)), dims=(2, 3))
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown AUGMENT {kind!r}; expected one of {', '.join(map(repr, AUGMENTATIONS))}")
    n, _, h, w = xb.shape
    padded = nn.functional.pad(xb, (2, 2, 2, 2))
    off = rng.integers(0, 5, size=(n, 2))
    out = torch.stack([padded[i, :, oy:oy + h, ox:ox + w] for i, (oy, ox) in enumerate(off)])
    flip = torch.from_numpy(rng.random(n) < 0.5)
    out[flip] = out[flip].flip(-1)
    if kind == "crop_flip_noise":
        sigma = torch.from_numpy((rng.random(n) * 0.1 * (rng.random(n) < 0.5)).astype(np.float32))
        noise = torch.from_numpy(rng.standard_normal(out.shape).astype(np.float32))
        out = (out + sigma.view(-1, 1, 1, 1) * noise).clamp(0.0, 1.0)
    return out


def train(name: str, epochs: int, lr: float, batch: int, seed: int, out: Path | None,
          log: bool = False, augment_kind: str | None = None, loss: str | None = None) -> dict:
    """Train model module ``ufad.models.<name>`` and save its weights; returns a summary."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mod = importlib.import_module(f"ufad.models.{name}")
    kind = augment_kind or getattr(mod, "AUGMENT", "shift")
    model = mod.build()
    x, y = datasets.load(mod.DATASET, "train")
    xte, yte = datasets.load(mod.DATASET, "test")
    xva, yva = datasets.load(mod.DATASET, "valid")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_kind = loss or getattr(mod, "LOSS", "ce")
    loss_fn = rce_loss if loss_kind == "rce" else nn.CrossEntropyLoss()
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        bar = tqdm(range(len(x) // batch), desc=f"epoch {epoch + 1}/{epochs}")
        for i in bar:
            idx = order[i * batch:(i + 1) * batch]
            xb = augment(torch.from_numpy(x[idx]), rng, kind)
            loss = loss_fn(model(xb), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if i % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        if log:
            log_line = {"epoch": epoch + 1, "loss": round(loss.item(), 4),
                        "valid_accuracy": evaluate(model, xva, yva), "seconds": round(time.time() - t0, 1)}
            print(json.dumps(log_line), flush=True)
    acc = evaluate(model, xte, yte)
    out = out or Path(mod.__file__).with_name(f"{name}.safetensors")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out))
    summary = {"model": name, "epochs": epochs, "seed": seed, "test_accuracy": acc,
               "train_seconds": round(time.time() - t0, 1), "weights": out.name, "augment": kind,
               "loss": loss_kind}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="module name under ufad.models, e.g. mnist_cnn")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--log", action="store_true", help="print validation accuracy after every epoch")
    p.add_argument("--augment", default=None, choices=AUGMENTATIONS,
                   help="training augmentation (default: the model module's AUGMENT)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="training loss (default: the model module's LOSS, else ce)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (1 is fastest on a busy shared CPU)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(json.dumps(train(a.model, a.epochs, a.lr, a.batch, a.seed, a.out, a.log, a.augment, a.loss), indent=2))


if __name__ == "__main__":
    main()

"""Reference CNN for 28x28 grayscale digits: three conv blocks and an MLP head.

``pretrained()`` returns it with the committed weights (``mnist_cnn.safetensors``, made by
``python -m ufad.models.train mnist_cnn``), in eval mode. Inputs: float32 ``[B,1,28,28]``
in ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("mnist_cnn.safetensors")
DATASET = "mnist"


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class MnistCNN(nn.Module):
    """Conv blocks ``block1`` (32ch, 14x14), ``block2`` (64ch, 7x7), ``block3`` (128ch, 3x3),
    then ``penultimate`` (256-d) and ``classifier`` (10 logits)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(*_conv(1, 32), *_conv(32, 32), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv(64, 128), nn.MaxPool2d(2))
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, 256), nn.ReLU())
        self.dropout = nn.Dropout(0.3)
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.classifier(self.dropout(self.penultimate(x)))


def build() -> MnistCNN:
    """An untrained MnistCNN."""
    return MnistCNN()


def pretrained() -> MnistCNN:
    """The reference MNIST CNN with its committed weights, in eval mode."""
    from safetensors.torch import load_file

    model = MnistCNN()
    model.load_state_dict(load_file(str(WEIGHTS)))
    return model.eval()

"""Reference models and offline datasets.

- ``ufad.models.mnist_cnn:pretrained``: the reference MNIST CNN with committed weights.
- ``ufad.models.datasets``: offline MNIST / Fashion-MNIST loaders (numpy only).
Model modules import torch; ``datasets`` does not.
"""

"""One detector per file. Each registers itself (``registry.py``): adding a detector is adding
a file here (or an ``ufad.detectors`` entry point in another package), nothing else.

All take ``(model, layers=None, **options)``; higher score = more anomalous for all.
``DETECTORS`` is the registry's current view, by method name.
"""

from .energy import EnergyDetector
from .knn import KNNDetector
from .mahalanobis import MahalanobisDetector, MultiLayerMahalanobisDetector
from .maxlogit import MaxLogitDetector
from .msp import MSPDetector
from .uniform import UniformDetector
from .vim import ViMDetector


def __getattr__(name: str):
    if name == "DETECTORS":  # computed when asked, so plugins and new files are included
        from ..registry import detectors

        return detectors()
    raise AttributeError(name)


__all__ = [
    "DETECTORS", "EnergyDetector", "KNNDetector", "MahalanobisDetector", "MaxLogitDetector",
    "MSPDetector", "MultiLayerMahalanobisDetector", "UniformDetector", "ViMDetector",
]

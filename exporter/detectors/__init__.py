"""One detector per file. ``DETECTORS`` maps a method name to its class.

All take ``(model, layers=None, **options)``; higher score = more anomalous for all.
"""

from .energy import EnergyDetector
from .knn import KNNDetector
from .mahalanobis import MahalanobisDetector, MultiLayerMahalanobisDetector
from .maxlogit import MaxLogitDetector
from .msp import MSPDetector
from .uniform import UniformDetector
from .vim import ViMDetector

DETECTORS = {
    "uniform": UniformDetector,
    "msp": MSPDetector,
    "maxlogit": MaxLogitDetector,
    "energy": EnergyDetector,
    "mahalanobis": MahalanobisDetector,
    "mahalanobis_multi": MultiLayerMahalanobisDetector,
    "knn": KNNDetector,
    "vim": ViMDetector,
}

__all__ = [
    "DETECTORS", "EnergyDetector", "KNNDetector", "MahalanobisDetector", "MaxLogitDetector",
    "MSPDetector", "MultiLayerMahalanobisDetector", "UniformDetector", "ViMDetector",
]

"""One detector per file. ``DETECTORS`` maps a method name to its class."""

from .uniform import UniformDetector

DETECTORS = {"uniform": UniformDetector}

__all__ = ["UniformDetector", "DETECTORS"]

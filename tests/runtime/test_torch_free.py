"""The runtime's promise: numpy + onnxruntime only. Every ``ufad.runtime`` module imports and
the CLI scores with torch blocked in the process."""

from __future__ import annotations

import pkgutil

import numpy as np

import ufad.runtime
from torchless import run_without_torch


def test_every_runtime_module_imports_without_torch(tmp_path):
    names = sorted(m.name for m in pkgutil.walk_packages(ufad.runtime.__path__, "ufad.runtime.")
                   if not m.name.endswith("__main__"))
    assert {"ufad.runtime.session", "ufad.runtime.integrity", "ufad.runtime.cli.score"} <= set(names)
    attempts = tmp_path / "attempts.txt"
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + \
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\nprint('ok')"
    proc = run_without_torch(["python", "-c", code], attempts_log=attempts)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
    assert not attempts.exists(), attempts.read_text()


def test_cli_scores_and_inspects_without_torch(exported_path, mnist, tmp_path):
    np.save(tmp_path / "x.npy", mnist["test"][0][:16])
    attempts = tmp_path / "attempts.txt"
    proc = run_without_torch(["python", "-m", "ufad.runtime.cli", "score", str(exported_path),
                              str(tmp_path / "x.npy"), "--json"], attempts_log=attempts)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 16
    proc = run_without_torch(["python", "-m", "ufad.runtime.cli", "inspect", str(exported_path)],
                             attempts_log=attempts)
    assert proc.returncode == 0 and "content" in proc.stdout, proc.stderr
    assert not attempts.exists(), attempts.read_text()

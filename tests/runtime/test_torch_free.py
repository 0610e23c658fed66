"""The runtime's promise: numpy + onnxruntime only. Every ``ufad.runtime`` module imports and
the CLI scores with torch blocked in the process."""

from __future__ import annotations

import pkgutil
import re

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


def test_export_commands_name_the_extra_without_torch(tmp_path):
    """``export``, ``layers``, ``demo``, ``eval`` and ``bench`` need torch: without it each says
    what to install in one line (exit 2), whether torch is imported by the command's module or
    only once the command runs."""
    model = "ufad.models.mnist_cnn:pretrained"
    for args in (["export", model, "--data", "mnist", "-o", str(tmp_path / "d.onnx")], ["layers", model],
                 ["demo", "--out", str(tmp_path / "demo")], ["eval", "-o", str(tmp_path / "eval")],
                 ["bench", "--json", str(tmp_path / "b.json")]):
        proc = run_without_torch(["python", "-m", "ufad.runtime.cli", *args])
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
        # torch here; in a venv with only ufad[cpu] whichever export dependency comes first
        assert len(lines) == 1 and re.fullmatch(
            rf"error: `ufad {args[0]}` needs the export extra \(\S+ is missing\): "
            r"pip install 'ufad\[export\]' \(torch pinned to the CPU wheel\)\.", lines[0]), (args, proc.stderr)
    assert not any(tmp_path.iterdir())

"""Without the ray extra, ``ufad score --ray`` and ``ufad serve`` say what to install, in one
line, and plain ``ufad score`` is untouched (Ray is blocked in the subprocess when installed)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

BLOCK_RAY = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"ray is blocked ({name})", name=name)
sys.meta_path.insert(0, _Block())
from ufad.runtime.cli import main
sys.exit(main())
"""


def _ufad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_RAY, *args], capture_output=True, text=True, timeout=120)


def test_ray_commands_name_the_extra_when_ray_is_missing(exported_path, mnist, tmp_path):
    np.save(tmp_path / "x.npy", mnist["test"][0][:4])
    for args in (["score", str(exported_path), str(tmp_path), "--ray", "-o", str(tmp_path / "o.parquet")],
                 ["serve", str(exported_path)]):
        proc = _ufad(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'ufad[ray]'" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.parquet").exists()
    proc = _ufad("score", str(exported_path), str(tmp_path / "x.npy"), "--json")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 4, proc.stderr


def test_output_without_ray_is_refused_in_cli_words(exported_path, mnist, tmp_path):
    np.save(tmp_path / "x.npy", mnist["test"][0][:4])
    proc = _ufad("score", str(exported_path), str(tmp_path / "x.npy"), "-o", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --output writes the table of a Ray job: add --ray ADDRESS"), proc.stderr

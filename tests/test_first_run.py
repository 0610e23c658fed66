"""The README's first command path, as a new user runs it: the installed ``ufad`` script,
in a subprocess. ``ufad demo`` (on a small fit, so it stays fast) prints its verdict table;
``ufad --help`` lists every command instantly and without torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from torchless import run_without_torch

UFAD = shutil.which("ufad")
pytestmark = pytest.mark.skipif(UFAD is None, reason="the ufad console script is not installed (pip install -e .)")


def test_demo_runs_end_to_end_and_prints_its_table(tmp_path):
    pytest.importorskip("torch")
    env = dict(os.environ, COLUMNS="120", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run([UFAD, "demo", "--out", str(tmp_path / "demo"), "--fit-samples", "3000"],
                          capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Traceback" not in out + proc.stderr
    for row in ("MNIST digit", "Fashion-MNIST", "uniform noise", "Gaussian noise", "FGSM(eps=0.1)"):
        assert row in out, f"{row!r} missing from the demo table:\n{out}"
    rows = [l for l in out.splitlines() if l.startswith("│")]
    assert len(rows) >= 14, out
    flagged = [l for l in rows if "ANOMALY" in l]
    ns = [l for l in rows if "noise" in l or "salt" in l or "constant" in l]
    assert all("ANOMALY" in l for l in ns), "every noise row must be flagged:\n" + "\n".join(ns)
    assert len(flagged) >= 8
    assert "On whole sets" in out and "ufad score" in out
    print(f"ufad demo --fit-samples 3000: {elapsed:.1f} s")


def test_help_is_fast_and_needs_no_torch(tmp_path):
    attempts = tmp_path / "torch_attempts.txt"
    t0 = time.perf_counter()
    proc = run_without_torch([UFAD, "--help"], attempts_log=attempts)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    for name in ("export", "score", "inspect", "demo", "eval", "bench", "sign", "verify", "keygen", "triton"):
        assert f"  {name} " in proc.stdout, proc.stdout
    assert "unavailable" not in proc.stdout
    assert not attempts.exists(), f"--help tried to import {attempts.read_text()}"
    assert elapsed < 1.5, f"ufad --help took {elapsed:.2f} s"
    for cmd in ("score", "inspect", "verify"):
        proc = run_without_torch([UFAD, cmd, "--help"], attempts_log=attempts)
        assert proc.returncode == 0 and "Usage:" in proc.stdout, proc.stderr
    assert not attempts.exists()


def test_torch_commands_say_which_extra_is_missing(tmp_path):
    proc = run_without_torch([UFAD, "export", "ufad.models.mnist_cnn:pretrained", "--data", "mnist", "-o",
                              str(tmp_path / "x.onnx")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "pip install 'ufad[export]'" in proc.stderr
    assert "Traceback" not in proc.stderr

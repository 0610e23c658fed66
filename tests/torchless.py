"""Run a command in a subprocess where torch cannot be imported (tests/support/block_torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BLOCKER = Path(__file__).resolve().parent / "support" / "block_torch"


def env_without_torch(attempts_log: Path | None = None) -> dict[str, str]:
    """os.environ with the torch blocker first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(BLOCKER), *filter(None, [env.get("PYTHONPATH")])])
    if attempts_log is not None:
        env["UFAD_TORCH_ATTEMPTS"] = str(attempts_log)
    return env


def run_without_torch(args: list[str], attempts_log: Path | None = None, timeout: float = 120,
                      **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(args)`` (text, captured) with torch blocked; ``python`` means this one."""
    if args and args[0] == "python":
        args = [sys.executable, *args[1:]]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                          env=env_without_torch(attempts_log), **kwargs)

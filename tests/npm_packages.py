"""Install an example's locked npm packages once, whatever the number of pytest-xdist workers.

``npm ci`` deletes ``node_modules`` before it installs: two workers that both find the folder
empty and both run it would pull the packages from under the tests of the one that finished
first ("Cannot find module 'onnxruntime-node'" on a fresh clone). A lock file serialises them,
and the markers are looked at again once the lock is held."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

#: onnxruntime-node's install script would fetch CUDA binaries from a host we cannot reach
NPM_ENV = {"ONNXRUNTIME_NODE_INSTALL_CUDA": "skip", "ONNXRUNTIME_NODE_INSTALL": "skip"}


def npm_ready(folder: Path, markers: tuple[str, ...], hint: str = "run tools/setup_js.sh") -> None:
    """Skip the test when node / npm are missing or ``npm ci`` fails; otherwise make sure the
    packages ``markers`` are installed in ``folder/node_modules``."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip(f"node / npm not installed (Debian: apt-get install nodejs npm; or {hint})")

    def installed() -> bool:
        return all((folder / "node_modules" / m / "package.json").exists() for m in markers)

    if installed():
        return
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"ufad-npm-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            return
        proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=folder, capture_output=True,
                              text=True, timeout=600, env={**os.environ, **NPM_ENV})
        if proc.returncode != 0:
            pytest.skip(f"npm ci failed in {folder} (registry unreachable?): {proc.stderr.strip()[-400:]}")

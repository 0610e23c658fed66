"""The web page (examples/web, onnxruntime-web WASM) in headless Chromium: a real MNIST test
digit loaded as an image is accepted with the right label, the Noise button's image is
flagged, a stroke drawn with the mouse reads as a "1"; the page's scores equal the Python
runtime's on the same pixels. Saves a screenshot to docs/web_screenshot.png (and to
$UFAD_ARTIFACTS when set).

Skips when node/npm or Chromium (Debian package `chromium`) are missing.
Score differences use the project's parity convention |a - b| / max(1, |b|).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from npm_packages import npm_ready

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "examples" / "web"
SCREENSHOT = ROOT / "docs" / "web_screenshot.png"
REL_TOL = 1e-4


def _chromium() -> str | None:
    for c in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if c and Path(c).exists():
            return c
    return None


@pytest.fixture(scope="session")  # session scope: skip before the slow shared fixtures
def web_ready():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node / npm not installed (run tools/setup_js.sh)")
    if _chromium() is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium; or run tools/setup_js.sh)")
    npm_ready(WEB_DIR, ("onnxruntime-web", "playwright-core"))
    return _chromium()


@pytest.fixture()
def server(web_ready, exported_path):
    """serve.js on a free port, serving the exported detector as model.onnx."""
    proc = subprocess.Popen(["node", "serve.js", "--model", str(exported_path), "--port", "0"], cwd=WEB_DIR,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ufad web demo: http://"), line + proc.stderr.read()
        yield line.split(": ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pick_digit(session, mnist, tmp_path):
    """First MNIST test digit that `ufad score digit.png` accepts and classifies correctly."""
    from PIL import Image

    from ufad.runtime import load_inputs

    xt, yt = mnist["test"]
    for i in range(50):
        png = tmp_path / f"digit_{i}.png"
        # MNIST pixels are k/256; the image loader maps 8-bit v to v/255 * (range width) = v/256.
        Image.fromarray(np.round(xt[i, 0] * 256).clip(0, 255).astype(np.uint8), "L").save(png)
        (arr,), _ = load_inputs([png], session.input_spec)
        res = session.run(arr)
        if res.pred[0] == yt[i] and not res.is_anomaly[0]:
            return png, int(yt[i]), res
    raise AssertionError("no accepted, correctly classified digit among the first 50")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(b))


def test_web_page_digit_accepted_noise_flagged(web_ready, server, session, mnist, tmp_path):
    png, label, ref = _pick_digit(session, mnist, tmp_path)
    shots = tmp_path / "shots"
    shots.mkdir()
    proc = subprocess.run(["node", "e2e.js", "--url", server, "--image", str(png), "--shots", str(shots)],
                          cwd=WEB_DIR, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CHROMIUM": web_ready})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["boot"] == {"ready": True, "error": None, "verified": True}
    assert not [l for l in out["logs"] if l.startswith("pageerror")], out["logs"]

    # A real digit, loaded as an image: right label, accepted; same score as the Python runtime.
    img = out["image"]
    assert img["state"]["error"] is None
    assert img["state"]["source"] == f"file:{png.name}"
    assert img["state"]["pred"] == label and img["dom"]["pred"] == str(label)
    assert img["state"]["is_anomaly"] is False and img["dom"]["anomaly"] == "false"
    assert img["dom"]["verdict"].startswith("OK")
    assert _close(img["state"]["score"], float(ref.score[0])), (img["state"]["score"], ref.score[0])
    assert img["state"]["threshold"] == session.threshold

    # A stricter threshold typed into the page flags the same digit (onnxruntime-web cannot feed
    # the graph's optional threshold input, so the page applies not (score <= threshold)).
    over = out["override"]
    assert over["state"]["source"] == img["state"]["source"] and over["state"]["threshold"] == out["stricter"]
    assert over["state"]["is_anomaly"] is True and over["dom"]["anomaly"] == "true"
    assert over["state"]["score"] == img["state"]["score"]

    # Noise: flagged; the page's own input scored in Python gives the same numbers.
    noise = out["noise"]
    assert noise["state"]["is_anomaly"] is True and noise["dom"]["anomaly"] == "true"
    assert noise["dom"]["verdict"].startswith("ANOMALY")
    x = np.array(noise["state"]["input"], dtype=np.float32).reshape(1, 1, 28, 28)
    lo, hi = session.input_spec.value_range
    assert x.min() >= lo and x.max() <= hi and x.std() > 0.2  # really uniform noise over the range
    r = session.run(x)
    assert noise["state"]["pred"] == int(r.pred[0]) and bool(r.is_anomaly[0])
    assert _close(noise["state"]["score"], float(r.score[0]))
    assert list(noise["state"]["layer_scores"]) == list(session.layer_names)

    # A vertical stroke drawn with the mouse reads as a "1"; its pixels score the same in Python.
    drawn = out["drawn"]
    assert drawn["state"]["source"] == "drawing" and drawn["state"]["pred"] == 1
    xd = np.array(drawn["state"]["input"], dtype=np.float32).reshape(1, 1, 28, 28)
    assert 20 < (xd > 0.5).sum() < 200  # a stroke, not an empty or full field
    assert _close(drawn["state"]["score"], float(session.run(xd).score[0]))

    # Screenshot of the flagged noise (the case the detector is for), small enough to commit.
    from PIL import Image

    for name in ("web_noise.png", "web_screenshot.png"):
        assert (shots / name).stat().st_size > 10_000
    small = Image.open(shots / "web_noise.png").convert("RGB").quantize(colors=64)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    small.save(SCREENSHOT, optimize=True)
    assert SCREENSHOT.stat().st_size < 150_000
    art = os.environ.get("UFAD_ARTIFACTS")
    if art:
        Path(art).mkdir(parents=True, exist_ok=True)
        for name in ("web_noise.png", "web_screenshot.png"):
            shutil.copyfile(shots / name, Path(art) / name)

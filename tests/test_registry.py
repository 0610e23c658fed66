"""Adding a detector is adding one file: a plugin nobody here wrote registers itself through an
``ufad.detectors`` entry point, gets its own ``ufad export`` flag, and exports; options of one
method are refused for another."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("torch")
from ufad.runtime import AnomalySession  # noqa: E402

PLUGIN = textwrap.dedent('''
    """A nearest-class-mean detector: distance of the penultimate features to the mean of the
    predicted class, to the power p."""
    import numpy as np
    import torch
    from torch import nn

    from ufad.exporter.detector import Detector
    from ufad.exporter.registry import Option


    class CentroidHead(nn.Module):
        def __init__(self, means, scale, power):
            super().__init__()
            self.register_buffer("means", torch.tensor(means, dtype=torch.float32))
            self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
            self.power = power

        def forward(self, logits, pred, feats):
            d = ((feats[0] - self.means[pred]) / self.scale).norm(dim=1) ** self.power
            return d, d.unsqueeze(1)


    class CentroidDetector(Detector):
        method = "centroid"
        options = (Option("power", float, 1.0, "exponent of the distance"),)

        def __init__(self, model, layers=None, *, power=1.0, **kwargs):
            super().__init__(model, layers or ["penultimate"], **kwargs)
            self.power = float(power)

        def _fit(self, stream):
            sums, counts, sq = None, None, None
            for _x, y, logits, feats in stream:
                f = feats[0].numpy().astype(np.float64)
                self.num_classes = logits.shape[1]
                if sums is None:
                    sums, counts, sq = np.zeros((self.num_classes, f.shape[1])), np.zeros(self.num_classes), 0.0
                np.add.at(sums, y.numpy(), f)
                counts += np.bincount(y.numpy(), minlength=self.num_classes)
                sq += (f ** 2).sum(0)
            self.dims = [sums.shape[1]]
            self._means = sums / counts[:, None]
            self._scale = np.sqrt(np.maximum(sq / counts.sum() - (sums.sum(0) / counts.sum()) ** 2, 1e-6))

        def head(self):
            return CentroidHead(self._means, self._scale, self.power)

        def params(self):
            return {"power": self.power}
''')


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugin")
    (d / "ufad_t_centroid.py").write_text(PLUGIN)
    info = d / "ufad_t_centroid-0.1.dist-info"   # what `pip install` of the plugin package leaves
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ufad-t-centroid\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ufad.detectors]\ncentroid = ufad_t_centroid\n")
    return d


def _cli(plugin_path, *args, cwd):
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugin_path), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ufad.runtime.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def test_a_plugin_detector_exports_with_its_own_option(plugin_path, tmp_path):
    from ufad.models import datasets

    out = tmp_path / "centroid.onnx"
    xv, yv = datasets.load("mnist", "valid")
    np.savez(tmp_path / "calib.npz", x=xv[:2000], y=yv[:2000])
    proc = _cli(plugin_path, "export", "ufad.models.mnist_cnn:pretrained", "--data", "mnist", "--limit", "3000",
                "--calib-data", "calib.npz", "--method", "centroid", "--power", "2", "-o", str(out), "--quiet",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sess = AnomalySession(out, provider="cpu")
    assert sess.info.method == "centroid" and sess.info.params == {"power": 2.0}
    noise = np.random.default_rng(0).uniform(0, 1, (200, 1, 28, 28)).astype(np.float32)
    assert sess.run(noise).is_anomaly.mean() >= 0.9
    help_text = _cli(plugin_path, "export", "--help", cwd=tmp_path).stdout
    assert "--power" in help_text and "(centroid: 1.0)" in " ".join(help_text.split())


@pytest.mark.parametrize("args, match", [
    (["--method", "centroid", "--nu", "0.2"], "--nu is an option of uniform, not of centroid"),
    (["--method", "uniform", "--power", "3"], "--power is an option of centroid, not of uniform"),
    (["--method", "msp", "--k", "5", "--max-points", "9"],
     "--k is an option of knn, not of msp; --max-points is an option of uniform, mahalanobis_multi, vim"),
])
def test_options_of_another_method_are_refused(plugin_path, tmp_path, args, match):
    proc = _cli(plugin_path, "export", "ufad.models.mnist_cnn:pretrained", "--data", "mnist", "-o",
                str(tmp_path / "x.onnx"), *args, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), proc.stderr
    assert match in err and "--method" in err

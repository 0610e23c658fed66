"""Exporter mistakes raise a clear ExportError, and fail fast: before any long forward pass
or fit (each asserted to take < 2 s, most of them far less), and through ``ufad export``
as one ``error:`` line with a non-zero exit.
"""

from __future__ import annotations

import copy
import pickle
import re
import textwrap
import time
from contextlib import contextmanager

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from ufad.exporter import UniformDetector  # noqa: E402
from ufad.exporter.model_loading import load_factory, load_weights  # noqa: E402
from ufad.runtime.cli import main  # noqa: E402
from ufad.runtime.errors import ExportError  # noqa: E402

FAST_S = 2.0


@contextmanager
def fails_fast(match: str):
    """Expect an ExportError matching ``match`` raised within FAST_S seconds."""
    t0 = time.perf_counter()
    with pytest.raises(ExportError, match=match) as info:
        yield info
    elapsed = time.perf_counter() - t0
    assert elapsed < FAST_S, f"the error came after {elapsed:.1f} s: it must come before long work"


@pytest.fixture(scope="module")
def data(mnist):
    x, y = mnist["train"]
    return x[:3000], y[:3000]


class TupleBlock(nn.Module):
    """A block returning (features, aux): a valid model part, not a monitorable tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return h, h.mean()


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TupleBlock()
        self.head = nn.Linear(4 * 28 * 28, 10)

    def forward(self, x):
        h, _ = self.block(x)
        return self.head(h.flatten(1))


# ------------------------------------------------------------------- Python API
def test_unknown_layer_lists_valid_names(reference_model):
    with fails_fast(r"unknown layer name\(s\) \['block9', 'fc'\]") as e:
        UniformDetector(reference_model, ["block1", "block9", "fc"])
    msg = str(e.value)
    assert "Valid module names:" in msg
    for name in ("block1", "block2", "block3", "penultimate", "classifier", "block1.0"):
        assert name in msg


def test_duplicate_and_empty_layer_names(reference_model):
    with fails_fast("unique"):
        UniformDetector(reference_model, ["block1", "block1"])
    with fails_fast("unknown layer"):
        UniformDetector(reference_model, [""])


def test_layer_returning_tuple(data):
    model = TupleNet().eval()
    x, y = data
    with fails_fast(r"layer 'block' returns tuple, not a tensor.*submodule"):
        UniformDetector(model, ["block"], progress=False, batch_size=64).fit(x, y)
    assert not model.block._forward_hooks, "the capture hooks must be removed after the error"


def test_too_few_samples_for_a_class(reference_model, data):
    x, y = data
    keep = np.flatnonzero(y != 7)
    keep = np.concatenate([keep, np.flatnonzero(y == 7)[:5]])  # class 7: 5 samples only
    with fails_fast(r"class\(es\) \[7\] have fewer than min_points=20"):
        UniformDetector(reference_model, progress=False).fit(x[keep], y[keep])


def test_model_in_training_mode(reference_model, data):
    model = copy.deepcopy(reference_model).train()
    det = UniformDetector(model, progress=False)
    with fails_fast(r"training mode.*model\.eval\(\)"):
        det.fit(*data)


def test_data_labels_length_mismatch(reference_model, data):
    x, y = data
    with fails_fast(r"data has 3000 samples but labels has 2999"):
        UniformDetector(reference_model, progress=False).fit(x, y[:-1])


@pytest.mark.parametrize("labels", [
    lambda y: y - 1,                      # negative
    lambda y: y.astype(np.float32) + 0.5,  # not integers
    lambda y: y[:, None],                 # 2-D
])
def test_bad_labels(reference_model, data, labels):
    x, y = data
    with fails_fast("labels must be a 1-D array of non-negative integer"):
        UniformDetector(reference_model, progress=False).fit(x, labels(y))


@pytest.mark.parametrize("nu", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_nu(reference_model, nu):
    with fails_fast(r"nu must be in \(0, 1\)"):
        UniformDetector(reference_model, nu=nu)


@pytest.mark.parametrize("kwargs, match", [
    ({"boundary": "square"}, "boundary must be"),
    ({"reduction": "median"}, "unknown reduction"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_bad_options(reference_model, data, kwargs, match):
    with fails_fast(match):
        UniformDetector(reference_model, ["block1"], progress=False, **kwargs).fit(*data)


@pytest.mark.parametrize("model", [lambda x: x, "ufad.models.mnist_cnn:pretrained", None])
def test_not_a_module(model):
    with fails_fast("must be a torch.nn.Module"):
        UniformDetector(model)


def test_nan_in_fitting_data(reference_model, data):
    x, y = data
    x = x.copy()
    x[10, 0, 5, 5] = np.nan
    with fails_fast("NaN or Inf"):
        UniformDetector(reference_model, progress=False).fit(x, y)


def test_data_of_the_wrong_shape(reference_model, data):
    x, y = data
    with fails_fast(r"the model fails on data of shape \(N, 784\)"):
        UniformDetector(reference_model, progress=False).fit(x.reshape(len(x), -1), y)


def test_calibrate_and_export_before_fit(reference_model, tmp_path, data):
    det = UniformDetector(reference_model, progress=False)
    with fails_fast("not fitted"):
        det.calibrate(data[0][:100])
    with fails_fast("not fitted"):
        det.export(tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ------------------------------------------------------------------- weights
class Evil:
    """Unpickling this would create a file: proof that weights loading runs no pickle code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_only_checkpoint_is_refused(reference_model, tmp_path):
    full = tmp_path / "full_model.pt"
    torch.save(reference_model, full)  # the whole pickled module, not a state dict
    with fails_fast(r"cannot load weights from .*safely.*safetensors"):
        load_weights(copy.deepcopy(reference_model), full)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": Evil(marker)}, evil)
    with fails_fast("cannot load weights"):
        load_weights(copy.deepcopy(reference_model), evil)
    assert not marker.exists(), "loading weights executed pickled code"
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(Evil(marker)))
    with fails_fast("cannot load weights"):
        load_weights(copy.deepcopy(reference_model), raw)
    assert not marker.exists()


def test_mismatched_state_dict(reference_model, tmp_path):
    from safetensors.torch import save_file

    other = nn.Sequential(nn.Linear(4, 4)).state_dict()
    torch.save(other, tmp_path / "other.pt")
    save_file(other, str(tmp_path / "other.safetensors"))
    for name in ("other.pt", "other.safetensors"):
        with fails_fast(r"do not fit the model.*(Missing|Unexpected) key"):
            load_weights(copy.deepcopy(reference_model), tmp_path / name)
    wrong_shape = {k: v[..., :1].clone() if v.dim() else v for k, v in reference_model.state_dict().items()}
    torch.save(wrong_shape, tmp_path / "shape.pt")
    with fails_fast("do not fit the model.*size mismatch"):
        load_weights(copy.deepcopy(reference_model), tmp_path / "shape.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with fails_fast("cannot load weights"):
        load_weights(copy.deepcopy(reference_model), tmp_path / "junk.safetensors")
    with fails_fast("does not exist"):
        load_weights(copy.deepcopy(reference_model), tmp_path / "absent.pt")


def test_good_state_dict_loads(reference_model, tmp_path):
    """The refusals above are for their defect only: a plain state dict loads exactly."""
    torch.save(reference_model.state_dict(), tmp_path / "ok.pt")
    fresh = load_weights(copy.deepcopy(reference_model).apply(
        lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None), tmp_path / "ok.pt")
    for k, v in reference_model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


# ------------------------------------------------------------------- ufad export
@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """A cwd with user modules: one that does not compile, one whose factory raises."""
    (tmp_path / "ufad_t_broken.py").write_text("def build(:\n    pass\n")
    (tmp_path / "ufad_t_raises.py").write_text(textwrap.dedent("""
        def build():
            raise RuntimeError("no GPU here")
        def not_a_model():
            return 42
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("spec, match", [
    ("ufad.models.mnist_cnn", "must look like package.module:factory"),
    (":pretrained", "must look like package.module:factory"),
    (".mnist_cnn:pretrained", "must look like package.module:factory"),
    ("ufad.models.mnist_cnn:", "must look like package.module:factory"),
    ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
    ("ufad.models.mnist_cnn:nope", "has no attribute 'nope'"),
    ("ufad_t_broken:build", "importing 'ufad_t_broken' failed: SyntaxError"),
    ("ufad_t_raises:build", r"ufad_t_raises:build\(\) raised RuntimeError: no GPU here"),
    ("ufad_t_raises:not_a_model", "returned int, expected a torch.nn.Module"),
])
def test_load_factory_errors(user_modules, spec, match):
    with fails_fast(match):
        load_factory(spec)


def _export_cli(*args: str):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["export", *args, "--quiet"])
    return res, time.perf_counter() - t0


@pytest.mark.parametrize("extra, match", [
    (["nope_mod_xyz:build"], "cannot import module"),
    (["ufad_t_raises:build"], "raised RuntimeError"),
    (["ufad.models.mnist_cnn:pretrained", "--layers", "block1,fc9"], r"unknown layer name\(s\) \['fc9'\]"),
    (["ufad.models.mnist_cnn:pretrained", "--nu", "1.5"], r"nu must be in \(0, 1\)"),
    (["ufad.models.mnist_cnn:pretrained", "--tpr", "0"], r"--tpr must be in \(0, 1\]"),
    (["ufad.models.mnist_cnn:pretrained", "--method", "magic"], "unknown method 'magic'"),
    (["ufad.models.mnist_cnn:pretrained", "--weights", "absent.pt"], "does not exist"),
    (["ufad.models.mnist_cnn:pretrained", "--data", "no_such.npz"], "no such file"),
])
def test_cli_export_errors_are_one_line_and_fast(user_modules, extra, match):
    spec, *opts = extra
    args = [spec, "-o", str(user_modules / "out.onnx"), *opts]
    if "--data" not in opts:
        args += ["--data", "mnist"]
    res, elapsed = _export_cli(*args)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(match, err), err
    assert "Traceback" not in res.output
    assert elapsed < FAST_S, f"`ufad export` took {elapsed:.1f} s to report a bad option"
    assert not (user_modules / "out.onnx").exists()

"""The exporter CLI on user mistakes: one ``error:`` line in CLI words (flags, not keywords),
exit status 2, never a traceback, and before any long work. Plus the range policy of
feature-vector models (flag, never refuse) on a real tabular model.
"""

from __future__ import annotations

import re
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from ufad.runtime import AnomalySession  # noqa: E402
from ufad.runtime.cli import ALIASES, COMMANDS, cli_renderer, main  # noqa: E402
from ufad.runtime.errors import option_names  # noqa: E402

FAST_S = 2.0
ROOT = Path(__file__).resolve().parents[1]


def one_line_error(res, match: str | None = None) -> str:
    """ufad's ``error: ...`` line, or click's own usage error for a malformed flag value."""
    err = res.stderr.strip()
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = err.splitlines()
    assert (len(lines) == 1 and err.startswith("error: ")) or \
        (lines[0].startswith("Usage: ") and lines[-1].startswith("Error: ")), res.output
    if match:
        assert re.search(match, err), err
    return err


# ------------------------------------------------------------------ messages in CLI words
def test_every_option_a_message_names_exists_on_the_cli():
    """Each opt("name") in the sources is spelt as a real flag by some command (the CLI
    renders messages with the flags of the command that ran)."""
    names = set()
    for p in list((ROOT / "runtime").rglob("*.py")) + list((ROOT / "exporter").rglob("*.py")):
        names |= set(re.findall(r"""opt\(['"](\w+)['"]""", p.read_text()))
    assert {"range_check", "provider", "min_points", "tpr", "logits"} <= names
    commands = [main.get_command(None, n) for n in COMMANDS]
    aliased = {name for name, _ in ALIASES}
    for name in sorted(names - aliased):
        spelt = {cli_renderer(c)(name, "x") for c in commands}
        assert any(s.startswith("--") for s in spelt), f"opt({name!r}) has no CLI flag: {spelt}"


# ------------------------------------------------------------------ export: fail fast
@pytest.fixture
def user_models(tmp_path, monkeypatch):
    """A cwd with user models nobody here designed for: tuple / dict outputs, a tabular MLP."""
    (tmp_path / "ufad_user_nets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def digits_mlp():                   # scikit-learn's 8x8 digits as 64 features
            return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        class TupleOut(nn.Module):          # (logits, features), as many research models do
            def __init__(self):
                super().__init__()
                self.net = digits_mlp()
            def forward(self, x):
                return self.net(x), x[:, :8]

        class DictOut(nn.Module):           # HuggingFace style
            def __init__(self):
                super().__init__()
                self.net = digits_mlp()
            def forward(self, x):
                return {"features": x[:, :8], "logits": self.net(x)}

        def tuple_out():
            return TupleOut().eval()

        def dict_out():
            return DictOut().eval()

        def mlp():
            return nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _shuffled(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def _train_full_batch(make, x: np.ndarray, y: np.ndarray, steps: int):
    """``make()``, seeded, trained by full-batch Adam (lr 1e-2) on a small real data set; in eval mode."""
    torch.manual_seed(0)
    model = make().train()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture
def digits(user_models):
    """Trained weights of the tuple / dict wrappers (their inner MLP; > 90% on held-out digits)
    and the digits as digits.npz; returns the held-out digits."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    import ufad_user_nets

    x, y = load_digits(return_X_y=True)
    x, y = _shuffled(x / 16.0, y)
    net = _train_full_batch(ufad_user_nets.digits_mlp, x[:1500], y[:1500], steps=150)
    held_out = (net(torch.tensor(x[1500:])).argmax(1).numpy() == y[1500:]).mean()
    assert held_out > 0.9, f"digits MLP: {held_out:.3f} on held-out digits"
    save_file({f"net.{k}": v for k, v in net.state_dict().items()}, str(user_models / "wrapped.safetensors"))
    np.savez(user_models / "digits.npz", x=x[:1500], y=y[:1500])
    return x[1500:]


def _export(*args: str):
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["export", *args, "--quiet"])
    return res, time.perf_counter() - t0


@pytest.mark.parametrize("extra, match", [
    (["-o", "/proc/det.onnx"], r"cannot write -o/--output /proc/det.onnx"),
    (["-o", "."], r"is a directory"),
    (["-o", "/proc/sub/det.onnx"], r"cannot write -o/--output /proc/sub/det.onnx"),
    (["--min-points", "0"], r"--min-points must be an integer >= 1, got 0"),
    (["--min-points", "5000"], r"--min-points=5000 exceeds --max-points=1000"),
    (["--max-points", "0"], r"--max-points must be an integer >= 1"),
    (["--tpr", "1.5"], r"--tpr must be in \(0, 1\]"),
    (["--calib-data", "nope.npz"], r"nope.npz: no such file"),
    (["--limit", "0"], r"--limit must be >= 1"),
    (["--layers", "penultimate", "--consistency", "penultimate"],
     r"--consistency penultimate predicts the last monitored module layer .* or set --consistency none"),
    (["--consistency", "block9:grid2"],
     r"--consistency block9:grid2 is neither one of \['none', 'penultimate'\] nor a tap of this model: "
     r"unknown layer name\(s\) \['block9:grid2'\]. Valid module names: block1, "),
    (["--consistency", "block1:grid", "--consistency-alpha", "4"], r"--consistency block1:grid .*unknown reduction 'grid'"),
    (["--consistency", "block1:grid7", "--consistency-alpha", "zero"],
     r"--consistency-alpha must be 'auto' or a number > 0, got 'zero'"),
    (["--contrast", "block9"], r"--contrast block9 is neither one of \['none', 'penultimate'\] nor a tap of this model"),
    (["--layers", "block2,block3", "--contrast", "block3"], r"--contrast block3 names the last monitored module layer itself"),
])
def test_export_option_errors_come_before_any_work(user_models, extra, match):
    args = ["ufad.models.mnist_cnn:pretrained", "--data", "mnist", *extra]
    if "-o" not in extra:
        args += ["-o", str(user_models / "out.onnx")]
    res, elapsed = _export(*args)
    one_line_error(res, match)
    assert elapsed < FAST_S, f"{elapsed:.1f} s to report {extra}"


@pytest.mark.parametrize("case, match", [
    ("nan", r"the ID data holds NaN or Inf values"),
    ("labels_2d", r"labels must be a 1-D array of non-negative integer class indices"),
    ("labels_fractional", r"labels must be a 1-D array of non-negative integer class indices"),
    ("length_mismatch", r"data has \d+ samples but labels has \d+"),
    ("wrong_shape", r"the model fails on data of shape \(N, 784\)"),
    ("few_of_a_class", r"class\(es\) \[3\] have fewer than --min-points=20 samples"),
    ("no_y", r"expected arrays 'x' \(inputs\) and 'y' \(labels\)"),
])
def test_bad_fitting_data_is_one_line(user_models, case, match):
    """The README's 'data problems' rows, through the CLI with an .npz."""
    from ufad.models import datasets

    x, y = datasets.load("mnist", "valid")
    x, y = x[:600].copy(), y[:600].copy()
    arrays = {"x": x, "y": y}
    if case == "nan":
        x[5, 0, 3, 3] = np.nan
    elif case == "labels_2d":
        arrays["y"] = y.reshape(-1, 1)
    elif case == "labels_fractional":
        arrays["y"] = y + 0.5
    elif case == "length_mismatch":
        arrays["y"] = y[:-1]
    elif case == "wrong_shape":
        arrays["x"] = x.reshape(len(x), -1)
    elif case == "few_of_a_class":
        keep = (y != 3) | (np.cumsum(y == 3) <= 5)
        arrays = {"x": x[keep], "y": y[keep]}
    else:
        arrays = {"x": x}
    np.savez(user_models / "bad.npz", **arrays)
    res, _ = _export("ufad.models.mnist_cnn:pretrained", "--data", "bad.npz", "-o", "o.onnx")
    one_line_error(res, match)
    assert not (user_models / "o.onnx").exists()


def test_weights_of_another_model_are_refused(user_models):
    from safetensors.torch import save_file

    save_file(torch.nn.Linear(30, 2).state_dict(), str(user_models / "other.safetensors"))
    res, elapsed = _export("ufad.models.mnist_cnn:pretrained", "--data", "mnist", "-o", "o.onnx",
                           "--weights", "other.safetensors")
    one_line_error(res, r"weights in other.safetensors do not fit the model")
    assert elapsed < FAST_S


def test_tuple_output_needs_logits_and_then_exports(user_models, digits):
    data = ("--data", "digits.npz", "--weights", "wrapped.safetensors", "-o", "t.onnx")
    res, _ = _export("ufad_user_nets:tuple_out", *data)
    one_line_error(res, r"returned tuple\(0: Tensor\[\d+, 10\], 1: Tensor\[\d+, 8\]\).*--logits 0")
    res, _ = _export("ufad_user_nets:tuple_out", *data, "--logits", "0")
    assert res.exit_code == 0, res.output
    sess = AnomalySession(user_models / "t.onnx", provider="cpu")
    noise = np.random.default_rng(0).uniform(0, 1, (200, 64)).astype(np.float32)
    assert sess.run(noise).is_anomaly.mean() >= 0.95
    assert np.mean(~sess.run(digits).is_anomaly) >= 0.85   # held-out digits mostly accepted
    res, _ = _export("ufad_user_nets:tuple_out", *data, "--logits", "5")
    one_line_error(res, r"--logits 5 does not name a tensor")


def test_dict_output_with_a_logits_key_is_picked(user_models, digits):
    res, _ = _export("ufad_user_nets:dict_out", "--data", "digits.npz", "--weights", "wrapped.safetensors",
                     "-o", "d.onnx")
    assert res.exit_code == 0, res.output
    sess = AnomalySession(user_models / "d.onnx", provider="cpu")
    assert sess.info.classes == tuple(str(i) for i in range(10))
    assert np.mean(~sess.run(digits).is_anomaly) >= 0.85


def test_consistency_and_contrast_columns_on_a_user_mlp(user_models, digits):
    """``--consistency penultimate --contrast penultimate`` on a model nobody here designed for (a
    digits MLP behind a dict output): two more columns, named after their two taps, and the file
    still accepts held-out digits and flags uniform noise."""
    res, _ = _export("ufad_user_nets:dict_out", "--data", "digits.npz", "--weights", "wrapped.safetensors",
                     "--consistency", "penultimate", "--contrast", "penultimate", "-o", "dc.onnx")
    assert res.exit_code == 0, res.output
    sess = AnomalySession(user_models / "dc.onnx", provider="cpu")
    *taps, column, contrast = sess.layer_names
    modules = [t for t in taps if not t.startswith("@")]
    assert column == f"{modules[-2]}>{modules[-1]}", sess.layer_names
    assert contrast == f"{column} vs other classes", sess.layer_names
    assert f"+ columns ['{column}', '{contrast}']" in res.output, res.output
    assert np.mean(~sess.run(digits).is_anomaly) >= 0.85
    noise = np.random.default_rng(0).uniform(0, 1, (200, 64)).astype(np.float32)
    assert sess.run(noise).is_anomaly.mean() >= 0.95


# ------------------------------------------------------------------ range policy per input kind
@pytest.fixture
def tabular(user_models):
    """A real tabular model: an MLP trained on standardised breast-cancer features."""
    from safetensors.torch import save_file
    from sklearn.datasets import load_breast_cancer

    import ufad_user_nets

    x, y = load_breast_cancer(return_X_y=True)
    x, y = _shuffled((x - x.mean(0)) / x.std(0), y)
    model = _train_full_batch(ufad_user_nets.mlp, x[:450], y[:450], steps=200)
    acc = float((model(torch.tensor(x[450:])).argmax(1).numpy() == y[450:]).mean())
    assert acc >= 0.93, acc
    save_file(model.state_dict(), str(user_models / "mlp.safetensors"))
    np.savez(user_models / "train.npz", x=x[:450], y=y[:450])
    return x[450:], y[450:]


def test_feature_vectors_far_out_of_range_are_flagged_not_refused(tabular, user_models):
    res, _ = _export("ufad_user_nets:mlp", "--weights", "mlp.safetensors", "--data", "train.npz",
                     "-o", "tab.onnx", "--layers", "1,3,@sqrt_softmax")
    assert res.exit_code == 0, res.output
    x_test, _ = tabular
    sess = AnomalySession(user_models / "tab.onnx", provider="cpu")
    assert sess.info.input.range_policy == "flag"
    noise = np.random.default_rng(1).normal(0, 10, (200, 30)).astype(np.float32)
    res_noise, res_id = sess.run(noise), sess.run(x_test)
    assert res_noise.is_anomaly.all(), "every sigma-10 sample must be flagged"
    assert res_noise.out_of_range.mean() > 0.5 and np.isinf(res_noise.score[res_noise.out_of_range]).all()
    assert res_id.is_anomaly.mean() <= 0.2 and not res_id.out_of_range.any()
    # even a caller's huge threshold cannot accept them: the rule is in the graph
    assert sess.run(noise, threshold=1e30).is_anomaly[res_noise.out_of_range].all()
    np.save(user_models / "noise.npy", noise)
    cli = CliRunner().invoke(main, ["score", "tab.onnx", "noise.npy", "--json"])
    assert cli.exit_code == 0 and cli.stdout.count('"out_of_range_input": true') == int(res_noise.out_of_range.sum())
    shown = CliRunner().invoke(main, ["inspect", "tab.onnx"])
    assert "range rule  flag" in shown.stdout


def test_option_references_name_their_options():
    from ufad.runtime.errors import opt, render

    msg = f"lower {opt('min_points')} or pass {opt('range_check', 'off')}"
    assert option_names(msg) == ["min_points", "range_check"]
    assert render(msg) == "lower min_points or pass range_check='off'"

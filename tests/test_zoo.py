"""A model zoo nobody here designed for: torchvision ResNet-18 and MobileNetV3-small, a timm
ViT, a normaliser wrapper, a 1-D CNN, a GRU and an MLP on tabular data. Each is trained
briefly on real offline data, exported through ``ufad export`` with automatic layers (no
traceback, no parity refusal), and scored by the CLI in a process where torch is absent.
Image models must flag >= 95% of uniform noise at their calibrated threshold (AUROC >= 0.99).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

pytestmark = pytest.mark.zoo   # its own tier: pytest -m zoo (CI runs it after the default run)
torch = pytest.importorskip("torch")
from torchless import run_without_torch  # noqa: E402
from ufad.runtime.cli import main  # noqa: E402
from vision_imports import import_timm, import_torchvision  # noqa: E402

ZOO = textwrap.dedent('''
    """Zoo factories (untrained; the test trains them and passes --weights)."""
    import torch
    from torch import nn

    from ufad.models import mnist_cnn
    from vision_imports import import_timm, import_torchvision


    def resnet18():
        return import_torchvision().models.resnet18(num_classes=10)


    def mobilenet_v3_small():
        return import_torchvision().models.mobilenet_v3_small(num_classes=10)


    def vit_tiny():
        # timm's ViT-Tiny code and width, 6 blocks instead of 12: trainable in seconds here
        return import_timm().create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                          img_size=32, patch_size=8, depth=6)


    def swin():                    # torchvision's Swin code ([B, H, W, C] stages), small enough to train here
        tv = import_torchvision()
        return tv.models.swin_transformer.SwinTransformer(
            patch_size=[2, 2], embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=[4, 4],
            num_classes=10)


    class Normalize(nn.Module):
        def forward(self, x):
            return (x - 0.1307) / 0.3081


    def normalised_cnn():          # the reference CNN behind a normaliser: a wrapper to descend into
        return nn.Sequential(Normalize(), mnist_cnn.pretrained()).eval()


    def cnn1d():                   # digits read as a 1 x 64 signal
        return nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
                             nn.Conv1d(16, 32, 3, padding=1), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
                             nn.Conv1d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                             nn.Linear(64, 10))


    class GRUNet(nn.Module):       # digits read as 8 time steps of 8 features
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 64, batch_first=True)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            out, _ = self.gru(x)
            return self.fc(out[:, -1])


    def gru():
        return GRUNet()


    class TokenTransformer(nn.Module):   # a text-style classifier: token ids in, an embedding first
        def __init__(self):              # (digits read as 64 tokens, their pixel counts 0..16)
            super().__init__()
            self.embed = nn.Embedding(17, 32)
            self.pos = nn.Parameter(0.1 * torch.randn(1, 64, 32))
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 10)

        def forward(self, ids):
            return self.head(self.encoder(self.embed(ids) + self.pos).mean(1))


    def tokens():
        return TokenTransformer()


    def mlp():                     # standardised breast-cancer features
        return nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
''')


def _mnist32(x: np.ndarray) -> np.ndarray:
    """MNIST as 3 x 32 x 32 images (padded, gray repeated), the input torchvision models take."""
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return np.ascontiguousarray(np.repeat(x, 3, axis=1)).astype(np.float32)


def as_digit_tokens(images: np.ndarray) -> np.ndarray:
    """28x28 images [N, 1, 28, 28] as scikit-learn's digits are made: a 32x32 bitmap cut
    into 4x4 blocks, each block's count of set pixels (0..16) one token: [N, 64] int64."""
    bits = np.pad(images[:, 0], ((0, 0), (2, 2), (2, 2))) > 0.5
    return bits.reshape(-1, 8, 4, 8, 4).sum((2, 4)).reshape(len(images), 64).astype(np.int64)


def zoo_data(name: str):
    """(x_train, y_train, x_test, y_test, x_ood or None, noise) of real offline data."""
    rng = np.random.default_rng(0)
    if name in ("resnet18", "mobilenet_v3_small", "vit_tiny", "swin", "normalised_cnn"):
        from ufad.models import datasets

        x, y = datasets.load("mnist", "train")
        xt, yt = datasets.load("mnist", "test")
        xf, _ = datasets.load("fashion_mnist", "test")
        n = 4000
        conv = (lambda a: a) if name == "normalised_cnn" else _mnist32
        x, xt, xf = conv(x[:n]), conv(xt[:500]), conv(xf[:500])
        return x, y[:n], xt, yt[:500], xf, rng.uniform(0, 1, (500, *x.shape[1:])).astype(np.float32)
    if name == "tokens":   # integer ids; OOD: Fashion-MNIST items tokenised the way the digits were
        from sklearn.datasets import load_digits

        from ufad.models import datasets

        x, y = load_digits(return_X_y=True)
        perm = rng.permutation(len(x))
        x, y = x[perm].astype(np.int64), y[perm]
        xf = as_digit_tokens(datasets.load("fashion_mnist", "test")[0][:500])
        return x[:1500], y[:1500], x[1500:], y[1500:], xf, rng.integers(0, 17, (300, 64))
    if name in ("cnn1d", "gru"):
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        x = x.reshape(-1, 1, 64) if name == "cnn1d" else x.reshape(-1, 8, 8)
        perm = rng.permutation(len(x))
        x, y = x[perm], y[perm]
        return x[:1500], y[:1500], x[1500:], y[1500:], None, rng.uniform(0, 1, (300, *x.shape[1:])).astype(np.float32)
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    return x[:450], y[:450], x[450:], y[450:], None, rng.normal(0, 10, (300, 30)).astype(np.float32)


def train(model, x, y, epochs: int, lr: float = 1e-3):
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    for _ in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    # Batch-norm running statistics with a small momentum (torchvision's MobileNet: 0.01) have
    # not converged after a few hundred steps: re-estimate them over the data, as a user would.
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None          # cumulative average
        with torch.no_grad():
            for i in range(0, min(len(xt), 2000), 200):
                model(xt[i:i + 200])
    return model.eval()


def auroc(id_scores: np.ndarray, anomaly_scores: np.ndarray) -> float:
    """P(anomaly score > ID score), ties counted half: higher score = more anomalous."""
    a, b = np.asarray(anomaly_scores, np.float64)[:, None], np.asarray(id_scores, np.float64)[None, :]
    return float((a > b).mean() + 0.5 * (a == b).mean())


ZOO_MODELS = ("resnet18", "mobilenet_v3_small", "vit_tiny", "swin", "normalised_cnn", "cnn1d", "gru", "tokens", "mlp")
IMAGE_MODELS = ("resnet18", "mobilenet_v3_small", "vit_tiny", "swin", "normalised_cnn")
LR = {"vit_tiny": 5e-4, "tokens": 2e-3}
EPOCHS = {"swin": 8, "resnet18": 1, "mobilenet_v3_small": 2, "vit_tiny": 6, "cnn1d": 20, "gru": 20, "tokens": 30, "mlp": 60}
# Floors a few points under what the seeded brief training reaches here (ViT 83.8%, 1-D CNN
# 80.5% on 2 cores); chance is 10% (50% for the MLP's two classes).
MIN_ACCURACY = {"swin": 0.85, "resnet18": 0.9, "mobilenet_v3_small": 0.85, "vit_tiny": 0.8, "normalised_cnn": 0.98,
                "cnn1d": 0.75, "gru": 0.85, "tokens": 0.85, "mlp": 0.9}
FAMILY_TAPS = {   # what the automatic choice must pick, per family
    "resnet18": ["layer1", "layer2", "layer3", "fc#in", "@sqrt_softmax", "@energy"],   # layer4 == fc#in at 1x1
    "vit_tiny": ["blocks.1", "blocks.3", "blocks.5", "norm", "head#in", "@sqrt_softmax", "@energy"],
    "normalised_cnn": ["1.block1", "1.block2", "1.block3", "1.penultimate", "@sqrt_softmax", "@energy"],
    "gru": ["gru#in", "gru:tokens_max", "fc#in", "@sqrt_softmax", "@energy"],
    "tokens": ["embed", "encoder.layers.0", "encoder.layers.1", "head#in", "@sqrt_softmax", "@energy"],   # int64 ids in
    "swin": ["features.1", "features.3", "features.5", "head#in", "@sqrt_softmax", "@energy"],   # per channel of [B, H, W, C]
}


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    if import_torchvision() is None or import_timm() is None:
        pytest.skip("torchvision / timm not installed (tools/setup.sh installs them with --no-deps)")
    d = tmp_path_factory.mktemp("zoo")
    (d / "ufad_zoo.py").write_text(ZOO)
    return d


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_model_exports_with_automatic_layers(zoo_dir, name, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(zoo_dir))
    monkeypatch.chdir(zoo_dir)
    import ufad_zoo

    x, y, x_test, y_test, x_ood, noise = zoo_data(name)
    torch.manual_seed(0)               # the initial weights, whatever ran before in this process
    model = getattr(ufad_zoo, name)()
    if name != "normalised_cnn":
        model = train(model, x, y, EPOCHS[name], LR.get(name, 1e-3))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(zoo_dir / f"{name}.safetensors"))
    np.savez(zoo_dir / f"{name}.npz", x=x, y=y)
    out = zoo_dir / f"{name}.onnx"
    res = CliRunner().invoke(main, ["export", f"ufad_zoo:{name}", "--weights", f"{name}.safetensors",
                                    "--data", f"{name}.npz", "-o", str(out), "--quiet"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    info = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).stdout)
    layers = [l["name"] for l in info["layers"]]
    if name in FAMILY_TAPS:
        assert layers == FAMILY_TAPS[name], layers
    assert len(layers) >= 3, layers

    # scored with torch absent, through the CLI
    scores = {}
    for kind, arr in (("id", x_test), ("noise", noise), ("ood", x_ood)):
        if arr is None:
            continue
        np.save(zoo_dir / f"{name}_{kind}.npy", arr)
        proc = run_without_torch(["python", "-m", "ufad.runtime.cli", "score", str(out),
                                  str(zoo_dir / f"{name}_{kind}.npy"), "--json"])
        assert proc.returncode == 0, proc.stderr[-1500:]
        rows = [json.loads(l) for l in proc.stdout.splitlines()]
        scores[kind] = (np.array([float(r["score"]) for r in rows]), np.array([r["is_anomaly"] for r in rows]))
        if kind == "id":
            accuracy = float(np.mean([r["pred"] for r in rows] == y_test))
    # A detector on a model that did not learn proves nothing: the brief training must work.
    assert accuracy >= MIN_ACCURACY[name], f"{name}: test accuracy {accuracy:.1%}"
    id_s, id_flag = scores["id"]
    noise_s, noise_flag = scores["noise"]
    assert id_flag.mean() <= 0.25, f"{name}: {id_flag.mean():.1%} of held-out ID flagged"
    # The bar for image models; sequences and tables get a sanity bar (their "noise" is
    # closer to the data: uniform digits rows / standardised Gaussian features).
    image = name in IMAGE_MODELS
    flag_bar, auroc_bar = (0.95, 0.99) if image else (0.9, 0.95)
    a = auroc(id_s, noise_s)
    assert noise_flag.mean() >= flag_bar, f"{name}: only {noise_flag.mean():.1%} of noise flagged"
    assert a >= auroc_bar, f"{name}: AUROC vs noise {a:.4f}"
    if name == "tokens":   # ids: the file says so, and clients must feed integers
        assert info["input"]["dtype"] == "int64" and info["input"]["range"] == [0.0, 16.0], info["input"]
        assert info["input"]["range_policy"] == "flag"
        # measured 0.878 (MNIST digits tokenised the same way: 0.989); a floor under it
        assert auroc(id_s, scores["ood"][0]) >= 0.8

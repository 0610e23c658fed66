"""Taps: each output kind is reduced per channel, the automatic choice finds the stages /
blocks / activations of each family and the penultimate features by following the logits,
and ``ufad layers`` shows it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from ufad.exporter.auto_layers import choose  # noqa: E402
from ufad.exporter.taps import ActivationCapture, Tap, parse_spec, resolve_taps  # noqa: E402
from ufad.runtime import ExportError  # noqa: E402
from ufad.runtime.cli import main  # noqa: E402
from vision_imports import import_timm, import_torchvision  # noqa: E402


class Tokens(nn.Module):
    """A tiny transformer classifier: patch embedding, 4 encoder blocks, final norm, head."""

    def __init__(self, d=32):
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(d, 4, 64, batch_first=True, dropout=0.0)
                                      for _ in range(4)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):                      # x [B, 16 patches, 16]
        return self.head(self.norm(self.blocks(self.embed(x))).mean(1))


class SeqFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 24)              # time-major: [T, B, H]
        self.fc = nn.Linear(24, 10)

    def forward(self, x):                      # x [B, T, 8]
        out, _ = self.rnn(x.transpose(0, 1))
        return self.fc(out[-1])


def test_token_outputs_are_reduced_per_channel_not_per_token():
    model = Tokens().eval()
    x = torch.rand(3, 16, 16)
    taps = resolve_taps(model, ["blocks.1", "norm", "blocks.3:cls", "head#in"], x)
    assert [t.reduction for t in taps] == ["tokens_mean", "tokens_mean", "cls", "none"]
    with torch.no_grad():
        h = model.norm(model.blocks(model.embed(x)))
    np.testing.assert_allclose(taps[1].features(h).numpy(), h.mean(1).numpy(), rtol=1e-6)
    assert taps[1].features(h).shape == (3, 32)               # D channels, not N tokens
    c = choose(model, x)
    assert c.family == "transformer" and c.layers == ["blocks.1", "blocks.2", "blocks.3", "norm", "head#in"]


def test_1d_maps_and_time_major_sequences():
    conv = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Conv1d(8, 16, 3), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.rand(5, 2, 40)
    (tap,) = resolve_taps(conv, ["2"], x)
    assert tap.reduction == "max" and tap.features(torch.rand(5, 16, 36)).shape == (5, 16)
    seq = SeqFirst().eval()
    (tap,) = resolve_taps(seq, ["rnn"], torch.rand(5, 7, 8))
    assert tap.reduction == "last" and tap.time_major
    out = torch.rand(7, 5, 24)
    np.testing.assert_array_equal(tap.features(out).numpy(), out[-1].numpy())
    # its head reads the last step (out[-1]): the automatic tap reads the sequence over time,
    # beside what enters the LSTM (over time too, time-major like its output)
    assert choose(seq, torch.rand(5, 7, 8)).layers == ["rnn#in", "rnn:tokens_max", "fc#in"]
    (tap,) = resolve_taps(seq, ["rnn#in"], torch.rand(5, 7, 8))
    assert tap.reduction == "tokens_mean" and tap.time_major


def test_grid_reduction_keeps_cells_of_time_and_of_a_channel_last_map():
    """``grid<k>``: per-channel means over k cells per spatial axis, channel-major, cut as
    adaptive average pooling cuts them (unequal cells when k does not divide the size)."""
    conv = nn.Sequential(nn.Conv1d(2, 8, 3), nn.ReLU(), nn.Conv1d(8, 16, 3), nn.AdaptiveAvgPool1d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()
    (tap,) = resolve_taps(conv, ["2:grid5"], torch.rand(5, 2, 40))
    out = torch.rand(5, 16, 36)        # 36 steps in 5 cells: 0-8, 7-15, 14-22, 21-29, 28-36
    want = np.stack([out[:, :, a:b].mean(-1).numpy() for a, b in ((0, 8), (7, 15), (14, 22), (21, 29), (28, 36))], -1)
    np.testing.assert_allclose(tap.features(out).numpy(), want.reshape(5, -1), rtol=1e-6)
    with pytest.raises(ExportError, match=r"grid40 averages a feature map over 40 cells .*\(36 positions\): choose grid36 or less"):
        resolve_taps(conv, ["2:grid40"], torch.rand(5, 2, 40))
    # a [B, H, W, C] map (Swin's layout) is cut on H and W, channels first in the result
    t = Tap("s", "s", reduction="grid2", channel_last=True)
    m = torch.rand(3, 4, 6, 5)
    got = t.features(m).reshape(3, 5, 2, 2)
    np.testing.assert_allclose(got[:, :, 1, 0].numpy(), m[:, 2:, :3].mean((1, 2)).numpy(), rtol=1e-6)


class TextCNN(nn.Module):
    """Kim's text CNN: parallel convolutions of the embedding, max over time, one linear head."""

    def __init__(self, vocab=17, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.convs = nn.ModuleList([nn.Conv1d(d, 16, k) for k in (3, 4, 5)])
        self.fc = nn.Linear(48, 10)

    def forward(self, ids):
        e = self.emb(ids).transpose(1, 2)
        return self.fc(torch.cat([torch.relu(c(e)).amax(-1) for c in self.convs], 1))


def test_parallel_branches_of_one_input_are_all_tapped():
    # three branches at three lengths looked like three stages, and the first one like a stem
    # (the session-16 sweep: convs.1 and convs.2 only); the embedding's output comes first
    assert choose(TextCNN().eval(), torch.randint(0, 17, (2, 64))).layers == [
        "emb", "convs.0", "convs.1", "convs.2", "fc#in"]


def test_bad_specs_are_clear():
    model = Tokens().eval()
    with pytest.raises(ExportError, match="unknown reduction 'median'"):
        parse_spec("norm:median")
    with pytest.raises(ExportError, match=r"reduction 'max' does not fit a tokens output"):
        resolve_taps(model, ["norm:max"], torch.rand(2, 16, 16))
    with pytest.raises(ExportError, match=r"unknown layer name\(s\) \['nope'\]"):
        resolve_taps(model, ["nope"], torch.rand(2, 16, 16))
    assert Tap("x", "x", reduction="none").features(torch.ones(2, 3)).shape == (2, 3)


def test_torchvision_and_timm_families():
    tv, timm = import_torchvision(), import_timm()
    if tv is None or timm is None:
        pytest.skip("torchvision / timm not installed")
    x = torch.rand(2, 3, 32, 32)
    resnet = tv.models.resnet18(num_classes=10).eval()
    r = choose(resnet, x)
    # no stem, no pools; at 32x32 layer4 ends at 1x1, so its features ARE fc's input: not twice
    assert r.layers == ["layer1", "layer2", "layer3", "fc#in"]
    assert choose(resnet, torch.rand(2, 3, 64, 64)).layers == ["layer1", "layer2", "layer3", "layer4", "fc#in"]
    # ShuffleNetV2 at 32x32: conv1 16x16, stages 4x4 / 2x2 / 1x1, conv5 1x1 == fc's input. The
    # copy is dropped before the stem rule counts the stages, so conv1 stays (without it the
    # detector flagged 90% of uniform noise, with it 100%: the session-18 sweep, same weights)
    shuffle = choose(tv.models.shufflenet_v2_x0_5(num_classes=10).eval(), x)
    assert shuffle.layers == ["conv1", "stage2", "stage3", "stage4", "fc#in"]
    # a mobile net (depthwise-separable blocks) keeps its stem as well (Fashion-MNIST AUROC
    # 0.872 -> 0.933 on the zoo's MobileNetV3; session 19)
    m = choose(tv.models.mobilenet_v3_small(num_classes=10).eval(), x)
    assert m.layers == ["features.0", "features.3", "features.6", "features.11", "features.12", "classifier.1"]
    v = choose(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32,
                                 patch_size=8).eval(), x)
    assert v.layers == ["blocks.3", "blocks.7", "blocks.11", "norm", "head#in"]


def test_stage_chains_and_averaged_heads():
    """A spine child that is a chain of stages stands for its stages (torchvision RegNet's
    ``trunk_output``, timm's ``stages`` / ``blocks``), never for one tap at its end; an inception
    block's parallel branches are not a chain. Logits averaged after two heads (timm's distilled
    models in eval) still give the penultimate features."""
    tv, timm = import_torchvision(), import_timm()
    if tv is None or timm is None:
        pytest.skip("torchvision / timm not installed")
    x = torch.rand(2, 3, 32, 32)
    regnet = tv.models.regnet_y_400mf(num_classes=10).eval()
    # at 32x32 block4 ends at 1x1 and is fc's input; at 64x64 it is a stage of its own. With the
    # copy gone first, four stages remain and the stem (the only map above 4x4) is one of them.
    assert choose(regnet, x).layers == ["stem", "trunk_output.block1", "trunk_output.block2",
                                        "trunk_output.block3", "fc#in"]
    assert choose(regnet, torch.rand(2, 3, 64, 64)).layers == [
        "trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4", "fc#in"]
    assert choose(timm.create_model("convnext_atto", num_classes=10).eval(), x).layers == [
        "stages.0", "stages.1", "stages.2", "stages.3", "head.fc#in"]
    assert choose(timm.create_model("efficientnet_b0", num_classes=10).eval(), x).layers == [
        "conv_stem", "blocks.1", "blocks.3", "blocks.5", "conv_head", "global_pool"]
    googlenet = tv.models.googlenet(num_classes=10, aux_logits=False, init_weights=True).eval()
    assert choose(googlenet, x).layers == ["conv3", "inception3b", "inception4d", "inception5a", "fc#in"]
    # isotropic (ConvMixer: every block 64 x 16 x 16): evenly spaced blocks, as in a transformer,
    # not one tap at the stack's end
    from timm.models.convmixer import ConvMixer

    mixer = ConvMixer(dim=64, depth=6, kernel_size=5, patch_size=2, num_classes=10).eval()
    assert choose(mixer, x).layers == ["blocks.1", "blocks.3", "blocks.5", "global_pool"]
    deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, patch_size=8).eval()
    assert choose(deit, x).layers == ["blocks.3", "blocks.7", "blocks.11", "norm", "head_dist#in"]


def test_hierarchical_token_stages():
    """timm's LeViT: a conv stem, then stages of tokens [B, N, C] whose layers normalise with
    BatchNorm1d over flattened tokens. Its stages are tokens (reduced per channel over tokens),
    not 1-D maps (reduced per token over channels: 4 and 1 dimensions), and the taps are the
    stage outputs, not three blocks of the last stage."""
    timm = import_timm()
    if timm is None:
        pytest.skip("timm not installed")
    levit = timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    c = choose(levit, x)
    assert c.family == "transformer" and c.layers == ["stages.0", "stages.1", "stages.2", "head_dist.bn"]
    taps = resolve_taps(levit, c.layers, x)
    assert [t.reduction for t in taps[:3]] == ["tokens_mean"] * 3
    cap = ActivationCapture(levit, taps)
    with torch.no_grad():
        feats = cap.collect(levit(x))
    cap.remove()
    assert [f.shape[1] for f in feats] == [128, 256, 384, 384]


def test_channel_last_maps_are_reduced_per_channel():
    """Swin's stages give ``[B, H, W, C]`` maps: reduced per channel (C values), not per row
    (H values); a ConvNeXt block, whose Linear layers run on a permuted copy, stays channel-first."""
    tv = import_torchvision()
    if tv is None:
        pytest.skip("torchvision not installed")
    torch.manual_seed(0)
    swin = tv.models.swin_transformer.SwinTransformer(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=[4, 4],
        num_classes=10).eval()
    x = torch.rand(3, 3, 32, 32)
    layers = choose(swin, x).layers
    assert layers == ["features.1", "features.3", "features.5", "head#in"]   # no Permute copy of the last stage
    taps = resolve_taps(swin, layers, x)
    assert [t.channel_last for t in taps] == [True, True, True, False]
    cap = ActivationCapture(swin, taps)
    with torch.no_grad():
        logits = swin(x)
    feats = cap.collect(logits)
    cap.remove()
    assert [tuple(f.shape) for f in feats] == [(3, 32), (3, 64), (3, 128), (3, 128)]
    with torch.no_grad():
        stage = swin.features[:2](x)                          # [B, 16, 16, 32]
    assert torch.equal(feats[0], stage.amax(dim=(1, 2)))
    convnext = tv.models.convnext_tiny(num_classes=10).eval()
    assert not any(t.channel_last for t in resolve_taps(convnext, choose(convnext, x).layers, x))


def test_ufad_layers_marks_the_automatic_choice():
    res = CliRunner().invoke(main, ["layers", "ufad.models.mnist_cnn:pretrained", "--input-shape", "1,28,28"])
    assert res.exit_code == 0, res.output
    marked = [line.split("│")[2].strip() for line in res.stdout.splitlines() if line.startswith("│ *")]
    assert marked == ["block1", "block2", "block3", "penultimate"], res.stdout
    res = CliRunner().invoke(main, ["layers", "ufad.models.mnist_cnn:pretrained"])
    assert res.exit_code == 2 and "--input-shape" in res.stderr


def test_l2_reduction_normalises_vectors_and_refuses_maps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    x = torch.rand(5, 1, 8, 8)
    (tap,) = resolve_taps(model, ["4:l2"], x)
    with torch.no_grad():
        f, h = tap.features(model[:5](x)), model[:5](x)
    np.testing.assert_allclose(f.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert torch.allclose(f * h.norm(dim=1, keepdim=True), h, atol=1e-6)
    with pytest.raises(ExportError, match=r"reduction 'l2' does not fit a map output"):
        resolve_taps(model, ["0:l2"], x)

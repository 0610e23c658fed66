"""The automatic choice of taps: one probe pass over the whole module tree, then per family.

- conv nets (2-D and 1-D) and Swin: one tap per stage of the network's spine, where
  resolution or width changes, at most ``MAX_AUTO_STAGES`` (a chain of stages inside the
  spine stands for its stages; an isotropic stack, one shape throughout, for three evenly
  spaced blocks); never a lone activation / norm / pool / dropout /
  parameter-free reshape; the stem only in shallow nets and mobile nets (depthwise-separable
  blocks); not a last stage that equals the
  penultimate features (a 1x1 map that is only pooled into the head);
- transformers: three evenly spaced block outputs and the final norm;
- RNNs: the recurrent module's output (its last step; over time when the head reads that step)
  and its input, over time;
- MLPs: the hidden activations before the head;
- models that read ids: the ``nn.Embedding``'s output as well;
- always: the penultimate features, found by following the logits tensor back to the input
  of the module that produced it (wrappers such as a normaliser in front are descended into).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ufad.runtime.errors import ExportError, opt

from .graph_models import is_a
from .taps import LONE_OPS, PROBE_SAMPLES, ActivationCapture, Record, has_weights, probe, resolve_taps, run_model

#: at most this many hidden taps of one family are chosen automatically
MAX_AUTO_STAGES = 4
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU,
                nn.Mish, nn.Sigmoid)


@dataclass(frozen=True)
class Choice:
    """The automatic taps of a model and what was considered."""

    hidden: list[str]
    penultimate: str | None
    records: list[Record]
    family: str

    @property
    def layers(self) -> list[str]:
        out = list(self.hidden)
        if self.penultimate and self.penultimate not in out:
            out.append(self.penultimate)
        return out


def _evenly(items: list, k: int) -> list:
    """``k`` items spread over ``items``: the ends of ``k`` equal parts (the last included)."""
    if len(items) <= k:
        return list(items)
    idx = sorted({math.ceil((i + 1) * len(items) / k) - 1 for i in range(k)})
    return [items[i] for i in idx]


def _head(records: list[Record], logits: torch.Tensor) -> tuple[str | None, float]:
    """The penultimate tap (the input of the innermost module producing the logits: the
    output of the module that last made that tensor, else ``head#in``) and the probe order
    before which hidden taps must lie."""
    makers = [r for r in records if r.out_id == id(logits)]
    if not makers:
        # No module returns the logits themselves: they are combined after the heads (timm's
        # distilled models average a head and a distillation head in eval). Follow the
        # last module that makes a tensor of the logits' shape instead.
        # (SqueezeNet's head ends in a [B, C, 1, 1] map that forward() flattens: same numbers.)
        per_row = int(np.prod(logits.shape[1:]))
        makers = [r for r in records if not r.is_container and r.out_shape is not None and len(r.out_shape) >= 2
                  and r.out_shape[0] == logits.shape[0] and int(np.prod(r.out_shape[1:])) == per_row
                  and all(d == 1 for d in r.out_shape[2:])]
        makers = makers[-1:]
    if not makers:
        return None, math.inf
    head = max(makers, key=lambda r: (r.depth, -r.order))      # the innermost module
    while not _computes(head) and head.in_ids:
        # nn.LogSoftmax / nn.Softmax, or a pool / activation after a conv head, as the last
        # module: the head is the layer with weights that feeds it
        inner = [r for r in records if r.out_id == head.in_ids[0] and r.order < head.order]
        if not inner:
            break
        head = max(inner, key=lambda r: (r.depth, -r.order))
    if not head.in_ids:
        return None, head.order
    feeders = [r for r in records if r.out_id == head.in_ids[0] and r.order < head.order]
    useful = [r for r in feeders if not is_a(r.module, (nn.Dropout, nn.Identity, nn.Flatten))]
    first = min((r.order for r in feeders), default=head.order)
    if useful:
        # the last module to finish with that tensor: after in-place activations, outermost
        return max(useful, key=lambda r: r.order).name, first
    return f"{head.name}#in", first


def _computes(r: Record) -> bool:
    """A container or a layer with weights: not a parameter-free reshaping such as
    torchvision's ``Permute`` in front of a Swin head (a copy of the last stage)."""
    return r.is_container or has_weights(r.module)


def _stages(records: list[Record], x_shape: tuple[int, ...], head_order: int) -> list[Record]:
    """Conv nets (2-D or 1-D): every stage of the network's spine, where resolution or width
    changes, at the last block of the stage; never a lone activation / norm / pool / dropout.
    ``_spread`` then keeps a few of them.

    The spine is the module whose children run the network one after the other: the model
    itself, or, through wrappers (a normaliser in front, a ``features`` Sequential), the one
    container that holds all its feature maps. A child of the spine that is itself a chain of
    stages (``stem, trunk_output[block1..4]``) stands for its stages."""
    last = {r.name: r for r in records if r.order < head_order}    # a module called twice: its last call

    def map_children(parent: str) -> list[Record]:
        prefix = parent + "." if parent else ""
        kids = [r for n, r in last.items() if n.startswith(prefix) and "." not in n[len(prefix):]]
        return sorted((r for r in kids if r.kind == "map" and r.out_shape != x_shape
                       and not is_a(r.module, LONE_OPS) and _computes(r)), key=lambda r: r.order)

    def holders(parent: str) -> list[str]:   # children whose subtree makes the feature maps
        prefix = parent + "." if parent else ""
        names = {n[len(prefix):].split(".")[0] for n, r in last.items()
                 if n.startswith(prefix) and r.kind == "map" and "." in n[len(prefix):]}
        return [prefix + n for n in sorted(names)]

    spine, kids = "", map_children("")
    while True:
        if len(kids) == 1 and kids[0].is_container and map_children(kids[0].name):
            spine = kids[0].name
        elif not kids and len(holders(spine)) == 1:   # e.g. Sequential(Normalize(), net)
            spine = holders(spine)[0]
        else:
            break
        kids = map_children(spine)

    def stages_in(r: Record) -> list[Record]:
        """A chain of stages (RegNet's ``trunk_output``, timm's ``stages`` / ``blocks``): a
        container whose output is its last child's and whose children are blocks at two or
        more output shapes; [] for anything else (a block, an inception's parallel branches)."""
        sub = map_children(r.name) if r.is_container else []
        if (len(sub) >= 2 and sub[-1].out_id == r.out_id and all(k.is_container for k in sub)
                and len({k.out_shape for k in sub}) >= 2):
            return sub
        return []

    def isotropic(r: Record) -> list[Record]:
        """An isotropic stack (ConvMixer's ``blocks``): a container whose output is its last
        child's and whose children are two or more blocks at one output shape."""
        sub = map_children(r.name) if r.is_container else []
        if (len(sub) >= 2 and sub[-1].out_id == r.out_id and all(k.is_container for k in sub)
                and len({k.out_shape for k in sub}) == 1):
            return sub
        return []

    kids = [k for r in kids for k in (stages_in(r) or [r])]
    picks: list[Record] = []
    for r in kids:   # consecutive children with the same output shape form one stage
        if picks and picks[-1].out_shape[1:] == r.out_shape[1:]:
            picks[-1] = r
        else:
            picks.append(r)
    if len(picks) == 1 and isotropic(picks[0]):
        # one resolution and width throughout: as in a transformer, evenly spaced blocks
        picks = _evenly(isotropic(picks[0]), 3)
    return picks


def _spread(picks: list[Record], depthwise: bool = False) -> list[str]:
    """At most ``MAX_AUTO_STAGES`` of the stages, evenly spread; the stem (the first stage)
    only in shallow nets and in nets of depthwise-separable blocks. Counted after a last stage
    that copies the penultimate features is gone (``_without_copy_of``): counted before, a
    ShuffleNet or RegNet at 32x32 lost its stem, its only map above 4x4, and then that copy,
    and flagged 68-90% of uniform noise instead of 100%."""
    stem = len(picks) >= 5 or (len(picks) >= 3 and not picks[0].is_container)
    # parallel branches of one input (a text CNN's convolutions of the embedding) hold no stem
    if stem and picks[0].in_ids != picks[1].in_ids:
        if depthwise:
            # Mobile nets narrow their early stages to 16-24 channels, and their full-convolution
            # stem is their richest high-resolution view. Trained on MNIST as 3x32x32, AUROC
            # vs Fashion-MNIST with / without it: MobileNetV3-small 0.872 -> 0.933, MobileNetV2
            # 0.933 -> 0.965 (uniform noise 0.976 -> 0.996), MNASNet 0.895 -> 0.931; on
            # ResNet-18 and Swin the stem changed nothing (0.9937 / 0.9951, 0.9888 / 0.9879),
            # so those keep their taps and their latency.
            return [picks[0].name] + [p.name for p in _evenly(picks[1:], MAX_AUTO_STAGES)]
        picks = picks[1:]                                            # the stem
    return [p.name for p in _evenly(picks, MAX_AUTO_STAGES)]


def _depthwise(records: list[Record]) -> bool:
    """Whether the net holds depthwise convolutions (one group per input channel: MobileNet,
    MNASNet, EfficientNet blocks)."""
    def dw(m: nn.Module) -> bool:
        groups = getattr(m, "groups", 1)
        return is_a(m, (nn.Conv1d, nn.Conv2d)) and groups > 1 and groups == getattr(m, "in_channels", None)
    return any(dw(r.module) for r in records)


def _blocks(records: list[Record], head_order: int) -> list[str]:
    """Transformers: a few evenly spaced block outputs plus the final norm."""
    toks = [r for r in records if r.kind == "tokens" and r.order < head_order]
    if not toks:
        return []
    by_parent: dict[str, list[Record]] = {}
    for r in toks:
        parent, _, leaf = r.name.rpartition(".")
        if leaf.isdigit() and r.is_container:
            by_parent.setdefault(parent, []).append(r)
    if not by_parent:
        return []
    # The block stack: the outermost numbered stack of token modules (a hierarchical
    # transformer's stages, LeViT's ``stages.0..2``, rather than the blocks of its last stage),
    # the longest at that depth.
    stacks = [v for v in by_parent.values() if len(v) >= 2] or list(by_parent.values())
    seq = min(stacks, key=lambda v: (v[0].depth, -len(v)))
    picks = [r.name for r in _evenly(seq, 3)]
    end = max(r.order for r in seq)
    norms = [r for r in toks if r.order > end and is_a(r.module, nn.LayerNorm)]
    if norms:
        picks.append(norms[-1].name)
    return picks


def _hidden_vectors(records: list[Record], head_order: int, penultimate: str | None) -> list[str]:
    """MLPs: the hidden activations before the head (the last three)."""
    acts = [r for r in records if r.kind == "vector" and r.order < head_order
            and is_a(r.module, _ACTIVATIONS) and r.name != penultimate]
    return [r.name for r in acts[-3:]]


def _sequences(records: list[Record], head_order: int) -> list[str]:
    return [r.name for r in records if r.kind == "sequence" and r.order < head_order]


def _copies_penultimate(model: nn.Module, example: torch.Tensor, records: list[Record], tap: str,
                        pen: str | None, logits_key: Any) -> bool:
    """Whether tap ``tap``'s reduced features ARE the penultimate features, value for value on
    the probe samples: a stage that ends at 1x1 and is only pooled and flattened into the head
    (torchvision ResNets at 32x32: ``layer4`` == ``fc#in``), or an RNN whose last step is what
    the classifier reads. Tapping both reads a second set of regions for no new signal (zoo
    ResNet-18: -0.04x of the bare model's latency at batch 1)."""
    from .outputs import pick_logits

    if pen is None:
        return False
    cap = ActivationCapture(model, resolve_taps(model, [tap, pen], example, records=records))
    try:
        with torch.no_grad():
            logits = pick_logits(run_model(model, example), logits_key)
        last, penult = cap.collect(logits)
    finally:
        cap.remove()
    return last.shape == penult.shape and torch.equal(last, penult)


def _without_copy_of(model: nn.Module, example: torch.Tensor, records: list[Record], hidden: list[str],
                     pen: str | None, logits_key: Any) -> list[str]:
    """``hidden`` without a last stage that copies the penultimate features."""
    if hidden and _copies_penultimate(model, example, records, hidden[-1], pen, logits_key):
        return hidden[:-1]
    return hidden


def _sequence_taps(model: nn.Module, example: torch.Tensor, records: list[Record], names: list[str],
                   pen: str | None, logits_key: Any) -> list[str]:
    """The recurrent modules' outputs, at their last step; one whose last step is what the
    classifier reads (``fc(out[:, -1])``, ``fc(h_n)``) is reduced over time instead
    (``:tokens_max``): every step, where the last one would repeat the penultimate tap."""
    return [f"{n}:tokens_max" if _copies_penultimate(model, example, records, n, pen, logits_key) else n
            for n in names]


def choose(model: nn.Module, example: torch.Tensor, logits_key: Any = None) -> Choice:
    """The automatic taps of ``model`` (decided by one probe pass on ``example``)."""
    from .outputs import check_logits, pick_logits

    example = example[:PROBE_SAMPLES]      # the shape probe() sees
    records, out = probe(model, example)
    logits = pick_logits(out, logits_key)
    check_logits(logits)      # before the head is searched for: a [B, C, 1, 1] head misleads it
    pen, head_order = _head(records, logits)
    x_shape = tuple(example.shape)
    emb = _embedding(records, head_order)
    rnns = _sequences(records, head_order)
    hidden = _sequence_taps(model, example, records, rnns, pen, logits_key)
    family = "rnn" if hidden else ""
    if rnns and emb is None:
        # what enters the first recurrent module, over time: the recurrent outputs alone let
        # uniform noise through (digits as 8x8 sequences, 2-layer GRU: AUROC 0.9595, 67%
        # flagged; with this tap 1.0 and 100%). A model that reads ids has its embedding tapped.
        hidden = [f"{rnns[0]}#in", *hidden]
    if not hidden:
        hidden = _blocks(records, head_order)
        family = "transformer" if hidden else ""
    if not hidden:
        stages = _stages(records, x_shape, head_order)
        family = "cnn" if stages else ""
        kept = _without_copy_of(model, example, records, [r.name for r in stages], pen, logits_key)
        hidden = _spread([r for r in stages if r.name in kept], _depthwise(records))
    if not hidden:
        hidden = _hidden_vectors(records, head_order, pen)
        family = "mlp" if hidden else "unknown"
    if emb is not None and emb not in hidden:
        hidden = [emb, *hidden]
    return Choice(hidden=hidden, penultimate=pen, records=records, family=family)


def _embedding(records: list[Record], head_order: int) -> str | None:
    """The ``nn.Embedding`` of a model that reads ids, whose output every family taps as well
    (tokens, reduced over them: the input's bag of embedded ids), the one tap that sees which
    ids came in before any mixing. Measured on digits read as 64 ids, AUROC vs random ids: the
    zoo's token transformer 0.9956 -> 1.0 (Fashion-MNIST items as ids 0.851 -> 0.877), a text
    CNN 0.694 -> 0.962."""
    return next((r.name for r in records if r.order < head_order and is_a(r.module, nn.Embedding)
                 and r.kind == "tokens"), None)


def default_layers(model: nn.Module, example: torch.Tensor, logits_key: Any = None) -> list[str]:
    """The automatic taps: hidden stages / blocks / activations, then the penultimate
    features. Warns (one line) when fewer than two hidden taps are found."""
    c = choose(model, example, logits_key)
    layers = c.layers
    if not layers:
        raise ExportError(
            "could not pick layers automatically: no module output feeds the logits. Pass "
            f"{opt('layers')} explicitly (`ufad layers MODEL` lists the candidates).")
    if len(layers) < 2:
        warnings.warn(f"ufad: only {len(layers)} hidden tap found automatically ({layers}); "
                      f"pass {opt('layers')} for a stronger detector (`ufad layers MODEL` lists candidates).",
                      UserWarning, stacklevel=3)
    return layers

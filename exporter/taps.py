"""Taps: the points of a model that a detector monitors, how each becomes one feature vector,
and which ones are chosen automatically. The one place that knows model structure.

A tap is named by a spec string:

- ``"layer3"``: the output of module ``layer3``;
- ``"fc#in"``: the input of module ``fc`` (e.g. the penultimate features, when the model
  computes them with a function rather than a module);
- ``"...:reduction"``: with a named reduction instead of the one chosen for its output kind;
- ``"@sqrt_softmax"``: the classifier's output distribution, ``sqrt(softmax(logits))`` (its
  Hellinger embedding; not a module, so computed from the logits; ``@`` cannot start a
  module name);
- ``"@sqrt_softmax_top10"``: the 10 largest of those, sorted: the same "between two
  classes" signal without one dimension per class (what a many-class model monitors).
- ``"@energy"``: ``-logsumexp(logits)``, one dimension: the logits' scale, which the softmax
  taps normalise away (small-budget attacks and OOD inputs lower it).

Output kinds and their reductions to ``[B, D]`` (per channel, never per position):

| kind | shape | reductions (default first) |
|---|---|---|
| ``vector`` | ``[B, D]`` | ``none``, ``l2`` (divided by its L2 norm: Mahalanobis++) |
| ``map`` | ``[B, C, H, W]``, ``[B, C, T]`` (conv / pool / 1-D conv outputs); ``[B, H, W, C]`` (Swin: ``Tap.channel_last``) | ``max`` (per-channel max over space or time; the detector's ``reduction``), ``mean``, ``flatten``, ``grid<k>`` (per-channel means over k x k cells, or k cells of time: ``C k^2`` dims) |
| ``tokens`` | ``[B, N, D]`` (transformer blocks, norms, embeddings) | ``tokens_mean``, ``tokens_max``, ``cls`` (token 0); the first two without the pad positions when the input ids go through an embedding with a ``padding_idx`` |
| ``sequence`` | RNN / GRU / LSTM output (batch-first or not) | ``last`` (last step; of a bidirectional RNN, each direction's last step: the forward half at step T-1, the backward half at step 0), ``tokens_max`` (max over time) |

Which taps are used when none are given is ``auto_layers.py``'s job.

The same hooks run eagerly (fitting, the torch reference) and under ``torch.onnx.export``
(non-strict tracing runs them as plain Python), so both see the same tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ufad.runtime.errors import ExportError, opt

from .graph_models import is_a

SOFTMAX = "@sqrt_softmax"
SOFTMAX_TOP = "@sqrt_softmax_top10"
ENERGY = "@energy"
TOP_K = 10
#: log() of a model's probabilities reads at least this (a softmax rounds tiny ones to 0)
PROBABILITY_FLOOR = 1e-30
#: output taps: computed from the logits, not hooked on a module
OUTPUT_TAPS = (SOFTMAX, SOFTMAX_TOP, ENERGY)
MAP_REDUCTIONS = ("max", "mean", "flatten")
#: ``grid<k>``: a map's per-channel means over a k x k grid of cells (k cells over time for a
#: 1-D map), channel-major: where the evidence is, not only how strong
GRID = re.compile(r"grid([1-9][0-9]?)")
TOKEN_REDUCTIONS = ("tokens_mean", "tokens_max", "cls")
SEQUENCE_REDUCTIONS = ("last", "tokens_max")
REDUCTIONS = ("none", "l2", *MAP_REDUCTIONS, *TOKEN_REDUCTIONS, "last")
PROBE_SAMPLES = 2
DEFAULTS = {"vector": "none", "map": "max", "tokens": "tokens_mean", "sequence": "last"}
ALLOWED = {"vector": ("none", "l2"), "map": MAP_REDUCTIONS, "tokens": TOKEN_REDUCTIONS,
           "sequence": SEQUENCE_REDUCTIONS}

_CHANNEL_FIRST_1D = (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d,
                     nn.AdaptiveMaxPool1d, nn.InstanceNorm1d, nn.ConvTranspose1d)
_TOKEN_MAKERS = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding,
                 nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
#: modules that never make a tap on their own: one operation, no new features
LONE_OPS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
             nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
             nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.batchnorm._BatchNorm,
             nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm,
             nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def module_names(model: nn.Module) -> list[str]:
    """Every named submodule of ``model`` (the names a tap spec accepts, with ``SOFTMAX``)."""
    return [n for n, _ in model.named_modules() if n]


@dataclass(frozen=True)
class Tap:
    """One monitored point: ``spec`` as given, the module, input or output, the reduction."""

    spec: str
    module: str
    point: str = "output"      # "output" | "input"
    reduction: str | None = None
    time_major: bool = False   # an RNN without batch_first: [T, B, H]
    channel_last: bool = False  # a [B, H, W, C] map (Swin's blocks): channels on the last axis
    bidirectional: bool = False  # a bidirectional RNN's output: [forward | backward] halves
    from_probabilities: bool = False  # an output tap of a model that returns softmax probabilities
    pad_id: int | None = None   # tokens of a model whose embedding pads with this id: pads left out

    @property
    def is_softmax(self) -> bool:
        """An output tap (computed from the logits)."""
        return self.spec in OUTPUT_TAPS

    def output_features(self, logits: torch.Tensor) -> torch.Tensor:
        """``[B, C]`` sqrt(softmax), its ``TOP_K`` largest entries sorted (``SOFTMAX_TOP``), or
        ``[B, 1]`` -logsumexp(logits) (``ENERGY``). A model that returns probabilities p gets
        them from log p: sqrt(softmax(log p)) = sqrt(p), where sqrt(softmax(p)) would squash
        every distribution towards uniform."""
        if self.from_probabilities:
            logits = torch.log(logits.float().clamp_min(PROBABILITY_FLOOR))
        if self.spec == ENERGY:
            return -torch.logsumexp(logits.float(), dim=1, keepdim=True)
        p = torch.sqrt(torch.softmax(logits.float(), dim=1))
        if self.spec == SOFTMAX_TOP:
            return torch.topk(p, min(TOP_K, p.shape[1]), dim=1, sorted=True).values
        return p

    def features(self, t: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce the tapped tensor to ``[B, D]`` float32 with this tap's reduction; ``ids``: the
        model's input, whose ``pad_id`` positions a token reduction leaves out."""
        how = self.reduction
        if how == "l2" and t.dim() == 2:
            t = t.float()
            return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if t.dim() == 2 or how == "none":
            return t.float()
        if self.channel_last:
            t = t.movedim(-1, 1)
        if how == "flatten":
            return t.flatten(1).float()
        k = grid_cells(how)
        if k is not None:
            pool = F.adaptive_avg_pool2d if t.dim() == 4 else F.adaptive_avg_pool1d
            return pool(t, k).flatten(1).float()
        if how in ("max", "mean"):
            dims = tuple(range(2, t.dim()))
            return (t.amax(dim=dims) if how == "max" else t.mean(dim=dims)).float()
        if self.time_major:
            t = t.transpose(0, 1)
        if how == "last" and self.bidirectional:
            # the backward direction ends at step 0: its state at step T-1 has read one step
            h = t.shape[-1] // 2
            return torch.cat([t[:, -1, :h], t[:, 0, h:]], dim=1).float()
        if how == "last":
            return t[:, -1].float()
        if how == "cls":
            return t[:, 0].float()
        if self.pad_id is not None and ids is not None and tuple(ids.shape) == tuple(t.shape[:2]):
            return self._without_pads(t, ids != self.pad_id)
        return (t.mean(dim=1) if how == "tokens_mean" else t.amax(dim=1)).float()

    def _without_pads(self, t: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``tokens_mean`` / ``tokens_max`` over the real (non-pad) positions ``real [B, N]``: a
        padded sentence reads like its unpadded self, whatever its length. A row of pads only
        falls back to every position."""
        keep = real.unsqueeze(-1)
        if self.reduction == "tokens_mean":
            n = keep.sum(dim=1).to(t.dtype)
            return torch.where(n > 0, (t * keep).sum(dim=1) / n.clamp_min(1), t.mean(dim=1)).float()
        return torch.where(keep.any(dim=1), t.masked_fill(~keep, float("-inf")).amax(dim=1), t.amax(dim=1)).float()


def grid_cells(reduction: str | None) -> int | None:
    """k of a ``grid<k>`` reduction (None for any other)."""
    m = GRID.fullmatch(reduction or "")
    return int(m.group(1)) if m else None


def parse_spec(spec: str) -> Tap:
    """``"name[#in][:reduction]"`` -> Tap (reduction None: chosen by the output's kind)."""
    if spec in OUTPUT_TAPS:
        return Tap(spec, "", "output", "none")
    name, _, red = spec.partition(":")
    point = "output"
    if name.endswith("#in"):
        name, point = name[:-3], "input"
    if red and red not in REDUCTIONS and grid_cells(red) is None:
        raise ExportError(f"tap {spec!r}: unknown reduction {red!r}; choose one of {list(REDUCTIONS)} "
                          "or grid<k> (a map's per-channel means over k x k cells, e.g. grid4)")
    return Tap(spec, name, point, red or None)


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> list[nn.Module | None]:
    """Look up the modules of tap specs (None for ``SOFTMAX``); unknown names raise an
    ExportError listing valid ones."""
    modules = dict(model.named_modules())
    taps = [parse_spec(l) for l in layers]
    unknown = [t.spec for t in taps if not t.is_softmax and (not t.module or t.module not in modules)]
    if unknown:
        valid = module_names(model)
        shown = ", ".join(valid[:60]) + (f" ... ({len(valid)} in all; `ufad layers MODEL` lists them)"
                                         if len(valid) > 60 else "")
        raise ExportError(f"unknown layer name(s) {unknown}. Valid module names: {shown} "
                          f"(and {SOFTMAX!r}, sqrt(softmax(logits)), {SOFTMAX_TOP!r}, its {TOP_K} largest entries, "
                          f"or {ENERGY!r}, -logsumexp(logits); "
                          "append '#in' for a module's input)")
    if len(set(layers)) != len(layers):
        raise ExportError(f"layer names must be unique, got {list(layers)}")
    return [None if t.is_softmax else modules[t.module] for t in taps]


def run_model(model: nn.Module, x: torch.Tensor) -> Any:
    """``model(x)``, with a failure on the data (typically a wrong input shape) turned into
    an ExportError that says what was passed."""
    try:
        return model(x)
    except ExportError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        first = msg[0][:300] if msg else ""
        dtype = "float32" if x.is_floating_point() else "int64"
        if isinstance(e, TypeError) and re.search(r"missing \d+ required|positional argument", first):
            advice = ("ufad calls the model with one tensor, model(x); a forward that needs more "
                      "(an attention mask, lengths) must be wrapped in a module that computes them from x.")
        elif re.search(r"dtype|scalar type|input type|\blong\b|\bfloat\b|\bint\b|double", first, re.I):
            # a type mismatch, not a shape one
            advice = ("signed integer data are passed to the model as int64 ids; if it reads values, "
                      "pass floats (x.astype(np.float32))." if dtype == "int64" else
                      "a model with an embedding reads integer ids: pass them as an integer array "
                      "(x.astype(np.int64)), not floats.")
        else:
            advice = ("pass the one tensor the model's forward takes, shaped like its training input "
                      "([N, C, H, W] for a CNN, [N, L] ids for a text model).")
        raise ExportError(
            f"the model fails on data of shape (N, {', '.join(map(str, x.shape[1:]))}) and dtype {dtype} "
            f"({type(e).__name__}: {first}); {advice}"
        ) from e


# ----------------------------------------------------------------------- the probe pass
@dataclass
class Record:
    """What one module call looked like in the probe pass."""

    name: str
    module: nn.Module
    order: int
    depth: int
    out_shape: tuple[int, ...] | None       # None: not a tensor (RNN tuples are unwrapped)
    out_id: int | None
    in_ids: tuple[int, ...]
    in_shape: tuple[int, ...] | None
    kind: str | None = None
    out_type: str = "Tensor"
    channel_last: bool = False

    @property
    def is_container(self) -> bool:
        return any(True for _ in self.module.children())


def _tensor_of(module: nn.Module, out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if is_a(module, nn.RNNBase) and isinstance(out, tuple) and isinstance(out[0], torch.Tensor):
        return out[0]            # (output, h_n): the output sequence
    return None


def has_weights(module: nn.Module) -> bool:
    """The module holds parameters of its own (not counting its submodules')."""
    return any(True for _ in module.parameters(recurse=False))


def _has(module: nn.Module, types: tuple) -> bool:
    return any(is_a(m, types) for m in module.modules())


def _last_weighted(name: str, module: nn.Module, before: list["Record"]) -> nn.Module:
    """The last layer with weights that ran inside ``module`` (the module itself if none)."""
    inner = [r.module for r in before if r.name.startswith(name + ".") and not r.is_container]
    return next((m for m in reversed(inner) if has_weights(m)), module)


def _channel_last(name: str, module: nn.Module, t: torch.Tensor, before: list["Record"]) -> bool:
    """A 4-D output whose channels are its last axis (Swin's blocks and patch merging,
    ``[B, H, W, C]``): the last layer with weights that ran inside the module (or the module
    itself) is a Linear / LayerNorm acting on that axis. A ConvNeXt block, whose Linear layers
    also act on a permuted copy, permutes back: its last axis is a width, not the Linear's."""
    if t.dim() != 4 or t.shape[1] == t.shape[-1]:
        return False
    last = _last_weighted(name, module, before)
    return is_a(last, (nn.Linear, nn.LayerNorm)) and _width(last) == t.shape[-1]


def _width(m: nn.Module) -> int | None:
    """The feature width a layer with weights produces (None: not one of these). Read from
    the weights where the attribute is missing (an unflattened ``torch.export`` program keeps
    the tensors, not the layer's attributes)."""
    def size(attr: str, tensor: str, axis: int) -> int | None:
        v = getattr(m, attr, None)
        if v is None:
            t = getattr(m, tensor, None)
            v = t.shape[axis] if isinstance(t, torch.Tensor) and -t.dim() <= axis < t.dim() else None
        return v[-1] if isinstance(v, (tuple, list)) else v
    if is_a(m, nn.Linear):
        return size("out_features", "weight", 0)
    if is_a(m, nn.LayerNorm):
        return size("normalized_shape", "weight", -1)
    if is_a(m, nn.Conv1d):
        return size("out_channels", "weight", 0)
    if is_a(m, nn.ConvTranspose1d):
        return getattr(m, "out_channels", None)
    if is_a(m, nn.modules.batchnorm._BatchNorm):
        return size("num_features", "running_mean", 0)
    if is_a(m, nn.Embedding):
        return size("embedding_dim", "weight", 1)
    if is_a(m, nn.MultiheadAttention):
        return size("embed_dim", "in_proj_weight", 1)
    return None


def _kind(name: str, module: nn.Module, t: torch.Tensor, before: list["Record"]) -> str:
    if is_a(module, nn.RNNBase):
        return "sequence"
    if t.dim() == 2:
        return "vector"
    if t.dim() != 3:
        return "map"
    # The axis the module's last layer with weights writes is the channel axis: tokens
    # [B, N, D] when it is the last one, a 1-D map [B, C, T] when it is the second. (LeViT's
    # stages hold BatchNorm1d over flattened tokens: the module types alone say "map".)
    width = _width(_last_weighted(name, module, before))
    if width is not None and t.shape[1] != t.shape[2] and width in (t.shape[1], t.shape[2]):
        return "tokens" if width == t.shape[2] else "map"
    if _has(module, _CHANNEL_FIRST_1D):
        return "map"
    if _has(module, _TOKEN_MAKERS + (nn.RNNBase,)):
        return "tokens"
    return ""                    # a parameter-free op: decided from its neighbours


def probe(model: nn.Module, example: torch.Tensor) -> tuple[list[Record], Any]:
    """Run ``model`` once on the first ``PROBE_SAMPLES`` of ``example`` with a hook on every
    module; return one Record per module call (in the order calls finish) and the model's
    output. Every activation is held until the pass ends (ids must stay unique), so the
    probe runs on a couple of samples, not on a whole batch: shapes and kinds are the same."""
    example = example[:PROBE_SAMPLES]
    records: list[Record] = []
    keep: list[Any] = []    # holds every tensor seen, so their ids stay unique during the pass
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(m, inputs, out, name=name):
            t = _tensor_of(m, out)
            keep.append((inputs, out))
            ins = tuple(id(i) for i in inputs if isinstance(i, torch.Tensor))
            first = next((i for i in inputs if isinstance(i, torch.Tensor)), None)
            records.append(Record(
                name, m, len(records), name.count(".") + 1,
                None if t is None else tuple(t.shape), None if t is None else id(t), ins,
                None if first is None else tuple(first.shape), None if t is None else _kind(name, m, t, records),
                type(out).__name__, t is not None and _channel_last(name, m, t, records)))
        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    last_kind: dict[tuple[int, ...], str] = {}
    for r in records:  # parameter-free 3-D ops inherit the kind of what made that shape
        if r.kind == "":
            r.kind = last_kind.get(r.out_shape, "map")
        if r.out_shape is not None:
            last_kind[r.out_shape] = r.kind
    return records, out


def check_map_reduction(reduction: str) -> None:
    """The detector-wide reduction of feature maps must be one of ``MAP_REDUCTIONS``."""
    if reduction not in MAP_REDUCTIONS:
        raise ExportError(f"unknown reduction {reduction!r}: {opt('reduction')} must be one of "
                          f"{list(MAP_REDUCTIONS)}")


def pad_id_of(records: Sequence[Record], example: torch.Tensor) -> int | None:
    """The ``padding_idx`` of the embedding that reads the model's input ids (None: no such
    embedding, or it declares none)."""
    if example.is_floating_point():
        return None
    shape = tuple(example[:PROBE_SAMPLES].shape)
    emb = next((r.module for r in records if is_a(r.module, nn.Embedding) and r.in_shape == shape), None)
    pad = getattr(emb, "padding_idx", None)
    return None if pad is None else int(pad)      # torch stores a negative padding_idx as its row


def resolve_taps(model: nn.Module, layers: Sequence[str], example: torch.Tensor,
                 map_reduction: str = "max", probabilities: bool = False,
                 records: Sequence[Record] | None = None) -> list[Tap]:
    """Tap specs -> Taps with their reduction settled by the kind of what they see;
    ``probabilities``: the model returns softmax probabilities (``outputs.output_kind``), which
    the output taps read as log p; ``records``: ``probe(model, example)``'s, when the caller
    has them already."""
    check_map_reduction(map_reduction)
    resolve_layers(model, layers)
    if records is None:
        records, _ = probe(model, example)
    n = len(example[:PROBE_SAMPLES])   # the batch size probe() ran
    pad = pad_id_of(records, example)
    by_name = {r.name: r for r in records}
    taps = []
    for spec in layers:
        tap = parse_spec(spec)
        if tap.is_softmax:
            taps.append(dataclasses.replace(tap, from_probabilities=probabilities))
            continue
        rec = by_name.get(tap.module)
        if rec is None:
            raise ExportError(
                f"layer {tap.module!r} was not called during the forward pass; monitor modules "
                "that the model's forward() actually runs.")
        if tap.point == "input":
            if rec.in_shape is None:
                raise ExportError(f"tap {spec!r}: module {tap.module!r} takes no tensor input.")
            # what feeds a module: a vector, the tokens a token module consumes, else a map
            ndim = len(rec.in_shape)
            kind = "vector" if ndim == 2 else (
                "tokens" if ndim == 3 and rec.kind in ("tokens", "sequence", "vector") else "map")
        else:
            if rec.out_shape is None:
                raise ExportError(
                    f"layer {tap.module!r} returns {rec.out_type}, not a tensor; monitor a module "
                    "whose output is a single tensor (e.g. a submodule of it).")
            kind = rec.kind
        shape = rec.in_shape if tap.point == "input" else rec.out_shape
        if len(shape) < 2 or len(shape) > 5:
            raise ExportError(f"layer {spec!r} gives a tensor of shape {shape}; expected [B, D] or "
                              "a feature map / token sequence [B, ...].")
        red = tap.reduction or (map_reduction if kind == "map" else DEFAULTS[kind])
        if red not in ALLOWED[kind] and red != "flatten" and not (kind == "map" and grid_cells(red)):
            raise ExportError(f"tap {spec!r}: reduction {red!r} does not fit a {kind} output of shape "
                              f"{shape}; choose one of {list(ALLOWED[kind])}.")
        channel_last = kind == "map" and tap.point == "output" and rec.channel_last
        k = grid_cells(red)   # a map's (the check above); 1-D or 2-D, at least k positions per axis
        if k is not None:
            space = tuple(shape[1:-1] if channel_last else shape[2:])
            if len(space) not in (1, 2) or min(space) < k:
                raise ExportError(
                    f"tap {spec!r}: {red} averages a feature map over {k} cells per spatial axis, and "
                    f"{tap.module!r} gives {shape} ({'x'.join(map(str, space))} positions): "
                    + (f"choose grid{min(space)} or less." if len(space) in (1, 2) else
                       f"grid<k> reads 1-D and 2-D maps; choose one of {list(ALLOWED[kind])}."))
        time_major = kind in ("sequence", "tokens") and is_time_major(rec.module, shape, n)
        bidirectional = (kind == "sequence" and tap.point == "output"
                         and bool(getattr(rec.module, "bidirectional", False)))
        pad_id = pad if red in ("tokens_mean", "tokens_max") else None
        taps.append(Tap(spec, tap.module, tap.point, red, time_major, channel_last, bidirectional,
                        pad_id=pad_id))
    return taps


def is_time_major(module: nn.Module, shape: Sequence[int] | None, n: int) -> bool:
    """Whether a 3-D sequence / token tensor is ``[T, B, D]`` (an RNN or a torch transformer
    layer without ``batch_first``): told by the axis holding the probe's ``n`` samples, and
    where both could, by the module's own ``batch_first`` (default: batch first)."""
    if shape is None or len(shape) != 3:
        return False
    if (shape[0] == n) != (shape[1] == n):
        return shape[1] == n
    flags = [m.batch_first for m in module.modules() if isinstance(getattr(m, "batch_first", None), bool)]
    return bool(flags) and not flags[0]


def _with_default(tap: Tap, reduction: str) -> Tap:
    return tap if tap.reduction else dataclasses.replace(tap, reduction=reduction)


class ActivationCapture:
    """Forward hooks on the taps' modules; ``collect(logits)`` returns their ``[B, D]``
    features of the last forward pass, in tap order (``SOFTMAX`` computed from the logits)."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap | str], reduction: str = "max"):
        # Spec strings get ``reduction`` for maps (fine for CNNs); use resolve_taps for
        # models whose outputs are tokens or sequences.
        self.taps = [t if isinstance(t, Tap) else _with_default(parse_spec(t), reduction) for t in taps]
        self.layers = [t.spec for t in self.taps]
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []
        self._ids: torch.Tensor | None = None
        if any(t.pad_id is not None for t in self.taps):
            # the model's input ids, for the token taps that leave pads out
            self._handles.append(model.register_forward_pre_hook(self._ids_hook))
        for tap, mod in zip(self.taps, resolve_layers(model, self.layers)):
            if mod is not None:
                self._handles.append(mod.register_forward_hook(self._hook(tap)))

    def _ids_hook(self, _model, inputs):
        self._ids = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None

    def _hook(self, tap: Tap):
        def hook(_module, inputs, output):
            t = inputs[0] if tap.point == "input" else _tensor_of(_module, output)
            if not isinstance(t, torch.Tensor):
                raise ExportError(
                    f"layer {tap.module!r} returns {type(output).__name__}, not a tensor; monitor a "
                    "module whose output is a single tensor (e.g. a submodule of it).")
            self._out[tap.spec] = tap.features(t, self._ids if tap.pad_id is not None else None)
        return hook

    def collect(self, logits: torch.Tensor) -> list[torch.Tensor]:
        missing = [t.spec for t in self.taps if not t.is_softmax and t.spec not in self._out]
        if missing:
            raise ExportError(
                f"layer(s) {missing} were not called during the forward pass; monitor modules "
                "that the model's forward() actually runs.")
        return [t.output_features(logits) if t.is_softmax else self._out[t.spec] for t in self.taps]

    def clear(self) -> None:
        self._out.clear()

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

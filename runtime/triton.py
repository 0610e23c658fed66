"""Write a Triton Inference Server model repository for a ufad detector (no torch needed).

    ufad triton detector.onnx models/ --name mnist_ufad --max-batch 128 --instances 2 [--gpu]
    -> models/mnist_ufad/1/model.onnx + models/mnist_ufad/config.pbtxt

    from ufad.runtime.triton import write_triton_repository
    write_triton_repository("detector.onnx", "models", name="mnist_ufad")

Inputs, outputs, data types and shapes come from onnxruntime's view of the graph, so the
config matches what Triton's onnxruntime backend checks at load time:

- ``max_batch_size > 0`` (default): dims leave out the batch axis; tensors that are only a
  batch axis (``pred``, ``score``, ``is_anomaly``) get ``dims: [ 1 ]`` with
  ``reshape: { shape: [ ] }``; ``dynamic_batching`` merges requests. Triton's onnxruntime
  backend refuses optional inputs on batching models, and ufad's ``threshold`` is a scalar
  without a batch axis, so it is left out: the calibrated threshold embedded in the file
  applies, and a client that wants another one compares the ``score`` output itself
  (``is_anomaly = not (score <= t)``, the format's rule).
- ``--max-batch 0``: no server-side batching; full shapes with ``-1`` for the batch axis, and
  ``threshold`` is an optional input (send a float32 tensor of shape ``[1]``).

The ufad metadata (threshold, classes, layers, score convention, graph sha256) is copied
into ``parameters`` so clients can read it from Triton's model-config endpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import click

from . import format as fmt
from .errors import InputError, ModelFileError

ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(double)": "TYPE_FP64",
    "tensor(bfloat16)": "TYPE_BF16", "tensor(int8)": "TYPE_INT8", "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64", "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16", "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64",
    "tensor(bool)": "TYPE_BOOL", "tensor(string)": "TYPE_STRING",
}
# Metadata copied into the config's `parameters` (Triton backends ignore keys they do not know).
PARAMETER_KEYS = (fmt.KEY_FORMAT_VERSION, fmt.KEY_METHOD, fmt.KEY_THRESHOLD, fmt.KEY_CLASSES,
                  fmt.KEY_LAYERS, fmt.KEY_INPUT, fmt.KEY_CONVENTION, fmt.KEY_GRAPH_SHA256)
DEFAULT_MAX_BATCH = 128


@dataclass(frozen=True)
class TensorSpec:
    """One graph tensor as Triton sees it: name, Triton data type, full shape (-1 = dynamic)."""

    name: str
    data_type: str
    shape: tuple[int, ...]
    optional: bool = False


@dataclass
class TritonModel:
    """What ``write_triton_repository`` wrote."""

    name: str
    model_dir: Path
    model_path: Path
    config_path: Path
    config: str
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    # onnxruntime gives symbolic dims as strings (e.g. "batch") and unknown ones as None.
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _spec(name: str, ort_type: str, shape: Sequence[Any], optional: bool = False) -> TensorSpec:
    if ort_type not in ORT_TO_TRITON:
        raise ModelFileError(f"graph tensor {name!r} has type {ort_type}, which Triton cannot serve")
    return TensorSpec(name, ORT_TO_TRITON[ort_type], _dims(shape), optional)


def read_model_io(model: str | Path) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]:
    """Inputs (with the optional ``threshold``), outputs and ufad metadata of a detector file.

    The file is loaded (and its graph sha256 verified) with onnxruntime on CPU.
    """
    import onnxruntime as ort

    from .session import AnomalySession

    sess = AnomalySession(model, provider="cpu")  # validates: a ufad file, untampered
    so = ort.SessionOptions()
    so.log_severity_level = 3
    raw = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    inputs = [_spec(i.name, i.type, i.shape) for i in raw.get_inputs()]
    # Inputs with a default value are "overridable initializers" to onnxruntime.
    inputs += [_spec(i.name, i.type, i.shape, optional=True) for i in raw.get_overridable_initializers()]
    outputs = [_spec(o.name, o.type, o.shape) for o in raw.get_outputs()]
    meta = sess.metadata  # the verified bytes' metadata, not a second parser's
    if sess.info.input.name not in {i.name for i in inputs}:
        raise ModelFileError(f"{model}: graph has no input {sess.info.input.name!r}; re-export it")
    return inputs, outputs, meta


def _q(s: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _list(xs: Sequence[int]) -> str:
    return "[ " + ", ".join(str(x) for x in xs) + " ]"


def _tensor_block(t: TensorSpec, max_batch: int) -> str:
    lines = ["  {", f"    name: {_q(t.name)}", f"    data_type: {t.data_type}"]
    if max_batch > 0:
        dims = list(t.shape[1:])
        if dims:
            lines.append(f"    dims: {_list(dims)}")
        else:  # only a batch axis: Triton needs a non-empty dims, the model sees [batch]
            lines += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
    else:
        # A scalar model tensor is declared as [ 1 ] (the backend feeds it as a scalar).
        lines.append(f"    dims: {_list(t.shape) if t.shape else '[ 1 ]'}")
    if t.optional:
        lines.append("    optional: true")
    lines.append("  }")
    return "\n".join(lines)


def triton_config(name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                  metadata: dict[str, str] | None = None, *, max_batch: int = DEFAULT_MAX_BATCH,
                  instances: int = 1, gpu: bool = False, max_queue_delay_us: int = 100) -> str:
    """The ``config.pbtxt`` text for the onnxruntime backend (see the module docstring)."""
    if max_batch < 0:
        raise InputError(f"--max-batch must be >= 0 (0 = no batching), got {max_batch}")
    if instances < 1:
        raise InputError(f"--instances must be >= 1, got {instances}")
    if max_batch > 0:
        inputs = [t for t in inputs if not t.optional]  # refused by the backend when batching
        fixed = [t.name for t in (*inputs, *outputs) if not t.shape or t.shape[0] != -1]
        if fixed:
            raise ModelFileError(
                f"tensors {fixed} have no dynamic batch axis, so Triton cannot batch this model; "
                "re-export it with a dynamic batch axis, or use --max-batch 0."
            )
    out = [f"name: {_q(name)}", 'platform: "onnxruntime_onnx"', f"max_batch_size: {max_batch}"]
    out.append("input [\n" + ",\n".join(_tensor_block(t, max_batch) for t in inputs) + "\n]")
    out.append("output [\n" + ",\n".join(_tensor_block(t, max_batch) for t in outputs) + "\n]")
    if max_batch > 0:
        out.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}")
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    out.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    for key in PARAMETER_KEYS:
        if metadata and key in metadata:
            out.append(f"parameters {{\n  key: {_q(key)}\n  value: {{ string_value: {_q(metadata[key])} }}\n}}")
    return "\n".join(out) + "\n"


def _default_name(model: Path) -> str:
    name = re.sub(r"[^0-9A-Za-z_-]", "_", model.stem) or "ufad"
    return name


def write_triton_repository(model: str | Path, repo_dir: str | Path, *, name: str | None = None,
                            max_batch: int = DEFAULT_MAX_BATCH, instances: int = 1, gpu: bool = False,
                            max_queue_delay_us: int = 100, version: int = 1,
                            force: bool = False) -> TritonModel:
    """Write ``repo_dir/<name>/<version>/model.onnx`` and ``repo_dir/<name>/config.pbtxt``.

    Refuses to replace an existing model of that name unless ``force``.
    """
    model = Path(model)
    name = name or _default_name(model)
    if not re.fullmatch(r"[0-9A-Za-z_.-]+", name) or name.startswith("."):
        raise InputError(f"model name {name!r}: use letters, digits, '_', '-' and '.' only")
    if version < 1:
        raise InputError(f"--version must be >= 1, got {version}")
    inputs, outputs, meta = read_model_io(model)
    config = triton_config(name, inputs, outputs, meta, max_batch=max_batch, instances=instances,
                           gpu=gpu, max_queue_delay_us=max_queue_delay_us)
    model_dir = Path(repo_dir) / name
    config_path = model_dir / "config.pbtxt"
    version_dir = model_dir / str(version)
    if (config_path.exists() or version_dir.exists()) and not force:
        raise InputError(f"{model_dir} already holds a Triton model; pass --force to replace it, or pick another --name")
    if repo_dir and Path(repo_dir).exists() and not Path(repo_dir).is_dir():
        raise InputError(f"{repo_dir} is a file, expected a directory for the model repository")
    version_dir.mkdir(parents=True, exist_ok=True)
    model_path = version_dir / "model.onnx"
    shutil.copyfile(model, model_path)
    tmp = config_path.with_name("config.pbtxt.tmp")
    tmp.write_text(config)
    tmp.replace(config_path)
    notes = []
    if max_batch > 0 and any(t.optional for t in inputs):
        notes.append(
            "threshold is not a Triton input with batching (the backend refuses optional inputs on "
            "batching models): the calibrated threshold applies; use --max-batch 0 to send your own, "
            "or compare the score output with yours (is_anomaly = not (score <= t))."
        )
    return TritonModel(name=name, model_dir=model_dir, model_path=model_path, config_path=config_path,
                       config=config, inputs=list(inputs), outputs=list(outputs), notes=notes)


@click.command("triton")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("repo_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name in the repository (default: the file's stem).")
@click.option("--max-batch", type=click.IntRange(0), default=DEFAULT_MAX_BATCH, show_default=True,
              help="max_batch_size; 0 turns off Triton's batching and exposes the threshold input.")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Model instances (copies) per device: parallel executions.")
@click.option("--gpu", is_flag=True, help="Run the instances on GPUs (KIND_GPU) instead of CPU.")
@click.option("--max-queue-delay-us", type=click.IntRange(0), default=100, show_default=True,
              help="How long dynamic batching may hold a request to form a larger batch.")
@click.option("--version", "version", type=click.IntRange(1), default=1, show_default=True,
              help="Model version directory.")
@click.option("--force", is_flag=True, help="Replace an existing model of that name.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def triton_command(model, repo_dir, name, max_batch, instances, gpu, max_queue_delay_us, version, force, as_json):
    """Write a Triton Inference Server model repository entry for the detector MODEL."""
    res = write_triton_repository(model, repo_dir, name=name, max_batch=max_batch, instances=instances,
                                  gpu=gpu, max_queue_delay_us=max_queue_delay_us, version=version,
                                  force=force)
    if as_json:
        click.echo(json.dumps({"name": res.name, "model": str(res.model_path), "config": str(res.config_path),
                               "inputs": [t.name for t in res.inputs if not (t.optional and max_batch > 0)],
                               "outputs": [t.name for t in res.outputs], "notes": res.notes}))
        return
    click.echo(f"wrote {res.model_path}")
    click.echo(f"wrote {res.config_path} (max_batch_size {max_batch}, {instances} x {'GPU' if gpu else 'CPU'} instance(s))")
    for n in res.notes:
        click.echo(f"note: {n}")
    click.echo(f"serve: docker run --rm {'--gpus all ' if gpu else ''}-p8000:8000 -p8001:8001 -p8002:8002 "
               f"-v {Path(repo_dir).resolve()}:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 "
               "tritonserver --model-repository=/models")

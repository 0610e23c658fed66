"""`ufad triton` writes a Triton model repository whose config.pbtxt matches the real
detector's inputs/outputs under the rules Triton's onnxruntime backend applies at load time
(ValidateInputs / ValidateOutputs / CompareDimsSupported in triton-inference-server/
onnxruntime_backend): batch axis -1 and left out of dims when max_batch_size > 0, reshape for
batch-only tensors, no optional inputs on batching models, scalars declared as [1].
No Triton server here: the config is parsed back with a small text-format parser.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from ufad.runtime.cli import main
from ufad.runtime.triton import write_triton_repository

TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> {field: [values]}; messages become dicts, scalars str/int."""
    toks = []
    pos = 0
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"bad token at {text[pos:pos + 20]!r}")
        pos = m.end()
        if m.group(1):
            continue
        toks.append(m.group(2) or m.group(3) or m.group(4))
    toks = [t for t in toks if t]

    def scalar(t):
        if t.startswith('"'):
            return json.loads(t)  # our escapes (\\ \" \n) are JSON-compatible
        try:
            return int(t)
        except ValueError:
            return {"true": True, "false": False}.get(t, t)

    def value(i):
        t = toks[i]
        if t == "{":
            return message(i + 1, "}")
        if t == "[":
            vals, i = [], i + 1
            while toks[i] != "]":
                v, i = value(i)
                vals.append(v)
                if toks[i] == ",":
                    i += 1
            return vals, i + 1
        return scalar(t), i + 1

    def message(i, end):
        out: dict = {}
        while i < len(toks) and toks[i] != end:
            name = toks[i]
            i += 1
            if toks[i] == ":":
                i += 1
            v, i = value(i)
            # `field: [a, b]` is a repeated field written as a list
            out.setdefault(name, []).extend(v if isinstance(v, list) and name != "shape" and name != "dims" else [v])
        return out, i + 1

    msg, _ = message(0, None)
    return msg


ORT_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL"}


def model_tensors(path):
    """What Triton's onnxruntime backend sees: inputs, overridable initializers, outputs."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    dims = lambda shape: [d if isinstance(d, int) else -1 for d in shape]  # noqa: E731
    ins = {i.name: (ORT_TYPES[i.type], dims(i.shape)) for i in s.get_inputs()}
    ovr = {i.name: (ORT_TYPES[i.type], dims(i.shape)) for i in s.get_overridable_initializers()}
    outs = {o.name: (ORT_TYPES[o.type], dims(o.shape)) for o in s.get_outputs()}
    return ins, ovr, outs


def check_like_triton(cfg: dict, path) -> None:
    """The onnxruntime backend's load-time checks, applied to our config and the real model."""
    ins, ovr, outs = model_tensors(path)
    mbs = cfg["max_batch_size"][0]
    required = [t for t in cfg["input"] if not t.get("optional", [False])[0]]
    assert len(required) == len(ins), "configuration expects N inputs, model provides M"
    for io, model, exact in [(t, {**ins, **ovr}, False) for t in cfg["input"]] + [(t, outs, True) for t in cfg["output"]]:
        name = io["name"][0]
        assert name in model, f"unexpected tensor {name}"
        dtype, shape = model[name]
        assert io["data_type"][0] == dtype, name
        optional = io.get("optional", [False])[0]
        assert not (optional and mbs != 0), "optional input on a batching model is refused"
        dims = io["reshape"][0]["shape"][0] if "reshape" in io else io["dims"][0]
        if not shape:  # scalar model tensor: all config dims must be 1
            assert all(d == 1 for d in io["dims"][0]), name
            continue
        if mbs > 0:
            assert shape[0] == -1, f"{name}: first dim must be the dynamic batch axis"
            shape = shape[1:]
        assert len(shape) == len(dims), (name, shape, dims)
        for m, c in zip(shape, dims):
            assert m == c or (m == -1 and (c == -1 or not exact)), (name, shape, dims)
        if "reshape" in io:
            assert io["dims"][0] == [1] and dims == [], name


def test_triton_repository_batching(exported_path, session, tmp_path):
    res = write_triton_repository(exported_path, tmp_path / "repo", name="mnist_ufad", max_batch=64, instances=3)
    model_file = tmp_path / "repo" / "mnist_ufad" / "1" / "model.onnx"
    assert res.model_path == model_file and model_file.read_bytes() == exported_path.read_bytes()
    cfg = parse_pbtxt((tmp_path / "repo" / "mnist_ufad" / "config.pbtxt").read_text())
    assert cfg["name"] == ["mnist_ufad"] and cfg["platform"] == ["onnxruntime_onnx"]
    assert cfg["max_batch_size"] == [64]
    assert cfg["instance_group"] == [{"count": [3], "kind": ["KIND_CPU"]}]
    assert cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [100]
    check_like_triton(cfg, exported_path)

    by_name = {t["name"][0]: t for t in cfg["input"] + cfg["output"]}
    assert [t["name"][0] for t in cfg["input"]] == ["input"]  # threshold: refused on batching models
    assert by_name["input"]["dims"] == [[1, 28, 28]] and by_name["input"]["data_type"] == ["TYPE_FP32"]
    assert by_name["logits"]["dims"] == [[10]]
    assert by_name["layer_scores"]["dims"] == [[len(session.layer_names)]]
    for n in ("pred", "score", "is_anomaly"):
        assert by_name[n]["dims"] == [[1]] and by_name[n]["reshape"] == [{"shape": [[]]}]
    assert by_name["pred"]["data_type"] == ["TYPE_INT64"] and by_name["is_anomaly"]["data_type"] == ["TYPE_BOOL"]
    for layer in session.info.layers:
        assert by_name[layer.output]["dims"] == [[layer.dim]]
    assert set(by_name) == {"input", "logits", "pred", "score", "is_anomaly", "layer_scores", "input_ok",
                            *(l.output for l in session.info.layers)}
    params = {p["key"][0]: p["value"][0]["string_value"][0] for p in cfg["parameters"]}
    assert float(params["ufad.threshold"]) == session.threshold
    assert json.loads(params["ufad.classes"]) == list(session.classes)
    assert params["ufad.graph_sha256"] == session.info.graph_sha256
    assert json.loads(params["ufad.input"])["shape"] == [None, 1, 28, 28]
    assert res.notes and "threshold" in res.notes[0]


def test_triton_no_batching_threshold_input_gpu_and_cli(exported_path, session, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["triton", str(exported_path), str(tmp_path / "repo"), "--name", "m0",
                             "--max-batch", "0", "--gpu", "--instances", "2", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["inputs"] == ["input", "threshold"]
    cfg = parse_pbtxt((tmp_path / "repo" / "m0" / "config.pbtxt").read_text())
    assert cfg["max_batch_size"] == [0] and "dynamic_batching" not in cfg
    assert cfg["instance_group"] == [{"count": [2], "kind": ["KIND_GPU"]}]
    check_like_triton(cfg, exported_path)
    thr = [t for t in cfg["input"] if t["name"] == ["threshold"]][0]
    assert thr["optional"] == [True] and thr["dims"] == [[1]] and thr["data_type"] == ["TYPE_FP32"]
    score = [t for t in cfg["output"] if t["name"] == ["score"]][0]
    assert score["dims"] == [[-1]] and "reshape" not in score

    # What the backend does with that config: feed threshold as a scalar (or leave it out).
    x = np.random.default_rng(0).uniform(0, 1, (3, 1, 28, 28)).astype(np.float32)
    s = ort.InferenceSession(str(tmp_path / "repo" / "m0" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    default = s.run(["is_anomaly", "score"], {"input": x})
    fed = s.run(["is_anomaly"], {"input": x, "threshold": np.array(1e9, np.float32)})
    assert default[0].all() and not fed[0].any()  # noise flagged by default, accepted at 1e9

    # Existing model: refused without --force; default name from the file name.
    r = runner.invoke(main, ["triton", str(exported_path), str(tmp_path / "repo"), "--name", "m0"])
    assert r.exit_code == 2 and "already holds a Triton model" in r.output and "--force" in r.output
    r = runner.invoke(main, ["triton", str(exported_path), str(tmp_path / "repo"), "--name", "m0", "--force"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["triton", str(exported_path), str(tmp_path / "repo")])
    assert r.exit_code == 0 and (tmp_path / "repo" / exported_path.stem / "config.pbtxt").exists()
    r = runner.invoke(main, ["triton", str(tmp_path / "missing.onnx"), str(tmp_path / "repo")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "no such file" in r.output
    r = runner.invoke(main, ["triton", str(exported_path), str(tmp_path / "repo"), "--name", "../x"])
    assert r.exit_code == 2 and "model name" in r.output


def test_triton_module_is_torch_free():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ufad.runtime.triton import triton_command, write_triton_repository\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr

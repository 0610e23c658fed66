"""What the detector's head costs at batch 1, split by cause: graph variants of one exported RBF
detector, each timed against the bare model in fresh processes, alternating, over ``--rounds``.

    python tools/head_cost.py BARE.onnx DETECTOR.onnx [--rounds 5] [--calls 2000] [--stages]

Variants (timing only: the variants' scores are not the detector's):

- ``chain63`` / ``chain126``: the bare model followed by 63 / 126 Add nodes on its logits (a
  [1, C] tensor and a constant): what a node costs after a model whose weights have just
  flushed the caches, when it reads almost nothing;
- ``detector``: the detector as exported;
- ``diag_whitening``: its whitening MatMul (a D x D matrix) replaced by a Mul with a D vector:
  the same node count, the matrix not read;
- ``sv_half`` / ``sv_quarter``: every layer's support-vector weights ``[C, D_l, m_l]`` cut to
  m_l / 2 and m_l / 4 (the first ones): what fewer support vectors would save.

With ``--stages``, the detector cut after each part of its work instead (``onnx.utils``'
extractor keeps what the named outputs need), to show what each part adds:

- ``s1_taps``: the logits and every monitored activation (the tap reductions, ``@`` taps);
- ``s2_norms``: + the prediction and every layer's ||u||^2 (the concat of the features, the
  whitening MatMul, the norm MatMul): what any region form reads before its kernel;
- ``s3_layer_scores``: + the per-class regions (the kernel logits, their log-sum-exp, the
  z-scores): the detector without its score, NaN guard and verdict;
- ``detector``: all of it;
- ``detector_session``: the same file through ``AnomalySession.run`` (``ufad bench``'s way):
  what the Python runtime adds (its input checks, the result object).

Same session options as ``ufad bench`` (``ort_session_options``: 2 threads, sequential).
Fresh processes, not one process holding every session: there, the idle sessions' thread
pools slowed the bare model 2x.
BENCHMARKS.md, "ResNet-18 at batch 1, session 19", has the numbers from the session-15
detectors (``tools/head_variants.py fit``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time_one(path: str, calls: int, threads: int) -> float:
    """Median us of ``calls`` batch-1 runs of the first five outputs (after 200 warm-up runs);
    ``path@session``: the file through ``AnomalySession.run``, as ``ufad bench`` times it."""
    import onnxruntime as ort

    from ufad.exporter.bench.timing import ort_session_options

    path, _, via = path.partition("@")
    sess = ort.InferenceSession(path, ort_session_options(threads), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    feed = {inp.name: np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)}
    outs = [o.name for o in sess.get_outputs()][:5]
    call = lambda: sess.run(outs, feed)  # noqa: E731
    if via == "session":
        from ufad.runtime import AnomalySession

        del sess
        det = AnomalySession(path, provider="cpu", threads=threads)
        x = feed[inp.name]
        call = lambda: det.run(x)  # noqa: E731
    for _ in range(200):
        call()
    t = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        t.append(time.perf_counter() - t0)
    return float(np.median(t) * 1e6)


def _save(model, path: Path) -> str:
    import onnx

    del model.graph.value_info[:]      # stale shapes of edited tensors
    onnx.save(model, str(path))
    return str(path)


def chain(bare: Path, n: int, out: Path) -> str:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(bare))
    g = m.graph
    prev = g.output[0].name
    width = [d.dim_value for d in g.output[0].type.tensor_type.shape.dim][-1] or 1
    g.initializer.append(numpy_helper.from_array(np.full((1, width), 1e-3, np.float32), "chain_c"))
    for i in range(n):
        g.node.append(helper.make_node("Add", [prev, "chain_c"], [f"chain_{i}"]))
        prev = f"chain_{i}"
    g.output.append(helper.make_tensor_value_info(prev, TensorProto.FLOAT, None))
    return _save(m, out)


def diag_whitening(det: Path, out: Path) -> str:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(det))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    found = 0
    for node in g.node:
        if node.op_type == "MatMul" and any(i.startswith("head.wh_a") for i in node.input):
            d = numpy_helper.to_array(inits[node.input[1]]).shape[0]
            node.op_type, node.input[1] = "Mul", f"diag_{found}"
            g.initializer.append(numpy_helper.from_array(np.ones(d, np.float32), f"diag_{found}"))
            found += 1
    if not found:
        raise SystemExit(f"{det}: no whitening MatMul (head.wh_a*): export it with whiten='penultimate'")
    return _save(m, out)


def fewer_support_vectors(det: Path, frac: float, out: Path) -> str:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(det))
    g = m.graph
    inits = {i.name: i for i in g.initializer}

    def put(name: str, arr: np.ndarray) -> None:
        old = numpy_helper.to_array(inits[name])
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(old.dtype), name))

    names = sorted((n for n in inits if n.startswith("head.sv_w")), key=lambda n: int(n[len("head.sv_w"):]))
    if not names:
        raise SystemExit(f"{det}: no support-vector weights (head.sv_w*): an RBF detector with exact regions is needed")
    widths = [numpy_helper.to_array(inits[n]).shape[2] for n in names]
    new = [max(1, round(w * frac)) for w in widths]
    segs = np.split(numpy_helper.to_array(inits["head.sv_c"]), np.cumsum(widths)[:-1], axis=1)
    put("head.sv_c", np.concatenate([s[:, :k] for s, k in zip(segs, new)], axis=1))
    for n, k in zip(names, new):
        put(n, numpy_helper.to_array(inits[n])[:, :, :k])
    # the int64 shape constants that name the old total width (the Split sizes, an Expand shape)
    split = next(n for n in g.node if n.op_type == "Split")
    put(split.input[1], np.array(new, np.int64))
    for i in list(g.initializer):
        a = numpy_helper.to_array(i)
        if i.name != split.input[1] and a.dtype == np.int64 and a.size < 8 and sum(widths) in a.ravel():
            put(i.name, np.where(a == sum(widths), sum(new), a))
    return _save(m, out)


def stages(det: Path, work: Path) -> dict[str, str]:
    """The detector cut after each part of its work (see the module docstring)."""
    import onnx
    import onnx.utils

    from ufad.runtime import format as fmt

    m = onnx.load(str(det))
    outs = [o.name for o in m.graph.output]
    acts = [o for o in outs if o.startswith(fmt.ACTIVATION_PREFIX)]
    norms = [n.output[0] for n in m.graph.node if n.op_type == "MatMul" and "head.norm_w" in n.input]
    if not norms:
        raise SystemExit(f"{det}: no norm MatMul (head.norm_w): a fused RBF or ball detector is needed")
    cuts = {"s1_taps": ["logits", *acts], "s2_norms": ["logits", "pred", *acts, *norms],
            "s3_layer_scores": ["logits", "pred", *acts, *norms, "layer_scores"]}
    extractor = onnx.utils.Extractor(m)
    return {name: _save(extractor.extract_model(["input"], keep), work / f"{name}.onnx")
            for name, keep in cuts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bare", type=Path)
    ap.add_argument("detector", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", action="store_true", help="time the detector cut after each part of its work")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(_time_one(a.one, a.calls, a.threads)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        if a.stages:
            files = {"bare": str(a.bare), **stages(a.detector, t), "detector": str(a.detector),
                     "detector_session": f"{a.detector}@session"}
        else:
            files = {"bare": str(a.bare), "chain63": chain(a.bare, 63, t / "c63.onnx"),
                     "chain126": chain(a.bare, 126, t / "c126.onnx"), "detector": str(a.detector),
                     "diag_whitening": diag_whitening(a.detector, t / "diag.onnx"),
                     "sv_half": fewer_support_vectors(a.detector, 0.5, t / "half.onnx"),
                     "sv_quarter": fewer_support_vectors(a.detector, 0.25, t / "quarter.onnx")}
        times: dict[str, list[float]] = {k: [] for k in files}
        for _ in range(a.rounds):
            for k, path in files.items():   # fresh processes, alternating: a neighbour slows all alike
                out = subprocess.run([sys.executable, __file__, str(a.bare), str(a.detector), "--one", path,
                                      "--calls", str(a.calls), "--threads", str(a.threads)],
                                     capture_output=True, text=True, check=True)
                times[k].append(json.loads(out.stdout.strip().splitlines()[-1]))
    bare = np.median(times["bare"])
    print(f"batch 1, {a.threads} threads, {a.rounds} rounds x {a.calls} calls, medians")
    print(f"{'variant':16s} {'us':>8s} {'vs bare':>8s}  per-round ratios")
    for k, v in times.items():
        ratios = np.round(np.asarray(v) / np.asarray(times["bare"]), 3)
        print(f"{k:16s} {np.median(v):8.1f} {np.median(v) / bare:7.3f}x  {ratios.tolist()}")


if __name__ == "__main__":
    main()

"""Where a detector's extra time goes: onnxruntime's own per-node profile of the bare model and
of the detector, and the nodes the detector adds (after onnxruntime's graph optimisations),
with their median kernel times.

    python tools/node_profile.py BARE.onnx DETECTOR.onnx --batch 1 --calls 600 [--top 40]

onnxruntime runs every node of a graph at every call, whatever outputs are fetched (the
monitored activations included), so the node count is a cost in itself: at batch 1 each small
node costs ~2 us on a model whose weights have just flushed the caches (BENCHMARKS.md,
"ResNet-18 at batch 1, session 17"). Profiling adds its own per-node cost, so the sums here
overstate the real difference; compare them with each other, not with ``ufad bench``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def profile(path: Path, x: np.ndarray, calls: int, threads: int) -> tuple[float, dict[str, tuple[float, str]]]:
    """Median ``model_run`` time (us) and, per optimised node, (median kernel us, op type)."""
    import onnxruntime as ort

    from ufad.exporter.bench.timing import ort_session_options

    with tempfile.TemporaryDirectory() as tmp:
        sess = ort.InferenceSession(str(path), ort_session_options(threads, os.path.join(tmp, "p")),
                                    providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        for _ in range(calls):
            sess.run(None, {name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    times: dict[str, list[float]] = collections.defaultdict(list)
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][:-len("_kernel_time")]
            times[node].append(e["dur"])
            ops[node] = e["args"].get("op_name", "?")
    runs = [e["dur"] for e in events if e.get("name") == "model_run"]
    skip = calls // 10   # warm-up
    return float(np.median(runs[skip:])), {k: (float(np.median(v[skip:])), ops[k]) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bare", type=Path)
    ap.add_argument("detector", type=Path)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=600)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=40, help="added nodes listed (slowest first)")
    a = ap.parse_args()
    import onnx

    shape = [d.dim_value or a.batch for d in onnx.load(str(a.bare), load_external_data=False)
             .graph.input[0].type.tensor_type.shape.dim]
    shape[0] = a.batch
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    bare_run, bare = profile(a.bare, x, a.calls, a.threads)
    det_run, det = profile(a.detector, x, a.calls, a.threads)
    added = sorted(((t, op, n) for n, (t, op) in det.items() if n not in bare), reverse=True)
    print(f"model_run median (profiled): bare {bare_run:.0f} us, detector {det_run:.0f} us "
          f"(+{det_run - bare_run:.0f} us)")
    print(f"optimised nodes: bare {len(bare)}, detector {len(det)}; {len(added)} added, "
          f"their kernels {sum(t for t, _, _ in added):.0f} us")
    for t, op, n in added[:a.top]:
        print(f"{t:8.1f} us  {op:18s} {n}")


if __name__ == "__main__":
    main()

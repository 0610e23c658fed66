"""(a) or (b) timed alone in a fresh torch-free process (one onnxruntime session per process,
as deployed). ``python -m ufad.exporter.bench.time_worker SPEC.json bare|ufad`` prints one
JSON line: the raw call times per batch size."""

from __future__ import annotations

from . import no_torch

no_torch.block()

import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from .timing import ort_session_options, time_interleaved  # noqa: E402


def main(spec_path: str, variant: str) -> dict:
    import onnxruntime as ort

    from ufad.runtime import AnomalySession

    cfg = json.loads(open(spec_path).read())
    if variant == "bare":
        sess = ort.InferenceSession(cfg["bare"], ort_session_options(cfg["threads"]),
                                    providers=["CPUExecutionProvider"])
        call = lambda x: sess.run(None, {"input": x})  # noqa: E731
    else:
        det = AnomalySession(cfg["detector"], provider="cpu", threads=cfg["threads"])
        call = det.run
    out: dict = {"times": {}}
    with np.load(cfg["inputs"]) as xs:
        for b, reps, warm in cfg["plan"]:
            x = np.ascontiguousarray(xs[str(b)])
            out["times"][str(b)] = time_interleaved({"call": lambda: call(x)}, reps, warm)["call"]
    out["torch_in_modules"] = no_torch.torch_loaded()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))

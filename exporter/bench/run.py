"""``ufad bench``: what the detector costs on top of the bare model, measured in ONE run.

Three ways to get logits + an anomaly score for the same model, timed on the same machine
with the same thread counts (medians and p95 over many calls, after warm-up). (a) and (b)
each run alone in fresh torch-free processes, alternating a, b, a, b, ... (one onnxruntime
session per process, as deployed); (c) runs in the bench process:

(a) ``bare``: the classifier alone, exported with the same ``torch.onnx.export`` settings
    as the detector and run in onnxruntime: the floor.
(b) ``ufad``: the detector .onnx through ``AnomalySession.run`` (input checks included).
(c) ``host``: what a user without ufad runs (the pytorch-ood / paper way): the eager
    PyTorch model with forward hooks, reduced activations -> numpy -> scikit-learn
    ``OneClassSVM.decision_function`` of the predicted class per layer (the batch grouped
    by predicted class), normalised like the detector. Its SVMs are refitted on exactly
    the detector's fitting points, so its scores must match (b): that is asserted.

Also measured: fit + calibrate + export wall/CPU time and peak RSS (in a subprocess), the
.onnx sizes, and the torch-free runtime (import + session creation + RSS after a 256 batch,
in a subprocess where importing torch raises ImportError). ``run_bench`` returns one
JSON-ready dict (schema ``ufad.bench/1``); ``report`` renders it, ``ufad.exporter.bars``
judges it against a bars file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ufad.runtime.errors import EvaluationError

from .config import SCHEMA, VARIANT_LABELS, VARIANTS, BenchConfig, machine_info
from .host import HostDetector, agreement
from .timing import ort_session_options, summarize, time_interleaved


def _worker(module: str, args: list[str], threads: int, what: str) -> subprocess.CompletedProcess:
    """Run ``python -m ufad.exporter.bench.<module> ARGS``; a failure is an EvaluationError
    with the worker's last lines."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", f"ufad.exporter.bench.{module}", *args],
                          capture_output=True, text=True, env=env, cwd=os.getcwd())
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise EvaluationError(f"the {what} subprocess failed (exit {proc.returncode}):\n{tail}")
    return proc


def _last_json(proc: subprocess.CompletedProcess) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fit_and_export(cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    """Run ``fit_worker`` in a fresh Python process; returns its result dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "fit_config.json"
    cfg_path.write_text(json.dumps({
        "out_dir": str(out_dir), "model": cfg.model, "data": cfg.data, "limit": cfg.limit,
        "calib_limit": cfg.calib_limit, "seed": cfg.seed, "max_points": cfg.max_points,
        "threads": cfg.threads,
    }))
    t0 = time.perf_counter()
    _worker("fit_worker", [str(cfg_path)], cfg.threads, "fit/export")
    res = json.loads((out_dir / "fit_result.json").read_text())
    res["process_wall_s"] = time.perf_counter() - t0
    return res


def export_bare(model, example: np.ndarray, path: Path) -> int:
    """Export the classifier alone with the detector's exporter settings; returns its size."""
    import torch

    from ufad.runtime import format as fmt

    from ..onnx_export import quiet_torch_export

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with quiet_torch_export():
        program = torch.onnx.export(
            model, (torch.as_tensor(example),), f=None, input_names=["input"],
            output_names=[fmt.OUT_LOGITS], dynamic_shapes=({0: batch},), dynamo=True,
            external_data=False, optimize=True,
        )
    data = program.model_proto.SerializeToString()
    path.write_bytes(data)
    return len(data)


def runtime_without_torch(detector: Path, x256: np.ndarray, threads: int, runs: int,
                          tmp: Path) -> dict[str, Any]:
    """Import + session creation time and RSS after scoring 256 inputs, in fresh processes
    where ``import torch`` raises ImportError (``runtime_worker``); medians over ``runs``."""
    from ..data import input_array

    xpath = tmp / "x256.npy"
    np.save(xpath, np.ascontiguousarray(input_array(x256)))
    rows = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        proc = _worker("runtime_worker", [str(detector), str(xpath), str(threads)], threads, "torch-free runtime")
        row = _last_json(proc)
        row["process_wall_s"] = time.perf_counter() - t0
        rows.append(row)
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out: dict[str, Any] = {k: float(np.median([r[k] for r in rows])) for k in keys}
    out["import_plus_session_s"] = float(np.median([r["import_s"] + r["session_s"] for r in rows]))
    out["torch_blocked"] = all(r["torch_blocked"] and not r["torch_in_modules"] for r in rows)
    out["runs"] = len(rows)
    return out


def time_bare_and_ufad(bare: Path, detector: Path, xs: dict[int, np.ndarray], cfg: BenchConfig,
                       tmp: Path) -> dict[str, dict[str, list[float]]]:
    """Raw call times of (a) and (b) per batch size. Each variant runs ALONE in a fresh
    torch-free process (``time_worker``; one onnxruntime session per process, as deployed:
    two sessions in one process each keep an intra-op pool whose idle workers spin for
    milliseconds and take a core from the other); the processes alternate a, b, a, b, ...
    so that a noisy neighbour still slows both alike. ``cfg.rounds`` pairs, each taking
    1/rounds of the calls: a process's own speed varies (here +-20% between launches), so
    more rounds, not more calls, steady the ratio."""
    np.savez(tmp / "timing_inputs.npz", **{str(b): x for b, x in xs.items()})
    out: dict[str, dict[str, list[float]]] = {"bare": {str(b): [] for b in xs}, "ufad": {str(b): [] for b in xs}}
    for r in range(cfg.rounds):
        spec = tmp / f"timing_{r}.json"
        spec.write_text(json.dumps({
            "bare": str(bare), "detector": str(detector), "threads": cfg.threads,
            "inputs": str(tmp / "timing_inputs.npz"),
            "plan": [[b, -(-cfg.repeats_for(b) // cfg.rounds), cfg.warmup_for(b)] for b in xs],
        }))
        for variant in ("bare", "ufad"):
            res = _last_json(_worker("time_worker", [str(spec), variant], cfg.threads, "timing"))
            if res["torch_in_modules"]:
                raise EvaluationError("torch was imported in the timing subprocess; (a) / (b) would not be torch-free")
            for b, ts in res["times"].items():
                out[variant][b].extend(ts)
    return out


def _bench_data(cfg: BenchConfig, n: int) -> np.ndarray:
    """Timed inputs: the test split of a built-in dataset, or the first rows of an .npz."""
    from ..data import input_array, load_data

    x, _, _ = load_data(cfg.data, "test", n)
    return np.ascontiguousarray(input_array(x[:n]))


def _time_cuda(bare: Path, detector: Path, xs: dict[int, np.ndarray], cfg: BenchConfig) -> dict[str, Any]:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"available": False, "reason": "onnxruntime has no CUDAExecutionProvider here "
                f"(providers: {ort.get_available_providers()})"}
    from ufad.runtime import AnomalySession

    sess_a = ort.InferenceSession(str(bare), ort_session_options(cfg.threads),
                                  providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    sess_b = AnomalySession(detector, provider="cuda", threads=cfg.threads)
    lat: dict[str, dict[str, Any]] = {"bare": {}, "ufad": {}}
    for b, x in xs.items():
        t = time_interleaved({"bare": lambda: sess_a.run(None, {"input": x}), "ufad": lambda: sess_b.run(x)},
                             cfg.repeats_for(b), cfg.warmup_for(b))
        for k in t:
            lat[k][str(b)] = summarize(t[k], b)
    return {"available": True, "device": ort.get_device(), "latency": lat,
            "ratios": {str(b): {"b_over_a": lat["ufad"][str(b)]["median_ms"] / lat["bare"][str(b)]["median_ms"]}
                       for b in xs}}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole benchmark; returns the ``ufad.bench/1`` dict (see module docstring)."""
    import onnxruntime as ort
    import torch

    from ufad.runtime import AnomalySession

    from ..model_loading import load_factory

    torch.set_num_threads(cfg.threads)
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work
        torch.set_num_interop_threads(1)
    tmp_ctx = tempfile.TemporaryDirectory(prefix="ufad-bench-") if cfg.workdir is None else contextlib.nullcontext(cfg.workdir)
    with tmp_ctx as tmp_name:
        tmp = Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        log(f"fit + calibrate + export in a subprocess ({cfg.data}, limit={cfg.limit}) ...")
        fit = fit_and_export(cfg, tmp)
        det_path = tmp / "detector.onnx"
        log(f"  {fit['total_s']:.1f} s wall, peak RSS {fit['peak_rss_mb']:.0f} MB")

        model = load_factory(cfg.model).eval()
        bmax = max(cfg.batches)
        x_all = _bench_data(cfg, max(bmax, 256))
        bare_path = tmp / "bare.onnx"
        bare_bytes = export_bare(model, x_all[:2], bare_path)
        det_bytes = det_path.stat().st_size

        log("refit scikit-learn OneClassSVMs for the host-side reference (c) ...")
        with np.load(tmp / "fit_data.npz") as z:
            fit_data = {k: z[k] for k in z.files}
        host = HostDetector.refit(model, fit, fit_data)

        sess_a = ort.InferenceSession(str(bare_path), ort_session_options(cfg.threads),
                                      providers=["CPUExecutionProvider"])
        sess_b = AnomalySession(det_path, provider="cpu", threads=cfg.threads)

        # The same inputs through (b) and (c): scores must agree before any timing counts.
        res_b = sess_b.run(x_all)
        _, pred_c, score_c = host.score(x_all)
        # batch_size=1 as well: small batches take the detector's gather-first graph branch
        res_b1 = sess_b.run(x_all[:16], batch_size=1)
        agree = agreement(np.concatenate([res_b.score, res_b1.score]), np.concatenate([score_c, score_c[:16]]),
                          np.concatenate([res_b.pred, res_b1.pred]), np.concatenate([pred_c, pred_c[:16]]))
        logits_a = sess_a.run(None, {"input": x_all})[0]
        agree["bare_logits_max_abs_diff"] = float(np.abs(logits_a - res_b.logits).max())

        latency: dict[str, dict[str, Any]] = {v: {} for v in VARIANTS}
        xs = {b: np.ascontiguousarray(x_all[np.arange(b) % len(x_all)]) for b in cfg.batches}
        for b, x in xs.items():
            log(f"timing (c) at batch {b}: {cfg.repeats_for(b)} calls after {cfg.warmup_for(b)} warm-up ...")
            t = time_interleaved({"host": lambda: host.score(x)}, cfg.repeats_for(b), cfg.warmup_for(b))
            latency["host"][str(b)] = summarize(t["host"], b)
        log(f"timing (a) and (b): {cfg.rounds} alternating pairs of fresh torch-free processes ...")
        ab = time_bare_and_ufad(bare_path, det_path, xs, cfg, tmp)
        for v in ("bare", "ufad"):
            for b in cfg.batches:
                latency[v][str(b)] = summarize(ab[v][str(b)], b)
        host.remove()
        ratios = {str(b): {
            "b_over_a": latency["ufad"][str(b)]["median_ms"] / latency["bare"][str(b)]["median_ms"],
            "c_over_b": latency["host"][str(b)]["median_ms"] / latency["ufad"][str(b)]["median_ms"],
        } for b in cfg.batches}

        log("torch-free runtime subprocesses ...")
        rt = runtime_without_torch(det_path, x_all[:256], cfg.threads, cfg.runtime_runs, tmp)
        cuda = _time_cuda(bare_path, det_path, xs, cfg)

    result: dict[str, Any] = {
        "schema": SCHEMA,
        "model": cfg.model, "data": cfg.data,
        "machine": machine_info(),
        "threads": {"onnxruntime_intra_op": cfg.threads, "onnxruntime_inter_op": 1,
                    "torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
                    "sklearn": 1},
        "settings": {"batches": list(cfg.batches), "quick": cfg.quick,
                     "repeats": {str(b): cfg.repeats_for(b) for b in cfg.batches},
                     "warmup": {str(b): cfg.warmup_for(b) for b in cfg.batches},
                     "graph_optimization": "ORT_ENABLE_ALL", "provider": "CPUExecutionProvider",
                     "inputs": f"{cfg.data} test images"},
        "variants": VARIANT_LABELS,
        "latency": latency,
        "ratios": ratios,
        "agreement": agree,
        "fit_export": fit,
        "size": {"detector_bytes": det_bytes, "bare_bytes": bare_bytes, "extra_bytes": det_bytes - bare_bytes},
        "runtime_no_torch": rt,
        "cuda": cuda,
    }
    return result


def check_result(result: dict[str, Any]) -> list[str]:
    """Schema/sanity problems of a result dict (empty list = fine); used by the tests."""
    problems = []
    for key in ("schema", "machine", "threads", "settings", "latency", "ratios", "agreement",
                "fit_export", "size", "runtime_no_torch", "cuda"):
        if key not in result:
            problems.append(f"missing key {key}")
    for v in VARIANTS:
        for b in result.get("settings", {}).get("batches", []):
            st = result.get("latency", {}).get(v, {}).get(str(b))
            if st is None:
                problems.append(f"no latency for {v} batch {b}")
                continue
            for k in ("median_ms", "p95_ms", "throughput_per_s"):
                if not (isinstance(st.get(k), float) and math.isfinite(st[k]) and st[k] > 0):
                    problems.append(f"{v} batch {b} {k} = {st.get(k)!r}")
    return problems

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
JSON-ready dict (schema ``ufad.bench/1``); ``bench_cli`` renders it.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ufad.runtime.errors import ExportError

SCHEMA = "ufad.bench/1"
VARIANTS = ("bare", "ufad", "host")
VARIANT_LABELS = {
    "bare": "(a) bare classifier .onnx, onnxruntime",
    "ufad": "(b) ufad detector .onnx, AnomalySession.run",
    "host": "(c) torch eager + hooks + sklearn OneClassSVM",
}
# Agreement of (c) with (b): float32 graph vs float64 scikit-learn.
AGREE_RTOL = 1e-3


@dataclass
class BenchConfig:
    """What to benchmark and how hard. ``repeats``/``warmup`` None = per-batch defaults."""

    model: str = "ufad.models.mnist_cnn:pretrained"
    data: str = "mnist"
    batches: tuple[int, ...] = (1, 32, 256)
    repeats: int | None = None
    warmup: int | None = None
    threads: int = 2
    limit: int | None = None          # fitting samples (None = the whole train split)
    calib_limit: int | None = None    # calibration samples (None = the whole valid split)
    max_points: int = 1000
    seed: int = 0
    quick: bool = False
    runtime_runs: int = 3             # subprocess launches for the torch-free runtime figures
    workdir: str | None = None        # keep the .onnx files here (default: a temp dir)

    def repeats_for(self, batch: int) -> int:
        if self.repeats is not None:
            return max(1, int(self.repeats))
        if self.quick:
            return 5
        return 300 if batch <= 1 else 100 if batch <= 32 else 40

    def warmup_for(self, batch: int) -> int:
        if self.warmup is not None:
            return max(0, int(self.warmup))
        if self.quick:
            return 2
        return 30 if batch <= 1 else 10 if batch <= 32 else 5


# --------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """CPU model, core counts and library versions of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("ufad", "torch", "onnxruntime", "onnxruntime-gpu", "onnx", "onnxscript",
                "numpy", "scikit-learn"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": affinity,
            "platform": platform.platform(), "versions": versions}


# --------------------------------------------------------------- fit + export (subprocess)
def _recording_detector_class():
    from .detectors.uniform import UniformDetector

    class RecordingUniformDetector(UniformDetector):
        """UniformDetector that keeps references to its fitting points so (c) can refit
        scikit-learn's OneClassSVM on exactly the same data (no copies, same fit)."""

        def _fit_regions(self, kept) -> None:
            self.fit_data = kept
            super()._fit_regions(kept)

    return RecordingUniformDetector


def _fit_worker(cfg_path: str) -> None:
    """Subprocess body: load, fit, calibrate, export exactly as ``ufad export`` does; write
    the timings/peak RSS and the fitting points. Peak RSS is read before anything extra."""
    cfg = json.loads(Path(cfg_path).read_text())
    out = Path(cfg["out_dir"])
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(cfg["threads"])
    from .cli_export import load_data
    from .model_loading import load_factory

    model = load_factory(cfg["model"]).eval()
    x, y, classes = load_data(cfg["data"], "train", cfg["limit"])
    xc, _, _ = load_data(cfg["data"], "valid", cfg["calib_limit"])
    t1 = time.perf_counter()
    c0 = time.process_time()
    det = _recording_detector_class()(model, class_names=classes, seed=cfg["seed"],
                                      max_points=cfg["max_points"], progress=False)
    torch.manual_seed(cfg["seed"])
    det.fit(x, y)
    t2 = time.perf_counter()
    det.calibrate(xc, source=f"{cfg['data']} valid")
    t3 = time.perf_counter()
    check = np.concatenate([xc[:192], np.random.default_rng(cfg["seed"]).uniform(
        float(x.min()), float(x.max()), size=(64, *x.shape[1:])).astype(np.float32)])
    rep = det.export(out / "detector.onnx", check_inputs=check)
    t4 = time.perf_counter()
    cpu = time.process_time() - c0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    kept = det.fit_data
    arrays: dict[str, np.ndarray] = {}
    for li, fmap in enumerate(det._fmaps):
        arrays[f"mean_{li}"], arrays[f"transform_{li}"] = fmap.mean, fmap.transform
        for c in range(det.num_classes):
            arrays[f"kept_{li}_{c}"] = kept[c][li]
    arrays["inv_scale"] = det.head().inv_scale.numpy()
    np.savez(out / "fit_data.npz", **arrays)
    result = {
        "n_train": int(len(x)), "n_calib": int(len(xc)),
        "load_s": t1 - t0, "fit_s": t2 - t1, "calibrate_s": t3 - t2, "export_s": t4 - t3,
        "total_s": t4 - t1, "cpu_s": cpu, "peak_rss_mb": peak_mb,
        "parity_max_rel_diff": rep.parity_max_rel_diff, "threshold": det.threshold,
        "layers": det.layers, "reduction": det.reduction, "num_classes": det.num_classes,
        "nu": det.nu, "gammas": [float(g) for g in det._gammas], "dims": det.dims,
        "classes": det.class_names, "support_vectors": det.params()["support_vectors"],
    }
    (out / "fit_result.json").write_text(json.dumps(result))


def fit_and_export(cfg: BenchConfig, out_dir: Path) -> dict[str, Any]:
    """Run ``_fit_worker`` in a fresh Python process; returns its result dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "fit_config.json"
    cfg_path.write_text(json.dumps({
        "out_dir": str(out_dir), "model": cfg.model, "data": cfg.data, "limit": cfg.limit,
        "calib_limit": cfg.calib_limit, "seed": cfg.seed, "max_points": cfg.max_points,
        "threads": cfg.threads,
    }))
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))
    cmd = [sys.executable, "-c",
           "import sys; from ufad.exporter.bench import _fit_worker; _fit_worker(sys.argv[1])",
           str(cfg_path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.getcwd())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise ExportError(f"the fit/export subprocess failed (exit {proc.returncode}):\n{tail}")
    res = json.loads((out_dir / "fit_result.json").read_text())
    res["process_wall_s"] = wall
    return res


# ---------------------------------------------------------------- (a) the bare classifier
def export_bare(model, example: np.ndarray, path: Path) -> int:
    """Export the classifier alone with the detector's exporter settings; returns its size."""
    import torch

    from ufad.runtime import format as fmt

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.as_tensor(example),), f=None, input_names=["input"],
            output_names=[fmt.OUT_LOGITS], dynamic_shapes=({0: batch},), dynamo=True,
            external_data=False, optimize=True,
        )
    data = program.model_proto.SerializeToString()
    path.write_bytes(data)
    return len(data)


def ort_session_options(threads: int, profile_prefix: str | None = None):
    """The session options both (a) and (b) run with (AnomalySession's, fixed threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


# ------------------------------------------------------------------- (c) the host way
class HostDetector:
    """The detector math done on the host, as a user without ufad writes it.

    Eager model + forward hooks (the detector's spatial reduction of each monitored layer;
    sqrt(softmax(logits)) for ``@sqrt_softmax``) -> numpy -> the detector's feature maps
    (standardise, or whiten with its matrix) -> per predicted class and layer, scikit-learn
    ``OneClassSVM`` ``decision_function`` d -> raw = log(rho) - log(d + rho) (> 0 outside)
    -> minus the median, divided by the spread of raw over that class's fitting points ->
    max over layers. NaN/Inf inputs score +inf, as in the detector.
    """

    def __init__(self, model, layers: Sequence[str], maps: Sequence[FeatureMap], svms,
                 centres: np.ndarray, scales: np.ndarray, reduction: str = "max"):
        from .taps import SOFTMAX, Tap

        self.model, self.layers, self.reduction = model, list(layers), reduction
        self._taps = {n: Tap(n, n, "output", reduction) for n in self.layers}
        self.maps, self.svms, self.centres, self.scales = list(maps), svms, centres, scales
        self._acts: dict[str, Any] = {}
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(name))
                       for name in self.layers if name != SOFTMAX]

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self._acts[name] = self._taps[name].features(output)
        return hook

    @classmethod
    def refit(cls, model, fit: dict[str, Any], fit_data: dict[str, np.ndarray]) -> "HostDetector":
        """Fit scikit-learn OneClassSVMs on the detector's own fitting points (same nu,
        gamma, tolerance), and each (layer, class) scale as the detector defines it."""
        from sklearn.svm import OneClassSVM

        from .detectors.uniform import SCALE_FLOOR
        from .feature_maps import FeatureMap

        n_cls, layers = fit["num_classes"], fit["layers"]
        maps = [FeatureMap(fit_data[f"mean_{l}"], fit_data[f"transform_{l}"]) for l in range(len(layers))]
        svms: list[list[Any]] = []
        scales, centres = np.ones((len(layers), n_cls)), np.zeros((len(layers), n_cls))
        for li, fmap in enumerate(maps):
            row = []
            for c in range(n_cls):
                z = fmap.apply(fit_data[f"kept_{li}_{c}"])
                svm = OneClassSVM(kernel="rbf", nu=fit["nu"], gamma=fit["gammas"][li], tol=1e-4,
                                  cache_size=200).fit(z)
                row.append(svm)
                raw = cls._raw(svm, z)
                centres[li, c], scales[li, c] = float(np.median(raw)), max(float(np.std(raw)), SCALE_FLOOR)
            svms.append(row)
        return cls(model, layers, maps, svms, centres, scales, reduction=fit["reduction"])

    @staticmethod
    def _raw(svm, z: np.ndarray) -> np.ndarray:
        rho = float(np.ravel(svm.offset_)[0])
        with np.errstate(divide="ignore"):
            return math.log(rho) - np.log(np.maximum(svm.decision_function(z) + rho, 0.0))

    def score(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(logits, pred, score)`` of a float32 batch; higher score = more anomalous."""
        import torch

        from .taps import SOFTMAX

        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
        acts = [torch.sqrt(torch.softmax(logits, dim=1)).numpy() if name == SOFTMAX else self._acts[name].numpy()
                for name in self.layers]
        logits_np = logits.numpy()
        pred = logits_np.argmax(axis=1)
        layer_scores = np.empty((len(x), len(self.layers)))
        for c in np.unique(pred):
            rows = np.flatnonzero(pred == c)
            for li, a in enumerate(acts):
                raw = self._raw(self.svms[li][c], self.maps[li].apply(a[rows]))
                layer_scores[rows, li] = (raw - self.centres[li, c]) / self.scales[li, c]
        score = layer_scores.max(axis=1)
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) | np.isnan(score)
        score[bad] = np.inf
        return logits_np, pred, score

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


# ---------------------------------------------------------------------------- timing
def _stats(times_s: Sequence[float], batch: int) -> dict[str, float]:
    t = np.asarray(times_s) * 1e3
    med = float(np.median(t))
    return {
        "median_ms": med, "p95_ms": float(np.percentile(t, 95)), "mean_ms": float(t.mean()),
        "min_ms": float(t.min()), "n": int(len(t)),
        "throughput_per_s": batch / (med / 1e3) if med > 0 else float("inf"),
    }


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time each function ``repeats`` times, interleaved in small blocks so that a noisy
    neighbour slows every variant alike (the ratios stay meaningful)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    block = max(1, min(10, repeats // 10))
    times: dict[str, list[float]] = {k: [] for k in fns}
    while any(len(v) < repeats for v in times.values()):
        for name, fn in fns.items():
            for _ in range(min(block, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def agreement(ufad_score: np.ndarray, host_score: np.ndarray, ufad_pred: np.ndarray,
              host_pred: np.ndarray) -> dict[str, Any]:
    """How close (c)'s scores are to (b)'s: max relative diff ``|b - c| / max(1, |c|)``."""
    fin = np.isfinite(ufad_score) & np.isfinite(host_score)
    both_inf = np.isinf(ufad_score) & (ufad_score == host_score)
    d = np.abs(ufad_score[fin].astype(np.float64) - host_score[fin]) / np.maximum(1.0, np.abs(host_score[fin]))
    worst = float(d.max()) if d.size else 0.0
    return {
        "n": int(len(ufad_score)), "n_compared": int(fin.sum()), "n_both_inf": int(both_inf.sum()),
        "n_mismatched_inf": int((~fin & ~both_inf).sum()),
        "pred_agree": float(np.mean(ufad_pred == host_pred)),
        "max_rel_diff": worst, "rtol": AGREE_RTOL,
        "ok": bool(worst <= AGREE_RTOL and (~fin & ~both_inf).sum() == 0),
    }


# ---------------------------------------------------------- torch-free runtime (subprocess)
_BLOCK_TORCH = r"""
import sys, time, json
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this benchmark", name=name)
        return None
sys.meta_path.insert(0, _NoTorch())
"""
_NO_TORCH_SCRIPT = _BLOCK_TORCH + r"""
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import onnxruntime
t2 = time.perf_counter()
from ufad.runtime import AnomalySession
t3 = time.perf_counter()
sess = AnomalySession(sys.argv[1], provider="cpu", threads=int(sys.argv[3]))
t4 = time.perf_counter()
x = np.load(sys.argv[2])
res = sess.run(x)
t5 = time.perf_counter()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: float(status[k].split()[0])
try:
    import torch
    blocked = False
except ImportError:
    blocked = True
print(json.dumps({
    "import_numpy_s": t1 - t0, "import_onnxruntime_s": t2 - t1, "import_ufad_runtime_s": t3 - t2,
    "import_s": t3 - t0, "session_s": t4 - t3, "score_256_s": t5 - t4,
    "rss_mb": kb("VmRSS") / 1024, "peak_rss_mb": kb("VmHWM") / 1024,
    "torch_blocked": blocked, "torch_in_modules": "torch" in sys.modules,
    "n_scored": int(len(res.score)),
}))
"""


def runtime_without_torch(detector: Path, x256: np.ndarray, threads: int, runs: int,
                          tmp: Path) -> dict[str, Any]:
    """Import + session creation time and RSS after scoring 256 inputs, in fresh processes
    where ``import torch`` raises ImportError; medians over ``runs`` launches."""
    xpath = tmp / "x256.npy"
    np.save(xpath, np.ascontiguousarray(x256, np.float32))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    rows = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _NO_TORCH_SCRIPT, str(detector), str(xpath), str(threads)],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise ExportError(f"the torch-free runtime subprocess failed: {proc.stderr.strip()[-800:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["process_wall_s"] = wall
        rows.append(row)
    keys = [k for k, v in rows[0].items() if isinstance(v, float)]
    out: dict[str, Any] = {k: float(np.median([r[k] for r in rows])) for k in keys}
    out["import_plus_session_s"] = float(np.median([r["import_s"] + r["session_s"] for r in rows]))
    out["torch_blocked"] = all(r["torch_blocked"] and not r["torch_in_modules"] for r in rows)
    out["runs"] = len(rows)
    return out


def _timing_script() -> str:
    """One variant, (a) or (b), timed alone in a fresh torch-free process. The session options
    and the timing loop are this module's own functions, sent as source so both sides agree."""
    return "from __future__ import annotations\n" + _BLOCK_TORCH + r"""
from typing import Any, Callable
import numpy as np
import onnxruntime as ort
from ufad.runtime import AnomalySession
""" + inspect.getsource(ort_session_options) + inspect.getsource(time_interleaved) + r"""
cfg = json.load(open(sys.argv[1]))
if sys.argv[2] == "bare":
    sess = ort.InferenceSession(cfg["bare"], ort_session_options(cfg["threads"]), providers=["CPUExecutionProvider"])
    call = lambda x: sess.run(None, {"input": x})
else:
    sess = AnomalySession(cfg["detector"], provider="cpu", threads=cfg["threads"])
    call = lambda x: sess.run(x)
xs = np.load(cfg["inputs"])
out = {"times": {}, "torch_in_modules": "torch" in sys.modules}
for b, reps, warm in cfg["plan"]:
    x = np.ascontiguousarray(xs[str(b)])
    out["times"][str(b)] = time_interleaved({"call": lambda: call(x)}, reps, warm)["call"]
print(json.dumps(out))
"""


#: (a) and (b) alternate over this many pairs of processes; each takes 1/ROUNDS of the calls.
ROUNDS = 3


def time_bare_and_ufad(bare: Path, detector: Path, xs: dict[int, np.ndarray], cfg: "BenchConfig",
                       tmp: Path) -> dict[str, dict[str, list[float]]]:
    """Raw call times of (a) and (b) per batch size. Each variant runs ALONE in a fresh
    torch-free process (one onnxruntime session per process, as deployed: two sessions in
    one process each keep an intra-op pool whose idle workers spin for milliseconds and take
    a core from the other); the processes alternate a, b, a, b, ... so that a noisy
    neighbour still slows both alike."""
    np.savez(tmp / "timing_inputs.npz", **{str(b): x for b, x in xs.items()})
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads))
    out: dict[str, dict[str, list[float]]] = {"bare": {str(b): [] for b in xs}, "ufad": {str(b): [] for b in xs}}
    script = _timing_script()
    for r in range(ROUNDS):
        spec = tmp / f"timing_{r}.json"
        spec.write_text(json.dumps({
            "bare": str(bare), "detector": str(detector), "threads": cfg.threads,
            "inputs": str(tmp / "timing_inputs.npz"),
            "plan": [[b, -(-cfg.repeats_for(b) // ROUNDS), cfg.warmup_for(b)] for b in xs],
        }))
        for variant in ("bare", "ufad"):
            proc = subprocess.run([sys.executable, "-c", script, str(spec), variant],
                                  capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise ExportError(f"the timing subprocess failed: {proc.stderr.strip()[-800:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if res["torch_in_modules"]:
                raise ExportError("torch was imported in the timing subprocess; (a) / (b) would not be torch-free")
            for b, ts in res["times"].items():
                out[variant][b].extend(ts)
    return out


# -------------------------------------------------------------------------------- bars
@dataclass
class Bar:
    name: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    unit: str = ""

    @property
    def ok(self) -> bool | None:
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["pass"] = self.ok
        return d


def _bars(res: dict[str, Any]) -> list[Bar]:
    r = res["ratios"]
    fx, sz, rt = res["fit_export"], res["size"], res["runtime_no_torch"]

    def ratio(b: int, key: str):
        return r.get(str(b), {}).get(key)

    return [
        Bar("overhead b/a, batch 1", ratio(1, "b_over_a"), 1.25, "<=", "x"),
        Bar("overhead b/a, batch 256", ratio(256, "b_over_a"), 1.25, "<=", "x"),
        Bar("speed-up c/b, batch 1", ratio(1, "c_over_b"), 3.0, ">=", "x"),
        Bar("speed-up c/b, batch 256", ratio(256, "c_over_b"), 1.5, ">=", "x"),
        Bar(f"fit+calibrate+export wall ({fx['n_train']} train)", fx["total_s"], 60.0, "<=", "s"),
        Bar("fit+calibrate+export peak RSS", fx["peak_rss_mb"], 2048.0, "<=", "MB"),
        Bar(".onnx size - bare model .onnx", sz["extra_bytes"] / 1e6, 5.0, "<=", "MB"),
        Bar("runtime import + session (no torch)", rt["import_plus_session_s"], 0.5, "<=", "s"),
        Bar("runtime RSS after a 256 batch (no torch)", rt["rss_mb"], 200.0, "<=", "MB"),
    ]


# ------------------------------------------------------------------------------ main
def _bench_data(cfg: BenchConfig, n: int) -> np.ndarray:
    from .cli_export import load_data

    try:
        x, _, _ = load_data(cfg.data, "test", n)
    except Exception:  # an .npz has no test split: its first rows will do
        x, _, _ = load_data(cfg.data, "valid", n)
    return np.ascontiguousarray(x[:n], np.float32)


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
            lat[k][str(b)] = _stats(t[k], b)
    return {"available": True, "device": ort.get_device(), "latency": lat,
            "ratios": {str(b): {"b_over_a": lat["ufad"][str(b)]["median_ms"] / lat["bare"][str(b)]["median_ms"]}
                       for b in xs}}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole benchmark; returns the ``ufad.bench/1`` dict (see module docstring)."""
    import onnxruntime as ort
    import torch

    from ufad.runtime import AnomalySession

    from .model_loading import load_factory

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
            latency["host"][str(b)] = _stats(t["host"], b)
        log(f"timing (a) and (b): {ROUNDS} alternating pairs of fresh torch-free processes ...")
        ab = time_bare_and_ufad(bare_path, det_path, xs, cfg, tmp)
        for v in ("bare", "ufad"):
            for b in cfg.batches:
                latency[v][str(b)] = _stats(ab[v][str(b)], b)
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
    result["bars"] = [b.to_json() for b in _bars(result)]
    return result


def check_result(result: dict[str, Any]) -> list[str]:
    """Schema/sanity problems of a result dict (empty list = fine); used by the tests."""
    problems = []
    for key in ("schema", "machine", "threads", "settings", "latency", "ratios", "agreement",
                "fit_export", "size", "runtime_no_torch", "cuda", "bars"):
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


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_bench(BenchConfig(quick=True, limit=2000, calib_limit=1000)), indent=1, default=str))

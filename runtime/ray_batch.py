"""Score a data set on Ray Data: ``ufad score det.onnx SOURCE --ray [ADDRESS] -o OUT``.

    from ufad.runtime.ray_batch import score_dataset
    summary = score_dataset("det.onnx", ["inputs/"], "audit.parquet", address="127.0.0.1:6379")

The driver plans the job (``sources``: every file's header, so counts and unreadable files are
known before scoring), puts the model's bytes in the object store once, and streams work items
of about ``batch_size`` inputs through a pool of actors, one ``AnomalySession`` each (each
verifies the file's integrity, and that it is the driver's file, before scoring). Rows come
back to the driver, which keeps exactly one per input (``batch_rows.Ledger``), writes OUT and
the summary beside it, and shows a progress bar.

Nothing lost, nothing doubled: a worker that dies is restarted and its item retried (Ray
Data's actor fault tolerance, on by default since Ray 2.40: ``max_restarts=-1``,
``max_task_retries=-1``; Ray 2.60 deprecates setting them per call); a row that arrives twice
is dropped; an input without a row at the end fails the job, and no OUT is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .batch_rows import Ledger, RowWriter, check_out
from .batch_score import error_rows, score_item
from .batch_summary import Summary, format_summary
from .errors import ClusterError, InputError, ModelFileError, UfadError, opt, python_style, render
from .files import write_atomically
from .ray_support import connected, import_ray, model_file, unwrap
from .session import AnomalySession, read_model_bytes
from .sources import plan_items, source_files

DEFAULT_BATCH = 1024
DIGESTS = ("ufad.graph_sha256", "ufad.content_sha256")


class Scorer:
    """The Ray Data actor: one AnomalySession, scoring one work item per call."""

    def __init__(self, model: Any, name: str, digests: dict[str, str | None], plan: Any,
                 provider: str, threads: int, verify_key: Any, threshold: float | None, range_check: str):
        import ray

        data = ray.get(model[0])
        self.files, self.items = ray.get(plan[0])
        # verified on load (integrity, and the signature when a key is given)
        self.sess = AnomalySession(model_file(data, name), provider=provider, threads=threads,
                                   verify_key=verify_key, range_check=range_check)
        if {k: self.sess.metadata.get(k) for k in DIGESTS} != digests:
            raise ModelFileError(f"{name}: the worker received another detector than the driver loaded")
        self.threshold = threshold
        self.range_check = range_check

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        blocks = [score_item(self.sess, self.files, self.items[int(i)], threshold=self.threshold,
                             range_check=self.range_check) for i in batch["id"]]
        return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def _render_errors(block: dict[str, np.ndarray], renderer) -> dict[str, np.ndarray]:
    err = np.asarray(block["error"], object)
    if any(err):
        block = dict(block)
        block["error"] = np.asarray([render(str(m), renderer) if m else "" for m in err], object)
    return block


def _progress(total: int, enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    return Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not enabled, transient=False)


def score_dataset(model: str | Path, sources: str | Path | Sequence[str | Path], out: str | Path, *,
                  address: str | None = None, overwrite: bool = False, batch_size: int = DEFAULT_BATCH,
                  workers: int | None = None, cpus_per_worker: float = 1.0, threads: int | None = None,
                  threshold: float | None = None, provider: str = "cpu", range_check: str = "error",
                  verify_key: Any = None, column: str | None = None,
                  progress: bool = True, renderer=python_style, echo=None) -> dict[str, Any]:
    """Score every input of ``sources`` on Ray; write one row per input to ``out``
    (.parquet / .jsonl) and a summary beside it (returned as a dict).

    Args:
        sources: folders, glob patterns or files (.npy / .npz / .parquet / images).
        address: an existing Ray cluster; None: ``RAY_ADDRESS``, a local cluster, or a new
            local instance (``ray_support.connected``).
        batch_size: inputs per work item (one model call).
        workers: actors in the pool (default: the cluster's CPUs / ``cpus_per_worker``).
        threads: onnxruntime intra-op threads per actor (default: ``cpus_per_worker``).
        threshold, provider, range_check, verify_key: as for ``AnomalySession`` / ``run``.
        column: Parquet sources: the array column (default: the only one).
    """
    ray = import_ray("data")
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if batch_size.__class__ is not int or batch_size < 1:
        raise InputError(f"{opt('batch_size')} must be an integer >= 1, got {batch_size!r}")
    if workers is not None and (workers.__class__ is not int or workers < 1):
        raise InputError(f"{opt('workers')} must be an integer >= 1, got {workers!r}")
    out, summary_file = check_out(out, overwrite)
    t0 = time.perf_counter()
    # The driver loads the file first: a bad file or key fails here, in one clear line.
    sess = AnomalySession(model, provider="cpu", verify_key=verify_key, range_check=range_check)
    data = read_model_bytes(model)
    digests = {k: sess.metadata.get(k) for k in DIGESTS}
    spec, classes, layers = sess.input_spec, sess.classes, sess.layer_names
    thr = sess.threshold if threshold is None else float(threshold)
    sess.run(np.zeros((0, *spec.shape[1:]), spec.dtype), threshold=threshold)  # validates threshold
    files = source_files(sources, spec, column)
    items = plan_items(files, batch_size)
    total = sum(f.count if not f.error else 1 for f in files)
    paths = [f.path for f in files]

    ledger, writer, summary = Ledger(files), RowWriter(out, files, classes, layers, thr), Summary(classes, thr)

    def take(block: dict[str, np.ndarray]) -> int:
        block = _render_errors(ledger.admit(block), renderer)
        writer.write(block)
        summary.add(block, paths)
        return len(block["file_id"])

    n_workers = 0
    try:
        with _progress(total, progress) as bar, connected(address):
            task = bar.add_task("scoring", total=total)
            for fid, f in enumerate(files):
                if f.error:  # known at planning: one row naming the file, no worker needed
                    bar.advance(task, take(error_rows(fid, [-1], f.error, len(layers))))
            if items:
                ctx = ray.data.DataContext.get_current()
                ctx.enable_progress_bars = False  # ours counts rows; Ray's would count blocks
                ctx.print_on_execution_start = False
                cpus = float(ray.cluster_resources().get("CPU", 1))
                n_workers = workers or max(1, int(cpus // cpus_per_worker))
                n_workers = min(n_workers, len(items))
                plan_ref = ray.put((files, items))
                model_ref = ray.put(data)
                # Items made on the driver (no read tasks): the actors may hold every CPU, and
                # one item per block makes a retried task exactly one item.
                ds = ray.data.from_items([{"id": i} for i in range(len(items))],
                                         override_num_blocks=len(items)).map_batches(
                    Scorer, batch_size=1, batch_format="numpy", num_cpus=cpus_per_worker,
                    compute=ray.data.ActorPoolStrategy(size=n_workers),
                    # refs nested in a list reach the actor as refs: it fetches them itself
                    fn_constructor_kwargs=dict(
                        model=[model_ref], name=Path(model).name, digests=digests, plan=[plan_ref],
                        provider=provider, threads=threads or max(1, int(cpus_per_worker)),
                        verify_key=verify_key, threshold=threshold, range_check=range_check))
                for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    bar.advance(task, take(block))
        missing = ledger.missing()
        if missing:
            raise ClusterError(
                f"the job ended with {sum(n for _, n in missing)} inputs without a row "
                f"(first: {missing[0][0]}); no output was written. Run it again.")
        writer.close()
    except BaseException as e:
        writer.abort()
        err = unwrap(e)
        if err is not e:
            raise err from None
        if isinstance(e, UfadError) or not _is_ray_error(e):
            raise
        raise ClusterError(f"the Ray job failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}") from e
    seconds = time.perf_counter() - t0
    result = summary.to_json(
        model=str(model), sources=[str(s) for s in sources], out=str(out), summary=str(summary_file),
        files=len(files), workers=n_workers, seconds=round(seconds, 3),
        inputs_per_second=round(summary.inputs / seconds, 1) if seconds > 0 else 0.0,
        duplicates_dropped=ledger.duplicates)
    write_atomically(summary_file, (json.dumps(result, indent=2) + "\n").encode())
    if echo is not None:
        echo(format_summary(result))
    return result


def _is_ray_error(e: BaseException) -> bool:
    return type(e).__module__.startswith("ray")

"""A batch job's rows: the ledger that keeps exactly one row per input, and the OUT writer.

The ledger marks, per file, which inputs have their row. A block arriving twice (a task that
was retried after its first answer got through) is dropped row by row, never written twice;
at the end it names any input without a row, and the job fails instead of writing a short OUT.

OUT is Parquet (``.parquet``) or JSON lines (``.jsonl``), one row per input:
``source``, ``index`` (within its file; empty when the whole file could not be read), ``pred``,
``label``, ``score``, ``is_anomaly``, ``threshold``, ``layer_scores`` (a struct / object of
per-layer scores), ``nonfinite_input``, ``out_of_range_input``, ``error`` ("" unless the row
reports an unreadable or refused input, whose other fields are then empty). The JSON lines
use ``ufad score --json``'s spelling (non-finite numbers as "inf" / "nan"). It is written to a
temporary file and renamed into place at the end, so a failed job leaves no partial OUT.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import OutputError, opt
from .files import check_output_path
from .session import _json_float
from .sources import SourceFile

OUT_SUFFIXES = (".parquet", ".jsonl")


class Ledger:
    """Which inputs of the job already have their row (see the module docstring)."""

    def __init__(self, files: Sequence[SourceFile]):
        self.files = files
        # a file that could not be read at all has one row, so one slot
        self.seen = [np.zeros(f.count if f.count and not f.error else 1, bool) for f in files]
        self.duplicates = 0

    def admit(self, block: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The rows of ``block`` not seen before (marked seen now)."""
        fid, idx = block["file_id"], block["index"]
        keep = np.zeros(len(fid), bool)
        for f in np.unique(fid):
            rows = np.flatnonzero(fid == f)
            seen = self.seen[int(f)]
            whole = idx[rows] < 0
            for r in rows[whole]:  # a row for the whole file covers all of its slots
                if not seen.any():
                    seen[:] = True
                    keep[r] = True
            part = rows[~whole]
            if len(part):
                _, first = np.unique(idx[part], return_index=True)
                fresh = np.zeros(len(part), bool)
                fresh[first] = True
                fresh &= ~seen[idx[part]]
                seen[idx[part[fresh]]] = True
                keep[part[fresh]] = True
        self.duplicates += int(len(keep) - keep.sum())
        return block if keep.all() else {k: v[keep] for k, v in block.items()}

    def missing(self) -> list[tuple[str, int]]:
        """Files with inputs that have no row yet, and how many."""
        return [(f.path, int((~s).sum())) for f, s in zip(self.files, self.seen) if not s.all()]


def check_out(out: str | Path, overwrite: bool) -> tuple[Path, Path]:
    """OUT and its summary file (``OUT`` with ``.summary.json``), checked before the job
    starts: a known suffix, writable, and not there already unless ``overwrite``."""
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise OutputError(f"{opt('output')} {out}: name a .parquet or .jsonl file")
    summary = summary_path(out)
    existing = [str(p) for p in (out, summary) if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                          f"pass {opt('overwrite')} to replace, or choose another {opt('output')}")
    check_output_path(out, "output")
    return out, summary


def summary_path(out: str | Path) -> Path:
    """Where a job's summary goes: beside OUT, ``audit.parquet`` -> ``audit.summary.json``."""
    out = Path(out)
    return out.with_name(out.stem + ".summary.json")


class RowWriter:
    """Writes admitted blocks to a temporary file beside OUT; ``close`` renames it into place."""

    def __init__(self, out: Path, files: Sequence[SourceFile], classes: Sequence[str],
                 layer_names: Sequence[str], threshold: float):
        self.out = out
        self.tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        self.paths = np.asarray([f.path for f in files], object)
        self.classes = np.asarray(list(classes) + [""], object)  # pred -1 (error rows) -> ""
        self.layer_names = list(layer_names)
        self.threshold = float(threshold)
        self.parquet = out.suffix.lower() == ".parquet"
        self._pq = None
        self._fh = None
        self.rows = 0

    def write(self, block: dict[str, np.ndarray]) -> None:
        if not len(block["file_id"]):
            return
        if self.parquet:
            self._write_parquet(block)
        else:
            self._write_jsonl(block)
        self.rows += len(block["file_id"])

    def _labels(self, pred: np.ndarray) -> np.ndarray:
        p = np.where((pred >= 0) & (pred < len(self.classes) - 1), pred, -1)
        labels = self.classes[p]
        odd = (pred >= len(self.classes) - 1)  # a class index the metadata does not name
        labels[odd] = pred[odd].astype(str)
        return labels

    def _write_parquet(self, b: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        err = np.asarray(b["error"], object) != ""
        ls = np.asarray(b["layer_scores"], np.float32).reshape(len(err), len(self.layer_names))
        table = pa.table({
            "source": pa.array(self.paths[b["file_id"]], pa.string()),
            "index": pa.array(b["index"], pa.int64(), mask=b["index"] < 0),
            "pred": pa.array(b["pred"], pa.int64(), mask=err),
            "label": pa.array(self._labels(b["pred"]), pa.string(), mask=err),
            "score": pa.array(b["score"], pa.float32(), mask=err),
            "is_anomaly": pa.array(b["is_anomaly"], pa.bool_(), mask=err),
            "threshold": pa.array(np.full(len(err), self.threshold), pa.float64(), mask=err),
            "layer_scores": pa.StructArray.from_arrays(
                [pa.array(ls[:, j], pa.float32()) for j in range(ls.shape[1])], names=self.layer_names,
                mask=pa.array(err)),
            "nonfinite_input": pa.array(b["nonfinite"], pa.bool_(), mask=err),
            "out_of_range_input": pa.array(b["out_of_range"], pa.bool_(), mask=err),
            "error": pa.array(b["error"], pa.string()),
        })
        if self._pq is None:
            check_output_path(self.tmp, "output")
            self._pq = pq.ParquetWriter(self.tmp, table.schema)
        self._pq.write_table(table)

    def _write_jsonl(self, b: dict[str, np.ndarray]) -> None:
        if self._fh is None:
            check_output_path(self.tmp, "output")
            self._fh = open(self.tmp, "w", encoding="utf-8")
        labels = self._labels(b["pred"])
        thr = _json_float(self.threshold)
        lines = []
        for i in range(len(b["file_id"])):
            index = int(b["index"][i])
            rec = {"source": self.paths[b["file_id"][i]], "index": index if index >= 0 else None}
            if b["error"][i]:
                rec.update(pred=None, label=None, score=None, is_anomaly=None, threshold=None,
                           layer_scores=None, nonfinite_input=None, out_of_range_input=None)
            else:
                rec.update(pred=int(b["pred"][i]), label=str(labels[i]), score=_json_float(b["score"][i]),
                           is_anomaly=bool(b["is_anomaly"][i]), threshold=thr,
                           layer_scores={n: _json_float(v) for n, v in zip(self.layer_names, b["layer_scores"][i])},
                           nonfinite_input=bool(b["nonfinite"][i]), out_of_range_input=bool(b["out_of_range"][i]))
            rec["error"] = str(b["error"][i])
            lines.append(json.dumps(rec))
        self._fh.write("\n".join(lines) + "\n")

    def close(self) -> None:
        """Finish the file and move it to OUT (an empty job still writes an empty OUT)."""
        if self.parquet and self._pq is None:
            self.write_empty()
        if self._pq is not None:
            self._pq.close()
        if self._fh is not None:
            self._fh.close()
        if not self.tmp.exists():
            self.tmp.write_bytes(b"")
        try:
            os.replace(self.tmp, self.out)
        except OSError as e:
            raise OutputError(f"cannot write {self.out}: {e.strerror or e}; choose a writable location.") from None

    def write_empty(self) -> None:
        from .batch_score import error_rows

        self._write_parquet(error_rows(0, [], "", len(self.layer_names)))

    def abort(self) -> None:
        """Drop the temporary file (the job failed: no OUT is written)."""
        for h in (self._pq, self._fh):
            try:
                if h is not None:
                    h.close()
            except Exception:
                pass
        self.tmp.unlink(missing_ok=True)

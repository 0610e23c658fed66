"""A batch job's inputs: SOURCEs expanded into files, files cut into segments, segments read.

    files = expand_sources(["data/", "more/*.npy"])        # sorted, each file once
    table = [inspect_file(p, spec) for p in files]          # kind, input count or error
    for seg in plan_items(table, batch_size=1024): ...      # lists of Segment, ~batch_size inputs
    x = read_segment(table[seg.file_id], seg.start, seg.stop, spec)

Supported files: ``.npy`` (memory-mapped, so a segment reads only its own inputs), ``.npz``
(array ``x`` or its only array; read whole), images (one input each; needs Pillow) and
``.parquet`` with an array column (nested lists, fixed-size lists or Ray's tensor type; one
segment per row group; needs pyarrow). A file's header is read when the job is planned: one
that cannot be read, or whose arrays the model cannot take (shape, dtype), is known before any
scoring starts and reported as one error row. No file is unpickled.

Everything here runs without Ray: the Ray job (``ray_batch``) only moves segments to workers.
"""

from __future__ import annotations

import glob
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import DependencyError, InputError, opt
from .files import IMAGE_SUFFIXES, NPY_MAGIC, ZIP_MAGIC, _check_npy_header, _load_image
from .format import InputSpec
from .inputs import check_batch

ARRAY_SUFFIXES = {".npy", ".npz"}
PARQUET_SUFFIXES = {".parquet", ".pq"}
SUFFIXES = ARRAY_SUFFIXES | PARQUET_SUFFIXES | IMAGE_SUFFIXES


@dataclass(frozen=True)
class SourceFile:
    """One input file as planned: its kind and input count, or why it cannot be read."""

    path: str
    kind: str                      # "npy" | "npz" | "image" | "parquet"
    count: int = 0                 # inputs in the file (0 when ``error``)
    error: str = ""                # non-empty: the file cannot be read; it yields one error row
    single: bool = False           # the file holds one sample without a batch axis
    column: str = ""               # parquet: the array column
    row_groups: tuple[int, ...] = ()  # parquet: rows per row group


@dataclass(frozen=True)
class Segment:
    """Inputs ``[start, stop)`` of file ``file_id`` (an index into the job's file table)."""

    file_id: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def expand_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Files named by ``sources``: a folder (every supported file below it), a glob pattern
    (``data/*.npy``, ``**`` recursive) or a file. Sorted; a file named twice is kept once."""
    out: list[Path] = []
    for src in map(str, sources):
        if any(c in src for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(src, recursive=True)) if Path(p).is_file()]
            if not found:
                raise InputError(f"{src}: the pattern matches no file")
        elif Path(src).is_dir():
            found = sorted(p for p in Path(src).rglob("*")
                           if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
            if not found:
                raise InputError(f"{src}: the folder holds no .npy / .npz / .parquet / image file")
        elif Path(src).exists():
            found = [Path(src)]
        else:
            raise InputError(f"{src}: no such file or folder")
        out += found
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:  # two SOURCEs naming one file must not score it twice
            seen.add(key)
            unique.append(p)
    bad = [str(p) for p in unique if p.suffix.lower() not in SUFFIXES]
    if bad:
        raise InputError(f"unsupported file type: {bad[:5]}; use .npy, .npz, .parquet or images")
    return unique


def _kind(path: Path) -> str:
    s = path.suffix.lower()
    return "npy" if s == ".npy" else "npz" if s == ".npz" else "parquet" if s in PARQUET_SUFFIXES else "image"


def _array_file(path: Path, kind: str, shape: tuple[int, ...], dtype: np.dtype, spec: InputSpec) -> SourceFile:
    """An array file of ``shape`` as planned; refuses what the model cannot take (the
    runtime's own shape and dtype rules, checked on an empty array of that dtype and shape)."""
    sample = tuple(spec.shape[1:])
    # check_batch scores a lone sample (one-channel models: also [H, W]) as a batch of one
    single = shape == sample or (len(sample) == 3 and sample[0] == 1 and shape == sample[1:])
    probe = np.empty(shape if single or not shape else (0, *shape[1:]), dtype)
    try:
        check_batch(probe, spec, "off")
    except InputError as e:
        raise InputError(f"{path}: {e.raw}") from None
    return SourceFile(str(path), kind, 1 if single else int(shape[0]), single=single)


def _npy_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (pickled data), which are never loaded")
    return tuple(shape), dtype


def _inspect_npy(path: Path, spec: InputSpec) -> SourceFile:
    with open(path, "rb") as f:
        if f.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise InputError(f"{path}: not a .npy file (no NUMPY header); save arrays with np.save")
        f.seek(0)
        shape, dtype = _npy_header(f, path)
    _check_npy_header(path)
    return _array_file(path, "npy", shape, dtype, spec)


def _npz_member(names: Sequence[str], path: Path) -> str:
    """The array a .npz is scored by (``files._load_array``'s rule): ``x``, or its only one."""
    if "x" in names:
        return "x"
    if len(names) == 1:
        return names[0]
    raise InputError(f"{path}: .npz holds {names}; expected an array named 'x' (or a single array)")


def _inspect_npz(path: Path, spec: InputSpec) -> SourceFile:
    with open(path, "rb") as f:
        if not f.read(len(ZIP_MAGIC)).startswith(ZIP_MAGIC):
            raise InputError(f"{path}: not a .npz file (not a zip archive); save arrays with np.savez")
    with zipfile.ZipFile(path) as z:
        members = {n[:-4] if n.endswith(".npy") else n: n for n in z.namelist()}
        with z.open(members[_npz_member(list(members), path)]) as f:
            shape, dtype = _npy_header(f, path)
    return _array_file(path, "npz", shape, dtype, spec)


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DependencyError("reading and writing Parquet needs pyarrow: pip install 'ufad[ray]'") from None
    return pq


def _array_columns(schema) -> list[str]:
    import pyarrow as pa

    def is_array(t) -> bool:
        if isinstance(t, pa.ExtensionType):
            t = t.storage_type
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return [f.name for f in schema if is_array(f.type)]


def _inspect_parquet(path: Path, spec: InputSpec, column: str | None) -> SourceFile:
    pq = _pyarrow()
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    columns = _array_columns(schema)
    if column is None:
        if len(columns) != 1:
            raise InputError(
                f"{path}: {'no column holds' if not columns else f'columns {columns} hold'} arrays; "
                f"name the input column with {opt('column')}")
        column = columns[0]
    elif column not in schema.names:
        raise InputError(f"{path}: no column {column!r} (columns: {schema.names})")
    elif column not in columns:
        raise InputError(f"{path}: column {column!r} holds {schema.field(column).type}, not arrays")
    groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups))
    return SourceFile(str(path), "parquet", sum(groups), column=column, row_groups=groups)


def inspect_file(path: str | Path, spec: InputSpec, column: str | None = None) -> SourceFile:
    """Plan one file: its kind and input count from its header, or the reason it cannot be
    read (then it yields one error row). Images are counted as one input, unopened."""
    path = Path(path)
    kind = _kind(path)
    try:
        if kind == "npy":
            return _inspect_npy(path, spec)
        if kind == "npz":
            return _inspect_npz(path, spec)
        if kind == "parquet":
            return _inspect_parquet(path, spec, column)
        return SourceFile(str(path), kind, 1)
    except DependencyError:
        raise  # a missing package is the job's problem, not one file's
    except InputError as e:
        return SourceFile(str(path), kind, error=e.raw)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        return SourceFile(str(path), kind, error=f"{path}: not a readable {path.suffix} file ({e})")
    except Exception as e:  # pyarrow's errors (ArrowInvalid, ...) have no common base with the above
        return SourceFile(str(path), kind, error=f"{path}: not readable ({type(e).__name__}: {e})")


def plan_items(files: Sequence[SourceFile], batch_size: int) -> list[list[Segment]]:
    """Cut the readable files into segments and pack them into work items of about
    ``batch_size`` inputs: one model call per item. ``.npy`` files are cut anywhere; a
    ``.npz`` or a parquet row group is one segment (it is read whole)."""
    items: list[list[Segment]] = []
    cur: list[Segment] = []
    n = 0

    def add(seg: Segment) -> None:
        nonlocal cur, n
        if cur and n + len(seg) > batch_size:
            items.append(cur)
            cur, n = [], 0
        cur.append(seg)
        n += len(seg)

    for fid, f in enumerate(files):
        if f.error or not f.count:
            continue
        if f.kind == "npy":
            for s in range(0, f.count, batch_size):
                add(Segment(fid, s, min(s + batch_size, f.count)))
        elif f.kind == "parquet":
            start = 0
            for rows in f.row_groups:
                if rows:
                    add(Segment(fid, start, start + rows))
                start += rows
        else:
            add(Segment(fid, 0, f.count))
    if cur:
        items.append(cur)
    return items


def _parquet_values(path: str, f: SourceFile, start: int, stop: int, spec: InputSpec) -> np.ndarray:
    """Rows ``[start, stop)`` of the array column as ``[n, *sample]`` (row groups read whole)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    pq = _pyarrow()
    pf = pq.ParquetFile(path)
    bounds = np.cumsum((0, *f.row_groups))
    groups = [i for i in range(len(f.row_groups)) if bounds[i] < stop and bounds[i + 1] > start]
    table = pf.read_row_groups(groups, columns=[f.column])
    arr = table.column(f.column).combine_chunks().slice(start - int(bounds[groups[0]]), stop - start)
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    n = len(arr)
    ends = np.arange(n + 1)  # where each row ends at the current nesting level
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise InputError(f"{path}: column {f.column!r} holds empty (null) arrays")
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        ends = np.concatenate(([0], np.cumsum(lengths)))[ends]
        arr = pc.list_flatten(arr)
    if arr.null_count:
        raise InputError(f"{path}: column {f.column!r} holds null values")
    want = int(np.prod([d for d in spec.shape[1:]]))
    sizes = np.diff(ends)
    if n and not (sizes == want).all():
        bad = int(np.argmax(sizes != want))
        raise InputError(f"{path}: row {start + bad} of column {f.column!r} holds {int(sizes[bad])} values, "
                         f"the model takes {want} ({list(spec.shape[1:])})")
    values = arr.to_numpy(zero_copy_only=False)
    return values.reshape(n, *spec.shape[1:])


def read_segment(f: SourceFile, start: int, stop: int, spec: InputSpec) -> np.ndarray:
    """The raw inputs ``[start, stop)`` of a planned file (dtype as stored; ``check_batch``
    converts them). Raises InputError when the file cannot be read."""
    path = Path(f.path)
    try:
        if f.kind == "npy":
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            return np.asarray(arr if f.single else arr[start:stop])  # reads only these inputs
        if f.kind == "npz":
            with np.load(path, allow_pickle=False) as z:
                arr = z[_npz_member(z.files, path)]
            return arr if f.single else arr[start:stop]
        if f.kind == "parquet":
            return _parquet_values(str(path), f, start, stop, spec)
        return _load_image(path, spec)
    except InputError:
        raise
    except DependencyError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise InputError(f"{path}: not readable ({e})") from None
    except Exception as e:  # pyarrow's own error types
        raise InputError(f"{path}: not readable ({type(e).__name__}: {e})") from None


def source_files(sources: Iterable[str | Path], spec: InputSpec, column: str | None = None) -> list[SourceFile]:
    """``expand_sources`` then ``inspect_file`` on each: the job's file table."""
    return [inspect_file(p, spec, column) for p in expand_sources(list(sources))]

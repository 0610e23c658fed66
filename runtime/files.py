"""Files: read inputs (``.npy``, ``.npz`` with array ``x`` or one array, images) and write
outputs (checked up front, written atomically).

Images (png, jpg, bmp, pgm, ...; needs Pillow) are converted to the model's channel count,
resized to its height x width (bilinear) and scaled to its recorded value range.
Pickled objects are never loaded (``allow_pickle=False``).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import DependencyError, InputError, OutputError
from .format import InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".tif", ".tiff", ".webp"}


NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"


def _check_npy_header(path: Path) -> None:
    """Refuse a .npy whose header declares more data than the file holds, before numpy
    allocates it (a corrupt or hostile header would otherwise ask for terabytes)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return  # newer header versions: np.load checks them itself
        shape, _fortran, dtype = readers[version](f)
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        have = path.stat().st_size - f.tell()
    if not dtype.hasobject and need > have:
        raise InputError(
            f"{path}: header declares a {dtype} array of shape {shape} ({need} bytes) but the "
            f"file holds only {have} bytes of data; it is truncated or corrupt."
        )


def _load_array(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        # Without this, numpy reports any non-.npy file as "pickled data".
        if suffix == ".npy" and head != NPY_MAGIC:
            raise InputError(f"{path}: not a .npy file (no NUMPY header); save arrays with np.save")
        if suffix == ".npz" and not head.startswith(ZIP_MAGIC):
            raise InputError(f"{path}: not a .npz file (not a zip archive); save arrays with np.savez")
        if suffix == ".npy":
            _check_npy_header(path)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" in z.files:
                    return z["x"]
                if len(z.files) == 1:
                    return z[z.files[0]]
                raise InputError(f"{path}: .npz holds {z.files}; expected an array named 'x' (or a single array)")
        return np.load(path, allow_pickle=False)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path}: not a readable {path.suffix} array file ({e}); expected numpy .npy/.npz without pickles") from None
    except MemoryError:
        raise InputError(f"{path}: the array it declares does not fit in memory; the file is corrupt, "
                         "or split it into smaller files") from None


def _load_image(path: Path, spec: InputSpec) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise DependencyError("reading images needs Pillow: pip install 'ufad[images]'") from None
    sample = spec.shape[1:]
    if len(sample) != 3 or sample[0] not in (1, 3):
        raise InputError(f"{path}: images need a model input [B, 1|3, H, W], this model takes {list(spec.shape)}")
    c, h, w = sample
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises SyntaxError for some broken headers and DecompressionBombError for
        # images over its pixel limit (a decompression bomb or a wrong file).
        raise InputError(f"{path}: not a readable image ({e})") from None
    arr = arr[None] if c == 1 else arr.transpose(2, 0, 1)
    lo, hi = spec.value_range or (0.0, 1.0)
    return (lo + arr * (hi - lo))[None].astype(np.float32)


def load_inputs(paths: Sequence[str | Path], spec: InputSpec) -> tuple[list[np.ndarray], list[str]]:
    """Read each file into an array (images already converted to the model's input).

    Returns the arrays and, per array, the file it came from.
    """
    arrays, sources = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p} is a directory; pass the files in it (e.g. {p}/*.png)")
        if p.suffix.lower() in (".npy", ".npz"):
            arrays.append(_load_array(p))
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            arrays.append(_load_image(p, spec))
        else:
            raise InputError(f"{p}: unsupported file type {p.suffix!r}; use .npy, .npz or an image")
        sources.append(str(p))
    return arrays, sources


def check_output_path(path: str | Path, what: str = "output") -> None:
    """Fail now, not after a long job, when ``path`` cannot be written: it is a directory,
    its folder cannot be made, or nothing can be created there."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name such as {path / 'detector.onnx'}.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.probe{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write {what} {path}: {e.strerror or e}; choose a writable location.") from None


def write_atomically(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so no reader sees half a file."""
    path = Path(path)
    check_output_path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise OutputError(f"cannot write {path}: {e.strerror or e}; choose a writable location.") from None

"""Streaming ``.npz`` files: read and write arrays in batches, never the whole array at once.

A 50k-sample ImageNet-256 batch is 50,000 x 256 x 256 x 3 bytes = 9.8 GB, so neither the sampler
nor the evaluator may hold it in memory. ``np.load`` on an ``.npz`` reads a member completely;
these helpers read the ``.npy`` header of a member and then its rows in chunks (the ADM evaluator
does the same), and write a member from an iterable of chunks. Plain (stored) and deflated
members both work; written files are stored uncompressed, like ``np.savez``, and atomically (a
temporary file renamed into place).
"""

import os
import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np

from ..io import atomic_path


class EvalError(Exception):
    """Bad input to sampling or evaluation. The message is one line meant for the user.

    Deliberately not a ``ValueError``: tyro wraps those in a multi-line box while parsing, and the
    command-line tools print an ``EvalError`` as one line.
    """


def _member(name: str) -> str:
    return name if name.endswith(".npy") else name + ".npy"


def _open_zip(path: str | os.PathLike) -> zipfile.ZipFile:
    path = pathlib.Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: no such file")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise EvalError(f"{path}: not an .npz file ({e})") from e


def npz_keys(path: str | os.PathLike) -> list[str]:
    """The array names stored in an ``.npz`` file, in file order."""
    with _open_zip(path) as z:
        return [n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy")]


def _read_header(f) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise EvalError(f".npy format version {version} is not supported (expected 1.0 or 2.0)")
    return tuple(shape), np.dtype(dtype), fortran


def npz_info(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the member ``key`` of an ``.npz`` file, read from its header only."""
    with _open_zip(path) as z:
        if _member(key) not in z.namelist():
            raise EvalError(f"{path}: no array {key!r} (it has {', '.join(npz_keys(path)) or 'none'})")
        with z.open(_member(key)) as f:
            shape, dtype, _ = _read_header(f)
    return shape, dtype


def iter_npz(
    path: str | os.PathLike, key: str, batch_size: int, *, limit: int | None = None
) -> Iterator[np.ndarray]:
    """Yield the rows of the member ``key`` in consecutive chunks of ``batch_size`` (the last may be
    shorter), reading only one chunk at a time.

    **Arguments:**

    - `path`: the ``.npz`` file.
    - `key`: the member, e.g. ``"arr_0"``.
    - `batch_size`: rows per chunk.
    - `limit`: stop after this many rows (default: all).
    """
    with _open_zip(path) as z:
        if _member(key) not in z.namelist():
            raise EvalError(f"{path}: no array {key!r} (it has {', '.join(npz_keys(path)) or 'none'})")
        with z.open(_member(key)) as f:
            shape, dtype, fortran = _read_header(f)
            if fortran or not shape or dtype.hasobject:
                raise EvalError(f"{path}: array {key!r} must be a C-ordered numeric array with rows")
            rows = shape[0] if limit is None else min(shape[0], limit)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, rows, batch_size):
                count = min(batch_size, rows - start)
                data = f.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise EvalError(f"{path}: array {key!r} is truncated")
                yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


def read_npz(path: str | os.PathLike, key: str) -> np.ndarray:
    """The whole member ``key`` (for small arrays: statistics, labels)."""
    shape, _ = npz_info(path, key)
    if not shape:
        with np.load(path) as data:
            return np.asarray(data[key])
    chunks = list(iter_npz(path, key, max(shape[0], 1)))
    return chunks[0].copy() if chunks else np.zeros(shape, npz_info(path, key)[1])


def write_npz(
    path: str | os.PathLike,
    members: dict[str, object],
) -> None:
    """Write an uncompressed ``.npz`` atomically, streaming large members chunk by chunk.

    **Arguments:**

    - `path`: the file to write; it appears only once complete.
    - `members`: name to either an array (or scalar), or ``(shape, dtype, chunks)`` where ``chunks`` yields
      consecutive row blocks whose rows add up to ``shape[0]``.

    **Raises:** `EvalError` when the chunks do not match the declared shape or dtype.
    """
    path = pathlib.Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, value in members.items():
            if not isinstance(value, tuple):
                value = np.asarray(value)
                shape, dtype, chunks = value.shape, value.dtype, [value] if value.ndim else None
            else:
                shape, dtype, chunks = value
                dtype = np.dtype(dtype)
            with z.open(_member(name), "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(f, header)
                if chunks is None:  # a 0-d array
                    f.write(np.ascontiguousarray(value).tobytes())
                    continue
                rows = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk)
                    if chunk.dtype != dtype or chunk.shape[1:] != tuple(shape[1:]):
                        raise EvalError(
                            f"{path}: chunk of {name!r} is {chunk.dtype}{list(chunk.shape)}, "
                            f"expected {dtype} rows of {list(shape[1:])}"
                        )
                    rows += chunk.shape[0]
                    f.write(chunk.tobytes())
                if rows != shape[0]:
                    raise EvalError(f"{path}: {name!r} got {rows} rows, expected {shape[0]}")


__all__ = ["EvalError", "iter_npz", "npz_info", "npz_keys", "read_npz", "write_npz"]

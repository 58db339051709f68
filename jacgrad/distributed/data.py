"""Datasets on disk as Dask arrays: ``.npy`` files read a chunk at a time, never whole.

``open_npy(path)`` checks the file's header against its size and the expected shape and dtype,
then gives a Dask array whose every task opens the file memory-mapped and copies out its own
rows: the graph holds the path, not the data, so workers on the same filesystem read their
chunks themselves. Every problem is one ``DatasetError`` line naming the file.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from . import budget

__all__ = ["DatasetError", "MIN_TASK_ROWS", "NpyRows", "TASKS_PER_THREAD", "open_npy", "read_dataset", "task_rows"]

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class DatasetError(ValueError):
    """A dataset file that cannot be used as given (missing, truncated, wrong shape or dtype)."""


class NpyRows:
    """An array-like over a ``.npy`` file for ``dask.array.from_array``: ``shape``, ``dtype``,
    ``ndim`` and ``[rows, cols]`` reads that map the file and copy out only those elements.
    Pickles as the path and the header (a few hundred bytes)."""

    def __init__(self, path: str, shape: tuple, dtype: np.dtype, fortran_order: bool, offset: int):
        self.path, self.shape, self.file_dtype = path, tuple(shape), np.dtype(dtype)
        self.dtype = self.file_dtype.newbyteorder("=")
        self.fortran_order, self.offset = fortran_order, offset
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        order = "F" if self.fortran_order else "C"
        mm = np.memmap(self.path, dtype=self.file_dtype, mode="r", shape=self.shape, offset=self.offset, order=order)
        try:  # a copy in native byte order: the file may be written big-endian
            return np.ascontiguousarray(mm[key], dtype=self.dtype)
        finally:
            del mm


def _header(path: str) -> tuple[tuple, np.dtype, bool, int]:
    """``(shape, dtype, fortran_order, data offset)`` of a ``.npy`` file, or a DatasetError."""
    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DatasetError(f"{path}: is a directory, not a .npy file")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read(f)
            offset = f.tell()
    except (ValueError, EOFError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable .npy file ({str(exc).splitlines()[0]})") from None
    if dtype.hasobject:
        raise DatasetError(f"{path}: holds Python objects (dtype {dtype}); save a numeric array")
    need = offset + math.prod(shape) * dtype.itemsize
    have = os.path.getsize(path)
    if have < need:
        raise DatasetError(f"{path}: truncated: its header says shape {tuple(shape)} of {dtype} "
                           f"({need - offset} bytes of data) but it holds {max(have - offset, 0)}")
    return tuple(int(s) for s in shape), dtype, bool(fortran_order), offset


def open_npy(path, *, rows: int | None = None, features: int | None = None, labels: bool = False):
    """``path`` as a Dask array ``(N, D)`` (or ``(N,)`` labels) in chunks of ``rows`` samples.

    ``features``: the ``D`` the data must have. ``labels=True`` also accepts a 1-D integer
    array (class labels); otherwise the data must be 2-D float32 or float64. ``rows`` defaults
    to the file's first axis in chunks of about 128 MiB.
    """
    import dask.array as da

    path = os.fspath(path)
    shape, file_dtype, fortran_order, offset = _header(path)
    dtype = file_dtype.newbyteorder("=")  # big-endian files are read in native order
    if labels and len(shape) == 1 and dtype.kind in "iu":
        pass
    elif dtype not in _FLOATS:
        kinds = "float32 or float64 (or integer class labels, 1-D)" if labels else "float32 or float64"
        raise DatasetError(f"{path}: dtype {dtype}, but it must be {kinds}")
    elif len(shape) != 2:
        raise DatasetError(f"{path}: shape {shape}, but it must be 2-D (N, features)")
    if features is not None and len(shape) == 2 and shape[1] != features:
        raise DatasetError(f"{path}: shape {shape}, but the network takes {features} features: "
                           f"expected (N, {features})")
    if shape[0] == 0:
        raise DatasetError(f"{path}: holds no samples (shape {shape})")
    if rows is None:
        rows = max(1, (128 << 20) // max(1, math.prod(shape[1:]) * dtype.itemsize))
    chunks = (int(rows),) + shape[1:]
    source = NpyRows(path, shape, file_dtype, fortran_order, offset)
    meta = np.empty((0,) * len(shape), dtype=dtype)
    return da.from_array(source, chunks=chunks, meta=meta, name=f"jacgrad-npy-{_token(path, shape, dtype)}")


def _token(path: str, shape, dtype) -> str:
    from dask.base import tokenize

    st = os.stat(path)
    return tokenize(os.path.abspath(path), shape, str(dtype), st.st_mtime_ns, st.st_size)


# Task sizes that pay for the scheduler: TASKS_PER_THREAD tasks per thread that runs them (so
# the work spreads, and the progress moves), but none under MIN_TASK_ROWS samples, whose work
# (a forward and backward pass and the per-layer statistics: ~10 ms and up) outweighs a task's
# overhead (~1 ms on a distributed scheduler, the chunk's read from the memory-mapped file).
TASKS_PER_THREAD = 4
MIN_TASK_ROWS = 4096


def task_rows(N: int, threads: int) -> int:
    """Samples per task for ``N`` samples on ``threads`` threads (before the memory budget).

        >>> task_rows(200_000, 2), task_rows(200_000, 16), task_rows(3_000, 2)
        (25000, 4096, 4096)
    """
    return max(MIN_TASK_ROWS, math.ceil(N / (TASKS_PER_THREAD * max(1, threads))))


def read_dataset(data, targets=None, net: Any = None, *, max_memory: int | None = None):
    """``(X, T)`` for ``jacgrad report --data X.npy [--targets T.npy]``: Dask arrays checked against
    ``net`` (its input width; float targets its output width) and against each other (the same
    N), chunked so that a forward and backward pass of one chunk stays within ``max_memory``
    (default ``budget.default_max_memory`` of a Dask array) and every thread that runs tasks
    gets a few (``task_rows``). ``T`` is None without targets."""
    features = None if net is None else int(net.sizes[0])
    X = open_npy(data, features=features)
    rows = X.chunks[0][0]
    if net is not None:
        memory = budget.default_max_memory(X) if max_memory is None else max_memory
        rows = min(rows, budget.rows_per_task(budget.backward_bytes(net), memory),
                   task_rows(X.shape[0], budget.total_threads()))
        if rows != X.chunks[0][0]:
            X = open_npy(data, rows=rows, features=features)
    if targets is None:
        return X, None
    T = open_npy(targets, rows=rows, labels=True)
    if T.shape[0] != X.shape[0]:
        raise DatasetError(f"{os.fspath(targets)}: {T.shape[0]} targets but {os.fspath(data)} has {X.shape[0]} samples")
    if net is not None and T.ndim == 2 and T.shape[1] != int(net.sizes[-1]):
        raise DatasetError(f"{os.fspath(targets)}: shape {T.shape}, but the network has {net.sizes[-1]} outputs: "
                           f"expected ({T.shape[0]}, {net.sizes[-1]}) or integer labels ({T.shape[0]},)")
    return X, T

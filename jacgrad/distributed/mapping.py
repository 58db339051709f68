"""Per-sample functions mapped over the batch in chunks: Dask arrays lazily, NumPy/CuPy eagerly.

``map_samples(f, net, X, T)`` runs ``f(net, x_chunk, t_chunk) -> (b, ...)`` on every chunk of the
batch and stitches the rows back together; ``reduce_samples`` runs ``chunk(net, x, t) -> partial``
and merges the partials pairwise up a tree. One code path for both kinds of input:

- a Dask ``X`` gives a lazy Dask result. The batch axis keeps the user's chunks, cut where a chunk
  would exceed ``max_memory``; the feature axis is made one chunk. The network enters the graph
  ONCE, as one key every task depends on (a worker fetches it once and keeps it while its tasks
  run), never as a literal copied into each task.
- a NumPy or CuPy ``X`` is computed at once, in as many chunks as ``max_memory`` requires.

The per-chunk work is the network's own single-batch code (``MLP.forward``,
``jacobian_chain``, ``Chain.spectral_norm``); nothing here does arithmetic on the samples.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import string
import uuid
from typing import Any, Callable, Sequence

import numpy as np

from ..core.validation import FLOAT_DTYPES, check_input_dtype, require_network, shape_str
from ..core.backend import get_xp
from . import budget

__all__ = ["embed", "is_dask", "map_samples", "reduce_in_memory", "reduce_samples"]

SPLIT_EVERY = 8  # partials merged per task of a reduction tree


def is_dask(x: Any) -> bool:
    """True for a Dask array (checked without importing Dask)."""
    return (type(x).__module__ or "").startswith("dask.")


def embed(net):
    """``net`` as one Dask key (a ``Delayed``) for graphs to depend on: sent to the scheduler
    once, fetched once by each worker that runs a task. Its name hashes the pickled network
    (parameters, activations and their parameters), so the same network gives the same key and
    a changed one a new key."""
    import dask

    try:  # blake2b of the pickle: ~10 ms for a 3 MB net (dask's tokenize of the bytes takes 10x that)
        state = pickle.dumps((type(net).__module__, type(net).__qualname__, net), protocol=5)
        token = hashlib.blake2b(state, digest_size=16).hexdigest()
    except Exception:  # not picklable by pickle (cloudpickle may still ship it): a key of its own
        token = uuid.uuid4().hex
    return dask.delayed(net, name=f"jacgrad-net-{token}", pure=True, traverse=False)


def _check_batch(net, X) -> None:
    require_network(net, "jacgrad.distributed")
    n_in = int(net.sizes[0])
    if X.ndim != 2 or X.shape[1] != n_in:
        raise ValueError(f"X has shape {shape_str(X.shape) if not is_dask(X) else X.shape} but the network "
                         f"takes (N, {n_in}) inputs")
    if np.dtype(X.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"X has dtype {X.dtype}; jacgrad works in float32 or float64 — cast it first")
    check_input_dtype("X", X.dtype, net.dtype)  # before any task runs: never rounded, as in forward
    if is_dask(X) and any(c != c for c in X.chunks[0]):  # NaN: sizes unknown until computed
        raise ValueError("X has chunks of unknown size along the batch; call X.compute_chunk_sizes() first")


def _others(others, N: int) -> tuple:
    """The arrays that go with X (lists made NumPy arrays), each checked to have N rows."""
    others = tuple(T if hasattr(T, "shape") else np.asarray(T) for T in others)
    for i, T in enumerate(others):
        if T.ndim < 1 or T.shape[0] != N:
            raise ValueError(f"argument {i + 1} after X has shape {tuple(T.shape)} but X has {N} samples: "
                             f"its first axis must be the batch ({N})")
    return others


def _plan_rows(net, X, bytes_per_sample, max_memory) -> int:
    if max_memory is None:
        max_memory = budget.default_max_memory(X)
    per_sample = bytes_per_sample(net) if callable(bytes_per_sample) else int(bytes_per_sample)
    return budget.rows_per_task(per_sample, max_memory)


def map_samples(f: Callable, net, X, *others, out_shape: Sequence[int] = (), dtype=None,
                bytes_per_sample: Any = budget.backward_bytes, max_memory: int | None = None):
    """``f(net, x, *t)`` over the batch in chunks: ``X: (N, n_in)`` -> ``(N, *out_shape)``.

    ``f`` takes the network, ``x: (b, n_in)`` and the matching rows of each of ``others``
    (targets, labels: first axis N) and returns ``(b, *out_shape)`` of ``dtype`` (default the
    network's). ``bytes_per_sample`` (bytes, or a function of the net; default
    ``budget.backward_bytes``) and ``max_memory`` (bytes per task; default
    ``budget.default_max_memory(X)``) set the largest chunk.

    A Dask ``X`` gives a lazy Dask array chunked as ``X`` along the batch (chunks above the
    budget split); ``others`` may be Dask or in-memory arrays. A NumPy/CuPy ``X`` gives an array
    of its kind, computed a chunk at a time when the batch exceeds the budget.
    """
    _check_batch(net, X)
    N = int(X.shape[0])
    others = _others(others, N)
    out_shape = tuple(int(s) for s in out_shape)
    dtype = np.dtype(net.dtype if dtype is None else dtype)
    rows = _plan_rows(net, X, bytes_per_sample, max_memory)
    call = functools.partial(_apply, f, out_shape)
    if is_dask(X):
        return _map_dask(call, net, X, others, out_shape, dtype, rows)
    xp = get_xp(X)
    if N <= rows:
        return call(net, X, *others)
    out = xp.empty((N,) + out_shape, dtype=dtype)
    for start in range(0, N, rows):
        sel = slice(start, min(start + rows, N))
        out[sel] = call(net, X[sel], *[T[sel] for T in others])
    return out


def _apply(f, out_shape, net, x, *others):
    """``f(net, x, *others)``, its shape checked: the function's name is in the error."""
    y = f(net, x, *others)
    want = (x.shape[0],) + out_shape
    if tuple(y.shape) != want:
        name = getattr(f, "__qualname__", repr(f))
        raise ValueError(f"{name} returned shape {shape_str(y.shape)} for a chunk of {x.shape[0]} samples; "
                         f"expected {shape_str(want)}")
    return y


def _dask_batch(X, rows: int):
    """``X`` with one chunk along the features and its batch chunks cut to at most ``rows``."""
    chunks = budget.split_chunks(X.chunks[0], rows)
    if chunks != X.chunks[0] or len(X.chunks[1]) != 1:
        X = X.rechunk((chunks, X.shape[1]))
    return X


def _align(T, chunks):
    """``T`` as a Dask array with batch chunks ``chunks`` and one chunk along its other axes."""
    import dask.array as da

    want = (chunks,) + tuple((s,) for s in T.shape[1:])
    if not is_dask(T):
        return da.from_array(T, chunks=want)
    return T if T.chunks == want else T.rechunk(want)


def _map_dask(call, net, X, others, out_shape, dtype, rows):
    import dask.array as da

    X = _dask_batch(X, rows)
    others = [_align(T, X.chunks[0]) for T in others]
    letters = iter(string.ascii_lowercase[2:])
    args = [X, "ab", embed(net), None]
    for T in others:
        args += [T, "a" + "".join(next(letters) for _ in T.shape[1:])]
    new = {next(letters): s for s in out_shape}
    meta = np.empty_like(X._meta, shape=(0,) * (1 + len(out_shape)), dtype=dtype)
    return da.blockwise(_swap, "a" + "".join(new), call, None, *args, new_axes=new, concatenate=True,
                        meta=meta, dtype=dtype, token=f"jacgrad-{_name(call.args[0])}")


def _swap(call, x, net, *others):
    """blockwise hands the arguments in graph order; the per-sample function wants net first."""
    return call(net, x, *others)


def _name(f) -> str:
    return getattr(f, "__name__", "map").strip("_<>").replace(".", "-") or "map"


def reduce_samples(chunk: Callable, combine: Callable, aggregate: Callable, net, X, *others,
                   bytes_per_sample: Any = budget.backward_bytes, max_memory: int | None = None,
                   split_every: int = SPLIT_EVERY, with_start: bool = False):
    """Map-reduce over the batch: ``aggregate(combine(…combine(chunk(net, x₁, *t₁), chunk(net, x₂, *t₂))…))``.

    ``chunk(net, x, *t) -> partial`` summarises the rows of one chunk (sums, counts, maxima…),
    ``combine(a, b) -> partial`` merges two partials (associative; the left one covers the
    earlier rows) and ``aggregate(partial) -> result`` finishes. Partials are merged
    ``split_every`` at a time up a tree, left to right, in the same order for both inputs:
    a Dask ``X`` gives a lazy ``dask.delayed`` result (``.compute()`` it), a NumPy/CuPy ``X``
    the result itself — equal to the last bit when the chunks are the same. ``with_start=True``
    also passes ``start=``, the chunk's first row in the whole batch (to seed per-sample random
    draws by row, or to keep the first S samples), so a statistic need not depend on the chunking.
    """
    _check_batch(net, X)
    N = int(X.shape[0])
    others = _others(others, N)
    if split_every < 2:
        raise ValueError(f"split_every must be at least 2, got {split_every}")
    rows = _plan_rows(net, X, bytes_per_sample, max_memory)
    if is_dask(X):
        import dask

        X = _dask_batch(X, rows)
        blocks = [b[0] for b in X.to_delayed()]
        tblocks = [_align(T, X.chunks[0]).to_delayed().ravel() for T in others]
        node = embed(net)
        starts = np.cumsum((0,) + X.chunks[0][:-1])
        parts = [dask.delayed(chunk, pure=True)(node, b, *[t[i] for t in tblocks], **_start(with_start, starts[i]))
                 for i, b in enumerate(blocks)]
        fold = dask.delayed(_fold, pure=True)
        return dask.delayed(aggregate, pure=True)(_tree(parts, lambda group: fold(combine, group), split_every))
    bounds = [(s, min(s + rows, N)) for s in range(0, N, rows)]
    parts = [chunk(net, X[a:b], *[T[a:b] for T in others], **_start(with_start, a)) for a, b in bounds]
    return aggregate(_tree(parts, lambda group: _fold(combine, group), split_every))


def reduce_in_memory(chunk: Callable, combine: Callable, net, x, *others, bytes_per_sample: Callable,
                     max_memory: int | None = None):
    """The partial of an in-memory batch ``x: (B, n_in)``: ``chunk(net, x, *others, start=0)`` in one
    go, or — when its intermediates (``bytes_per_sample(net)`` bytes per sample) exceed
    ``max_memory`` — ``chunk`` over rows that fit, merged by ``combine`` (``reduce_samples``).
    ``max_memory`` None: ``budget.default_max_memory(x)`` for a NumPy batch; a CuPy batch is split
    only when ``max_memory`` is given (the device's memory is not the host's)."""
    if get_xp(x) is np or max_memory is not None:
        memory = budget.default_max_memory(x) if max_memory is None else max_memory
        rows = int(x.shape[0]) if x.ndim == 2 else 0  # a misshapen x goes to chunk, whose error names it
        if rows > budget.rows_per_task(bytes_per_sample(net), memory):
            return reduce_samples(chunk, combine, _same, net, x, *others, bytes_per_sample=bytes_per_sample,
                                  max_memory=memory, with_start=True)
    return chunk(net, x, *others, start=0)


def _same(partial):
    return partial


def _start(with_start: bool, row) -> dict:
    return {"start": int(row)} if with_start else {}


def _fold(combine, group):
    return functools.reduce(combine, group)


def _tree(parts: list, merge: Callable, split_every: int):
    """Merge ``parts`` ``split_every`` at a time, level by level, keeping their order."""
    while len(parts) > 1:
        parts = [parts[i] if len(parts[i : i + split_every]) == 1 else merge(parts[i : i + split_every])
                 for i in range(0, len(parts), split_every)]
    return parts[0]

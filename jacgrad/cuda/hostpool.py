"""Host blocks reused between calls: the NumPy side of what a caching allocator does on a GPU.

``MLP.forward`` and ``MLP.backward`` return fresh results every call: the saved activations, the
deltas and the parameter gradients, each carved from ONE block (``_passes.carve``). Made with a
plain ``np.empty`` every step, a large block is fresh memory from the kernel: tens of MB zeroed
and page-faulted in per step, or not, depending on the state of the C allocator (glibc returns
blocks ≥ 32 MiB to the kernel on every free). This pool keeps the last ``capacity`` blocks it
handed out; a later call of the same size and dtype gets one back once nothing refers to it any
more — no view, no ``Gradients``, no cache, no tensor made from it (CPython's reference count of
the block says so exactly: every NumPy view of it holds a reference to it).

So a training loop touches the same memory every step, like ``net.compile(B)`` does, while the
results stay the caller's for as long as the caller keeps them. What the pool holds when nothing
is in use: ``nbytes()``; ``release()`` drops it. Where reference counts cannot be read exactly
(checked at import; a free-threaded CPython) nothing is reused. CuPy arrays are not pooled here
(CuPy has its own memory pool).

    >>> import numpy as np
    >>> a = take(1000, np.float32); address = a.ctypes.data
    >>> del a                                    # nothing refers to the block any more
    >>> take(1000, np.float32).ctypes.data == address
    True
"""

from __future__ import annotations

import sys
import threading

import numpy as np

__all__ = ["capacity", "empty", "nbytes", "release", "take"]

capacity = 8  # blocks remembered: three per step (cache, deltas, gradients), room for two steps alive; 0 turns pooling off

_blocks: list = []  # most recently handed out last
_lock = threading.Lock()


def _refs(blocks: list, i: int) -> int:
    return sys.getrefcount(blocks[i])


def _calibrate() -> int | None:
    """What ``_refs`` reads for a block only the pool's list holds, checked to read one more
    when something else holds it too; None where reference counts cannot be read that exactly
    (a free-threaded build, or an interpreter that elides references): then nothing is reused."""
    if not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    probe = [np.empty(1)]
    free = _refs(probe, 0)
    held = probe[0]
    exact = _refs(probe, 0) == free + 1
    del held
    return free if exact and _refs(probe, 0) == free else None


_FREE_REFS = _calibrate()


def _unused(blocks: list, i: int) -> bool:
    """True when the pool's list is the only holder of ``blocks[i]``."""
    return _FREE_REFS is not None and _refs(blocks, i) == _FREE_REFS


def take(n: int, dtype) -> np.ndarray:
    """A 1-D NumPy array of ``n`` elements of ``dtype``, contents undefined: a remembered block
    that nothing refers to any more, else a new one (remembered, the oldest forgotten)."""
    dtype = np.dtype(dtype)
    with _lock:
        for i in range(len(_blocks) - 1, -1, -1):
            b = _blocks[i]
            if b.size == n and b.dtype == dtype:
                del b  # our own local reference must not count
                if _unused(_blocks, i):
                    block = _blocks.pop(i)
                    _blocks.append(block)
                    return block
        block = np.empty(n, dtype=dtype)
        _blocks.append(block)
        del _blocks[: max(0, len(_blocks) - capacity)]
        return block


# Smaller arrays come back from the C allocator without page faults (tapering and hourglass
# Jacobians, stacks of 0.6 MiB: 0.05 faults a call), and the pool's bookkeeping cost them 2-3%.
MIN_POOLED_BYTES = 1 << 22
MAX_POOLED_BYTES = 1 << 26  # bigger ones are not kept: what the pool holds idle stays ≤ capacity × 64 MiB


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, carved from a block of ``take`` when it has between
    ``MIN_POOLED_BYTES`` and ``MAX_POOLED_BYTES`` (the block is its base, so the result keeps the
    block in use for as long as anything refers to it); a plain ``np.empty`` outside that range.
    For the temporaries of a computation (the stacks of a Jacobian product), reused within and
    across calls."""
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    n = 1
    for d in shape:
        n *= d
    if not MIN_POOLED_BYTES <= n * dtype.itemsize <= MAX_POOLED_BYTES:
        return np.empty(shape, dtype)
    return take(n, dtype).reshape(shape)


def nbytes() -> int:
    """Bytes of the remembered blocks that nothing else refers to (what ``release`` would free)."""
    with _lock:
        return int(sum(_blocks[i].nbytes for i in range(len(_blocks)) if _unused(_blocks, i)))


def release() -> None:
    """Forget every remembered block (blocks still in use stay alive through their users)."""
    with _lock:
        _blocks.clear()

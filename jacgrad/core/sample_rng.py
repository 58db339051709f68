"""Per-sample random rows that do not depend on how the batch is cut into chunks.

Sample ``i``'s row of a stream is the same whether the batch is processed whole or in chunks
(``rows(key, start, stop, n)`` of any chunk equals the slice of the whole): the stream is cut into
blocks of ``block_rows(n)`` samples, block ``k`` drawn from its own generator. Block 0 is drawn
from ``default_rng(key)`` itself, so a batch that fits one block gets exactly
``default_rng(key).standard_normal((B, n))``. A chunk draws only the blocks it overlaps, up to its
last row.

    >>> import numpy as np
    >>> whole = rows((7,), 0, 10, 3)
    >>> bool((np.concatenate([rows((7,), 0, 4, 3), rows((7,), 4, 10, 3)]) == whole).all())
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["block_rows", "rows"]


def block_rows(n: int) -> int:
    """Samples per block: about 2^20 numbers, at least 1024 samples."""
    return max(1024, (1 << 20) // max(n, 1))


def rows(key: tuple, start: int, stop: int, n: int) -> np.ndarray:
    """Host float64 ``(stop - start, n)``: standard normal rows ``start .. stop-1`` of stream ``key``."""
    size = block_rows(n)
    parts = []
    for block in range(start // size, (stop - 1) // size + 1 if stop > start else start // size):
        lo = block * size
        gen = np.random.default_rng(list(key) if block == 0 else list(key) + [1 << 31, block])
        drawn = gen.standard_normal((min(stop, lo + size) - lo, n))
        parts.append(drawn[max(start, lo) - lo :])
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, n))

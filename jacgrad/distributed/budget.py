"""The memory budget of one task, and the chunk planner that keeps every task under it.

A per-sample computation on ``b`` rows holds about ``b · bytes_per_sample`` bytes of
intermediates (the forward cache, the deltas, the Jacobian accumulators). ``rows_per_task``
turns a budget into rows; ``split_chunks`` cuts the batch chunks that are too big and keeps
the others as the user chose them. NumPy batches go through the same planner: a batch bigger
than the budget is computed chunk by chunk rather than failing.

    >>> import jacgrad as jg
    >>> net = jg.MLP.init([784, 256, 10], seed=0)
    >>> forward_bytes(net)                        # 8 bytes x (784 inputs + 256 + 10 saved)
    8400
    >>> split_chunks((1000, 1000, 300), 400)
    (334, 333, 333, 334, 333, 333, 300)
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from ..algebra import bracketing
from ..core.validation import byte_size, check_max_memory

__all__ = [
    "FRACTION",
    "active_client",
    "backward_bytes",
    "default_max_memory",
    "forward_bytes",
    "free_ram",
    "jacobian_bytes",
    "rows_per_task",
    "split_chunks",
    "total_threads",
]

# The default budget of one task: this share of the memory one task may count on (a worker
# thread's share of its worker's limit, a local thread's share of the free RAM, the GPU's free
# memory). The estimates below are estimates: the rest is headroom for them and for the inputs.
FRACTION = 0.25


def _sizes(net) -> list[int]:
    return [int(s) for s in net.sizes]


def _saved_widths(net) -> list[int]:
    """``sizes`` and, for a ``Sequential``, the output widths of the layers inside its residual
    blocks (they save activations too)."""
    return _sizes(net) + _inner_widths(getattr(net, "layers", ()))


def _inner_widths(layers) -> list[int]:
    out = []
    for L in layers:
        inner = getattr(L, "layers", None)  # a residual block
        if inner is not None:
            out += [int(M.n_out) for M in inner] + _inner_widths(inner)
    return out


def _itemsize(net) -> int:
    return int(np.dtype(net.dtype).itemsize)


def forward_bytes(net) -> int:
    """Bytes per sample of ``net(x)``: the input row and the ``Σ_j H_j`` saved activations."""
    sizes = _saved_widths(net)
    return _itemsize(net) * (sizes[0] + sum(sizes[1:]))


def backward_bytes(net) -> int:
    """Bytes per sample of a loss, forward and backward pass: the cache, the deltas, one more
    ``(B, H)`` temporary per layer, the loss's temporaries and the input gradient."""
    sizes, saved = _sizes(net), _saved_widths(net)
    return _itemsize(net) * (2 * sizes[0] + 3 * sum(saved[1:]) + 3 * sizes[-1])


def jacobian_bytes(net) -> int:
    """Bytes per sample of the whole input-output Jacobian and its SVD: the forward cache,
    three of the largest sub-products of ``Chain.jacobian``'s bracketing (two operands and the
    result of one GEMM) and the ``(n_out, n_in)`` result."""
    sizes = _sizes(net)
    K = len(sizes) - 1
    tree = bracketing.plan("auto", sizes, [True] * K, 1).tree
    return forward_bytes(net) + _itemsize(net) * (3 * _largest_product(tree, sizes) + sizes[0] * sizes[-1])


def _largest_product(node, widths) -> int:
    """The most elements of one sample's sub-product ``(w[last+1], w[first])`` that evaluating
    ``node`` forms, walked as ``bracketing.evaluate`` walks it: every inner node's product, and a
    factor made dense only where it is not applied along a spine (``bracketing.peel_spine``)."""
    best, stack = 0, [node]
    while stack:
        node = stack.pop()
        leaves = _leaves(node)
        best = max(best, widths[max(leaves) + 1] * widths[min(leaves)])
        if isinstance(node, int):
            continue
        side = 0 if isinstance(node[0], int) else 1 if isinstance(node[1], int) else None
        if side is None:
            stack.extend(node)
            continue
        spine, inner = bracketing.peel_spine(node, side)
        # the accumulator after each spine factor: the sub-chains from the inner one outwards
        stack.append(inner)
        covered = _leaves(inner)
        for k in reversed(spine):
            covered.append(k)
            best = max(best, widths[max(covered) + 1] * widths[min(covered)])
    return best


def _leaves(node) -> list[int]:
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, int):
            out.append(n)
        else:
            stack.extend(n)
    return out


def rows_per_task(bytes_per_sample: int, max_memory: int) -> int:
    """How many samples one task may hold: ``max_memory // bytes_per_sample``, at least one
    sample, or a ``MemoryError`` saying so when a single sample needs more than the budget."""
    if check_max_memory(max_memory, none_means="the default budget") is None:
        raise ValueError("rows_per_task needs a budget: max_memory is None (budget.default_max_memory gives one)")
    bytes_per_sample = int(bytes_per_sample)
    if bytes_per_sample > max_memory:
        raise MemoryError(
            f"one sample needs about {byte_size(bytes_per_sample)} of intermediates but max_memory is "
            f"{byte_size(max_memory)}: raise max_memory"
        )
    max_memory = int(max_memory)
    return max(1, max_memory // max(bytes_per_sample, 1))


def split_chunks(chunks, rows: int) -> tuple[int, ...]:
    """``chunks`` (sizes along the batch) with each one above ``rows`` cut into the fewest
    near-equal pieces of at most ``rows``; those that fit stay as they are."""
    out: list[int] = []
    for c in chunks:
        c = int(c)
        pieces = max(1, math.ceil(c / rows))
        base, extra = divmod(c, pieces)
        out += [base + 1] * extra + [base] * (pieces - extra)
    return tuple(out)


def default_max_memory(x: Any = None) -> int:
    """``FRACTION`` of the memory one task can count on where ``x`` will be computed:

    - CuPy chunks (or a CuPy array): the current GPU's free memory;
    - a Dask array with a ``distributed.Client`` active: the smallest worker memory limit
      divided by that worker's threads;
    - a Dask array on the local scheduler: the free RAM divided by the scheduler's threads;
    - a NumPy array: the free RAM.
    """
    meta = getattr(x, "_meta", x)  # a Dask array's blocks are of its meta's type
    module = type(meta).__module__ or ""
    if module == "cupy" or module.startswith("cupy."):
        import sys

        free, _ = sys.modules["cupy"].cuda.Device().mem_info  # cupy is imported: x is one of its arrays
        return max(1, int(FRACTION * free))
    is_dask = (type(x).__module__ or "").startswith("dask.")
    if is_dask:
        per_thread = _cluster_memory_per_thread()
        if per_thread is None:
            import dask

            threads = int(dask.config.get("num_workers", None) or os.cpu_count() or 1)
            per_thread = free_ram() // threads
        return max(1, int(FRACTION * per_thread))
    return max(1, int(FRACTION * free_ram()))


def _cluster_memory_per_thread() -> int | None:
    """The smallest ``memory_limit / nthreads`` over the active client's workers, or None."""
    client = active_client()
    if client is None:
        return None
    # distributed 2025+ lists 5 workers unless told otherwise; older versions list them all
    kwargs = {"n_workers": -1} if _takes_n_workers(client) else {}
    workers = client.scheduler_info(**kwargs).get("workers", {})
    shares = [
        int(w["memory_limit"]) // max(int(w.get("nthreads", 1)), 1)
        for w in workers.values()
        if w.get("memory_limit")
    ]
    return min(shares) if shares else free_ram()


def total_threads() -> int:
    """The threads that run tasks: the active client's workers' ``nthreads`` summed, else the
    local scheduler's (``dask.config`` ``num_workers``, else every CPU)."""
    client = active_client()
    if client is not None:
        kwargs = {"n_workers": -1} if _takes_n_workers(client) else {}
        workers = client.scheduler_info(**kwargs).get("workers", {})
        return max(1, sum(int(w.get("nthreads", 1)) for w in workers.values()))
    import dask

    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def active_client():
    """The ``distributed.Client`` that ``compute`` would use, or None (then Dask's local scheduler runs)."""
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):  # distributed not installed, or no client active
        return None


def _takes_n_workers(client) -> bool:
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def free_ram() -> int:
    """Available RAM in bytes (``MemAvailable`` on Linux; else total pages x page size)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

"""How many BLAS threads the ``jacgrad`` command gives NumPy, and how it says so.

The rule (``choose``), measured with ``benchmarks/blas_threads.py`` on the project's 2-core AMD
EPYC (shared with other busy processes, 1-minute load average 5.5) for ``(B, H) @ (H, H)`` in
float64, median of 5:

    B =  64: H =  128: 1 thread  0.10 ms, 2 threads  8.6 ms (x0.01); H =  512: 3.8 ms vs  9.8 ms (x0.38);
             H = 2048: 28 ms vs 104 ms (x0.27)
    B = 256: H =   64: 0.11 ms vs 2.0 ms (x0.05); H =  256: 3.5 ms vs  4.6 ms (x0.77);
             H = 2048: 93 ms vs 140 ms (x0.66)

No width from 32 to 2048 gained from a second thread there: when the other core is busy, a
BLAS thread that waits for it costs a time slice (~4-10 ms), more than such a GEMM takes. The
issue's quick-start report measured the same: 52.7 s with the default threads, 11.8 s with one;
here ``jacgrad report`` (defaults) took 27.7 s and 14.2 s under this rule (one thread; load 29
and 11) against 173 s and 189 s with ``OPENBLAS_NUM_THREADS=2`` (load 22 and 9; 91-92 s of CPU
time, most of it spin-waiting, against 9.1-9.4 s).
A second thread can only pay when a core is idle for it and the GEMM is long enough that the
wake-up (tens of µs on an idle core) is lost in it; we take 2²⁶ multiply-adds (≥ ~5 ms in one
thread, B = 64 at H = 1024) as that size. So:

    threads = 1                                    if B·H_in·H_out < 2²⁶ (SMALL_GEMM_MACS)
    threads = min(idle cores, B·H_in·H_out / 2²⁵)  otherwise, idle cores = CPUs − load average
                                                   rounded up, at least 1

unless the user set ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``: then
their value is honoured and nothing is changed. ``jacgrad info`` prints the count and its
source.
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = [
    "ENV_VARS", "SMALL_GEMM_MACS", "blas_libraries", "choose", "cpu_count", "describe", "gemm_macs", "limit", "user_setting",
]

ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SMALL_GEMM_MACS = 1 << 26

_LIMITER: Any = None  # keeps threadpoolctl's limit alive for the process
_CHOSEN: dict = {}


def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def user_setting(environ=None) -> tuple[str, int] | None:
    """``(variable, threads)`` of the first of ``ENV_VARS`` set to a positive integer, or None."""
    environ = os.environ if environ is None else environ
    for var in ENV_VARS:
        text = environ.get(var, "").strip()
        if text:
            try:
                n = int(text.split(",")[0])  # OMP_NUM_THREADS may list nesting levels: the first counts
            except ValueError:
                continue
            if n >= 1:
                return var, n
    return None


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose(macs: int, cpus: int | None = None, load: float | None = None) -> int:
    """BLAS threads for GEMMs of ``macs`` multiply-adds each (``B·H_in·H_out``) on ``cpus`` CPUs
    with ``load`` (1-minute load average): the module's rule.

        >>> choose(64 * 256 * 256, cpus=16, load=0.0)        # the default report's GEMMs: small
        1
        >>> choose(1024 * 2048 * 2048, cpus=16, load=0.0)    # big, idle cores: as many as pay
        16
        >>> choose(1024 * 2048 * 2048, cpus=2, load=5.5)     # big, but no idle core
        1
    """
    cpus = cpu_count() if cpus is None else int(cpus)
    load = _load() if load is None else float(load)
    if macs < SMALL_GEMM_MACS:
        return 1
    idle = max(1, cpus - math.ceil(load))
    return max(1, min(idle, cpus, int(macs // (SMALL_GEMM_MACS // 2))))


def blas_libraries() -> list[dict]:
    """NumPy's BLAS libraries as threadpoolctl sees them: ``{"library", "version", "threads"}``
    (empty without threadpoolctl)."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    return [{"library": lib.get("internal_api"), "version": lib.get("version"), "threads": lib.get("num_threads")}
            for lib in threadpoolctl.threadpool_info() if lib.get("user_api") == "blas"]


def gemm_macs(sizes, batch: int) -> int:
    """The multiply-adds of a dense net's largest layer GEMM over ``batch`` rows: ``B·max_j H_{j-1}·H_j``."""
    sizes = [int(s) for s in sizes]
    return int(batch) * max((a * b for a, b in zip(sizes[:-1], sizes[1:])), default=0)


def limit(macs: int, why: str | None = None) -> dict:
    """Set NumPy's BLAS threads by ``choose(macs)``, unless the environment names a count (then
    leave it). ``why``: the reason to give instead of the rule's (``macs`` 0 gives one thread).
    Returns ``{"threads", "source"}`` for ``describe``."""
    global _LIMITER
    user = user_setting()
    if user is not None:
        var, n = user
        _CHOSEN.update(threads=n, source=f"{var}={n}")
        return dict(_CHOSEN)
    n = choose(macs)
    try:
        import threadpoolctl
    except ImportError:
        _CHOSEN.update(threads=None, source="not set: threadpoolctl is not installed (set OPENBLAS_NUM_THREADS)")
        return dict(_CHOSEN)
    _LIMITER = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    why = why or f"jacgrad's rule for GEMMs of {macs:,} multiply-adds on {cpu_count()} CPUs"
    _CHOSEN.update(threads=n, source=f"{why} (set OPENBLAS_NUM_THREADS to choose)")
    return dict(_CHOSEN)


def describe() -> str:
    """One line: the BLAS threads now, and where the count came from."""
    libs = blas_libraries()
    now = ", ".join(f"{lib['library']} {lib['version'] or ''}: {lib['threads']} thread{'s' if lib['threads'] != 1 else ''}"
                    .replace(" :", ":") for lib in libs)
    user = user_setting()
    if user is not None:
        source = f"{user[0]}={user[1]}"
    elif _CHOSEN:
        source = _CHOSEN["source"]
    else:
        source = (f"the library default; jacgrad report and check choose 1 for GEMMs under {SMALL_GEMM_MACS:,} "
                  "multiply-adds (set OPENBLAS_NUM_THREADS to choose)")
    return f"{now or 'unknown (threadpoolctl not installed)'} — {source}"

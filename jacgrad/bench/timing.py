"""Timing: warm-up, calibrated loops, interleaved repeats, median and IQR; thread settings.

All entries of one case (every backend, every variant, every GEMM floor) are timed
*interleaved*: repeat r runs each entry once, in an order rotated by r. A background load that
comes and goes then hits every entry alike, so the ratios of one run are side by side even
on a busy machine. Each sample is a loop of ``number`` calls (calibrated so that a sample
lasts at least ``min_time`` seconds), preceded by untimed calls that wake the library's thread
pool (``settle``), and followed by ONE device-side synchronisation on the last result (CuPy: stream synchronize; torch: ``torch.cuda.synchronize``; JAX: ``block_until_ready``),
so GPU queues are drained inside the timed region and no host sync is added between calls.

    >>> e = Entry("noop", lambda: None)
    >>> _ = time_entries([e], repeats=3, warmup=1, min_time=0.0)
    >>> len(e.samples), e.stats()["n"]
    (3, 3)
"""

from __future__ import annotations

import math
import os
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["Entry", "cpu_count", "short_error", "stats", "thread_report", "set_threads", "time_entries"]


def short_error(exc: BaseException, limit: int = 160) -> str:
    """``"Type: message"`` on one line, cut to ``limit`` characters."""
    msg = " ".join(str(exc).split()) or "(no message)"
    text = f"{type(exc).__name__}: {msg}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Entry:
    """One timed thing: ``fn()`` returns a result; ``sync(result)`` waits for the device."""

    label: str
    fn: Callable[[], Any]
    sync: Callable[[Any], Any] = lambda result: None
    number: int = 1
    call_s: float = 0.0  # one call's seconds, measured at warm-up
    samples: list[float] = field(default_factory=list)  # seconds per call
    error: str | None = None
    trace: str | None = None

    def run(self, number: int) -> float:
        """Seconds per call of a loop of ``number`` calls, synchronised once at the end."""
        fn = self.fn
        t0 = time.perf_counter()
        result = None
        for _ in range(number):
            result = fn()
        self.sync(result)
        return (time.perf_counter() - t0) / number

    def settle(self, seconds: float) -> None:
        """Untimed calls (at least one, for about ``seconds``) right before a timed sample.

        Interleaving hands the CPU from one library's thread pool to another's: the one coming
        in has parked its threads (and the one going out may still spin). Without this, the
        first calls of every sample pay for waking the pool, which no steady loop pays.
        """
        t_end = time.perf_counter() + seconds
        while True:
            self.sync(self.fn())
            if time.perf_counter() >= t_end:
                return

    def fail(self, exc: BaseException) -> None:
        self.error = short_error(exc)
        self.trace = traceback.format_exc()

    def stats(self) -> dict:
        return stats(self.samples)


def stats(samples) -> dict:
    """Median, quartiles, IQR and min of ``samples`` (seconds) in milliseconds."""
    if not len(samples):
        return {"n": 0}
    ms = np.asarray(samples, dtype=np.float64) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {"n": int(ms.size), "median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3),
            "iqr_ms": float(q3 - q1), "min_ms": float(ms.min()), "max_ms": float(ms.max())}


def time_entries(entries: list[Entry], repeats: int, warmup: int, min_time: float,
                 tick: Callable[[str], None] | None = None, max_number: int = 10_000,
                 settle: float = 0.005) -> list[Entry]:
    """Warm up and calibrate every entry, then time them interleaved ``repeats`` times.

    An entry that raises (at warm-up or later) keeps its error and drops out; the others go on.
    ``tick(label)`` is called after each warm-up and each timed sample (the progress bar).
    """
    live = []
    for e in entries:
        try:
            t = 0.0
            for _ in range(max(1, warmup)):
                t = e.run(1)
            e.call_s = t
            e.number = max(1, min(max_number, math.ceil(min_time / max(t, 1e-7))))
            live.append(e)
        except Exception as exc:  # a peer failing at run time is a result, not a crash
            e.fail(exc)
        if tick:
            tick(e.label)
    for r in range(repeats):
        k = r % len(live) if live else 0
        for e in live[k:] + live[:k]:
            if e.error is None:
                try:
                    e.settle(settle)
                    e.samples.append(e.run(e.number))
                except Exception as exc:
                    e.fail(exc)
            if tick:
                tick(e.label)
    return entries


# ---------------------------------------------------------------------- threads
def cpu_count() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_LIMITER: Any = None  # keeps threadpoolctl's limits alive for the process


def set_threads(n: int) -> dict:
    """Give NumPy's BLAS (through threadpoolctl, when installed) and PyTorch (when imported
    later by a backend) ``n`` threads. Returns what was done, for the table header."""
    global _LIMITER
    from ..cli.threads import user_setting

    user = user_setting()
    done = {"requested": n, "source": f"{user[0]}={user[1]}" if user is not None and user[1] == n else None}
    try:
        import threadpoolctl

        _LIMITER = threadpoolctl.threadpool_limits(limits=n, user_api="blas")
        done["numpy_blas"] = n
    except ImportError:
        done["numpy_blas"] = None  # not controllable without threadpoolctl: reported as such
    os.environ.setdefault("OMP_NUM_THREADS", str(n))  # for libraries that read it at import
    return done


def thread_report() -> dict:
    """NumPy's BLAS library, its kernel architecture and thread count; OPENBLAS_* variables."""
    info: dict = {"cpus": cpu_count(),
                  "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_", "XLA_"))}}
    try:
        import threadpoolctl

        for lib in threadpoolctl.threadpool_info():
            if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
                info["numpy_blas"] = {"library": lib.get("internal_api"), "version": lib.get("version"),
                                      "architecture": lib.get("architecture"), "threads": lib.get("num_threads")}
                break
    except ImportError:
        info["numpy_blas"] = {"library": "unknown (threadpoolctl not installed)", "threads": None}
    return info

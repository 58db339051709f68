#!/usr/bin/env python
"""The GEMMs of one dense layer of the training step, per operand layout, NumPy (its BLAS) against torch.

    python benchmarks/gemm_layouts.py --batch 256 --width 1024 --dtype float32 --threads 2 --repeats 9

Products (B = batch, H = width, every array float, results written with ``out=``):

- forward      ``h = z @ W``        (B, H) @ (H, H)
- grad W       ``dW = zᵀ δ``        (H, B) @ (B, H)
- input grad   ``g = δ Wᵀ``         (B, H) @ (H, H)

each with W kept as jacgrad keeps it, ``(H_in, H_out)`` C-contiguous, and as torch's ``nn.Linear``
keeps it, ``(H_out, H_in)`` C-contiguous (read through a transposed view), and for ``dW`` also
as ``(δᵀ z)ᵀ`` written through a transposed output. All variants are timed interleaved (each
repeat runs every variant once, in rotated order); the table gives the median ms and the ratio to
the fastest variant of the same product. Prints the CPU model and the load average beside the
numbers: on a loaded machine compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return "unknown CPU"


def variants(B: int, H: int, dtype: str, torch):
    rng = np.random.default_rng(0)
    z, d = rng.standard_normal((B, H)).astype(dtype), rng.standard_normal((B, H)).astype(dtype)
    W = rng.standard_normal((H, H)).astype(dtype)
    Wt = np.ascontiguousarray(W.T)  # torch's layout: (H_out, H_in)
    h, g, dW = np.empty((B, H), dtype), np.empty((B, H), dtype), np.empty((H, H), dtype)
    dWt = np.empty((H, H), dtype)
    out = [
        ("forward", "numpy z @ W (jacgrad layout)", lambda: np.matmul(z, W, out=h)),
        ("forward", "numpy z @ Wt.T (torch layout)", lambda: np.matmul(z, Wt.T, out=h)),
        ("grad W", "numpy z.T @ δ", lambda: np.matmul(z.T, d, out=dW)),
        ("grad W", "numpy (δ.T @ z) into dWt, dW = dWt.T", lambda: np.matmul(d.T, z, out=dWt)),
        ("input grad", "numpy δ @ W.T (jacgrad layout)", lambda: np.matmul(d, W.T, out=g)),
        ("input grad", "numpy δ @ Wt (torch layout)", lambda: np.matmul(d, Wt, out=g)),
    ]
    if torch is not None:
        tz, td, tW, tWt = (torch.from_numpy(a) for a in (z, d, W, Wt))
        th, tg, tdW = (torch.from_numpy(a) for a in (np.empty_like(h), np.empty_like(g), np.empty_like(dW)))
        out += [
            ("forward", "torch z @ W (jacgrad layout)", lambda: torch.mm(tz, tW, out=th)),
            ("forward", "torch z @ Wt.T (torch layout)", lambda: torch.mm(tz, tWt.t(), out=th)),
            ("grad W", "torch z.T @ δ", lambda: torch.mm(tz.t(), td, out=tdW)),
            ("input grad", "torch δ @ W.T (jacgrad layout)", lambda: torch.mm(td, tW.t(), out=tg)),
            ("input grad", "torch δ @ Wt (torch layout)", lambda: torch.mm(td, tWt, out=tg)),
        ]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per sample (calls are looped to reach it)")
    a = p.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads, user_api="blas")
    except ImportError:
        print("threadpoolctl is not installed: NumPy's BLAS keeps its own thread count", file=sys.stderr)
    try:
        import torch

        torch.set_num_threads(a.threads)
    except ImportError:
        torch = None
    rows = variants(a.batch, a.width, a.dtype, torch)
    numbers = []
    for _, _, fn in rows:  # calibrate: calls per sample
        fn()
        t0 = time.perf_counter()
        fn()
        numbers.append(max(1, int(a.min_time / max(time.perf_counter() - t0, 1e-6))))
    samples: list[list[float]] = [[] for _ in rows]
    load0 = os.getloadavg()[0]
    for r in range(a.repeats):
        order = list(range(len(rows)))
        order = order[r % len(order):] + order[: r % len(order)]
        for i in order:
            fn, n = rows[i][2], numbers[i]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[i].append((time.perf_counter() - t0) / n * 1e3)
    medians = [statistics.median(s) for s in samples]
    best = {}
    for (product, _, _), m in zip(rows, medians):
        best[product] = min(best.get(product, m), m)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs); threads {a.threads}; load average {load0:.1f} -> "
          f"{os.getloadavg()[0]:.1f}; numpy {np.__version__}" + (f", torch {torch.__version__}" if torch else ""))
    print(f"B={a.batch} H={a.width} {a.dtype}, {a.repeats} interleaved repeats, median ms per call")
    print(f"{'product':<11} {'variant':<42} {'ms':>8} {'× fastest':>10}")
    for (product, name, _), m in zip(rows, medians):
        print(f"{product:<11} {name:<42} {m:8.3f} {m / best[product]:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

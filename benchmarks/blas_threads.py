"""Which small GEMMs gain from a second BLAS thread here: ``(B, H) @ (H, H)`` in float64 with
1 and 2 OpenBLAS threads (threadpoolctl), median of 5 timings of a loop of about 2e8
multiply-adds, 1- and 2-thread runs alternated per width. The rule in ``jacgrad/cli/threads.py``
quotes its numbers.

    python benchmarks/blas_threads.py [--batch 64,256] [--widths 32,64,128,256,512,1024,2048]
"""

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits


def _median_time(f, reps: int, rounds: int = 5) -> float:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        samples.append((time.perf_counter() - t0) / reps)
    return float(np.median(samples))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="64,256")
    p.add_argument("--widths", default="32,64,128,256,512,1024,2048")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    for B in map(int, a.batch.split(",")):
        for H in map(int, a.widths.split(",")):
            x, W = rng.standard_normal((B, H)), rng.standard_normal((H, H))
            reps = max(1, int(2e8 / (B * H * H)))
            t = {}
            for n in (1, 2):
                with threadpool_limits(n, "blas"):
                    t[n] = _median_time(lambda: x @ W, reps)
            print(f"B={B:5d} H={H:5d}  1 thread {t[1] * 1e3:9.3f} ms  2 threads {t[2] * 1e3:9.3f} ms  "
                  f"2-thread speed-up x{t[1] / t[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()

"""Planning the bracketing of deep chains: ``order="auto"`` against ``order="forward"``.

    python benchmarks/deep_chain.py                    # K = 100, 400, 1000, 10000
    python benchmarks/deep_chain.py --K 1000 --repeats 5

For each depth K it times, side by side in one run, the cold plan (memo cleared) of ``"auto"``
and of ``"forward"`` on three width profiles (uniform ``784,4x(K-1),10`` as ``jacgrad report
--depth K --width 4`` builds, an hourglass, random widths 1..300), every diagonal per sample
with B = 32, and the whole ``Chain.jacobian`` of the uniform profile in both orders. Beyond
``EXACT_LIMIT`` factors "auto" is a heuristic; the last table prices it against the exact DP
at a depth where both run (the heuristic forced by lowering the limit). Timings are the best of
``--repeats``; the CPU model and the load average are printed beside them.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np

import jacgrad as jg
from jacgrad.algebra import bracketing


def profiles(K: int, rng) -> dict[str, list[int]]:
    return {
        "uniform": [784] + [4] * (K - 1) + [10],
        "hourglass": [256] * (K // 2) + [8] + [256] * (K - K // 2),
        "random": [int(w) for w in rng.integers(1, 301, K + 1)],
    }


def best_of(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        bracketing._plan.cache_clear()
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def uniform_chain(K: int, B: int, rng) -> jg.Chain:
    """784 -> 4 -> … -> 4 -> 10 (K ≥ 2 factors), orthogonal 4x4 weights inside: no overflow."""
    Q = np.linalg.qr(rng.standard_normal((K - 2, 4, 4)))[0]
    Ws = [rng.standard_normal((784, 4)) / 28, *Q, rng.standard_normal((4, 10)) / 2]
    return jg.Chain([jg.LayerJacobian(rng.uniform(0.5, 1.0, (B, W.shape[1])), W) for W in Ws])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--K", default="100,400,1000,10000", help="comma-separated depths")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-jacobian", action="store_true", help="time the plans only")
    args = ap.parse_args()
    depths = [int(k) for k in args.K.split(",")]
    print(f"CPU: {cpu_model()}; {os.cpu_count()} CPUs; load average at start {os.getloadavg()}")
    print(f"EXACT_LIMIT = {bracketing.EXACT_LIMIT} factors (exact DP up to it, heuristic beyond)\n")
    rng = np.random.default_rng(0)
    print(f"{'K':>6} {'profile':<10} {'auto plan s':>12} {'forward plan s':>15} {'ratio':>8} {'cost auto/forward':>18}")
    for K in depths:
        for name, w in profiles(K, rng).items():
            ps = [True] * K
            t_auto = best_of(lambda: bracketing.plan("auto", w, ps, args.batch), args.repeats)
            t_fwd = best_of(lambda: bracketing.plan("forward", w, ps, args.batch), args.repeats)
            c = bracketing.plan("auto", w, ps, args.batch).cost / bracketing.plan("forward", w, ps, args.batch).cost
            print(f"{K:>6} {name:<10} {t_auto:>12.4f} {t_fwd:>15.4f} {t_auto / t_fwd:>8.1f} {c:>18.3g}")
    if not args.no_jacobian:
        print(f"\nChain.jacobian, uniform 784,4x(K-1),10, B={args.batch}, plan included (memo cleared)")
        print(f"{'K':>6} {'auto s':>10} {'forward s':>10} {'ratio':>8}")
        for K in depths:
            C = uniform_chain(K, args.batch, rng)
            t = {o: best_of(lambda o=o: (C._plans.clear(), C.jacobian(o)), args.repeats) for o in ("auto", "forward")}
            print(f"{K:>6} {t['auto']:>10.4f} {t['forward']:>10.4f} {t['auto'] / t['forward']:>8.2f}")
    K = min(bracketing.EXACT_LIMIT, 1000)
    print(f"\nheuristic (used beyond EXACT_LIMIT) against the exact DP at K = {K}, B = {args.batch}: cost ratio")
    shapes = dict(profiles(K, rng), tapering=list(range(K + 8, 7, -1)),
                  two_bottlenecks=[256] * (K // 3) + [8] + [256] * (K // 3) + [16] + [256] * (K - 2 * (K // 3) - 1))
    for name, w in shapes.items():
        for mix in ("per-sample", "mixed"):
            ps = [True] * K if mix == "per-sample" else [bool(p) for p in rng.integers(0, 2, K)]
            exact = bracketing.plan("auto", w, ps, args.batch).cost
            limit = bracketing.EXACT_LIMIT
            bracketing.EXACT_LIMIT = 100
            try:
                bracketing._plan.cache_clear()
                heuristic = bracketing.plan("auto", w, ps, args.batch).cost
            finally:
                bracketing.EXACT_LIMIT = limit
                bracketing._plan.cache_clear()
            print(f"  {name:<16} {mix:<11} {heuristic / exact:.6f}")
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()

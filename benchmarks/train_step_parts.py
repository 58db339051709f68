"""Where the CPU training step's time goes, and whether the elementwise work can go faster.

A NumPy training step (``loss_and_grads``, or ``net.compile(B)``) is ``3K - 1`` GEMMs plus, per
layer, the elementwise passes XLA fuses: ``h += b``, ``φ(h)``, ``δ = g ⊙ φ'(y)`` and the bias
gradient ``Σ_batch δ``. This script times, interleaved (every repeat runs each row once, the
order rotated, after one untimed call), min and median per row:

- ``GEMMs only``: the step's GEMMs (forward, ``zᵀδ``, ``δWᵀ``) into arrays of the same shapes,
  one ``∂W_j`` per layer as the step writes them (32 MiB at 8×1024: memory traffic, not cache);
- ``loss_and_grads`` and ``compiled``: the two jacgrad steps (what ``jacgrad bench`` times);
- one layer's elementwise work (through jacgrad's own functions) right after one of the
  step's GEMMs (so the BLAS threads are in the state they are in during a step), as
  ``whole arrays``, in ``row tiles`` of 32 or 64 rows (cache-sized pieces), and split in two
  halves on ``2 threads`` (a persistent pool of one worker beside the caller: NumPy's ufuncs
  release the GIL); minus the GEMM alone (``GEMM alone`` row) that is the elementwise cost;
- the bias gradient as ``δ.sum(axis=0)`` and as the GEMV ``1ᵀδ`` (``_passes.column_sums``).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/train_step_parts.py
    python benchmarks/train_step_parts.py --width 512 --depth 4 --batch 128 --repeats 30
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import jacgrad as jg
from jacgrad.cuda import kernels
from jacgrad.nn import losses
from jacgrad.protocol.passes import column_sums


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rows(width: int, depth: int, batch: int) -> dict:
    net = jg.MLP.init([width] * (depth + 1), activation="tanh", dtype="float32", seed=0, bias_std=0.1)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.standard_normal((batch, width)).astype(np.float32)
    step = net.compile(batch)
    W = net.weights[0]
    hs = [np.empty((batch, width), np.float32) for _ in range(depth)]
    dW = [np.empty_like(W) for W in net.weights]  # one per layer, as the step writes them

    def gemms_only():
        z = x
        for j in range(depth):
            np.matmul(z, net.weights[j], out=hs[j])
            z = hs[j]
        for j in range(depth - 1, -1, -1):
            np.matmul((x if j == 0 else hs[j - 1]).T, hs[j], out=dW[j])
            if j:
                np.matmul(hs[j], net.weights[j].T, out=hs[j - 1])

    def plain():
        y, cache = net.forward(x)
        return net.backward(cache, losses.mse(y, t)[1], input_grad=False)

    # one layer's elementwise work, on slices of its arrays: forward h += b; y = tanh(h) (in place),
    # backward δ = g ⊙ tanh'(y) (from the output, as the step does) and ∂L/∂b = Σ_batch δ
    b = net.biases[0]
    h, g, delta, gemm_out = (np.empty((batch, width), np.float32) for _ in range(4))
    g[...] = rng.standard_normal((batch, width))
    tanh = jg.activations.get("tanh")

    def layer(r0: int, r1: int, db):
        hh = h[r0:r1]
        np.add(hh, b, out=hh)
        kernels.activation_forward(hh, tanh, out=hh)
        d = kernels.scale_cotangent(g[r0:r1], hh, tanh, from_output=True, out=delta[r0:r1])
        d.sum(axis=0, out=db)

    h[...] = rng.standard_normal((batch, width))
    pool = ThreadPoolExecutor(1)
    part = [np.empty(width, np.float32) for _ in range(batch)]  # one ∂L/∂b per piece

    def gemm():
        np.matmul(x, W, out=gemm_out)

    def whole():
        gemm()
        layer(0, batch, part[0])

    def tiles(n):
        def run():
            gemm()
            for i, r in enumerate(range(0, batch, n)):
                layer(r, min(batch, r + n), part[i])
        return run

    def two_threads():
        gemm()
        half = batch // 2
        future = pool.submit(layer, half, batch, part[1])
        layer(0, half, part[0])
        future.result()

    db = np.empty(width, np.float32)
    return {
        "GEMMs only": gemms_only,
        "loss_and_grads": plain,
        "compiled": lambda: step(x, t),
        "GEMM alone": gemm,
        "GEMM + layer, whole arrays": whole,
        "GEMM + layer, row tiles of 32": tiles(32),
        "GEMM + layer, row tiles of 64": tiles(64),
        "GEMM + layer, 2 threads": two_threads,
        "bias grad δ.sum(axis=0)": lambda: g.sum(axis=0, out=db),
        "bias grad GEMV 1ᵀδ": lambda: column_sums(g, db),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args(argv)
    table = rows(a.width, a.depth, a.batch)
    names = list(table)
    for fn in table.values():
        fn()
    samples = {k: [] for k in names}
    for r in range(a.repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            fn = table[k]
            fn()  # settle: wakes this row's threads
            n = 1 if k in names[:3] else 20
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[k].append((time.perf_counter() - t0) / n)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{_cpu()}; float32 tanh {a.depth}×{a.width}, B={a.batch}; {a.repeats} interleaved repeats; "
          f"load average {load:.2f} at the end")
    print(f"{'':<32} {'min ms':>8} {'median ms':>10}")
    for k in names:
        s = np.asarray(samples[k]) * 1e3
        print(f"{k:<32} {s.min():8.3f} {np.median(s):10.3f}")


if __name__ == "__main__":
    main()

"""Report time per initialisation and activation, as ratios to xavier_normal (issue 9, item 5).

    python benchmarks/report_inits.py [--depth 20] [--width 256] [--batch 64] [--repeats 3]

For every ``--init`` and activation (tanh, relu, and relu/tanh alternating per layer) it times
``gradient_flow`` on a ``width x depth`` net with a batch of N(0, 1) inputs, interleaved (one
repeat of every case, then the next), and prints the median seconds, the ratio to xavier_normal
with the same activation, and the number of ``ConvergenceWarning``s. "near-orthogonal" is
orthogonal weights plus 1% Gaussian noise: clustered spectra that the bounds do not settle, so
Lanczos hands them to the batched Gram eigensolve. Target: every ratio ≤ 2, no warnings.
Timings are not asserts: run it on a quiet machine, next to ``lscpu`` and ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import numpy as np

import jacgrad as jg
from jacgrad.bench.machine import _cpu_model
from jacgrad.flow.diagnostics import gradient_flow
from jacgrad.algebra.spectra import ConvergenceWarning

INITS = ("xavier_normal", "orthogonal", "he_normal", "lecun_normal", "normal", "xavier_uniform", "he_uniform",
         "uniform_fan_in", "near-orthogonal")
ACTIVATIONS = ("tanh", "relu", "relu,tanh")


def build(init: str, activation: str, depth: int, width: int, seed: int = 0):
    acts = activation.split(",")
    per_layer = [acts[j % len(acts)] for j in range(depth - 1)] + ["identity"]
    base = "orthogonal" if init == "near-orthogonal" else init
    net = jg.MLP.init([width] * (depth + 1), activation=acts[0], init=base, seed=seed)
    weights = [W.copy() for W in net.weights]
    if init == "near-orthogonal":
        rng = np.random.default_rng(seed + 1)
        weights = [W + 0.01 * rng.standard_normal(W.shape) / np.sqrt(W.shape[0]) for W in weights]
    return jg.MLP(weights, [b.copy() for b in net.biases], per_layer)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("depth", 20), ("width", 256), ("batch", 64), ("repeats", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--inits", default=",".join(INITS))
    p.add_argument("--activations", default=";".join(ACTIVATIONS), help="';'-separated, e.g. 'tanh;relu,tanh'")
    args = p.parse_args(argv)
    inits = args.inits.split(",")
    acts = args.activations.split(";")
    x = np.random.default_rng(0).standard_normal((args.batch, args.width))
    cases = [(i, a) for a in acts for i in inits]
    nets = {c: build(c[0], c[1], args.depth, args.width) for c in cases}
    times = {c: [] for c in cases}
    warned = {c: 0 for c in cases}
    gradient_flow(nets[cases[0]], x)  # warm-up: imports and first-call costs out of the first timing
    for _ in range(args.repeats):
        for c in cases:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                t = time.perf_counter()
                gradient_flow(nets[c], x)
                times[c].append(time.perf_counter() - t)
            warned[c] += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    print(f"CPU: {_cpu_model()}; load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"gradient_flow on {args.depth} x {args.width}, B={args.batch}, median of {args.repeats}")
    print(f"{'activation':<11} {'init':<16} {'seconds':>8} {'vs xavier':>9} {'warnings':>8}")
    worst = 0.0
    for a in acts:
        ref = statistics.median(times[(inits[0], a)]) if (inits[0], a) in times else None
        for i in inits:
            t = statistics.median(times[(i, a)])
            ratio = t / ref if ref else float("nan")
            worst = max(worst, ratio)
            print(f"{a:<11} {i:<16} {t:>8.3f} {ratio:>8.2f}x {warned[(i, a)]:>8}")
    total = sum(warned.values())
    print(f"worst ratio {worst:.2f}x (target <= 2x); ConvergenceWarnings: {total} (target 0)")


if __name__ == "__main__":
    main()

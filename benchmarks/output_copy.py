"""What handing back the output as the caller's own array costs a training step.

``y, cache = net.forward(x)`` returns a copy of the output when the cache keeps that output for
backward (φ' from the output: identity, tanh, relu, …), so that ``y -= t`` cannot change what
``backward`` computes (issue 9, item 1). The copy is one ``(B, n_out)`` array per step; this
script measures it against the step it sits in, in ONE process with the rows taking turns
(background load hits them alike):

- ``forward + backward``: the public step a user writes — ``net.forward`` (with the copy), the
  loss, ``net.backward``; the path of ``jacgrad bench --tasks train``;
- ``without the copy``: the same step through ``net._forward`` (the forward that
  ``loss_and_grads`` uses, which never hands its output out);
- ``loss_and_grads``: the one-call step (no copy).

    python benchmarks/output_copy.py                        # 8×1024, B = 256, float32
    python benchmarks/output_copy.py --width 256 --depth 4 --dtype float64
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import jacgrad as jg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()

    B, H, K = args.batch, args.width, args.depth
    net = jg.MLP.init([H] * (K + 1), activation="tanh", seed=0, dtype=args.dtype)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H)).astype(args.dtype)
    t = rng.standard_normal((B, H)).astype(args.dtype)

    def step(forward):
        def run():
            y, cache = forward(x)
            _, gy = jg.losses.mse(y, t)
            return net.backward(cache, gy, input_grad=False)
        return run

    rows = {
        "forward + backward": step(net.forward),
        "without the copy": step(net._forward),
        "loss_and_grads": lambda: net.loss_and_grads(x, t, input_grad=False),
    }
    y = net(x)
    rows["the copy alone"] = lambda: y.copy()
    times = {name: [] for name in rows}
    for fn in rows.values():
        fn()  # warm: kernels' scratch, the host pool
    for r in range(args.rounds):
        names = list(rows)
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            rows[name]()
            times[name].append(time.perf_counter() - t0)
    base = float(np.median(times["without the copy"]))
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = "unknown CPU"
    print(f"{K}×{H}, B = {B}, {args.dtype}, {args.rounds} rounds; {cpu}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'row':<22} {'median ms':>10} {'min ms':>8} {'÷ without the copy':>19}")
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"{name:<22} {med * 1e3:>10.3f} {min(ts) * 1e3:>8.3f} {med / base:>19.3f}")


if __name__ == "__main__":
    main()

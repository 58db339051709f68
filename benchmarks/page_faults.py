"""First-touch cost of a training step's fresh arrays: page faults and time per step.

A plain ``net.loss_and_grads`` returns fresh arrays every call (the caller owns them). How they
are allocated matters on the CPU: one array per layer (a (B, H) delta, a (H, H) gradient, …)
means every step first-touches tens of MB in 4 KiB pages, each a page fault. jacgrad carves the
saved activations, the deltas and the parameter gradients from ONE block each
(``jacgrad/protocol/passes.py``), which NumPy (≥ 4 MiB) hands to the kernel as a huge-page candidate.

Each row runs as a training loop would, in a process of its own (the C allocator's state is
part of what is measured): ``--calls`` calls in a row, the first untimed; the rows take turns
for ``--rounds`` rounds (order rotated), so background load hits them alike. Per call: the
median and min time, and the mean page faults (getrusage minor faults). ``--same-process``
runs every row in this one process instead (the allocator then carries state between rows):

- ``one array per layer``: the same step written with a fresh array for every layer's
  activation, delta and gradient (how ``MLP.backward`` worked before ``_passes``), through the
  same public factors and kernels.
- ``jacgrad loss_and_grads``: the plain step (fresh results, carved from three blocks).
- ``jacgrad compiled``: ``net.compile(B)``, every buffer made once (no fresh memory).
- ``torch autograd.grad``: PyTorch's step, when torch is installed.

    python benchmarks/page_faults.py                 # 8×1024, B = 256, float32
    python benchmarks/page_faults.py --width 512 --depth 4 --batch 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

import jacgrad as jg


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rows(width: int, depth: int, batch: int):
    net = jg.MLP.init([width] * (depth + 1), activation="tanh", dtype="float32", seed=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, width)).astype(np.float32)
    t = rng.standard_normal((batch, width)).astype(np.float32)
    step = net.compile(batch)
    acts = [jg.activations.get(a) for a in net.activations]

    def per_layer_arrays():
        z, saved = x, []
        for W, b, act in zip(net.weights, net.biases, acts):
            h = z @ W
            h += b
            z = jg.kernels.activation_forward(h, act, out=h)
            saved.append(z)
        value, g = jg.losses.mse(z, t)
        grads = []
        for j in range(depth - 1, -1, -1):
            J = jg.LayerJacobian.from_activation(acts[j], net.weights[j], y=saved[j])
            delta = J.scale(g)
            grads.append(((x if j == 0 else saved[j - 1]).T @ delta, delta.sum(axis=0)))
            g = J.through_weights_t(delta) if j else None
        return value, grads

    rows = {
        "one array per layer": per_layer_arrays,
        "jacgrad loss_and_grads": lambda: net.loss_and_grads(x, t, input_grad=False),
        "jacgrad compiled": lambda: step(x, t),
    }
    try:
        import torch

        Ws = [torch.tensor(W, requires_grad=True) for W in net.weights]
        bs = [torch.tensor(b, requires_grad=True) for b in net.biases]
        xt, tt = torch.tensor(x), torch.tensor(t)

        def torch_step():
            z = xt
            for j, (W, b) in enumerate(zip(Ws, bs)):
                z = z @ W + b
                z = torch.tanh(z) if j < depth - 1 else z
            loss = ((z - tt) ** 2).mean()
            return loss, torch.autograd.grad(loss, Ws + bs)

        rows["torch autograd.grad"] = torch_step
    except ImportError:
        pass
    return rows


def _loop(fn, calls: int) -> tuple[list, list]:
    fn()  # untimed: wakes the thread pools, brings the allocator to this loop's state
    times, faults = [], []
    for _ in range(calls - 1):
        f0, t0 = _faults(), time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        faults.append(_faults() - f0)
        del result
    return times, faults


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--same-process", action="store_true")
    p.add_argument("--only", help=argparse.SUPPRESS)  # one row, results as JSON: the child of a fresh-process run
    a = p.parse_args(argv)
    size = ["--width", str(a.width), "--depth", str(a.depth), "--batch", str(a.batch), "--calls", str(a.calls)]
    if a.only is not None:
        print(json.dumps(_loop(_rows(a.width, a.depth, a.batch)[a.only], a.calls)))
        return
    rows = _rows(a.width, a.depth, a.batch)
    keys = list(rows)
    times = {k: [] for k in rows}
    faults = {k: [] for k in rows}
    for r in range(a.rounds):
        for k in keys[r % len(keys):] + keys[: r % len(keys)]:
            if a.same_process:
                t, f = _loop(rows[k], a.calls)
            else:
                out = subprocess.run([sys.executable, __file__, *size, "--only", k], check=True,
                                     capture_output=True, text=True).stdout
                t, f = json.loads(out.splitlines()[-1])
            times[k] += t
            faults[k] += f
    where = "all rows in one process" if a.same_process else "each row in a fresh process"
    print(f"float32 tanh {a.depth}×{a.width}, B={a.batch}; {a.rounds} rounds of {a.calls} calls per row, {where}")
    print(f"{'':<26} {'median ms':>10} {'min ms':>8} {'faults (mean)':>14}")
    for k in rows:
        print(f"{k:<26} {np.median(times[k]) * 1e3:10.1f} {min(times[k]) * 1e3:8.1f} {np.mean(faults[k]):14.0f}")


if __name__ == "__main__":
    main()

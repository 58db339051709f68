"""DP-SGD's private gradient: jacgrad against its own non-private step and against Opacus.

The net: an MLP of 5 dense 1024 × 1024 tanh layers (the last one identity), B = 256, float32,
softmax cross-entropy over 1024 classes, on the CPU. Rows (median seconds over ``--rounds``
rounds; the contenders alternate inside every round, so a busy shared machine slows them alike):

- ``loss_and_grads``: jacgrad's non-private mean gradient (``input_grad=False``) — the baseline;
- ``clipped_grad σ=0``: the clipped mean gradient (one reverse sweep, no noise);
- ``clipped_grad σ=1``: the same with noise ``N(0, σ²C²)`` (P = 5.2M numbers drawn);
- ``compiled private``: ``net.compile(B, clip=C, noise_multiplier=1)``;
- ``noise <Generator>``: drawing P float32 numbers into a preallocated buffer with
  ``Generator(<bit generator>).standard_normal(out=buf, dtype=float32)``, for SFC64, PCG64,
  Philox, MT19937;
- ``dp_backward (torch model)``: ``jg.torch.dp_backward`` on the torch copy of the net (``.grad``
  written, noise from a torch generator);
- ``opacus hooks``: ``GradSampleModule`` (hooks) + ``DPOptimizer.pre_step`` (forward, backward,
  per-sample gradients, clipping, noise) on that torch model; ``opacus ghost``: ghost clipping
  (``GradSampleModuleFastGradientClipping`` + ``DPLossFastGradientClipping``, two backward
  passes). Skipped where Opacus is not installed.

One BLAS / torch thread each (``--threads``). Run:

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/private.py [--rounds 5] [--batch 256]

It prints the CPU model and the ratios the issue asks about: private / non-private (without and
with noise, and with the fastest generator's draw taken off), Opacus / jacgrad.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import numpy as np

import jacgrad as jg


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - a label only
        return platform.processor() or "unknown"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-opacus", action="store_true")
    args = ap.parse_args(argv)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=args.threads, user_api="blas")
    except ImportError:
        pass
    import torch

    torch.set_num_threads(args.threads)
    B, H = args.batch, args.width
    net = jg.MLP.init([H] * (args.layers + 1), activation="tanh", seed=0, dtype="float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H)).astype(np.float32)
    t = rng.integers(0, H, B)
    C = float(np.median(net.per_sample_grad_norms(x, t, loss="softmax_cross_entropy")))  # about half clipped
    P = sum(W.size + W.shape[1] for W in net.weights)
    step = net.compile(B, loss="softmax_cross_entropy", clip=C, noise_multiplier=1.0, seed=0)
    buf = np.empty(P, np.float32)
    gens = {name: np.random.Generator(getattr(np.random, name)(0)) for name in ("SFC64", "PCG64", "Philox", "MT19937")}
    gen = np.random.default_rng(1)

    model = net.to_torch()
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
    tg = torch.Generator().manual_seed(0)
    rows = {
        "loss_and_grads": lambda: net.loss_and_grads(x, t, loss="softmax_cross_entropy", input_grad=False),
        "clipped_grad σ=0": lambda: net.clipped_grad(x, t, loss="softmax_cross_entropy", max_norm=C),
        "clipped_grad σ=1": lambda: net.clipped_grad(x, t, loss="softmax_cross_entropy", max_norm=C,
                                                     noise_multiplier=1.0, seed=gen),
        "compiled private σ=1": lambda: step(x, t),
        **{f"noise {name}": (lambda g=g: g.standard_normal(out=buf, dtype=np.float32)) for name, g in gens.items()},
        "dp_backward (torch model) σ=1": lambda: jg.torch.dp_backward(model, xt, tt, max_norm=C, noise_multiplier=1.0,
                                                                       generator=tg),
    }
    if not args.no_opacus:
        try:
            rows.update(_opacus_rows(net, xt, tt, C))
        except ImportError as exc:
            print(f"opacus rows skipped: {exc}")
    times = {k: [] for k in rows}
    for fn in rows.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for k, fn in rows.items():
            times[k].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CPU: {cpu_model()}; threads {args.threads}; MLP {args.layers} x {H} tanh, B={B}, float32, P={P}, "
          f"C={C:.3g} (median norm); {args.rounds} rounds, median seconds")
    for k, v in med.items():
        print(f"  {k:32s} {v * 1e3:9.2f} ms   (min {min(times[k]) * 1e3:8.2f})")
    base = med["loss_and_grads"]
    noise = min(v for k, v in med.items() if k.startswith("noise "))
    fastest = min((k for k in med if k.startswith("noise ")), key=med.get)
    print("ratios:")
    print(f"  clipped_grad σ=0 / loss_and_grads            {med['clipped_grad σ=0'] / base:6.3f}")
    print(f"  clipped_grad σ=1 / loss_and_grads            {med['clipped_grad σ=1'] / base:6.3f}")
    print(f"  (clipped_grad σ=1 - draw) / loss_and_grads   {(med['clipped_grad σ=1'] - med['noise SFC64']) / base:6.3f}"
          f"   (draw: SFC64, the generator clipped_grad uses; fastest here: {fastest}, {noise * 1e3:.1f} ms)")
    print(f"  compiled private σ=1 / loss_and_grads        {med['compiled private σ=1'] / base:6.3f}")
    for k in ("opacus hooks", "opacus ghost"):
        if k in med:
            print(f"  {k} / dp_backward                     {med[k] / med['dp_backward (torch model) σ=1']:6.2f}")
            print(f"  {k} / clipped_grad σ=1                {med[k] / med['clipped_grad σ=1']:6.2f}")
    return 0


def _opacus_rows(net, xt, tt, C):
    import torch
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    B = xt.shape[0]
    crit = torch.nn.CrossEntropyLoss()
    hooks = GradSampleModule(net.to_torch(), loss_reduction="mean")
    h_opt = DPOptimizer(torch.optim.SGD(hooks.parameters(), lr=0.0), noise_multiplier=1.0, max_grad_norm=C,
                        expected_batch_size=B)
    ghost = GradSampleModuleFastGradientClipping(net.to_torch(), max_grad_norm=C, use_ghost_clipping=True,
                                                 loss_reduction="mean")
    g_opt = DPOptimizerFastGradientClipping(torch.optim.SGD(ghost.parameters(), lr=0.0), noise_multiplier=1.0,
                                            max_grad_norm=C, expected_batch_size=B, loss_reduction="mean")
    g_crit = DPLossFastGradientClipping(ghost, g_opt, torch.nn.CrossEntropyLoss(), loss_reduction="mean")

    def hooks_step():
        h_opt.zero_grad()
        crit(hooks(xt), tt).backward()
        h_opt.pre_step()

    def ghost_step():
        g_opt.zero_grad()
        g_crit(ghost(xt), tt).backward()
        g_opt.pre_step()

    return {"opacus hooks": hooks_step, "opacus ghost": ghost_step}


if __name__ == "__main__":
    raise SystemExit(main())

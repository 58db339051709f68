"""The issue's small CNN on the CPU: jacgrad's conv layers (im2col GEMMs) against torch eager, one
forward + backward (all parameter gradients and ∂L/∂x), float32, interleaved rounds; prints the
ratio jacgrad / torch (the machine may be loaded: compare the ratios of one run).

Net (issue 21): 3×32×32 input, Conv3x3(3→32)+ReLU, MaxPool2, Conv3x3(32→64)+ReLU, MaxPool2,
Conv3x3(64→128)+ReLU, AdaptiveAvgPool(1), Flatten, Linear(128→10); B = 64. Both sides compute
the same thing (checked before timing). torch's CPU convolutions go through oneDNN (MKL-DNN)
with direct/Winograd kernels and blocked layouts; jacgrad builds the patch matrices (9× the
input) and multiplies them through the BLAS, so expect it to be slower by a small factor.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/conv.py [--batch 64] [--rounds 5] [--threads 1]
"""

import argparse
import statistics
import subprocess
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import jacgrad as jg


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def models(seed: int = 0):
    nn = torch.nn
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(128, 10))
    from jacgrad.io.interop.torch_blocks import layers_from_torch
    return model, layers_from_torch(model)


def jacgrad_step(layers, x, g):
    z, states = x, []
    for L in layers:
        z, st = L.forward(z)
        states.append(st)
    grads = [[np.empty_like(p) for p in L.params] for L in layers]
    for L, st, gr in zip(reversed(layers), reversed(states), reversed(grads)):
        g, _ = L.backward(st, g, gr)
    return z, g, grads


def torch_step(model, xt, gt):
    model.zero_grad(set_to_none=True)
    xt.grad = None
    y = model(xt)
    y.backward(gt)
    return y, xt.grad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, layers = models()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, 3, 32, 32)).astype(np.float32)
    g = rng.standard_normal((a.batch, 10)).astype(np.float32)
    xt, gt = torch.tensor(x, requires_grad=True), torch.tensor(g)
    with threadpool_limits(a.threads):
        y, gin, _ = jacgrad_step(layers, x, g)
        yt, gint = torch_step(model, xt, gt)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(gin, gint.numpy(), rtol=1e-3, atol=1e-5)
        times = {"jacgrad": [], "torch": []}
        for _ in range(a.rounds):
            t = time.perf_counter()
            jacgrad_step(layers, x, g)
            times["jacgrad"].append(time.perf_counter() - t)
            t = time.perf_counter()
            torch_step(model, xt, gt)
            times["torch"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"CPU: {cpu_model()}; threads {a.threads}; small CNN, B={a.batch}, float32, forward + backward")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1e3:8.1f} ms (median of {a.rounds})")
    print(f"  ratio jacgrad / torch eager: {med['jacgrad'] / med['torch']:.2f}")


if __name__ == "__main__":
    main()

"""Residual LayerNorm MLP, jacgrad vs torch on the CPU, interleaved rounds (the machine may be loaded).

Net: Linear(H, H) + tanh, then K pre-norm blocks ``x + s·(Linear(tanh(Linear(LayerNorm(x)))))``
(2 dense layers of H x H each), then a head Linear(H, n_out). float32.
  * step: loss_and_grads (mse), B samples — jacgrad ``Sequential.loss_and_grads`` vs torch
    forward + backward (gradients of every parameter and of x, as jacgrad returns).
  * jac: per-sample Jacobians (B, n_out, H) — jacgrad ``jacobian_chain(...).jacobian()`` (auto)
    vs ``torch.func.vmap(torch.func.jacrev)``.

    python benchmarks/blocks.py [--blocks 8] [--width 1024] [--batch 256] [--n-out 10] [--rounds 3]
"""

import argparse
import subprocess
import time

import numpy as np
import torch
from torch import nn

import jacgrad as jg
from jacgrad.interop.torch_blocks import Residual


def best(f, rounds):
    f()
    t = []
    for _ in range(rounds):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return min(t)


def main():
    p = argparse.ArgumentParser()
    for name, default in (("blocks", 8), ("width", 1024), ("batch", 256), ("n-out", 10), ("rounds", 3), ("scale", 1.0)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    a = p.parse_args()
    H = a.width
    torch.manual_seed(0)
    blocks = [Residual(nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H)), a.scale)
              for _ in range(a.blocks)]
    tnet = nn.Sequential(nn.Linear(H, H), nn.Tanh(), *blocks, nn.Linear(H, a.n_out)).float()
    net = jg.Sequential.from_torch(tnet)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, H)).astype(np.float32)
    t = rng.standard_normal((a.batch, a.n_out)).astype(np.float32)
    xt, tt = torch.tensor(x), torch.tensor(t)
    y_ref = tnet(xt).detach().numpy()
    print(f"output agreement (max rel): {np.abs(net(x) - y_ref).max() / np.abs(y_ref).max():.1e}")

    def jg_step():
        net.loss_and_grads(x, t)

    def torch_step():
        xg = xt.clone().requires_grad_(True)
        tnet.zero_grad(set_to_none=True)
        nn.functional.mse_loss(tnet(xg), tt).backward()

    def jg_jac():
        net.jacobian_chain(net.forward(x)[1]).jacobian()

    jac_fn = torch.func.vmap(torch.func.jacrev(lambda xi: tnet(xi[None])[0]))

    def torch_jac():
        with torch.no_grad():
            jac_fn(xt)

    print(subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip())
    print(subprocess.run("uptime", shell=True, capture_output=True, text=True).stdout.strip())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; B={a.batch}, {a.blocks} blocks of 2x{H}, "
          f"n_out={a.n_out}, float32")
    res = {k: [] for k in ("jg step", "torch step", "jg jac", "torch jac")}
    for r in range(a.rounds):  # interleaved, order alternating
        pairs = [("jg step", jg_step), ("torch step", torch_step), ("jg jac", jg_jac), ("torch jac", torch_jac)]
        if r % 2:
            pairs = pairs[1::-1] + pairs[:1:-1]
        for k, f in pairs:
            res[k].append(best(f, 1))
    for k, v in res.items():
        print(f"{k:11s} best {min(v) * 1e3:9.1f} ms   median {np.median(v) * 1e3:9.1f} ms")
    print(f"step: jacgrad/torch = {min(res['jg step']) / min(res['torch step']):.2f}x;  "
          f"per-sample Jacobians: jacgrad/torch.func = {min(res['jg jac']) / min(res['torch jac']):.2f}x")


if __name__ == "__main__":
    main()

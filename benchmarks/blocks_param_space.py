"""Parameter-space products of a residual LayerNorm/RMSNorm net, jacgrad vs torch.func on the CPU,
interleaved rounds (the machine may be loaded), each checked against the other in the same run.

Net: Linear(n_in, H) + tanh, then K pre-norm blocks ``x + s·Linear(gelu(Linear(Norm(x))))``
(LayerNorm and RMSNorm alternating), a final RMSNorm and a head Linear(H, n_out). float32,
mse against random targets.
  * norms: per-sample gradient norms — ``Sequential.per_sample_grad_norms`` vs ``vmap(grad)`` + norm
  * grads: per-sample gradients (B, P) — ``per_sample_grads`` vs ``vmap(grad)``
  * ggn:   one Gauss–Newton product — ``ggn_vp`` vs ``jvp`` → loss Hessian → ``vjp``
  * ntk:   the empirical NTK (N, N, O, O) of the first N inputs — ``jg.ntk`` vs ``jacrev`` + contraction
    (the "Jacobian contraction" recipe of PyTorch's NTK tutorial)

    OPENBLAS_NUM_THREADS=1 python benchmarks/blocks_param_space.py [--blocks 4] [--width 256] [--batch 64]
        [--n-in 64] [--n-out 10] [--ntk-n 16] [--rounds 3]
"""

import argparse
import subprocess

import numpy as np
import torch
from torch import nn

import jacgrad as jg
from jacgrad.io.interop.torch_blocks import Residual

from blocks import best  # noqa: E402 - benchmarks/ is this script's own folder on sys.path


def model(a):
    torch.manual_seed(0)
    H = a.width
    blocks = [Residual(nn.Sequential(nn.LayerNorm(H) if k % 2 == 0 else nn.RMSNorm(H), nn.Linear(H, H), nn.GELU(),
                                     nn.Linear(H, H)), 0.5) for k in range(a.blocks)]
    return nn.Sequential(nn.Linear(a.n_in, H), nn.Tanh(), *blocks, nn.RMSNorm(H), nn.Linear(H, a.n_out)).float()


def torch_recipes(tnet, x, t, n_ntk):
    """The torch.func side: functions of the batch, each returning a NumPy array laid out as jacgrad's."""
    params = {k: p.detach() for k, p in tnet.named_parameters()}
    names = list(params)

    def f(p, xb):
        return torch.func.functional_call(tnet, p, (xb,))

    def loss_i(p, xi, ti):
        return ((f(p, xi[None])[0] - ti) ** 2).mean()

    def flat(tree, lead):  # jacgrad's flat layout: a Linear's W = weight.T
        return torch.cat([(tree[k].transpose(-1, -2) if params[k].ndim == 2 else tree[k]).reshape(*lead, -1)
                          for k in names], dim=-1)

    psg = torch.func.vmap(torch.func.grad(loss_i), in_dims=(None, 0, 0))

    def grads():
        return flat(psg(params, x, t), (x.shape[0],)).numpy()

    def norms():
        g = psg(params, x, t)
        return torch.sqrt(sum((v.reshape(x.shape[0], -1) ** 2).sum(1) for v in g.values())).numpy()

    def ggn(v):
        C = t.shape[1]

        def unflat(vec):
            out, at = {}, 0
            for k in names:
                p = params[k]
                n = p.numel()
                piece = vec[at:at + n]
                out[k] = piece.reshape(p.shape[1], p.shape[0]).T if p.ndim == 2 else piece.reshape(p.shape)
                at += n
            return out

        def run():
            _, Jv = torch.func.jvp(lambda p: f(p, x), (params,), (unflat(v),))
            _, pull = torch.func.vjp(lambda p: f(p, x), params)
            return flat(pull(Jv * (2.0 / C) / x.shape[0])[0], ()).numpy()

        return run

    def ntk():
        xs = x[:n_ntk]
        J = torch.func.jacrev(f)(params, xs)
        J = [j.flatten(2) for j in J.values()]
        return sum(torch.einsum("Naf,Mbf->NMab", j, j) for j in J).numpy()

    return norms, grads, ggn, ntk


def main():
    p = argparse.ArgumentParser()
    for name, default in (("blocks", 4), ("width", 256), ("batch", 64), ("n-in", 64), ("n-out", 10), ("ntk-n", 16),
                          ("rounds", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(1)
    tnet = model(a)
    net = jg.Sequential.from_torch(tnet)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch, a.n_in)).astype(np.float32)
    t = rng.standard_normal((a.batch, a.n_out)).astype(np.float32)
    v = rng.standard_normal(net.n_params).astype(np.float32)
    xt, tt, vt = torch.tensor(x), torch.tensor(t), torch.tensor(v)
    norms, grads, ggn, ntk = torch_recipes(tnet, xt, tt, a.ntk_n)
    ggn = ggn(vt)
    tasks = {
        "norms": (lambda: net.per_sample_grad_norms(x, t), norms),
        "grads": (lambda: net.per_sample_grads(x, t).flat, grads),
        "ggn": (lambda: net.ggn_vp(x, v), ggn),
        "ntk": (lambda: jg.ntk(net, x[:a.ntk_n]), ntk),
    }
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    load = subprocess.run("uptime", capture_output=True, text=True).stdout.strip()
    print(f"{cpu}\n{load}\nB={a.batch}, {a.blocks} blocks of 2x{a.width}, P={net.n_params}, float32, one thread each")
    for name, (ours, theirs) in tasks.items():
        got, want = np.asarray(ours(), np.float64), np.asarray(theirs(), np.float64)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        t_jg, t_torch = [], []
        for _ in range(a.rounds):  # interleaved: load changes hit both sides
            t_jg.append(best(ours, 1))
            t_torch.append(best(theirs, 1))
        print(f"{name:6s} jacgrad {min(t_jg) * 1e3:9.2f} ms  torch.func {min(t_torch) * 1e3:9.2f} ms  "
              f"ratio {min(t_jg) / min(t_torch):6.3f}  agreement {err:.1e}")


if __name__ == "__main__":
    main()

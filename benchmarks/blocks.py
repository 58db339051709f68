"""Residual LayerNorm MLP on the CPU: jacgrad against torch and JAX, interleaved rounds (the
machine may be loaded: compare the ratios of one run, not numbers across runs).

Net: Linear(H, H) + tanh, then K pre-norm blocks ``x + s·(Linear(tanh(Linear(LayerNorm(x)))))``
(2 dense layers of H x H each), then a head Linear(H, n_out). float32. Every contender computes
the same thing (checked against jacgrad before timing):

  * step: mse loss and the gradients of every parameter and of x, B samples —
    jacgrad ``Sequential.loss_and_grads``, jacgrad ``Sequential.compile(B)`` (buffers allocated
    once), torch forward + backward, ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))``.
  * jac: per-sample Jacobians (B, n_out, H) — jacgrad ``jacobian_chain(...).jacobian()`` (auto
    order), ``torch.func.vmap(torch.func.jacrev)``, ``jax.jit(jax.vmap(jax.jacrev))``.

Run it without the OPENBLAS_CORETYPE override (it forces NumPy's OpenBLAS onto slower AVX2
kernels on an AVX-512 CPU; see ``jacgrad bench``)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/blocks.py [--blocks 8] [--width 1024]
        [--batch 256] [--n-out 10] [--rounds 5] [--skip jac] [--threads N]

``--threads N`` runs every library on N threads (NumPy's OpenBLAS through threadpoolctl, torch,
XLA): on a machine shared with other jobs, ``--threads 1`` measures the work itself, which a
preempted thread of a multi-threaded GEMM would otherwise hide.
"""

import argparse
import os
import statistics
import subprocess
import time

import numpy as np
import torch
from torch import nn

import jacgrad as jg
from jacgrad.io.interop.torch_blocks import Residual


def best(f, rounds: int) -> float:
    """Seconds of the fastest of ``rounds`` calls of ``f``, after one untimed call (also used by
    ``benchmarks/blocks_param_space.py``)."""
    f()
    t = []
    for _ in range(rounds):
        s = time.perf_counter()
        f()
        t.append(time.perf_counter() - s)
    return min(t)


def _sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()


def _blas() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "(threadpoolctl not installed)"
    return ", ".join(f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
                     for i in threadpool_info() if i["user_api"] == "blas")


def _jax_peer(tnet, scale: float, eps: float):
    """(step, jac) as jitted JAX functions of the torch net's parameters, or None without JAX."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    a = lambda t: jnp.asarray(t.detach().numpy())
    head, blocks, last = tnet[0], [m for m in tnet if isinstance(m, Residual)], tnet[-1]
    params = {"in": (a(head.weight).T, a(head.bias)), "out": (a(last.weight).T, a(last.bias)),
              "blocks": [(a(b.inner[0].weight), a(b.inner[0].bias), a(b.inner[1].weight).T, a(b.inner[1].bias),
                          a(b.inner[3].weight).T, a(b.inner[3].bias)) for b in blocks]}

    def f(p, x):
        z = jnp.tanh(x @ p["in"][0] + p["in"][1])
        for g, beta, W1, b1, W2, b2 in p["blocks"]:
            mu = z.mean(-1, keepdims=True)
            var = ((z - mu) ** 2).mean(-1, keepdims=True)
            zn = (z - mu) / jnp.sqrt(var + eps) * g + beta
            z = z + scale * (jnp.tanh(zn @ W1 + b1) @ W2 + b2)
        return z @ p["out"][0] + p["out"][1]

    def loss(p, x, t):
        return jnp.mean((f(p, x) - t) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jac = jax.jit(jax.vmap(jax.jacrev(lambda p, xi: f(p, xi[None])[0], argnums=1), in_axes=(None, 0)))
    return jax, params, step, jac


def main():
    p = argparse.ArgumentParser()
    for name, default in (("blocks", 8), ("width", 1024), ("batch", 256), ("n-out", 10), ("rounds", 5), ("scale", 1.0)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    p.add_argument("--skip", choices=["jac", "step"], default=None, help="leave one benchmark out")
    p.add_argument("--threads", type=int, default=None, help="threads for every library (default: each its own)")
    a = p.parse_args()
    limits = None
    if a.threads:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(a.threads)  # NumPy's OpenBLAS (and any OpenMP pool loaded so far)
        torch.set_num_threads(a.threads)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                                   f"{'false' if a.threads == 1 else 'true'} intra_op_parallelism_threads={a.threads}")
    H, B = a.width, a.batch
    torch.manual_seed(0)
    blocks = [Residual(nn.Sequential(nn.LayerNorm(H), nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H)), a.scale)
              for _ in range(a.blocks)]
    tnet = nn.Sequential(nn.Linear(H, H), nn.Tanh(), *blocks, nn.Linear(H, a.n_out)).float()
    net = jg.Sequential.from_torch(tnet)
    compiled = net.compile(B)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H)).astype(np.float32)
    t = rng.standard_normal((B, a.n_out)).astype(np.float32)
    xt, tt = torch.tensor(x), torch.tensor(t)
    peer = _jax_peer(tnet, a.scale, blocks[0].inner[0].eps)

    # agreement before timing: the loss, ∂L/∂x and the per-sample Jacobians of one sample
    ref_loss, ref = net.loss_and_grads(x, t)
    xg = xt.clone().requires_grad_(True)
    lt = nn.functional.mse_loss(tnet(xg), tt)
    lt.backward()
    rel = lambda u, v: float(np.abs(np.asarray(u) - np.asarray(v)).max() / max(np.abs(np.asarray(v)).max(), 1e-30))
    line = f"agreement (max rel): loss vs torch {abs(float(ref_loss) - lt.item()) / abs(lt.item()):.1e}, " \
           f"dx vs torch {rel(ref.input, xg.grad.numpy()):.1e}, compiled vs loss_and_grads " \
           f"{rel(compiled(x, t)[1].flat, ref.flat):.1e}"
    if peer is not None:
        jax, params, jstep, jjac = peer
        (jl, (_, jdx)) = jstep(params, x, t)
        line += f", dx vs JAX {rel(ref.input, jdx):.1e}"
    print(line)

    def jg_step():
        net.loss_and_grads(x, t)

    def jg_compiled():
        compiled(x, t)

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

    cases = {"step": [("jacgrad loss_and_grads", jg_step), ("jacgrad compiled", jg_compiled), ("torch", torch_step)],
             "jac": [("jacgrad jacobian_chain", jg_jac), ("torch.func vmap(jacrev)", torch_jac)]}
    if peer is not None:
        xj, tj = jax.numpy.asarray(x), jax.numpy.asarray(t)
        cases["step"].append(("jax jit(value_and_grad)", lambda: jax.block_until_ready(jstep(params, xj, tj))))
        cases["jac"].append(("jax jit(vmap(jacrev))", lambda: jax.block_until_ready(jjac(params, xj))))
        J = np.asarray(jjac(params, xj))
        line = f"per-sample Jacobians agree (max rel): JAX {rel(net.jacobian_chain(net.forward(x)[1]).jacobian(), J):.1e}"
        print(line)
    if a.skip:
        del cases[a.skip]

    print(_sh("lscpu | grep 'Model name'"))
    print(f"load: {_sh('uptime')}")
    print(f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}; cpus {os.cpu_count()}, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}"
          + (f", jax {jax.__version__}" if peer is not None else ", JAX not installed")
          + f"; NumPy's BLAS: {_blas()}" + (f"; --threads {a.threads}" if limits is not None else ""))
    print(f"B={B}, {a.blocks} blocks of 2x{H} (+ LayerNorm), n_out={a.n_out}, float32; {a.rounds} interleaved rounds")
    for fns in cases.values():  # warm-up: JIT compilation, first-touch of buffers
        for _, f in fns:
            f()
    times = {name: [] for fns in cases.values() for name, _ in fns}
    for r in range(a.rounds):  # interleaved, order reversed every other round
        for fns in cases.values():
            for name, f in (fns if r % 2 == 0 else fns[::-1]):
                s = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - s)  # one call per round: the warm-up was above
    for what, fns in cases.items():
        peers = [n for n, _ in fns if not n.startswith("jacgrad")]
        fastest = min(peers, key=lambda n: min(times[n]))
        print(f"-- {what}: ratios to the faster peer ({fastest})")
        for name, _ in fns:
            v = times[name]
            print(f"   {name:26s} best {min(v) * 1e3:8.1f} ms  median {statistics.median(v) * 1e3:8.1f} ms  "
                  f"{min(v) / min(times[fastest]):5.2f}x")


if __name__ == "__main__":
    main()

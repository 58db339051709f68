"""Compiled products (``net.compile(B, product=...)``) against the eager products and torch.func:
one run, ratios side by side, the CPU model (and the GPU, with ``--device gpu``) printed.

Cases (float32; the issue's targets where it names them):

- per-sample grad norms, MLP of 32 layers of 256 (tanh), B = 64, cross-entropy: compiled, eager
  ``jg.per_sample_grad_norms``, torch.func ``vmap(grad)`` + norm;
- per-sample grad norms, the small CNN of ``jacgrad.bench.models`` (3×32×32, three conv blocks), B = 64;
- the NTK of a ReLU FCN (``--ntk-width``, 3 hidden layers; the issue's 3 × 2048 needs ``--ntk-width 2048``),
  N = 16, O = 8: compiled, eager ``jg.ntk``, torch.func ``vmap(jacrev)`` + contraction (skipped over
  ``--torch-ntk-max-params``: its per-sample Jacobians are N·O·P numbers);
- per-sample gradients, ``ggn_vp`` and ``ggn_diagonal``, MLP 6 × 256, B = 64: compiled vs eager.

On the CPU a compiled product runs the eager code into its buffers: the ratio measures what the
preallocation saves (little: the same GEMMs). On a GPU (``--device gpu``, CuPy) the compiled
product replays one CUDA graph where it could record one (``captured``; else ``capture_error``
is printed), every time synchronised. Each time is the best of ``--repeat`` calls after a warm-up.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/compiled_products.py [--repeat 5] [--threads 1] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import subprocess
import time

import numpy as np

import jacgrad as jg


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def timed(f, sync, repeat: int) -> float:
    f()
    sync()
    best = float("inf")
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        f()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def mlp(widths, act, to, rng, dtype=np.float32):
    W = [to((rng.standard_normal((m, n)) / np.sqrt(m)).astype(dtype)) for m, n in zip(widths, widths[1:])]
    b = [to((0.1 * rng.standard_normal(n)).astype(dtype)) for n in widths[1:]]
    return jg.MLP(W, b, [act] * (len(widths) - 2) + ["identity"])


def torch_norms(net, x, y, loss, device):
    """torch.func's per-sample gradient norms of ``net.to_torch()``: a callable and its sync."""
    import torch

    m = net.to_torch().to(device)
    params = {k: v.detach() for k, v in m.named_parameters()}
    X, Y = torch.as_tensor(np.asarray(jg.to_numpy(x)), device=device), torch.as_tensor(np.asarray(jg.to_numpy(y)), device=device)
    lf = torch.nn.functional.cross_entropy if loss == "softmax_cross_entropy" else torch.nn.functional.mse_loss

    def loss1(p, xi, yi):
        return lf(torch.func.functional_call(m, p, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(loss1), in_dims=(None, 0, 0))

    def norms():
        grads = g(params, X, Y)
        return torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1) for v in grads.values()))

    return norms


def torch_ntk(net, x, device):
    import torch

    m = net.to_torch().to(device)
    params = {k: v.detach() for k, v in m.named_parameters()}
    X = torch.as_tensor(np.asarray(jg.to_numpy(x)), device=device)

    def f(p, xi):
        return torch.func.functional_call(m, p, (xi[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))

    def ntk():
        J = jac(params, X)
        J = torch.cat([v.reshape(v.shape[0], v.shape[1], -1) for v in J.values()], dim=2)
        return torch.einsum("iop,jqp->ijoq", J, J)

    return ntk


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--ntk-width", type=int, default=512)
    ap.add_argument("--torch-ntk-max-params", type=int, default=2_000_000)
    ap.add_argument("--skip-cnn", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (match OPENBLAS_NUM_THREADS)")
    a = ap.parse_args(argv)
    gpu = a.device == "gpu"
    to = (lambda v: jg.to_device(v, "gpu")) if gpu else (lambda v: v)
    if gpu:
        import cupy as cp

        sync = cp.cuda.get_current_stream().synchronize
        tdev = "cuda"
        print("GPU:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode())
    else:
        sync, tdev = (lambda: None), "cpu"
    try:
        import torch

        torch_ok = True
        torch.set_num_threads(a.threads)
        tsync = torch.cuda.synchronize if gpu else (lambda: None)
    except ImportError:
        torch_ok = False
    print("CPU:", cpu_model())
    print(f"float32, best of {a.repeat} after a warm-up; ratios: eager / compiled and torch.func / compiled")
    rng = np.random.default_rng(0)
    rows = []

    def case(label, compiled, eager, peer=None, peer_sync=None, note=""):
        tc = timed(compiled, sync, a.repeat)
        te = timed(eager, sync, a.repeat)
        tp = timed(peer, peer_sync, a.repeat) if peer is not None else None
        rows.append((label, tc, te, tp, note))
        tp_s = f"{tp * 1e3:9.2f} ms {tp / tc:6.2f}x" if tp is not None else f"{'—':>9}    {'':>7}"
        print(f"{label:<44} compiled {tc * 1e3:9.2f} ms | eager {te * 1e3:9.2f} ms {te / tc:6.2f}x | "
              f"torch.func {tp_s} {note}", flush=True)

    def mode(step):
        return "" if not gpu else ("(graph)" if step.captured else f"(no graph: {step.capture_error[:80]})")

    # per-sample grad norms, MLP 32 × 256
    net = mlp([256] * 33, "tanh", to, rng)
    x, y = to(rng.standard_normal((64, 256)).astype(np.float32)), to(rng.integers(0, 256, 64))
    step = net.compile(64, product="grad_norms", loss="softmax_cross_entropy")
    step(x, y)
    case("grad norms, MLP 32x256, B=64, CE", lambda: step(x, y),
         lambda: net.per_sample_grad_norms(x, y, loss="softmax_cross_entropy"),
         torch_norms(net, x, y, "softmax_cross_entropy", tdev) if torch_ok else None,
         tsync if torch_ok else None, mode(step))
    # per-sample grad norms, the small CNN
    if not a.skip_cnn:
        from jacgrad.bench.models import build_cnn, vmap_grad_norms

        m = build_cnn(64, device=a.device)
        cnet, cx, cy = m["net"], to(m["x"]), to(m["y"])
        cstep = cnet.compile(64, product="grad_norms", loss="softmax_cross_entropy")
        cstep(cx, cy)
        case("grad norms, small CNN 3x32x32, B=64, CE", lambda: cstep(cx, cy),
             lambda: cnet.per_sample_grad_norms(cx, cy, loss="softmax_cross_entropy"),
             vmap_grad_norms(m) if torch_ok else None, tsync if torch_ok else None, mode(cstep))
    # the NTK of a ReLU FCN, N = 16, O = 8
    w = a.ntk_width
    knet = mlp([64, w, w, w, 8], "relu", to, rng)
    kx = to(rng.standard_normal((16, 64)).astype(np.float32))
    kstep = knet.compile(16, product="ntk")
    kstep(kx)
    peer = torch_ntk(knet, kx, tdev) if torch_ok and knet.n_params <= a.torch_ntk_max_params else None
    case(f"NTK, ReLU FCN 3x{w}, N=16, O=8", lambda: kstep(kx), lambda: jg.ntk(knet, kx), peer,
         tsync if peer else None, mode(kstep))
    # the other products, MLP 6 × 256
    pnet = mlp([256] * 7, "tanh", to, rng)
    px, pt = to(rng.standard_normal((64, 256)).astype(np.float32)), to(rng.standard_normal((64, 256)).astype(np.float32))
    v = to(rng.standard_normal(pnet.n_params).astype(np.float32))
    for product, call, eager in (
            ("grads", lambda s: s(px, pt), lambda: pnet.per_sample_grads(px, pt)),
            ("ggn_vp", lambda s: s(px, v), lambda: pnet.ggn_vp(px, v)),
            ("ggn_diagonal", lambda s: s(px), lambda: pnet.ggn_diagonal(px))):
        s = pnet.compile(64, product=product)
        call(s)
        case(f"{product}, MLP 6x256, B=64, mse", lambda s=s, call=call: call(s), eager, note=mode(s))


if __name__ == "__main__":
    main()

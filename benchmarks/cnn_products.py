"""The issue's small CNN on the CPU: jacgrad's parameter-space products against the peers, one run,
float32, ratios side by side (the machine may be loaded: compare the ratios of one run).

Net (issue 21): 3×32×32 input, Conv3x3(3→32)+ReLU, MaxPool2, Conv3x3(32→64)+ReLU, MaxPool2,
Conv3x3(64→128)+ReLU, MaxPool2, Flatten, Linear(2048→10); B = 64 (the NTK: N = 16, 10 outputs).

- per-sample grad norms: jacgrad (auto, gram, instantiate) against jacgrad's own ``loss_and_grads``,
  torch.func ``vmap(grad)`` + norm, Opacus ``GradSampleModule`` and BackPACK ``BatchL2Grad``;
- the NTK: ``jg.ntk`` against the better torch.func recipe (``vmap(jacrev)`` + contraction, and
  the NTK-vector products ``vmap(vjp)`` then ``jvp``);
- the exact GGN diagonal: ``ggn_diagonal`` against BackPACK ``DiagGGNExact``.

Each time is the best of ``--repeat`` calls after one warm-up call.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python benchmarks/cnn_products.py [--threads 1] [--repeat 2]
"""

import argparse
import subprocess
import time

import numpy as np
import torch
from threadpoolctl import threadpool_limits

import jacgrad as jg
from jacgrad.bench.models import build_cnn, cnn_module as model, vmap_grad_norms  # one builder, one recipe

nn = torch.nn


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def timed(f, repeat: int) -> float:
    """The best of ``repeat`` calls after a warm-up call (``repeat=0``: one call, no warm-up)."""
    if repeat:
        f()
    best = float("inf")
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ntk", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B = args.batch
    built = build_cnn(B)  # the bench's cnn_norms task times the same model and recipe
    net, x, y, params, f1 = built["net"], built["x"], built["y"], built["params"], built["f1"]
    X, Y = torch.tensor(x), torch.tensor(y)
    ce = "softmax_cross_entropy"
    tf_norms = vmap_grad_norms(built)

    ref = tf_norms().numpy()
    for method in ("auto", "gram", "instantiate"):
        got = net.per_sample_grad_norms(x, y, loss=ce, method=method)
        assert np.allclose(got, ref, rtol=1e-3), method
    rows = []
    with threadpool_limits(args.threads):
        t = {"loss_and_grads": timed(lambda: net.loss_and_grads(x, y, loss=ce), args.repeat)}
        for method in ("auto", "gram", "instantiate"):
            t[method] = timed(lambda: net.per_sample_grad_norms(x, y, loss=ce, method=method), args.repeat)
        t["torch.func"] = timed(tf_norms, args.repeat)
        try:
            import opacus

            gsm = opacus.GradSampleModule(model().train(), loss_reduction="sum")

            def op():
                gsm.zero_grad(set_to_none=True)
                for p in gsm.parameters():
                    p.grad_sample = None
                nn.functional.cross_entropy(gsm(X), Y, reduction="sum").backward()
                return sum((p.grad_sample.reshape(B, -1) ** 2).sum(1) for p in gsm.parameters()).sqrt()

            t["opacus"] = timed(op, args.repeat)
        except ImportError:
            t["opacus"] = None
        try:
            import backpack
            from backpack.extensions import BatchL2Grad, DiagGGNExact

            bm, bl = backpack.extend(model()), backpack.extend(nn.CrossEntropyLoss())

            def bp(ext):
                bm.zero_grad()
                with backpack.backpack(ext):
                    bl(bm(X), Y).backward()

            t["backpack"] = timed(lambda: bp(BatchL2Grad()), args.repeat)
            t["backpack ggn"] = timed(lambda: bp(DiagGGNExact()), args.repeat)
        except ImportError:
            t["backpack"] = t["backpack ggn"] = None
        t["ggn_diagonal"] = timed(lambda: net.ggn_diagonal(x, y, loss=ce), args.repeat)

        N = args.ntk
        xn = torch.tensor(x[:N])

        def ntk_jacrev():
            J = torch.func.vmap(torch.func.jacrev(f1), in_dims=(None, 0))(params, xn)
            J = torch.cat([v.reshape(N, 10, -1) for v in J.values()], dim=2)
            return torch.einsum("iop,jqp->ijoq", J, J)

        def ntk_vps():
            # neural-tangents' "NTK-vector products": K[i, j] = J(x_i) J(x_j)ᵀ by a vjp per (j, o) and a jvp
            def row(xj):
                _, vjp = torch.func.vjp(lambda p: f1(p, xj), params)
                return torch.func.vmap(vjp)(torch.eye(10))[0]            # (10, P…): the rows of J(x_j)
            def col(xi, rows):
                return torch.func.vmap(lambda r: torch.func.jvp(lambda p: f1(p, xi), (params,), (r,))[1])(rows)
            out = []
            for j in range(N):
                rows = row(xn[j])
                out.append(torch.func.vmap(col, in_dims=(0, None))(xn, rows))
            return torch.stack(out, 1)                                     # (N, N, 10, 10)

        K = jg.ntk(net, x[:N])
        assert np.allclose(K, ntk_jacrev().numpy(), rtol=1e-3, atol=1e-3 * float(np.abs(K).max()))
        t["ntk"] = timed(lambda: jg.ntk(net, x[:N]), args.repeat)
        t["ntk jacrev"] = timed(ntk_jacrev, args.repeat)
        t["ntk vps"] = timed(ntk_vps, 0)
    print(f"CPU: {cpu_model()}; {args.threads} thread(s); float32; B = {B}, NTK N = {args.ntk}")
    r = lambda a, b: "n/a" if t.get(b) is None else f"{t[a] / t[b]:.2f}"  # noqa: E731
    print(f"{'what':44s} {'seconds':>9s}   ratio")
    rows = [("jacgrad loss_and_grads", "loss_and_grads", None),
            ("jacgrad per_sample_grad_norms auto", "auto", "loss_and_grads"),
            ("  ... gram", "gram", "auto"), ("  ... instantiate", "instantiate", "auto"),
            ("torch.func vmap(grad) + norm", "torch.func", "auto"),
            ("Opacus GradSampleModule", "opacus", "auto"), ("BackPACK BatchL2Grad", "backpack", "auto"),
            ("jacgrad ntk", "ntk", None), ("torch.func vmap(jacrev) + einsum", "ntk jacrev", "ntk"),
            ("torch.func NTK-vector products", "ntk vps", "ntk"),
            ("jacgrad ggn_diagonal", "ggn_diagonal", None), ("BackPACK DiagGGNExact", "backpack ggn", "ggn_diagonal")]
    for label, key, base in rows:
        sec = "n/a" if t.get(key) is None else f"{t[key]:.3f}"
        print(f"{label:44s} {sec:>9s}   {'' if base is None else r(key, base) + ' x ' + base}")


if __name__ == "__main__":
    main()

"""Where the GPU's small, launch-bound calls spend their time: cProfile of each call on CuPy.

The GPU suite's first run (benchmarks/results/h100-2026-11-26) found jacgrad-cupy's eager
training step of a small net (B = 64, 32 × 256) at 2.1× torch-CUDA eager, the tapering per-sample
Jacobians at 14× JAX's jit, ``per_sample_grad_norms``
and ``ggn_diagonal`` slower than NumPy and the block report slower than on the host: calls whose
kernels are tiny, so their time is the host's (Python, CuPy dispatch, allocations, syncs). This
prints, for each, the wall time per call and the functions with the most own time and the most
calls, with every call synchronised at the end of the loop. One command, a GPU needed:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_profile.py --out /tmp/prof.txt
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jacgrad as jg  # noqa: E402


def mlp(widths, to, rng):
    W = [to(rng.standard_normal((m, n)) / np.sqrt(m)) for m, n in zip(widths, widths[1:])]
    b = [to(0.1 * rng.standard_normal(n)) for n in widths[1:]]
    return jg.MLP(W, b, ["tanh"] * (len(widths) - 2) + ["identity"])


def profile(label, fn, sync, n, out, top=28):
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    wall = (time.perf_counter() - t0) / n * 1e3
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    sync()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("ncalls").print_stats(top)
    text = f"\n{'=' * 100}\n{label}: {wall:.3f} ms per call unprofiled (mean of {n})\n{s.getvalue()}"
    print(text[:1500], flush=True)
    out.write(text)
    out.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="gpu", choices=["gpu", "cpu"], help="cpu: a dry run on NumPy")
    a = p.parse_args()
    out_path = a.out.resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    to = lambda v, dt="float32": jg.to_device(np.ascontiguousarray(np.asarray(v, dt)), a.device)  # noqa: E731
    xp = jg.get_xp(to(np.zeros(1)))
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if a.device == "gpu" else (lambda: None)
    rng = np.random.default_rng(0)
    small = a.device == "cpu"
    with out_path.open("w") as out:
        widths = [256] * 33 if not small else [8] * 5
        B = 64 if not small else 4
        net = mlp(widths, to, rng)
        x, t = to(rng.standard_normal((B, widths[0]))), to(rng.integers(0, widths[-1], B), "int64")
        profile(f"MLP loss_and_grads, B={B}, {len(widths) - 1}×{widths[1]}, float32, cross-entropy",
                lambda: net.loss_and_grads(x, t, loss="softmax_cross_entropy", input_grad=False), sync,
                30, out)
        try:
            import torch

            dev = "cuda" if a.device == "gpu" else "cpu"
            tnet = net.to_torch().to(dev)
            tx = torch.as_tensor(np.asarray(jg.to_numpy(x)), device=dev)
            tt = torch.as_tensor(np.asarray(jg.to_numpy(t)), device=dev)
            lossf = torch.nn.CrossEntropyLoss()

            def tstep():
                for q in tnet.parameters():
                    q.grad = None
                lossf(tnet(tx), tt).backward()

            tsync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            profile("torch eager, the same net and step", tstep, tsync, 30, out, top=12)
        except Exception as exc:  # noqa: BLE001 - the peer is optional
            out.write(f"\ntorch: {type(exc).__name__}: {exc}\n")
        tw = [512, 256, 128, 64, 10] if not small else [24, 12, 6, 3]
        tnet_ = mlp(tw, to, rng)
        jx = to(rng.standard_normal((256 if not small else 4, tw[0])))
        profile(f"per-sample Jacobians (order='auto'), tapering {'-'.join(map(str, tw))}, B={jx.shape[0]}",
                lambda: tnet_.jacobian_chain(tnet_.forward(jx)[1]).jacobian("auto"), sync, 30, out)
        pw = [256] * 7 + [10] if not small else [8] * 4 + [3]
        pnet = mlp(pw, to, rng)
        px, pt = to(rng.standard_normal((B, pw[0]))), to(rng.integers(0, pw[-1], B), "int64")
        kw = dict(loss="softmax_cross_entropy")
        profile("MLP per_sample_grad_norms, B=64, 6×256", lambda: pnet.per_sample_grad_norms(px, pt, **kw),
                sync, 20, out)
        profile("MLP ggn_diagonal, B=64, 6×256", lambda: pnet.ggn_diagonal(px, pt, **kw), sync, 10, out)
        import suite_blocks
        from suite_device import Device

        dev = Device(a.device)
        spec = suite_blocks.FLOW if not small else suite_blocks.DRY_SMALL
        bnet = suite_blocks._net(spec, lambda v: dev.put(v, "float32"))
        data = suite_blocks._data(spec, "float32", 4)
        bx, bt = dev.put(data["x"]), dev.put(data["t"])
        profile(f"gradient_flow (block report), B={spec['B']}, {spec['blocks']} blocks of 2×{spec['H']}",
                lambda: jg.diagnostics.gradient_flow(bnet, bx, bt), sync, 3, out, top=40)
        # last: the only part that calls cuBLAS through ctypes, whose failure could end the process
        from jacgrad.cuda.gemm import direct_cublas

        def direct_step():
            with direct_cublas():
                return net.loss_and_grads(x, t, loss="softmax_cross_entropy", input_grad=False)

        ref, got = net.loss_and_grads(x, t, loss="softmax_cross_entropy", input_grad=False), direct_step()
        worst = max(float(abs(jg.to_numpy(g) - jg.to_numpy(r)).max() / max(abs(jg.to_numpy(r)).max(), 1e-30))
                    for g, r in zip([got[0], *got[1].weights], [ref[0], *ref[1].weights]))
        out.write(f"\ndirect cuBLAS (ctypes cublasGemmEx) against cupy.matmul, loss and dW: worst rel. diff {worst:.2e}\n")
        print(f"direct cuBLAS vs cupy.matmul: worst rel. diff {worst:.2e}")
        profile("the same step inside direct_cublas() (jacgrad's ctypes cublasGemmEx instead of cupy.matmul)",
                direct_step, sync, 30, out, top=12)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Parameter-space products of a small transformer, jacgrad vs torch.func on the CPU, float32, one run.

Net (issue 21's speed table): Embedding(V, d) → K pre-norm blocks (LayerNorm → causal
MultiHeadAttention(d, heads), residual; LayerNorm → Linear(d, 4d) → GELU → Linear(4d, d), residual)
→ Linear(d, O) head; mse against random targets; ``(B, T)`` integer token batches.
  * norms: per-sample gradient norms — ``per_sample_grad_norms`` (auto, gram, instantiate) vs
    jacgrad's own ``loss_and_grads`` and vs torch.func ``vmap(grad)`` + norm
  * ntk:   the full-output NTK ``(N, N, T·O, T·O)`` — ``jg.ntk`` vs torch.func's two recipes (Jacobian
    contraction; NTK-vector products), the better one; at ``--ntk-T`` tokens (the Jacobian of the
    contraction recipe is ``N·T·O × P`` floats: at T = 128 it does not fit in memory)
Each side is checked against the other in the same run. Prints the CPU model and the ratios.

    OPENBLAS_NUM_THREADS=1 python benchmarks/transformer_products.py [--blocks 2] [--T 128] [--d 256]
        [--heads 4] [--batch 16] [--ntk-n 8] [--ntk-T 16] [--n-out 2] [--rounds 3]
"""

import argparse
import subprocess
import time

import numpy as np
import torch

import jacgrad as jg
from jacgrad.bench.models import build_transformer, vmap_grad_norms  # one builder: the bench's transformer_norms task


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def interleaved(fns: dict, rounds: int) -> dict:
    """``{name: (best seconds, last result)}``, the functions run in turn each round (a loaded
    machine slows them alike), after one warm-up call each (pools, caches, torch's dispatch)."""
    out = {k: [np.inf, fn()] for k, fn in fns.items()}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            r = fn()
            out[k] = [min(out[k][0], time.perf_counter() - t0), r]
    return {k: tuple(v) for k, v in out.items()}


def build(a, T):
    """``(net, f, params)`` of ``jacgrad.bench.models.build_transformer`` (the bench's transformer_norms model)."""
    m = build_transformer(1, T=T, d=a.d, heads=a.heads, blocks=a.blocks, vocab=a.vocab, n_out=a.n_out)
    return m["net"], m["f"], m["params"]


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("blocks", 2), ("T", 128), ("d", 256), ("heads", 4), ("batch", 16), ("ntk-n", 8),
                          ("ntk-T", 16), ("n-out", 2), ("vocab", 512)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-ntk", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_model()}; torch threads 1, OPENBLAS_NUM_THREADS as set; float32")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rng = np.random.default_rng(0)
    B, T = a.batch, a.T
    built = build_transformer(B, T=T, d=a.d, heads=a.heads, blocks=a.blocks, vocab=a.vocab, n_out=a.n_out)
    net, tok, tgt = built["net"], built["x"], built["y"]
    print(f"net: {a.blocks} pre-norm blocks, T = {T}, d = {a.d}, {a.heads} heads, B = {B}, {net.n_params} parameters")

    norms = vmap_grad_norms(built)  # the recipe the bench's transformer_norms task times
    torch_norms = lambda: norms().numpy()  # noqa: E731

    fns = {m: (lambda m=m: net.per_sample_grad_norms(tok, tgt, method=m)) for m in ("auto", "gram", "instantiate")}
    fns["loss_and_grads"] = lambda: net.loss_and_grads(tok, tgt, input_grad=False)
    fns["torch"] = torch_norms
    res = interleaved(fns, a.rounds)
    (t_lg, _), (t_tf, ref) = res.pop("loss_and_grads"), res.pop("torch")
    for m, (t, got) in res.items():
        err = np.max(np.abs(got - ref) / ref)
        print(f"  per_sample_grad_norms({m:11s}) {t:7.3f} s  = {t / t_lg:5.2f}× loss_and_grads ({t_lg:.3f} s), "
              f"torch.func vmap(grad) {t_tf:.3f} s = {t_tf / t:5.2f}× slower; max rel. diff {err:.1e}")
    better = min(res["gram"][0], res["instantiate"][0])
    print(f"  auto / better of gram and instantiate: {res['auto'][0] / better:.3f}")

    if a.skip_ntk:
        return
    Tn, N = a.ntk_T, a.ntk_n
    net, f, params = build(a, Tn)
    x = rng.integers(0, a.vocab, (N, Tn))
    t_jg, K = interleaved({"jg": lambda: jg.ntk(net, x)}, 1)["jg"]
    xt = torch.from_numpy(x)
    fn = lambda p, xi: f(p, xi[None])[0].reshape(-1)  # noqa: E731  one sample: (T·O,)

    def contraction():  # recipe 1: per-sample Jacobians, contracted per parameter
        with sdpa_kernel(SDPBackend.MATH):
            J = torch.func.vmap(torch.func.jacrev(fn), in_dims=(None, 0))(params, xt)
        return sum(torch.einsum("iaP,jbP->ijab", j.flatten(2), j.flatten(2)) for j in J.values()).numpy()

    def ntk_vps():  # recipe 2: NTK-vector products, vmapped over the output basis
        def one(x1, x2):  # (T·O, T·O): [o, q] = J(x1)_o · J(x2)_q
            _, vjp1 = torch.func.vjp(lambda p: fn(p, x1), params)
            jvp2 = lambda t: torch.func.jvp(lambda p: fn(p, x2), (params,), (t,))[1]  # noqa: E731
            return torch.func.vmap(lambda v: jvp2(vjp1(v)[0]))(torch.eye(Tn * a.n_out))

        with sdpa_kernel(SDPBackend.MATH):
            return torch.stack([torch.stack([one(xt[i], xt[j]) for j in range(N)]) for i in range(N)]).numpy()

    t_c, Kc = interleaved({"c": contraction}, 1)["c"]
    err = np.max(np.abs(K - Kc)) / np.max(np.abs(Kc))
    print(f"  ntk full (N = {N}, T = {Tn}, O = {a.n_out}): jacgrad {t_jg:.3f} s; torch.func contraction {t_c:.3f} s "
          f"= {t_c / t_jg:.2f}× slower (max diff / max {err:.1e})")
    t_v, Kv = interleaved({"v": ntk_vps}, 1)["v"]
    err = np.max(np.abs(K - Kv)) / np.max(np.abs(Kv))
    print(f"  ntk full: torch.func NTK-vector products {t_v:.3f} s = {t_v / t_jg:.2f}× slower (max diff / max {err:.1e}); "
          f"vs the better torch recipe {min(t_c, t_v) / t_jg:.2f}×")


if __name__ == "__main__":
    main()

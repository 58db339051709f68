"""Parameter-space products: jacgrad against its peers, timed interleaved in one run.

Three cases, float32 on the CPU, every row of a case timed interleaved (``jacgrad.bench.timing``:
repeat r runs each row once, order rotated; medians), ratios against the case's first row:

- ``per_sample``: ``loss_and_grads`` (the reference), ``per_sample_grad_norms``,
  ``per_sample_grads``; torch.func ``vmap(grad)`` with and without the norms; BackPACK
  ``BatchL2Grad`` and ``BatchGrad``.
- ``ntk``: the full empirical NTK ``(N, N, O, O)`` of a ReLU FCN: ``jg.ntk(net, x)`` (symmetric),
  ``jg.ntk(net, x, x)`` (both sides swept, as the peers do), the trace; torch.func's two recipes
  from PyTorch's "Neural Tangent Kernels" tutorial (Jacobian contraction, NTK-vector products).
- ``ggn``: ``ggn_vp`` against torch.func's jvp → loss Hessian → vjp; ``ggn_diagonal`` against
  BackPACK's ``DiagGGNExact``; ``loss_and_grads`` for scale.

Peers that are not installed are reported as skipped. Run it on a quiet machine with:

    python benchmarks/param_space.py                         # all cases, one thread per library
    python benchmarks/param_space.py --cases ntk --ntk-width 1024 --ntk-recipes jc
    python benchmarks/param_space.py --cases ntk --ntk-width 2048 --ntk-recipes jc   # ~9 GB for torch's J_θ
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import warnings

import numpy as np

import jacgrad as jg
from jacgrad.bench.timing import Entry, set_threads, time_entries


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def torch_model(net):
    import torch

    acts = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "identity": torch.nn.Identity}
    layers = []
    for W, b, a in zip(net.weights, net.biases, net.activations):
        lin = torch.nn.Linear(*W.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        layers += [lin, acts[a]()]
    return torch.nn.Sequential(*layers)


def report(title: str, entries: list[Entry]) -> None:
    print(f"\n## {title}")
    base = entries[0].stats().get("median_ms")
    print(f"| {'what':<52} | median ms | × {entries[0].label} |")
    print(f"|{'-' * 54}|----------:|------:|")
    for e in entries:
        s = e.stats()
        if e.error or not s.get("n"):
            print(f"| {e.label:<52} | skipped: {e.error} | |")
            continue
        print(f"| {e.label:<52} | {s['median_ms']:9.3f} | {s['median_ms'] / base:5.2f} |")


def _peer(label, make):
    """An Entry whose function comes from ``make()``; an ImportError or failure marks it skipped."""
    try:
        return Entry(label, make())
    except Exception as exc:  # noqa: BLE001 - a missing or broken peer is a skipped row, not a crash
        e = Entry(label, lambda: None)
        e.fail(exc)
        return e


def classifier(args, seed: int):
    """The per_sample/ggn case: a ReLU net, inputs, labels, the same in torch, and the rng."""
    import torch

    sizes = [args.n_in] + [args.width] * args.depth + [args.n_out]
    net = jg.MLP.init(sizes, activation="relu", dtype="float32", seed=0)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((args.batch, args.n_in)).astype(np.float32)
    t = rng.integers(0, args.n_out, size=args.batch)
    model = torch_model(net)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return sizes, net, x, t, torch.from_numpy(x), torch.from_numpy(t), model, params, rng


def backpack_step(net, X, T, extension: str):
    """``make()`` for a BackPACK row: an extended copy of the net, one backward with ``extension``."""

    def make():
        import torch
        from backpack import backpack as ctx, extend
        from backpack import extensions

        m = extend(torch_model(net))
        lf = extend(torch.nn.CrossEntropyLoss())
        ext = getattr(extensions, extension)

        def run():
            m.zero_grad(set_to_none=True)
            with ctx(ext()):
                lf(m(X), T).backward()
            return m

        return run

    return make


def case_per_sample(args):
    import torch
    import torch.func as tf

    sizes, net, x, t, X, T, model, params, _ = classifier(args, seed=1)
    loss = "softmax_cross_entropy"

    def ell(p, xi, ti):
        return torch.nn.functional.cross_entropy(tf.functional_call(model, p, (xi[None],)), ti[None])

    psg = tf.vmap(tf.grad(ell), in_dims=(None, 0, 0))

    def torch_norms():
        g = psg(params, X, T)
        return torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1) for v in g.values()))

    def torch_step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(X), T).backward()

    entries = [
        Entry("jacgrad loss_and_grads", lambda: net.loss_and_grads(x, t, loss=loss)),
        Entry("jacgrad per_sample_grad_norms", lambda: net.per_sample_grad_norms(x, t, loss=loss)),
        Entry("jacgrad per_sample_grads", lambda: net.per_sample_grads(x, t, loss=loss)),
        Entry("torch autograd loss + grads", torch_step),
        Entry("torch.func vmap(grad)", lambda: psg(params, X, T)),
        Entry("torch.func vmap(grad) + norms", torch_norms),
        _peer("BackPACK BatchL2Grad", backpack_step(net, X, T, "BatchL2Grad")),
        _peer("BackPACK BatchGrad", backpack_step(net, X, T, "BatchGrad")),
    ]
    time_entries(entries, repeats=args.repeats, warmup=1, min_time=args.min_time)
    report(f"per_sample: {'-'.join(map(str, sizes))} relu, softmax CE, B={args.batch}, float32", entries)


def _ntk_recipes(model, X):
    """PyTorch's NTK tutorial, verbatim in substance: Jacobian contraction and NTK-vector products."""
    import torch
    import torch.func as tf

    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, x):
        return tf.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def jacobian_contraction(x1, x2):
        jac1 = tf.vmap(tf.jacrev(fnet_single), (None, 0))(params, x1)
        jac1 = [j.flatten(2) for j in jac1.values()]
        jac2 = tf.vmap(tf.jacrev(fnet_single), (None, 0))(params, x2)
        jac2 = [j.flatten(2) for j in jac2.values()]
        return torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)

    def ntk_vps(x1, x2):
        def get_ntk(x1, x2):
            def func_x1(p):
                return fnet_single(p, x1)

            def func_x2(p):
                return fnet_single(p, x2)

            output, vjp_fn = tf.vjp(func_x1, params)

            def get_ntk_slice(vec):
                vjps = vjp_fn(vec)
                _, jvps = tf.jvp(func_x2, (params,), vjps)
                return jvps

            basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
            return tf.vmap(get_ntk_slice)(basis)

        return tf.vmap(tf.vmap(get_ntk, (None, 0)), (0, None))(x1, x2)

    return (lambda: jacobian_contraction(X, X)), (lambda: ntk_vps(X, X))


def case_ntk(args):
    import torch

    sizes = [args.ntk_in] + [args.ntk_width] * 3 + [args.ntk_out]
    net = jg.MLP.init(sizes, activation="relu", dtype="float32", seed=0)
    x = np.random.default_rng(2).standard_normal((args.ntk_n, args.ntk_in)).astype(np.float32)
    model = torch_model(net)
    jc, vps = _ntk_recipes(model, torch.from_numpy(x))
    recipes = args.ntk_recipes.split(",") if args.ntk_recipes else []
    if "jc" in recipes:
        K, Kt = jg.ntk(net, x), jc().numpy()
        check = f"max rel. difference jacgrad vs torch {float(np.abs(K - Kt).max() / np.abs(Kt).max()):.1e}"
    else:
        check = "not checked against torch"
    entries = [
        Entry("jacgrad ntk(net, x)  (symmetric)", lambda: jg.ntk(net, x)),
        Entry("jacgrad ntk(net, x, x)", lambda: jg.ntk(net, x, x)),
        Entry("jacgrad ntk(net, x, trace=True)", lambda: jg.ntk(net, x, trace=True)),
    ]
    if "jc" in recipes:
        entries.append(Entry("torch.func Jacobian contraction", jc))
    if "vps" in recipes:
        entries.append(Entry("torch.func NTK-vector products", vps))
    time_entries(entries, repeats=args.repeats, warmup=1, min_time=args.min_time)
    report(f"ntk: {'-'.join(map(str, sizes))} relu FCN, N={args.ntk_n}, O={args.ntk_out}, float32 "
           f"({check})", entries)


def case_ggn(args):
    import torch
    import torch.func as tf

    sizes, net, x, t, X, T, model, params, rng = classifier(args, seed=3)
    loss = "softmax_cross_entropy"
    v = rng.standard_normal(sum(W.size + W.shape[1] for W in net.weights)).astype(np.float32)
    vt = {k: torch.randn_like(p) for k, p in params.items()}

    def f(p):
        return tf.functional_call(model, p, (X,))

    def torch_ggn_vp():
        y, Jv = tf.jvp(f, (params,), (vt,))
        p = torch.softmax(y, 1)
        HJv = p * (Jv - (p * Jv).sum(1, keepdim=True)) / X.shape[0]
        return tf.vjp(f, params)[1](HJv)

    entries = [
        Entry("jacgrad loss_and_grads", lambda: net.loss_and_grads(x, t, loss=loss)),
        Entry("jacgrad ggn_vp", lambda: net.ggn_vp(x, v, loss=loss)),
        Entry("torch.func jvp -> H -> vjp", torch_ggn_vp),
        Entry("jacgrad ggn_diagonal", lambda: net.ggn_diagonal(x, loss=loss)),
        _peer("BackPACK DiagGGNExact", backpack_step(net, X, T, "DiagGGNExact")),
    ]
    time_entries(entries, repeats=args.repeats, warmup=1, min_time=args.min_time)
    report(f"ggn: {'-'.join(map(str, sizes))} relu, softmax CE, B={args.batch}, float32", entries)


CASES = {"per_sample": case_per_sample, "ntk": case_ntk, "ggn": case_ggn}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="per_sample,ntk,ggn")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--n-in", type=int, default=784)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--n-out", type=int, default=10)
    ap.add_argument("--ntk-in", type=int, default=128)
    ap.add_argument("--ntk-width", type=int, default=512)
    ap.add_argument("--ntk-out", type=int, default=8)
    ap.add_argument("--ntk-n", type=int, default=16)
    ap.add_argument("--ntk-recipes", default="jc,vps",
                    help="torch.func recipes to time: jc (Jacobian contraction, N·O·P memory per side), "
                         "vps (NTK-vector products, N²·O·P); '' for none")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)  # BackPACK's full-backward-hook notice on every call
    set_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} | load average {load()} | threads per library {args.threads} | "
          f"numpy {np.__version__} | torch {torch.__version__}")
    for name in args.cases.split(","):
        if name not in CASES:
            raise SystemExit(f"unknown case {name!r}; valid: {', '.join(CASES)}")
        CASES[name](args)


if __name__ == "__main__":
    main()

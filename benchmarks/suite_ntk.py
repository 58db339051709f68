"""The products section's NTK of a ReLU FCN (``suite_products.py``; the issue's target case: 3 × 2048,
N = 16, O = 8) against JAX jit (``jacrev`` contracted) and neural-tangents' structured derivatives,
each where it imports (a note in the row otherwise). ``row`` is ``suite_products._row``."""

from __future__ import annotations

import numpy as np

import jacgrad as jg


def fcn_ntk_rows(rows: list, dev, s: dict, row) -> None:
    """The NTK of a 3-layer ReLU FCN (the issue's target case) against JAX jit and neural-tangents."""
    rng = np.random.default_rng(12)
    widths = [s["n_in"], s["width"], s["width"], s["O"]]
    Ws = [rng.standard_normal((m, n)) / np.sqrt(m) for m, n in zip(widths, widths[1:])]
    bs = [0.1 * rng.standard_normal(n) for n in widths[1:]]
    acts = ["relu", "relu", "identity"]
    x = rng.standard_normal((s["N"], s["n_in"]))
    net = jg.MLP([dev.put(W, "float32") for W in Ws], [dev.put(b, "float32") for b in bs], acts)
    ref = jg.MLP([W.astype(np.float32).astype(np.float64) for W in Ws],
                 [b.astype(np.float32).astype(np.float64) for b in bs], acts)
    xd, x64 = dev.put(x, "float32"), x.astype(np.float32).astype(np.float64)
    row(rows, dev, "ntk", f"ReLU FCN 3×{s['width']}, N={s['N']}, O={s['O']}", lambda: [jg.ntk(net, xd)],
         lambda: [jg.ntk(ref, x64)], {"jax jit": _jax_ntk(Ws, bs, x), "neural-tangents": _nt_ntk(Ws, bs, x)})


def _jax_params(Ws, bs):
    import jax.numpy as jnp

    return [(jnp.asarray(W, jnp.float32), jnp.asarray(b, jnp.float32)) for W, b in zip(Ws, bs)]


def _relu_fcn(jax):
    """The ReLU FCN ``f(params, x)`` (``params``: ``[(W, b)]``, ReLU between layers) both JAX peers differentiate."""

    def f(p, xx):
        for k, (W, b) in enumerate(p):
            xx = xx @ W + b
            if k < len(p) - 1:
                xx = jax.nn.relu(xx)
        return xx

    return f


def _jax_ntk(Ws, bs, x):
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return "jax is not importable"
    params, xj = _jax_params(Ws, bs), jnp.asarray(x, jnp.float32)

    f = _relu_fcn(jax)

    @jax.jit
    def ntk(p, xx):
        J = jax.jacrev(f)(p, xx)  # leaves (N, O, *shape)
        flat = [j.reshape(j.shape[0], j.shape[1], -1) for j in jax.tree_util.tree_leaves(J)]
        return sum(jnp.einsum("aip,bjp->abij", j, j) for j in flat)

    return lambda: ntk(params, xj).block_until_ready()


def _nt_ntk(Ws, bs, x):
    try:
        import jax
        import jax.numpy as jnp
        import neural_tangents as nt
    except ImportError:
        return "neural-tangents is not importable"
    params, xj = _jax_params(Ws, bs), jnp.asarray(x, jnp.float32)

    f = _relu_fcn(jax)

    kernel = jax.jit(nt.empirical_ntk_fn(f, trace_axes=(), implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    return lambda: kernel(xj, None, params).block_until_ready()

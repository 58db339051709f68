"""JAX as a peer of ``jacgrad bench``: ``jax-cpu`` and ``jax-gpu``.

Every function is ``jax.jit``-compiled ahead of timing (lowered and compiled explicitly; the
compile time is reported apart): ``value_and_grad`` of the MSE (training step), the pullback of
``jax.vjp`` (VJP), ``vmap(jacrev)`` and ``vmap(jacfwd)`` (per-sample Jacobians).
"""

from __future__ import annotations

import os
import time

import numpy as np

from .base import Backend, Prepared, gemm_operands

__all__ = ["Jax"]

_POOL = {"done": False, "threads": None}  # XLA's CPU pool, sized once per process


def _jax():
    """``import jax``, first telling XLA not to grab 75% of the GPU's memory when its GPU backend
    starts (the default), which would starve CuPy and torch running beside it in this process."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax

    return jax


def _jax_activation(name: str):
    jax = _jax()
    import jax.numpy as jnp

    table = {
        "identity": lambda h: h,
        "relu": jax.nn.relu,
        "leaky_relu": lambda h: jax.nn.leaky_relu(h, 0.01),
        "sigmoid": jax.nn.sigmoid,
        "tanh": jnp.tanh,
        "softplus": jax.nn.softplus,
        "elu": jax.nn.elu,
        "gelu": lambda h: jax.nn.gelu(h, approximate=False),
        "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),
        "silu": jax.nn.silu,
        "hard_tanh": jax.nn.hard_tanh,
    }
    if name not in table:
        raise KeyError(f"activation {name!r} has no JAX twin in jacgrad bench")
    return table[name]


def _compile(jitted, *args):
    """The compiled executable and the milliseconds lowering + compiling took."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, (time.perf_counter() - t0) * 1e3


class Jax(Backend):
    """JAX, every function ``jax.jit``-compiled ahead of timing (compile time reported apart)."""

    family = "jax"

    def __init__(self, device: str):
        self.device = device

    def unavailable(self):
        try:
            jax = _jax()
        except Exception as exc:  # noqa: BLE001
            return f"jax is not importable ({type(exc).__name__})"
        try:
            if not jax.devices(self.device):
                return f"jax has no {self.device} device"
        except RuntimeError as exc:
            return f"jax has no {self.device} backend here ({type(exc).__name__})"
        return None

    def threads(self) -> str:
        if self.device != "cpu":
            return "CUDA"
        if _POOL["threads"] is None:
            return "XLA's own pool (sized before jacgrad bench could set it)"
        return f"{_POOL['threads']} threads (XLA pool)"

    @staticmethod
    def limit_threads(n: int) -> None:
        """Size XLA's CPU pool to ``n`` threads: JAX sizes it from the CPU affinity when its
        backends start, and has no other knob. Only works before JAX's first use here."""
        if _POOL["done"]:
            return
        _POOL["done"] = True
        try:
            jax = _jax()

            cpus = os.sched_getaffinity(0)
            if n < len(cpus):
                os.sched_setaffinity(0, sorted(cpus)[:n])
            try:
                jax.devices()
            finally:
                os.sched_setaffinity(0, cpus)
            _POOL["threads"] = min(n, len(cpus))
        except Exception:  # noqa: BLE001 - no affinity API, or jax fails: the pool stays as it is
            _POOL["threads"] = None

    def _put(self, dtype: str):
        jax = _jax()

        if np.dtype(dtype) == np.float64:
            jax.config.update("jax_enable_x64", True)
        # JAX's default float32 matmul on a GPU may use TF32 (10-bit mantissa); jacgrad, CuPy and
        # torch compute in full float32, so the peer does too.
        jax.config.update("jax_default_matmul_precision", "highest")
        dev = jax.devices(self.device)[0]
        return lambda a: jax.device_put(np.ascontiguousarray(a, dtype=dtype), dev)

    @staticmethod
    def _sync(result):
        jax = _jax()

        jax.block_until_ready(result)

    def supports(self, task: str) -> bool:
        from .cases import PARAM_SPACE_TASKS

        return task not in PARAM_SPACE_TASKS + ("cnn_norms", "transformer_norms")  # no JAX recipes for them (neural-tangents is not installed here)

    def prepare(self, case, data):
        jax = _jax()
        import jax.numpy as jnp

        put = self._put(data.dtype)
        acts = [_jax_activation(a) for a in data.activations]
        params = [(put(W), put(b)) for W, b in zip(data.weights, data.biases)]
        x, t, v = put(data.x), put(data.target), put(data.v)

        def mlp(p, z):
            for (W, b), f in zip(p, acts):
                z = f(z @ W + b)
            return z

        host = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        if case.task == "train":
            def loss(p, x, t):
                return jnp.mean((mlp(p, x) - t) ** 2)

            step, ms = _compile(jax.jit(jax.value_and_grad(loss)), params, x, t)

            def outputs(r):
                value, grads = r
                return [host(value)] + [host(g[0]) for g in grads] + [host(g[1]) for g in grads]

            return Prepared({"": lambda: step(params, x, t)}, self._sync, outputs, {"": ms})
        if case.task == "vjp":
            _, pullback = jax.vjp(lambda z: mlp(params, z), x)
            apply, ms = _compile(jax.jit(lambda pb, v: pb(v)[0]), pullback, v)
            return Prepared({"": lambda: apply(pullback, v)}, self._sync, lambda r: [host(r)], {"": ms})
        variants, compile_ms = {}, {}
        for name, jac in (("jacrev", jax.jacrev), ("jacfwd", jax.jacfwd)):
            f = jax.jit(jax.vmap(jac(mlp, argnums=1), in_axes=(None, 0)))
            compiled, compile_ms[name] = _compile(f, params, x)
            variants[name] = (lambda c: lambda: c(params, x))(compiled)
        return Prepared(variants, self._sync, lambda r: [host(r)], compile_ms)

    def gemm_floor(self, gemms, dtype):
        jax = _jax()

        put = self._put(dtype)
        rng = np.random.default_rng(0)
        ops = gemm_operands(gemms, lambda s: put(rng.standard_normal(s)))
        layouts = [lay for *_, lay in ops]
        args = [(a, b) for a, b, _, _ in ops]

        def products(args):
            out = []
            for (a, b), lay in zip(args, layouts):
                a = a.swapaxes(-1, -2) if lay == "tn" else a
                b = b.swapaxes(-1, -2) if lay == "nt" else b
                out.append(a @ b)
            return out

        compiled, ms = _compile(jax.jit(products), args)
        return Prepared({"": lambda: compiled(args)}, self._sync, compile_ms={"": ms})

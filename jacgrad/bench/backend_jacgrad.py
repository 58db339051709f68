"""jacgrad itself as a backend of ``jacgrad bench``: ``jacgrad-numpy`` and ``jacgrad-cupy``."""

from __future__ import annotations

import time

import numpy as np

from .base import Backend, Prepared, gemm_operands, host64
from .cases import PARAM_SPACE_TASKS

__all__ = ["Jacgrad"]


class Jacgrad(Backend):
    """jacgrad's own ``MLP``: ``forward`` → ``losses.mse`` → ``backward(input_grad=False)``, and
    the same step compiled (``net.compile(B)``: buffers made once, a captured CUDA graph on the
    GPU where CuPy can record one — see ``TrainingStep.capture_error``) as its own row
    ``jacgrad-…[compiled]``; ``jacobian_chain(cache).vjp(v)``;
    ``jacobian_chain(forward(x)[1]).jacobian("auto")``, and the same compiled
    (``net.compile_jacobian(B)``: a CUDA graph on the GPU; the eager code plus a copy on the CPU)
    as ``jacgrad-…[compiled]``; the parameter-space tasks: one row per
    product (``loss_and_grads`` for scale, ``per_sample_grad_norms``, ``per_sample_grads``,
    ``jg.ntk(net, x)`` and ``jg.ntk(net, x, x)``, ``ggn_vp``, ``ggn_diagonal``)."""

    family = "jacgrad"

    def __init__(self, device: str):
        self.device = device
        self._module = None  # numpy or cupy, found on first use

    @property
    def device_label(self) -> str:
        return "numpy" if self.device == "cpu" else "cupy"

    def unavailable(self):
        if self.device == "cpu":
            return None
        from ..core.backend import gpu_unavailable_reason

        return gpu_unavailable_reason()

    def threads(self) -> str:
        if self.device != "cpu":
            return "CuPy (cuBLAS)"
        from ..cli.threads import blas_libraries

        counts = sorted({lib["threads"] for lib in blas_libraries()})
        return f"{'/'.join(map(str, counts))} threads (NumPy BLAS)" if counts else "NumPy BLAS (threads unknown: no threadpoolctl)"

    def _xp(self):
        if self._module is None:
            from ..core.backend import get_xp

            self._module = get_xp(self._to(np.zeros(1), "float32"))
        return self._module

    def _sync(self, result):
        if self.device == "gpu":
            self._xp().cuda.get_current_stream().synchronize()

    def _to(self, a, dtype):
        from ..core.backend import to_device

        a = np.ascontiguousarray(a, dtype=dtype)
        return to_device(a, "gpu") if self.device == "gpu" else a

    def prepare(self, case, data):
        from ..nn import losses
        from ..network.mlp import MLP

        if case.spec is not None:  # the CNN / transformer (models: built in torch, imported)
            from .models import prepare_jacgrad

            return prepare_jacgrad(case, data.dtype, host64, self._sync, self.device)
        to = lambda a: self._to(a, data.dtype)  # noqa: E731
        net = MLP([to(W) for W in data.weights], [to(b) for b in data.biases], data.activations)
        x, t, v = to(data.x), to(data.target), to(data.v)
        if case.task == "train":
            def fn():
                y, cache = net.forward(x)
                value, grad_y = losses.mse(y, t)
                return value, net.backward(cache, grad_y, input_grad=False)

            def outputs(r):
                return host64([r[0], *r[1].weights, *r[1].biases])

            if hasattr(net, "compile"):  # the same step with every buffer made once (a CUDA graph on the GPU)
                t0 = time.perf_counter()
                step = net.compile(case.batch)
                self._sync(step(x, t))
                ms = (time.perf_counter() - t0) * 1e3
                notes = {}
                if self.device == "gpu":
                    notes["compiled"] = "CUDA graph" if step.captured else f"no CUDA graph: {step.capture_error}"
                return Prepared({"": fn, "compiled": lambda: step(x, t)}, self._sync, outputs,
                                {"compiled": ms}, own_rows=("compiled",), notes=notes)
        elif case.task in PARAM_SPACE_TASKS:
            return self._param_space(case, data, net, x)
        elif case.task == "vjp":
            cache = net.forward(x)[1]

            def fn():
                return net.jacobian_chain(cache).vjp(v)

            outputs = lambda r: host64([r])  # noqa: E731
        else:
            def fn():
                return net.jacobian_chain(net.forward(x)[1]).jacobian("auto")

            outputs = lambda r: host64([r])  # noqa: E731
            # the same computation compiled (net.compile_jacobian: one CUDA graph on the GPU; on the
            # CPU the eager code plus one copy into the step's buffer)
            t0 = time.perf_counter()
            step = net.compile_jacobian(case.batch)
            self._sync(step(x))
            ms = (time.perf_counter() - t0) * 1e3
            notes = {}
            if self.device == "gpu":
                notes["compiled"] = "CUDA graph" if step.captured else f"no CUDA graph: {step.capture_error}"
            return Prepared({"": fn, "compiled": lambda: step(x)}, self._sync, outputs, {"compiled": ms},
                            own_rows=("compiled",), notes=notes)
        return Prepared({"": fn}, self._sync, outputs)

    def _param_space(self, case, data, net, x) -> Prepared:
        """Every product its own row, named by what it computes (its ``kind``); softmax
        cross-entropy on ``data.labels``, as the peers (``peer_param_space``)."""
        from ..params.ntk import ntk

        loss = "softmax_cross_entropy"
        labels = self._to(data.labels, "int64")
        grads = lambda g: host64([*g.weights, *g.biases])  # noqa: E731
        if case.task == "ntk":
            variants = {"ntk(net, x)": lambda: ntk(net, x), "ntk(net, x, x)": lambda: ntk(net, x, x)}
            return Prepared(variants, self._sync, lambda r: host64([r]), own_rows=tuple(variants),
                            kinds=dict.fromkeys(variants, "ntk"))
        table = {"loss_and_grads": (lambda: net.loss_and_grads(x, labels, loss=loss, input_grad=False),
                                    lambda r: host64([r[0]]) + grads(r[1]))}
        if case.task == "per_sample":
            table["per_sample_grad_norms"] = (lambda: net.per_sample_grad_norms(x, labels, loss=loss),
                                              lambda r: host64([r]))
            table["per_sample_grads"] = (lambda: net.per_sample_grads(x, labels, loss=loss, max_memory=None), grads)
            kinds = {"per_sample_grad_norms": "norms", "per_sample_grads": "grads"}
        else:
            v = self._to(data.direction(), data.dtype)
            table["ggn_vp"] = (lambda: net.ggn_vp(x, v, loss=loss), lambda r: host64([r]))
            table["ggn_diagonal"] = (lambda: net.ggn_diagonal(x, loss=loss), grads)
            kinds = {"ggn_vp": "ggn_vp", "ggn_diagonal": "ggn_diagonal"}
        kinds["loss_and_grads"] = "loss_and_grads"
        return Prepared({k: fn for k, (fn, _) in table.items()}, self._sync, own_rows=tuple(table),
                        kinds=kinds, outputs_of={k: out for k, (_, out) in table.items()})

    def gemm_floor(self, gemms, dtype):
        xp = self._xp()
        rng = np.random.default_rng(0)
        ops = gemm_operands(gemms, lambda shape: self._to(rng.standard_normal(shape), dtype))
        ops = [(a.T if lay == "tn" else a, b.T if lay == "nt" else b, c) for a, b, c, lay in ops]

        def fn():
            for a, b, c in ops:
                xp.matmul(a, b, out=c)
            return c

        return Prepared({"": fn}, self._sync)

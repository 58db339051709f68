"""jacgrad itself as a backend of ``jacgrad bench``: ``jacgrad-numpy`` and ``jacgrad-cupy``."""

from __future__ import annotations

import time

import numpy as np

from .base import Backend, Prepared, gemm_operands, host64

__all__ = ["Jacgrad"]


class Jacgrad(Backend):
    """jacgrad's own ``MLP``: ``forward`` → ``losses.mse`` → ``backward(input_grad=False)``, and
    the same step compiled (``net.compile(B)``: buffers made once, a captured CUDA graph on the
    GPU where CuPy can record one — see ``TrainingStep.capture_error``) as its own row
    ``jacgrad-…[compiled]``; ``jacobian_chain(cache).vjp(v)``;
    ``jacobian_chain(forward(x)[1]).jacobian("auto")``."""

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
        from ..backend import gpu_unavailable_reason

        return gpu_unavailable_reason()

    def threads(self) -> str:
        return "NumPy BLAS" if self.device == "cpu" else "CuPy (cuBLAS)"

    def _xp(self):
        if self._module is None:
            from ..backend import get_xp

            self._module = get_xp(self._to(np.zeros(1), "float32"))
        return self._module

    def _sync(self, result):
        if self.device == "gpu":
            self._xp().cuda.get_current_stream().synchronize()

    def _to(self, a, dtype):
        from ..backend import to_device

        a = np.ascontiguousarray(a, dtype=dtype)
        return to_device(a, "gpu") if self.device == "gpu" else a

    def prepare(self, case, data):
        from .. import losses
        from ..mlp import MLP

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
        elif case.task == "vjp":
            cache = net.forward(x)[1]

            def fn():
                return net.jacobian_chain(cache).vjp(v)

            outputs = lambda r: host64([r])  # noqa: E731
        else:
            def fn():
                return net.jacobian_chain(net.forward(x)[1]).jacobian("auto")

            outputs = lambda r: host64([r])  # noqa: E731
        return Prepared({"": fn}, self._sync, outputs)

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

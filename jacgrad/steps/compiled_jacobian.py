"""``J = step(x)``: the per-sample Jacobians of a network for a fixed batch, as one CUDA graph.

The H100 run of 2026-11-26 (benchmarks/results/h100-2026-11-26-peers) found jacgrad's per-sample
Jacobians of small nets launch-bound on the GPU: the tapering net's ``(256, 10, 512)`` Jacobians
took 1.24 ms through ~25 CuPy launches, JAX's jit 0.088 ms as one program. ``net.compile_jacobian(B)``
records the same computation — ``net.jacobian_chain(net.forward(x)[1]).jacobian(order)``, the
very code an eager call runs, nothing re-implemented — into a CUDA graph on its first call, and
replays it after that:

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([4, 8, 3], "tanh", seed=0)
    >>> step = net.compile_jacobian(batch=2)
    >>> x = np.ones((2, 4))
    >>> J = step(x)                       # (2, 3, 4): the step's buffer, overwritten by the next call
    >>> bool(np.allclose(J, net.jacobian_chain(net.forward(x)[1]).jacobian()))
    True

The contract is the compiled training steps' (``jacgrad.steps.compiled``):

- ``x`` is copied into a static ``(batch, n_in)`` buffer (``(batch, C, H, W)`` for an image net): same device (a ``TypeError`` otherwise,
  never a silent copy), any float dtype castable to the net's, exactly ``batch`` rows.
- The result IS the step's buffer: the next call overwrites it. ``step(x, copy=True)`` gives a
  fresh array.
- One call at a time: the step holds a lock for the whole call, the copy-out of ``copy=True``
  included, so threads sharing a step queue and each gets the Jacobians of its own ``x``.
  **With ``copy=False`` the buffer handed back is overwritten by the next call from any thread**:
  threads sharing a step pass ``copy=True``.
- Parameters are read by reference: updated in place, they are seen by the next call (a graph
  reads them at replay). An array or a layer replaced in the network raises ``RuntimeError``
  naming it, until ``step.rebind()`` adopts it (and drops the recorded graphs).
- ``capture="auto"`` (default): on the GPU, record a graph, and if recording fails run the same
  computation eagerly from then on (``step.capture_error`` says why; the first call's results are
  the eager run's and stand). ``True``: a failed capture raises ``CaptureError``. ``False``: no graph.
  On the CPU there is no graph: the eager computation plus one copy into the buffer, so that code
  written against the GPU's contract runs unchanged.

What a graph holds: every product goes through ``_gemm.matmul``, which while recording calls cuBLAS
itself (CuPy refuses to under capture): ``cublasGemmEx`` for the 2-D products of a spine,
``cublasGemmStridedBatchedEx`` where a bracketing multiplies two per-sample stacks (``order="auto"``
splits an hourglass net at its bottleneck). Whatever still fails to record leaves ``"auto"`` running
eagerly — ``step.captured`` and ``step.capture_error`` tell. Not yet run on a GPU: the ``gpu`` tests
of ``tests/test_compiled_jacobian.py`` check replays against float64 NumPy where one is lent.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .step_io import IdentityBinding, StepIO, check_batch_and_capture, check_tokens_arg, param_binding
from ..core.validation import shape_str
from ..algebra.chain import ORDERS
from ..protocol.layer import anchor

__all__ = ["JacobianStep"]


class JacobianStep(IdentityBinding, StepIO):
    """``J = step(x)``: ``(batch, n_out, n_in)`` per-sample Jacobians (module docstring).

    net: an ``MLP`` or a ``Sequential`` on NumPy or CuPy. batch: B. order: ``"auto"``, ``"forward"``
    or ``"reverse"`` (``Chain.jacobian``). capture: ``"auto"``, ``True`` or ``False``. tokens: T of
    float token batches ``(B, T, n_in)`` (the Jacobians are then ``(B, T·n_out, T·n_in)``), or None.
    """

    _what = "Jacobian step"

    def __init__(self, net, batch: int, order: str = "auto", capture: Any = "auto", tokens: Any = None):
        if not hasattr(net, "jacobian_chain") or not hasattr(net, "forward"):
            raise TypeError(f"compile_jacobian compiles an MLP or a Sequential, not a {type(net).__name__}")
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {', '.join(ORDERS)}")
        xp, dt = net.xp, np.dtype(net.dtype)
        self._gpu = xp is not np
        self.batch = check_batch_and_capture(batch, capture, self._gpu)
        self._net, self._xp, self.order, self.dtype, self._capture = net, xp, order, dt, capture
        self.capture_error: str | None = None  # why capture="auto" fell back to running without a graph
        self._bound = param_binding(net)
        first = anchor(net.layers) if hasattr(net, "layers") else net.weights[0]
        self._device = first.device if self._gpu else None
        self.n_in, self.n_out = int(net.sizes[0]), int(net.sizes[-1])
        self.tokens = check_tokens_arg(tokens, "mse", False)
        if self.tokens is not None and hasattr(getattr(net, "layers", [None])[0], "check_tokens"):
            raise ValueError("compile_jacobian(tokens=T): the network takes integer token ids (an Embedding first), "
                             "which have no Jacobian; compile the layers after the embedding")
        self.in_shape = ((self.tokens, self.n_in) if self.tokens is not None else  # images: (C, H, W)
                         tuple(getattr(net, "in_shape", None) or (self.n_in,)))
        with self._on_device():
            self._x = xp.zeros((self.batch,) + self.in_shape, dtype=dt)
            self._graphs = self._graph_cache()
        self._out = None  # (B, n_out, n_in): made by the first (eager) run, before any capture

    def __call__(self, x, copy: bool = False):
        """``J: (batch, n_out, n_in)``, the per-sample Jacobians at ``x: (batch, n_in)`` (an image net's
        ``(batch, C, H, W)``, ``n_in = C·H·W``); the step's buffer unless ``copy=True``."""
        with self._exclusive():  # one call at a time, its copy-out included (``_step_io``)
            self._check_net()
            what = (f"{self.n_in} features" if len(self.in_shape) == 1 else f"T={self.tokens} × {self.n_in} features"
                    if self.tokens is not None else f"images {shape_str(self.in_shape)}")
            self._load(self._x, x, "x", f"batch {self.batch} × {what}: x must be {shape_str(self._x.shape)}")
            self._run_or_replay(False, self._run)
            return self._out.copy() if copy else self._out

    def _run(self, _labels: bool = False) -> None:
        net = self._net
        J = net.jacobian_chain(net.forward(self._x)[1]).jacobian(self.order)
        if J.ndim == 2:  # a chain with nothing per sample (linear layers): the same J for every row
            J = self._xp.broadcast_to(J, (self.batch,) + J.shape)
        if self._out is None:  # the first, eager run: never while a graph is being recorded
            self._out = self._xp.empty(J.shape, dtype=J.dtype)
        self._xp.copyto(self._out, J)

"""TrainingStep: a same-shape training step — forward, loss gradient, backward — with every
buffer allocated once, and on the GPU the whole step replayed as one captured CUDA graph.

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([4, 8, 3], seed=0)
    >>> step = net.compile(batch=2)                 # same as jg.compiled.TrainingStep(net, 2)
    >>> x, t = np.ones((2, 4)), np.zeros((2, 3))
    >>> loss, g = step(x, t)
    >>> ref_loss, ref = net.loss_and_grads(x, t)
    >>> bool(loss == ref_loss), all(np.array_equal(a, b) for a, b in zip(g.weights, ref.weights))
    (True, True)
    >>> for W, dW in zip(net.weights, g.weights):   # SGD in place: the next call sees it
    ...     W -= 0.1 * dW

The passes are ``MLP.forward`` / ``MLP.backward``'s own code (``_passes.forward_into`` and
``backward_into``: the same ``LayerJacobian`` factors and kernels, in the same order), so on
NumPy the numbers are bitwise those of ``net.loss_and_grads`` — for any memory layout of ``x``
and the target (C- or Fortran-ordered, strided): the step copies them into C-contiguous buffers
and ``loss_and_grads`` works on C-contiguous copies of them, so both run the same GEMMs on the
same layouts. What changes is where results go:

- buffers, made at construction: the static input ``x`` and target, per layer the saved
  activation (``y_j``, or ``h_j``, ``z_j`` and ``φ'(h_j)`` for activations whose φ' needs ``h``:
  one pass of ``kernels.forward_with_derivative`` writes the last two), the delta
  ``δ_j = ∂L/∂h_j`` (the running cotangent ``g_j`` is written straight into it and scaled in
  place, so no ping-pong pair is needed), ``∂L/∂W_j``, ``∂L/∂b_j``, the loss value (0-d), the
  loss gradient and its scratch, and ``∂L/∂x`` when ``input_grad``. Every operation writes with
  ``out=``; weights are read through views (``W.T``), never copied.
- returned arrays ARE those buffers: the loss (a 0-d array) and every array of the returned
  ``Gradients`` are overwritten in place by the next call (like the static outputs of a
  ``torch.cuda.CUDAGraph``); ``history.append(loss)`` collects the same array again and again.
  Keep a result with ``step(x, t, copy=True)`` or ``float(loss)``.
- threads: a step may be shared by threads. It holds a lock of its own for the whole of a
  call — loading ``x`` and the target, the run (or graph replay) and, with ``copy=True``, the
  copy-out — so concurrent calls queue and each caller gets the results of its own inputs;
  ``rebind()`` waits for a call in progress. **With ``copy=False`` (the default) the returned
  arrays are the buffers: the next call, from any thread, overwrites them in place, possibly
  while another thread is still reading them.** Threads sharing a step pass ``copy=True`` (or
  each uses a step of its own). On the GPU each call also waits, on the device, for the previous
  call's work, whichever stream that went to.
- weights and biases are read by reference: in-place updates (``W -= lr * dW``) are seen by the
  next call. Replacing an array (``net.weights[j] = new``) or an activation
  (``net.activations[j] = "relu"``) is detected on the next call and raises ``RuntimeError``;
  call ``step.rebind()`` to adopt them (it re-captures on the GPU).

On CuPy with ``capture="auto"`` or ``True``, the first call for a target kind runs eagerly (warm-up:
NVRTC compiles the kernels, cuBLAS initialises; that call's results come from it), then the step is
captured on a private non-blocking stream (see ``_cuda_graph.py``); later calls copy ``x`` and the
target into the static buffers and launch the graph, both on the caller's current stream. CuPy (up
to 14.2 at least) refuses its own cuBLAS calls on a capturing stream, so while recording, the
step's GEMMs call cuBLAS directly (``_gemm.direct_cublas``). Should the capture still fail, with
``"auto"`` the step runs with its buffers but without a graph from that call on (``step.captured``
turns False, ``step.capture_error`` says why); ``capture=True`` raises
``jacgrad._cuda_graph.CaptureError``. No call synchronises with the host; the loss stays a 0-d
device array. One exception: integer labels of ``softmax_cross_entropy`` given as a CuPy array are
range-checked on the host (one sync); pass probability rows to avoid it. ``capture=True`` on a
NumPy network is a ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import losses
from ._loss_workspace import LossWorkspace
from ._passes import Gradients, backward_into, carve, carve_gradients, forward_into, grad_views
from ._private_step import PrivatePart, check_clip_args
from ._step_io import StepIO, check_rebound, check_step_args, locked
from .activations import get as get_activation
from .jacobian import LayerJacobian

__all__ = ["TrainingStep"]


class TrainingStep(StepIO):
    """``loss, grads = step(x, target)`` for a fixed batch: see the module docstring.

    The returned ``loss`` and ``grads`` are the step's own buffers: the next call overwrites
    them in place (``copy=True`` returns fresh arrays instead).

    net: an ``MLP`` on NumPy or CuPy (read through its ``weights``, ``biases`` and
    ``activations`` lists, one entry per dense layer, and ``xp``, ``sizes``, ``dtype``; this
    module does not import ``mlp``). batch: B. loss: ``mse``, ``sigmoid_bce`` or
    ``softmax_cross_entropy``. capture: ``"auto"`` (a CUDA graph on the GPU where CuPy can record
    one, else buffers only), ``True`` (GPU only; a failed capture raises), ``False``. input_grad:
    also compute ``∂L/∂x: (B, n_in)``. clip, noise_multiplier, seed, expected_batch_size: a
    private (DP-SGD) step, ``(loss, jacgrad.private.ClippedGradients)`` per call — see
    ``jacgrad._private_step`` (how the noise is drawn, the batch-size rule).
    """

    def __init__(self, net, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = False,
                 clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None):
        if not all(hasattr(net, a) for a in ("weights", "biases", "activations", "xp", "sizes", "dtype")):
            raise TypeError(f"TrainingStep compiles an MLP (weights, biases and activations lists), not a {type(net).__name__}")
        xp = net.xp
        self._gpu = xp is not np
        batch = check_step_args(batch, loss, capture, self._gpu)
        loss = losses.canonical(loss)  # torch's alias names the same loss
        self.clip, sigma = check_clip_args(clip, noise_multiplier, expected_batch_size)
        if self.clip is not None and input_grad:
            raise ValueError("a private step (clip=C) returns no ∂L/∂x: compile it with input_grad=False")
        self._net, self._xp, self.batch, self.loss, self.input_grad = net, xp, int(batch), loss, bool(input_grad)
        self._capture = capture
        self.capture_error: str | None = None  # why capture="auto" fell back to running without a graph
        sizes, dt, B = net.sizes, net.dtype, self.batch
        self.dtype = dt
        self._device = net.weights[0].device if self._gpu else None
        with self._on_device():
            self._x = xp.zeros((B, sizes[0]), dtype=dt)
            _, self._saved = carve(xp, [(B, H) for H in sizes[1:]], dt, zero=True)  # y_j, or h_j
            self._z = [None] * len(self._saved)  # z_j and φ'(h_j) beside h_j: made by rebind, where the
            self._d = [None] * len(self._saved)  # activation needs h for its derivative
            _, self._delta = carve(xp, [(B, H) for H in sizes[1:]], dt, zero=True)
            self._flat, self._dW, self._db = carve_gradients(xp, net.weights, dt, zero=True)
            self._gin = xp.zeros((B, sizes[0]), dtype=dt) if self.input_grad else None
            self._loss = LossWorkspace(loss, xp, (B, sizes[-1]), dt)
            self._target = xp.zeros((B, sizes[-1]), dtype=dt)
            self._graphs = self._graph_cache()  # its capture stream lives on the weights' device
            self._private = None if self.clip is None else PrivatePart(
                xp, self._flat.size, B, dt, self.clip, sigma, seed, expected_batch_size)
            self._pviews = None if self._private is None else list(zip(*grad_views(self._private.sum, net.weights)))
        self.rebind()

    # ------------------------------------------------------------------ binding
    @locked
    def rebind(self) -> None:
        """Adopt the arrays now in ``net.weights`` / ``net.biases`` (same shapes, dtype and device)
        and the names now in ``net.activations``, rebuild the layer factors and drop captured graphs
        (the next call re-captures)."""
        net, K = self._net, len(self._dW)
        if len(net.activations) != K:
            raise ValueError(f"the network now has {len(net.activations)} activations; this step was compiled for {K} layers")
        acts = [get_activation(a) for a in net.activations]
        if len(net.weights) != K or len(net.biases) != K:
            raise ValueError(f"the network now has {len(net.weights)} layers; this step was compiled for {K}")
        for j, (W, b, dW, db) in enumerate(zip(net.weights, net.biases, self._dW, self._db)):
            for what, new, old in (("weights", W, dW), ("biases", b, db)):
                check_rebound(f"net.{what}[{j}]", new, old, self._gpu, self._device)
        self._W, self._b = list(net.weights), list(net.biases)
        self._acts, self._act_names = acts, [a.name for a in acts]
        self._from_output = [a.df_from_output is not None for a in acts]
        with self._on_device():
            for j, (s, fo) in enumerate(zip(self._saved, self._from_output)):
                if fo:
                    self._z[j] = self._d[j] = None
                elif self._z[j] is None:
                    self._z[j], self._d[j] = self._xp.zeros_like(s), self._xp.zeros_like(s)
        self._factors = [  # φ' from the saved output, or the φ'(h_j) the forward pass wrote beside z_j
            LayerJacobian.from_activation(act, W, y=s) if fo else LayerJacobian(d, W)
            for act, W, s, d, fo in zip(self._acts, self._W, self._saved, self._d, self._from_output)
        ]
        if self._graphs is not None:
            self._graphs.clear()

    def _check_binding(self) -> None:
        ws, bs = self._net.weights, self._net.biases
        if len(ws) == len(self._W) and len(bs) == len(self._b):
            if all(a is b for a, b in zip(ws, self._W)) and all(a is b for a, b in zip(bs, self._b)):
                names = list(self._net.activations)
                if names == self._act_names:
                    return
                if len(names) != len(self._act_names):
                    raise RuntimeError(f"the network now has {len(names)} activations; this step was compiled for "
                                       f"{len(self._act_names)} layers: compile a new step")
                j = next(j for j, (a, b) in enumerate(zip(names, self._act_names)) if a != b)
                now = repr(names[j])
                raise RuntimeError(
                    f"net.activations[{j}] is now {now} but this step was compiled with "
                    f"{self._act_names[j]!r}: call step.rebind() to adopt it"
                )
        what, j = next(
            ((what, j) for what, now, old in (("weights", ws, self._W), ("biases", bs, self._b))
             for j in range(max(len(now), len(old))) if j >= len(now) or j >= len(old) or now[j] is not old[j]),
        )
        raise RuntimeError(
            f"net.{what}[{j}] is no longer the array this step was compiled with. The step reads weights by "
            f"reference: update them in place (W -= lr * dW, W[...] = new), or call step.rebind() after replacing them"
        )

    # ------------------------------------------------------------------ the call
    def __call__(self, x: Any, target: Any, copy: bool = False):
        """``(loss, Gradients)`` of one batch: ``x (B, n_in)``, ``target`` as for the loss.

        The results are this step's buffers, overwritten in place by the next call — from any
        thread — unless ``copy=True`` (then fresh arrays the step never touches again, copied
        before the step's lock is released: threads sharing a step pass ``copy=True``).
        ``x`` is cast to the network's dtype like ``MLP.forward`` does; ``Gradients.input`` is
        None unless compiled with ``input_grad=True``.
        """
        return self._step(x, target, copy)

    def _run(self, labels: bool) -> None:
        """Forward, loss, backward: every result into its buffer (MLP.forward / MLP.backward's order)."""
        z = forward_into(self._x, self._W, self._b, self._acts, self._saved, self._z, ds=self._d)
        self._loss(z, self._target, labels=labels)
        if self._private is not None:  # one reverse sweep to the clipped sums: no mean gradient
            inputs = [self._layer_input(j - 1)[0] for j in range(len(self._factors))]
            self._private.run(self._factors, inputs, self._loss.grad, self._pviews)
            return
        backward_into(self._factors, self._loss.grad, self._layer_input, self._dW, self._db, self._delta, self._gin)

    def _layer_input(self, j: int):
        """``(z_j, None)`` (``x`` for ``j = -1``): the saved output, or its buffer beside ``h_j``."""
        if j < 0:
            return self._x, None
        return (self._saved[j] if self._from_output[j] else self._z[j]), None

    def _results(self, copy: bool):
        if self._private is not None:
            frac, std = self._private.finish(self._flat)  # the noise: drawn after the graph, every call
            flat = self._flat.copy() if copy else self._flat
            dW, db = grad_views(flat, self._W) if copy else (list(self._dW), list(self._db))
            loss = self._loss.value.copy() if copy else self._loss.value
            return loss, self._private.results(Gradients(dW, db, None, None, flat), frac, std, copy)
        if not copy:
            return self._loss.value, Gradients(list(self._dW), list(self._db), self._gin, list(self._delta), self._flat)
        flat = self._flat.copy()
        dW, db = grad_views(flat, self._W)
        gin = None if self._gin is None else self._gin.copy()
        return self._loss.value.copy(), Gradients(dW, db, gin, [d.copy() for d in self._delta], flat)

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the step owns (the weights are the network's)."""
        arrays = [self._x, self._target, *self._saved, *self._delta, self._flat]
        arrays += [a for a in self._z + self._d if a is not None] + ([self._gin] if self.input_grad else [])
        return int(sum(a.nbytes for a in arrays)) + self._loss.nbytes + (self._private.nbytes if self._private else 0)

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.captured else "buffers"
        return f"TrainingStep({self._net!r}, batch={self.batch}, loss={self.loss!r}, {mode}, {self.nbytes} bytes)"

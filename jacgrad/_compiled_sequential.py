"""SequentialStep: ``Sequential.compile`` — the same-shape training step of ``MLP.compile``
(``jacgrad.compiled.TrainingStep``) for a network of blocks (Dense, Residual, LayerNorm, RMSNorm).

    >>> import numpy as np, jacgrad as jg
    >>> L, rng = jg.layers, np.random.default_rng(0)
    >>> net = jg.Sequential([L.Dense(rng.standard_normal((4, 8)) / 2, None, "tanh"),
    ...                      L.Residual([L.LayerNorm(np.ones(8)), L.Dense(rng.standard_normal((8, 8)) / 3)]),
    ...                      L.Dense(rng.standard_normal((8, 3)) / 3)])
    >>> step = net.compile(batch=2)
    >>> x, t = np.ones((2, 4)), np.zeros((2, 3))
    >>> loss, g = step(x, t)
    >>> ref_loss, ref = net.loss_and_grads(x, t)
    >>> bool(loss == ref_loss), np.array_equal(g.flat, ref.flat), sorted(g.layers[1][0])
    (True, True, ['beta', 'gamma'])
    >>> W = net.layers[0].W
    >>> W -= 0.1 * g.layers[0]["W"]                  # SGD in place: the next call sees it

The passes are ``Sequential.forward`` / ``backward``'s own (``_block_passes.forward_layers`` and
``backward_layers``: every layer's ``forward``/``backward`` with ``out=`` buffers), so on NumPy
the numbers are bitwise those of ``net.loss_and_grads``. As for ``TrainingStep``:

- buffers, made at construction: ``x`` and the target, every layer's forward buffers (outputs,
  the states backward reads: ``h``/``y``, ``x̂``, ``1/σ``), its backward buffers (δ, the
  cotangents between layers, the norms' scratch), the parameter gradients (one flat block),
  the loss value and gradient, and ``∂L/∂x`` with ``input_grad``.
- returned arrays ARE those buffers (the loss a 0-d array, every array of the ``BlockGradients``):
  the next call overwrites them in place; ``step(x, t, copy=True)`` returns fresh arrays.
- one call at a time: a lock per step, held for the whole call (copy-out included): threads
  sharing a step queue, each gets its own inputs' results if it passes ``copy=True``; with
  ``copy=False`` the next call from any thread overwrites the buffers handed back.
- parameters are read by reference: in-place updates (``W -= lr * dW``) are seen by the next
  call. A parameter array replaced in a layer (or a layer replaced in the network) is detected on
  the next call and raises ``RuntimeError`` naming it; ``step.rebind()`` adopts it.
- on CuPy the step is captured as a CUDA graph, replayed from the second call of a target kind
  (``jacgrad._cuda_graph``, cuBLAS called directly while recording, ``_gemm``), with the same
  ``capture="auto"`` fallback (``step.capture_error``) and ``capture=True`` errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._passes import Gradients
from ._block_passes import backward_layers, carve_backward, carve_forward, forward_layers, named_grads
from ._block_passes import param_views
from . import losses
from ._loss_workspace import LossWorkspace
from ._passes import carve
from ._private_step import PrivatePart, check_clip_args
from ._sequential_param_space import leaf_inputs, leaf_views
from ._step_io import StepIO, check_rebound, check_step_args, locked
from .layers import named_params

__all__ = ["SequentialStep"]


class SequentialStep(StepIO):
    """``loss, grads = step(x, target)`` for a fixed batch: see the module docstring.

    net: a ``Sequential`` on NumPy or CuPy (read through its ``layers``, ``xp``, ``dtype``,
    ``n_in`` and ``n_out``; this module does not import ``sequential``). batch: B. loss: ``mse``,
    ``sigmoid_bce`` or ``softmax_cross_entropy``. capture: ``"auto"``, ``True`` or ``False`` as for
    ``MLP.compile``. input_grad: also compute ``∂L/∂x: (B, n_in)``. clip, noise_multiplier, seed,
    expected_batch_size: a private (DP-SGD) step, ``(loss, jacgrad.private.ClippedGradients)`` per
    call, without ``∂L/∂x`` whatever ``input_grad`` says — see ``jacgrad._private_step``.
    """

    def __init__(self, net, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = True,
                 clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None):
        if not all(hasattr(net, a) for a in ("layers", "xp", "dtype", "n_in", "n_out")) or hasattr(net, "weights"):
            raise TypeError(f"SequentialStep compiles a Sequential (a tuple of layers), not a {type(net).__name__}")
        xp = net.xp
        self._gpu = xp is not np
        self.batch = check_step_args(batch, loss, capture, self._gpu)
        loss = losses.canonical(loss)  # torch's alias names the same loss
        self.clip, sigma = check_clip_args(clip, noise_multiplier, expected_batch_size)
        if self.clip is not None:
            input_grad = False  # a private step returns no ∂L/∂x
        self._net, self._xp, self.loss, self.input_grad = net, xp, loss, bool(input_grad)
        self._capture = capture
        self.capture_error: str | None = None  # why capture="auto" fell back to running without a graph
        layers, dt, B = tuple(net.layers), net.dtype, self.batch
        self.dtype = dt
        self._layers = layers
        self._device = layers[0].params[0].device if self._gpu else None
        with self._on_device():
            self._x = xp.zeros((B, net.n_in), dtype=dt)
            self._target = xp.zeros((B, net.n_out), dtype=dt)
            self._fbufs = carve_forward(xp, layers, B, dt, zero=True)
            _, self._bbufs = carve_backward(xp, layers, B, dt, self.input_grad, grad_y=False, zero=True)
            self._flat, views = carve(xp, [tuple(p.shape) for _, p in named_params(layers)], dt, zero=True)
            self._grads = param_views(layers, views)
            self._loss = LossWorkspace(loss, xp, (B, net.n_out), dt)
            self._graphs = self._graph_cache()
            self._private = None if self.clip is None else PrivatePart(
                xp, self._flat.size, B, dt, self.clip, sigma, seed, expected_batch_size)
            self._pviews = None if self._private is None else leaf_views(layers, self._private.sum)
        self._gin, self._deltas = None, None  # which buffers: set by the first (eager) run
        self._layout = [self._buffer_layout(L) for L in layers]
        self.rebind()

    def _buffer_layout(self, layer) -> tuple:
        """What this step's buffers depend on: the layer's kind, the shapes it writes and its number of
        parameters (their shapes are checked one by one, with their names, by ``rebind``)."""
        B = self.batch
        return type(layer), tuple(layer.forward_shapes(B)), tuple(layer.backward_shapes(B, True)), len(layer.params)

    # ------------------------------------------------------------------ binding
    @locked
    def rebind(self) -> None:
        """Adopt the parameter arrays now in the network's layers (same shapes, dtype and device)
        and drop captured graphs (the next call re-captures)."""
        layers = tuple(self._net.layers)
        params = named_params(layers)
        grads = [g for per in self._grads for g in per]  # shaped as the parameters this step was compiled for
        if len(params) != len(grads):
            raise ValueError(f"the network now has {len(params)} parameter arrays; this step was compiled for "
                             f"{len(grads)}: compile a new step")
        for (where, p), q in zip(params, grads):
            check_rebound(where, p, q, self._gpu, self._device)
        if [self._buffer_layout(L) for L in layers] != self._layout:
            raise ValueError(f"the network's layers are now {list(layers)!r}, whose buffers differ from those this "
                             f"step was compiled for: compile a new step")
        self._layers, self._params = layers, params
        if self._graphs is not None:
            self._graphs.clear()

    def _check_binding(self) -> None:
        layers = self._net.layers
        if len(layers) == len(self._layers) and all(a is b for a, b in zip(layers, self._layers)):
            now = [p for L in layers for p in L.params]
            if len(now) == len(self._params) and all(a is b for a, (_, b) in zip(now, self._params)):
                return
            where = next(w for (w, p), (_, q) in zip(named_params(layers), self._params) if p is not q)
            raise RuntimeError(
                f"{where} is no longer the array this step was compiled with. The step reads parameters by "
                f"reference: update them in place (W -= lr * dW, gamma[...] = new), or call step.rebind() after "
                f"replacing them")
        j = next((j for j, (a, b) in enumerate(zip(layers, self._layers)) if a is not b), min(len(layers), len(self._layers)))
        raise RuntimeError(f"layer {j} of the network is no longer the layer this step was compiled with: call "
                           f"step.rebind() to adopt it, or compile a new step")

    # ------------------------------------------------------------------ the call
    def __call__(self, x: Any, target: Any, copy: bool = False):
        """``(loss, BlockGradients)`` of one batch: ``x (B, n_in)``, ``target`` as for the loss.

        The results are this step's buffers, overwritten in place by the next call, unless
        ``copy=True`` (then fresh arrays the step never touches again). ``x`` is cast to the
        network's dtype like ``Sequential.forward`` does; ``BlockGradients.input`` is None unless
        compiled with ``input_grad=True``.
        """
        return self._step(x, target, copy)

    def _run(self, labels: bool) -> None:
        """Forward, loss, backward: every result into its buffer (Sequential's own passes)."""
        z, states = forward_layers(self._layers, self._x, self._fbufs)
        self._loss(z, self._target, labels=labels)
        if self._private is not None:  # one reverse sweep to the clipped sums: no mean gradient
            factors = [L.factor(st) for L, st in zip(self._layers, states)]
            self._private.run(factors, leaf_inputs(self._layers, states), self._loss.grad, self._pviews)
            return
        self._gin, self._deltas = backward_layers(self._layers, states, self._loss.grad, self._grads, self._bbufs,
                                                  self.input_grad)

    def _results(self, copy: bool):
        if self._private is not None:
            frac, std = self._private.finish(self._flat)  # the noise: drawn after the graph, every call
            flat = self._flat.copy() if copy else self._flat
            named = named_grads(self._layers, param_views(self._layers, _views(flat, self._params)))
            loss = self._loss.value.copy() if copy else self._loss.value
            return loss, self._private.results(Gradients(layers=named, flat=flat), frac, std, copy)
        if not copy:
            named = named_grads(self._layers, self._grads)
            return self._loss.value, Gradients(layers=named, input=self._gin, deltas=list(self._deltas), flat=self._flat)
        flat = self._flat.copy()
        named = named_grads(self._layers, param_views(self._layers, _views(flat, self._params)))
        gin = None if self._gin is None else self._gin.copy()
        return self._loss.value.copy(), Gradients(layers=named, input=gin, deltas=[d.copy() for d in self._deltas], flat=flat)

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the step owns (the parameters are the network's)."""
        arrays = [self._x, self._target, self._flat] + [a for bufs in self._fbufs + self._bbufs for a in bufs]
        return int(sum(a.nbytes for a in arrays)) + self._loss.nbytes + (self._private.nbytes if self._private else 0)

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.captured else "buffers"
        return f"SequentialStep({self._net!r}, batch={self.batch}, loss={self.loss!r}, {mode}, {self.nbytes} bytes)"


def _views(flat, params) -> list:
    """Views of ``flat`` shaped as ``params`` (``[(where, array)]``), in order."""
    at, views = 0, []
    for _, p in params:
        views.append(flat[at:at + p.size].reshape(p.shape))
        at += p.size
    return views

"""TrainingStep: the one compiled training step of ``MLP.compile`` and ``Sequential.compile`` —
forward, loss gradient, backward for a fixed batch — with every buffer allocated once, and on the
GPU the whole step replayed as one captured CUDA graph. ``SequentialStep`` is another name for it.

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

Token batches: ``net.compile(B, tokens=T)`` makes the buffers ``(B, T, ·)``: ``x (B, T, n_in)``
floats, or ``(B, T)`` integer ids where an ``Embedding`` comes first (checked by that layer and
copied as they are, never cast), and targets ``(B, T, n_out)`` (mse, sigmoid_bce: softmax
cross-entropy takes ``(B, C)`` logits). Everything below holds for them too, the private step included.

The passes are every layer's own ``forward``/``backward`` with ``out=`` buffers
(``_block_passes.forward_layers`` / ``backward_layers``, as ``Sequential`` runs them; a Dense
layer runs ``_passes.dense_forward`` / ``dense_backward``, ``MLP``'s per-layer code), so on
NumPy the numbers are bitwise those of ``net.loss_and_grads`` — for any memory layout of ``x``
and the target (C- or Fortran-ordered, strided): the step copies them into C-contiguous buffers
and ``loss_and_grads`` works on C-contiguous copies of them, so both run the same GEMMs on the
same layouts. What changes is where results go:

- buffers, made at construction: the static input ``x`` and target, every layer's forward
  buffers (a Dense: ``y_j``, or ``h_j``, ``z_j`` and ``φ'(h_j)`` for activations whose φ' needs
  ``h``: one pass of ``kernels.forward_with_derivative`` writes the last two, ``Dense.forward_shapes
  (keep_derivative=True)``; a norm: ``x̂``, ``1/σ``), its backward buffers (a Dense's delta
  ``δ_j = ∂L/∂h_j``: the cotangent ``g_j`` is written straight into it and scaled in place,
  ``carve_backward(in_place=True)``), the parameter gradients (one flat block), the loss value
  (0-d), the loss gradient and its scratch, and ``∂L/∂x`` when ``input_grad``. Every operation
  writes with ``out=``; weights are read through views (``W.T``), never copied.
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
- shared parameters (one array in several layers, or a 2-D array and its transpose: ``protocol.sharing``):
  each layer writes its use's gradient into its own buffer and the recorded part sums them into one
  block ``(P,)`` (``Ties.reduce``, as ``net.backward``), so the gradients are still bitwise
  ``loss_and_grads``'; every use's view in ``Gradients`` is of that sum. ``step.param_pairs(g)``:
  each parameter once with its gradient, what an update loops over (a loop over ``net.weights``
  would update a shared array once per use).
- parameters are read by reference: in-place updates (``W -= lr * dW``) are seen by the next
  call. Replacing an array (``net.weights[j] = new``, a layer's ``gamma``), an activation
  (``net.activations[j] = "relu"``) or a layer is detected on the next call and raises
  ``RuntimeError`` naming it; call ``step.rebind()`` to adopt them (it re-captures on the GPU).
  A net read through its lists (``MLP``, or any object with ``weights``, ``biases``,
  ``activations``, ``xp``, ``sizes`` and ``dtype``) may change an activation: ``rebind`` re-carves
  the forward buffers; a replaced layer of a ``Sequential`` must write the buffers it replaces.

On CuPy with ``capture="auto"`` or ``True``, the first call for a target kind runs eagerly (warm-up:
NVRTC compiles the kernels, cuBLAS initialises; that call's results come from it), then the step is
captured on a private non-blocking stream (see ``cuda/graphs.py``); later calls copy ``x`` and the
target into the static buffers and launch the graph, both on the caller's current stream. CuPy (up
to 14.2 at least) refuses its own cuBLAS calls on a capturing stream, so while recording, the
step's GEMMs call cuBLAS directly (``_gemm.direct_cublas``). Should the capture still fail, with
``"auto"`` the step runs with its buffers but without a graph from that call on (``step.captured``
turns False, ``step.capture_error`` says why); ``capture=True`` raises
``jacgrad.cuda.graphs.CaptureError``. No call synchronises with the host; the loss stays a 0-d
device array. One exception: integer labels of ``softmax_cross_entropy`` given as a CuPy array are
range-checked on the host (one sync); pass probability rows to avoid it. ``capture=True`` on a
NumPy network is a ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..nn import losses
from ..nn.stack import (
    Plan,
    backward_layers,
    carve_backward,
    carve_forward,
    forward_layers,
    layer_leads,
    named_grads,
    param_views,
)
from ..nn.loss_workspace import LossWorkspace
from ..protocol.passes import Gradients, carve
from .private_step import PrivatePart, check_clip_args
from ..params.leaf_views import leaf_inputs, leaf_views, shared_group
from ..core.renamed import renamed
from ..core.validation import ids_checked
from .net_binding import LISTS as _LISTS, bound_params as _bound, copied as _copied, ties_of as _ties
from .step_io import StepIO, check_rebound, check_step_args, check_ties, check_tokens_arg, locked
from ..protocol.layer import lead_shape
from ..elementwise.activations import get as get_activation
from ..nn.layers import Dense

__all__ = ["TrainingStep"]

class TrainingStep(StepIO):
    """``loss, grads = step(x, target)`` for a fixed batch: see the module docstring.

    The returned ``loss`` and ``grads`` are the step's own buffers: the next call overwrites
    them in place (``copy=True`` returns fresh arrays instead).

    net: an ``MLP`` (or any net with ``weights``, ``biases`` and ``activations`` lists and ``xp``,
    ``sizes``, ``dtype``) or a ``Sequential`` (its ``layers``, ``xp``, ``dtype``, ``n_in``,
    ``n_out``), on NumPy or CuPy; this module imports neither. batch: B. loss: ``mse``,
    ``sigmoid_bce`` or ``softmax_cross_entropy``. capture: ``"auto"`` (a CUDA graph on the GPU where
    CuPy can record one, else buffers only), ``True`` (GPU only; a failed capture raises),
    ``False``. input_grad: also compute ``∂L/∂x: (B, n_in)``. clip, noise_multiplier, seed,
    expected_batch_size: a private (DP-SGD) step, ``(loss, jacgrad.params.private.ClippedGradients)`` per
    call, without ``∂L/∂x`` — see ``jacgrad.steps.private_step`` (how the noise is drawn, the batch-size rule).
    """

    def __init__(self, net, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = False,
                 clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None,
                 tokens: Any = None):
        lists = all(hasattr(net, a) for a in _LISTS)
        if not lists and not all(hasattr(net, a) for a in ("layers", "xp", "dtype", "n_in", "n_out")):
            raise TypeError(f"TrainingStep compiles an MLP (weights, biases and activations lists) or a Sequential "
                            f"(a tuple of layers), not a {type(net).__name__}")
        xp = net.xp
        self._gpu = xp is not np
        batch = check_step_args(batch, loss, capture, self._gpu)
        loss = losses.canonical(loss)  # torch's alias names the same loss
        self.tokens = check_tokens_arg(tokens, loss, lists and not hasattr(net, "layers"), getattr(net, "layers", None))
        self.clip, sigma = check_clip_args(clip, noise_multiplier, expected_batch_size)
        if self.clip is not None and input_grad:
            raise ValueError("a private step (clip=C) returns no ∂L/∂x: compile it with input_grad=False")
        self._net, self._xp, self.batch, self.loss, self.input_grad = net, xp, int(batch), loss, bool(input_grad)
        self._capture = capture
        self.capture_error: str | None = None  # why capture="auto" fell back to running without a graph
        dt = net.dtype
        B = self._lead = self.batch if self.tokens is None else (self.batch, self.tokens)  # buffers' leading dims
        self.dtype = dt
        layers, params, _ = _bound(net)
        self._ties = ties = _ties(params)
        if layers is None:
            layers = tuple(Dense(p, q, a) for (_, p), (_, q), a in zip(params[0::2], params[1::2], net.activations))
        n_in, n_out = layers[0].n_in, layers[-1].n_out
        self._device = params[0][1].device if self._gpu else None
        # token ids (an Embedding first: its check_tokens) are loaded as they are, never cast to float
        self._ids = getattr(layers[0], "check_tokens", None) if self.tokens is not None else None
        in_shape = tuple(getattr(layers[0], "in_shape", None) or (n_in,))  # images: (B, C, H, W)
        with self._on_device():
            self._x = xp.zeros(lead_shape(B) + (() if self._ids else in_shape), dtype=xp.int64 if self._ids else dt)
            self._target = xp.zeros(lead_shape(layer_leads(layers, B)[-1]) + (n_out,), dtype=dt)
            self._fbufs = carve_forward(xp, layers, B, dt, zero=True, keep_derivative=True)
            _, self._bbufs = carve_backward(xp, layers, B, dt, self.input_grad, grad_y=False, zero=True, in_place=True)
            self._flat, views = carve(xp, ties.use_shapes, dt, zero=True)  # every use's gradient, as backward writes it
            self._grads = param_views(layers, views)
            # the results: each parameter once (a shared one the sum of its uses', as net.backward's ``reduce``)
            self._out = xp.zeros(ties.n_params, dtype=dt) if ties.shared else self._flat
            self._outs = (param_views(layers, ties.use_views(ties.param_views(self._out))) if ties.shared
                          else self._grads)
            self._loss = LossWorkspace(loss, xp, self._target.shape, dt)
            self._graphs = self._graph_cache()  # its capture stream lives on the parameters' device
            self._private = None if self.clip is None else PrivatePart(
                xp, ties.n_params, self.batch, dt, self.clip, sigma, seed, expected_batch_size)
            self._pviews = None if self._private is None else leaf_views(layers, self._private.sum, ties)
        self._gin, self._deltas, self._act_names = None, None, None  # which buffers: set by each run
        self._layers, self._layout = layers, self._buffer_layouts(layers)
        self.rebind()

    def _buffer_layouts(self, layers) -> list:
        """What the step's buffers depend on, per layer: its kind, the shapes it writes (with its own
        input's lead: a layer may change the token axis) and its number of parameters (their shapes
        are checked one by one, with their names, by ``rebind``)."""
        return [(type(L), tuple(L.forward_shapes(B)), tuple(L.backward_shapes(B, True)), len(L.params))
                for L, B in zip(layers, layer_leads(layers, self._lead))]

    # ------------------------------------------------------------------ binding
    @locked
    def rebind(self) -> None:
        """Adopt the parameter arrays now in the network (same shapes, dtype and device), its layers
        and, for a net of lists, the names now in ``net.activations``; drop captured graphs (the next
        call re-captures)."""
        layers, params, names = _bound(self._net)
        grads = [g for per in self._grads for g in per]  # shaped as the parameters this step was compiled for
        if names is not None and len(names) != len(self._grads):
            raise ValueError(f"the network now has {len(names)} activations; this step was compiled for "
                             f"{len(self._grads)} layers")
        if len(params) != len(grads) or any(p is None for _, p in params):
            what = "layers" if names is not None else "parameter arrays"
            n = len(params) // 2 if names is not None else len(params)
            m = len(grads) // 2 if names is not None else len(grads)
            raise ValueError(f"the network now has {n} {what}; this step was compiled for {m}: compile a new step")
        for (where, p), q in zip(params, grads):
            check_rebound(where, p, q, self._gpu, self._device)
        ties = _ties(params)
        check_ties(self._ties, ties)
        if names is not None:
            acts = [get_activation(a) for a in names]
            if layers is None:  # a duck-typed net of lists: Dense layers on its very arrays
                layers = tuple(Dense(p, q, a) for (_, p), (_, q), a in zip(params[0::2], params[1::2], acts))
            layout = self._buffer_layouts(layers)
            if layout != self._layout:  # an activation changed what the forward pass keeps
                with self._on_device():
                    self._fbufs = carve_forward(self._xp, layers, self._lead, self.dtype, zero=True, keep_derivative=True)
                self._layout = layout
            self._act_names = [a.name for a in acts]
        elif self._buffer_layouts(layers) != self._layout:
            raise ValueError(f"the network's layers are now {list(layers)!r}, whose buffers differ from those this "
                             f"step was compiled for: compile a new step")
        self._layers, self._params, self._ties = layers, params, ties
        self._factors = None  # made by the next run
        group = shared_group(layers, ties) if self._private is not None else None
        self._shared = None if group is None else (group, ties.param_views(self._private.sum))
        self._plan = Plan(layers, self._lead)  # each layer's passes at this lead (a per-token layer's rows on (B, n))
        self._W = [p for _, p in params]  # every call's check: the arrays by identity
        # every layer's parameters (W, b), as Gradients.weights/.biases read them: (∂W list, ∂b list), every call's views
        dense = all(tuple(L.names) == ("W", "b") and not hasattr(L, "layers") for L in layers)
        self._dense = ([g[0] for g in self._outs], [g[1] for g in self._outs]) if dense else None
        if self._graphs is not None:
            self._graphs.clear()

    def _check_binding(self) -> None:
        net = self._net
        if self._act_names is not None:  # a net of lists: as many arrays, the very ones, and the same names
            ws, bs, W = net.weights, net.biases, self._W
            if (len(ws) * 2 == len(bs) * 2 == len(W) and all(a is b for a, b in zip(ws, W[0::2]))
                    and all(a is b for a, b in zip(bs, W[1::2])) and list(net.activations) == self._act_names):
                return
        else:  # a Sequential: the very layers, holding the very arrays
            layers, now = net.layers, [p for L in self._layers for p in L.params]
            if (len(layers) == len(self._layers) and all(a is b for a, b in zip(layers, self._layers))
                    and len(now) == len(self._W) and all(a is b for a, b in zip(now, self._W))):
                return
        layers, params, names = _bound(net)  # something changed: name it
        if names is None and (len(layers) != len(self._layers) or any(a is not b for a, b in zip(layers, self._layers))):
            j = next((j for j, (a, b) in enumerate(zip(layers, self._layers)) if a is not b),
                     min(len(layers), len(self._layers)))
            raise RuntimeError(f"layer {j} of the network is no longer the layer this step was compiled with: call "
                               f"step.rebind() to adopt it, or compile a new step")
        where = next((w for (w, p), (_, q) in zip(params, self._params) if p is not q), None)
        if where is None and len(params) != len(self._params):  # an array more or fewer
            where = (params[len(self._params)] if len(params) > len(self._params) else self._params[len(params)])[0]
        if where is None:  # the very arrays: an activation changed
            if len(names) != len(self._act_names):
                raise RuntimeError(f"the network now has {len(names)} activations; this step was compiled for "
                                   f"{len(self._act_names)} layers: compile a new step")
            j = next(j for j, (a, b) in enumerate(zip(names, self._act_names)) if a != b)
            raise RuntimeError(f"net.activations[{j}] is now {names[j]!r} but this step was compiled with "
                               f"{self._act_names[j]!r}: call step.rebind() to adopt it")
        raise RuntimeError(
            f"{where} is no longer the array this step was compiled with. The step reads parameters by reference: "
            f"update them in place (W -= lr * dW, W[...] = new), or call step.rebind() after replacing them")

    # ------------------------------------------------------------------ the call
    def __call__(self, x: Any, target: Any, copy: bool = False):
        """``(loss, Gradients)`` of one batch: ``x (B, n_in)``, ``target`` as for the loss.

        The results are this step's buffers, overwritten in place by the next call — from any
        thread — unless ``copy=True`` (then fresh arrays the step never touches again, copied
        before the step's lock is released: threads sharing a step pass ``copy=True``).
        ``x`` is cast to the network's dtype like ``forward`` does; ``Gradients.input`` is
        None unless compiled with ``input_grad=True``.
        """
        return self._step(x, target, copy)

    def _run(self, labels: bool) -> None:
        """Forward, loss, backward: every result into its buffer (the network's own passes)."""
        with ids_checked():  # token ids were checked at load (the Embedding's own check): no read while recording
            z, states = forward_layers(self._layers, self._x, self._fbufs, plan=self._plan)
        self._loss(z, self._target, labels=labels)
        if self._factors is None:  # the states are the same buffers every call: a factor that reads them by
            # reference (``reusable_factor``: a Dense's) is made once (on token batches a layer makes its row factor itself)
            self._factors = [L.factor(st) if getattr(L, "reusable_factor", False) and self.tokens is None else None
                             for L, st in zip(self._layers, states)]
        if self._private is not None:  # one reverse sweep to the clipped sums: no mean gradient
            factors = [J if J is not None else L.factor(st) for J, L, st in zip(self._factors, self._layers, states)]
            self._private.run(factors, leaf_inputs(self._layers, states), self._loss.grad, self._pviews, self._shared)
            return
        self._gin, self._deltas = backward_layers(self._layers, states, self._loss.grad, self._grads, self._bbufs,
                                                  self.input_grad, factors=self._factors, plan=self._plan)
        if self._ties.shared:  # each use wrote its own gradient: a shared parameter's is their sum, in use order
            self._ties.reduce(self._flat, out=self._out)

    def _results(self, copy: bool):
        private = self._private is not None
        if private:
            frac, std = self._private.finish(self._out)  # the noise: drawn after the graph, every call
        flat = self._out.copy() if copy else self._out
        per = self._per_layer(flat) if copy else self._outs
        loss = self._loss.value.copy() if copy else self._loss.value
        if private:
            return loss, self._private.results(self._gradients(per, flat=flat), frac, std, copy)
        gin = self._gin.copy() if copy and self._gin is not None else self._gin
        deltas = [_copied(d) for d in self._deltas] if copy else list(self._deltas)
        return loss, self._gradients(per, input=gin, deltas=deltas, flat=flat)

    def _gradients(self, per: list, **kw) -> Gradients:
        """``Gradients`` of the per-layer views ``per``: by ``weights``/``biases`` for a net of Dense
        layers (its ``layers`` entries are made when read), else by name."""
        if self._dense:
            dW, db = self._dense if per is self._outs else ([g[0] for g in per], [g[1] for g in per])
            return Gradients(list(dW), list(db), **kw)
        return Gradients(layers=named_grads(self._layers, per), **kw)

    def param_pairs(self, grads) -> list:
        """``[(parameter, its gradient)]``, each parameter of the network once, in the order of
        ``grads.flat`` (``grads``: what a call returned, ``Gradients`` or ``ClippedGradients``, or
        a flat ``(P,)`` block): a shared parameter as the array of its first use, with the sum of
        its uses' gradients in that orientation. What an optimiser updates, so that a shared
        parameter is updated once: ``for p, dp in step.param_pairs(g): p -= lr * dp``."""
        flat = getattr(grads, "flat", grads)
        if tuple(getattr(flat, "shape", ())) != (self._ties.n_params,):
            raise ValueError(f"param_pairs takes this step's gradients (flat: ({self._ties.n_params},)), got "
                             f"{type(grads).__name__} of shape {tuple(getattr(flat, 'shape', ()))}")
        return list(zip(self._ties.params, self._ties.param_views(flat)))

    def _per_layer(self, flat) -> list:
        """Per layer, its views of a result block ``flat: (P,)`` (a shared parameter's in every layer
        that uses it, transposed where the use is: what ``net.backward`` returns)."""
        return param_views(self._layers, self._ties.use_views(self._ties.param_views(flat)))

    # ------------------------------------------------------------------ facts
    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the step owns (the parameters are the network's)."""
        arrays = {id(a): a for bufs in self._fbufs + self._bbufs for a in bufs}  # an aliased δ once
        arrays = [self._x, self._target, self._flat, *arrays.values()] + ([self._out] if self._ties.shared else [])
        return int(sum(a.nbytes for a in arrays)) + self._loss.nbytes + (self._private.nbytes if self._private else 0)

    def __repr__(self) -> str:
        mode = "CUDA graph" if self.captured else "buffers"
        tok = "" if self.tokens is None else f", tokens={self.tokens}"
        return f"TrainingStep({self._net!r}, batch={self.batch}{tok}, loss={self.loss!r}, {mode}, {self.nbytes} bytes)"


__getattr__ = renamed(__name__, {"SequentialStep": ("jacgrad.steps.compiled.TrainingStep", TrainingStep)})

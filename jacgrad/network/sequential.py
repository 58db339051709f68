"""Sequential: THE network, a stack of ``jacgrad.nn.layers`` (dense, residual blocks, LayerNorm,
RMSNorm): forward, backward, Jacobian chain, compiled steps, files; ``jacgrad.MLP`` is a Sequential
of Dense layers with ``weights``/``biases``/``activations`` lists.

    >>> import numpy as np, jacgrad as jg
    >>> rng = np.random.default_rng(0)
    >>> W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)
    >>> net = jg.Sequential([jg.layers.Dense(W(3, 4), activation="tanh"),
    ...                      jg.layers.Residual([jg.layers.Dense(W(4, 4), activation="tanh")], scale=0.5),
    ...                      jg.layers.LayerNorm(np.ones(4), np.zeros(4)), jg.layers.Dense(W(4, 2))])
    >>> loss, g = net.loss_and_grads(np.ones((5, 3)), np.zeros((5, 2)))
    >>> sorted(g.layers[2]), net.jacobian_chain(net.forward(np.ones((5, 3)))[1]).jacobian().shape
    (['beta', 'gamma'], (5, 2, 3))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core import above as _above, lazy as _lazy
from ..nn import losses
from ..protocol.passes import Gradients
from ..nn.stack import Plans, backward_layers, carve_backward, carve_forward, carve_grads, forward_layers
from ..nn.stack import named_grads, param_views
from ..steps.compiled_jacobian import JacobianStep
from ..steps.compiled_products import compile_step
from ..params.param_space import SequentialParameterSpace
from ..core.validation import float_array, network_input, require_finite, shape_str
from ..core.backend import get_xp
from ..algebra.chain import Chain
from ..nn.layers import chained
from ..protocol.layer import anchor as _first_param
from ..protocol.layer import bind_shapes, layout_generation, lead_shape, named_params
from ..protocol.sharing import Ties, TiedLayers
from ..io.mlp_interop import Imported
from ..core.renamed import renamed
from .batch_kinds import check_batch_kind
from .cache import SequentialCache

__all__ = ["Gradients", "Sequential", "SequentialCache"]

__getattr__ = renamed(__name__, {"BlockGradients": ("jacgrad.Gradients", Gradients)})


class Sequential(SequentialParameterSpace, Imported, TiedLayers):
    """A stack of layers from ``jacgrad.nn.layers``, input -> output; ``layers`` is a read-only tuple.
    Every layer must have the same dtype and device; widths must chain (errors name the layer)."""

    def __init__(self, layers: Sequence[Any], in_shape: Sequence[int] | None = None):
        layers = list(layers)
        bind_shapes(layers, in_shape)  # image layers: (C, H, W) through the stack (layer_protocol)
        layers = chained(layers, "", "layer")
        _first_param(layers)  # a ValueError when no layer has parameters
        params = [(j, p) for j, L in enumerate(layers) for p in L.params]
        try:
            get_xp(*[p for _, p in params])
        except TypeError as exc:
            raise TypeError(f"the layers' parameters live on different devices: {exc}") from None
        for j, p in params:
            if p.dtype != params[0][1].dtype:
                raise TypeError(f"layer {j}: a parameter has dtype {p.dtype} but layer 0 has "
                                f"{params[0][1].dtype}; use one dtype")
        Ties(named_params(layers))  # a ValueError for two parameters overlapping in memory, not one array
        self._layers = tuple(layers)
        self._token = object()

    layers = property(lambda self: self._layers, doc="the layers (a tuple)")
    n_in = property(lambda self: self._layers[0].n_in)
    n_out = property(lambda self: self._layers[-1].n_out)
    in_shape = property(lambda self: self._memo().in_shape, doc="per sample, without B: the first layer's")
    out_shape = property(lambda self: tuple(self._layers[-1].out_shape), doc="per sample, without B: the last layer's")
    takes_tokens = property(lambda self: self._memo().takes_tokens,
                            doc="True when every layer acts per token: x may be (B, T, n_in)")
    _anchor = property(lambda self: _first_param(self._layers), doc="the first parameter array (dtype, device)")
    dtype = property(lambda self: self._memo().dtype, doc="the parameters' dtype (a replacement keeps it)")
    xp = property(lambda self: self._memo().xp, doc="the parameters' array module (a replacement keeps their device)")

    @property
    def sizes(self) -> list[int]:
        return [self.n_in] + [L.n_out for L in self._layers]

    @property
    def n_params(self) -> int:
        """``P``: every parameter once, a shared one (several uses, ``docs/sharing.md``) too."""
        return self._ties().n_params

    def __len__(self) -> int:
        return len(self._layers)

    def __repr__(self) -> str:
        return f"Sequential([{', '.join(map(repr, self._layers))}], {self.dtype})"

    # ------------------------------------------------------------------ passes
    def __call__(self, x):
        """``y: (B, n_out)``, the output of ``forward``. A Dask array in gives a lazy Dask array out
        (``jacgrad.distributed`` maps the forward over its chunks)."""
        lazy = _lazy.handler_for(x)
        if lazy is not None:
            return lazy("__call__", self, x)
        return self._forward(x)[0]

    def forward(self, x: Any, check_finite: bool = False):
        """``y, cache = net.forward(x)``: ``x (B, n_in) -> y (B, n_out)``, or per token ``(B, T, n_in)
        -> (B, T, n_out)`` where every layer acts per token (``takes_tokens``); ``y`` is the caller's own
        array. ``check_finite=True`` raises ``FloatingPointError`` naming the first layer with a
        NaN or Inf."""
        z, cache = self._forward(x, check_finite)
        kept = getattr(self._layers[-1], "kept", None)  # the one array a lean layer keeps for its factor
        if kept is not None and (cache.x.ndim != 1 + len(self.in_shape) or z is kept(cache._states[-1])[0]):
            z = z.copy()  # the last layer's kept y (or, on tokens, maybe a view of it), which backward reads
        return z, cache

    def _forward(self, x: Any, check_finite: bool = False):
        """``forward`` without the copy of the output (which may be the cache's): for callers that
        never hand it out while the cache lives (``loss_and_grads``, ``__call__``)."""
        if _lazy.handler_for(x) is not None:
            raise TypeError(f"forward takes an in-memory batch, not a {type(x).__module__} array: "
                            "net(X) and jacgrad.distributed map over its chunks")
        self._check_origin()
        memo = self._memo()
        x = self.checked_input(x, "x", memo)
        dtype, xp = memo.dtype, memo.xp
        check = require_finite if check_finite else None
        if check is not None:
            check(x, "the input x")
        lead = x.shape[0] if x.ndim == 1 + len(memo.in_shape) else tuple(x.shape[:2])  # (B, T): a token batch
        # pooled host blocks (a loop reuses those of finished calls); the last layer's kept array in
        # a block of its own, so an output kept on its own does not keep the others alive; a (B, d)
        # batch's Dense layers keep one array each (lean: their inputs recomputed by backward)
        plan = memo.at(lead)
        bufs = carve_forward(xp, self._layers, lead, dtype, pooled=True, lean=isinstance(lead, int), plan=plan)
        z, states = forward_layers(self._layers, x, bufs, check, plan)
        return z, SequentialCache(x, states, self._token, self._layers)

    def _memo(self) -> Plans:
        """What the passes read of the layers (``nn.stack.Plans``: dtype, device, a ``Plan`` per input
        lead), worked out once and kept until they change (``protocol.layer.layout_changed``)."""
        memo = self.__dict__.get("_plans")
        if memo is None or memo.layers is not self._layers or memo.generation != layout_generation():
            memo = self._plans = Plans(self._layers)
        return memo

    def checked_input(self, x: Any, name: str = "x", memo: Plans | None = None):
        """``x`` checked as this network's input, ready for ``forward``: layer 0 checks it itself where
        it takes discrete inputs (a layer with ``check_tokens(x, where)``, e.g. ``Embedding``: integer
        ``(B, T)`` ids, kept as they are); else a float ``(B, *in_shape)`` or, per token,
        ``(B, T, *in_shape)`` batch (``_validate.network_input``), contiguous, in the network's dtype.
        ``memo``: the network's ``_memo()``, where the caller has it."""
        first = self._layers[0]
        check_tokens = getattr(first, "check_tokens", None)
        if check_tokens is not None:
            return check_tokens(x, 0)
        memo = memo or self._memo()
        # a NumPy batch into a NumPy network: nothing to ask; anything else (a list, another device,
        # a foreign array) through get_xp with the network's anchor (a device mismatch: a TypeError)
        xp = np if memo.xp is np and type(x) is np.ndarray else get_xp(x, self._anchor)
        x = network_input(x, name, xp, memo.dtype, in_shape=memo.in_shape, tokens=memo.takes_tokens)
        return xp.ascontiguousarray(x.astype(memo.dtype, copy=False))

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, SequentialCache):
            raise TypeError(f"expected the cache returned by this network's forward, got {type(cache).__name__}")
        if cache._owner is not self._token:
            raise ValueError("this cache was made by another network's forward; run forward on this network")
        self._check_origin()
        for j, (L, then) in enumerate(zip(self._layers, cache._bound)):
            if then:
                for (what, a), (_, b) in zip(L.bound(), then):
                    if a is not b:
                        raise ValueError(
                            f"net.{what}[{j}] was replaced after this cache's forward pass; run forward again "
                            f"(backward and jacobian_chain read the network's current {what})")

    def backward(self, cache: SequentialCache, grad_y: Any, input_grad: bool = True,
                 check_finite: bool = False) -> Gradients:
        """Gradients of L given ``grad_y = ∂L/∂y: (B, n_out)`` (see ``BlockGradients``).
        ``check_finite=True`` raises ``FloatingPointError`` at the first layer whose δ is not finite."""
        self._check_cache(cache)
        memo = self._memo()
        dtype, xp = memo.dtype, memo.xp
        xp_g = get_xp(grad_y)
        grad_y = float_array(grad_y, "grad_y", xp_g if xp_g is xp else get_xp(grad_y, self._anchor))
        lead = cache.x.shape[0] if cache.x.ndim == 1 + len(memo.in_shape) else tuple(cache.x.shape[:2])  # the input's
        plan = memo.at(lead)
        want = plan.layouts.get("grad_y")
        if want is None:  # a layer may change the token axis
            want = plan.layouts["grad_y"] = lead_shape(plan.leads[-1]) + tuple(self.out_shape)
        if grad_y.shape != want:
            raise ValueError(f"grad_y has shape {shape_str(grad_y.shape)} but the cache holds a batch of "
                             f"{cache.batch} outputs of width {self.n_out}: needs {shape_str(want)}")
        ties = self._ties()
        flat, views = carve_grads(xp, ties, dtype, plan)  # pooled: reuse a finished call's block
        # one block for the deltas and ∂L/∂x; on (B, d) a Dense's cotangent is written into its δ and
        # scaled in place; a last Dense only reads ∂L/∂y (its δ is its own); any other layer may hand
        # it on as its delta, so it gets a copy: never the caller's array
        copy = not getattr(self._layers[-1], "scales_in_place", False)
        g, bufs = carve_backward(xp, self._layers, lead, dtype, input_grad, grad_y=copy, pooled=True,
                                 in_place=isinstance(lead, int), plan=plan)
        if copy:
            xp.copyto(g, grad_y, casting="same_kind")
        else:
            g = grad_y.astype(dtype, copy=False)
        per_layer = param_views(self._layers, views, plan)
        gin, deltas = backward_layers(self._layers, cache._states, g, per_layer, bufs, input_grad,
                                      require_finite if check_finite else None, plan=plan)
        if ties.shared:  # each use wrote its own gradient: a shared parameter's is their sum
            flat = ties.reduce(flat)
            per_layer = param_views(self._layers, ties.use_views(ties.param_views(flat)), plan)
        return Gradients(layers=named_grads(self._layers, per_layer, plan), input=gin, deltas=deltas, flat=flat)

    def loss_and_grads(self, x: Any, target: Any, loss: str = "mse", input_grad: bool = True):
        """``(value, Gradients)`` of ``loss`` (``mse``, ``softmax_cross_entropy``, ``sigmoid_bce``; see
        ``jacgrad.nn.losses``) of the network's output against ``target``. ``input_grad=False`` skips
        ``∂L/∂x`` (one GEMM of a Dense layer's three), as a training loop may."""
        loss_fn = losses.get(loss)
        y, cache = self._forward(x)  # y is not handed out: no copy needed
        value, grad_y = loss_fn(y, losses.one_layout(target))  # one layout, as in a compiled step: the same sums
        return value, self.backward(cache, grad_y, input_grad=input_grad)

    def jacobian_chain(self, cache: SequentialCache) -> Chain:
        """The per-sample ``Chain`` of this forward pass, one factor per layer: ``diag(d)·Wᵀ``,
        ``I + s·J_inner`` (a ``ResidualFactor``) or a ``NormFactor``."""
        self._check_cache(cache)
        return Chain([L.factor(st) for L, st in zip(self._layers, cache._states)])  # a factor reads no input

    def gradient_flow(self, x: Any, target: Any = None, loss: str = "mse", **options):
        """The gradient-flow report of this network at ``x``: ``jg.gradient_flow(net, x, target, loss,
        **options)`` (``jacgrad.flow.diagnostics.gradient_flow``: its options and what the report holds)."""
        return _above.call("gradient_flow", self, x, target, loss, **options)

    def compile(self, batch: int, loss: str = "mse", input_grad: bool = True, capture: Any = "auto", *,
                clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None,
                tokens: Any = None, product: str = "step", **options):
        """A ``jacgrad.steps.compiled.TrainingStep`` (the one compiled step): ``loss, g = step(x, target)`` for
        batches of ``batch``, the numbers of ``loss_and_grads`` (bitwise on NumPy) from buffers
        allocated once (a CUDA graph on the GPU). As for ``MLP.compile``, the results ARE the
        step's buffers, overwritten by the next call (``step(x, t, copy=True)`` for fresh ones);
        parameters are read by reference (in-place updates are seen; a replaced array raises
        until ``step.rebind()``). ``clip=C`` (with ``noise_multiplier``, ``seed``,
        ``expected_batch_size``): a private DP-SGD step, ``(loss, ClippedGradients)`` per call, the
        numbers of ``clipped_grad`` (``jacgrad.steps.private_step``), without ``∂L/∂x`` whatever
        ``input_grad`` says. ``tokens=T``: token batches, ``x (B, T, n_in)`` or, an ``Embedding``
        first, integer ids ``(B, T)``, and targets ``(B, T, n_out)`` (mse, sigmoid_bce).
        ``product="grad_norms" | "grads" | "ntk" | "ggn_vp" | "ggn_diagonal"`` (``options``:
        ``per_layer``, ``method``, ``trace``, ``max_memory``): that product compiled instead, with the
        same contract (``jacgrad.steps.compiled_products``; ``input_grad`` does not apply)."""
        check_batch_kind(self._layers, batch, tokens, "compile")
        training = dict(input_grad=input_grad and clip is None, clip=clip, noise_multiplier=noise_multiplier, seed=seed,
                        expected_batch_size=expected_batch_size)
        return compile_step(self, batch, product, loss, capture, tokens, training, options)

    def compile_jacobian(self, batch: int, order: str = "auto", capture: Any = "auto", tokens: Any = None) -> JacobianStep:
        """``J = step(x)``: the ``(batch, n_out, n_in)`` per-sample Jacobians, one CUDA graph on the GPU; the
        contract of ``MLP.compile_jacobian`` (``jacgrad.steps.compiled_jacobian``). ``tokens=T``: float token
        batches ``x (batch, T, n_in)``, ``J (batch, T·n_out, T·n_in)``."""
        check_batch_kind(self._layers, batch, tokens, "compile_jacobian")
        return JacobianStep(self, batch, order=order, capture=capture, tokens=tokens)

    @classmethod
    def from_torch(cls, module, copy: bool = True, dtype=None, in_shape: Sequence[int] | None = None):
        """The network of a torch ``nn.Sequential`` (or an iterable of modules; nested
        ``nn.Sequential``s are flattened) of ``nn.Linear`` (+ one activation module each),
        ``nn.LayerNorm``, ``nn.RMSNorm`` and ``jacgrad.io.interop.torch_blocks.Residual`` (residual
        blocks ``x + s·inner(x)``), on the module's device (NumPy for CPU, CuPy for CUDA).
        ``W = weight.T``; ``copy=False`` shares the parameters' memory (a view: a model that keeps
        training in place is seen live; run ``forward`` again after each step); ``dtype`` casts
        them (a copy; needed for float16/bfloat16). The one reader of both networks
        (``torch_blocks.layers_and_origin``); ``MLP.from_torch`` takes the Dense-only models.
        A CNN (``nn.Conv1d``/``Conv2d``, the pools, ``nn.Flatten``, eval ``nn.BatchNorm1d``/``2d``;
        ``interop.torch_conv``) needs ``in_shape``, the per-sample input shape ``(C, H, W)``.

            >>> import torch, jacgrad as jg
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
            >>> jg.MLP.from_torch(model).activations
            ['tanh', 'identity']
        """
        from ..io.interop.torch import _torch

        _torch()  # a clear ImportError when torch is missing
        from ..io.interop.torch_blocks import layers_and_origin

        layers, origin = layers_and_origin(module, copy=copy, dtype=dtype, importer=f"jg.{cls.__name__}.from_torch",
                                           dense_only=cls._dense_only)
        net = cls._of_layers(layers) if in_shape is None else cls(layers, in_shape=in_shape)
        net._origin = origin
        return net

    _dense_only = False  # MLP: every layer a Dense

    @classmethod
    def _of_layers(cls, layers):
        return cls(layers)

    def to_torch(self):
        """An ``nn.Sequential`` computing this network (``nn.Linear`` + activation modules,
        ``nn.LayerNorm``, ``nn.RMSNorm``, ``torch_blocks.Residual`` with or without a projection
        shortcut, convolutions, eval-mode BatchNorm, pools, ``nn.Flatten``, ``nn.PReLU``, and the token
        layers: ``nn.Embedding``, attention and the token maps of ``io.interop.torch_tokens``) with copies
        of its parameters, same dtype, same device (CUDA for a GPU network), a shared parameter one
        torch parameter (a GPT's tied unembedding: the ``nn.Embedding``'s weight); ``Sequential.from_torch``
        of it gives this network back exactly, and so does ``jg.from_torch(module, x)``. A layer with
        no torch module (a kind of one's own) is a ``TypeError`` naming it."""
        from ..io.interop.torch_blocks import layers_to_torch

        return layers_to_torch(self._layers)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write the network: ``spec`` (the layers as JSON) and each parameter as ``"<j>.<name>"``
        (``"<j>.<i>.<name>"`` inside a residual block), to ``.npz`` or ``.safetensors`` (the spec
        in its metadata) by suffix, in any case, at exactly ``path``; any other suffix is a
        ``ValueError``. The file is replaced only once the new one is complete (``jacgrad.io.netfile``)."""
        from ..io.netfile import save_layers

        save_layers(self._layers, path)

    @classmethod
    def load(cls, path, activations: Sequence[str] | None = None) -> "Sequential":
        """A network from a file of ``save`` (``.npz`` or ``.safetensors``), or of ``MLP.save``, or a
        torch ``nn.Sequential`` state dict (``.safetensors``, ``.pt``/``.pth``): no code is run, no
        pickle. ``activations``: names replacing the file's, one per Dense layer in layer order
        (residual inner layers included) or one for all; a state dict needs them. A bias the file
        leaves out (a ``Linear(bias=False)``'s) makes a bias-free Dense. Every problem
        with the file is a ``ValueError`` naming it (``jacgrad.io.netfile``)."""
        from ..io.netfile import load_layers

        return cls(load_layers(path, activations))  # image layers keep their in_shape in the spec

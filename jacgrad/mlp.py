"""MLP: a stack of dense layers ``z_j = φ_j(z_{j-1} @ W_j + b_j)`` and its backprop through the
layer factors ``J_j = diag(φ'_j(h_j)) · W_jᵀ`` — the very factors ``jacobian_chain`` returns.

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([4, 8, 3], activation="tanh", seed=0)
    >>> x, t = np.ones((2, 4)), np.zeros((2, 3))
    >>> loss, g = net.loss_and_grads(x, t, loss="mse")
    >>> [w.shape for w in g.weights], net.jacobian_chain(net.forward(x)[1]).jacobian().shape
    ([(4, 8), (8, 3)], (2, 3, 4))
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import _lazy, initializers, losses
from ._passes import Gradients, backward_into, carve, carve_gradients, forward_into
from ._validate import LayerList, float_array, layer_widths, network_input, nonnegative_finite, replacement, shape_str
from .activations import get as get_activation
from .backend import device_of, get_xp, resolve_device, to_device
from .chain import Chain
from ._compiled_jacobian import JacobianStep
from .compiled import TrainingStep
from .jacobian import LayerJacobian
from ._forward_cache import ForwardCache
from ._mlp_interop import InteropMethods
from ._sequential_param_space import SequentialParameterSpace
from .layers import Dense

__all__ = ["MLP", "ForwardCache", "Gradients"]


class MLP(SequentialParameterSpace, InteropMethods):
    """A multilayer perceptron with public ``weights``, ``biases`` and ``activations`` lists.

    ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)``, ``activations[j]``: a name from
    ``jacgrad.activations.names()``. ``activations`` may be one name for every layer. Every
    width is at least 1. The arrays are kept by reference (not copied).

    The three lists are what the computation reads (``LayerList``): ``net.weights[j] = W``
    replaces layer j's weight for every later call, after checking that ``W`` has the same shape,
    dtype and device as the one it replaces; ``net.activations[j] = "relu"`` changes layer j's
    activation (a valid name). Their length is fixed: build a new ``MLP`` to add or remove layers.
    """

    def __init__(self, weights: Sequence[Any], biases: Sequence[Any] | None = None, activations: str | Sequence[str] = "tanh"):
        weights = list(weights)
        if not weights:
            raise ValueError("an MLP needs at least one weight matrix")
        try:
            xp = get_xp(*weights, *(biases or []))
        except TypeError as exc:
            raise TypeError(f"the weights and biases live on different devices: {exc}") from None
        weights = [float_array(W, f"layer {j}: W", xp) for j, W in enumerate(weights)]
        for j, W in enumerate(weights):
            if W.ndim != 2:
                raise ValueError(f"layer {j}: W must be 2-D (H_in, H_out), got shape {shape_str(W.shape)}")
            if min(W.shape) < 1:
                raise ValueError(
                    f"layer {j}: W has shape {shape_str(W.shape)}: every layer needs at least one input and one "
                    f"output feature (zero-width layers are not supported)"
                )
            if j and W.shape[0] != weights[j - 1].shape[1]:
                raise ValueError(
                    f"layer {j}: W has shape {shape_str(W.shape)} but layer {j - 1} outputs "
                    f"{weights[j - 1].shape[1]} features"
                )
            if W.dtype != weights[0].dtype:
                raise TypeError(f"layer {j}: W has dtype {W.dtype} but layer 0 has {weights[0].dtype}; use one dtype")
        K = len(weights)
        if biases is None:
            biases = [xp.zeros(W.shape[1], dtype=W.dtype) for W in weights]
        else:
            biases = list(biases)
            if len(biases) != K:
                raise ValueError(f"got {len(biases)} biases for {K} layers")
            biases = [float_array(b, f"layer {j}: bias", xp) for j, b in enumerate(biases)]
            for j, (b, W) in enumerate(zip(biases, weights)):
                if b.shape != (W.shape[1],):
                    raise ValueError(f"layer {j}: bias has shape {shape_str(b.shape)} but W has {W.shape[1]} outputs")
                if b.dtype != W.dtype:
                    raise TypeError(f"layer {j}: bias has dtype {b.dtype} but W has {W.dtype}")
        names = [activations] * K if isinstance(activations, str) else list(activations)
        if len(names) != K:
            raise ValueError(f"got {len(names)} activations for {K} layers")
        acts = [_activation_entry(j, n) for j, n in enumerate(names)]
        # the Dense layers the shared parameter-space code reads (``layers``), kept in step with the
        # three lists by their checks: a replaced entry is replaced in its layer too
        self._layers = tuple(Dense(W, b, act) for W, b, act in zip(weights, biases, acts))
        self._weights = LayerList(weights, "weights", self._check_weight)
        self._biases = LayerList(biases, "biases", self._check_bias)
        self._activations = LayerList(acts, "activations", self._check_activation, show=_activation_name)
        self._token = object()  # identifies this network's caches

    # ------------------------------------------------------------------ the per-layer lists
    @property
    def weights(self) -> LayerList:
        """``W_j: (H_{j-1}, H_j)``, one per layer; ``net.weights[j] = W`` checks shape, dtype, device."""
        return self._weights

    @property
    def biases(self) -> LayerList:
        """``b_j: (H_j,)``, one per layer; ``net.biases[j] = b`` checks shape, dtype, device."""
        return self._biases

    @property
    def activations(self) -> LayerList:
        """Activation names, one per layer; ``net.activations[j] = name`` checks the name."""
        return self._activations

    @weights.setter
    def weights(self, value):
        _no_replace("weights")

    @biases.setter
    def biases(self, value):
        _no_replace("biases")

    @activations.setter
    def activations(self, value):
        _no_replace("activations")

    @property
    def _acts(self) -> list:
        """The ``Activation`` rows the computation uses: exactly what ``activations`` names."""
        return self._activations.stored

    def _check_weight(self, j: int, W):
        W = replacement(j, W, self._weights[j], "W")
        self._layers[j]._W = W
        return W

    def _check_bias(self, j: int, b):
        b = replacement(j, b, self._biases[j], "bias")
        self._layers[j]._b = b
        return b

    def _check_activation(self, j: int, name):
        act = _activation_entry(j, name)
        self._layers[j]._act = act
        return act

    @property
    def layers(self) -> tuple:
        """The ``jacgrad.layers.Dense`` layers, one per entry of ``weights``/``biases``/``activations``
        (they hold the very arrays and rows those lists hold)."""
        return self._layers

    n_in = property(lambda self: self.weights[0].shape[0])
    n_out = property(lambda self: self.weights[-1].shape[1])
    n_params = property(lambda self: sum(W.size + W.shape[1] for W in self.weights))

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(
        cls,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "tanh",
        output_activation: str = "identity",
        init: str = "xavier_normal",
        gain: float = 1.0,
        bias_std: float = 0.0,
        seed: int | None = None,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> "MLP":
        """A freshly initialised network ``sizes = [n_in, H_1, …, n_out]``.

        ``sizes``: integers ≥ 1 (an integer-valued float such as ``3.0`` is taken as 3; ``2.7`` is
        an error). ``activation``: one name for every hidden layer, or a list of one name per hidden
        layer (``len(sizes) - 2`` names); the output layer's is ``output_activation``.
        Weights by ``init`` (see ``jacgrad.initializers``) times ``gain`` (finite, ≥ 0); biases
        ``N(0, bias_std²)`` (``bias_std`` finite, ≥ 0). Drawn in float64 on the host, then cast to
        ``dtype`` and moved to ``device`` (``"cpu"``, ``"gpu"`` or ``"auto"``): the same seed gives
        the same network everywhere.
        """
        sizes = layer_widths(sizes)
        if init not in initializers.INITS:
            raise KeyError(f"unknown init {init!r}; valid names: {', '.join(initializers.names())}")
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype {dtype!r}: jacgrad works in float32 or float64")
        gain = nonnegative_finite(gain, "gain")
        bias_std = nonnegative_finite(bias_std, "bias_std")
        hidden = len(sizes) - 2
        if isinstance(activation, str) or not hasattr(activation, "__iter__"):
            names = [activation] * hidden
        else:
            names = list(activation)
            if len(names) != hidden:
                raise ValueError(
                    f"activation has {len(names)} names but sizes {sizes} has {hidden} hidden layer"
                    f"{'' if hidden == 1 else 's'}: give one name, or one per hidden layer "
                    f"(the output layer's is output_activation)"
                )
        acts = [_activation_entry(j, n) for j, n in enumerate(names)]  # the rows themselves, parameters and all
        acts.append(_activation_entry(hidden, output_activation, "output_activation"))
        device = resolve_device(device)
        rng = np.random.default_rng(seed)
        weights, biases = [], []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            weights.append(initializers.init_weight(init, fan_in, fan_out, gain, rng).astype(dt))
            b = rng.normal(0.0, bias_std, fan_out) if bias_std > 0 else np.zeros(fan_out)
            biases.append(b.astype(dt))
        if device == "gpu":
            weights = [to_device(W, "gpu") for W in weights]
            biases = [to_device(b, "gpu") for b in biases]
        return cls(weights, biases, acts)

    def to(self, device: str) -> "MLP":
        """A copy of this network on ``"cpu"`` or ``"gpu"`` (explicit, never implicit)."""
        device = resolve_device(device)
        return MLP([to_device(W, device) for W in self.weights], [to_device(b, device) for b in self.biases], self._acts)

    # ------------------------------------------------------------------ properties
    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[0]] + [W.shape[1] for W in self.weights]

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def dtype(self) -> np.dtype:
        return self.weights[0].dtype

    @property
    def device(self) -> str:
        return device_of(self.weights[0])

    @property
    def xp(self):
        return get_xp(self.weights[0])

    def __repr__(self) -> str:
        layers = ", ".join(f"{a}" for a in self.activations)
        return f"MLP({'-'.join(map(str, self.sizes))}, [{layers}], {self.dtype}, {self.device})"

    # ------------------------------------------------------------------ forward
    def __call__(self, x: Any):
        """``y: (B, n_out)``, the output of ``forward`` (no cache is kept). A Dask array in gives a
        lazy Dask array out (``jacgrad.distributed`` maps the forward over its chunks)."""
        lazy = _lazy.handler_for(x)
        if lazy is not None:
            return lazy("__call__", self, x)
        return self._forward(x)[0]

    def forward(self, x: Any, check_finite: bool = False):
        """``y, cache = net.forward(x)``: ``x (B, n_in) -> y (B, n_out)``.

        ``x`` is cast to the network's dtype, and copied to a C-contiguous array when it is not one
        (results then do not depend on its memory layout). The cache keeps one ``(B, H_j)`` array per
        layer (see ``ForwardCache``); ``y`` is the caller's own array, which the cache never reads
        (changing it in place is safe). ``check_finite=True`` raises ``FloatingPointError`` naming
        the first layer (or the input) where a NaN or Inf appears; without it they propagate.
        """
        z, cache = self._forward(x, check_finite)
        if cache.from_output[-1]:  # z IS the cache's saved output: hand back a copy ((B, n_out), cheap)
            z = z.copy()
        return z, cache

    def _forward(self, x: Any, check_finite: bool = False):
        """``forward`` without the copy of the output: the ``z`` returned may be the cache's
        ``saved[-1]``, which backward reads. For callers that never hand ``z`` out while the
        cache lives (``loss_and_grads``, ``__call__``)."""
        if _lazy.handler_for(x) is not None:
            raise TypeError(f"forward takes an in-memory batch, not a {type(x).__module__} array: "
                            "net(X) and jacgrad.distributed map over its chunks")
        self._check_origin()
        weights, acts = self._weights.stored, self._acts
        xp = get_xp(x, weights[0])
        n_in, dtype = weights[0].shape[0], weights[0].dtype
        x = network_input(x, "x", xp, dtype)
        if x.ndim != 2 or x.shape[1] != n_in:
            got = x.shape[1] if x.ndim == 2 else f"an array of shape {shape_str(x.shape)}"
            raise ValueError(f"layer 0 expects {n_in} features, got {got} (x must be (B, {n_in}))")
        # one memory layout for every x: the GEMMs (and so the last bits of ∂W_0) do not depend on
        # how x is laid out, and a TrainingStep (which copies x into a C-contiguous buffer) agrees
        x = xp.ascontiguousarray(x.astype(dtype, copy=False))
        if check_finite:
            _require_finite(x, "the input x")
        B, sizes = x.shape[0], self.sizes
        # the hidden layers share one block; the last layer's array is a block of its own, so an
        # output kept on its own (``preds.append(net(x))``) does not keep the hidden ones alive
        _, saved = carve(xp, [(B, H) for H in sizes[1:-1]], dtype, pooled=True)
        saved += carve(xp, [(B, sizes[-1])], dtype, pooled=True)[1]
        from_output = [act.df_from_output is not None for act in acts]
        z = forward_into(x, weights, self._biases.stored, acts, saved, check=_require_finite if check_finite else None)
        return z, ForwardCache(x, saved, from_output, self._token, acts, weights)

    # ------------------------------------------------------------------ factors and backward
    def _check_cache(self, cache: Any) -> None:
        if not isinstance(cache, ForwardCache):
            raise TypeError(f"expected the cache returned by this network's forward, got {type(cache).__name__}")
        if cache._owner is not self._token:
            raise ValueError("this cache was made by another network's forward; run forward on this network")
        self._check_origin()
        for what, now, then in (("weights", self._weights.stored, cache._weights), ("activations", self._acts, cache._acts)):
            for j, (a, b) in enumerate(zip(now, then)):
                if a is not b:
                    raise ValueError(
                        f"net.{what}[{j}] was replaced after this cache's forward pass; run forward again "
                        f"(backward and jacobian_chain read the network's current {what})"
                    )

    def _factor(self, cache: ForwardCache, j: int) -> LayerJacobian:
        key = "y" if cache.from_output[j] else "h"  # the cache's weights and rows are the net's (_check_cache)
        return LayerJacobian.from_activation(cache._acts[j], cache._weights[j], **{key: cache.saved[j]})

    def jacobian_chain(self, cache: ForwardCache) -> Chain:
        """The per-sample ``Chain`` of this forward pass: factor j is ``diag(φ_j'(h_j)) · W_jᵀ``."""
        self._check_cache(cache)
        return Chain([self._factor(cache, j) for j in range(self.depth)])

    def backward(self, cache: ForwardCache, grad_y: Any, check_finite: bool = False, input_grad: bool = True) -> Gradients:
        """Gradients of a loss L given ``grad_y = ∂L/∂y: (B, n_out)``.

        For j = K-1 … 0, with the factor ``J_j`` of ``jacobian_chain``:
        ``δ_j = J_j.scale(g)`` (= g ⊙ φ_j'(h_j), one fused pass), ``∂L/∂W_j = z_{j-1}ᵀ δ_j``,
        ``∂L/∂b_j = Σ_batch δ_j``, ``g ← δ_j @ W_jᵀ``. Peak memory: the returned gradients plus
        O(B · max H). ``input_grad=False`` skips the last ``δ_0 @ W_0ᵀ`` (``Gradients.input`` is None).
        ``check_finite=True`` raises ``FloatingPointError`` at the first layer whose δ is not finite.
        The weights are read now, not at forward time (see ``ForwardCache``: a replaced weight or
        activation raises ``ValueError``; an in-place change is not detected).
        """
        self._check_cache(cache)
        xp = get_xp(grad_y, self.weights[0])
        grad_y = float_array(grad_y, "grad_y", xp)
        want = (cache.batch, self.sizes[-1])
        if grad_y.shape != want:
            raise ValueError(
                f"grad_y has shape {shape_str(grad_y.shape)} but the cache holds a batch of {cache.batch} "
                f"outputs of width {self.sizes[-1]}: needs {shape_str(want)}"
            )
        grad_y = grad_y.astype(self.dtype, copy=False)
        B, sizes = cache.batch, self.sizes
        _, deltas = carve(xp, [(B, H) for H in sizes[1:]], self.dtype, pooled=True)
        flat, dW, db = carve_gradients(xp, self.weights, self.dtype, pooled=True)
        gin = xp.empty((B, sizes[0]), dtype=self.dtype) if input_grad else None
        factors = [self._factor(cache, j) for j in range(self.depth)]
        backward_into(factors, grad_y, cache.layer_output_and_derivative, dW, db, deltas, gin,
                      check=_require_finite if check_finite else None)
        return Gradients(dW, db, gin, deltas, flat)

    def compile(self, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = False, *,
                clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None):
        """A ``jacgrad.compiled.TrainingStep``: ``loss, g = step(x, target)`` for batches of ``batch``,
        the numbers of ``loss_and_grads`` (bitwise on NumPy, for any memory layout of ``x`` and
        ``target``) from buffers allocated once (a CUDA graph on the GPU).

        The results ARE the step's buffers: the next call overwrites ``loss`` and every array of
        ``g`` in place. To keep a value across steps, take ``float(loss)`` or call
        ``step(x, t, copy=True)``; ``losses.append(loss)`` collects the same 0-d array many times.
        
        ``clip=C`` (with ``noise_multiplier=σ``, ``seed``, ``expected_batch_size``): a private
        DP-SGD step returning ``(loss, ClippedGradients)``, the numbers of ``clipped_grad``
        (``jacgrad._private_step``: the noise is drawn after the graph, every call).
        """
        return TrainingStep(self, batch, loss=loss, capture=capture, input_grad=input_grad, clip=clip,
                            noise_multiplier=noise_multiplier, seed=seed, expected_batch_size=expected_batch_size)

    def compile_jacobian(self, batch: int, order: str = "auto", capture: Any = "auto") -> JacobianStep:
        """A ``jacgrad._compiled_jacobian.JacobianStep``: ``J = step(x)``, the ``(batch, n_out, n_in)``
        per-sample Jacobians of ``jacobian_chain(forward(x)[1]).jacobian(order)``, recorded as one
        CUDA graph on the GPU and replayed. ``J`` IS the step's buffer, overwritten by the next call
        (``step(x, copy=True)`` for a fresh array); parameters are read by reference (in-place
        updates are seen; a replaced array raises until ``step.rebind()``)."""
        return JacobianStep(self, batch, order=order, capture=capture)

    def loss_and_grads(self, x: Any, target: Any, loss: str = "mse", input_grad: bool = True):
        """``(value, Gradients)`` of ``loss`` (``mse``, ``softmax_cross_entropy``, ``sigmoid_bce``)
        of the network's output against ``target``. ``input_grad=False`` skips ``∂L/∂x`` (one
        GEMM of the ``2K`` a backward pass does), as a training loop may."""
        loss_fn = losses.get(loss)
        y, cache = self._forward(x)  # y is not handed out: no copy needed
        value, grad_y = loss_fn(y, losses.one_layout(target))  # one layout, as in a compiled step: the same sums
        return value, self.backward(cache, grad_y, input_grad=input_grad)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write ``W0, b0, W1, b1, …`` and the activation names to ``.npz`` or ``.safetensors``
        (by suffix, in any case, at exactly ``path``; any other suffix is a ``ValueError``). The
        file is replaced only once the new one is complete (see ``jacgrad.netfile``)."""
        from .netfile import save

        save(self.weights, self.biases, self.activations, path)

    @classmethod
    def load(cls, path, dtype: str | None = None, device: str = "cpu", activations=None) -> "MLP":
        """Read a network from ``.npz`` or ``.safetensors`` (written by ``save``, or by hand in the
        same layout) or a torch ``nn.Sequential`` state dict (``.safetensors``, ``.pt``/``.pth``,
        read with ``weights_only=True``); ``activations=``: the names for files that carry none.
        Formats and errors: ``jacgrad.netfile``."""
        from .netfile import load

        return cls.from_spec(load(path, activations=activations, dtype=dtype, device=device))


def _no_replace(what: str):
    raise AttributeError(
        f"net.{what} cannot be replaced as a whole; assign one layer's entry (net.{what}[j] = …) or build a new MLP"
    )


def _activation_name(act) -> str:
    return act.name


def _activation_entry(j: int, name, what: str | None = None):
    """The ``Activation`` row of layer ``j``'s activation ``name``; an unknown name is a ``KeyError``
    naming the layer and listing the valid names."""
    try:
        return get_activation(name)
    except KeyError as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise type(exc)(f"{what or f'layer {j}'}: {msg}") from None


def _require_finite(a, where: str) -> None:
    xp = get_xp(a)
    bad = ~xp.isfinite(a)
    if bool(bad.any()):
        first = tuple(int(i) for i in np.argwhere(np.asarray(get_xp(a).asnumpy(bad) if xp is not np else bad))[0])
        raise FloatingPointError(f"{where} has non-finite values (first at index {first})")

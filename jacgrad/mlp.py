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

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from . import _lazy, initializers, kernels, losses
from ._passes import backward_into, carve, carve_gradients, forward_into
from ._validate import float_array, shape_str
from .activations import get as get_activation
from .backend import device_of, get_xp, resolve_device, to_device
from .chain import Chain
from .jacobian import LayerJacobian

__all__ = ["MLP", "ForwardCache", "Gradients"]


@dataclass
class Gradients:
    """What ``MLP.backward`` returns. ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)``,
    ``input: (B, n_in)`` (None when not asked for), ``deltas[j] = ∂L/∂h_j: (B, H_j)``.

    ``flat``: every parameter gradient in ONE 1-D array, ``∂W_0, ∂b_0, ∂W_1, ∂b_1, …`` (each W
    row-major: the order of ``MLP.save``); ``weights[j]`` and ``biases[j]`` are views into it, so
    a global gradient norm or clipping is one operation (``xp.linalg.norm(g.flat)``,
    ``g.flat *= c``). The deltas likewise share one block. A view keeps its whole block alive.
    """

    weights: list
    biases: list
    input: Any
    deltas: list
    flat: Any = None


class ForwardCache:
    """What ``MLP.forward`` keeps for ``backward`` and ``jacobian_chain``: exactly one
    ``(B, H_j)`` array per layer plus a reference (not a copy) to the input ``x``.

    Layer j keeps its output ``y_j`` when ``φ_j'`` is a function of the output (tanh, sigmoid,
    relu, …: ``y`` is both the next layer's input and the derivative's argument), else its
    pre-activation ``h_j`` (gelu, silu, softplus: ``z_j = φ_j(h_j)`` is recomputed in backward
    for ``∂L/∂W_{j+1}``). Memory: ``B · Σ_j H_j`` elements.
    """

    __slots__ = ("x", "saved", "from_output", "_owner", "_acts")

    def __init__(self, x, saved, from_output, owner, acts):
        self.x, self.saved, self.from_output = x, saved, from_output
        self._owner, self._acts = owner, acts

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the saved per-layer arrays (the input is the caller's)."""
        return int(sum(a.nbytes for a in self.saved))

    def layer_output(self, j: int):
        """``z_j: (B, H_j)`` — saved, or recomputed from ``h_j`` (a fresh array)."""
        if j < 0:
            return self.x
        if self.from_output[j]:
            return self.saved[j]
        return kernels.activation_forward(self.saved[j], self._acts[j])

    def layer_output_and_derivative(self, j: int) -> tuple:
        """``(z_j, d_j)``: as ``layer_output``, plus ``d_j = φ_j'(h_j)`` when ``z_j`` had to be
        recomputed from ``h_j`` (one pass gives both: ``kernels.forward_with_derivative``), else None."""
        if j < 0 or self.from_output[j]:
            return self.layer_output(j), None
        return kernels.forward_with_derivative(self.saved[j], self._acts[j])


class MLP:
    """A multilayer perceptron with public ``weights``, ``biases`` and ``activations`` lists.

    ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)``, ``activations[j]``: a name from
    ``jacgrad.activations.names()``. ``activations`` may be one name for every layer.
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
        self._acts = [get_activation(n) for n in names]
        self.weights, self.biases = weights, biases
        self.activations = [a.name for a in self._acts]
        self._token = object()  # identifies this network's caches

    # ------------------------------------------------------------------ construction
    @classmethod
    def init(
        cls,
        sizes: Sequence[int],
        activation: str = "tanh",
        output_activation: str = "identity",
        init: str = "xavier_normal",
        gain: float = 1.0,
        bias_std: float = 0.0,
        seed: int | None = None,
        dtype: str = "float64",
        device: str = "cpu",
    ) -> "MLP":
        """A freshly initialised network ``sizes = [n_in, H_1, …, n_out]``.

        Weights by ``init`` (see ``jacgrad.initializers``) times ``gain``; biases ``N(0, bias_std²)``.
        Drawn in float64 on the host, then cast to ``dtype`` and moved to ``device``
        (``"cpu"``, ``"gpu"`` or ``"auto"``): the same seed gives the same network everywhere.
        """
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes must be at least two positive widths [n_in, …, n_out], got {sizes}")
        if init not in initializers.INITS:
            raise KeyError(f"unknown init {init!r}; valid names: {', '.join(initializers.names())}")
        dt = np.dtype(dtype)
        if dt not in (np.float32, np.float64):
            raise TypeError(f"dtype {dtype!r}: jacgrad works in float32 or float64")
        if bias_std < 0:
            raise ValueError(f"bias_std must be ≥ 0, got {bias_std}")
        device = resolve_device(device)
        acts = [get_activation(activation).name] * (len(sizes) - 2) + [get_activation(output_activation).name]
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
        return MLP([to_device(W, device) for W in self.weights], [to_device(b, device) for b in self.biases], self.activations)

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
        lazy = _lazy.handler_for(x)
        if lazy is not None:  # a Dask array: jacgrad.distributed maps forward over its chunks
            return lazy("__call__", self, x)
        return self.forward(x)[0]

    def forward(self, x: Any, check_finite: bool = False):
        """``y, cache = net.forward(x)``: ``x (B, n_in) -> y (B, n_out)``.

        ``x`` is cast to the network's dtype. The cache keeps one ``(B, H_j)`` array per layer
        (see ``ForwardCache``). ``check_finite=True`` raises ``FloatingPointError`` naming the
        first layer (or the input) where a NaN or Inf appears; without it they propagate.
        """
        if _lazy.handler_for(x) is not None:
            raise TypeError(f"forward takes an in-memory batch, not a {type(x).__module__} array: "
                            "net(X) and jacgrad.distributed map over its chunks")
        xp = get_xp(x, self.weights[0])
        x = float_array(x, "x", xp)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            got = x.shape[1] if x.ndim == 2 else f"an array of shape {shape_str(x.shape)}"
            raise ValueError(f"layer 0 expects {self.sizes[0]} features, got {got} (x must be (B, {self.sizes[0]}))")
        x = x.astype(self.dtype, copy=False)
        if check_finite:
            _require_finite(x, "the input x")
        B = x.shape[0]
        # the hidden layers share one block; the last layer's array is a block of its own, so an
        # output kept on its own (``preds.append(net(x))``) does not keep the hidden ones alive
        _, saved = carve(xp, [(B, H) for H in self.sizes[1:-1]], self.dtype, pooled=True)
        saved += carve(xp, [(B, self.sizes[-1])], self.dtype, pooled=True)[1]
        from_output = [act.df_from_output is not None for act in self._acts]
        z = forward_into(x, self.weights, self.biases, self._acts, saved, check=_require_finite if check_finite else None)
        return z, ForwardCache(x, saved, from_output, self._token, self._acts)

    # ------------------------------------------------------------------ factors and backward
    def _check_cache(self, cache: Any) -> None:
        if not isinstance(cache, ForwardCache):
            raise TypeError(f"expected the cache returned by this network's forward, got {type(cache).__name__}")
        if cache._owner is not self._token:
            raise ValueError("this cache was made by another network's forward; run forward on this network")

    def _factor(self, cache: ForwardCache, j: int) -> LayerJacobian:
        key = "y" if cache.from_output[j] else "h"
        return LayerJacobian.from_activation(self._acts[j], self.weights[j], **{key: cache.saved[j]})

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

    def compile(self, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = False):
        """A ``jacgrad.compiled.TrainingStep``: ``loss, g = step(x, target)`` for batches of ``batch``,
        the numbers of ``loss_and_grads`` from buffers allocated once (a CUDA graph on the GPU)."""
        from .compiled import TrainingStep

        return TrainingStep(self, batch, loss=loss, capture=capture, input_grad=input_grad)

    def loss_and_grads(self, x: Any, target: Any, loss: str = "mse", input_grad: bool = True):
        """``(value, Gradients)`` of ``loss`` (``mse``, ``softmax_cross_entropy``, ``sigmoid_bce``)
        of the network's output against ``target``. ``input_grad=False`` skips ``∂L/∂x`` (one
        GEMM of the ``2K`` a backward pass does), as a training loop may."""
        loss_fn = losses.get(loss)
        y, cache = self.forward(x)
        value, grad_y = loss_fn(y, target)
        return value, self.backward(cache, grad_y, input_grad=input_grad)

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write ``W0, b0, W1, b1, …`` and ``activations`` (one name per layer) to an ``.npz``."""
        from .netfile import save

        save(self, path)

    @classmethod
    def load(cls, path, dtype: str | None = None, device: str = "cpu") -> "MLP":
        """Read a network written by ``save`` (or by hand in the same format: see ``jacgrad.netfile``)."""
        from .netfile import load

        return load(path, dtype=dtype, device=device)


def _require_finite(a, where: str) -> None:
    xp = get_xp(a)
    bad = ~xp.isfinite(a)
    if bool(bad.any()):
        first = tuple(int(i) for i in np.argwhere(np.asarray(get_xp(a).asnumpy(bad) if xp is not np else bad))[0])
        raise FloatingPointError(f"{where} has non-finite values (first at index {first})")

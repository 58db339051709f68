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

from ..nn import initializers
from ..protocol.passes import Gradients
from ..core.layer_list import LayerList
from ..core.validation import float_array, layer_widths, nonnegative_finite, replacement, shape_str
from ..elementwise.activations import get as get_activation
from ..core.backend import device_of, get_xp, resolve_device, to_device
from ..steps.compiled_products import compile_step
from ..io.mlp_interop import InteropMethods
from ..nn.layers import Dense
from ..protocol.layer import layout_changed
from .sequential import Sequential, SequentialCache
from ..core.renamed import renamed

__all__ = ["MLP", "Gradients"]

__getattr__ = renamed(__name__, {"ForwardCache": ("jacgrad.network.sequential.SequentialCache", SequentialCache)})


class MLP(InteropMethods, Sequential):
    """A multilayer perceptron: a ``Sequential`` whose layers are all ``Dense``, with public
    ``weights``, ``biases`` and ``activations`` lists. Everything else (forward, backward,
    ``jacobian_chain``, the products, ``compile_jacobian``) is the ``Sequential``'s own code.

    ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)``, ``activations[j]``: a name from
    ``jacgrad.elementwise.activations.names()``. ``activations`` may be one name for every layer. Every
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
        super().__init__([Dense(W, b, act) for W, b, act in zip(weights, biases, acts)])
        self._weights = LayerList(weights, "weights", self._check_weight)
        self._biases = LayerList(biases, "biases", self._check_bias)
        self._activations = LayerList(acts, "activations", self._check_activation, show=_activation_name)

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
        layout_changed()  # a network's plans (nn.stack.Plan) read the activation: its buffer shapes
        return act

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
        Weights by ``init`` (see ``jacgrad.nn.initializers``) times ``gain`` (finite, ≥ 0); biases
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
        return MLP([to_device(W, device) for W in self.weights], [to_device(b, device) for b in self.biases],
                   self._activations.stored)

    # ------------------------------------------------------------------ properties
    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def device(self) -> str:
        return device_of(self.weights[0])

    def __repr__(self) -> str:
        layers = ", ".join(f"{a}" for a in self.activations)
        return f"MLP({'-'.join(map(str, self.sizes))}, [{layers}], {self.dtype}, {self.device})"

    # ------------------------------------------------------------------ compiled step
    def compile(self, batch: int, loss: str = "mse", capture: Any = "auto", input_grad: bool = False, *,
                clip: Any = None, noise_multiplier: float = 0.0, seed: Any = None, expected_batch_size: Any = None,
                tokens: Any = None, product: str = "step", **options):
        """A ``jacgrad.steps.compiled.TrainingStep``: ``loss, g = step(x, target)`` for batches of ``batch``,
        the numbers of ``loss_and_grads`` (bitwise on NumPy, for any memory layout of ``x`` and
        ``target``) from buffers allocated once (a CUDA graph on the GPU).

        The results ARE the step's buffers: the next call overwrites ``loss`` and every array of
        ``g`` in place. To keep a value across steps, take ``float(loss)`` or call
        ``step(x, t, copy=True)``; ``losses.append(loss)`` collects the same 0-d array many times.
        
        ``clip=C`` (with ``noise_multiplier=σ``, ``seed``, ``expected_batch_size``): a private
        DP-SGD step returning ``(loss, ClippedGradients)``, the numbers of ``clipped_grad``
        (``jacgrad.steps.private_step``: the noise is drawn after the graph, every call).
        ``tokens=T``: the MLP per token, ``x (B, T, n_in)`` and targets ``(B, T, n_out)``.
        ``product="grad_norms" | "grads" | "ntk" | "ggn_vp" | "ggn_diagonal"``: that product compiled
        with the same contract (``jacgrad.steps.compiled_products``).
        """
        training = dict(input_grad=input_grad, clip=clip, noise_multiplier=noise_multiplier, seed=seed,
                        expected_batch_size=expected_batch_size)
        return compile_step(self, batch, product, loss, capture, tokens, training, options)

    _dense_only = True  # from_torch (Sequential's one reader) refuses anything but Linear + activation

    @classmethod
    def _of_layers(cls, layers):
        bare = [j for j, L in enumerate(layers) if not L.has_bias]
        if bare:
            raise TypeError(f"layer {bare[0]} is a bias-free Dense: an MLP's layers all have a bias (its biases "
                            f"list); keep it a jg.Sequential")
        return cls([L.W for L in layers], [L.b for L in layers], [L._act for L in layers])

    # ------------------------------------------------------------------ files
    def save(self, path) -> None:
        """Write ``W0, b0, W1, b1, …`` and the activation names to ``.npz`` or ``.safetensors``
        (by suffix, in any case, at exactly ``path``; any other suffix is a ``ValueError``). The
        file is replaced only once the new one is complete (see ``jacgrad.io.netfile``). A network
        with a shared parameter (one layer used twice, tied weights) is written in Sequential's
        layout instead, which stores it once and records the tie (``MLP.load`` reads both)."""
        from ..io.netfile import save, save_layers

        if self._ties().shared:
            save_layers(self.layers, path)
            return
        save(self.weights, self.biases, self.activations, path)

    @classmethod
    def load(cls, path, dtype: str | None = None, device: str = "cpu", activations=None) -> "MLP":
        """Read a network from ``.npz`` or ``.safetensors`` (written by ``save``, or by hand in the
        same layout) or a torch ``nn.Sequential`` state dict (``.safetensors``, ``.pt``/``.pth``,
        read with ``weights_only=True``); ``activations=``: the names for files that carry none.
        A layer whose bias the file leaves out (a ``Linear(bias=False)``) is a ``ValueError`` naming
        it: ``jg.Sequential.load`` keeps it bias-free. Formats and errors: ``jacgrad.io.netfile``."""
        from ..io.netfile import load

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


"""``Conv1d`` and ``Conv2d``: torch's convolutions (NCHW / NCL, weight ``(C_out, C_in/G, kh, kw)``)
as layers of jacgrad, with the Jacobian kept as ``diag(φ'(h)) · C_W`` (``conv_factors``).

``z: (B, C_in, H, W) -> φ(conv(z, W) + b): (B, C_out, H_out, W_out)`` (Conv1d: ``(B, C, L)``, run
as the ``H = 1`` case). Stride, padding (int, pair, ``"valid"``, ``"same"`` with torch's rule
for even kernels), dilation, groups (depthwise included) and bias as in ``torch.nn.Conv2d``;
``b=None`` is torch's ``bias=False`` (no bias parameter). Every product is an im2col GEMM
(``_im2col``) chunked over the batch under ``max_memory`` bytes of patches.

Weight leaf (for the per-sample products): ``param_input(state)`` is the patch matrix
``A: (B, T, p)``, ``T = H_out·W_out`` output positions (row-major), ``p = (C_in/G)·kh·kw`` in
torch's weight order; its ``Δ: (B, T, C_out)`` is ``δ.reshape(B, C_out, T).transpose(0, 2, 1)``
with ``δ = ∂L/∂h`` as ``backward`` returns it. Per sample ``∂W_b = (Δ_bᵀ A_b).reshape(W.shape)``
and ``∂b_b = Σ_t Δ_b[t]``. With ``groups = G > 1``, ``A: (B, G, T, p)``: group ``g`` pairs
``A[:, g]`` with ``Δ[..., g·C_out/G:(g+1)·C_out/G]``.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.Conv2d(np.ones((2, 1, 3, 3)), np.zeros(2), padding="same", activation="relu")
    >>> y, state = L.forward(np.ones((1, 1, 4, 4)))
    >>> y.shape, float(y[0, 0, 0, 0]), L.factor(state).h_in
    ((1, 2, 4, 4), 4.0, 16)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from . import im2col as _im2col
from ..cuda import kernels
from .im2col import Geometry, check_input, pair
from ..core.validation import check_max_memory, float_array, shape_str
from ..elementwise.activations import get as get_activation
from ..core.backend import get_xp
from .ops import ConvOp
from .leaves import ConvLeaf, LeafSpatialFactor
from ..protocol.layer import register_layer

__all__ = ["Conv1d", "Conv2d"]


class Conv2d:
    """``torch.nn.Conv2d`` with a fused activation. ``W: (C_out, C_in/groups, kh, kw)``,
    ``b: (C_out,)`` or None; ``in_shape = (C_in, H, W)`` optional (needed by ``forward_shapes``,
    ``n_in``/``n_out``; forward accepts any spatial size). Keeps for backward its input and one
    array of the output's shape (``y`` where φ' is a function of it, else ``h``)."""

    kind = "conv2d"
    _dims = 2
    spec_fields = {"activation": str, "stride": (int, list), "padding": (int, str, list), "dilation": (int, list),
                   "groups": int, "bias": bool, "in_shape": (list, type(None))}

    def __init__(self, W: Any, b: Any = None, stride=1, padding=0, dilation=1, groups: int = 1,
                 activation: str = "identity", in_shape: Sequence[int] | None = None, max_memory=None):
        name = type(self).__name__
        xp = get_xp(W) if b is None else get_xp(W, b)
        W = float_array(W, "W", xp)
        if W.ndim != self._dims + 2 or min(W.shape) < 1:
            want = "(C_out, C_in/groups, kh, kw)" if self._dims == 2 else "(C_out, C_in/groups, k)"
            raise ValueError(f"{name}: W must be {want} with every size ≥ 1, got shape {shape_str(W.shape)}")
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 or W.shape[0] % groups:
            raise ValueError(f"{name}: groups must be an int ≥ 1 dividing C_out = {W.shape[0]}, got {groups!r}")
        if b is not None:
            b = float_array(b, "b", xp)
            if b.shape != (W.shape[0],) or b.dtype != W.dtype:
                raise ValueError(f"{name}: b is {shape_str(b.shape)} {b.dtype} but W {shape_str(W.shape)} {W.dtype} "
                                 f"needs ({W.shape[0]},) {W.dtype}")
        self._W, self._b, self._groups = W, b, int(groups)
        self._act = get_activation(activation)
        self._max_memory = check_max_memory(max_memory)
        self._stride, self._dilation = self._lift(stride, "stride", 1), self._lift(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding {padding!r} is not one of 'valid', 'same', an int or a tuple of ints")
            self._padding = padding
        else:
            self._padding = self._lift(padding, "padding", 0)
        self._geos: dict = {}
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        self.out_shape = None if in_shape is None else self.output_shape(self.in_shape)

    def _lift(self, value, what: str, minimum: int) -> tuple[int, int]:
        """torch's int-or-tuple argument as the 2-D pair (Conv1d: ``(1, k)`` / ``(0, p)``)."""
        if self._dims == 2:
            return pair(value, what, type(self).__name__, minimum)
        v = value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
        return (minimum, pair(v, what, type(self).__name__, minimum)[0])

    W = property(lambda self: self._W, doc="``(C_out, C_in/groups, kh, kw)`` (Conv1d: ``(C_out, C_in/groups, k)``)")
    b = property(lambda self: self._b, doc="``(C_out,)`` or None")
    weight, bias = W, b
    activation = property(lambda self: self._act.name)
    groups = property(lambda self: self._groups)
    in_channels = property(lambda self: self._W.shape[1] * self._groups)
    out_channels = property(lambda self: self._W.shape[0])
    n_in = property(lambda self: None if self.in_shape is None else int(np.prod(self.in_shape)))
    n_out = property(lambda self: None if self.out_shape is None else int(np.prod(self.out_shape)))

    @property
    def names(self) -> tuple:
        return ("weight",) if self._b is None else ("weight", "bias")

    @property
    def params(self) -> list:
        return [self._W] + ([] if self._b is None else [self._b])

    def _torch_args(self):
        one = (lambda p: p[1]) if self._dims == 1 else (lambda p: p)
        pad = self._padding if isinstance(self._padding, str) else one(self._padding)
        return one(self._stride), pad, one(self._dilation)

    def spec(self) -> dict:
        stride, padding, dilation = self._torch_args()
        return {"kind": self.kind, "activation": self._act.name, "stride": stride, "padding": padding,
                "dilation": dilation, "groups": self._groups, "bias": self._b is not None,
                "in_shape": None if self.in_shape is None else list(self.in_shape)}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None):
        """The layer of a file's ``spec`` and arrays ``weight`` (and ``bias`` where ``spec["bias"]``)."""
        size = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        return cls(params["weight"], params.get("bias"), stride=size(spec["stride"]), padding=size(spec["padding"]),
                   dilation=size(spec["dilation"]), groups=spec["groups"], activation=spec["activation"],
                   in_shape=spec["in_shape"])

    @classmethod
    def file_names(cls, spec: dict) -> tuple:
        """The arrays a file stores for it: ``weight``, and ``bias`` unless ``bias=False``."""
        return ("weight", "bias") if spec["bias"] else ("weight",)

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple:
        """The weight is 3-D/4-D and the bias ``(C_out,)``; ``(None, None)``: image widths do not chain."""
        (W, key), want = shapes["weight"], cls._dims + 2
        if len(W) != want:
            raise ValueError(f"layer {where} ({cls.kind}): {key} must be {want}-D (C_out, C_in/groups, …), got shape {W}")
        b = shapes.get("bias")
        if b is not None and b[0] != (W[0],):
            raise ValueError(f"layer {where} ({cls.kind}): {b[1]} has shape {b[0]}; it must be ({W[0]},)")
        return None, None

    def bind_in_shape(self, in_shape) -> tuple:
        """Fix the per-sample input shape (``Sequential`` passes each layer its predecessor's
        output); returns ``out_shape``. A layer built with another ``in_shape`` is a ``ValueError``."""
        in_shape = tuple(int(s) for s in in_shape)
        if self.in_shape is not None and self.in_shape != in_shape:
            raise ValueError(f"{self!r} was built for inputs {self.in_shape} but is given {in_shape}")
        out = self.output_shape(in_shape)
        self.in_shape, self.out_shape = in_shape, out
        return out

    def param_leaves(self) -> list:
        """One ``ConvLeaf`` (per-group blocks of the weight, and the bias), paired with the patches."""
        return [ConvLeaf(self._groups, self._b is not None)]

    def __repr__(self) -> str:
        stride, padding, dilation = self._torch_args()
        return (f"{type(self).__name__}({self.in_channels}->{self.out_channels}, kernel={self._W.shape[2:]}, "
                f"stride={stride}, padding={padding!r}, dilation={dilation}, groups={self._groups}, {self._act.name})")

    # ------------------------------------------------------------------ geometry
    def geometry(self, in_shape) -> Geometry:
        """The ``_im2col.Geometry`` on a per-sample input ``(C_in, H, W)`` (Conv1d: ``(C_in, L)``)."""
        key = tuple(in_shape)
        if key not in self._geos:
            shape4 = key if self._dims == 2 else (key[0], 1, key[1])
            kernel = (self.out_channels,) + (self._W.shape[2:] if self._dims == 2 else (1, self._W.shape[2]))
            self._geos[key] = Geometry.make(type(self).__name__, shape4, kernel, self._stride, self._padding,
                                            self._dilation)
        return self._geos[key]

    def output_shape(self, in_shape) -> tuple:
        """The per-sample output shape on ``in_shape``: ``(C_out, H_out, W_out)`` (Conv1d: ``(C_out, L_out)``)."""
        if len(in_shape) != self._dims + 1 or in_shape[0] != self.in_channels:
            raise ValueError(f"{type(self).__name__}: in_shape {tuple(in_shape)} is not (C_in, {'H, W' if self._dims == 2 else 'L'}) "
                             f"with C_in = {self.in_channels}")
        Ho, Wo = self.geometry(in_shape).out_hw
        return (self.out_channels, Ho, Wo) if self._dims == 2 else (self.out_channels, Wo)

    def _Wg(self):
        G = self._groups
        return self._W.reshape(G, self.out_channels // G, -1)

    def _images(self, z):
        what = "(B, C, H, W)" if self._dims == 2 else "(B, C, L)"
        check_input(z, type(self).__name__, self.in_channels, self._dims + 2, what)
        geo = self.geometry(z.shape[1:])
        return (z if self._dims == 2 else z[:, :, None, :]), geo

    # ------------------------------------------------------------------ protocol
    def forward_shapes(self, B: int) -> list:
        """``[(B, *out_shape)]`` (the output, which also keeps ``y``), and a second where φ' needs ``h``."""
        if self.out_shape is None:
            raise ValueError(f"{self!r}: forward_shapes needs in_shape; build the layer with in_shape=(C, H, W)")
        n = 1 if self._act.df_from_output is not None else 2
        return [(B,) + self.out_shape] * n

    def backward_shapes(self, B: int, input_grad: bool = True) -> list:
        """``δ: (B, *out_shape)`` and, with ``input_grad``, ``∂L/∂z: (B, *in_shape)``."""
        if self.out_shape is None:
            raise ValueError(f"{self!r}: backward_shapes needs in_shape; build the layer with in_shape=(C, H, W)")
        return [(B,) + self.out_shape] + ([(B,) + self.in_shape] if input_grad else [])

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, C_in, H, W) -> (B, C_out, H_out, W_out)``; returns ``(y, state)``; ``out``: the
        buffers of ``forward_shapes`` (fresh when None)."""
        z4, geo = self._images(z)
        from_output = self._act.df_from_output is not None
        xp = get_xp(z, self._W)
        shape = (z.shape[0],) + ((self.out_channels,) + geo.out_hw if self._dims == 2 else (self.out_channels, geo.out_hw[1]))
        bufs = out if out is not None else [xp.empty(shape, dtype=z.dtype) for _ in range(1 if from_output else 2)]
        h = bufs[0] if from_output else bufs[1]
        _im2col.conv(z4, self._Wg(), geo, self._groups, self._max_memory, out=h.reshape((z.shape[0], self.out_channels) + geo.out_hw))
        if self._b is not None:
            h += self._b.reshape((-1,) + (1,) * self._dims)
        name = where if isinstance(where, str) else f"layer {where}"
        if check is not None:
            check(h, f"{name}: pre-activation h")
        y = kernels.activation_forward(h, self._act, out=h if from_output else bufs[0])
        if check is not None:
            check(y, f"{name}: output z")
        return y, (z, y if from_output else h, from_output, geo)

    def factor(self, state) -> LeafSpatialFactor:
        """``diag(φ'(h)) · C_W`` (no diagonal for the identity), rows the flattened images."""
        _, saved, from_output, geo = state
        d = None
        if self._act.name != "identity":
            d = kernels.derivative(saved, self._act, from_output=from_output).reshape((saved.shape[0], self.out_channels) + geo.out_hw)
        return LeafSpatialFactor(ConvOp(self._Wg(), geo, self._groups, self._max_memory), d, anchor=self._W)

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g = ∂L/∂y`` (only read); writes ``∂W`` (and ``∂b``) into ``grads``; returns ``(∂L/∂z or
        None, δ = ∂L/∂h)``. ``sq: (B,)`` gets ``‖∂W_b‖² + ‖∂b_b‖²`` per sample added when given."""
        z, saved, from_output, geo = state
        z4 = z if self._dims == 2 else z[:, :, None, :]
        B = g.shape[0]
        delta = kernels.scale_cotangent(g, saved, self._act, from_output=from_output, out=None if out is None else out[0])
        if check is not None:
            check(delta, f"{where if isinstance(where, str) else f'layer {where}'}: gradient ∂L/∂h")
        d4 = delta.reshape((B, self.out_channels) + geo.out_hw)
        xp = get_xp(delta)
        gW = xp.empty(self._Wg().shape, dtype=delta.dtype)
        _im2col.weight_grad(z4, d4, geo, self._groups, gW, self._max_memory)
        grads[0][...] = gW.reshape(self._W.shape)
        if self._b is not None:
            grads[1][...] = d4.sum(axis=(0, 2, 3))
        if sq is not None:
            sq += _im2col.per_sample_sq_norms(z4, d4, geo, self._groups, self._max_memory)
            if self._b is not None:
                s = d4.sum(axis=(2, 3))
                sq += (s * s).sum(axis=1)
        if not input_grad:
            return None, delta
        gin = _im2col.conv_transpose(d4, self._Wg(), geo, self._groups, self._max_memory).reshape(z.shape)
        if out is not None and len(out) > 1:
            out[1][...] = gin
            gin = out[1]
        return gin, delta

    def param_input(self, state):
        """The patch matrix ``A: (B, T, p)`` (``(B, G, T, p)`` with groups): see the module docstring."""
        z, _, _, geo = state
        z4 = z if self._dims == 2 else z[:, :, None, :]
        B, T = z.shape[0], geo.out_hw[0] * geo.out_hw[1]
        A = _im2col.im2col(z4, geo, self._groups).reshape(self._groups, -1, B, T).transpose(2, 0, 3, 1)
        # batch first (a[sel] selects samples); a view, not a copy: each sample's (T, p) block has unit
        # stride along T, so the leaves' GEMMs run on it through the BLAS as they are (the (G, p, B·T)
        # layout: its long rows make those GEMMs faster than the batch-first gather's (p, T) blocks)
        return A[:, 0] if self._groups == 1 else A


class Conv1d(Conv2d):
    """``torch.nn.Conv1d`` with a fused activation: ``W: (C_out, C_in/groups, k)``, input
    ``(B, C_in, L) -> (B, C_out, L_out)``; ``in_shape = (C_in, L)``. Everything else as ``Conv2d``."""

    kind = "conv1d"
    _dims = 1


register_layer("conv2d", Conv2d)
register_layer("conv1d", Conv1d)

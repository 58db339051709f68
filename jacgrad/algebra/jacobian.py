"""LayerJacobian: the Jacobian of one dense layer kept as its two factors, diag(d) · Wᵀ.

For ``z = φ(z_prev @ W + b)`` with ``W: (H_in, H_out)``, the per-sample Jacobian is
``J = ∂z/∂z_prev = diag(φ'(h)) · Wᵀ``, shape ``(H_out, H_in)``. The diagonal ``d`` is either
shared by all samples, ``(H_out,)``, or per sample, ``(B, H_out)``. The algebra of the factor
is written once here; ``Chain`` and ``MLP`` call it.

    >>> import numpy as np, jacgrad as jg
    >>> W = np.arange(6.0).reshape(2, 3)          # H_in = 2, H_out = 3
    >>> J = jg.LayerJacobian(np.array([1.0, 0.5, 0.0]), W)
    >>> J.vjp(np.ones((1, 3)))                     # (v * d) @ Wᵀ
    array([[0.5, 5. ]])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..cuda import kernels
from ..cuda.gemm import matmul, matmul_into
from ..core.validation import float_array, shape_str
from ..elementwise.activations import Activation
from ..elementwise.activations import get as get_activation
from ..core.backend import get_xp

__all__ = ["LayerJacobian"]


def _check_sample_selection(sel) -> None:
    """``sel`` of ``rows``: a slice or a 1-D index array, with a message that says so otherwise."""
    if isinstance(sel, slice):
        return
    if isinstance(sel, (int, np.integer)) or (getattr(sel, "ndim", None) == 0 and np.dtype(sel.dtype).kind in "iu"):
        raise TypeError(f"rows({sel!r}): give a slice or an index array of samples, e.g. rows([{int(sel)}]) "
                        f"or rows(slice({int(sel)}, {int(sel) + 1})); the result keeps the batch axis")
    ndim = getattr(sel, "ndim", None)
    if ndim is None:
        ndim = np.ndim(sel) if isinstance(sel, (list, tuple)) else -1
    dtype = getattr(sel, "dtype", None)
    if dtype is None and isinstance(sel, (list, tuple)):
        dtype = np.asarray(sel).dtype if len(sel) else np.dtype(np.int64)
    if ndim != 1 or dtype is None or np.dtype(dtype).kind not in "biu":
        raise TypeError(f"rows: sel must be a slice or a 1-D integer or boolean index array of samples; "
                        f"got {type(sel).__name__}{f' of dtype {dtype}' if dtype is not None else ''}"
                        f"{f' with {ndim} dimensions' if ndim not in (None, -1, 1) else ''}")


class LayerJacobian:
    """``diag(d) · Wᵀ`` with ``d: (H_out,)`` shared or ``(B, H_out)`` per sample, ``W: (H_in, H_out)``.

    ``W`` is referenced, never copied; ``diag(d)`` is never built. The diagonal may also be
    implicit — the layer's activation and its saved pre-activation ``h`` or output ``y``
    (``LayerJacobian.from_activation``) — in which case products scale by ``φ'`` in one fused
    pass (a CUDA kernel on the GPU) without materialising ``d``.
    """

    __slots__ = ("W", "_d", "_x", "_act", "_from_output", "batch", "h_in", "h_out")

    def __init__(self, d: Any, W: Any):
        xp = get_xp(d, W)
        W = float_array(W, "W", xp)
        d = float_array(d, "d", xp)
        self._set_weight(W)
        if d.ndim not in (1, 2) or d.shape[-1] != self.h_out:
            raise ValueError(
                f"d has shape {shape_str(d.shape)} but W has shape {shape_str(W.shape)}: "
                f"d must be (H_out,) or (B, H_out) with H_out = {self.h_out} (W is (H_in, H_out))"
            )
        self._d, self._x, self._act, self._from_output = d, None, None, False
        self.batch = d.shape[0] if d.ndim == 2 else None

    @classmethod
    def from_activation(cls, activation: str | Activation, W: Any, *, h: Any = None, y: Any = None) -> "LayerJacobian":
        """The factor of a layer ``y = φ(h)``, ``h = z_prev @ W + b``, from ``h`` or from ``y``.

        ``h``/``y``: ``(B, H_out)`` or ``(H_out,)``. Give ``y`` only for activations whose
        derivative is a function of the output (``Activation.df_from_output`` is not None).
        """
        act = get_activation(activation) if isinstance(activation, str) else activation
        if (h is None) == (y is None):
            raise ValueError("give exactly one of h (pre-activation) or y (output)")
        if y is not None and act.df_from_output is None:
            raise ValueError(f"activation {act.name!r} has no derivative from its output; pass h instead of y")
        x = h if y is None else y
        xp = get_xp(x, W)
        self = cls.__new__(cls)
        self._set_weight(float_array(W, "W", xp))
        x = float_array(x, "h" if y is None else "y", xp)
        if x.ndim not in (1, 2) or x.shape[-1] != self.h_out:
            raise ValueError(
                f"{'h' if y is None else 'y'} has shape {shape_str(x.shape)} but W has shape "
                f"{shape_str(self.W.shape)}: it must be (H_out,) or (B, H_out) with H_out = {self.h_out}"
            )
        self._d, self._x, self._act, self._from_output = None, x, act, y is not None
        self.batch = x.shape[0] if x.ndim == 2 else None
        return self

    def rows(self, sel) -> "LayerJacobian":
        """The factor of the samples ``sel`` — the same ``W``, not copied.

        ``sel``: a slice, or a 1-D integer or boolean index array (or list); a single integer is a
        ``TypeError`` — the result keeps its batch axis (``rows([0])`` for one sample). A shared
        factor is returned as it is."""
        _check_sample_selection(sel)
        if not self.per_sample:
            return self
        out = LayerJacobian.__new__(LayerJacobian)
        out.W, out.h_in, out.h_out = self.W, self.h_in, self.h_out
        out._act, out._from_output = self._act, self._from_output
        out._d = None if self._d is None else self._d[sel]
        out._x = None if self._x is None else self._x[sel]
        out.batch = (out._d if out._d is not None else out._x).shape[0]
        return out

    def _set_weight(self, W) -> None:
        if W.ndim != 2:
            raise ValueError(f"W must be 2-D (H_in, H_out), got shape {shape_str(W.shape)}")
        self.W = W
        self.h_in, self.h_out = W.shape

    # ------------------------------------------------------------------ properties
    @property
    def xp(self):
        return get_xp(self.W)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H_out, H_in)`` — the shape of one sample's Jacobian."""
        return (self.h_out, self.h_in)

    @property
    def per_sample(self) -> bool:
        return self.batch is not None

    @property
    def dtype(self) -> np.dtype:
        x = self._d if self._d is not None else self._x
        return np.result_type(x.dtype, self.W.dtype)

    @property
    def d(self):
        """The diagonal φ'(h): ``(H_out,)`` or ``(B, H_out)`` (computed when it is implicit)."""
        if self._d is not None:
            return self._d
        return kernels.derivative(self._x, self._act, from_output=self._from_output)

    @property
    def activation(self) -> Activation | None:
        return self._act

    def __repr__(self) -> str:
        where = "per-sample" if self.per_sample else "shared"
        b = f"B={self.batch}, " if self.per_sample else ""
        src = f", φ={self._act.name}" if self._act is not None else ""
        return f"LayerJacobian({b}{self.h_out}x{self.h_in}, {where} diagonal{src}, dtype={self.dtype})"

    # ------------------------------------------------------------------ products
    def scale(self, a: Any, out: Any = None):
        """``a ⊙ d`` for ``a: (N, H_out)`` (N = B when d is per sample) or ``(H_out,)``.

        The one place a cotangent or tangent is multiplied by the diagonal: with an implicit
        diagonal it is the fused ``v · φ'(x)`` kernel. ``out`` may be ``a`` itself.
        """
        a = self._check_rows(a, self.h_out, "cotangent")
        diag = self._d if self._d is not None else self._x
        if out is not None and out.dtype != np.result_type(a.dtype, diag.dtype):
            out = None  # never narrow a wider result into a float32 buffer
        if self._d is None and a.dtype == diag.dtype:
            return kernels.scale_cotangent(a, self._x, self._act, from_output=self._from_output, out=out)
        return get_xp(a).multiply(a, self.d, out=out)

    def vjp(self, v: Any):
        """Jᵀv = ``(v ⊙ d) @ Wᵀ``: ``v (B, H_out) -> (B, H_in)`` (or ``(H_out,) -> (H_in,)`` when shared)."""
        return self.through_weights_t(self.scale(v))

    def jvp(self, u: Any, out: Any = None):
        """Ju = ``(u @ W) ⊙ d``: ``u (B, H_in) -> (B, H_out)`` (or ``(H_in,) -> (H_out,)`` when shared).

        ``out``: optional ``(B, H_out)`` array of the result's dtype to write into (not ``u``).
        """
        u = self._check_rows(u, self.h_in, "tangent")
        t = self._matmul(u, self.W, out, "jvp")
        return self.scale(t, out=t)

    def through_weights_t(self, delta: Any, out: Any = None):
        """``delta @ Wᵀ``: ``(N, H_out) -> (N, H_in)`` — the weight half of the VJP (δ = ∂L/∂h given).

        ``out``: optional ``(N, H_in)`` array of the result's dtype to write into (not ``delta``);
        ``W`` is read through the transposed view, never copied.
        """
        delta = self._check_rows(delta, self.h_out, "delta")
        return self._matmul(delta, self.W.T, out, "through_weights_t")

    @staticmethod
    def _matmul(a, b, out, where: str):
        """``a @ b``, into ``out`` when given (checked: same device, dtype and shape as the result)."""
        if out is None:
            return matmul(a, b)
        xp = get_xp(a, b)
        shape = a.shape[:-1] + b.shape[-1:]
        dtype = np.result_type(a.dtype, b.dtype)
        if get_xp(out) is not xp:
            raise TypeError(f"{where}: out is on a different device than the inputs")
        if out.dtype != dtype or out.shape != shape:
            raise ValueError(
                f"{where}: out is {shape_str(out.shape)} {out.dtype} but the result is {shape_str(shape)} {np.dtype(dtype)}"
            )
        return matmul_into(a, b, out)

    def _check_rows(self, a: Any, width: int, what: str):
        xp = get_xp(a, self.W)
        a = float_array(a, what, xp)
        if a.ndim not in (1, 2) or a.shape[-1] != width:
            raise ValueError(
                f"{what} has shape {shape_str(a.shape)} but this factor (H_out={self.h_out}, H_in={self.h_in}) "
                f"needs (N, {width})"
            )
        if self.per_sample:
            if a.ndim != 2 or a.shape[0] != self.batch:
                raise ValueError(
                    f"{what} has shape {shape_str(a.shape)} but the diagonal is per sample with B={self.batch}: "
                    f"needs ({self.batch}, {width})"
                )
        return a

    # ------------------------------------------------------------------ dense and spectra
    def scale_stack(self, a: Any, inplace: bool = False):
        """``a ⊙ d`` with d broadcast over the rows of each sample's block.

        ``a: (B, r, H_out)`` or ``(r, H_out)`` -> ``(B, r, H_out)`` (or ``(r, H_out)`` when both are
        shared). Used by ``Chain.jacobian``, where ``a`` stacks r cotangents or tangents per sample.
        ``inplace`` writes into ``a`` when the broadcast result has ``a``'s shape.
        """
        xp = get_xp(a, self.W)
        dd = self.d[..., None, :]
        if inplace and a.ndim >= dd.ndim and a.dtype == np.result_type(a.dtype, dd.dtype):
            return xp.multiply(a, dd, out=a)
        return a * dd

    # ------------------------------------------------------------------ split at the parameters
    def param_vjp_stack(self, A: Any, need_input: bool = True):
        """The reverse sweep split at the parameters (``h = a W + b`` between ``Wᵀ`` and the
        diagonal): ``([G], A_in)`` for output cotangent rows ``A: (B, R, H_out)``: ``G = A ⊙ d`` at
        ``h`` (written into ``A``), ``A_in = G Wᵀ: (B, R, H_in)`` (None unless ``need_input``)."""
        G = self.scale_stack(A, inplace=True)
        if not need_input:
            return [G], None
        B, R = G.shape[0], G.shape[1]
        xp = get_xp(G)
        return [G], matmul(xp.ascontiguousarray(G).reshape(B * R, self.h_out), self.W.T).reshape(B, R, self.h_in)

    def param_jvp(self, t: Any, leaf_tangent):
        """The forward tangent with a parameter tangent added at ``h``: ``d ⊙ leaf_tangent(0, t W)``
        (``t: (B, H_in)`` or None for 0; ``leaf_tangent(i, base)``: leaf i's tangent plus ``base``)."""
        out = leaf_tangent(0, None if t is None else matmul(t, self.W))
        return self.scale(out, out=out)

    def dense(self, transposed: bool = False):
        """The Jacobian as an array: ``(H_out, H_in)`` shared, ``(B, H_out, H_in)`` per sample.

        ``transposed=True`` gives ``Jᵀ`` (``(…, H_in, H_out)``), built directly in that layout.
        """
        d = self.d
        if transposed:
            return self.W * d[..., None, :]
        return d[..., :, None] * self.W.T

    def singular_values(self):
        """Exact singular values, descending: ``(k,)`` shared or ``(B, k)``, ``k = min(H_out, H_in)``."""
        from .spectra import singular_values

        return singular_values(self.dense())

    def spectral_norm(self):
        """‖diag(d)·Wᵀ‖₂ exactly: a 0-d array when shared, ``(B,)`` per sample."""
        from .spectra import spectral_norm_dense

        return spectral_norm_dense(self.dense())

    def norm_bound(self):
        """``max|d| · ‖W‖₂`` — the submultiplicative bound ‖diag(d)‖₂‖Wᵀ‖₂ ≥ ‖J‖₂: 0-d or ``(B,)``."""
        from .spectra import matrix_2norm

        xp = self.xp
        d = self.d
        if d.shape[-1] == 0 or (d.ndim == 2 and d.shape[0] == 0):
            return xp.zeros(d.shape[:-1], dtype=self.dtype)
        return xp.abs(d).max(axis=-1) * matrix_2norm(self.W)

"""The convolutional family's parameter side: a convolution's weight leaf (``ConvLeaf``, a
``TokenDenseLeaf`` per group in torch's weight layout) and the split of an image factor at its
parameters (``LeafSpatialFactor``), which is all the parameter-space products read.

A parameterised image layer computes ``y = φ(h)``, ``h = L(x) + (its parameter term)``, with
``L`` a linear map of images (a convolution ``C_W``; eval BatchNorm's per-channel ``γ/σ``).
Its parameters act at ``h``, per output position ``t`` (``T = H_out·W_out`` tokens) and
channel: the leaf pairs ``a: (B, T, p)`` (im2col patches; BatchNorm's ``x̂`` channels-last) with
``Δ: (B, T, C_out)``, the cotangent at ``h`` channels-last.

``ConvLeaf`` — the weight ``(C_out, C_in/G, kh, kw)`` is ``Wᵀ`` of the dense leaf's ``(p, d)``
layout, one block per group g (``a[:, g]: (B, T, p)`` with ``p = (C_in/G)·kh·kw``, channels
``g·C_out/G …``): each method runs ``TokenDenseLeaf`` on the group's slices, writing through
transposed views, so the algebra (gram/instantiate, the NTK cross-Gram, the GGN diagonal)
stays written once.

    >>> import numpy as np
    >>> leaf = ConvLeaf(groups=1, bias=True)
    >>> a, d = np.ones((2, 3, 4)), np.ones((2, 3, 5))           # B=2, T=3, p=4, C_out=5
    >>> float(leaf.sq_norms(a, d)[0]) == 5 * 4 * 9 + 5 * 9      # ‖Aᵀ Δ‖² + ‖Σ_t Δ_t‖²
    True
"""

from __future__ import annotations

from typing import Any, Sequence

from ..cuda.gemm import matmul_into
from ..protocol.passes import column_sums
from ..core.backend import get_xp
from .factors import SpatialFactor
from ..protocol.leaves import TokenDenseLeaf

__all__ = ["ConvLeaf", "LeafSpatialFactor", "to_images", "to_tokens"]


def to_tokens(x, n_lead: int):
    """``(*lead, C, *spatial) -> (*lead, T, C)`` (channels last, ``T = prod(spatial)``), contiguous."""
    lead, C = x.shape[:n_lead], x.shape[n_lead]
    return get_xp(x).ascontiguousarray(x.reshape(lead + (C, -1)).swapaxes(-1, -2))


def to_images(x, image_shape: tuple):
    """``(*lead, T, C) -> (*lead, C, *spatial)`` for per-sample ``image_shape = (C, *spatial)``."""
    lead = x.shape[:-2]
    return get_xp(x).ascontiguousarray(x.swapaxes(-1, -2)).reshape(lead + tuple(image_shape))


class ConvLeaf:
    """A convolution's weight ``(C_out, C_in/G, kh, kw)`` (Conv1d: ``(C_out, C_in/G, k)``) and
    optional bias ``(C_out,)``, ``G = groups``. ``a``: ``(B, T, p)``, or ``(B, G, T, p)`` with
    groups; ``δ``/``G`` cotangents ``(B, [R,] T, C_out)``."""

    def __init__(self, groups: int = 1, bias: bool = True):
        self.groups, self.bias = int(groups), bool(bias)
        self.n_arrays = 2 if self.bias else 1
        self._dense = TokenDenseLeaf(bias=self.bias)

    def __repr__(self) -> str:
        return f"ConvLeaf(groups={self.groups}, bias={self.bias})"

    # ---- the per-group pieces: a's block, the cotangent's channels, the views in (p, d) layout
    def _a(self, a, g):
        return a if self.groups == 1 else a[:, g]

    def _ch(self, x, g):
        d = x.shape[-1] // self.groups
        return x if self.groups == 1 else x[..., g * d:(g + 1) * d]

    def _views(self, views, g, lead: int):
        """Group g's views in the dense leaf's layout: weight ``(…, p, d)`` (a transposed view of
        torch's ``(…, d, C_in/G, kh, kw)``), bias ``(…, d)``; ``lead`` leading axes (B, or none)."""
        W = views[0]
        shape = W.shape[:lead]
        Wg = W.reshape(shape + (self.groups, W.shape[lead] // self.groups, -1))[(slice(None),) * lead + (g,)]
        out = [Wg.swapaxes(-1, -2)]
        if self.bias:
            b = views[1]
            out.append(b.reshape(shape + (self.groups, -1))[(slice(None),) * lead + (g,)])
        return out

    def sq_norms(self, a, delta, counted=None, method: str = "auto"):
        out = None
        for g in range(self.groups):
            s = self._dense.sq_norms(self._a(a, g), self._ch(delta, g), counted, method)
            out = s if out is None else out + s
        return out

    def _torch_block(self, W, g, lead: int):
        """Group g's weight block of a view in torch's layout ``(…, C_out, C_in/G, …)``: ``(…, d, p)``."""
        shape = W.shape[:lead]
        return W.reshape(shape + (self.groups, W.shape[lead] // self.groups, -1))[(slice(None),) * lead + (g,)]

    def fill(self, views: Sequence[Any], a, delta) -> None:
        """Per sample ``Δ_gᵀ A_g`` into torch's layout ``(B, d, p)`` directly (``Σ_t Δ_t`` for the bias)."""
        xp = get_xp(delta)
        for g in range(self.groups):
            ag, dg = self._a(a, g), self._ch(delta, g)
            W = self._torch_block(views[0], g, 1)
            if ag.ndim == 3 and ag.shape[1] == 1:
                ag, dg = ag[:, 0], dg[:, 0]
            if ag.ndim == 2:
                xp.multiply(dg[:, :, None], ag[:, None, :], out=W)
            else:
                matmul_into(dg.swapaxes(1, 2), ag, W)
            if self.bias:
                b = self._views(views, g, 1)[1]
                b[...] = dg if dg.ndim == 2 else dg.sum(axis=1)

    def clipped_sum(self, views: Sequence[Any], a, delta, c) -> None:
        """``Σ_i c_i ∇ℓ_i``: per group one GEMM ``(c⊙Δ_g)ᵀ A_g`` over the ``B·T`` rows, into torch's
        layout (``delta`` overwritten with ``c_i δ_i``)."""
        delta *= c.reshape((-1,) + (1,) * (delta.ndim - 1)).astype(delta.dtype, copy=False)
        for g in range(self.groups):
            ag = self._a(a, g)
            rows = get_xp(delta).ascontiguousarray(self._ch(delta, g)).reshape(-1, delta.shape[-1] // self.groups)
            matmul_into(rows.T, ag.reshape(-1, ag.shape[-1]), self._torch_block(views[0], g, 0))
            if self.bias:
                column_sums(rows, self._views(views, g, 0)[1])

    def ntk_add(self, left, right, trace: bool, out, method: str = "auto") -> None:
        (aa, Ga), (ab, Gb) = left, right
        for g in range(self.groups):
            self._dense.ntk_add((self._a(aa, g), self._ch(Ga, g)), (self._a(ab, g), self._ch(Gb, g)), trace, out,
                                method)

    def jvp(self, a, v: Sequence[Any], base):
        parts = []
        for g in range(self.groups):
            gv = self._views(v, g, 0)
            parts.append(self._dense.jvp(self._a(a, g), gv, None if base is None else self._ch(base, g)))
        return parts[0] if self.groups == 1 else get_xp(parts[0]).concatenate(parts, axis=-1)

    def ggn_diag_add(self, outs: Sequence[Any], a, G, scale: float) -> None:
        for g in range(self.groups):
            self._dense.ggn_diag_add(self._views(outs, g, 0), self._a(a, g), self._ch(G, g), scale)


class LeafSpatialFactor(SpatialFactor):
    """``diag(d) · L`` (``SpatialFactor``) of a layer whose parameters act at ``h``, after ``L``
    and before ``diag(d)``; the leaf's cotangents and tangents are channels-last tokens."""

    __slots__ = ()

    def rows(self, sel) -> "LeafSpatialFactor":
        F = super().rows(sel)
        return F if F is self else LeafSpatialFactor(F.op, F.d, F.anchor)

    def param_vjp_stack(self, A: Any, need_input: bool = True):
        """``([G], A_in)`` for output cotangent rows ``A: (B, R, *out)`` (or flattened
        ``(B, R, h_out)``): ``G = A ⊙ d`` at ``h`` as ``(B, R, T, C_out)``, ``A_in = Lᵀ(A ⊙ d):
        (B, R, h_in)`` (None unless ``need_input``). ``G`` is a channels-last VIEW of the images
        ``A ⊙ d`` (each ``(T, C_out)`` block has unit stride along T: the leaves' GEMMs read it in
        place, no transposing copy); an array of its own (a copy where there is no ``d``)."""
        B, R = A.shape[:2]
        Gimg = A.reshape((B, R) + tuple(self.op.out_shape))
        Gimg = Gimg.copy() if self.d is None else Gimg * self.d[:, None]
        A_in = self.op.adjoint(Gimg, self.op.batch is not None).reshape(B, R, self.h_in) if need_input else None
        return [Gimg.reshape(B, R, Gimg.shape[2], -1).swapaxes(-1, -2)], A_in

    def param_jvp(self, t: Any, leaf_tangent):
        """``d ⊙ (L t + the leaf's tangent)`` at ``h``: ``t: (B, h_in)`` or None (0) ->
        ``(B, h_out)``; ``leaf_tangent(0, base)`` takes and gives ``(B, T, C_out)``."""
        base = None
        if t is not None:
            base = to_tokens(self.op.apply(t.reshape((t.shape[0],) + tuple(self.op.in_shape))), 1)
        h = to_images(leaf_tangent(0, base), self.op.out_shape)
        if self.d is not None:
            h = h * self.d
        return h.reshape(h.shape[0], self.h_out)

"""The one im2col of jacgrad: a convolution's geometry, its patch matrix and the three GEMMs.

A 2-D convolution (a 1-D one is the ``H = 1`` case) of ``x: (B, C, H, W)`` with a weight
``(C_out, C/G, kh, kw)`` in ``G`` groups is, per group ``g``, one GEMM with the patch matrix

    cols[g]: (p, B·T),   p = (C/G)·kh·kw,   T = H_out·W_out,
    cols[g][c·kh·kw + i·kw + j, b·T + t] = x_pad[b, g·C/G + c, i·dh + sh·oy, j·dw + sw·ox]  (t = oy·W_out + ox)

(the row order is torch's weight order, so ``W.reshape(G, C_out/G, p)`` multiplies it as is):

    forward     y[g]   = W[g] @ cols[g]                    (C_out/G, B·T)
    input grad  dcols  = W[g]ᵀ @ δ[g];  col2im(dcols)       (the transposed convolution)
    weight grad dW[g] += δ[g] @ cols[g]ᵀ                   (C_out/G, p)

Per sample ``b`` the patch matrix ``A_b = cols[:, :, b·T:(b+1)·T]ᵀ: (T, p)`` is the weight
leaf's input: the per-sample weight gradient is ``Δ_bᵀ A_b`` with ``Δ_b: (T, C_out)``.

The forward, the input gradient and the per-sample pieces gather the same patches batch first,
``(B, G, p, T)`` (``im2col(..., batch_first=True)``): per sample and group ``W[g] @ cols[b, g]``
is ``(C_out/G, T)``, the output image's own layout, so the GEMM writes ``y`` in place and reads
``δ`` as it is (no transposing copy on either side), and each gather/scatter moves whole
``(C, H, W)`` images without swapping the batch and channel axes. Only the weight gradient, a
sum over the samples, keeps the ``(G, p, B·T)`` layout: one GEMM whose inner dimension is ``B·T``.

Every GEMM is ``jacgrad.cuda.gemm.matmul``: on NumPy the plain product (into a reused host block),
on CuPy ``a @ b`` — except while a compiled step records its CUDA graph (``direct_cublas``), where
it calls cuBLAS itself, ``cublasGemmStridedBatchedEx`` over the ``G`` groups (a stack of products
with one stride each: the forward, the input and the weight gradient), so the products are
recordable. The per-sample gradients' ``(n·G)`` stack is read in place for ``G = 1``.

The patches are gathered with ``kh·kw`` strided copies and scattered back with ``kh·kw``
strided adds, on NumPy and CuPy alike (no numpy-only call, no dense Toeplitz matrix). The batch
is cut into chunks so that one chunk's patch matrix stays under ``max_memory`` bytes.

    >>> import numpy as np
    >>> geo = Geometry.make("Conv2d", (1, 4, 4), (1, 3, 3), (1, 1), 1, (1, 1))
    >>> geo.out_hw, geo.pads
    ((4, 4), (1, 1, 1, 1))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.validation import check_max_memory, shape_str
from ..core.backend import get_xp
from ..cuda.gemm import matmul, matmul_into

__all__ = ["Geometry", "batch_chunks", "col2im", "conv", "conv_transpose", "im2col", "pair", "weight_grad"]


def pair(value: Any, what: str, layer: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (torch's ``_pair``), each ≥ ``minimum``."""
    vals = (value, value) if isinstance(value, (int, np.integer)) else tuple(value) if isinstance(value, (tuple, list)) else None
    if vals is None or len(vals) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in vals):
        raise ValueError(f"{layer}: {what} must be an int or a pair of ints, got {value!r}")
    if min(vals) < minimum:
        raise ValueError(f"{layer}: {what} must be ≥ {minimum}, got {value!r}")
    return int(vals[0]), int(vals[1])


@dataclass(frozen=True)
class Geometry:
    """Where the patches of one convolution (or pooling window) lie. ``in_shape = (C, H, W)``,
    ``kernel = (C_out, kh, kw)``; ``pads = (top, bottom, left, right)``; ``out_hw``."""

    layer: str
    in_shape: tuple
    kernel: tuple
    stride: tuple
    dilation: tuple
    pads: tuple
    out_hw: tuple

    @classmethod
    def make(cls, layer: str, in_shape, kernel, stride, padding, dilation, groups: int = 1) -> "Geometry":
        """The geometry of ``layer`` on an input ``in_shape = (C, H, W)``; ``padding``: int, pair,
        ``"valid"`` or ``"same"`` (torch's rule: a total of ``d·(k−1)``, the extra one at the end
        for even kernels; stride 1 only). Errors name the layer."""
        C, H, W = in_shape
        kh, kw = kernel[1:]
        sh, sw = stride
        dh, dw = dilation
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                if (sh, sw) != (1, 1):
                    raise ValueError(f"{layer}: padding='same' needs stride 1 (as in torch), got stride {(sh, sw)}")
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            else:
                raise ValueError(f"{layer}: padding {padding!r} is not one of 'valid', 'same', an int or a pair of ints")
        else:
            ph, pw = pair(padding, "padding", layer, 0)
            pads = (ph, ph, pw, pw)
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        Hp, Wp = H + pads[0] + pads[1], W + pads[2] + pads[3]
        if Hp < span_h or Wp < span_w:
            raise ValueError(f"{layer}: the input's spatial size {H}×{W} (padded: {Hp}×{Wp}) is smaller than the "
                             f"kernel's span {span_h}×{span_w} (kernel {kh}×{kw}, dilation {(dh, dw)})")
        out_hw = ((Hp - span_h) // sh + 1, (Wp - span_w) // sw + 1)
        return cls(layer, tuple(in_shape), tuple(kernel), (sh, sw), (dh, dw), pads, out_hw)

    @property
    def window(self) -> int:
        return self.kernel[1] * self.kernel[2]

    def offsets(self):
        """``(k, rows, cols)`` per kernel offset ``k = i·kw + j``: the strided slices of the padded input."""
        (kh, kw), (sh, sw), (dh, dw), (Ho, Wo) = self.kernel[1:], self.stride, self.dilation, self.out_hw
        for i in range(kh):
            for j in range(kw):
                yield (i * kw + j, slice(i * dh, i * dh + sh * (Ho - 1) + 1, sh),
                       slice(j * dw, j * dw + sw * (Wo - 1) + 1, sw))

    def pad(self, x, value: float = 0.0):
        """``x: (…, C, H, W)`` padded to ``(…, C, Hp, Wp)`` (``x`` itself when there is no padding)."""
        t, b, l, r = self.pads
        if not any(self.pads):
            return x
        xp = get_xp(x)
        out = xp.full(x.shape[:-2] + (x.shape[-2] + t + b, x.shape[-1] + l + r), value, dtype=x.dtype)
        out[..., t:t + x.shape[-2], l:l + x.shape[-1]] = x
        return out

    def crop(self, xpad):
        t, _, l, _ = self.pads
        H, W = self.in_shape[1:]
        return xpad[..., t:t + H, l:l + W]


def batch_chunks(B: int, bytes_per_sample: int, max_memory) -> list[slice]:
    """Slices of the batch whose patch matrices each take at most ``max_memory`` bytes (None: one
    chunk); a budget below one sample's patches is refused, with both sizes."""
    max_memory = check_max_memory(max_memory)
    if max_memory is None or B * bytes_per_sample <= max_memory:
        return [slice(0, B)]
    n = int(max_memory // max(bytes_per_sample, 1))
    if n < 1:
        raise ValueError(f"max_memory={max_memory!r} bytes is below one sample's patch matrix "
                         f"({bytes_per_sample} bytes); give at least that")
    return [slice(s, min(s + n, B)) for s in range(0, B, n)]


def im2col(x, geo: Geometry, groups: int, batch_first: bool = False):
    """``x: (N, C, H, W) -> cols: (G, p, N·T)`` (the layout of the module docstring), or with
    ``batch_first`` ``(N, G, p, T)``: sample n's patches of group g, ``cols[n, g]: (p, T)``."""
    xp = get_xp(x)
    N, C = x.shape[:2]
    Cg, (kh, kw), (Ho, Wo) = C // groups, geo.kernel[1:], geo.out_hw
    xpad = geo.pad(x)
    if batch_first:
        cols = xp.empty((N, C, kh, kw, Ho, Wo), dtype=x.dtype)
        for k, rows, cs in geo.offsets():
            cols[:, :, k // kw, k % kw] = xpad[:, :, rows, cs]
        return cols.reshape(N, groups, Cg * kh * kw, Ho * Wo)
    cols = xp.empty((groups, Cg, kh, kw, N, Ho, Wo), dtype=x.dtype)
    for k, rows, cs in geo.offsets():
        src = xpad[:, :, rows, cs].reshape(N, groups, Cg, Ho, Wo)
        cols[:, :, k // kw, k % kw] = src.transpose(1, 2, 0, 3, 4)
    return cols.reshape(groups, Cg * kh * kw, N * Ho * Wo)


def col2im(dcols, geo: Geometry, groups: int, N: int):
    """The adjoint of ``im2col(..., batch_first=True)``: ``dcols: (N, G, p, T) -> (N, C, H, W)``,
    overlaps summed."""
    xp = get_xp(dcols)
    C, H, W = geo.in_shape
    (kh, kw), (Ho, Wo) = geo.kernel[1:], geo.out_hw
    t, b, l, r = geo.pads
    gpad = xp.zeros((N, C, H + t + b, W + l + r), dtype=dcols.dtype)
    d = dcols.reshape(N, C, kh, kw, Ho, Wo)
    offsets = list(geo.offsets())
    if geo.stride[0] != 1 or kw == 1:
        for k, rows, cs in offsets:
            view = gpad[:, :, rows, cs]   # a view, written through
            view += d[:, :, k // kw, k % kw]
        return geo.crop(gpad)
    # stride 1 along H: per kernel column j, the kh row shifts are added into a (Hp, Wo) block first,
    # whole (Ho, Wo) images at a time, and the block once into its columns: kw adds of runs Wo long
    # instead of kh·kw (a strided add pays per run of Wo elements, 20-30% of col2im's time)
    acc = xp.empty((N, C, gpad.shape[2], Wo), dtype=dcols.dtype)
    for j in range(kw):
        acc[...] = 0
        for i in range(kh):
            _, rows, cs = offsets[i * kw + j]
            view = acc[:, :, rows]
            view += d[:, :, i, j]
        view = gpad[:, :, :, cs]
        view += acc
    return geo.crop(gpad)


def _chunk_bytes(geo: Geometry, groups: int, itemsize: int) -> int:
    C = geo.in_shape[0]
    return C * geo.window * geo.out_hw[0] * geo.out_hw[1] * itemsize


def _per_group(a, groups: int):
    """``(n, C, *image) -> (n, G, C/G, T)``: a view (the products read each group's ``(C/G, T)`` in place)."""
    return a.reshape(a.shape[0], groups, a.shape[1] // groups, -1)


def conv(x, Wg, geo: Geometry, groups: int, max_memory=None, out=None):
    """``x: (N, C, H, W)``, ``Wg: (G, C_out/G, p)`` -> ``(N, C_out, H_out, W_out)`` (no bias), into
    ``out`` when given. ``x`` may carry extra leading axes (a stack): they are flattened into N.
    Per group, one stack of products ``W[g] @ cols[:, g]`` written into the output's group view."""
    xp = get_xp(x, Wg)
    lead = x.shape[:-3]
    x = x.reshape((-1,) + x.shape[-3:])
    N = x.shape[0]
    Cout = Wg.shape[0] * Wg.shape[1]
    y = xp.empty((N, Cout) + geo.out_hw, dtype=np.result_type(x.dtype, Wg.dtype)) if out is None else out
    y4 = y.reshape((N, Cout) + geo.out_hw)
    for s in batch_chunks(N, _chunk_bytes(geo, groups, x.itemsize), max_memory):
        cols, yg = im2col(x[s], geo, groups, batch_first=True), _per_group(y4[s], groups)   # (n, G, p, T), (n, G, C_out/G, T)
        for g in range(groups):
            matmul_into(Wg[g], cols[:, g], yg[:, g])
    return y4.reshape(lead + y4.shape[1:]) if out is None else y


def _as_groups(g, groups: int):
    """``g: (n, C_out, Ho, Wo) -> (G, C_out/G, n·T)`` (a copy: the GEMM's operand)."""
    n, Cout = g.shape[:2]
    return get_xp(g).ascontiguousarray(g.reshape(n, groups, Cout // groups, -1).transpose(1, 2, 0, 3)).reshape(
        groups, Cout // groups, -1)


def conv_transpose(g, Wg, geo: Geometry, groups: int, max_memory=None):
    """The adjoint of ``conv``: ``g: (…, C_out, H_out, W_out) -> (…, C, H, W)``: per group the stack
    ``W[g]ᵀ @ δ[:, g]`` (``δ`` read in place), then ``col2im``."""
    xp = get_xp(g, Wg)
    lead = g.shape[:-3]
    g = g.reshape((-1,) + g.shape[-3:])
    N = g.shape[0]
    parts = []
    for s in batch_chunks(N, _chunk_bytes(geo, groups, g.itemsize), max_memory):
        gg = _per_group(g[s], groups)                                                   # (n, G, C_out/G, T)
        if groups == 1:
            dcols = matmul(Wg[0].T, gg[:, 0])                                          # (n, p, T)
        else:
            dcols = xp.empty((gg.shape[0], groups, Wg.shape[2], gg.shape[3]), dtype=np.result_type(g.dtype, Wg.dtype))
            for k in range(groups):
                matmul_into(Wg[k].T, gg[:, k], dcols[:, k])
        parts.append(col2im(dcols, geo, groups, s.stop - s.start))
    out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=0)
    return out.reshape(lead + out.shape[1:])


def weight_grad(x, delta, geo: Geometry, groups: int, out, max_memory=None):
    """``Σ_b Δ_bᵀ A_b`` written into ``out: (G, C_out/G, p)``: ``x: (N, C, H, W)``, ``delta: (N, C_out, Ho, Wo)``."""
    get_xp(x, delta, out)  # one kind of array
    out[...] = 0
    for s in batch_chunks(x.shape[0], _chunk_bytes(geo, groups, x.itemsize), max_memory):
        out += matmul(_as_groups(delta[s], groups), im2col(x[s], geo, groups).swapaxes(1, 2))
    return out


def check_input(x, geo_layer: str, C: int, ndim: int = 4, what: str = "(B, C, H, W)"):
    """``x`` has ``ndim`` axes and ``C`` channels, or a ``ValueError`` naming the layer and the shapes."""
    if x.ndim != ndim or x.shape[1] != C:
        got = f"{x.shape[1]} channels" if x.ndim == ndim else f"{x.ndim} axes"
        raise ValueError(f"{geo_layer}: input of shape {shape_str(x.shape)} has {got}; the layer takes {what} with C = {C}")


def per_sample_sq_norms(x, delta, geo: Geometry, groups: int, max_memory=None):
    """``‖Δ_bᵀ A_b‖²_F`` per sample ``(N,)``, the per-sample weight gradients built chunk by chunk
    (``(n, G, C_out/G, p)`` at a time)."""
    xp = get_xp(x, delta)
    N, Cout, T = delta.shape[0], delta.shape[1], geo.out_hw[0] * geo.out_hw[1]
    out = xp.empty(N, dtype=delta.dtype)
    for s in batch_chunks(N, _chunk_bytes(geo, groups, x.itemsize), max_memory):
        n = s.stop - s.start
        cols = im2col(x[s], geo, groups, batch_first=True)                                  # (n, G, p, T)
        p = cols.shape[2]
        D = delta[s].reshape(n * groups, Cout // groups, T)                                  # (n·G, O, T)
        gW = matmul(D, cols.reshape(n * groups, p, T).swapaxes(1, 2))                       # (n·G, O, p)
        out[s] = (gW * gW).reshape(n, -1).sum(axis=1)
    return out

"""The empirical neural tangent kernel from the layer factors, never from J_θ.

``K(x, x')[o, o'] = Σ_θ ∂y_o(x)/∂θ · ∂y_{o'}(x')/∂θ``. For a dense layer ``h_j = z_{j-1} W_j + b_j``,
``∂y/∂W_j[p, q] = z_{j-1, p} G_j[:, q]`` and ``∂y/∂b_j = G_j`` with ``G_j = ∂y/∂h_j: (n_out, H_j)``
(the partial Jacobians of ONE stacked reverse sweep, ``per_sample.output_partials``), so

    K(x, x') = Σ_j (z_{j-1} · z'_{j-1} + 1) · G_j G'_jᵀ

— per layer one ``(N1·O, H_j) @ (H_j, N2·O)`` GEMM, or with ``trace=True`` (the sum over the output
diagonal, ``Σ_o K[o, o]``) one ``(N1, O·H_j) @ (O·H_j, N2)`` GEMM. Memory: the result plus
``O(chunk·O·max H)`` per side; J_θ (``N·O·P``) is never built.

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([3, 8, 2], seed=0)
    >>> jg.ntk(net, np.ones((4, 3))).shape, jg.ntk(net, np.ones((4, 3)), np.ones((5, 3)), trace=True).shape
    ((4, 4, 2, 2), (4, 5))
"""

from __future__ import annotations

from typing import Any

from ._validate import float_array
from .backend import get_xp
from .per_sample import output_partials

__all__ = ["ntk"]

DEFAULT_MAX_MEMORY = 1 << 28  # 256 MiB of working memory per call, besides the result


def _sweep(net, x):
    """``(zs, partials)``: the layer inputs ``z_{j-1}: (N, H_{j-1})`` and a generator of
    ``(j, G_j: (N, O, H_j))``, output layer first."""
    y, cache = net.forward(x)
    xp = get_xp(y)
    N, O = y.shape
    V = xp.zeros((N, O, O), dtype=y.dtype)
    idx = xp.arange(O)
    V[:, idx, idx] = 1
    zs = [cache.layer_output(j) for j in range(-1, net.depth - 1)]
    return zs, output_partials(net.jacobian_chain(cache).factors, V)


def _block(net, xa, xb, trace: bool, out):
    """Add the kernel of ``xa: (Na, n_in)`` against ``xb`` (None: ``xa`` itself) into ``out``:
    ``(Na, O, Nb, O)``, or ``(Na, Nb)`` when ``trace``."""
    za, pa = _sweep(net, xa)
    if xb is None:
        zb, pb = za, None
    else:
        zb, pb = _sweep(net, xb)
    for j, Ga in pa:
        Gb = Ga if pb is None else next(pb)[1]
        w = za[j] @ zb[j].T  # z_{j-1} · z'_{j-1}
        w += 1
        Na, O, H = Ga.shape
        Nb = Gb.shape[0]
        if trace:
            out += w * (Ga.reshape(Na, O * H) @ Gb.reshape(Nb, O * H).T)
        else:
            out += w[:, None, :, None] * (Ga.reshape(Na * O, H) @ Gb.reshape(Nb * O, H).T).reshape(Na, O, Nb, O)


def _chunk(net, N: int, max_memory) -> int:
    """Samples per chunk: two sides' sweeps (two ``(O, max H)`` blocks and the layer inputs per
    sample) plus one ``(chunk·O)²`` kernel block of a layer within ``max_memory`` bytes."""
    if max_memory is None:
        return N
    O, itemsize = net.sizes[-1], net.dtype.itemsize
    per_sample = (2 * O * max(net.sizes) + sum(net.sizes)) * itemsize
    by_sweeps = max_memory // (4 * per_sample)
    by_block = (max_memory / (2 * O * O * itemsize)) ** 0.5
    return int(max(1, min(N, by_sweeps, by_block)))


def ntk(net, x1: Any, x2: Any = None, trace: bool = False, max_memory: float | None = DEFAULT_MAX_MEMORY):
    """The empirical NTK ``J_θ(x1) J_θ(x2)ᵀ`` over all parameters of ``net``.

    ``x1: (N1, n_in)``, ``x2: (N2, n_in)`` or None (then ``x1``, and only the blocks on and above
    the diagonal are computed; the rest is their transpose). Returns ``(N1, N2, n_out, n_out)``,
    or ``(N1, N2)`` with ``trace=True`` (``Σ_o K[:, :, o, o]``), on the inputs' device and in the
    network's dtype. Samples go through in chunks whose working blocks (the partial Jacobians of
    both sides and one layer's kernel block) stay under ``max_memory`` bytes (None: one chunk).

        >>> import numpy as np, jacgrad as jg
        >>> net = jg.MLP.init([3, 8, 2], seed=0)
        >>> float(jg.ntk(net, np.ones((1, 3)), trace=True)[0, 0]) > 0
        True
    """
    if not all(hasattr(net, a) for a in ("forward", "jacobian_chain", "weights")):
        raise TypeError(f"ntk needs a jacgrad network (MLP), got {type(net).__name__}")
    xp = get_xp(x1, net.weights[0])
    x1 = float_array(x1, "x1", xp)
    sym = x2 is None
    x2 = x1 if sym else float_array(x2, "x2", get_xp(x2, net.weights[0]))
    for name, x in (("x1", x1), ("x2", x2)):
        if x.ndim != 2 or x.shape[1] != net.sizes[0]:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but the network takes {net.sizes[0]} features: "
                             f"needs (N, {net.sizes[0]})")
    N1, N2, O = x1.shape[0], x2.shape[0], net.sizes[-1]
    shape = (N1, N2) if trace else (N1, O, N2, O)
    out = xp.zeros(shape, dtype=net.dtype)
    chunk = _chunk(net, max(N1, N2, 1), max_memory)
    for a in range(0, N1, chunk):
        sa = slice(a, min(N1, a + chunk))
        for b in (range(a, N2, chunk) if sym else range(0, N2, chunk)):
            sb = slice(b, min(N2, b + chunk))
            blk = out[sa, sb] if trace else out[sa, :, sb, :]
            _block(net, x1[sa], None if (sym and a == b) else x2[sb], trace, blk)
            if sym and a != b:
                if trace:
                    out[sb, sa] = blk.T
                else:
                    out[sb, :, sa, :] = blk.transpose(2, 3, 0, 1)
    return out if trace else xp.ascontiguousarray(out.transpose(0, 2, 1, 3))

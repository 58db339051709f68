"""The empirical neural tangent kernel from the layer factors, never from J_θ.

``K(x, x')[o, o'] = Σ_θ ∂y_o(x)/∂θ · ∂y_{o'}(x')/∂θ``. With ``G_k = ∂y/∂h_k: (n_out, H_k)`` at
every parameterised leaf (the partial Jacobians of ONE stacked reverse sweep,
``per_sample.output_partials``) and the leaf's input ``a`` (``z_prev``, or ``x̂`` of a
normalisation layer), the parameters' partials are ``a ⊗ G`` (dense W), ``a ⊙ G`` (γ) and ``G``
(b, β), so

    dense  K += (a · a' + 1) · G G'ᵀ
    norm   K += Σ_h a_h a'_h G[:, h] G'[:, h]ᵀ  (+ G G'ᵀ with β)

— per leaf one ``(N1·O, H) @ (H, N2·O)`` GEMM, or with ``trace=True`` (the sum over the output
diagonal, ``Σ_o K[o, o]``) one ``(N1, O·H) @ (O·H, N2)`` GEMM. Memory: the result plus one side's
partials of all leaves (``O(chunk·O·Σ H)``) and the other side's sweep; J_θ (``N·O·P``) is never
built. The left side's sweep runs once per row chunk, whatever the number of column chunks.

Works on an ``MLP`` and on a ``Sequential`` (residual blocks, LayerNorm, RMSNorm).

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([3, 8, 2], seed=0)
    >>> jg.ntk(net, np.ones((4, 3))).shape, jg.ntk(net, np.ones((4, 3)), np.ones((5, 3)), trace=True).shape
    ((4, 4, 2, 2), (4, 5))
"""

from __future__ import annotations

import math
from typing import Any

from ..core.validation import network_input, require_network
from ..core.backend import get_xp
from ..algebra.per_sample import check_max_memory, output_partials
from ..nn.stack import layer_leads

__all__ = ["ntk"]

DEFAULT_MAX_MEMORY = 1 << 28  # 256 MiB of working memory per call, besides the result


def _sweep(net, x):
    """``(pairs, partials)``: ``[(leaf_k, a_k)]`` and a generator of ``(k, G_k: (N, O, [T,] H_k))``,
    output leaf first; ``O`` the number of outputs per sample (all output entries, flattened)."""
    y, cache = net.forward(x)
    xp = get_xp(y)
    N, out_shape = y.shape[0], y.shape[1:]
    O = math.prod(out_shape)
    V = xp.zeros((N, O, O), dtype=y.dtype)
    idx = xp.arange(O)
    V[:, idx, idx] = 1
    factors = net.jacobian_chain(cache).factors
    return net._param_leaf_inputs(cache), output_partials(factors, V.reshape((N, O) + tuple(out_shape)))


def _left(net, x) -> list:
    """One side's sweep kept whole: ``[(leaf_k, a_k, G_k)]``."""
    pairs, partials = _sweep(net, x)
    kept = [None] * len(pairs)
    for k, G in partials:
        kept[k] = pairs[k] + (G,)
    return kept


def _block(left, net, xb, trace: bool, out):
    """Add the kernel of the kept ``left`` side against ``xb`` (None: the left side itself) into
    ``out``: ``(Na, O, Nb, O)``, or ``(Na, Nb)`` when ``trace`` (each leaf's ``ntk_add``)."""
    if xb is None:
        for leaf, a, G in left:
            leaf.ntk_add((a, G), (a, G), trace, out)
        return
    pairs, partials = _sweep(net, xb)
    for k, Gb in partials:
        leaf, a, Ga = left[k]
        leaf.ntk_add((a, Ga), (pairs[k][1], Gb), trace, out)


def _widths(net) -> list[int]:
    """Every leaf's output width and the input width (``Sequential`` opens its residual blocks)."""
    return list(net._param_widths())


def _chunk(net, N: int, max_memory) -> int:
    """Samples per chunk: the kept side (``(O, H_k)`` partials and inputs of every leaf), the
    other side's sweep (two ``(O, max H)`` blocks and the inputs) and one ``(chunk·O)²`` kernel
    block of a leaf within ``max_memory`` bytes (a token batch passes ``max_memory / T²``: its
    blocks are ``(T·O, T, H)`` and ``(chunk·T·O)²``)."""
    if max_memory is None:
        return N
    widths, O, itemsize = _widths(net), net.sizes[-1], net.dtype.itemsize
    per_sample = ((O + 1) * sum(widths) + 2 * O * max(widths) + sum(widths)) * itemsize
    by_sweeps = max_memory // (2 * per_sample)
    by_block = (max_memory / (2 * O * O * itemsize)) ** 0.5
    return int(max(1, min(N, by_sweeps, by_block)))


def ntk(net, x1: Any, x2: Any = None, trace: bool = False, max_memory: float | None = DEFAULT_MAX_MEMORY):
    """The empirical NTK ``J_θ(x1) J_θ(x2)ᵀ`` over all parameters of ``net`` (an ``MLP`` or a ``Sequential``).

    ``x1: (N1, n_in)``, ``x2: (N2, n_in)`` or None (then ``x1``, and only the blocks on and above
    the diagonal are computed; the rest is their transpose). Returns ``(N1, N2, n_out, n_out)``,
    or ``(N1, N2)`` with ``trace=True`` (``Σ_o K[:, :, o, o]``), on the inputs' device and in the
    network's dtype. Samples go through in chunks whose working blocks (the partial Jacobians of
    both sides and one leaf's kernel block) stay under ``max_memory`` bytes (None: one chunk).

        >>> import numpy as np, jacgrad as jg
        >>> net = jg.MLP.init([3, 8, 2], seed=0)
        >>> float(jg.ntk(net, np.ones((1, 3)), trace=True)[0, 0]) > 0
        True
    """
    require_network(net, "ntk")
    check_max_memory(max_memory)
    xp = get_xp(x1, _anchor(net))
    x1 = _input(net, x1, "x1", xp)
    sym = x2 is None
    x2 = x1 if sym else _input(net, x2, "x2", get_xp(x2, _anchor(net)))
    tokens = getattr(net, "takes_tokens", False)
    ids = tuple(getattr(net, "in_shape", (None,))) == ()  # (N, T) token ids, checked by layer 0 (an Embedding)
    image = tuple(getattr(net, "in_shape", ())) if len(getattr(net, "in_shape", ())) > 1 else None
    for name, x in (("x1", x1), ("x2", x2)):
        if ids:
            if x.shape[1] != x1.shape[1]:
                raise ValueError(f"{name} has shape {tuple(x.shape)}: token ids (N, T) with x1's T = {x1.shape[1]}")
            continue
        if image is not None:  # an image network: (N, C, H, W)
            if tuple(x.shape[1:]) != image:
                raise ValueError(f"{name} has shape {tuple(x.shape)} but the network takes inputs {image}: needs (N, *{image})")
            continue
        if x.shape[-1:] != (net.sizes[0],) or x.ndim not in ((2, 3) if tokens else (2,)) \
                or (x.ndim == 3 and x.shape[1] != x1.shape[1]):
            raise ValueError(f"{name} has shape {tuple(x.shape)} but the network takes {net.sizes[0]} features: "
                             f"needs (N, {net.sizes[0]})" + (f" or (N, T, {net.sizes[0]}) with x1's T" if tokens else ""))
    tokens_in = ids or (image is None and x1.ndim == 3)  # (N, C, L) images have no token axis
    lead = layer_leads(net.layers, (x1.shape[0], x1.shape[1]) if tokens_in else x1.shape[0])[-1]
    T = lead[1] if isinstance(lead, tuple) else 1  # the output's tokens: a layer may change the token axis
    N1, N2, O = x1.shape[0], x2.shape[0], net.sizes[-1] * T
    shape = (N1, N2) if trace else (N1, O, N2, O)
    out = xp.zeros(shape, dtype=net.dtype)
    chunk = _chunk(net, max(N1, N2, 1), max_memory if max_memory is None or T == 1 else max_memory / (T * T))
    for a in range(0, N1, chunk):
        sa = slice(a, min(N1, a + chunk))
        left = _left(net, x1[sa])
        for b in (range(a, N2, chunk) if sym else range(0, N2, chunk)):
            sb = slice(b, min(N2, b + chunk))
            blk = out[sa, sb] if trace else out[sa, :, sb, :]
            _block(left, net, None if (sym and a == b) else x2[sb], trace, blk)
            if sym and a != b:
                if trace:
                    out[sb, sa] = blk.T
                else:
                    out[sb, :, sa, :] = blk.transpose(2, 3, 0, 1)
    return out if trace else xp.ascontiguousarray(out.transpose(0, 2, 1, 3))


def _input(net, x, name: str, xp):
    """``x`` checked as ``net``'s input: by its first layer where that takes discrete token ids (a
    layer with ``check_tokens``: ``Embedding``), else as a float batch in its dtype."""
    check_tokens = getattr(net.layers[0], "check_tokens", None)
    return check_tokens(x, 0) if check_tokens is not None else network_input(x, name, xp, net.dtype)


def _anchor(net):
    """One parameter array of ``net``: what its inputs' device is checked against."""
    from ..protocol.layer import anchor

    return anchor(net.layers)

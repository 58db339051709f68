"""Gradient flow per block of a ``jacgrad.Sequential``: one row per top-level layer (a dense
layer, a residual block, a normalisation), read off its structured factor.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers
    >>> net = jg.Sequential([L.Residual([L.Dense(np.eye(3) * 0.5, None, "tanh")], scale=0.1), L.LayerNorm(np.ones(3))])
    >>> rows = jg.block_flow.block_flow(net, np.arange(6.0).reshape(2, 3))
    >>> [(r.kind, round(r.jacobian_bound, 3)) for r in rows]
    [('residual', 1.03), ('layernorm', 1.2)]

(Standalone beside ``diagnostics.gradient_flow``, which reads ``MLP`` layers; a report of a
``Sequential`` would print these rows.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import losses
from .backend import get_xp, to_numpy
from .bracketing import stack_jvp
from .chain import Chain
from .sequential import Sequential

__all__ = ["BlockFlow", "block_flow"]

# Below this many elements of B·n·n a block's Frobenius norm and ‖J‖₂ are exact (dense); above,
# ‖J‖_F² is a Hutchinson estimate (PROBES Rademacher probes) and ‖J‖₂ comes from Lanczos.
EXACT_ELEMENTS = 1 << 22
PROBES = 16


@dataclass
class BlockFlow:
    """Layer ``index`` of the network (``kind``: dense, residual, layernorm, rmsnorm), batch means:
    chi: ‖J‖_F²/h_in (exact, or a Hutchinson estimate for large blocks — ``chi_exact``);
    jacobian_norm: ‖J‖₂ per sample, averaged; jacobian_bound: the factor's ``norm_bound`` per
    sample, averaged (dense: max|d|·‖W‖₂; residual: 1 + |s|·Π of the inner bounds;
    normalisation: max|γ|/σ); grad_norm: ‖∂L/∂θ‖ of the block's parameters (Euclidean, all
    together; 0 for a layer without any); scale: the residual branch scale, else None."""

    index: int
    kind: str
    h_in: int
    h_out: int
    chi: float
    chi_exact: bool
    jacobian_norm: float
    jacobian_bound: float
    grad_norm: float
    scale: float | None = None


def _chi(F, B: int, seed: int) -> tuple[float, bool]:
    xp = F.xp
    if B * F.h_in * F.h_out <= EXACT_ELEMENTS:
        D = F.dense()
        return float(to_numpy((D * D).sum(axis=(-2, -1))).mean()) / F.h_in, True
    rng = np.random.default_rng(seed)
    u = xp.asarray(rng.choice([-1.0, 1.0], size=(PROBES, F.h_in)).astype(F.dtype))
    Ju = stack_jvp(F, u)  # (B, PROBES, h_out): E‖J u‖² = ‖J‖_F²
    return float(to_numpy((Ju * Ju).sum(axis=-1)).mean()) / F.h_in, False


def block_flow(net: Sequential, x, target=None, loss: str = "mse", seed: int = 0) -> list[BlockFlow]:
    """One ``BlockFlow`` per layer of ``net`` on the batch ``x: (B, n_in)``; gradients of
    ``loss`` against ``target`` (default: zeros of the output's shape)."""
    if not isinstance(net, Sequential):
        raise TypeError(f"block_flow reads a jacgrad.Sequential, got {type(net).__name__}")
    y, cache = net.forward(x)
    xp = get_xp(y)
    if target is None:
        target = xp.zeros_like(y)
    _, grad_y = losses.get(loss)(y, target)
    g = net.backward(cache, grad_y, input_grad=False)
    chain = net.jacobian_chain(cache)
    rows, at = [], 0
    for j, (layer, F) in enumerate(zip(net.layers, chain.factors)):
        n_par = sum(int(p.size) for p in layer.params)
        grad_norm = float(to_numpy(xp.linalg.norm(g.flat[at:at + n_par]))) if n_par else 0.0
        at += n_par
        chi, exact = _chi(F, cache.batch, seed + j)
        big = cache.batch * F.h_in * F.h_out > EXACT_ELEMENTS
        norm = Chain([F]).spectral_norm("lanczos" if big else "exact", seed=seed + j)
        rows.append(BlockFlow(j, layer.kind, F.h_in, F.h_out, chi, exact, float(to_numpy(norm).mean()),
                              float(to_numpy(F.norm_bound()).mean()), grad_norm,
                              getattr(layer, "scale", None) if layer.kind == "residual" else None))
    return rows

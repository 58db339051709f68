"""Gradient flow per block of a ``jacgrad.Sequential``: one row per top-level layer (a dense
layer, a residual block, a normalisation), read off its structured factor.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers
    >>> net = jg.Sequential([L.Residual([L.Dense(np.eye(3) * 0.5, None, "tanh")], scale=0.1), L.LayerNorm(np.ones(3))])
    >>> rows = jg.block_flow.block_flow(net, np.arange(6.0).reshape(2, 3))
    >>> [(r.kind, round(r.jacobian_bound, 3)) for r in rows]
    [('residual', 1.03), ('layernorm', 1.2)]

``block_report`` turns the rows into a ``BlockFlowReport`` (the verdict of ``_verdict.decide``
over the blocks' χ, hints that know which cures the net already has); it is what
``diagnostics.gradient_flow`` returns for a ``Sequential``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import _sample_rng, losses
from ._verdict import decide
from .backend import get_xp, to_numpy
from .bracketing import stack_jvp
from .chain import Chain
from ._report_blocks import block_dict, block_hints, block_json, block_text
from .sequential import Sequential

__all__ = ["BlockFlow", "BlockFlowReport", "block_flow", "block_report"]

# Below this many elements of B·n·n a block's Frobenius norm and ‖J‖₂ are exact (dense); above,
# ‖J‖_F² is a Hutchinson estimate (PROBES Rademacher probes) and ‖J‖₂ comes from Lanczos.
EXACT_ELEMENTS = 1 << 22
PROBES = 16


@dataclass
class BlockFlow:
    """Layer ``index`` of the network (``kind``: dense, residual, layernorm, rmsnorm), batch means:
    chi: ‖J‖_F²/h_out, the MLP report's χ_j = ‖J_j‖_F²/H_j (docs/gradient-flow.md) (exact, or a Hutchinson estimate for large blocks — ``chi_exact``);
    jacobian_norm: ‖J‖₂ per sample, averaged; jacobian_bound: the factor's ``norm_bound`` per
    sample, averaged (dense: max|d|·‖W‖₂; residual: 1 + |s|·Π of the inner bounds;
    normalisation: max|γ|/σ); grad_norm: ‖∂L/∂θ‖ of the block's parameters (Euclidean, all
    together; 0 for a layer without any); scale: the residual branch scale, else None; inner:
    a residual block's inner layers (``dense:tanh``, ``layernorm``), else []."""

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
    inner: list[str] = field(default_factory=list)


def _chi(F, B: int, seed: int) -> tuple[float, bool]:
    xp = F.xp
    if B * F.h_in * F.h_out <= EXACT_ELEMENTS:
        D = F.dense()
        return float(to_numpy((D * D).sum(axis=(-2, -1))).mean()) / F.h_out, True
    rng = np.random.default_rng(seed)
    u = xp.asarray(rng.choice([-1.0, 1.0], size=(PROBES, F.h_in)).astype(F.dtype))
    Ju = stack_jvp(F, u)  # (B, PROBES, h_out): E‖J u‖² = ‖J‖_F²
    return float(to_numpy((Ju * Ju).sum(axis=-1)).mean()) / F.h_out, False


def block_flow(net: Sequential, x, target=None, loss: str = "mse", seed: int = 0, *,
               grad_y=None) -> list[BlockFlow]:
    """One ``BlockFlow`` per layer of ``net`` on the batch ``x: (B, n_in)``; gradients of
    ``loss`` against ``target`` (default: zeros of the output's shape), or, when ``grad_y:
    (B, n_out)`` is given, of that cotangent (``target`` and ``loss`` are then unused)."""
    return _rows(net, x, target, loss, seed, grad_y)[0]


def _rows(net, x, target, loss, seed, grad_y):
    """``(rows, chain, loss_value)``: the rows of ``block_flow``, the net's chain at ``x`` and
    the loss (None when ``grad_y`` was given)."""
    if not isinstance(net, Sequential):
        raise TypeError(f"block_flow reads a jacgrad.Sequential, got {type(net).__name__}")
    y, cache = net.forward(x)
    value = None
    xp = get_xp(y)
    if grad_y is None:
        if target is None:
            target = xp.zeros_like(y)
        value, grad_y = losses.get(loss)(y, target)
        value = float(to_numpy(value))
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
                              getattr(layer, "scale", None) if layer.kind == "residual" else None,
                              _inner(layer)))
    return rows, chain, value


def _inner(layer) -> list[str]:
    """What a residual block holds: its inner layers' kinds (``dense:tanh``, ``layernorm``)."""
    return [f"{L.kind}:{L.activation}" if L.kind == "dense" else L.kind for L in getattr(layer, "layers", ())]


@dataclass(repr=False)
class BlockFlowReport:
    """``gradient_flow`` of a ``Sequential``: ``blocks[j]`` is the ``BlockFlow`` of top-level layer
    j; chi: their χ (list); verdict, chi_bar, backward_gain, depth_scale: ``_verdict.decide`` over
    the blocks' χ (a block counts once, whatever it holds); jacobian_spectral_norm: the whole
    input-output Jacobian's ‖J‖₂ per sample, averaged (exact, or Lanczos for large ones);
    hints: advice that knows what the net has (``has_residual``, ``norms``); loss/loss_value:
    None for a random unit cotangent. ``str(report)`` is the text table."""

    blocks: list[BlockFlow]
    chi: list[float]
    chi_bar: float
    backward_gain: float
    depth_scale: float
    verdict: str
    jacobian_spectral_norm: float
    sizes: list[int]
    activations: list[str]
    has_residual: bool
    norms: list[str]
    batch: int
    dtype: str
    device: str
    loss: str | None
    loss_value: float | None
    hints: list[str] = field(default_factory=list)
    label: str = ""

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def to_dict(self) -> dict:
        return block_dict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return block_json(self, indent=indent)

    def to_text(self) -> str:
        return block_text(self)

    __str__ = to_text

    def __repr__(self) -> str:
        label = f"{self.label!r}, " if self.label else ""
        return (f"BlockFlowReport({label}{self.depth} blocks, B={self.batch}, verdict={self.verdict!r}, "
                f"chi_bar={self.chi_bar:.4g})")


def _dense_layers(layers):
    for L in layers:
        if L.kind == "residual":
            yield from _dense_layers(L.layers)
        elif L.kind == "dense":
            yield L


def _norm_kinds(layers) -> list[str]:
    out = []
    for L in layers:
        out += _norm_kinds(L.layers) if L.kind == "residual" else ([L.kind] if L.kind in ("layernorm", "rmsnorm") else [])
    return out


def block_report(net: Sequential, x, target=None, loss: str = "mse", *, seed: int = 0,
                 label: str = "") -> BlockFlowReport:
    """The report of ``net`` at ``x: (B, n_in)``, one row per top-level layer. With ``target``
    the gradients are those of ``loss``; without, each sample back-propagates a random unit
    cotangent (seeded by ``seed``, as in ``gradient_flow`` of an MLP)."""
    if not isinstance(net, Sequential):
        raise TypeError(f"block_report reads a jacgrad.Sequential, got {type(net).__name__}")
    xp = net.xp
    x = xp.asarray(x)
    if x.ndim != 2 or x.shape[1] != net.n_in:
        raise ValueError(f"x has shape {tuple(x.shape)} but the network takes (B, {net.n_in}) inputs")
    if x.shape[0] == 0:
        raise ValueError("x has no samples (B = 0); the report needs at least one")
    grad_y = None
    if target is None:
        B = int(x.shape[0])
        v = _sample_rng.rows((seed,), 0, B, net.n_out)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
        grad_y = xp.asarray(v.astype(net.dtype))
    with np.errstate(all="ignore"):
        rows, chain, value = _rows(net, x, target, loss, seed, grad_y)
        big = int(x.shape[0]) * net.n_in * net.n_out > EXACT_ELEMENTS
        norm = float(to_numpy(chain.spectral_norm("lanczos" if big else "exact", seed=seed)).mean())
    chi = [r.chi for r in rows]
    verdict, chi_bar, gamma, xi = decide(chi, not all(math.isfinite(c) for c in chi))
    report = BlockFlowReport(
        blocks=rows, chi=chi, chi_bar=chi_bar, backward_gain=gamma, depth_scale=xi, verdict=verdict,
        jacobian_spectral_norm=norm, sizes=net.sizes, activations=[L.activation for L in _dense_layers(net.layers)],
        has_residual=any(L.kind == "residual" for L in net.layers), norms=sorted(set(_norm_kinds(net.layers))),
        batch=int(x.shape[0]), dtype=str(np.dtype(net.dtype)), device="cpu" if xp is np else "gpu",
        loss=None if target is None else loss, loss_value=value, label=label,
    )
    report.hints = block_hints(report)
    return report

"""Differentially private gradients (DP-SGD) from one reverse sweep, over the leaves' ``(a, δ)`` pairs.

DP-SGD clips every sample's gradient ``g_i = ∇_θ ℓ_i`` to norm ``C``, sums, adds Gaussian noise
and divides by the batch size:

    ĝ = (Σ_i c_i g_i + N(0, σ²C² I)) / B,        c_i = C / max(‖g_i‖, C) = min(1, C / ‖g_i‖)

(the ``max(‖g_i‖, C)`` form never divides by 0: a sample with a zero gradient gets ``c_i = 1``).
Every parameterised leaf pairs an input ``a_i`` with a per-sample delta ``δ_i`` (``per_sample``:
``z_prev`` and ``∂ℓ_i/∂h`` for a dense leaf, ``x̂`` and ``∂ℓ_i/∂y`` for a norm leaf), so

- the norms ``‖g_i‖²`` are the sums over leaves of ``leaf.sq_norms`` (no per-sample gradient
  is built), and
- the clipped sum of a leaf is ``leaf.clipped_sum``: one GEMM, ``Σ_i c_i A_iᵀ Δ_i = Aᵀ · diag(c) · Δ``
  (a token-dense leaf; the token axis ``T`` folds into the rows with ``c`` broadcast over it), or
  one reduction, ``Σ_i c_i Σ_t a_i,t ⊙ δ_i,t`` (an elementwise leaf), with ``Σ_i c_i Σ_t δ_i,t`` for a bias/``β``.

Extra memory ``O(B · Σ H)``: every leaf's deltas are kept until the norms are known. This module
reads leaves only through their methods (``jacgrad.protocol.leaves``); it names no layer.

The noise is drawn by NumPy's ``Generator(SFC64)`` (``standard_normal(out=buf, dtype=...)`` in
the network's dtype, into a preallocated buffer: the fastest of NumPy's bit generators for this,
SFC64 < PCG64 < PCG64DXSM < Philox, on a shared AMD EPYC, 12 alternating rounds of 5.2M float32
numbers; ``benchmarks/private.py`` times them). It is reproducible from a seed and NOT cryptographically secure;
pass a ``numpy.random.Generator`` over a secure source if your threat model needs one. jacgrad
does no privacy accounting: give ``noise_multiplier``, the sample rate and the number of steps to
an accountant (Opacus' ``RDPAccountant`` / ``PRVAccountant``).

    >>> import numpy as np
    >>> c = clip_factors(np.array([0.0, 0.5, 4.0]), 1.0)[1]   # squared norms in: ‖g‖ = 0, 0.71, 2
    >>> c.tolist()
    [1.0, 1.0, 0.5]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..nn import losses
from ..algebra import per_sample
from ..core.backend import get_xp
from ..cuda.gemm import matmul

__all__ = ["ClippedGradients", "check_loss", "check_private_args", "clip_factors", "clipped_sum",
           "denominator", "leaf_flags", "noise_generator", "private_finish", "sweep_and_clip"]


@dataclass
class ClippedGradients:
    """What ``clipped_grad`` returns. ``grads``: the private gradient ``(Σ_i c_i g_i + noise) / B``
    in the network's gradient type (``Gradients`` for an ``MLP``, ``BlockGradients`` for a
    ``Sequential``; ``input`` and ``deltas`` None), ``grads.flat: (P,)``. ``norms: (B,)``: every
    sample's gradient norm ``‖g_i‖`` before clipping. ``clipped_fraction``: 0-d array, the
    fraction of samples with ``‖g_i‖ > C``. ``noise_std``: the standard deviation per coordinate
    of the noise in ``grads`` (``σ·C/B``)."""

    grads: Any
    norms: Any
    clipped_fraction: Any
    noise_std: float

    @property
    def flat(self):
        """``grads.flat``."""
        return self.grads.flat


def check_private_args(max_norm: Any, noise_multiplier: Any, expected_batch_size: Any = None) -> tuple[float, float]:
    """``(C, σ)`` as floats; a ``ValueError`` naming the argument for ``C ≤ 0`` or not finite,
    ``σ < 0`` or not finite, or an ``expected_batch_size`` that is not a number > 0."""
    def number(v, name):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{name} must be a real number, got {v!r}")
        return float(v)

    C, s = number(max_norm, "max_norm"), number(noise_multiplier, "noise_multiplier")
    if not (math.isfinite(C) and C > 0):
        raise ValueError(f"max_norm (the clipping norm C) must be finite and > 0, got {max_norm!r}")
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"noise_multiplier (sigma) must be finite and >= 0, got {noise_multiplier!r}")
    if expected_batch_size is not None and not (number(expected_batch_size, "expected_batch_size") > 0
                                                and math.isfinite(expected_batch_size)):
        raise ValueError(f"expected_batch_size must be a finite number > 0 or None, got {expected_batch_size!r}")
    return C, s


def check_loss(loss: Any, what: str = "clipped_grad") -> str:
    """The jacgrad loss ``loss`` names (``losses.canonical``: torch's aliases accepted); each is the
    mean of per-sample losses, which per-sample clipping needs. A ``ValueError`` saying so otherwise."""
    try:
        return losses.canonical(loss)
    except ValueError:
        raise ValueError(f"{what} clips per-sample gradients, so the loss must be the mean over the batch of "
                         f"per-sample losses: one of {', '.join(losses.names())} (or torch's aliases "
                         f"{', '.join(losses.ALIASES)}); got {loss!r}") from None


def noise_generator(seed: Any = None, xp=np):
    """A generator for the noise: ``seed`` None (fresh OS entropy), an int / ``SeedSequence``
    (reproducible), or a ``numpy.random.Generator`` used as it is (CuPy: a
    ``cupy.random.Generator``). NumPy: ``Generator(SFC64(seed))``."""
    if xp is np:
        if isinstance(seed, np.random.Generator):
            return seed
        return np.random.Generator(np.random.SFC64(seed))
    if hasattr(seed, "standard_normal"):
        return seed
    return xp.random.default_rng(seed)


def leaf_flags(trainable: Any, counts: Sequence[int]):
    """``trainable`` (None, or one bool per parameter array in flat order) cut per leaf
    (``counts[k]`` arrays each); None stays None. A ``ValueError`` for a wrong length."""
    if trainable is None:
        return None
    flags = [bool(f) for f in trainable]
    if len(flags) != sum(counts):
        raise ValueError(f"trainable has {len(flags)} flags but the network has {sum(counts)} parameter arrays "
                         f"(one flag each, in the order of the gradients' flat layout)")
    out, at = [], 0
    for n in counts:
        out.append(flags[at:at + n])
        at += n
    return out


def clip_factors(sq, max_norm: float):
    """``(norms, c)`` from the squared per-sample norms ``sq: (B,)``: ``norms = √sq`` and
    ``c = C / max(norms, C)`` (``min(1, C/‖g‖)``, 1 for a zero gradient, never NaN)."""
    xp = get_xp(sq)
    norms = xp.sqrt(sq)
    c = xp.maximum(norms, max_norm)
    xp.divide(max_norm, c, out=c)
    return norms, c


def clipped_sum(pairs: Sequence[Any], partials, views: Sequence[Sequence[Any]], max_norm: float,
                trainable: Sequence[Sequence[bool]] | None = None, scale: float = 1.0, shared: Any = None):
    """``(norms, c)``; writes ``scale · Σ_i c_i ∇ℓ_i`` of every leaf into ``views[k]`` (``scale``
    rides on ``c``: ``1/B`` there saves a pass over the P gradients).

    ``pairs[k] = (leaf, a)``: leaf k (``jacgrad.protocol.leaves``) and its input ``a``;
    ``partials``: ``(k, G_k)`` pairs in any order, ``G_k: (B, 1, [T,] H_k)`` the per-sample deltas
    (``per_sample.output_partials`` of ``B·∂L/∂y``); ``views[k]``: leaf k's parameter arrays.
    ``trainable[k]``: one flag per array of leaf k (None: all): the norms count only the flagged
    ones (a frozen weight, a bias that a torch ``Linear(bias=False)`` does not have).
    ``shared``: ``(group, param_views, counted)`` where parameters are shared
    (``jacgrad.params.shared.SharedGroup``; ``param_views[q]`` parameter q's gradient, zeroed;
    ``counted``: the set of trainable parameters, None: all): the group's leaves' gradients are
    built and summed over the uses, their norms counted once, ``Σ_i c_i g_i`` one GEMM."""
    group, pviews, pcounted = shared if shared is not None else (None, None, None)
    deltas, M = {}, None
    for k, G in partials:
        if group is not None and k in group:
            M = group.zeros(G.shape[0], G) if M is None else M
            group.add_leaf(M, k, pairs[k][0], pairs[k][1], G)
        else:
            deltas[k] = G[:, 0]
    xp = get_xp(next(iter(deltas.values())) if deltas else M)
    sq = None
    if M is not None:
        sq = xp.zeros(M.shape[0], dtype=M.dtype)
        group.sq_by_owner(M, sq, pcounted)
    for k, (leaf, a) in enumerate(pairs):
        if k not in deltas:
            continue
        counted = None if trainable is None else list(trainable[k])
        if counted is not None and not any(counted):
            continue
        s = leaf.sq_norms(a, deltas[k], counted)  # the leaf's own rule (a Gram form where it has one)
        sq = s if sq is None else xp.add(sq, s, out=sq)
    if sq is None:
        raise ValueError("clipped_grad: no parameter is trainable, so there is no gradient to clip")
    norms, c = clip_factors(sq, max_norm)
    w = c * c.dtype.type(scale) if scale != 1.0 else c
    for k, (leaf, a) in enumerate(pairs):
        if k in deltas:
            leaf.clipped_sum(views[k], a, deltas[k], w)
    if M is not None:  # Σ_i c_i M_i: one (1, B)·(B, W) GEMM through _gemm (direct cuBLAS while a graph records)
        group.write(pviews, matmul(w.reshape(1, -1), M)[0])
    return norms, c


def sweep_and_clip(factors: Sequence[Any], pairs: Sequence[Any], grad_y, views: Sequence[Sequence[Any]],
                   max_norm: float, trainable=None, scale: float = 1.0, shared: Any = None):
    """``(norms, c)``: ``scale ·`` the clipped sum of every leaf into ``views``, from ONE reverse sweep.

    ``factors``: the network's per-sample chain factors (``jacobian_chain(cache).factors``);
    ``pairs[k] = (leaf, a)``; ``grad_y = ∂L/∂y: (B, …)`` of the batch loss (a mean of per-sample
    losses, so sample i's own cotangent is ``B·grad_y[i]``; only read); ``trainable`` and
    ``scale`` as for ``clipped_sum``."""
    B = grad_y.shape[0]
    V = (grad_y * grad_y.dtype.type(B))[:, None]
    partials = per_sample.output_partials(factors, V)
    return clipped_sum(pairs, partials, views, max_norm, trainable, scale, shared)


def denominator(B: int, expected_batch_size: Any) -> float:
    """What the clipped sum is divided by: ``expected_batch_size`` when given, else ``B``."""
    return float(expected_batch_size) if expected_batch_size is not None else float(max(B, 1))


def private_finish(mean, norms, max_norm: float, noise_multiplier: float, denom: float, gen, buf=None, out=None):
    """``out = mean + (σC/B')·N(0, I)`` (``mean``: the clipped sum already divided by ``B' =
    denom``; ``out`` None: in place); the noise is drawn by ``gen`` into ``buf`` (a preallocated
    scratch shaped as ``mean``; None: one is made) in ``mean``'s dtype. Returns
    ``(clipped_fraction, noise_std)``: a 0-d array, the fraction of ``norms`` above C, and ``σC/B'``."""
    xp = get_xp(mean)
    out = mean if out is None else out
    std = noise_multiplier * max_norm / denom
    if noise_multiplier:
        if buf is None:
            buf = xp.empty_like(mean)
        gen.standard_normal(out=buf, dtype=mean.dtype)
        buf *= mean.dtype.type(std)
        xp.add(mean, buf, out=out)
    elif out is not mean:
        xp.copyto(out, mean)
    return xp.mean(norms > max_norm), std

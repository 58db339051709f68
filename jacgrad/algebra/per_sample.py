"""Per-sample parameter-space pieces read off the layers' ``(a, δ)`` pairs and factors.

Every parameterised layer has leaves (``jacgrad.protocol.leaves``): parameter groups whose
per-sample gradient is bilinear in the layer's ``a_i`` and the cotangent ``δ_i`` where the
parameters act, with a token axis (``A_i: (T, p)``, ``Δ_i: (T, d)``; T = 1 is ``(B, p)``):

- a dense weight ``h = a W + b`` per token: ``∇_W ℓ_i = A_iᵀ Δ_i``, ``∇_b ℓ_i = Σ_t Δ_i,t``;
- a normalisation ``y = γ ⊙ x̂ + β`` per token: ``∇_γ ℓ_i = Σ_t x̂_i,t ⊙ g_i,t``, ``∇_β ℓ_i = Σ_t g_i,t``;
- a container (a residual block ``z + s·f(z)``, or ``p(z) + s·f(z)`` with a projection shortcut)
  holds its inner layers' leaves (the branch's, then the shortcut's) and adds none.

Since every jacgrad loss is the mean of per-sample losses, ``δ_i = B · (∂L/∂h)[i]``: the
cotangents of ONE ordinary reverse sweep, times B. Squared norms then cost row norms and no
per-sample gradient (T = 1: ``(‖z_prev,i‖² + 1)·‖δ_i‖²``, Goodfellow 2015; BackPACK's
BatchL2Grad reads the same identities off a layer's input and output gradient).

``output_partials`` is the stacked reverse sweep behind per-sample gradients, the NTK and the
Gauss–Newton diagonal: cotangent rows ``V_i: (R, *out)`` per sample pulled back through the
factors of a ``Chain`` to every leaf. It reads a factor only through its split at the parameters
(``param_vjp_stack``: the cotangent at the leaf and at the input), ``vjp_stack`` (a factor without
parameters) or its ``inner`` and ``shortcut`` chains (a container); it names no factor type.

This module knows nothing of ``MLP`` or ``Sequential``: it takes factors, arrays and callables.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..core.validation import byte_size, float_array, shape_str
from ..core.validation import check_max_memory as _check_max_memory
from ..core.backend import dot_along, get_xp

__all__ = ["check_budget", "check_direction", "check_max_memory", "chunk_rows", "grad_sq_norms", "has_leaves", "inner_factors", "n_leaves",
           "leaf_factors", "output_partials", "param_views", "shortcut_factors"]

GIB = 1 << 30


def inner_factors(J):
    """The inner factors of a container factor (a residual block's ``I + s·J_inner``: it has an
    ``inner`` chain and a ``scale``), else None."""
    inner = getattr(J, "inner", None)
    return inner.factors if inner is not None and hasattr(J, "scale") and hasattr(inner, "factors") else None


def shortcut_factors(J):
    """The factors of a container factor's projection shortcut (``p`` of ``p(z) + s·f(z)``: its
    ``shortcut`` chain), or None: the identity (no shortcut, or not a container)."""
    short = getattr(J, "shortcut", None) if inner_factors(J) is not None else None
    return None if short is None else short.factors


def container_factors(J) -> list:
    """Every inner factor of a container factor in parameter order: the branch's, then the shortcut's."""
    return list(inner_factors(J)) + list(shortcut_factors(J) or ())


def has_leaves(J) -> bool:
    """True for a factor of a layer with parameters: it splits at them (``param_vjp_stack``)."""
    return inner_factors(J) is None and hasattr(J, "param_vjp_stack")


def leaf_factors(factors: Sequence[Any]) -> list:
    """One entry per leaf: the parameterised factors of a chain (a factor of ``n_leaves`` leaves
    that many times), containers opened, in ``Gradients.flat`` order (a factor without
    parameters, e.g. of a pooling layer, has no leaf)."""
    out = []
    for J in factors:
        inner = inner_factors(J)
        if inner is not None:
            out += leaf_factors(container_factors(J))
        elif has_leaves(J):
            out += [J] * n_leaves(J)
    return out


def n_leaves(J) -> int:
    """How many leaves a factor with parameters splits at (``J.n_leaves``; 1 when it does not say):
    its ``param_vjp_stack`` returns that many cotangents, in its layer's ``param_leaves`` order."""
    return int(getattr(J, "n_leaves", 1))


def grad_sq_norms(layer_input: Callable[[int], Any], deltas: Sequence[Any], scale: float):
    """``(B, L)``: per sample and dense layer, ``‖∇_{W_j} ℓ_i‖² + ‖∇_{b_j} ℓ_i‖²``
    (``(‖z_i‖² + 1)·‖δ_i‖²``, Goodfellow 2015).

    ``layer_input(j)``: ``z_j: (B, H_j)`` (``x`` for ``j = -1``); ``deltas[j] = ∂L/∂h_j: (B, H_j)``
    of the batch loss; ``scale``: B, turning them into the per-sample ``δ_{j,i}``."""
    xp = get_xp(deltas[0])
    L, B = len(deltas), deltas[0].shape[0]
    out = xp.empty((B, L), dtype=deltas[0].dtype)
    for j, delta in enumerate(deltas):
        z = layer_input(j - 1)
        zz = dot_along(z, z, 1)
        zz += 1
        zz *= dot_along(delta, delta, 1)
        out[:, j] = zz
    out *= scale * scale
    return out


def param_views(flat, shapes: Sequence[tuple]) -> list:
    """Views of consecutive pieces of ``flat: (…, P)`` along its last axis, one per parameter
    shape: ``(…, *shape)`` each (``(B, H_in, H_out)`` for a W of a ``(B, P)`` block)."""
    lead, views, at = flat.shape[:-1], [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[..., at : at + n].reshape(lead + tuple(shape)))
        at += n
    return views


def check_direction(v: Any, anchor: Any, n_params: int, dtype, layout: str):
    """``v`` as a flat parameter direction ``(P,)`` of ``dtype``, checked: on ``anchor``'s device
    (a parameter of the network; else a ``TypeError``), a float array (int, bool, complex: a
    ``TypeError``), of shape ``(n_params,)`` (else a ``ValueError`` naming P and ``layout``, the
    order of the flat parameters). Not copied when it already has ``dtype``."""
    try:
        xp = get_xp(v, anchor)
    except TypeError:
        where = "the GPU" if get_xp(anchor) is not np else "the CPU"
        raise TypeError(f"v is on another device than the network (on {where}); move it with jacgrad.to_device") from None
    v = float_array(v, "v", xp)
    if v.shape != (n_params,):
        raise ValueError(f"v has shape {shape_str(v.shape)} but the network has P={n_params} parameters: "
                         f"needs ({n_params},), laid out as {layout}")
    return v.astype(dtype, copy=False)


def check_max_memory(max_memory: Any) -> None:
    """A ``ValueError`` unless ``max_memory`` is None (no limit) or a finite number of bytes > 0
    (``_validate.check_max_memory`` names what it got: a bool, a non-number, NaN, inf, ≤ 0)."""
    _check_max_memory(max_memory)


def chunk_rows(max_memory: Any, per_row: int, n: int) -> int:
    """Rows per chunk so that ``rows · per_row`` bytes stay within ``max_memory`` (checked by
    ``check_max_memory``; None: all ``n``); at least 1, at most ``max(n, 1)``."""
    check_max_memory(max_memory)
    if max_memory is None or max_memory >= per_row * max(n, 1):
        return max(n, 1)
    return max(1, int(max_memory // per_row))


def check_budget(what: str, nbytes: int, max_memory: float | None, hint: str) -> None:
    """A ``ValueError`` naming the size when ``nbytes`` exceeds ``max_memory`` bytes (None: no
    limit; anything but None or a number > 0: a ``ValueError`` from ``check_max_memory``)."""
    check_max_memory(max_memory)
    if max_memory is not None and nbytes > max_memory:
        raise ValueError(
            f"{what} needs {byte_size(nbytes)} ({nbytes} bytes), more than max_memory={byte_size(max_memory)}; {hint}"
        )


def output_partials(factors: Sequence[Any], V) -> Iterator[tuple[int, Any]]:
    """For every leaf ``k`` of the chain, last first, yield ``(k, G_k)``: ``G_k = V · ∂y/∂h_k``
    (the pre-activation of a dense leaf, the output of a norm leaf), per sample ``(B, R, H_k)``
    (``(B, R, T, H_k)`` for a token batch).

    ``factors``: the network's per-sample factors, input → output (``leaf_factors`` numbers the
    leaves); ``V: (B, R, n_out)`` cotangent rows per sample (overwritten). Dense: ``G = A ⊙ d``,
    then ``A ← G Wᵀ`` (one GEMM for all rows); norm: ``G = A``, then ``A ← Jᵀ A``; a residual block
    sends ``s·A`` through its inner leaves and hands on ``A + Jᵢₙₙₑᵣᵀ(s·A)`` (with a shortcut, ``A``
    through the shortcut's leaves too, and ``J_pᵀA + Jᵢₙₙₑᵣᵀ(s·A)``). Every ``G_k`` is an
    array of its own that later steps do not overwrite (the last leaf's may be ``V``'s buffer);
    memory ``O(B·R·max H)`` besides what the caller keeps. With ``V`` = the identity, ``G_k`` are
    the partial Jacobians ∂y/∂h_k."""
    yield from _sweep(factors, V, len(leaf_factors(factors)), False)


def _sweep(factors, A, k: int, need_input: bool):
    """``output_partials`` of ``factors`` whose leaves end at number ``k``; returns the cotangent
    at their input when ``need_input`` (else None). Every factor is read through its split at the
    parameters (``param_vjp_stack``), its ``vjp_stack`` (no parameters) or its ``inner`` chain
    (and ``shortcut`` chain: its leaves are numbered after the branch's; the branch is swept first,
    on ``s·A``, as the shortcut's sweep may overwrite ``A``)."""
    for i in range(len(factors) - 1, -1, -1):
        J, more = factors[i], bool(i) or need_input
        inner = inner_factors(J)
        if inner is not None:
            short = shortcut_factors(J)
            n_short = 0 if short is None else len(leaf_factors(short))
            inside = yield from _sweep(inner, A * J.scale, k - n_short, more)
            if short is not None:
                A = yield from _sweep(short, A, k, more)
            k -= n_short + len(leaf_factors(inner))
            A = A + inside if more else None
            continue
        if not has_leaves(J):
            A = J.vjp_stack(A) if more else None
            continue
        k -= n_leaves(J)
        Gs, A = J.param_vjp_stack(A, more)
        for i, G in enumerate(Gs):
            yield k + i, G
    return A

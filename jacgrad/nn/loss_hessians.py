"""Per-sample Hessians of the losses with respect to the network output, and square roots of them.

The batch loss is the mean of per-sample losses, ``L = (1/B) Σ_i ℓ_i`` (``mse`` and
``sigmoid_bce``: ``ℓ_i`` averages over the ``C`` outputs of sample i), so the Hessian of ``L``
is block diagonal with blocks ``H_i / B``. Closed forms, for one sample's output ``y: (C,)``:

    mse                    ℓ = Σ_c (y_c − t_c)² / C          H = (2/C) · I
    sigmoid_bce            ℓ = Σ_c bce(y_c, t_c) / C         H = diag(σ(y)(1 − σ(y))) / C
    softmax_cross_entropy  ℓ = −Σ_c T_c log softmax(y)_c     H = r · (diag(p) − p pᵀ),  p = softmax(y)

with ``r = Σ_c T_c`` (1 for integer labels and for rows of probabilities). The target does not
enter ``H`` otherwise: for ``mse``, ``sigmoid_bce`` and softmax cross-entropy with labels or
probability rows, the Gauss–Newton products do not depend on it.

Square roots ``H = Vᵀ V`` with ``V: (R, C)`` (R = C here):

    mse          V = sqrt(2/C) · I
    sigmoid_bce  V = diag(sqrt(σ(1 − σ) / C))
    softmax      V = sqrt(r) · (diag(s) − s pᵀ),  s = sqrt(p):   Vᵀ V = diag(p) − 2 p pᵀ + p (sᵀ s) pᵀ
                                                                 = diag(p) − p pᵀ   (sᵀ s = Σ p = 1)

Row ``ρ`` of ``V`` is ``s_ρ (e_ρ − p)``. ``hessian_vp`` computes ``p ⊙ (w − pᵀw)`` with
``w = u − u_k`` (k the argmax): the same product, without the cancellation of ``u_k − pᵀu`` where
``p_k`` rounds to 1 (its result keeps full relative accuracy against an 800-digit reference, as
``ggn_diagonal``'s does). Everything is computed from shifted logits or
``exp(−|y|)``, so outputs of ±1e4 give finite Hessians (0 where the loss is saturated).

    >>> import numpy as np
    >>> hessian_vp("softmax_cross_entropy", np.zeros((1, 2)), np.array([[1.0, 0.0]])).tolist()
    [[0.25, -0.25]]
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from ..elementwise import activations
from . import losses
from ..core.validation import float_array, shape_str
from ..core.backend import asarray, get_xp

__all__ = ["factor_bytes_per_sample", "hessian_factor", "hessian_factor_chunks", "hessian_vp", "target_scale"]


def _check(name: str, y):
    name = losses.canonical(name)  # a ValueError listing the valid names; torch's aliases accepted
    xp = get_xp(y)
    y = float_array(y, "output y", xp)
    if y.ndim != 2:
        raise ValueError(f"the output y must be 2-D (B, C); got shape {shape_str(y.shape)}")
    return xp, y, name


def target_scale(name: str, y: Any, target: Any = None):
    """``r: (B, 1)`` for softmax cross-entropy with float target rows (their row sums), else None.

    A given ``target`` is checked against ``y`` with the loss's own checks (same shapes, label
    range and errors as ``jacgrad.nn.losses``; the loss itself is not computed); ``target=None``
    means labels or rows that sum to 1."""
    if target is None:
        return None
    name = losses.canonical(name)
    losses.check_target(name, y, target)
    if name != "softmax_cross_entropy":
        return None
    t = asarray(target)  # torch / JAX / DLPack targets as the losses take them (their dtype is not NumPy's)
    if np.dtype(t.dtype).kind != "f":
        return None
    return t.astype(y.dtype, copy=False).sum(axis=1, keepdims=True)


def _softmax(xp, y):
    """``(p, log p)`` row by row, from logits shifted by their row maximum."""
    logp = y - y.max(axis=1, keepdims=True)
    logp -= xp.log(xp.exp(logp).sum(axis=1, keepdims=True))
    return xp.exp(logp), logp


def _sigmoid_curvature(y):
    """``σ(y)(1 − σ(y))``: the sigmoid row's φ', from one ``exp(−|y|)`` (no overflow at any |y|)."""
    return activations.get("sigmoid").df(y)


def hessian_vp(name: str, y: Any, u: Any, target: Any = None):
    """``H_i u_i`` for every sample: ``y, u: (B, C) -> (B, C)``, ``H_i`` the Hessian of ``ℓ_i``
    (not divided by B). ``target``: see ``target_scale``."""
    xp, y, name = _check(name, y)
    u = float_array(u, "tangent u", xp)
    if u.shape != y.shape:
        raise ValueError(f"tangent u has shape {shape_str(u.shape)} but the output has shape {shape_str(y.shape)}")
    r = target_scale(name, y, target)
    C = y.shape[1]
    if name == "mse":
        return u * (2.0 / C)
    if name == "sigmoid_bce":
        return _sigmoid_curvature(y) * u / C
    # p ⊙ (u − pᵀu), with u's value at the argmax k subtracted first: w = u − u_k has w_k = 0, so
    # pᵀw never adds p_k·u_k (p_k rounds to 1 where the softmax saturates, and u_k − pᵀu would cancel
    # to 0 though it is −Σ_{j≠k} p_j (u_j − u_k)); Σ p = 1 makes it the same product
    p, _ = _softmax(xp, y)
    w = u - xp.take_along_axis(u, y.argmax(axis=1)[:, None], axis=1)
    out = p * (w - (p * w).sum(axis=1, keepdims=True))
    return out if r is None else out * r


def hessian_factor(name: str, y: Any, target: Any = None):
    """``V: (B, R, C)`` with ``H_i = V_iᵀ V_i`` for every sample (R = C; see the module text).

    Each row of ``V_i`` is an output cotangent; pulled back through the network they give the
    exact Gauss–Newton diagonal ``Σ_ρ (J_iᵀ V_i[ρ])²``. ``hessian_factor_chunks`` gives it a
    block of samples at a time."""
    xp, y, name = _check(name, y)
    return _factor(name, xp, y, _checked_scale(name, y, target))


def hessian_factor_chunks(name: str, y: Any, target: Any = None, rows: int | None = None) -> Iterator[tuple[slice, Any]]:
    """``(sel, V[sel])`` for consecutive slices of ``rows`` samples (None: all in one): the blocks
    of ``hessian_factor(name, y, target)``, ``(rows, C, C)`` each, made one at a time so that the
    whole ``(B, C, C)`` never exists. The target is checked once, for the whole batch."""
    xp, y, name = _check(name, y)
    r = _checked_scale(name, y, target)
    B = y.shape[0]
    rows = max(B, 1) if rows is None else int(rows)
    for start in range(0, B, rows):
        sel = slice(start, min(B, start + rows))
        yield sel, _factor(name, xp, y[sel], None if r is None else r[sel])


def factor_bytes_per_sample(C: int, itemsize: int) -> int:
    """Bytes one sample's block of ``hessian_factor`` takes while it is made: ``V_i`` and one
    temporary of its shape ``(C, C)``."""
    return 2 * C * C * itemsize


def _checked_scale(name: str, y, target):
    r = target_scale(name, y, target)
    if r is not None and bool((r < 0).any()):
        raise ValueError("a target row sums to a negative number: its loss Hessian has no real square root")
    return r


def _factor(name: str, xp, y, r):
    """``hessian_factor`` of the rows ``y: (b, C)`` with the row sums ``r: (b, 1)`` (or None)."""
    B, C = y.shape
    idx = xp.arange(C)
    if name == "softmax_cross_entropy":
        p, logp = _softmax(xp, y)
        s = xp.exp(0.5 * logp)
        V = -s[:, :, None] * p[:, None, :]
        V[:, idx, idx] += s
        if r is not None:
            V *= xp.sqrt(r)[:, :, None]
        return V
    diag = xp.full(y.shape, 2.0 / C, dtype=y.dtype) if name == "mse" else _sigmoid_curvature(y) / C
    V = xp.zeros((B, C, C), dtype=y.dtype)
    V[:, idx, idx] = xp.sqrt(diag)
    return V

"""Chain: products of layer factors J_K ⋯ J_1 — VJPs, JVPs, whole Jacobians and spectra.

Factors are given in input → output order. Each ``J_k = diag(d_k) · W_kᵀ``; the weights are
shared by all samples and only the diagonals are per sample, so every accumulation step of a
whole Jacobian is ONE large GEMM of a ``(B·rows, H)`` block against ``W_k`` (or ``W_kᵀ``) with a
broadcast diagonal scaling — never a ``(B, n_out, B, n_in)`` block-diagonal blow-up.

    >>> import numpy as np, jacgrad as jg
    >>> rng = np.random.default_rng(0)
    >>> J1 = jg.LayerJacobian(rng.random((4, 3)), rng.standard_normal((5, 3)))   # 5 -> 3, B = 4
    >>> J2 = jg.LayerJacobian(rng.random((4, 2)), rng.standard_normal((3, 2)))   # 3 -> 2
    >>> jg.Chain([J1, J2]).jacobian().shape                                      # (B, n_out, n_in)
    (4, 2, 5)
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..core.validation import float_array, shape_str
from ..core.backend import get_xp
from .jacobian import LayerJacobian
from .lanczos import top_eigenvalues
from .spectra import power_spectral_norm, singular_values, spectral_norm_dense
from . import bracketing as _br
from .token_factor import DEFAULT_MAX_MEMORY, FlatTokens, token_jacobian_bytes

__all__ = ["Chain", "ORDERS"]

ORDERS = ("auto", "forward", "reverse")

# Above this many elements of B·n_out·n_in, spectral_norm(method="auto") goes matrix-free.
_EXACT_SPECTRAL_LIMIT = 1 << 24


# What a factor other than a LayerJacobian provides (jacgrad.algebra.factors): products, its action on a
# stack of rows, its dense form, a per-row cost for the plan, and the array that fixes its device.
_FACTOR_API = ("vjp", "jvp", "jvp_stack", "vjp_stack", "dense", "rows", "norm_bound", "row_cost", "dense_cost", "anchor",
               "h_in", "h_out", "batch", "per_sample", "dtype", "xp")


def _anchor(J):
    """An array of the factor's, for device checks."""
    return J.W if isinstance(J, LayerJacobian) else J.anchor


class Chain:
    """The product ``J_K ⋯ J_1`` of ``LayerJacobian`` factors given input → output.

    Shapes: ``n_in = J_1.h_in``, ``n_out = J_K.h_out``; ``batch`` is the common B of the
    per-sample factors, or None when every diagonal is shared.

    dtype: every factor must have the same dtype (float32 or float64); a mix is a ``TypeError``
    naming the factors of each dtype, as ``MLP`` refuses mixed layers — a silent promotion
    would hand float64 results (and float64 cost) to a float32 pipeline.

    Widths may be 0 anywhere (an empty layer): products, the Jacobian and the spectra then
    have the right shapes and are empty or zero (a map through a zero-width layer is 0).
    """

    def __init__(self, factors: Sequence[Any]):
        factors = list(factors)
        if not factors:
            raise ValueError("a Chain needs at least one LayerJacobian")
        for k, J in enumerate(factors):
            if not isinstance(J, LayerJacobian):
                missing = [a for a in _FACTOR_API if not hasattr(J, a)]
                if missing:
                    raise TypeError(f"factor {k} is a {type(J).__name__}, not a LayerJacobian nor a structured "
                                    f"factor (it lacks {', '.join(missing)}; see jacgrad.algebra.factors)")
        try:
            get_xp(*[_anchor(J) for J in factors])
        except TypeError as exc:
            raise TypeError(f"the factors' weights live on different devices: {exc}") from None
        dtypes = [np.dtype(J.dtype) for J in factors]
        if len(set(dtypes)) > 1:
            kinds = {dt: [k for k, d in enumerate(dtypes) if d == dt] for dt in dict.fromkeys(dtypes)}
            which = "; ".join(f"{dt}: factor(s) {', '.join(map(str, ks))}" for dt, ks in kinds.items())
            raise TypeError(f"the factors mix dtypes ({which}); a Chain computes in one dtype — "
                            "cast the diagonals and weights to float32 or float64 first")
        batch = None
        for k, J in enumerate(factors):
            if k and J.h_in != factors[k - 1].h_out:
                raise ValueError(
                    f"factor {k} maps {J.h_in} -> {J.h_out} features but factor {k - 1} outputs "
                    f"{factors[k - 1].h_out}: consecutive factors must chain"
                )
            if J.per_sample:
                if batch is not None and J.batch != batch[1]:
                    raise ValueError(
                        f"factor {k} is per sample with B={J.batch} but factor {batch[0]} has B={batch[1]}"
                    )
                batch = batch or (k, J.batch)
        self.factors = factors
        self.batch = None if batch is None else batch[1]
        self._plans: dict[str, Any] = {}

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.factors)

    def __getitem__(self, k):
        return self.factors[k]

    def __repr__(self) -> str:
        widths = "-".join(str(w) for w in self.widths)
        b = f"B={self.batch}, " if self.batch is not None else "shared, "
        return f"Chain({b}{widths}, dtype={self.dtype})"

    def rows(self, sel) -> "Chain":
        """The chain of the samples ``sel`` (a slice, or a 1-D integer or boolean index array —
        never a single integer: the batch axis stays): per-sample diagonals sliced, weights and
        shared diagonals as they are. Use it to work through a batch in chunks."""
        return Chain([J.rows(sel) for J in self.factors])

    @property
    def tokens(self) -> int | None:
        """T when the factors act per token on ``(B, T, ·)`` (``TokenFactor``, attention, a residual
        block of those), else None. Widths are then per token; ``jacobian`` and the spectra are of
        each sample's flattened tokens, ``(T·n_out, T·n_in)``."""
        for J in self.factors:
            T = getattr(J, "tokens", None)
            if T is None and isinstance(getattr(J, "inner", None), Chain):
                T = J.inner.tokens
            if T is not None:
                return int(T)
        return None

    def flat_tokens(self) -> "Chain":
        """A token chain on each sample's flattened tokens: every factor maps ``(B, T·n_in) ->
        (B, T·n_out)`` (``token_factor.FlatTokens``; a residual block's inner chain likewise).
        A ``ValueError`` for a chain that is not one of tokens, or mixes token factors with others."""
        if self.tokens is None:
            raise ValueError(f"{self!r} holds no token factors: its rows are (B, n) already")
        mixed = any(hasattr(J, "flat_rows") for J in self.factors)  # a factor changes the token axis
        return Chain([_flat_factor(J, k, mixed) for k, J in enumerate(self.factors)])

    @property
    def widths(self) -> list[int]:
        """``[n_in, H_1, …, n_out]``."""
        return [self.factors[0].h_in] + [J.h_out for J in self.factors]

    @property
    def structured(self) -> bool:
        """Whether some factor is not a ``LayerJacobian`` (see ``jacgrad.algebra.factors``)."""
        return any(not isinstance(J, LayerJacobian) for J in self.factors)

    @property
    def n_in(self) -> int:
        return self.factors[0].h_in

    @property
    def n_out(self) -> int:
        return self.factors[-1].h_out

    @property
    def dtype(self) -> np.dtype:
        return np.result_type(*[J.dtype for J in self.factors])

    @property
    def xp(self):
        return self.factors[0].xp

    # ------------------------------------------------------------------ products
    def vjp(self, v: Any):
        """Jᵀv through every factor, output to input: ``v (B, n_out) -> (B, n_in)``."""
        v = self._check_rows(v, self.n_out, "v")
        for J in reversed(self.factors):
            v = J.vjp(v)
        return v

    def jvp(self, u: Any):
        """Ju through every factor, input to output: ``u (B, n_in) -> (B, n_out)``."""
        u = self._check_rows(u, self.n_in, "u")
        for J in self.factors:
            u = J.jvp(u)
        return u

    def _check_rows(self, a, width: int, name: str):
        a = float_array(a, name, get_xp(a, _anchor(self.factors[0])))
        need = f"({self.batch}, {width})" if self.batch is not None else f"(N, {width}) or ({width},)"
        ok = a.ndim in (1, 2) and a.shape[-1] == width
        if self.batch is not None:
            ok = ok and a.ndim == 2 and a.shape[0] == self.batch
        if not ok:
            raise ValueError(
                f"{name} has shape {shape_str(a.shape)} but the chain maps {self.n_in} -> {self.n_out} "
                f"features{f' for B={self.batch} samples' if self.batch is not None else ''}: needs {need}"
            )
        return a

    # ------------------------------------------------------------------ whole Jacobian
    def bracketing(self, order: str = "auto"):
        """The evaluation tree of ``jacobian(order)``: a factor index, or ``(left, right)`` with
        ``left`` applied after ``right`` (so ``(2, (1, 0))`` is ``J_2 (J_1 J_0)``)."""
        return self._plan(order).tree

    def jacobian_cost(self, order: str = "auto") -> int:
        """Multiply-adds of the GEMMs of ``jacobian(order)`` (the batch counted)."""
        return self._plan(order).cost

    def _plan(self, order: str) -> "_br.Plan":
        if order not in ORDERS:
            raise ValueError(f"order {order!r} is not one of {', '.join(ORDERS)}")
        if order not in self._plans:
            per_sample = [J.per_sample for J in self.factors]
            costs = dense = None
            if self.structured:
                costs = [_br.row_cost(J) for J in self.factors]
                dense = [0 if isinstance(J, LayerJacobian) else J.dense_cost for J in self.factors]
            self._plans[order] = _br.plan(order, self.widths, per_sample, self.batch or 1, costs, dense)
        return self._plans[order]

    def jacobian(self, order: str = "auto", max_memory: float | None = DEFAULT_MAX_MEMORY):
        """The whole Jacobian: ``(B, n_out, n_in)`` per sample, ``(n_out, n_in)`` when shared.

        A token chain (``tokens`` = T; inputs ``(B, T, n_in)``): each sample's Jacobian of its
        flattened output by its flattened input, ``(B, T·n_out, T·n_in)`` (index ``t·n + i`` is
        token t's feature i), bracketed as below on ``flat_tokens()``; a ``ValueError`` when its
        largest intermediate (``token_factor.token_jacobian_bytes``) exceeds ``max_memory`` bytes
        (default 1 GiB; None: no limit).

        ``order``: ``"forward"`` (accumulate from the input side, cheap when n_in is small),
        ``"reverse"`` (from the output side, cheap when n_out is small) or ``"auto"`` — the
        cheapest bracketing from matrix-chain dynamic programming over the widths, the batch
        counted (an hourglass net is split at its bottleneck). "auto" is exact up to
        ``jacgrad.algebra.bracketing.EXACT_LIMIT`` (1200) factors and planned in well under a second at
        1000; beyond, it is a heuristic never worse than forward or reverse (see
        ``jacgrad.algebra.bracketing``). Any depth works: nothing recurses per factor. A chain with
        structured factors (``self.structured``: residual ``I + s·J``, normalisations) applies
        them through their row actions, and the DP prices them so (a factor on r rows costs
        ``b·r·row_cost``, see ``bracketing.plan``): "auto" is the cheapest bracketing under
        that model up to EXACT_LIMIT factors; beyond, the cheaper of forward and reverse.
        """
        if self.tokens is not None:
            return self._token_check(max_memory, "jacobian").jacobian(order)
        plan = self._plan(order)
        out = _br.evaluate(plan.tree, self.factors, transposed=False)
        return self.xp.ascontiguousarray(out)

    def _token_check(self, max_memory, what: str) -> "Chain":
        """``flat_tokens()``, after the ``max_memory`` check of a token chain's whole Jacobian."""
        T, B = self.tokens, self.batch or 1
        heads = max([getattr(J, "heads", 0) for J in _leaf_factors(self.factors)] + [0])
        need = token_jacobian_bytes(self.widths, B, T, heads, np.dtype(self.dtype).itemsize)
        if max_memory is not None and need > max_memory:
            raise ValueError(f"{what}: the per-sample Jacobians of this token batch (B={B}, T={T}, widths "
                             f"{'-'.join(map(str, self.widths))}: ({B}, {T * self.n_out}, {T * self.n_in})) pass through "
                             f"{need:,} bytes, over max_memory={int(max_memory):,} bytes; raise max_memory, "
                             f"take fewer samples (chain.rows(sel)) or use vjp/jvp and spectral_norm(method='lanczos')")
        return self.flat_tokens()

    # ------------------------------------------------------------------ spectra
    def singular_values(self, order: str = "auto", max_memory: float | None = DEFAULT_MAX_MEMORY):
        """Exact singular values of the whole Jacobian, descending: ``(B, k)`` or ``(k,)`` (a token
        chain's: of ``(T·n_out, T·n_in)`` per sample, under ``max_memory`` as ``jacobian``)."""
        return singular_values(self.jacobian(order, max_memory))

    def spectral_norm(self, method: str = "auto", tol: float | None = None, max_iter: int = 1000, seed: int = 0):
        """‖J_K ⋯ J_1‖₂ per sample (``(B,)``) or shared (0-d), on the chain's device.

        ``method``: ``"exact"`` (SVD of the materialised Jacobian), ``"lanczos"`` (matrix-free
        batched Lanczos on ``J Jᵀ`` or ``Jᵀ J``, whichever is smaller, through ``vjp``/``jvp``;
        converged when the top Ritz value stagnates to ``tol``, default 1e-12 in float64 and
        1e-5 in float32), ``"power"`` (matrix-free power iteration, stopping at relative change
        ``tol``, default 1e-6 — slow when the top two singular values are close) or ``"auto"``
        (exact while ``B·n_out·n_in`` ≤ 2²⁴ elements, Lanczos beyond).
        """
        methods = ("auto", "exact", "lanczos", "power")
        if method not in methods:
            raise ValueError(f"method {method!r} is not one of {', '.join(methods)}")
        if self.tokens is not None:  # of each sample's flattened tokens: (T·n_out, T·n_in)
            flat = self._token_check(DEFAULT_MAX_MEMORY, "spectral_norm") if method == "exact" else self.flat_tokens()
            return flat.spectral_norm(method, tol=tol, max_iter=max_iter, seed=seed)
        if method == "auto":
            size = (self.batch or 1) * self.n_out * self.n_in
            method = "exact" if size <= _EXACT_SPECTRAL_LIMIT else "lanczos"
        if method == "exact":
            return spectral_norm_dense(self.jacobian())
        xp = self.xp
        rows = self.batch if self.batch is not None else 1
        if method == "lanczos":
            sq = top_eigenvalues(self._gram_matvec(), rows, min(self.n_in, self.n_out), xp=xp, dtype=self.dtype,
                                 seed=seed, tol=tol, max_steps=max_iter)
            sigma = xp.asarray(np.sqrt(np.maximum(sq, 0.0)).astype(self.dtype))
        else:
            rng = np.random.default_rng(seed)
            u0 = xp.asarray(rng.standard_normal((rows, self.n_in)).astype(self.dtype))
            sigma = power_spectral_norm(self.jvp, self.vjp, u0, tol=1e-6 if tol is None else tol, max_iter=max_iter)
        return sigma if self.batch is not None else sigma[0]

    def _gram_matvec(self):
        """``matvec(v, sel)`` of ``J Jᵀ`` (when n_out ≤ n_in) or ``Jᵀ J`` for the samples ``sel``."""
        if self.n_out <= self.n_in:
            return lambda v, sel: (lambda c: c.jvp(c.vjp(v)))(self.rows(sel))
        return lambda u, sel: (lambda c: c.vjp(c.jvp(u)))(self.rows(sel))

    def norm_bound(self):
        """Product of the factors' bounds ``Π max|d_k|·‖W_k‖₂`` ≥ ‖J‖₂: ``(B,)`` or 0-d."""
        bound = self.factors[0].norm_bound()
        for J in self.factors[1:]:
            bound = bound * J.norm_bound()
        return bound


def _flat_factor(J, k: int, mixed: bool = False):
    """Factor ``k`` of a token chain on flattened tokens (``Chain.flat_tokens``). ``mixed``: the chain
    has factors that change the token axis (image -> tokens, a class token, a read-out of tokens);
    they give their flat form (``flat_rows()``), and a factor without tokens (before or after the
    token part) keeps its flat rows."""
    if hasattr(J, "flat_rows"):
        return J.flat_rows()
    if getattr(J, "tokens", None) is not None:
        return FlatTokens(J)
    inner = getattr(J, "inner", None)
    if isinstance(inner, Chain) and inner.tokens is not None:
        short = getattr(J, "shortcut", None)  # a residual block: J_p + s·J_inner on the flat rows
        return type(J)(inner.flat_tokens(), J.scale, None if short is None else short.flat_tokens())
    if mixed:
        return J
    raise ValueError(f"factor {k} ({J!r}) does not act per token, but the chain's others do: a token chain "
                     f"needs every factor per token")


def _leaf_factors(factors):
    for J in factors:
        inner = getattr(J, "inner", None)
        if isinstance(inner, Chain):
            yield from _leaf_factors(inner.factors)
            if getattr(J, "shortcut", None) is not None:
                yield from _leaf_factors(J.shortcut.factors)
        else:
            yield J

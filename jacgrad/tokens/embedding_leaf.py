"""The parameter leaf of an ``Embedding`` (``jacgrad.tokens.embedding``): its per-sample algebra, read off the
tokens and the output cotangents, never building the one-hot.

The leaf is a token-wise Dense whose input is the one-hot of the token: ``A_i = onehot(tok_i):
(T, V)``, so ``∇_E ℓ_i = A_iᵀΔ_i`` is the scatter-add of the rows of ``Δ_i: (T, d)`` by token id —
a token repeated in sample i counts every occurrence:

    squared norm   ‖∇_E ℓ_i‖² = Σ_{s,t} [tok_s = tok_t] Δ_s·Δ_t      (the token-equality Gram)
                   or the norm of the summed rows per distinct token  (``"instantiate"``)
    fill           ``out[i, tok_it] += Δ_it``                         (per-sample gradients)
    weighted sum   ``Σ_i c_i ∇_E ℓ_i``                                 (clipped gradients)
    NTK cross      ``Σ_{s,t} [tok_s = tok′_t] G_s·G′_t``               (G: the leaf's output partials)
    GGN diagonal   ``Σ_i Σ_c (A_iᵀ S_ic)²``                            (S: the GGN's square-root rows)
    parameter JVP  ``Ė[tok]``                                          (Gauss–Newton products)

``padding_idx`` (torch's): that row's gradient is 0; the functions drop the positions holding it.
``state``: an ``EmbeddingTokens`` (what ``Embedding.forward`` returns as its state).

    >>> import numpy as np
    >>> st = EmbeddingTokens(np.array([[2, 0, 2]]), None, 3)
    >>> embedding_sq_norms(st, np.ones((1, 3, 2)))   # token 2 twice: ‖(2, 2)‖² + ‖(1, 1)‖²
    array([10.])
"""

from __future__ import annotations

import numpy as np

from ..core.backend import get_xp
from ..cuda.gemm import matmul
from ..algebra.jacobian import _check_sample_selection

__all__ = ["EmbeddingFactor", "EmbeddingLeaf", "EmbeddingTokens", "embedding_fill", "embedding_ggn_diagonal", "embedding_ntk", "embedding_param_jvp",
           "embedding_sq_norms", "embedding_weighted_sum"]


class EmbeddingTokens:
    """An Embedding's state: the tokens ``(B, T)``, and what the leaf functions derive from them once:
    ``keep (B, T)`` bool (positions not holding ``padding_idx``; None without one)."""

    __slots__ = ("tok", "pad", "V", "_keep")

    def __init__(self, tok, pad, V):
        self.tok, self.pad, self.V, self._keep = tok, pad, V, None

    def __getitem__(self, sel) -> "EmbeddingTokens":
        """The tokens of the samples ``sel`` (a slice or index array), as a leaf input is sliced by sample."""
        return EmbeddingTokens(self.tok[sel], self.pad, self.V)

    @property
    def shape(self) -> tuple:
        """``(B, T)``: the samples and tokens (as an ``a: (B, T, p)`` would give them first)."""
        return tuple(self.tok.shape)

    @property
    def keep(self):
        if self.pad is None:
            return None
        if self._keep is None:
            self._keep = self.tok != self.pad
        return self._keep

    def masked(self, delta, tok_axis: int = 1):
        """``delta`` with the padding positions zeroed (a copy only when there is a padding_idx):
        ``delta`` has the batch on axis 0 and the tokens on axis ``tok_axis``."""
        if self.pad is None:
            return delta
        keep = self.keep
        shape = (keep.shape[0],) + (1,) * (tok_axis - 1) + (keep.shape[1],) + (1,) * (delta.ndim - tok_axis - 1)
        return delta * keep.reshape(shape)

    def segments(self):
        """``(inverse (B·T,), U, sample_of (U,), token_of (U,))``: the distinct (sample, token) pairs,
        position ``(b, t)`` -> its pair number."""
        xp = get_xp(self.tok)
        B = self.tok.shape[0]
        key = (xp.arange(B, dtype=np.int64)[:, None] * self.V + self.tok.astype(np.int64)).ravel()
        uniq, inv = xp.unique(key, return_inverse=True)
        return inv.ravel(), uniq.shape[0], uniq // self.V, uniq % self.V


def _state(state):
    if not isinstance(state, EmbeddingTokens):
        raise TypeError(f"expected an Embedding's state (from its forward), got {type(state).__name__}")
    return state


def embedding_sq_norms(state, delta, method: str = "auto"):
    """``(B,)``: ``‖∇_E ℓ_i‖²`` for ``Δ: (B, T, d)``. ``"gram"``: ``Σ_{s,t}[tok_s = tok_t] Δ_s·Δ_t``,
    O(B·T²·d); ``"instantiate"``: the rows of ``Δ_i`` summed per distinct token of sample i, then
    their squared norms, O(B·T·d) and a sort; ``"auto"``: instantiate (never costlier here)."""
    st = _state(state)
    xp = get_xp(delta)
    delta = st.masked(delta)
    if method == "gram":
        same = st.tok[:, :, None] == st.tok[:, None, :]
        return (matmul(delta, delta.swapaxes(1, 2)) * same).sum(axis=(1, 2))
    if method not in ("auto", "instantiate"):
        raise ValueError(f"unknown method {method!r}; valid: auto, gram, instantiate")
    if xp is not np:
        return _sq_norms_fixed_shape(st, delta)
    inv, U, sample_of, _ = st.segments()
    rows = xp.zeros((U, delta.shape[-1]), dtype=delta.dtype)
    xp.add.at(rows, inv, delta.reshape(-1, delta.shape[-1]))
    out = xp.zeros(delta.shape[0], dtype=delta.dtype)
    xp.add.at(out, sample_of, (rows * rows).sum(axis=1))
    return out


def _sq_norms_fixed_shape(st, delta):
    """``embedding_sq_norms``' "instantiate" with shapes fixed by ``(B, T, d)`` alone, what a CUDA graph
    can record (``unique`` reads its output size on the host, a sort is not capturable): each position
    ``(i, s)`` adds ``Δ_is`` into the row of the FIRST position of sample i holding the same token
    (``argmax`` of the ``(B, T, T)`` token-equality rows), then ``Σ`` of the rows' squared norms —
    ``O(B·T² + B·T·d)``. The device formulation; NumPy keeps the sort (``O(B·T·log(B·T))``)."""
    xp = get_xp(delta)
    B, T, d = delta.shape
    first = (st.tok[:, :, None] == st.tok[:, None, :]).view(np.int8).argmax(axis=2)  # (B, T)
    rows = xp.zeros((B * T, d), dtype=delta.dtype)
    xp.add.at(rows, (xp.arange(B)[:, None] * T + first).ravel(), delta.reshape(B * T, d))
    return (rows * rows).sum(axis=1).reshape(B, T).sum(axis=1)


def embedding_fill(state, delta, out):
    """Per-sample gradients: ``out: (B, V, d)`` set to ``∇_E ℓ_i`` (the scatter-add of ``Δ_i``'s rows)."""
    st = _state(state)
    xp = get_xp(out, delta)
    out[...] = 0
    B, T = st.tok.shape
    b = xp.broadcast_to(xp.arange(B)[:, None], (B, T))
    xp.add.at(out, (b.ravel(), st.tok.ravel()), st.masked(delta).reshape(B * T, -1))
    return out


def embedding_weighted_sum(state, delta, c, out):
    """``out: (V, d)`` set to ``Σ_i c_i ∇_E ℓ_i`` (``c: (B,)``; None: all 1, the batch gradient)."""
    st = _state(state)
    xp = get_xp(out, delta)
    delta = st.masked(delta)
    if c is not None:
        delta = delta * c[:, None, None]
    out[...] = 0
    xp.add.at(out, st.tok.ravel(), delta.reshape(-1, delta.shape[-1]))
    return out


def embedding_ntk(state1, G1, state2, G2, trace: bool = False):
    """The leaf's NTK term ``Σ_{s,t} [tok1_is = tok2_jt] G1[i, o, s]·G2[j, o′, t]``: ``(N1, O, N2, O)``,
    or ``(N1, N2)`` summed over ``o = o′`` with ``trace``. ``G: (N, O, T, d)``, the output partials
    with respect to the embedding's output (per sample, per output row)."""
    s1, s2 = _state(state1), _state(state2)
    G1, G2 = s1.masked(G1, 2), s2.masked(G2, 2)
    same = (s1.tok[:, None, :, None] == s2.tok[None, :, None, :]).astype(G1.dtype)  # (N1, N2, T1, T2)
    (N1, O, T1, d), (N2, _, T2, _) = G1.shape, G2.shape
    if trace:  # C[i, s, j, t] = Σ_o,d G1[i, o, s, d] G2[j, o, t, d]: one GEMM over (o, d)
        C = matmul(G1.transpose(0, 2, 1, 3).reshape(N1 * T1, O * d), G2.transpose(0, 2, 1, 3).reshape(N2 * T2, O * d).T)
        return (C.reshape(N1, T1, N2, T2).transpose(0, 2, 1, 3) * same).sum(axis=(2, 3))
    # H[i, j, s, (e, d)] = Σ_t same[i, j, s, t] G2[j, e, t, d], then Σ_s,d G1[i, o, s, d] H[i, j, s, e, d]:
    # batched GEMMs (through _gemm: direct cuBLAS while a graph records)
    H = matmul(same, G2.transpose(0, 2, 1, 3).reshape(N2, T2, O * d))
    H = H.reshape(N1, N2, T1, O, d).transpose(0, 2, 4, 1, 3).reshape(N1, T1 * d, N2 * O)
    return matmul(G1.reshape(N1, O, T1 * d), H).reshape(N1, O, N2, O)


def embedding_ggn_diagonal(state, S, out):
    """``out: (V, d)`` += ``Σ_i Σ_c (A_iᵀ S_ic)²`` for ``S: (B, C, T, d)`` (rows whose outer products sum
    to the loss Hessian, pulled back to the embedding output); the caller divides by B."""
    st = _state(state)
    xp = get_xp(out, S)
    S = st.masked(S, 2)
    inv, U, _, token_of = st.segments()
    B, C, T, d = S.shape
    rows = xp.zeros((C, U, d), dtype=S.dtype)
    xp.add.at(rows, (slice(None), inv), S.swapaxes(0, 1).reshape(C, B * T, d))
    xp.add.at(out, token_of, (rows * rows).sum(axis=0))
    return out


def embedding_param_jvp(state, Edot):
    """``Ė[tok]: (B, T, d)`` (padding positions 0)."""
    st = _state(state)
    y = get_xp(Edot).take(Edot, st.tok, axis=0)
    return st.masked(y)


class EmbeddingLeaf:
    """The leaf kind of an ``Embedding``'s ``E: (V, d)`` in the interface of ``jacgrad.protocol.leaves``
    (``sq_norms``, ``fill``, ``clipped_sum``, ``ntk_add``, ``jvp``, ``ggn_diag_add``; ``n_arrays = 1``),
    each one of the functions above. ``a`` is the layer's ``EmbeddingTokens`` (``param_input``),
    ``δ: (B, T, d)``, ``G: (B, R, T, d)``."""

    n_arrays = 1
    bias = False

    def __repr__(self) -> str:
        return "EmbeddingLeaf()"

    def sq_norms(self, a, delta, counted=None, method: str = "auto"):
        if counted is not None and not counted[0]:
            return get_xp(delta).zeros(delta.shape[0], dtype=delta.dtype)
        return embedding_sq_norms(a, delta, method)

    def fill(self, views, a, delta) -> None:
        embedding_fill(a, delta, views[0])

    def clipped_sum(self, views, a, delta, c) -> None:
        embedding_weighted_sum(a, delta, c, views[0])

    def ntk_add(self, left, right, trace: bool, out, method: str = "auto") -> None:
        (aa, Ga), (ab, Gb) = left, right
        out += embedding_ntk(aa, Ga, ab, Gb, trace)

    def jvp(self, a, v, base):
        out = embedding_param_jvp(a, v[0])
        return out if base is None else out + base

    def ggn_diag_add(self, outs, a, G, scale: float) -> None:
        acc = get_xp(G).zeros(outs[0].shape, dtype=outs[0].dtype)
        first = outs[0]
        first += embedding_ggn_diagonal(a, G, acc) * scale


class EmbeddingFactor:
    """The Jacobian factor of an ``Embedding``: its input is discrete token ids, so the map from its
    (zero-width) continuous input is empty — ``h_in = 0``, ``h_out = d``, ``tokens = T`` — and it is
    all leaf: ``param_vjp_stack`` hands the cotangent rows on as the leaf's ``G`` (no input
    cotangent), ``param_jvp`` is the leaf's tangent. Products with an input are of width 0."""

    n_leaves = 1
    per_sample = property(lambda self: True)

    def __init__(self, state, E):
        self.state, self.E = _state(state), E
        self.batch, self.tokens = state.tok.shape
        self.h_in, self.h_out = 0, E.shape[1]

    dtype = property(lambda self: self.E.dtype)
    xp = property(lambda self: get_xp(self.E))
    anchor = property(lambda self: self.E)
    row_cost = property(lambda self: 0)
    dense_cost = property(lambda self: 0)

    def __repr__(self) -> str:
        return f"EmbeddingFactor(B={self.batch}, T={self.tokens}, d={self.h_out})"

    def param_vjp_stack(self, A, need_input: bool = True):
        """``([A], input cotangent)``: ``A: (B, R, T, d)`` is the leaf's ``G``; the input has width 0."""
        return [A], (self.xp.zeros(A.shape[:-1] + (0,), dtype=A.dtype) if need_input else None)

    def param_jvp(self, t, leaf_tangent):
        """The leaf's tangent ``Ė[tok]`` (an input tangent has width 0 and adds nothing)."""
        return leaf_tangent(0, None)

    def vjp(self, v):
        return self.xp.zeros(v.shape[:-1] + (0,), dtype=v.dtype)

    def jvp(self, u):
        return self.xp.zeros(u.shape[:-1] + (self.h_out,), dtype=self.dtype)

    vjp_stack = vjp
    jvp_stack = jvp

    def dense(self, transposed: bool = False):
        n = self.tokens * self.h_out
        return self.xp.zeros((self.batch, 0, n) if transposed else (self.batch, n, 0), dtype=self.dtype)

    def rows(self, sel) -> "EmbeddingFactor":
        _check_sample_selection(sel)
        return EmbeddingFactor(self.state[sel], self.E)

    def norm_bound(self):
        return self.xp.zeros(self.batch, dtype=self.dtype)

    def singular_values(self):
        return self.xp.zeros((self.batch, 0), dtype=self.dtype)

"""The parameter-space products of a network with shared parameters (``protocol.sharing.Ties``).

A parameter used in several places has, per sample (and per output row), the gradient
``Σ_u g_u``, the sum over its uses; its squared norm ``‖Σ_u g_u‖²``, its NTK term
``⟨Σ_u J_u, Σ_v J′_v⟩`` and its Gauss–Newton diagonal ``Σ_ρ (Σ_u g_uρ)²`` carry the cross terms
between the uses, which no leaf's own rule (``sq_norms``, ``ntk_add``, ``ggn_diag_add``) sees.
``SharedGroup`` takes the general path for them: the leaves holding a shared parameter
materialise their rows' gradients with their ``fill`` (``(R, …)`` per use), the uses are summed
into one ``(R, W)`` block ``M`` over the parameters those leaves touch, and the products read
``M``: norms ``Σ_w M²``, the NTK ``M M′ᵀ``, the diagonal ``Σ_ρ M²``, the clipped sum
``Σ_i c_i M_i``. Every other leaf keeps its own fast rule. Memory: ``R · W`` numbers (``R`` =
samples × output rows of the call, ``W`` the sizes of the parameters touched by shared leaves).

Reads leaves through the protocol only (``leaf.fill``, ``n_arrays``); names no layer.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..core.backend import get_xp

__all__ = ["SharedGroup"]


class SharedGroup:
    """The leaves of a network that hold a shared parameter, and the parameters they touch.

    ``ties``: the network's ``Ties``; ``counts[k]``: leaf k's number of arrays (its uses, in
    order); ``owners[u]``: the top-level layer of use u (``per_layer`` norms: a parameter counts
    for the layer of its first use). ``leaves``: the set of leaf numbers that take this path;
    ``width``: ``W``."""

    def __init__(self, ties, counts: Sequence[int], owners: Sequence[int]):
        self.ties = ties
        self.uses, at = [], 0
        for n in counts:
            self.uses.append(list(range(at, at + n)))
            at += n
        self.leaves = frozenset(k for k, us in enumerate(self.uses) if any(ties.uses[u][0] in ties.multi for u in us))
        Q = sorted({ties.uses[u][0] for k in self.leaves for u in self.uses[k]})
        self.offsets, w = {}, 0
        for q in Q:
            self.offsets[q] = w
            w += int(ties.params[q].size)
        self.width = w
        first = {}
        for u, (q, _) in enumerate(ties.uses):
            first.setdefault(q, owners[u])
        self.owner = {q: first[q] for q in Q}

    def __contains__(self, k: int) -> bool:
        return k in self.leaves

    def block(self, M, q: int):
        """Parameter q's columns of ``M: (R, W)``, in its shape ``(R, *shape)``."""
        p = self.ties.params[q]
        at = self.offsets[q]
        return M[:, at:at + int(p.size)].reshape((M.shape[0],) + tuple(p.shape))

    def zeros(self, R: int, like):
        return get_xp(like).zeros((R, self.width), dtype=like.dtype)

    def add_leaf(self, M, k: int, leaf, a, G) -> None:
        """Add leaf k's row gradients into ``M: (N·O, W)``; ``a: (N, …)`` its input, ``G: (N, O, …)``
        its cotangent rows (``per_sample.output_partials``), row ``(i, o)`` of ``M`` for sample i's row o."""
        xp = get_xp(G)
        N, O = G.shape[:2]
        R = N * O
        rows = a if O == 1 else a[xp.repeat(xp.arange(N), O)]  # sample i's input, once per row
        shapes = [self.ties.use_shapes[u] for u in self.uses[k]]
        tmp = xp.empty((R, sum(math.prod(s) for s in shapes)), dtype=G.dtype)
        views, at = [], 0
        for s in shapes:
            n = math.prod(s)
            views.append(tmp[:, at:at + n].reshape((R,) + s))
            at += n
        leaf.fill(views, rows, G.reshape((R,) + G.shape[2:]))
        for u, v in zip(self.uses[k], views):
            q, t = self.ties.uses[u]
            dst = self.block(M, q)
            dst += v.swapaxes(-1, -2) if t else v

    def sq_by_owner(self, M, sq, counted=None) -> None:
        """``sq[:, owner(q)] += ‖M_q‖²`` per row (``sq: (R,)``: ``sq += ‖M_q‖²``), every parameter q
        of the group (``counted``: a set of parameters to count; None: all)."""
        for q, at in self.offsets.items():
            if counted is None or q in counted:
                m = M[:, at:at + int(self.ties.params[q].size)]
                if sq.ndim == 1:
                    sq += (m * m).sum(axis=1)
                else:
                    sq[:, self.owner[q]] += (m * m).sum(axis=1)

    @staticmethod
    def gram(Ma, Mb, trace: bool):
        """The NTK term of the group: ``Ma: (Na, O, W)``, ``Mb: (Nb, O, W)`` -> ``(Na, O, Nb, O)``,
        or ``(Na, Nb)`` summed over the output diagonal (``trace``)."""
        Na, O, W = Ma.shape
        Nb = Mb.shape[0]
        if trace:
            return Ma.reshape(Na, O * W) @ Mb.reshape(Nb, O * W).T
        return (Ma.reshape(Na * O, W) @ Mb.reshape(Nb * O, W).T).reshape(Na, O, Nb, O)

    def write(self, out_views: Sequence[Any], values) -> None:
        """``out_views[q] += values_q`` for every parameter q of the group; ``values: (W,)``."""
        for q, at in self.offsets.items():
            dst = out_views[q]
            dst += values[at:at + int(self.ties.params[q].size)].reshape(dst.shape)

"""Shared parameters: one array used in several places is ONE parameter.

A network's layers list their parameter arrays (``named_params``: every *use*, in layer order,
containers opened). Two uses are the same parameter when they are the same memory: the same
array (a layer instance listed twice, or two layers built on one array), or, for a 2-D array,
its transpose (``Dense(E.T)`` reading an ``Embedding``'s table ``E``: a GPT's tied unembedding).
Any other overlap of two uses' memory is refused: a tie is always the whole array.

``Ties`` maps the uses' space (``P_use`` numbers: every use's gradient, as each layer writes
it) onto the parameters' space (``P``: each parameter once, in the orientation of its first use,
in the order of first use) and back:

    reduce  (…, P_use) -> (…, P)    the gradient of a parameter is the sum over its uses
    expand  (…, P) -> (…, P_use)    a parameter direction, seen by every use

Both are linear, and ``reduce = expandᵀ``; without ties they are the identity (the same array).

    >>> import numpy as np
    >>> E = np.arange(6.0).reshape(2, 3)
    >>> t = Ties([("0 E", E), ("1 W", E.T), ("1 b", np.zeros(2))])
    >>> t.n_params, t.n_uses, t.shared, t.uses
    (8, 14, True, [(0, False), (0, True), (1, False)])
    >>> t.reduce(np.arange(14.0))[:6].tolist()   # use 0 + (use 1)ᵀ: [[0,1,2],[3,4,5]] + [[6,8,10],[7,9,11]]
    [6.0, 9.0, 12.0, 10.0, 13.0, 16.0]
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..core.backend import get_xp
from .layer import leaf_layers, named_params

__all__ = ["TiedLayers", "Ties", "array_key", "relink"]


def _ptr(a) -> int:
    """The address of ``a``'s first element (NumPy or CuPy)."""
    iface = getattr(a, "__array_interface__", None)
    return int(iface["data"][0]) if iface is not None else int(a.data.ptr)


def _bounds(a) -> tuple[int, int]:
    """``[lo, hi)``: the bytes ``a`` may touch."""
    p = _ptr(a)
    lo = p + sum(min(0, (n - 1) * s) for n, s in zip(a.shape, a.strides))
    hi = p + sum(max(0, (n - 1) * s) for n, s in zip(a.shape, a.strides)) + a.itemsize
    return lo, hi


def array_key(a, transposed: bool = False) -> tuple:
    """What makes two arrays the same parameter: address, shape, strides, dtype (``transposed``:
    the key of ``a.T``'s memory read as ``a``, i.e. ``array_key(E.T, True) == array_key(E)``)."""
    return _key(a, transposed)


def _key(a, transposed: bool = False) -> tuple:
    shape, strides = tuple(a.shape), tuple(a.strides)
    if transposed:
        shape, strides = shape[::-1], strides[::-1]
    return _ptr(a), shape, strides, a.dtype


class Ties:
    """The parameters of the uses ``named = [(where, array)]`` (``protocol.layer.named_params``).

    ``uses[u] = (q, transposed)``: use u is parameter q (``params[q]``), or its transpose.
    ``params``: the parameters, each the array of its first use; ``where[q]``: that use's name;
    ``n_params``, ``n_uses``: sizes of the two spaces; ``shared``: whether any parameter has
    several uses; ``multi``: those parameters. A ``ValueError`` names two uses whose memory
    overlaps without being the same array or its transpose."""

    def __init__(self, named: Sequence[tuple[str, Any]]):
        self.uses: list[tuple[int, bool]] = []
        self.params: list = []
        self.where: list[str] = []
        self.use_names = [w for w, _ in named]
        self.use_shapes = [tuple(a.shape) for _, a in named]
        seen: dict = {}
        for where, a in named:
            q = seen.get(_key(a)) if a.size else None
            t = False
            if q is None and a.ndim == 2 and a.size:
                q = seen.get(_key(a, transposed=True))
                t = q is not None
            if q is None:
                q = len(self.params)
                self.params.append(a)
                self.where.append(where)
                if a.size:
                    seen[_key(a)] = q
            self.uses.append((q, t))
        counts = np.bincount([q for q, _ in self.uses], minlength=len(self.params))
        self.multi = frozenset(int(q) for q in np.flatnonzero(counts > 1))
        self.shared = bool(self.multi)
        self.n_uses = sum(math.prod(s) for s in self.use_shapes)
        self.n_params = sum(int(p.size) for p in self.params)
        self.param_shapes = [tuple(p.shape) for p in self.params]
        self._check_overlaps()

    def _check_overlaps(self) -> None:
        spans = sorted((_bounds(p) + (q,) for q, p in enumerate(self.params) if p.size), key=lambda s: s[0])
        for (lo1, hi1, q1), (lo2, hi2, q2) in zip(spans, spans[1:]):
            if lo2 < hi1:
                a, b = self.params[q1], self.params[q2]
                xp = get_xp(a, b)
                if bool(getattr(xp, "shares_memory", np.shares_memory)(a, b)):
                    raise ValueError(
                        f"{self.where[q1]} {tuple(a.shape)} and {self.where[q2]} {tuple(b.shape)} share memory but are "
                        "neither the same array nor its transpose: a shared parameter is one whole array, used as "
                        "it is (the same array object or a view of all of it) or transposed (W = E.T)")

    def __repr__(self) -> str:
        return f"Ties(P={self.n_params}, uses={self.n_uses}, shared={sorted(self.multi)})"

    def param_of(self, u: int) -> int:
        return self.uses[u][0]

    def _views(self, flat, shapes):
        lead, views, at = flat.shape[:-1], [], 0
        for s in shapes:
            n = math.prod(s)
            views.append(flat[..., at:at + n].reshape(lead + s))
            at += n
        return views

    def param_views(self, flat) -> list:
        """Views of ``flat: (…, P)`` in the parameters' shapes."""
        return self._views(flat, self.param_shapes)

    def use_views(self, param_views: Sequence[Any]) -> list:
        """Per use, the view of its parameter's (``param_views[q]: (…, *shape)``), transposed where
        the use is: what ``Gradients.layers`` names (a tied W's gradient IS E's, transposed)."""
        return [param_views[q].swapaxes(-1, -2) if t else param_views[q] for q, t in self.uses]

    def reduce(self, flat_use, out=None):
        """``(…, P_use) -> (…, P)``: each parameter's gradient, the sum of its uses' (each use
        transposed back where it is transposed). Without ties: ``flat_use`` itself."""
        if not self.shared:
            return flat_use
        xp = get_xp(flat_use)
        if out is None:
            out = xp.empty(flat_use.shape[:-1] + (self.n_params,), dtype=flat_use.dtype)
        dst = self.param_views(out)
        first = [True] * len(self.params)
        for (q, t), v in zip(self.uses, self._views(flat_use, self.use_shapes)):
            v = v.swapaxes(-1, -2) if t else v
            if first[q]:
                dst[q][...] = v
                first[q] = False
            else:
                dst[q] += v
        return out

    def expand(self, flat):
        """``(…, P) -> (…, P_use)``: every use's copy of its parameter's entries (transposed where
        the use is). Without ties: ``flat`` itself."""
        if not self.shared:
            return flat
        xp = get_xp(flat)
        out = xp.empty(flat.shape[:-1] + (self.n_uses,), dtype=flat.dtype)
        src = self.param_views(flat)
        for (q, t), v in zip(self.uses, self._views(out, self.use_shapes)):
            v[...] = src[q].swapaxes(-1, -2) if t else src[q]
        return out


def relink(layers: Sequence[Any], uses: Sequence[tuple[int, bool]]) -> list:
    """``layers`` with the ties ``uses`` (a ``Ties.uses``, every use in ``leaf_layers`` order) made
    again: every later use of a parameter gets its first use's array (transposed where the use is),
    the layers holding a replaced array rebuilt by their class's ``from_spec``. What pickling
    needs: it keeps one array object used twice, but writes a transposed view (``W = E.T``) as
    an array of its own."""
    flat = [p for _, L in leaf_layers(layers) for p in L.params]
    if len(flat) != len(uses):
        raise ValueError(f"relink: {len(uses)} uses recorded but the layers hold {len(flat)} parameter arrays")
    first: dict = {}
    for u, (q, _) in enumerate(uses):
        first.setdefault(q, u)
    want = [flat[first[q]].T if t else flat[first[q]] for q, t in uses]
    at = iter(range(len(flat)))

    def rebuild(group):
        out = []
        for L in group:
            inner = getattr(L, "layers", None)
            if inner is not None:
                new = rebuild(inner)
                out.append(L if all(a is b for a, b in zip(new, inner)) else type(L).from_spec(L.spec(), {}, new))
                continue
            params = [want[next(at)] for _ in L.params]
            same = all(a is b for a, b in zip(params, L.params))
            out.append(L if same else type(L).from_spec(L.spec(), dict(zip(L.names, params)), None))
        return out

    return rebuild(layers)


class TiedLayers:
    """What a network holding its layers in ``_layers`` (``jacgrad.Sequential``) has for shared
    parameters: ``_ties()``, and pickling that keeps them."""

    def _ties(self) -> Ties:
        """The parameters of the layers' uses (``jacgrad.protocol.sharing.Ties``): read from the
        arrays the layers hold now (kept while the layers hold the very same array objects: a
        hot loop's backward does not rebuild it)."""
        arrays = [p for _, L in leaf_layers(self._layers) for p in L.params]
        memo = self.__dict__.get("_ties_memo")
        if memo is not None and len(memo[0]) == len(arrays) and all(a is b for a, b in zip(memo[0], arrays)):
            return memo[1]
        ties = Ties(named_params(self._layers))
        self._ties_memo = (arrays, ties)  # the arrays kept alive: their ids and memory stay theirs
        return ties

    def __getstate__(self) -> dict:
        """Pickling (Dask ships networks to its workers): the ties recorded, so that a transposed tie
        (``Dense(E.T)``), which pickle writes as an array of its own, is made again on loading."""
        state = dict(self.__dict__)
        state.pop("_ties_memo", None)
        state.pop("_plans", None)  # a network's worked-out plans (``Sequential._plan``): made again
        ties = self._ties()
        if ties.shared:
            state["_pickled_ties"] = list(ties.uses)
        return state

    def __setstate__(self, state: dict) -> None:
        uses = state.pop("_pickled_ties", None)
        self.__dict__.update(state)
        if uses is not None and self._ties().uses != uses:
            self._layers = tuple(relink(self._layers, uses))
            self.__dict__.pop("_ties_memo", None)

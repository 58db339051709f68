"""``SequentialCache``: what a network's ``forward`` keeps for ``backward`` and ``jacobian_chain``."""

from __future__ import annotations


__all__ = ["SequentialCache"]


class SequentialCache:
    """What ``forward`` keeps for ``backward`` and ``jacobian_chain``: a reference (not a copy) to
    the input ``x`` (a C-contiguous copy of it when ``x`` was not C-contiguous or not of the
    network's dtype) and each layer's state (see each layer's docstring for what it keeps).

    A Dense layer keeps ONE ``(B, H_j)`` array, ``saved[j]``: its output ``y_j`` where ``φ_j'`` is
    a function of the output (tanh, sigmoid, relu, …), else its pre-activation ``h_j`` (gelu, silu,
    softplus), and where only a Dense reads its output, that output is not kept: backward
    recomputes ``z_j = φ_j(h_j)`` (``_block_passes.lean_outputs``). A dense stack's cache is so
    ``B · Σ_j H_j`` elements. The ``y`` that ``forward`` returns is never one of these arrays.

    Parameters are not copied: ``backward`` and ``jacobian_chain`` read them when called. Replacing
    a Dense layer's weight or activation after the forward pass (``net.weights[j] = W`` on an
    ``MLP``) makes them raise ``ValueError`` (run forward again); a change IN PLACE (``W -= lr *
    dW``) is not detected, and neither is one of ``x``: backward then combines the new weights
    with the old activations. Run forward again after an update."""

    __slots__ = ("x", "_states", "_owner", "_layers", "_bound")

    def __init__(self, x, states, owner, layers):
        self.x, self._states, self._owner, self._layers = x, states, owner, tuple(layers)
        self._bound = [L.bound() if hasattr(L, "bound") else () for L in layers]

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def states(self) -> list:
        """Per layer, its forward state, its input recomputed (a fresh array) where not kept
        (``recompute_output`` of the layer before: a Dense's ``φ(h)``)."""
        out = list(self._states)
        for j, st in enumerate(out):
            if j and st[0] is None and getattr(self._layers[j], "input_in_state", False):
                out[j] = (self._layers[j - 1].recompute_output(out[j - 1], with_factor=False)[0],) + st[1:]
        return out

    @property
    def saved(self) -> list:
        """Per layer, the ``(B, H_j)`` array a Dense keeps for its factor (``y_j`` or ``h_j``); None
        for the other layers."""
        return [L.kept(st)[0] if hasattr(L, "kept") else None for L, st in zip(self._layers, self._states)]

    @property
    def from_output(self) -> list:
        """Per Dense layer, whether ``saved[j]`` is its output ``y_j`` (else ``h_j``); None elsewhere."""
        return [L.kept(st)[1] if hasattr(L, "kept") else None for L, st in zip(self._layers, self._states)]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays the cache keeps (the input is the caller's)."""
        seen: dict = {}
        stack = list(self._states)
        while stack:
            a = stack.pop()
            if isinstance(a, (tuple, list)):
                stack.extend(a)
            elif hasattr(a, "nbytes") and a is not self.x:
                seen[id(a)] = a.nbytes
        return int(sum(seen.values()))

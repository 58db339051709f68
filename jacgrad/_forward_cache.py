"""``ForwardCache``: what ``MLP.forward`` keeps for ``backward`` and ``jacobian_chain``."""

from __future__ import annotations

from . import kernels

__all__ = ["ForwardCache"]


class ForwardCache:
    """What ``MLP.forward`` keeps for ``backward`` and ``jacobian_chain``: exactly one
    ``(B, H_j)`` array per layer plus a reference (not a copy) to the input ``x`` (a C-contiguous
    copy of it when ``x`` was not C-contiguous or not of the network's dtype).

    Layer j keeps its output ``y_j`` when ``φ_j'`` is a function of the output (tanh, sigmoid,
    relu, …: ``y`` is both the next layer's input and the derivative's argument), else its
    pre-activation ``h_j`` (gelu, silu, softplus: ``z_j = φ_j(h_j)`` is recomputed in backward
    for ``∂L/∂W_{j+1}``). Memory: ``B · Σ_j H_j`` elements. The ``y`` that ``forward`` returns is
    never one of these arrays, so changing it in place (``y -= t``) changes nothing here.

    The cache does not copy the weights: ``backward`` and ``jacobian_chain`` read ``net.weights``
    when they are called. Replacing ``net.weights[j]`` or ``net.activations[j]`` after the
    forward pass makes them raise ``ValueError`` (run forward again). Changing a weight IN PLACE
    (``W -= lr * dW``, or a framework that shares the memory taking an optimiser step) is not
    detected, and neither is changing ``x`` in place: backward then combines the new weights with
    the old activations — the gradient of neither network. Run forward again after an update.
    """

    __slots__ = ("x", "saved", "from_output", "_owner", "_acts", "_weights")

    def __init__(self, x, saved, from_output, owner, acts, weights=()):
        self.x, self.saved, self.from_output = x, saved, from_output
        self._owner, self._acts, self._weights = owner, acts, tuple(weights)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def states(self) -> list:
        """Per layer, its ``jacgrad.layers.Dense`` state ``(z_{j-1}, saved_j, from_output_j, None)`` (the
        parameter-space code reads layer inputs through it; a ``z`` is recomputed where not saved)."""
        return [(self.layer_output(j - 1), s, fo, None) for j, (s, fo) in enumerate(zip(self.saved, self.from_output))]

    @property
    def nbytes(self) -> int:
        """Bytes held by the saved per-layer arrays (the input is the caller's)."""
        return int(sum(a.nbytes for a in self.saved))

    def layer_output(self, j: int):
        """``z_j: (B, H_j)`` — saved, or recomputed from ``h_j`` (a fresh array)."""
        if j < 0:
            return self.x
        if self.from_output[j]:
            return self.saved[j]
        return kernels.activation_forward(self.saved[j], self._acts[j])

    def layer_output_and_derivative(self, j: int) -> tuple:
        """``(z_j, d_j)``: as ``layer_output``, plus ``d_j = φ_j'(h_j)`` when ``z_j`` had to be
        recomputed from ``h_j`` (one pass gives both: ``kernels.forward_with_derivative``), else None."""
        if j < 0 or self.from_output[j]:
            return self.layer_output(j), None
        return kernels.forward_with_derivative(self.saved[j], self._acts[j])

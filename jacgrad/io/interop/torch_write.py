"""The torch side of ``Sequential.to_torch`` (``torch_blocks.layers_to_torch``): ``TorchTies``, one
torch tensor for each jacgrad parameter however many layers use it (``protocol.sharing``), and
``linear_module``, the ``nn.Linear`` of a ``(W, b)`` pair (a Dense layer, an attention projection).

    >>> import numpy as np
    >>> from jacgrad.io.interop.torch import tensor
    >>> E = np.arange(6.0).reshape(3, 2)            # an Embedding's table (V, d) ...
    >>> tie = TorchTies()
    >>> emb = torch.nn.Embedding(3, 2, dtype=torch.float64)
    >>> _ = emb.weight.data.copy_(tensor(torch, E))
    >>> emb.weight = tie(E, emb.weight, what="layer 0's E")
    >>> head = linear_module(E.T, None, lambda a: tensor(torch, a), tie, "layer 2's")   # ... and Dense(E.T)
    >>> head.weight is emb.weight                   # a GPT's tied unembedding: one torch Parameter
    True
"""

from __future__ import annotations

import torch
from torch import nn

from ...protocol.sharing import array_key

__all__ = ["TorchTies", "linear_module"]


class TorchTies:
    """``tie(a, t, transposed=False, what=None)``: the torch tensor of jacgrad array ``a`` — ``t``
    (a Parameter or buffer just made, holding ``a``, or ``a.T`` when ``transposed``: an
    ``nn.Linear``'s weight holds ``W.T``) at ``a``'s first use, that first tensor at every later use.
    Tensors are keyed by the memory they hold (``array_key``), so ``Dense(E.T)`` after
    ``Embedding(E)`` (its weight holds ``W.T = E``) gets the embedding's very Parameter. A 2-D array
    whose first use torch holds the other way round (a Dense whose W is another Dense's W transposed)
    has no torch spelling: a ``ValueError`` naming both uses (``what``: ``"layer 1's W"``)."""

    def __init__(self):
        self._held: dict = {}  # array_key of what a torch tensor holds -> (the tensor, its first use)

    def __call__(self, a, t, transposed: bool = False, what: str | None = None):
        key = array_key(a, transposed)
        if key in self._held:
            return self._held[key][0]
        if getattr(a, "ndim", 0) == 2:
            other = self._held.get(array_key(a, not transposed))
            if other is not None:
                raise ValueError(f"to_torch: {what or 'a parameter'} is {other[1] or 'another parameter'} transposed, "
                                 "which torch holds the other way round: torch cannot tie a tensor to its transpose")
        self._held[key] = (t, what)
        return t


def linear_module(W, b, tensor, tie, at: str, names: tuple = ("W", "b")) -> nn.Linear:
    """``nn.Linear(n_in, n_out, bias=b is not None)`` computing ``x @ W + b`` (``weight = W.T``; ``W:
    (n_in, n_out)``, ``b: (n_out,)`` or None), same dtype and device, its tensors tied (``tie``: a
    ``TorchTies``). ``tensor(a)``: a torch view of array ``a``; ``at``: the layer's place as a
    possessive (``"layer 2's"``) and ``names`` the arrays' names, for the messages."""
    Wt = tensor(W)
    lin = nn.Linear(Wt.shape[0], Wt.shape[1], bias=b is not None, dtype=Wt.dtype, device=Wt.device)
    with torch.no_grad():
        lin.weight.copy_(Wt.T)
        if b is not None:
            lin.bias.copy_(tensor(b))
    lin.weight = tie(W, lin.weight, True, f"{at} {names[0]}")
    if b is not None:
        lin.bias = tie(b, lin.bias, False, f"{at} {names[1]}")
    return lin

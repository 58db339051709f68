"""jacgrad's token layers in torch (``Sequential.to_torch`` of a GPT, a ViT, an MLP-Mixer) and back.

``token_modules(L, ...)`` writes each token layer as a torch module, spelled as the graph importer
(``jg.from_torch``) reads it, and ``token_layer_of(m, ...)`` reads these modules back in the module
walk (``Sequential.from_torch``), so both importers give the network back:

    Embedding(E, padding_idx)   nn.Embedding (padding_idx kept)
    MultiHeadAttention          SelfAttention: q, k, v, out nn.Linear(d, d) (each with its own bias flag)
                                and the explicit softmax(q kᵀ/√d_h [+ causal mask]) v
    PositionalEmbedding(table)  PositionalEmbedding: x + F.embedding(arange(T), table), table (T_max, d)
    ClassToken(token)           ClassToken: cat([token.expand(B, 1, d), x], dim=1), token (d,)
    SelectToken(i) / TokenMean  x[:, i] / x.mean(dim=1)
    ImageToTokens               x.flatten(2).transpose(1, 2)
    TransposeTokens(T, d)       x.transpose(1, 2)

Why attention is four ``nn.Linear`` and not ``nn.MultiheadAttention``: torch's class packs q, k, v
into one ``in_proj_weight`` with one bias flag, so neither jacgrad's per-projection bias flags (a
timm block with ``qkv_bias=False`` and a biased out-projection) nor a projection tied to another
use could be written; it takes the causal mask at call time, so a module walk could not read it
back; and ``nn.Sequential`` cannot call it (it wants ``(q, k, v)`` and returns a pair). Four Linears
are read by the graph importer (its separate-projection spelling) and by the module walk here,
every array stays one torch Parameter (``torch_write.TorchTies``), and torch.func's ``vmap`` runs the
explicit softmax batched (it has no batching rule for CPU ``scaled_dot_product_attention``).

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.Sequential([jg.layers.Embedding(np.ones((5, 4))), jg.layers.PositionalEmbedding(np.ones((8, 4))),
    ...                      jg.layers.MultiHeadAttention(*[np.eye(4)] * 4, heads=2, causal=True)])
    >>> [type(m).__name__ for m in net.to_torch()]
    ['Embedding', 'PositionalEmbedding', 'SelfAttention']
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ...tokens.attention import MultiHeadAttention
from ...tokens.image_tokens import ImageToTokens as _JgImageToTokens
from ...tokens.positional import PositionalEmbedding as _JgPositional
from ...tokens.token_maps import ClassToken as _JgClassToken, SelectToken as _JgSelectToken, TokenMean as _JgTokenMean
from ...tokens.transpose import TransposeTokens as _JgTransposeTokens
from .torch_write import linear_module

__all__ = ["TOKEN_MODULES", "ClassToken", "ImageToTokens", "PositionalEmbedding", "SelectToken", "SelfAttention",
           "TokenMean", "TransposeTokens", "token_layer_of", "token_modules"]

TOKEN_MODULES = ("Embedding", "MultiHeadAttention", "PositionalEmbedding", "ClassToken", "SelectToken", "TokenMean",
                 "ImageToTokens", "TransposeTokens")


class SelfAttention(nn.Module):
    """jacgrad's ``MultiHeadAttention``, ``(B, T, d) -> (B, T, d)``: ``q, k, v, out`` are
    ``nn.Linear(d, d)`` (``bias``: one flag, or four for q, k, v, out); per head of width
    ``d_h = d/heads``, ``softmax(q kᵀ/√d_h + mask) v`` with the causal mask (``-inf`` above the
    diagonal) when ``causal``; the heads merged, then ``out``."""

    def __init__(self, d: int, heads: int, causal: bool = False, bias=True, dtype=None, device=None):
        super().__init__()
        flags = (bias,) * 4 if isinstance(bias, bool) else tuple(bias)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=f, dtype=dtype, device=device) for f in flags)
        self.heads, self.causal = int(heads), bool(causal)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (f(x).view(B, T, self.heads, d // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        if self.causal:  # key s > t hidden from query t
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        y = att.softmax(dim=-1) @ v
        return self.out(y.transpose(1, 2).reshape(B, T, d))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, causal={self.causal}"


class PositionalEmbedding(nn.Module):
    """``x + table[:T]`` for ``x: (B, T, d)``, ``table: (T_max, d)`` a Parameter (GPT's
    ``x + wpe(arange(T))``)."""

    def __init__(self, T_max: int, d: int, dtype=None, device=None):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(T_max, d, dtype=dtype, device=device))

    def forward(self, x):
        return x + F.embedding(torch.arange(x.shape[1], device=x.device), self.table)


class ClassToken(nn.Module):
    """``cat([token, x_1, …, x_T])`` per sample: ``(B, T, d) -> (B, T + 1, d)``, ``token: (d,)`` a Parameter."""

    def __init__(self, d: int, dtype=None, device=None):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    def forward(self, x):
        return torch.cat([self.token.expand(x.shape[0], 1, -1), x], dim=1)


class _Shape(nn.Module):
    """A parameter-free token map; its constructor's arguments are its ``extra_repr``."""

    _fields: tuple = ()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)}" for k in self._fields)


class SelectToken(_Shape):
    """``x[:, index]``: ``(B, T, d) -> (B, d)``."""

    _fields = ("index", "width")

    def __init__(self, index: int = 0, width: int | None = None):
        super().__init__()
        self.index, self.width = int(index), width

    def forward(self, x):
        return x[:, self.index]


class TokenMean(_Shape):
    """``x.mean(dim=1)``: ``(B, T, d) -> (B, d)``."""

    _fields = ("width",)

    def __init__(self, width: int | None = None):
        super().__init__()
        self.width = width

    def forward(self, x):
        return x.mean(dim=1)


class ImageToTokens(_Shape):
    """``x.flatten(2).transpose(1, 2)``: images ``(B, C, *spatial) -> (B, prod(spatial), C)``;
    ``in_shape``: ``(C, *spatial)`` where known."""

    _fields = ("in_shape",)

    def __init__(self, in_shape=None):
        super().__init__()
        self.in_shape = None if in_shape is None else tuple(in_shape)

    def forward(self, x):
        return x.flatten(2).transpose(1, 2)


class TransposeTokens(_Shape):
    """``x.transpose(1, 2)``: ``(B, tokens, width) -> (B, width, tokens)`` (an MLP-Mixer's token mixing)."""

    _fields = ("tokens", "width")

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.tokens, self.width = int(tokens), int(width)

    def forward(self, x):
        return x.transpose(1, 2)


def _filled(m, name: str, a, tensor, tie, what: str):
    """``m``'s parameter ``name`` set to a copy of array ``a``, then tied (``tie``)."""
    with torch.no_grad():
        getattr(m, name).copy_(tensor(a))
    setattr(m, name, tie(a, getattr(m, name), False, what))
    return m


def token_modules(L, tensor, tie, where: str) -> list | None:
    """The torch modules of jacgrad layer ``L`` when it is a token layer, else None (module text):
    copies of its arrays, same dtype and device, tied through ``tie`` (``torch_write.TorchTies``: a
    GPT's unembedding ``Dense(E.T)`` is the embedding's Parameter). ``tensor(a)``: a torch view of
    array ``a``; ``where``: the layer's place (``"layer 3"``), for the messages. Attention with
    biases on some projections only is written as it is (four Linears)."""
    kind, at = L.kind, f"{where}'s"
    if kind == "embedding":
        E = tensor(L.E)
        m = nn.Embedding(E.shape[0], E.shape[1], padding_idx=L.padding_idx, dtype=E.dtype, device=E.device)
        return [_filled(m, "weight", L.E, tensor, tie, f"{at} E")]
    if kind == "multihead_attention":
        W = tensor(L.Wq)
        m = SelfAttention(L.d, L.heads, L.causal, L.bias, dtype=W.dtype, device=W.device)
        for p, name in zip("qkvo", ("q", "k", "v", "out")):
            W, b = getattr(L, f"W{p}"), getattr(L, f"b{p}")
            setattr(m, name, linear_module(W, b, tensor, tie, at, (f"W{p}", f"b{p}")))
        return [m]
    if kind == "positional_embedding":
        T = tensor(L.table)
        return [_filled(PositionalEmbedding(L.T_max, L.d, T.dtype, T.device), "table", L.table, tensor, tie,
                        f"{at} table")]
    if kind == "class_token":
        c = tensor(L.token)
        return [_filled(ClassToken(L.d, c.dtype, c.device), "token", L.token, tensor, tie, f"{at} token")]
    simple = {"select_token": lambda: SelectToken(L.index, L.n_out),
              "token_mean": lambda: TokenMean(L.n_out),
              "image_to_tokens": lambda: ImageToTokens(L.in_shape),
              "transpose_tokens": lambda: TransposeTokens(L.tokens, L.width)}
    return [simple[kind]()] if kind in simple else None


def token_layer_of(m, conv, at: str):
    """The jacgrad layer of a module of this file (``token_modules``' inverse), else None.
    ``conv(tensor, what)``: the module walk's array maker (``torch_blocks._Convert``: copies or
    views, ties kept); ``at``: the module's place. A ``SelfAttention`` whose q, k, v, out are not
    ``nn.Linear(d, d)`` is a ``TypeError`` naming it."""
    kind = type(m)
    if kind is SelfAttention:
        parts = [("q", m.q), ("k", m.k), ("v", m.v), ("out", m.out)]
        d = m.q.in_features if type(m.q) is nn.Linear else None
        for name, lin in parts:
            if type(lin) is not nn.Linear or (lin.in_features, lin.out_features) != (d, d) or d % m.heads:
                raise TypeError(f"{at}: its {name} is {lin!r}; a SelfAttention's q, k, v and out are nn.Linear(d, d) "
                                f"with d divisible by heads = {m.heads}")
            conv.read.append((f"{at}.{name}", lin))  # copy=False: the link checks these parameters too
        Ws = [conv(lin.weight.T, f"{at}: {name}.weight") for name, lin in parts]
        bs = [None if lin.bias is None else conv(lin.bias, f"{at}: {name}.bias") for name, lin in parts]
        return MultiHeadAttention(*Ws, m.heads, *bs, causal=m.causal, bias=tuple(b is not None for b in bs))
    if kind is PositionalEmbedding:
        return _JgPositional(conv(m.table, f"{at}: table"))
    if kind is ClassToken:
        return _JgClassToken(conv(m.token, f"{at}: token"))
    if kind is SelectToken:
        return _JgSelectToken(m.index, m.width)
    if kind is TokenMean:
        return _JgTokenMean(m.width)
    if kind is ImageToTokens:
        return _JgImageToTokens(m.in_shape)
    if kind is TransposeTokens:
        return _JgTransposeTokens(m.tokens, m.width)
    return None

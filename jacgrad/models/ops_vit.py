"""The ViT rows of the graph importer's op table (``jacgrad.models.ops``): the ops of a vision
transformer's token plumbing, each read into a ``Piece`` of kind ``"layer"`` whose ``info["make"]``
builds the layer of ``jacgrad.tokens`` from the node's parameter arrays (``jacgrad.models.chain``):

    patch embedding    ``conv(x).flatten(2).transpose(1, 2)``, or ``.permute(0, 2, 3, 1).reshape(B, H·W, C)``
                       -> ``ImageToTokens`` (the first op of the pair is structural)
    class token        ``cat([cls_token.expand(B, -1, -1), x], dim=1)`` -> ``ClassToken``
    positions          ``x + pos_embed`` with a ``(1, T, d)`` or ``(T, d)`` parameter -> ``PositionalEmbedding``
                       (a ``(d,)`` parameter after a matmul stays a bias; two data values a residual join)
    read-out           ``x[:, i]`` (``select``), ``x[:, i:i+1].squeeze(1)`` -> ``SelectToken(i)``;
                       ``x.mean(dim=1)`` -> ``TokenMean``

An op that also has other readings (``add``, ``mean``, ``view``, ``transpose``, …) keeps them:
``vit_ops(base)`` wraps the base table's reader, and falls back to it when the node is not one of
these patterns. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Callable

from ..tokens.image_tokens import ImageToTokens
from ..tokens.positional import PositionalEmbedding
from ..tokens.token_maps import ClassToken, SelectToken, TokenMean
from .explain import Piece, _unsupported

__all__ = ["VIT_OPS", "vit_ops"]

_RESHAPES = ("flatten", "view", "reshape", "_unsafe_view")


def _name(node) -> str:
    target = getattr(node, "target", None)
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def _args(ctx, node) -> dict:
    """The normalised arguments of another node (``ctx.node`` kept: it is the node being read)."""
    here = ctx.node
    try:
        return ctx.arguments(node) or {}
    finally:
        ctx.node = here


def _input(a: dict):
    return a["input"] if "input" in a else a.get("self")


def _layer(what: str, data, make: Callable, params: dict | None = None) -> Piece:
    """A node that is one jacgrad layer: ``make(arrays)`` builds it from its parameters' arrays by role."""
    return Piece("layer", (data,), params=params or {}, info={"what": what, "make": make})


def _only_user(node):
    users = list(getattr(node, "users", ()))
    return users[0] if len(users) == 1 else None


def _swaps_tokens(node, ctx) -> bool:
    """``node`` is ``transpose(1, 2)`` or ``permute(0, 2, 1)`` of a 3-D value."""
    a, name = _args(ctx, node), _name(node)
    if name == "transpose":
        return {a.get("dim0", 0) % 3, a.get("dim1", 0) % 3} == {1, 2}
    return name == "permute" and [d % 3 for d in a.get("dims", ())] == [0, 2, 1]


def _image_to_channels(node, ctx) -> bool:
    """``node`` flattens an image ``(B, C, H, W)`` (data) into ``(B, C, H·W)``."""
    if _name(node) not in _RESHAPES:
        return False
    x = _input(_args(ctx, node))
    if not ctx.is_data(x) or len(ctx.shape(x)) < 3:
        return False
    s = ctx.shape(x)
    return tuple(ctx.shape(node)) == (s[0], s[1], math.prod(s[2:])) and len(s) > 3


def _channels_last(node, ctx) -> bool:
    """``node`` is ``permute(0, 2, 3, 1)`` of an image (data)."""
    if _name(node) != "permute":
        return False
    a = _args(ctx, node)
    x = _input(a)
    return ctx.is_data(x) and len(ctx.shape(x)) == 4 and [d % 4 for d in a.get("dims", ())] == [0, 2, 3, 1]


def _image_tokens(arrays: dict) -> ImageToTokens:
    return ImageToTokens()  # its in_shape is bound by the Sequential, from the convolution before it


def _reshape(base: Callable) -> Callable:
    """flatten/view/reshape: the first op of a patch embedding's pair, or the image's tokens after
    ``permute(0, 2, 3, 1)``; else the base reading."""
    def read(a: dict, ctx) -> Piece:
        node, x = ctx.node, _input(a)
        user = _only_user(node)
        if _image_to_channels(node, ctx) and user is not None and _swaps_tokens(user, ctx):
            return Piece("structural", (x,), info={"part_of": "ImageToTokens"})
        if getattr(x, "op", None) == "call_function" and _channels_last(x, ctx):
            s = ctx.shape(x)
            if tuple(ctx.shape(node)) == (s[0], s[1] * s[2], s[3]):
                return _layer("ImageToTokens (permute(0, 2, 3, 1) + reshape)", x, _image_tokens)
        return base(a, ctx)
    return read


def _transpose(base: Callable) -> Callable:
    """transpose/permute: ``(B, C, H·W) -> (B, H·W, C)`` after a flatten of an image is ``ImageToTokens``;
    ``permute(0, 2, 3, 1)`` before a reshape to tokens is its first op; else the base reading."""
    def read(a: dict, ctx) -> Piece:
        node, x = ctx.node, _input(a)
        if ctx.is_data(x) and getattr(x, "op", None) == "call_function" and _image_to_channels(x, ctx) \
                and _swaps_tokens(node, ctx):
            return _layer("ImageToTokens (flatten(2) + transpose(1, 2))", x, _image_tokens)
        user = _only_user(node)
        if _channels_last(node, ctx) and user is not None and _name(user) in _RESHAPES:
            return Piece("structural", (x,), info={"part_of": "ImageToTokens"})
        return base(a, ctx)
    return read


def _expand(a: dict, ctx) -> Piece:
    """``cls_token.expand(B, -1, -1)``: a view of a parameter, read by the ``cat`` that uses it."""
    if ctx.param(_input(a)) is not None and not ctx.is_data(ctx.node):
        return Piece("param")
    return _unsupported("expand of a computed value: no jacgrad layer (a parameter expanded over the batch is read "
                        "by the cat that prepends it: a class token)")


def _cat(a: dict, ctx) -> Piece:
    tensors, dim = list(a.get("tensors", ())), a.get("dim", 0)
    if len(tensors) == 2 and not ctx.is_data(tensors[0]) and ctx.is_data(tensors[1]):
        token, x = tensors
        shape = ctx.shape(x)
        src = _input(_args(ctx, token)) if _name(token) == "expand" else token
        p = ctx.param(src)
        if len(shape) == 3 and dim % 3 == 1 and p is not None and tuple(ctx.shape(src))[-1] == shape[2] \
                and math.prod(ctx.shape(src)) == shape[2]:
            return _layer("ClassToken", x, lambda arr: ClassToken(arr["token"].reshape(-1)), {"token": p})
    return _unsupported("a concatenation: only a class token prepended to the tokens, "
                        "cat([cls_token.expand(B, -1, -1), x], dim=1) with a (1, 1, d) parameter, is a jacgrad layer "
                        "(concatenated skips are no chain)")


def _add(base: Callable) -> Callable:
    """``x + pos_embed``: a ``(1, T, d)`` or ``(T, d)`` parameter added to tokens ``(B, T, d)`` is a
    ``PositionalEmbedding``; a ``(d,)`` bias and a residual join keep the base reading."""
    def read(a: dict, ctx) -> Piece:
        x, y = a["input"], a["other"]
        if ctx.is_data(y) and not ctx.is_data(x):
            x, y = y, x
        p = ctx.param(y) if ctx.is_data(x) and not ctx.is_data(y) else None
        if p is not None and not p[1] and float(a.get("alpha", 1)) == 1.0:
            shape, ps = ctx.shape(x), tuple(ctx.shape(y))
            if len(shape) == 3 and ps in ((1,) + tuple(shape[1:]), tuple(shape[1:])) and shape[1] > 1:
                return _layer("PositionalEmbedding", x,
                              lambda arr: PositionalEmbedding(arr["table"].reshape(arr["table"].shape[-2:])),
                              {"table": p})
        return base(a, ctx)
    return read


def _select(a: dict, ctx) -> Piece:
    x, dim, index = _input(a), int(a["dim"]), int(a["index"])
    if ctx.is_data(x) and len(ctx.shape(x)) == 3 and dim % 3 == 1:
        d = ctx.shape(x)[2]
        return _layer(f"SelectToken({index})", x, lambda arr: SelectToken(index, d))
    return _unsupported(f"select(dim={dim}) of a {len(ctx.shape(x)) if ctx.is_data(x) else 'parameter'}-D value: only "
                        f"reading one token of (B, T, d), x[:, i], is a jacgrad layer (SelectToken)")


def _slice(a: dict, ctx) -> Piece:
    x, node = _input(a), ctx.node
    user = _only_user(node)
    if ctx.is_data(x) and len(ctx.shape(x)) == 3 and a.get("dim", 0) % 3 == 1 and ctx.shape(node)[1] == 1 \
            and user is not None and _name(user) == "squeeze":
        return Piece("structural", (x,), info={"part_of": "SelectToken"})
    return _unsupported("a slice: only x[:, i:i+1].squeeze(1) of tokens (B, T, d) is a jacgrad layer (SelectToken); "
                        "other slices drop or reorder what a layer reads")


def _squeeze(a: dict, ctx) -> Piece:
    src = _input(a)
    if getattr(src, "op", None) == "call_function" and _name(src) == "slice":
        sa = _args(ctx, src)
        x, T = _input(sa), ctx.shape(_input(sa))[1]
        start = sa.get("start") or 0
        if ctx.is_data(x) and len(ctx.shape(x)) == 3 and ctx.shape(src)[1] == 1:
            index = int(start) + (T if int(start) < 0 else 0)
            d = ctx.shape(x)[2]
            return _layer(f"SelectToken({index})", src, lambda arr: SelectToken(index, d))  # the slice: structural
    return _unsupported("squeeze: only of a one-token slice x[:, i:i+1] (SelectToken) is a jacgrad layer")


def _mean(base: Callable) -> Callable:
    """``x.mean(dim=1)`` of tokens ``(B, T, d)`` is a ``TokenMean``; else the base reading (a mean over H, W)."""
    def read(a: dict, ctx) -> Piece:
        x, dims = _input(a), a.get("dim")
        if ctx.is_data(x) and len(ctx.shape(x)) == 3 and dims is not None \
                and [int(d) % 3 for d in (dims if isinstance(dims, (list, tuple)) else [dims])] == [1]:
            if a.get("keepdim") or a.get("dtype") is not None:
                return _unsupported("a mean over the tokens with keepdim=True or a dtype: TokenMean gives (B, d)")
            d = ctx.shape(x)[2]
            return _layer("TokenMean", x, lambda arr: TokenMean(d))
        return base(a, ctx)
    return read


# op -> (what it adds, in the docs; a maker of its reader from the base table's, None where new)
VIT_OPS: dict[str, tuple[str, Callable]] = {
    "flatten": ("first op of ImageToTokens (flatten(2) before transpose(1, 2))", _reshape),
    "view": ("ImageToTokens after permute(0, 2, 3, 1)", _reshape),
    "reshape": ("ImageToTokens after permute(0, 2, 3, 1)", _reshape),
    "_unsafe_view": ("ImageToTokens after permute(0, 2, 3, 1)", _reshape),
    "transpose": ("ImageToTokens: transpose(1, 2) of a flattened image", _transpose),
    "permute": ("ImageToTokens: permute(0, 2, 1) of a flattened image; permute(0, 2, 3, 1) before a reshape",
                _transpose),
    "add": ("PositionalEmbedding: a (1, T, d) or (T, d) parameter added to tokens", _add),
    "mean": ("TokenMean: a mean over the tokens (dim=1) of (B, T, d)", _mean),
    "expand": ("a parameter expanded over the batch (a class token), read by its cat", lambda base: _expand),
    "cat": ("ClassToken: cat([cls_token.expand(B, -1, -1), x], dim=1)", lambda base: _cat),
    "select": ("SelectToken(i): x[:, i] of tokens (B, T, d)", lambda base: _select),
    "slice": ("with squeeze(1): SelectToken(i), x[:, i:i+1].squeeze(1)", lambda base: _slice),
    "squeeze": ("with a one-token slice: SelectToken(i)", lambda base: _squeeze),
}


def vit_ops(base: dict) -> dict:
    """The rows of ``VIT_OPS`` over ``base`` (the op table so far): each op's reader wraps the base
    row's (falling back to it), and its docs text is the base row's with the token reading added."""
    rows = {}
    for name, (what, maker) in VIT_OPS.items():
        old = base.get(name)
        reader = maker(old[1] if old else _none)
        rows[name] = (f"{old[0]}; {what}" if old else what, reader)
    return rows


def _none(a: dict, ctx) -> Piece:
    return _unsupported("no jacgrad layer computes this op")

"""The convolutional rows of the graph importer's op table (``jacgrad.models.ops``): ``convolution``
(and its ``conv1d``/``conv2d`` spellings), ``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d(1)``,
``mean`` over H, W, eval-mode ``batch_norm`` (and ``_native_batch_norm_legit_no_training`` with its
``getitem(·, 0)``), each read into a ``Piece`` that ``jacgrad.models.chain`` makes into the layer of
``jacgrad.conv`` with the node's arguments, as ``jacgrad.io.interop.torch_conv`` does for the modules.
A ``flatten``/``view`` from an image ``(B, C, H, W)`` to ``(B, C·H·W)`` is a ``Flatten`` (``ops._structural``).

Nothing here imports torch.
"""

from __future__ import annotations

from typing import Callable

from ..conv.pools import AdaptiveAvgPool2d, AvgPool2d, Flatten, MaxPool2d
from .explain import Piece, _unsupported

_TUPLES = ("_native_batch_norm_legit_no_training",)

__all__ = ["CONV_OPS", "getitem_piece"]


def _ints(v) -> list:
    return [int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)]


def _pair(v, default=None):
    v = _ints(v) if v is not None and (not isinstance(v, (list, tuple)) or len(v)) else _ints(default)
    return tuple(v * 2 if len(v) == 1 else v)


def _conv(a: dict, ctx) -> Piece:
    if a.get("transposed"):
        return _unsupported("a transposed convolution (ConvTranspose): no jacgrad layer")
    if any(_ints(a.get("output_padding", [0]))):
        return _unsupported("a convolution with output_padding: no jacgrad layer")
    W = ctx.param(a["weight"])
    if W is None or W[1] or (a.get("bias") is not None and ctx.param(a["bias"]) is None):
        return _unsupported("a convolution whose weight or bias is computed, not a parameter of the model")
    dims = len(ctx.shape(a["weight"])) - 2
    if dims not in (1, 2):
        return _unsupported(f"a {dims}-D convolution: jacgrad has Conv1d and Conv2d")
    one = (lambda v: _ints(v)[0]) if dims == 1 else (lambda v: tuple(_ints(v)) if len(_ints(v)) > 1 else _ints(v)[0])
    padding = a.get("padding", 0)
    info = {"dims": dims, "stride": one(a.get("stride", 1)), "dilation": one(a.get("dilation", 1)),
            "padding": padding if isinstance(padding, str) else one(padding), "groups": int(a.get("groups", 1))}
    params = {"W": W}
    if a.get("bias") is not None:
        params["b"] = ctx.param(a["bias"])
    return Piece("conv", (a["input"],), params=params, info=info)


def _image_layer(*make: Callable) -> dict:
    return {"make": make}


def _max_pool(a: dict, ctx) -> Piece:
    if a.get("ceil_mode"):
        return _unsupported("max_pool2d with ceil_mode=True is not supported")
    k = _pair(a["kernel_size"])
    s, p, d = _pair(a.get("stride"), k), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
    return Piece("pool", (a["input"],), info=_image_layer(lambda: MaxPool2d(k, s, p, d)))


def _max_pool_indices(a: dict, ctx) -> Piece:
    return _unsupported("max_pool2d with return_indices=True: only the pooled values are a jacgrad layer")


def _avg_pool(a: dict, ctx) -> Piece:
    if a.get("ceil_mode") or not a.get("count_include_pad", True) or a.get("divisor_override") is not None:
        return _unsupported("avg_pool2d: only ceil_mode=False, count_include_pad=True and divisor_override=None "
                            "are supported")
    k = _pair(a["kernel_size"])
    s, p = _pair(a.get("stride"), k), _pair(a.get("padding", 0))
    return Piece("pool", (a["input"],), info=_image_layer(lambda: AvgPool2d(k, s, p)))


def _adaptive(a: dict, ctx) -> Piece:
    if _pair(a["output_size"]) != (1, 1):
        return _unsupported(f"adaptive_avg_pool2d to {list(a['output_size'])}: only output_size=1 (global average "
                            f"pooling) is supported; for other sizes use avg_pool2d with the matching kernel")
    return Piece("pool", (a["input"],), info=_image_layer(AdaptiveAvgPool2d))


def _mean(a: dict, ctx) -> Piece:
    x, dims = a["input"], a.get("dim")
    nd = len(ctx.shape(x))
    if nd != 4 or dims is None or sorted(d % 4 for d in _ints(dims)) != [2, 3] or a.get("dtype") is not None:
        return _unsupported(f"a mean over the axes {dims} of a {nd}-D value: only a mean over H, W of "
                            f"(B, C, H, W) (global average pooling) is a jacgrad layer")
    make = (AdaptiveAvgPool2d,) if a.get("keepdim") else (AdaptiveAvgPool2d, Flatten)
    return Piece("pool", (x,), info=_image_layer(*make))


def _batch_norm(a: dict, ctx) -> Piece:
    x = a["input"]
    stats = [ctx.buffer(a.get(k)) for k in ("running_mean", "running_var")]
    if None in stats:
        return _unsupported("a batch norm without running statistics (track_running_stats=False) uses the batch's "
                            "own: that couples the samples; build it with track_running_stats=True")
    nd = len(ctx.shape(x))
    if nd not in (2, 3, 4):
        return _unsupported(f"a batch norm of a {nd}-D value: BatchNorm1d takes (B, C) or (B, C, L), "
                            f"BatchNorm2d (B, C, H, W)")
    params = {}
    for role in ("weight", "bias"):
        if a.get(role) is not None:
            p = ctx.param(a[role])
            if p is None:
                return _unsupported(f"a batch norm whose {role} is computed, not a parameter")
            params[role] = p
    if len(params) == 1:
        return _unsupported("a batch norm with a weight but no bias (or the reverse): jacgrad's has both or neither")
    return Piece("batchnorm", (x,), params=params,
                 info={"eps": float(a["eps"]), "stats": stats, "dims": 2 if nd == 4 else 1})


def getitem_piece(node, ctx) -> Piece:
    """``getitem(t, 0)`` of ``_native_batch_norm_legit_no_training``'s output tuple is its output
    (structural); other getitems are no jacgrad layer."""
    src, index = (node.args + (None, None))[:2]
    op = getattr(getattr(getattr(src, "target", None), "overloadpacket", None), "__name__", "")
    if index == 0 and getattr(src, "op", None) == "call_function" and op in _TUPLES:
        return Piece("structural", (src,))
    return _unsupported("an element of a tuple-valued op: only the output of an eval-mode batch norm is read")


# op -> (what it becomes, in the docs; its reader)
CONV_OPS: dict = {
    "convolution": ("Conv1d / Conv2d (weight (C_out, C_in/groups, k…), stride, padding, dilation, groups)", _conv),
    "_convolution": ("Conv1d / Conv2d", _conv),
    "conv1d": ("Conv1d", _conv),
    "conv2d": ("Conv2d", _conv),
    "max_pool2d": ("MaxPool2d (ceil_mode=False)", _max_pool),
    "max_pool2d_with_indices": ("refused: return_indices=True", _max_pool_indices),
    "avg_pool2d": ("AvgPool2d (count_include_pad=True, no divisor_override)", _avg_pool),
    "adaptive_avg_pool2d": ("AdaptiveAvgPool2d(1)", _adaptive),
    "mean": ("AdaptiveAvgPool2d(1) (and a Flatten without keepdim): a mean over H, W", _mean),
    "batch_norm": ("BatchNorm1d / BatchNorm2d, eval mode (an activation after it fuses into it)", _batch_norm),
    "_native_batch_norm_legit_no_training": ("BatchNorm1d / BatchNorm2d, eval mode", _batch_norm),
}

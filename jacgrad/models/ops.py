"""The op table of the graph importer: which ATen op of a ``torch.export`` graph becomes which
jacgrad layer (``jacgrad.models.graph`` walks the graph, this module judges each node).

One row per op, as in the tables of gates and gradients: the op's name (its overload packet,
``aten.linear``; an in-place spelling such as ``relu_`` reads as ``relu``), what it becomes, and
the function that reads the node's arguments into a ``Piece``; the convolutional rows (convolutions,
pools, eval-mode batch norm) are in ``jacgrad.models.ops_conv``, the token rows (embeddings, the ops
of an attention block) in ``jacgrad.models.ops_tokens``, a ViT's token plumbing (patch tokens, class
token, positional embedding, token read-outs) in ``jacgrad.models.ops_vit``. Ops whose layer exists but
which the importer does not build yet would be listed in ``PENDING`` ("not read from the graph yet");
switching one on is one row moved from ``PENDING`` to ``OPS``. ``supported_ops_markdown()`` renders the table for the
docs, so the docs are generated from the importer's own table.

Nothing here imports torch: a node is read through its ``target``, ``args`` and ``meta`` only,
with the arguments normalised to keywords by ``torch.fx.operator_schemas`` (passed in ``ctx``).
"""

from __future__ import annotations

import math
from typing import Callable

from ..elementwise import activations as _activations
from .ops_conv import CONV_OPS, getitem_piece
from .ops_tokens import TOKEN_OPS
from .ops_vit import vit_ops
from .explain import Piece, _unsupported

__all__ = ["OPS", "PENDING", "Piece", "classify", "op_name", "supported_ops_markdown"]


def op_name(node) -> str:
    """``"linear"`` for ``aten.linear.default``; the in-place ``relu_`` reads as ``relu``."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))
    if name.endswith("_") and not name.startswith("_") and name[:-1] in OPS:
        return name[:-1]
    return name


def _act(family: str, **params) -> Callable:
    """A reader for an activation op: ``params`` maps jacgrad's parameter names to the op's argument names."""

    def read(a: dict, ctx) -> Piece:
        try:
            name = _activations.get(family, **{k: float(a[v]) for k, v in params.items()}).name
        except ValueError as exc:
            return _unsupported(f"no jacgrad activation matches: {exc}")
        return Piece("act", (a["input"],), info={"name": name})

    return read


def _gelu(a: dict, ctx) -> Piece:
    form = a.get("approximate", "none")
    return Piece("act", (a["input"],), info={"name": "gelu" if form == "none" else "gelu_tanh"})


def _relu6(a: dict, ctx) -> Piece:
    return _act("hard_tanh", min_val="min_val", max_val="max_val")(dict(a, min_val=0.0, max_val=6.0), ctx)


def _elu(a: dict, ctx) -> Piece:
    if float(a.get("scale", 1)) != 1.0 or float(a.get("input_scale", 1)) != 1.0:
        return _unsupported("an ELU with scale or input_scale (CELU; F.selu is its own op) has no jacgrad activation "
                            "row yet")
    return _act("elu", alpha="alpha")(a, ctx)


def _softsign_nodes(div, ctx):
    """``(x, abs node, add node)`` when ``div`` is torch's ``F.softsign``, ``x / (1 + |x|)`` (it has no
    ATen op of its own: ``abs``, ``add(·, 1)``, ``div``), each intermediate read only there; else None."""
    if op_name(div) != "div" or len(div.args) != 2 or div.kwargs:
        return None
    x, den = div.args
    if not (ctx.is_data(x) and getattr(den, "op", None) == "call_function" and op_name(den) == "add"
            and len(den.users) == 1 and len(den.args) == 2 and not den.kwargs):
        return None
    ab, one = den.args if hasattr(den.args[0], "op") else den.args[::-1]
    if (isinstance(one, bool) or not isinstance(one, (int, float)) or one != 1
            or getattr(ab, "op", None) != "call_function" or op_name(ab) != "abs" or len(ab.users) != 1
            or not ab.args or ab.args[0] is not x):
        return None
    return x, ab, den


def _softsign_part(node, ctx) -> Piece | None:
    """The ``abs`` or ``add(·, 1)`` inside a softsign: read with its ``div`` (None: not one)."""
    for _ in range(2):  # abs -> add -> div
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        found = _softsign_nodes(node, ctx)
        if found is not None and ctx.node in found[1:]:
            return Piece("inert", info={"part_of": "softsign"})
    return None


def _abs(a: dict, ctx) -> Piece:
    part = _softsign_part(ctx.node, ctx)
    return part if part is not None else _unsupported("abs outside softsign's x / (1 + abs(x)): no jacgrad layer")


def _linear(a: dict, ctx) -> Piece:
    W = ctx.param(a["weight"])
    b = None if a.get("bias") is None else ctx.param(a["bias"])
    if W is None or (a.get("bias") is not None and b is None):
        return _unsupported("a linear whose weight or bias is computed, not a parameter of the model")
    params = {"W": (W[0], not W[1])}  # torch's weight is (out, in): jacgrad's W is its transpose
    if b is not None:
        params["b"] = b
    return ctx.dense(a["input"], params)


def _matmul(x_key: str, w_key: str) -> Callable:
    def read(a: dict, ctx) -> Piece:
        W = ctx.param(a[w_key])
        if not ctx.is_data(a[x_key]):
            return _unsupported("a matrix product with the parameter on the left (W @ x) or no input in it: jacgrad's "
                                "Dense computes x @ W over the features")
        if W is None:
            return _unsupported("a matrix product of two computed values outside an attention block jacgrad reads: no "
                                "jacgrad layer; a product with a parameter matrix is a Dense layer")
        return ctx.dense(a[x_key], {"W": W})

    return read


def _addmm(a: dict, ctx) -> Piece:
    if float(a.get("beta", 1)) != 1.0 or float(a.get("alpha", 1)) != 1.0:
        return _unsupported("addmm with beta or alpha other than 1")
    piece = _matmul("mat1", "mat2")(a, ctx)
    b = ctx.param(a["input"])
    if piece.kind != "dense" or b is None:
        return piece if piece.kind != "dense" else _unsupported("addmm whose bias is computed, not a parameter")
    piece.params["b"] = b
    return piece


def _add(sign: float) -> Callable:
    def read(a: dict, ctx) -> Piece:
        part = _softsign_part(ctx.node, ctx) if sign > 0 else None
        if part is not None:
            return part
        alpha = sign * float(a.get("alpha", 1))
        x, y = a["input"], a["other"]
        if ctx.is_data(x) and ctx.is_data(y):
            return Piece("add", (x, y), info={"alpha": alpha})
        if ctx.is_data(y):  # b + x @ W: the bias on the left
            x, y = y, x
        b = ctx.param(y) if ctx.is_data(x) else None
        if b is not None and alpha == 1.0 and not b[1]:
            return Piece("bias", (x,), params={"b": b})
        return _unsupported("adding a constant or a computed tensor (only a bias parameter after a matrix product, "
                            "or a residual x + f(x), is a jacgrad layer)")

    return read


def _scale(divide: bool) -> Callable:
    def read(a: dict, ctx) -> Piece:
        softsign = _softsign_nodes(ctx.node, ctx) if divide else None
        if softsign is not None:
            return Piece("act", (softsign[0],), info={"name": "softsign", "parts": softsign[1:]})
        x, c = a["input"], a["other"]
        if not ctx.is_data(x):
            x, c = c, x
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            return _unsupported("multiplying by a tensor (a gate): no jacgrad layer yet; a constant factor on a "
                                "residual branch (x + c·f(x)) is supported")
        return Piece("scale", (x,), info={"scale": 1.0 / c if divide else float(c)})

    return read


def _norm(kind: str) -> Callable:
    def read(a: dict, ctx) -> Piece:
        shape = list(a["normalized_shape"])
        width = ctx.shape(a["input"])[-1]
        if shape != [width]:
            return _unsupported(f"a {kind} over the shape {shape}: only one over the last axis ({width}) is supported")
        params = {}
        for role, key in (("gamma", "weight"), ("beta", "bias")):
            if a.get(key) is not None:
                p = ctx.param(a[key])
                if p is None:
                    return _unsupported(f"a {kind} whose {key} is computed, not a parameter")
                params[role] = p
        return Piece(kind.replace("_", ""), (a["input"],), params=params,
                     info={"eps": a.get("eps"), "width": width})

    return read


def _prelu(a: dict, ctx) -> Piece:
    x = a["input"] if "input" in a else a["self"]
    W = ctx.param(a["weight"])
    if W is None or W[1]:
        return _unsupported("a prelu whose slopes are computed, not a parameter of the model")
    return Piece("prelu", (x,), params={"weight": W})


def _structural(a: dict, ctx) -> Piece:
    x = a["input"] if "input" in a else a["self"]
    before, after = ctx.shape(x), ctx.shape(ctx.node)
    if len(before) > 2 and tuple(after) == (before[0], math.prod(before[1:])):
        return Piece("flatten", (x,))  # an image (B, C, H, W) to (B, C·H·W): a Flatten
    if tuple(before) != tuple(after):
        return _unsupported(f"a reshape from {tuple(before)} to {tuple(after)}: jacgrad layers take (B, n) inputs; "
                            f"per-token (B, T, d) layers come with the token axis")
    return Piece("structural", (x,))


def _dropout(a: dict, ctx) -> Piece:
    if a.get("train") and float(a["p"]) > 0:
        return _unsupported("dropout in training mode zeroes inputs at random: call model.eval() first")
    return Piece("structural", (a["input"],))


def _transpose(a: dict, ctx) -> Piece:
    x = a["input"] if "input" in a else a["self"]
    if not ctx.is_data(x):
        return Piece("param")
    shape, name = ctx.shape(x), op_name(ctx.node)
    dims = (a["dim0"] % len(shape), a["dim1"] % len(shape)) if name == "transpose" else None
    if name == "permute":
        perm = [d % len(shape) for d in a["dims"]]
        moved = [i for i, d in enumerate(perm) if d != i]
        dims = tuple(moved) if len(moved) == 2 else None
    if len(shape) == 3 and dims is not None and sorted(dims) == [1, 2]:
        return Piece("transpose_tokens", (x,), info={"tokens": shape[1], "width": shape[2]})
    return _unsupported(f"a transpose of a computed {len(shape)}-D value other than (B, T, d) -> (B, d, T) "
                        f"(token mixing), outside an attention block: no jacgrad layer")


def _detach(a: dict, ctx) -> Piece:
    return _unsupported("detach stops the gradient there; jacgrad would differentiate through it")


def _inert(a: dict, ctx) -> Piece:
    return Piece("inert")


# op -> (what it becomes, in the docs; its reader)
OPS: dict[str, tuple[str, Callable]] = {
    "linear": ("Dense (W = weightᵀ)", _linear),
    "addmm": ("Dense (bias + x @ W)", _addmm),
    "mm": ("Dense (x @ W, W a parameter or its transpose)", _matmul("input", "mat2")),
    "matmul": ("Dense (x @ W, W a parameter or its transpose)", _matmul("input", "other")),
    "add": ("Residual join x + s·f(x); a bias after a matmul", _add(1.0)),
    "sub": ("Residual join x − f(x)", _add(-1.0)),
    "mul": ("the scale s of a residual branch (by a constant)", _scale(False)),
    "div": ("the scale 1/c of a residual branch (by a constant); softsign x / (1 + abs(x))", _scale(True)),
    "abs": ("part of softsign x / (1 + abs(x)) (F.softsign)", _abs),
    "layer_norm": ("LayerNorm (over the last axis)", _norm("layer_norm")),
    "rms_norm": ("RMSNorm (over the last axis)", _norm("rms_norm")),
    "relu": ("activation relu: of the Dense right before it, else an Activation layer", _act("relu")),
    "tanh": ("activation tanh", _act("tanh")),
    "sigmoid": ("activation sigmoid", _act("sigmoid")),
    "silu": ("activation silu", _act("silu")),
    "gelu": ("activation gelu / gelu_tanh", _gelu),
    "leaky_relu": ("activation leaky_relu(negative_slope)", _act("leaky_relu", negative_slope="negative_slope")),
    "elu": ("activation elu(alpha)", _elu),
    "softplus": ("activation softplus(beta, threshold)", _act("softplus", beta="beta", threshold="threshold")),
    "hardtanh": ("activation hard_tanh(min_val, max_val) (also ReLU6)",
                 _act("hard_tanh", min_val="min_val", max_val="max_val")),
    "relu6": ("activation hard_tanh(0, 6)", _relu6),
    "mish": ("activation mish", _act("mish")),
    "selu": ("activation selu", _act("selu")),
    "hardswish": ("activation hard_swish", _act("hard_swish")),
    "hardsigmoid": ("activation hard_sigmoid", _act("hard_sigmoid")),
    "log_sigmoid": ("activation log_sigmoid", _act("log_sigmoid")),
    "prelu": ("PReLU (one slope, or one per channel): a layer with its slope parameter", _prelu),
    "_prelu_kernel": ("PReLU", _prelu),
    "view": ("structural (a no-op reshape of (B, n)); Flatten from an image (B, C, H, W) to (B, C·H·W)",
             _structural),
    "reshape": ("structural (a no-op reshape of (B, n))", _structural),
    "_unsafe_view": ("structural (a no-op reshape of (B, n))", _structural),
    "flatten": ("structural (a no-op flatten of (B, n)); Flatten from an image (B, C, H, W) to (B, C·H·W)",
                _structural),
    "alias": ("structural", _structural),
    "clone": ("structural", _structural),
    "contiguous": ("structural", _structural),
    "dropout": ("structural (eval mode, or p = 0)", _dropout),
    "t": ("a transposed parameter, read by its matmul", _transpose),
    "numpy_T": ("a transposed parameter, read by its matmul", _transpose),
    "transpose": ("a transposed parameter, read by its matmul; (B, T, d) -> (B, d, T): TransposeTokens (token "
                  "mixing); inside an attention block, part of it", _transpose),
    "permute": ("as transpose (a permutation swapping two axes)", _transpose),
    "detach": ("refused: it stops the gradient", _detach),
    "_assert_tensor_metadata": ("nothing (a check torch inserts)", _inert),
    "sym_size": ("nothing (a shape read)", _inert),
}

# Ops whose jacgrad layer exists but which the graph importer does not build yet (none now).
PENDING: dict[str, str] = {}

OPS.update(CONV_OPS)
OPS.update(TOKEN_OPS)
OPS.update(vit_ops(OPS))  # the token plumbing of a ViT: its rows wrap (and fall back to) the readings above


def classify(node, ctx) -> Piece:
    """The ``Piece`` of one ``call_function`` node. ``ctx`` gives the node's arguments by name
    (``ctx.arguments(node)``), tells data from parameters (``is_data``, ``param``) and shapes."""
    name = op_name(node)
    raw = getattr(getattr(node.target, "overloadpacket", None), "__name__", name)
    if raw.endswith("_") and not raw.startswith("_") and not ctx.is_data(node):
        return _unsupported("an in-place update of a buffer (batch norm's counters in training mode): call "
                            "model.eval() first, or write the model without it")
    if name == "batch_norm" or name.startswith("_native_batch_norm"):
        args = ctx.arguments(node)
        if args is not None and args.get("training"):
            return _unsupported("batch norm in training mode normalises by the batch's own statistics: "
                                "call model.eval() first")
    if name == "getitem":
        return getitem_piece(node, ctx)
    if name in PENDING:
        return _unsupported(f"not read from the graph yet: {PENDING[name]}")
    if name.endswith("_") and name[:-1] not in OPS and not name.startswith("_"):
        return _unsupported("an in-place update (of a buffer or an input): call model.eval() for batch norm, "
                            "or write the model without it")
    row = OPS.get(name)
    if row is None:
        return _unsupported("no jacgrad layer computes this op")
    args = ctx.arguments(node)
    if args is None:
        return _unsupported("its arguments do not match the op's schema")
    return row[1](args, ctx)


def supported_ops_markdown() -> str:
    """The supported-op table of the docs, from ``OPS`` and ``PENDING``: markdown rows
    ``| op | jacgrad layer |`` with a header; pending ops say which layer they wait for.

        >>> print(supported_ops_markdown().splitlines()[2])
        | `aten.linear` | Dense (W = weightᵀ) |
    """
    lines = ["| ATen op | jacgrad layer |", "|---|---|"]
    lines += [f"| `aten.{name}` | {what} |" for name, (what, _) in OPS.items()]
    lines += [f"| `aten.{name}` | not read from the graph yet: {what} |" for name, what in PENDING.items()]
    return "\n".join(lines) + "\n"

"""The token rows of the graph importer's op table (``jacgrad.models.ops``): ``embedding`` (an
``Embedding`` layer: the network's input is then integer token ids ``(B, T)``), and the ops an
attention block is traced into. Those are judged one node at a time here only to say what they
are alone; ``jacgrad.models.token_graph`` then reads each attention block — the q/k/v projections,
the views that split heads, ``scaled_dot_product_attention`` or the explicit
``softmax(q kᵀ·scale + causal mask) v``, the views that merge heads, the out-projection — as ONE
``MultiHeadAttention``, and ``x + E[arange(T)]`` as a learned positional embedding.

Nothing here imports torch.
"""

from __future__ import annotations

from typing import Callable

from ..tokens.attention import MultiHeadAttention
from ..tokens.embedding import Embedding
from .explain import Piece, _unsupported

__all__ = ["TOKEN_LAYERS", "TOKEN_OPS"]

_ATTENTION = "part of an attention block, read whole as one MultiHeadAttention"


def _embedding(a: dict, ctx) -> Piece:
    if a.get("scale_grad_by_freq") or a.get("sparse"):
        return _unsupported("an embedding with scale_grad_by_freq or sparse gradients: jacgrad's Embedding has neither")
    E = ctx.param(a["weight"])
    if E is None or E[1]:
        return _unsupported("an embedding whose table is computed, not a parameter of the model")
    if not ctx.is_data(a["indices"]):
        return _unsupported("an embedding of indices not computed from the input: only a learned positional "
                            "embedding added to the tokens' (x + E[arange(T)]) is read")
    pad = a.get("padding_idx", -1)
    return Piece("embedding", (a["indices"],), params={"E": E},
                 info={"padding_idx": None if pad is None or int(pad) < 0 else int(pad)})


def _alone(what: str) -> Callable:
    """A reader for an op that is a jacgrad layer only inside an attention block (or a positional
    embedding): alone it is unsupported, and says so; ``token_graph`` replaces the verdict of each
    node of a block it reads."""

    def read(a: dict, ctx) -> Piece:
        if not ctx.is_data(ctx.node) and not ctx.node.users:
            return Piece("inert")  # computed and never read
        return _unsupported(f"{what} outside an attention block that jacgrad reads (q/k/v projections of one "
                            f"(B, T, d) value, softmax(q kᵀ/√d_h [+ causal mask]) v, an out-projection): no "
                            f"jacgrad layer")

    return read


# op -> (what it becomes, in the docs; its reader)
TOKEN_OPS: dict = {
    "embedding": ("Embedding (integer (B, T) input: token ids); x + E[arange(T)]: a learned positional embedding",
                  _embedding),
    "scaled_dot_product_attention": ("MultiHeadAttention, with its q/k/v projections (fused or separate) and its "
                                     "out-projection (no dropout, no mask but causal, scale 1/√d_h)",
                                     _alone("scaled_dot_product_attention")),
    "softmax": (f"{_ATTENTION}: softmax(q kᵀ·scale [+ causal mask]) v", _alone("a softmax")),
    "_softmax": (_ATTENTION, _alone("a softmax")),
    "masked_fill": (f"{_ATTENTION}: the causal mask (−inf above the diagonal)", _alone("masked_fill")),
    "bmm": (_ATTENTION, _alone("a batched product of two computed values")),
    "split": (f"{_ATTENTION}: the split of a fused qkv projection", _alone("split")),
    "split_with_sizes": (_ATTENTION, _alone("split")),
    "chunk": (_ATTENTION, _alone("chunk")),
    "unbind": (_ATTENTION, _alone("unbind")),
    "select": (_ATTENTION, _alone("select")),
    "slice": (_ATTENTION, _alone("slice")),
    "unflatten": (_ATTENTION, _alone("unflatten")),
    "unsqueeze": (_ATTENTION, _alone("unsqueeze")),
    "squeeze": (_ATTENTION, _alone("squeeze")),
    "arange": ("part of a learned positional embedding E[arange(T)]", _alone("arange")),
}


def _attention(a: dict, info: dict) -> MultiHeadAttention:
    # a projection without a bias in torch (Linear(bias=False), MultiheadAttention(bias=False)) has none here
    b = [a.get(f"b{n}") for n in "qkvo"]
    return MultiHeadAttention(a["Wq"], a["Wk"], a["Wv"], a["Wo"], info["heads"], *b, causal=info["causal"],
                              bias=tuple(x is not None for x in b))


def _positional(a: dict, info: dict):
    from ..protocol.layer import layer_class

    return layer_class("positional_embedding")(a["P"])


def _transpose_tokens(a: dict, info: dict):
    from ..protocol.layer import layer_class

    return layer_class("transpose_tokens")(info["tokens"], info["width"])


# piece kind -> the layer, from its arrays by role and the piece's info (jacgrad.models.chain builds it)
TOKEN_LAYERS: dict = {
    "embedding": lambda a, info: Embedding(a["E"], padding_idx=info["padding_idx"]),
    "attention": _attention,
    "posemb": _positional,
    "transpose_tokens": _transpose_tokens,
}

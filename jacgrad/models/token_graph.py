"""Token blocks of a traced graph read whole (``read_token_blocks(cap)``, run by ``graph.Capture``
after each node is judged alone): every attention block becomes ONE ``MultiHeadAttention`` piece,
and ``x + E[arange(T)]`` a learned positional embedding.

Each attention block is read by ``jacgrad.models.attention_graph.AttentionBlock``: q, k and v back
through views to their projections, the core's output forward to the out-projection, every chain of
views replayed by torch on a tensor of labels, which says exactly where every element of q, k, v came
from. A block is read when q, k, v are the columns ``off + j·d_h + e`` of their projection for head
``j``, feature ``e``, token for token, and the merged heads reach the out-projection and the output in
the same order — a fused weight gives ``Wq, Wk, Wv`` as column slices of one parameter (views for
``copy=False``). Anything else is refused, naming the core node (its views and products marked as its
parts, so that each refused block is listed once): dropout in training mode, a mask neither causal nor
empty (padding, ALiBi, windows), a scale other than ``1/√d_h``, q or k computed by something else
(rotary embeddings), grouped heads. Values that never reach the output are inert.
"""

from __future__ import annotations

from ..io.interop import require
from .attention_graph import AttentionBlock
from .graph_nodes import VIEWS, Refused, data_inputs, scaling
from .ops import op_name
from .explain import Piece, _unsupported

__all__ = ["read_token_blocks"]


def read_token_blocks(cap) -> None:
    """Replace the pieces of every attention block and positional embedding of ``cap`` (a
    ``graph.Capture``): the block's last node becomes ``Piece("attention", (x,))`` (``params``:
    ``Wq … bo`` as ``(placeholder, transposed, columns)``; ``info``: heads, causal, parts), its other
    nodes ``"inert"`` parts owned by it; a core that is not read becomes unsupported with the reason."""
    torch = require("torch", "importing a torch model by graph capture", "pip install torch")
    _mark_unused(cap)
    for n in list(cap.graph.nodes):
        name = op_name(n) if n.op == "call_function" else ""
        if n in cap.data and (name == "scaled_dot_product_attention" or name in ("softmax", "_softmax")):
            try:
                AttentionBlock(cap, torch, n).read()
            except Refused as exc:
                for part in _region(cap, n):  # its views and products: listed once, at the core
                    kind = "structural" if part in cap.data else "inert"
                    cap.pieces[part] = Piece(kind, tuple(data_inputs(cap, part)),
                                             info={"part_of": f"the attention at {n.name}, refused"})
                cap.pieces[n] = _unsupported(f"attention not read as a MultiHeadAttention: {exc}")
        elif name == "add" and n in cap.data:
            _positional(cap, n)


def _mark_unused(cap) -> None:
    """Nodes whose value never reaches the output (``nn.MultiheadAttention``'s averaged weights when the
    caller drops them; a mask built and not passed) compute nothing the network needs: inert."""
    used = set()
    for n in reversed(list(cap.graph.nodes)):
        if n.op == "output" or n in used:
            used.update(n.all_input_nodes)
    for n, piece in cap.pieces.items():
        if n not in used and n.op == "call_function" and (n in cap.data or piece.kind == "unsupported"):
            cap.pieces[n] = Piece("inert", info={"unused": True})


def _region(cap, core) -> list:
    """The nodes of a refused attention block around ``core`` that no layer takes: its views, products,
    constant factors and masks, up to what is a layer (the projections, the block's input)."""
    inner = ("matmul", "bmm", "masked_fill", "softmax", "_softmax")
    found, todo = [], [core]
    while todo:
        n = todo.pop()
        for m in list(n.all_input_nodes) + list(n.users):
            if m is core or m in found or m.op != "call_function":
                continue
            kind = cap.pieces[m].kind
            if m in cap.data:
                ok = kind in ("unsupported", "structural", "scale") and (
                    op_name(m) in VIEWS or op_name(m) in inner or scaling(cap, m) is not None
                    or (op_name(m) == "add" and len(data_inputs(cap, m)) == 1))
            else:  # a mask or bias computed from buffers
                ok = kind == "unsupported"
            if ok:
                found.append(m)
                todo.append(m)
    return found


def _positional(cap, n) -> None:
    """``x + E[arange(T)]`` (either order): a learned positional embedding of ``x: (B, T, d)``."""
    from ..protocol.layer import layer_kinds

    a = cap.arguments(n)
    if a is None or float(a.get("alpha", 1)) != 1:
        return
    x, e = (a["input"], a["other"]) if a["input"] in cap.data else (a["other"], a["input"])
    if x not in cap.data or e in cap.data or getattr(e, "op", None) != "call_function" or op_name(e) != "embedding":
        return
    b = cap.arguments(e)
    table, idx = cap.param(b["weight"]), b["indices"]
    if table is None or table[1] or getattr(idx, "op", None) != "call_function" or op_name(idx) != "arange":
        return
    shape, ia = cap.shape(x), cap.arguments(idx)
    T = shape[1] if len(shape) == 3 else -1
    start, step = ia.get("start", 0), ia.get("step", 1)
    if tuple(cap.shape(idx)) != (T,) or start != 0 or step != 1 or len(e.users) != 1 or len(idx.users) != 1:
        cap.pieces[n] = _unsupported(f"a positional embedding of indices other than arange(T) = 0, 1, …, {T - 1}")
        return
    for part in (e, idx):
        cap.pieces[part] = Piece("inert", info={"part_of": "PositionalEmbedding", "owner": n})
    if "positional_embedding" not in layer_kinds():
        cap.pieces[n] = _unsupported("a learned positional embedding x + E[arange(T)]: jacgrad's PositionalEmbedding "
                                     "layer is not in this build")
        return
    cap.pieces[n] = Piece("posemb", (x,), params={"P": table}, info={"parts": [e, idx]})

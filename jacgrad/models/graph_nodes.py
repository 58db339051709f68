"""What the token passes (``jacgrad.models.token_graph``, ``jacgrad.models.attention_graph``) read of
a traced graph's nodes: which ops are views, a node's data inputs, a multiplication by a constant,
the users still live; and ``Refused``, why a block is not read.
"""

from __future__ import annotations

from .ops import op_name

__all__ = ["Refused", "VIEWS", "constant", "data_inputs", "is_view", "live_users", "scaling"]

VIEWS = frozenset({"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "clone", "alias", "split",
                   "split_with_sizes", "chunk", "unbind", "getitem", "select", "squeeze", "unsqueeze", "unflatten",
                   "flatten", "slice", "expand", "dropout"})


class Refused(Exception):
    """Why the block at a core node is not a MultiHeadAttention."""


def data_inputs(cap, n) -> list:
    return [i for i in n.all_input_nodes if i in cap.data]


def is_view(cap, n) -> bool:
    return n.op == "call_function" and op_name(n) in VIEWS and len(data_inputs(cap, n)) == 1 and (
        op_name(n) != "dropout" or cap.pieces[n].kind == "structural")


def scaling(cap, n):
    """``c`` when ``n`` multiplies (or divides, ``1/c``) one computed value by a constant, else None."""
    if n.op != "call_function" or op_name(n) not in ("mul", "div") or len(data_inputs(cap, n)) != 1:
        return None
    a = cap.arguments(n) or {}
    c = [constant(cap, v) for k, v in a.items() if k in ("input", "other") and v not in cap.data]
    if len(c) != 1 or c[0] is None or c[0] == 0:
        return None
    return 1.0 / c[0] if op_name(n) == "div" else c[0]


def constant(cap, n):
    """A constant ``c`` (a number) when ``n`` is one, else None."""
    return float(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else None


def live_users(cap, users) -> list:
    return [u for u in users if not (u in cap.pieces and cap.pieces[u].info.get("unused"))]

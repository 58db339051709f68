"""One attention block of a traced graph read whole (``AttentionBlock(cap, torch, core).read()``, run by
``jacgrad.models.token_graph`` for each core node), and the graph helpers the token passes share.

The block is read outwards from its core — ``scaled_dot_product_attention``, or a ``softmax`` over the
last axis between ``matmul(q, kᵀ)`` (times constants, with a causal ``masked_fill`` or additive mask)
and ``matmul(·, v)``: q, k and v back through views to their projections (one fused ``Linear(d, 3d)``,
or three), those back through views to one ``(B, T, d)`` value ``x``; the core's output forward through
views to the out-projection and on to ``(B, T, d)``. Each chain of views is replayed by torch on a
tensor of labels (``arange`` over the source's elements), which says where every element of q, k, v
came from; see ``jacgrad.models.token_graph`` for what is read and what is refused, and
``jacgrad.models.graph_nodes`` for the node helpers both share.
"""

from __future__ import annotations

import math

import numpy as np

from .explain import Piece
from .graph_nodes import Refused, constant, data_inputs, is_view, live_users, scaling
from .ops import op_name

__all__ = ["AttentionBlock"]

class AttentionBlock:
    """The attention block around the core node ``core`` of ``cap`` (a ``graph.Capture``); ``read()``
    replaces its pieces by one ``"attention"`` piece, or raises ``Refused``."""

    def __init__(self, cap, torch, core):
        self.cap, self.torch, self.core = cap, torch, core
        self.parts, self.scale = [core], 1.0

    # ------------------------------------------------------------------ label replay
    def replay(self, src, want):
        """The labels ``want`` gets when ``arange`` over ``src``'s elements is replayed through the views between."""
        torch, fx = self.torch, self.torch.fx
        vals = {src: torch.arange(math.prod(self.cap.shape(src))).reshape(self.cap.shape(src))}
        for n in self.cap.graph.nodes:
            if n in vals or not (is_view(self.cap, n) or scaling(self.cap, n) is not None) \
                    or data_inputs(self.cap, n)[0] not in vals:
                continue
            args = fx.node.map_arg(n.args, lambda a: vals.get(a, a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: vals.get(a, a))
            if op_name(n) == "dropout" or scaling(self.cap, n) is not None:  # labels pass a constant factor
                vals[n] = vals[data_inputs(self.cap, n)[0]]
            elif op_name(n) in ("view", "_unsafe_view"):  # torch's memory layout is not the labels': same values
                vals[n] = self.torch.reshape(args[0], args[1])
            else:
                vals[n] = n.target(*args, **kwargs)
            if n is want:
                break
        if want not in vals:
            raise Refused(f"{want.name} is not reached from {src.name} through views")
        return np.asarray(vals[want].numpy())

    def back(self, n, scales: bool = True):
        """Back from ``n`` through views (and, with ``scales``, constant factors, into ``scale``): the first
        other node."""
        while True:
            c = scaling(self.cap, n) if scales else None
            if is_view(self.cap, n) or c is not None:
                self.scale *= 1.0 if c is None else c
                self.parts.append(n)
                n = data_inputs(self.cap, n)[0]
                continue
            return n

    # ------------------------------------------------------------------ the pieces of a block
    def projection(self, n, what: str):
        """``(x, W, b, columns of the output, F)`` of the projection at ``n`` (a Dense: linear, or a matmul and
        its bias) whose output ``n`` is, with the rows of its input as tokens ``b·T + t`` of ``x``."""
        piece = self.cap.pieces.get(n)
        nodes = [n]
        params = dict(piece.params) if piece is not None else {}
        if piece is not None and piece.kind == "bias":
            first = self.cap.pieces.get(piece.data[0])
            if first is None or first.kind != "dense" or "b" in first.params:
                piece = None
            else:
                nodes, params = [piece.data[0], n], dict(first.params, b=piece.params["b"])
                piece = first
        if piece is None or piece.kind != "dense":
            raise Refused(f"{what} is computed by {n.name} (aten.{op_name(n) if n.op == 'call_function' else n.op}), "
                          f"not by a projection (a Linear) of the block's input through views (rotary embeddings, "
                          f"a norm of q or k and other transforms are not supported)")
        self.parts += nodes
        X0 = piece.data[0]
        x = self.back(X0, scales=False)
        shape = self.cap.shape(x)
        if len(shape) != 3:
            raise Refused(f"the input of the {what} projection, {x.name}, is {shape}, not (B, T, d)")
        lab = self.replay(x, X0) if X0 is not x else np.arange(math.prod(shape)).reshape(shape)
        d = shape[2]
        if lab.shape[-1] != d or (lab % d != np.arange(d)).any() or (lab // d != lab[..., :1] // d).any():
            raise Refused(f"the views from {x.name} to the {what} projection move features, not tokens")
        return x, params, (lab[..., 0] // d).reshape(-1), nodes[-1]

    def operand(self, n, what: str, transposed: bool):
        """``(x, params with columns, d_h)`` for q/k/v ``n``: ``(B, h, T, d_h)`` (``(B, h, d_h, T)`` where
        ``transposed``) views of the columns ``off + j·d_h + e`` of one projection."""
        before = self.scale
        head = self.back(n)
        if what == "v" and self.scale != before:
            raise Refused("v is multiplied by a constant: not supported (scale the out-projection instead)")
        x, params, rows, out = self.projection(head, what)
        lab = self.replay(out, n) if n is not out else np.arange(math.prod(self.cap.shape(out))).reshape(
            self.cap.shape(out))
        B = self.cap.shape(x)[0]
        if lab.ndim == 3 and lab.shape[0] % B == 0:  # heads batched as (B·h, T, d_h), sample-major
            lab = lab.reshape((B, lab.shape[0] // B) + lab.shape[1:])
        if lab.ndim != 4:
            raise Refused(f"{what} is {lab.shape}: heads (B, h, T, d_h) or (B·h, T, d_h) are read")
        if transposed:
            lab = lab.swapaxes(-1, -2)
        B, h, T, dh = lab.shape
        F = self.cap.shape(out)[-1]
        row, f = np.divmod(lab, F)
        want = np.arange(B)[:, None, None, None] * T + np.arange(T)[None, None, :, None]
        if tuple(self.cap.shape(x)) != (B, T, h * dh) or (rows[row] != want).any():
            raise Refused(f"{what}'s tokens are not those of the block's input {x.name} {self.cap.shape(x)} in order "
                          f"(or its heads {h} × {dh} do not make its width)")
        off = f - (np.arange(h)[None, :, None, None] * dh + np.arange(dh))
        if (off != off.flat[0]).any():
            raise Refused(f"{what}'s heads are not consecutive blocks of d/h columns of its projection (grouped or "
                          f"shared heads are not supported)")
        lo = int(off.flat[0])
        cols = (lo, lo + h * dh)
        out_params = {"W": (*params["W"], cols)}
        if "b" in params:
            out_params["b"] = (*params["b"], cols)
        return x, out_params, h, dh

    def read(self) -> None:
        cap, core = self.cap, self.core
        if op_name(core) == "scaled_dot_product_attention":
            q, k, v, causal, kT = self.sdpa(core)
            end = core
        else:
            q, k, v, causal, end = self.explicit(core)
            kT = True
        Q = self.operand(q, "q", False)
        K = self.operand(k, "k", kT)
        V = self.operand(v, "v", False)
        x, _, h, dh = Q
        if K[0] is not x or V[0] is not x:
            raise Refused(f"q, k and v are projections of different values ({x.name}, {K[0].name}, {V[0].name}): only "
                          f"self-attention is supported")
        if not math.isclose(self.scale * self.core_scale, 1.0 / math.sqrt(dh), rel_tol=1e-6):
            raise Refused(f"the scores are scaled by {self.scale * self.core_scale:g}, not 1/√d_h = "
                          f"{1 / math.sqrt(dh):g}: a custom scale is not supported")
        spans = sorted((P[1]["W"][0].name, *P[1]["W"][2]) for P in (Q, K, V))
        if any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:])):
            raise Refused("q, k and v share columns of one projection: their gradients would be counted apart")
        Wo, y = self.out_projection(end, x, h, dh)
        params = {}
        for leaf, P in zip("qkvo", (Q[1], K[1], V[1], Wo)):
            params[f"W{leaf}"] = P["W"]
            if "b" in P:
                params[f"b{leaf}"] = P["b"]
        inner = [n for n in dict.fromkeys(self.parts) if n is not y and n.op == "call_function"]
        for n in inner:
            if n in cap.data and any(u not in inner and u is not y for u in live_users(cap, n.users)):
                raise Refused(f"{n.name}, inside the block, is also read outside it "
                              f"({', '.join(u.name for u in n.users if u not in inner)})")
        for n in inner:
            cap.pieces[n] = Piece("inert", info={"part_of": "MultiHeadAttention", "owner": y})
        cap.pieces[y] = Piece("attention", (x,), params=params, info={"heads": h, "causal": causal, "parts": inner})

    # ------------------------------------------------------------------ cores
    def sdpa(self, core):
        a = self.cap.arguments(core)
        if float(a.get("dropout_p", 0.0) or 0.0) > 0:
            raise Refused(f"dropout_p={a['dropout_p']} (attention dropout): call model.eval(), or pass dropout_p=0 "
                          f"outside training")
        if a.get("enable_gqa"):
            raise Refused("enable_gqa=True (grouped-query attention) is not supported")
        causal = bool(a.get("is_causal"))
        if a.get("attn_mask") is not None:
            causal = self.mask(a["attn_mask"], causal, boolean_keeps=True)
        dh = self.cap.shape(a["query"])[-1]
        self.core_scale = 1.0 / math.sqrt(dh) if a.get("scale") is None else float(a["scale"])
        return a["query"], a["key"], a["value"], causal, False

    def explicit(self, s):
        cap = self.cap
        a = cap.arguments(s)
        nd = len(cap.shape(s))
        if a is None or a.get("dim") % nd != nd - 1:
            raise Refused("a softmax over an axis other than the last (the keys)")
        if a.get("dtype") is not None or a.get("half_to_float"):
            raise Refused("a softmax with a dtype change")
        n = s
        while len(n.users) == 1 and is_view(cap, next(iter(n.users))) and op_name(next(iter(n.users))) in (
                "dropout", "clone", "contiguous", "alias"):
            n = next(iter(n.users))
            self.parts.append(n)
        users = live_users(cap, n.users)
        if len(users) == 1 and op_name(users[0]) == "dropout":
            raise Refused("attention dropout in training mode (the weights are zeroed at random): call model.eval()")
        if len(users) != 1 or op_name(users[0]) not in ("matmul", "bmm") or users[0].args[0] is not n:
            raise Refused(f"{s.name} (the softmax) is not followed by one product with v (its readers: "
                          f"{', '.join(u.name for u in users)})")
        pv = users[0]
        self.parts.append(pv)
        causal, S, self.core_scale = False, a["input"], 1.0
        while True:
            name = op_name(S) if S.op == "call_function" else ""
            b = cap.arguments(S) if name in ("masked_fill", "add", "mul", "div") else None
            if name == "masked_fill" and b["input"] in cap.data and b["mask"] not in cap.data:
                value = constant(cap, b["value"])
                if value is None or value > -1e9:
                    raise Refused(f"{S.name} fills the mask with {b['value']}, not −inf")
                causal = self.mask(b["mask"], causal, boolean_keeps=False)
            elif name == "add" and len(data_inputs(cap, S)) == 1 and float(b.get("alpha", 1)) == 1:
                other = b["other"] if b["input"] in cap.data else b["input"]
                causal = self.mask(other, causal, boolean_keeps=None)
                b = {"input": data_inputs(cap, S)[0]}
            elif name in ("mul", "div") and len(data_inputs(cap, S)) == 1:
                c = scaling(cap, S)
                if c is None:
                    raise Refused(f"{S.name} multiplies the scores by a computed tensor (ALiBi or another bias)")
                self.core_scale *= c
                b = {"input": data_inputs(cap, S)[0]}
            else:
                break
            self.parts.append(S)
            S = b["input"]
        if op_name(S) not in ("matmul", "bmm") or len(data_inputs(cap, S)) != 2:
            raise Refused(f"the scores {S.name} (aten.{op_name(S)}) are not q @ kᵀ")
        self.parts.append(S)
        return S.args[0], S.args[1], pv.args[1], causal, pv

    def mask(self, m, causal: bool, boolean_keeps) -> bool:
        """Whether the constant mask ``m`` is causal (True) or empty (``causal`` kept); else refused.
        ``boolean_keeps``: a boolean mask marks the kept keys (sdpa's) or the hidden ones (masked_fill's);
        None: an additive float mask."""
        val = self._evaluate(m)
        if val.ndim < 2 or val.shape[-1] != val.shape[-2] or any(s != 1 for s in val.shape[:-2]):
            raise Refused(f"the mask {getattr(m, 'name', m)} of shape {tuple(val.shape)} is not one (T, T) mask "
                          f"shared by every sample and head (padding masks are not read from the graph)")
        val = val.reshape(val.shape[-2:])
        T = val.shape[-1]
        upper = np.triu(np.ones((T, T), dtype=bool), 1)
        if boolean_keeps is None:
            hidden = val <= -1e9
            if (val[~hidden] != 0).any():
                raise Refused(f"the additive mask {getattr(m, 'name', m)} is a bias (ALiBi, relative positions), "
                              f"not a causal mask: not supported")
        else:
            if val.dtype != np.bool_:
                raise Refused(f"the mask {getattr(m, 'name', m)} is not boolean")
            hidden = ~val if boolean_keeps else val
        if not hidden.any():
            return causal
        if (hidden == upper).all():
            return True
        raise Refused(f"the mask {getattr(m, 'name', m)} is neither causal nor empty (a window, padding or another "
                      f"pattern): not supported")

    def _evaluate(self, m):
        """The value of a node computed from parameters, buffers and constants only (replayed by torch)."""
        torch, cap = self.torch, self.cap
        if not hasattr(m, "op"):
            return np.asarray(m)
        vals = {}

        def value(n):
            if n in vals:
                return vals[n]
            if n.op == "placeholder":
                if n in cap.data:
                    raise Refused(f"the mask depends on the input ({n.name}): padding masks are not read")
                try:
                    vals[n] = cap.tensor(n).detach()
                except Exception:
                    raise Refused(f"the mask reads {n.name}, neither a parameter nor a buffer") from None
                return vals[n]
            for i in n.all_input_nodes:
                value(i)
            args = torch.fx.node.map_arg(n.args, lambda a: vals[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: vals[a])
            with torch.no_grad():
                vals[n] = n.target(*args, **kwargs)
            if n.op == "call_function":
                self.parts.append(n)
            return vals[n]

        return np.asarray(value(m).detach().cpu().numpy())

    def out_projection(self, end, x, h: int, dh: int):
        """The out-projection's params and the block's last node ``y`` ``(B, T, d)``: from the core output
        ``end`` forward through views to a Dense ``(d, d)``, and on through views."""
        cap, n = self.cap, end
        while len(n.users) == 1 and is_view(cap, next(iter(n.users))):
            n = next(iter(n.users))
            self.parts.append(n)
        users = list(n.users)
        piece = cap.pieces.get(users[0]) if len(users) == 1 else None
        if piece is None or piece.kind != "dense" or piece.data[0] is not n:
            raise Refused(f"the merged heads {n.name} do not go into one out-projection (a Linear)")
        P, params = users[0], dict(piece.params)
        self.parts.append(P)
        if len(P.users) == 1 and cap.pieces.get(next(iter(P.users))) is not None and \
                cap.pieces[next(iter(P.users))].kind == "bias" and "b" not in params:
            P = next(iter(P.users))
            params["b"] = cap.pieces[P].params["b"]
            self.parts.append(P)
        B, T, d = cap.shape(x)
        lab = self.replay(end, n) if n is not end else np.arange(math.prod(cap.shape(end))).reshape(cap.shape(end))
        if lab.shape[-1] != d:
            raise Refused(f"the out-projection takes {lab.shape[-1]} features, not d = {d}")
        b, j, t, e = np.unravel_index(lab, (B, h, T, dh))
        if (j * dh + e != np.arange(d)).any() or (b * T + t != (b * T + t)[..., :1]).any():
            raise Refused("the heads are not merged back as (B, T, h·d_h) before the out-projection")
        rows = (b * T + t)[..., 0].reshape(-1)
        if cap.shape(P)[-1] != d:
            raise Refused(f"the out-projection gives {cap.shape(P)[-1]} features, not d = {d}")
        chain, n = [P], P
        while len(n.users) == 1 and is_view(cap, next(iter(n.users))):
            n = next(iter(n.users))
            chain.append(n)
        for y in reversed(chain):
            if tuple(cap.shape(y)) != (B, T, d):
                continue
            lab = self.replay(P, y) if y is not P else np.arange(B * T * d).reshape(B, T, d)
            r, f = np.divmod(lab, d)
            want = np.arange(B)[:, None, None] * T + np.arange(T)[None, :, None]
            if (f == np.arange(d)).all() and (rows[r] == want).all():
                self.parts += chain[1:chain.index(y) + 1]
                return params, y
        raise Refused("the out-projection's output does not come back to (B, T, d) in token order")



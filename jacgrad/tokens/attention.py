"""``MultiHeadAttention``: torch's ``nn.MultiheadAttention(batch_first=True)`` self-attention as a
jacgrad layer — forward into buffers, backward, its Jacobian as a structured factor, and four
token-wise Dense parameter leaves.

Shapes, with letters: ``x, y: (B, T, d)``; ``h`` heads of width ``d_h = d/h``. jacgrad's weight
convention is ``h = z @ W + b`` with ``W: (d_in, d_out)``, so ``Wq = in_proj_weight[:d].T``,
``Wk = in_proj_weight[d:2d].T``, ``Wv = in_proj_weight[2d:].T``, ``Wo = out_proj.weight.T``
(``jacgrad.io.interop.torch_blocks.attention_from_torch`` does the mapping). The layer computes

    Q = x Wq + bq,  K = x Wk + bk,  V = x Wv + bv      (then split into heads)
    O = softmax(QKᵀ/√d_h + mask) V                     (per head; heads merged back to (B, T, d))
    y = O Wo + bo

Masks: ``causal=True`` hides key ``s > t`` from query ``t``; ``key_padding_mask: (B, T)`` bool,
True = masked (torch's convention), is an argument of ``forward``. A query with every key masked
gets a zero attention row (output ``bo``), as torch's autograd path gives (its no-grad fast
path gives NaN there).

Parameter leaves (the ``(A, Δ)`` pairs of a token-wise Dense, per-sample gradient ``A_iᵀΔ_i``,
bias ``Σ_t Δ_i,t``), in ``params`` order — each ``A`` and ``Δ`` is ``(B, T, d)``:

    leaf   weight, bias   A (``param_input(state)[k]``)   Δ (``factor(state).vjp_parts(g)[1][k]``)
    q      Wq, bq         x                               ∂L/∂Q   (heads merged)
    k      Wk, bk         x                               ∂L/∂K
    v      Wv, bv         x                               ∂L/∂V
    out    Wo, bo         O (heads merged)                ∂L/∂y

    >>> import numpy as np, jacgrad as jg
    >>> rng = np.random.default_rng(0); W = lambda: rng.standard_normal((4, 4)) / 2
    >>> L = jg.layers.MultiHeadAttention(W(), W(), W(), W(), heads=2, causal=True)
    >>> y, state = L.forward(rng.standard_normal((3, 5, 4)))
    >>> F = L.factor(state)                      # ∂y/∂x per sample, applied, never formed
    >>> y.shape, F.vjp(np.ones((3, 5, 4))).shape, F.dense().shape
    ((3, 5, 4), (3, 5, 4), (3, 20, 20))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..core.validation import float_array, shape_str
from .attention_factor import AttentionFactor, attention_weights, merge_heads, split_heads
from ..core.backend import asarray, get_xp, is_foreign_array
from ..protocol.layer import register_layer
from ..cuda.gemm import matmul, matmul_into

__all__ = ["MultiHeadAttention"]

_LEAVES = ("q", "k", "v", "out")


class MultiHeadAttention:
    """Self-attention ``(B, T, d) -> (B, T, d)`` with ``heads`` heads (module text). ``Wq, Wk, Wv, Wo:
    (d, d)``; biases ``bq, bk, bv, bo: (d,)``, each None: zeros, still a parameter (as a ``Dense``
    bias); ``causal``: a causal mask on every call. ``bias``: True, False (no bias parameters at all:
    torch's ``nn.MultiheadAttention(bias=False)``, a bias-free q/k/v/out ``nn.Linear``), or one flag per
    projection ``(q, k, v, out)`` (e.g. biases on q, k, v but not on out); a projection without a bias
    takes None. Arrays are kept by reference."""

    kind = "multihead_attention"
    spec_fields = {"heads": int, "causal": bool}
    spec_optional = {"bias": (bool, list)}  # written only where some projection has no bias
    per_token = True  # takes token batches (B, T, ·): what Sequential.takes_tokens asks of every layer

    def __init__(self, Wq: Any, Wk: Any, Wv: Any, Wo: Any, heads: int, bq: Any = None, bk: Any = None,
                 bv: Any = None, bo: Any = None, causal: bool = False, bias: Any = True):
        flags = (bias,) * 4 if isinstance(bias, bool) else tuple(bias) if isinstance(bias, (list, tuple)) else ()
        if len(flags) != 4 or not all(isinstance(f, bool) for f in flags):
            raise TypeError(f"MultiHeadAttention: bias must be True, False or four of them (q, k, v, out), got {bias!r}")
        given = {"Wq": Wq, "Wk": Wk, "Wv": Wv, "Wo": Wo}
        biases = {"bq": bq, "bk": bk, "bv": bv, "bo": bo}
        extra = [k for (k, b), f in zip(biases.items(), flags) if b is not None and not f]
        if extra:
            raise ValueError(f"MultiHeadAttention: {', '.join(extra)} given but bias={bias!r} says that projection "
                             f"has no bias; pass None for it")
        given.update({k: b for k, b in biases.items() if b is not None})
        xp = get_xp(*[asarray(a) if is_foreign_array(a) else a for a in given.values()])
        arrays = {k: float_array(a, f"MultiHeadAttention: {k}", xp) for k, a in given.items()}
        for (k, b), f in zip(biases.items(), flags):
            if b is None and f and arrays["Wq"].ndim == 2:
                arrays[k] = xp.zeros(arrays["Wq"].shape[1], dtype=arrays["Wq"].dtype)
        d = arrays["Wq"].shape[0] if arrays["Wq"].ndim == 2 else -1
        for k, a in arrays.items():
            want = (d, d) if k[0] == "W" else (d,)
            if d < 1 or a.shape != want or a.dtype != arrays["Wq"].dtype:
                raise ValueError(f"MultiHeadAttention: {k} is {shape_str(a.shape)} {a.dtype} but Wq is "
                                 f"{shape_str(arrays['Wq'].shape)} {arrays['Wq'].dtype}: needs {shape_str(want)} "
                                 f"{arrays['Wq'].dtype} (Wq, Wk, Wv, Wo square (d, d), biases (d,))")
        if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
            raise ValueError(f"MultiHeadAttention: heads must be a positive int, got {heads!r}")
        if d % int(heads):
            raise ValueError(f"MultiHeadAttention: d = {d} is not divisible by heads = {int(heads)} "
                             f"(each head takes d/heads features)")
        self._flags = flags
        self._arrays = {n: arrays[n] for n in self.names}
        self._heads, self._causal = int(heads), bool(causal)

    d = n_in = n_out = property(lambda self: self._arrays["Wq"].shape[0], doc="the model width d")
    heads = property(lambda self: self._heads)
    causal = property(lambda self: self._causal)
    in_shape = out_shape = property(lambda self: (self.d,), doc="per token: ``(d,)`` (inputs ``(B, T, d)``)")
    dtype = property(lambda self: self._arrays["Wq"].dtype)

    Wq = property(lambda self: self._arrays["Wq"], doc="``(d, d)``: q = x Wq + bq")
    Wk = property(lambda self: self._arrays["Wk"], doc="``(d, d)``")
    Wv = property(lambda self: self._arrays["Wv"], doc="``(d, d)``")
    Wo = property(lambda self: self._arrays["Wo"], doc="``(d, d)``: y = O Wo + bo")
    bq = property(lambda self: self._arrays.get("bq"), doc="``(d,)``, or None without a bias")
    bk = property(lambda self: self._arrays.get("bk"), doc="``(d,)``, or None")
    bv = property(lambda self: self._arrays.get("bv"), doc="``(d,)``, or None")
    bo = property(lambda self: self._arrays.get("bo"), doc="``(d,)``, or None")
    bias = property(lambda self: self._flags, doc="``(q, k, v, out)``: which projections have a bias")

    def leaf_names(self) -> list[tuple[str, tuple]]:
        """``[(leaf, (weight, bias) or (weight,))]`` in ``params`` order: q, k, v, out (module text)."""
        return [(leaf, (f"W{leaf[0]}", f"b{leaf[0]}")[:1 + f]) for leaf, f in zip(_LEAVES, self._flags)]

    @property
    def names(self) -> tuple:
        """Leaf by leaf (q, k, v, out): its weight, then its bias where it has one."""
        return tuple(n for _, ns in self.leaf_names() for n in ns)

    @property
    def params(self) -> list:
        return [self._arrays[n] for n in self.names]

    def spec(self) -> dict:
        s = {"kind": self.kind, "heads": self._heads, "causal": self._causal}
        if all(self._flags):
            return s
        return dict(s, bias=False if not any(self._flags) else list(self._flags))

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "MultiHeadAttention":
        """The layer of a file: ``spec`` (``spec()``'s fields) and the arrays by name."""
        bias = spec.get("bias", True)
        return cls(params["Wq"], params["Wk"], params["Wv"], params["Wo"], spec["heads"], params.get("bq"),
                   params.get("bk"), params.get("bv"), params.get("bo"), causal=spec["causal"],
                   bias=bias if isinstance(bias, bool) else tuple(bias))

    @classmethod
    def file_names(cls, spec: dict) -> tuple:
        """The arrays a file stores: the four weights, and the biases its spec's ``bias`` says."""
        bias = spec.get("bias", True)
        flags = (bias,) * 4 if isinstance(bias, bool) else tuple(bias)
        if len(flags) != 4 or not all(isinstance(f, bool) for f in flags):
            raise ValueError(f"multihead_attention: bias is {bias!r}; needs true, false or four of them (q, k, v, out)")
        return tuple(n for leaf, f in zip(_LEAVES, flags) for n in (f"W{leaf[0]}", f"b{leaf[0]}")[:1 + f])

    @classmethod
    def file_widths(cls, where: str, shapes: dict) -> tuple[int, int]:
        """``(d, d)`` from a file's declared shapes ``{name: (shape, file key)}``; a ``ValueError`` naming
        the key of a shape that cannot be this layer's."""
        d = shapes["Wq"][0][0] if len(shapes["Wq"][0]) == 2 else -1
        for name, (shape, key) in shapes.items():
            want = (d, d) if name[0] == "W" else (d,)
            if tuple(shape) != want or d < 1:
                raise ValueError(f"{where} (multihead_attention): array {key!r} has shape {shape_str(shape)}; "
                                 f"needs {shape_str(want) if d > 0 else '(d, d)'}")
        return d, d

    def __repr__(self) -> str:
        bias = "" if all(self._flags) else f", bias={False if not any(self._flags) else self._flags}"
        return f"MultiHeadAttention(d={self.d}, heads={self._heads}{', causal' if self._causal else ''}{bias})"

    # ------------------------------------------------------------------ buffers
    def _lead(self, B) -> tuple[int, int]:
        if not isinstance(B, (tuple, list)) or len(B) != 2:
            raise ValueError(f"{self!r}: buffer shapes need the token batch (B, T), got {B!r}")
        return int(B[0]), int(B[1])

    def forward_shapes(self, B) -> list:
        """For a token batch ``B = (B, T)``: ``y (B, T, d)``, ``Q, K, V (B, h, T, d_h)``, ``P (B, h, T, T)``, ``O (B, T, d)``."""
        B, T = self._lead(B)
        h, d = self._heads, self.d
        heads = (B, h, T, d // h)
        return [(B, T, d), heads, heads, heads, (B, h, T, T), (B, T, d)]

    def backward_shapes(self, B, input_grad: bool = True) -> list:
        """``∂L/∂Q, ∂L/∂K, ∂L/∂V: (B, T, d)``, then ``∂L/∂x: (B, T, d)`` with ``input_grad``."""
        B, T = self._lead(B)
        return [(B, T, self.d)] * (4 if input_grad else 3)

    # ------------------------------------------------------------------ passes
    def _where(self, where) -> str:
        return f"{where if isinstance(where, str) else f'layer {where}'} ({self!r})"

    def _check_input(self, z, where):
        xp = get_xp(z, self._arrays["Wq"])
        z = float_array(z, f"{self._where(where)}: x", xp)
        if z.ndim != 3 or z.shape[2] != self.d or z.shape[1] < 1:
            raise ValueError(f"{self._where(where)}: x has shape {shape_str(z.shape)}; needs (B, T, {self.d}) "
                             f"with T ≥ 1 (batch_first, d = {self.d})")
        if z.dtype != self.dtype:
            raise TypeError(f"{self._where(where)}: x is {z.dtype} but the layer is {self.dtype}; cast one of them")
        return z, xp

    def _check_mask(self, mask, B: int, T: int, xp, where):
        if mask is None:
            return None
        mask = asarray(mask) if is_foreign_array(mask) else mask
        if not hasattr(mask, "dtype") or get_xp(mask, self._arrays["Wq"]) is not xp:
            mask = xp.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"{self._where(where)}: key_padding_mask has dtype {mask.dtype}; needs bool "
                            f"(True = masked key, torch's convention)")
        if mask.shape != (B, T):
            raise ValueError(f"{self._where(where)}: key_padding_mask has shape {shape_str(mask.shape)} but x is "
                             f"({B}, {T}, {self.d}): needs ({B}, {T})")
        return mask

    def forward(self, z, check=None, where: Any = 0, out=None, key_padding_mask: Any = None):
        """``x: (B, T, d) -> y: (B, T, d)``; returns ``(y, state)``, ``state = (x, Q, K, V, P, O)``.
        ``out``: the buffers of ``forward_shapes((B, T))``; ``key_padding_mask: (B, T)`` bool."""
        z, xp = self._check_input(z, where)
        B, T, d = z.shape
        mask = self._check_mask(key_padding_mask, B, T, xp, where)
        y, Q, K, V, P, O = out if out is not None else [xp.empty(s, self.dtype) for s in self.forward_shapes((B, T))]
        a = self._arrays
        for buf, n in ((Q, "q"), (K, "k"), (V, "v")):
            proj = matmul(z, a[f"W{n}"])
            if f"b{n}" in a:
                proj += a[f"b{n}"]
            xp.copyto(buf, split_heads(proj, self._heads))
        attention_weights(Q, K, 1.0 / math.sqrt(d // self._heads), self._causal, mask, out=P)
        xp.copyto(O, merge_heads(matmul(P, V)))
        matmul_into(O, a["Wo"], y)
        if "bo" in a:
            y += a["bo"]
        if check is not None:
            check(y, f"{self._where(where)}: output")
        return y, (z, Q, K, V, P, O)

    def factor(self, state) -> AttentionFactor:
        """``∂y/∂x`` per sample, a structured ``AttentionFactor`` on ``(B, T·d)`` rows."""
        _, Q, K, V, P, _ = state
        a = self._arrays
        return AttentionFactor(a["Wq"], a["Wk"], a["Wv"], a["Wo"], P, Q, K, V, 1.0 / math.sqrt(self.d // self._heads))

    def backward(self, state, g, grads: Sequence[Any], input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g = ∂L/∂y: (B, T, d)`` (only read); writes every parameter gradient into ``grads`` (``params``
        order); returns ``(∂L/∂x or None, (Δq, Δk, Δv, g))`` — the four leaves' ``Δ`` (module text).
        ``sq: (B,)`` gets each sample's ``Σ_leaves ‖A_iᵀΔ_i‖² + ‖Σ_t Δ_i,t‖²`` added."""
        xp = get_xp(g, self._arrays["Wq"])
        x = state[0]
        g = float_array(g, f"{self._where(where)}: grad_y", xp)
        if g.shape != x.shape:
            raise ValueError(f"{self._where(where)}: grad_y has shape {shape_str(g.shape)}; the forward pass "
                             f"had x {shape_str(x.shape)}: needs the same shape")
        gx, deltas = self.factor(state).vjp_parts(g)
        if out is not None:
            deltas = tuple(xp.copyto(o, dl) or o for o, dl in zip(out[:3], deltas[:3])) + (g,)
            if input_grad:
                gx = xp.copyto(out[3], gx) or out[3]
        d = self.d
        at = 0
        for leaf, A, D in zip(self.param_leaves(), self.param_input(state), deltas):
            matmul_into(A.reshape(-1, d).T, D.reshape(-1, d), grads[at])
            if leaf.bias:
                D.sum(axis=(0, 1), out=grads[at + 1])
            if sq is not None:
                sq += leaf.sq_norms(A, D)  # the leaf algebra's own (its "auto" cost rule)
            at += leaf.n_arrays
        if check is not None:
            for n, D in zip(_LEAVES, deltas):
                check(D, f"{self._where(where)}: ∂L/∂({n} projection)")
        return (gx if input_grad else None), deltas

    def param_leaves(self) -> list:
        """Four token-wise Dense leaves, each with a bias where its projection has one
        (``param_leaves.TokenDenseLeaf``, the layer protocol's leaf algebra): q, k, v, out, paired with
        ``param_input``'s ``(x, x, x, O)``."""
        from ..protocol.leaves import TokenDenseLeaf

        return [TokenDenseLeaf(bias=f) for f in self._flags]

    def param_input(self, state) -> tuple:
        """The ``A`` of each leaf, q, k, v, out: ``(x, x, x, O)``, each ``(B, T, d)`` (module text)."""
        x, O = state[0], state[5]
        return x, x, x, O

    def param_jvp(self, state, dirs: Sequence[Any]):
        """``ẏ: (B, T, d)``, the output's tangent along parameter directions ``dirs`` (``params``
        shapes and order): each leaf adds ``A Ẇ + ḃ`` at its output point (``Q̇ = x Ẇq + ḃq``, …,
        ``ẏ = Ȯ Wo + O Ẇo + ḃo``) inside the factor's ``param_jvp`` (Gauss–Newton products)."""
        A = self.param_input(state)
        dirs = list(dirs)
        at = np.cumsum([0] + [1 + f for f in self._flags])  # leaf i's first array in dirs

        def leaf_tangent(i, base):
            out = matmul(A[i], dirs[at[i]])
            if self._flags[i]:
                out += dirs[at[i] + 1]
            return out if base is None else out + base

        return self.factor(state).param_jvp(None, leaf_tangent)

    # ------------------------------------------------------------------ torch
    def to_torch(self):
        """A torch ``nn.MultiheadAttention(d, heads, batch_first=True)`` with copies of
        the weights (same dtype; the causal mask is an argument of torch's forward, not of the module)."""
        import torch

        from ..core.backend import to_numpy

        a = self._arrays
        if len(set(self._flags)) > 1:
            raise ValueError(f"to_torch: {self!r} has biases on some projections only ({self._flags}); "
                             f"nn.MultiheadAttention has all four or none")
        dt = getattr(torch, str(self.dtype))
        m = torch.nn.MultiheadAttention(self.d, self._heads, bias=self._flags[0], batch_first=True, dtype=dt)
        t = lambda x: torch.from_numpy(np.ascontiguousarray(to_numpy(x)))  # noqa: E731
        with torch.no_grad():
            m.in_proj_weight.copy_(torch.cat([t(a["Wq"]).T, t(a["Wk"]).T, t(a["Wv"]).T]))
            m.out_proj.weight.copy_(t(a["Wo"]).T)
            if self._flags[0]:
                m.in_proj_bias.copy_(torch.cat([t(a["bq"]), t(a["bk"]), t(a["bv"])]))
                m.out_proj.bias.copy_(t(a["bo"]))
        return m


register_layer("multihead_attention", MultiHeadAttention)


"""The judged nodes of a traced model (``torch_graph.Capture``) made into jacgrad layers: the walk
back from the output into a chain of layers and residual blocks, the checks that the graph is
such a chain and uses each parameter once, and the layers themselves (their parameters copied or
viewed as in ``Sequential.from_torch``).
"""

from __future__ import annotations

import numpy as np

from ..nn.layers import Activation, Dense, LayerNorm, Residual, RMSNorm
from ..conv.batchnorm import BatchNorm1d, BatchNorm2d
from ..conv.layers import Conv1d, Conv2d
from ..conv.pools import Flatten
from ..conv.prelu import PReLU
from .explain import unsupported_error
from .ops_tokens import TOKEN_LAYERS

__all__ = ["build_layers"]

_NOT_A_CHAIN = ("jacgrad networks are chains of layers and residual blocks x + s·f(x) or p(x) + s·f(x); "
                "concatenated skips, a value used by two branches that do not join in one add, and several outputs "
                "are not supported (no general DAG of factors)")


def build_layers(cap, copy: bool, dtype) -> None:
    """Fill ``cap.layers``, ``cap.sources``, ``cap.origin`` and the rows' labels, or raise: one
    ``TypeError`` for every node no layer takes (an unsupported op, or a supported one out of
    place), the walk's reason when the graph is not a chain, a ``ValueError`` for a shared parameter."""
    op_level = bool(cap.explanation().unsupported)
    problems: list = []
    try:
        start, end = _ends(cap)
        walk = _Walk(cap)
        items = walk.sequence(end, start)
        walk.check_covered(start, end)
        specs = _specs(items, problems)
    except TypeError as exc:
        if not op_level:
            raise
        raise unsupported_error(cap.explanation(), note=str(exc)) from None
    for node, reason in problems:
        cap.labels[node] = f"unsupported: {reason}"
    if cap.explanation().unsupported:
        raise unsupported_error(cap.explanation())
    # a parameter in several places (a re-used module, tied weights) is read once by _Convert: ONE
    # shared jacgrad parameter (protocol.sharing), its gradient summed over the uses
    from ..io.interop.torch_blocks import _Convert, _dtype
    from ..io.interop.torch import cast_dtype, origin
    from ..core.backend import asarray, get_xp

    cast = cast_dtype(dtype)
    params = [cap.tensor(n) for n in cap.graph.nodes if n.op == "placeholder" and n.name in cap.param_names]
    xp = np if not params or params[0].device.type == "cpu" else get_xp(asarray(params[0].detach()))
    conv = _Convert(copy, cast, xp, cast if cast is not None else _dtype(params), {})
    cap.layers = _layers(cap, specs, "", conv)
    if cap.in_shape is not None and len(cap.in_shape) == 2 and getattr(cap.layers[0], "per_token", False):
        other = [L for L in cap.layers if not getattr(L, "per_token", False)]
        if other:
            raise TypeError(f"{cap.name}: the example input is a token batch (B, {', '.join(map(str, cap.in_shape))}) "
                            f"but {other[0]!r} does not act per token: a token axis flattened away is not supported")
        cap.in_shape = None  # a token batch (B, T, d): the layers act per token
    if cap.in_shape is not None and not _takes_images(cap.layers[0]):
        shape = ", ".join(map(str, cap.in_shape))
        raise TypeError(f"{cap.name}: the example input is (B, {shape}) but the first layer "
                        f"is {cap.layers[0]!r}: jacgrad takes (B, n) inputs, or images into a convolution, pool, "
                        f"BatchNorm or Flatten (per-token (B, T, d) layers come with the token axis)")
    modules = {}
    for name, _ in cap.sources:
        if name is None:
            continue
        prefix = name.rpartition(".")[0]
        m = cap.model.get_submodule(prefix)
        modules.setdefault(id(m), (f"{prefix or 'the model'} ({type(m).__name__})", m))
    cap.origin = origin(list(modules.values()), copy, "jg.from_torch")


def _place(cap, node) -> str:
    module, source = cap._where[node]
    return f"{node.name} ({', '.join(v for v in (module, source) if v)})"


def _ends(cap):
    (start,) = [n for n in cap.graph.nodes if n.op == "placeholder" and n in cap.data]
    (out,) = [n for n in cap.graph.nodes if n.op == "output"]
    results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    if len(results) != 1:
        raise TypeError(f"{cap.name} returns {len(results)} outputs ({', '.join(str(r) for r in results)}); a jacgrad "
                        f"network has one: return one tensor (B, n_out)")
    end = results[0]
    if not cap.is_data(end) or end is start:
        raise TypeError(f"{cap.name} returns {'its input' if end is start else 'a value not computed from its input'}: "
                        f"nothing to import")
    if len(cap.shape(end)) not in (2, 3):
        raise TypeError(f"{cap.name} returns a {cap.shape(end)} tensor: jacgrad networks give (B, n_out) outputs, "
                        f"or (B, T, n_out) per token")
    return start, end


class _Walk:
    """The walk back from the output: each node's one data input, and at a residual join, the
    branch down to the operand it starts from."""

    def __init__(self, cap):
        self.cap, self.visited, self.skips = cap, set(), {}
        self.ancestors: dict = {}
        self.order = {n: i for i, n in enumerate(cap.graph.nodes)}
        for n in cap.graph.nodes:
            if n in cap.data:
                up = set()
                for i in n.all_input_nodes:
                    if i in cap.data:
                        up |= {i} | self.ancestors[i]
                self.ancestors[n] = up

    def sequence(self, end, start) -> list:
        """Items from ``start`` (exclusive) to ``end`` in forward order: ``(node, piece)`` or
        ``("residual", join, scale nodes, scale, inner items, shortcut items or None)``."""
        cap, items, n = self.cap, [], end
        while n is not start:
            if n.op != "call_function":
                raise TypeError(f"{cap.name}: the walk back from the output reached {n.name} before the input; "
                                f"{_NOT_A_CHAIN}")
            self.visited.add(n)
            piece = cap.pieces[n]
            if piece.kind == "unsupported" and len(piece.data) != 1:
                raise TypeError(f"{cap.name}: the walk back from the output stops at node {_place(cap, n)}, which "
                                f"reads {len(piece.data)} values computed from the input")
            if piece.kind != "add":
                items.append((n, piece))
                n = piece.data[0]
                continue
            (a, b), alpha = piece.data, piece.info["alpha"]
            short = None
            if b is not a and b in self.ancestors[a]:
                skip, branch, scale = b, a, 1.0 if alpha == 1.0 else None
            elif a in self.ancestors[b]:
                skip, branch, scale = a, b, alpha
            else:  # two branches from one value: a projection shortcut p(x) + s·f(x) (a ResNet's downsample)
                skip = self._fork(a, b)
                if skip is None:
                    raise TypeError(f"{cap.name}: node {_place(cap, n)} adds two values that are not computed from "
                                    f"one value; {_NOT_A_CHAIN}")
                branch, short, scale = self._branch_and_shortcut(a, b, alpha)
            if scale is None:
                raise TypeError(f"{cap.name}: node {_place(cap, n)} scales the skip, not the branch "
                                f"(f(x) − x or f(x) + c·x); jacgrad's Residual is x + s·f(x)")
            scales = []
            while cap.pieces.get(branch) is not None and cap.pieces[branch].kind == "scale":
                scales.append(branch)
                self.visited.add(branch)
                scale *= cap.pieces[branch].info["scale"]
                branch = cap.pieces[branch].data[0]
            if branch is skip:
                raise TypeError(f"{cap.name}: node {_place(cap, n)} adds a value to a multiple of itself: no layer")
            self.skips[skip] = self.skips.get(skip, 0) + 1
            shortcut = None if short is None else self.sequence(short, skip)
            items.append(("residual", n, scales, scale, self.sequence(branch, skip), shortcut))
            n = skip
        return items[::-1]

    def _fork(self, a, b):
        """The latest value both ``a`` and ``b`` are computed from (None: none)."""
        common = (self.ancestors[a] | {a}) & (self.ancestors[b] | {b})
        return max(common, key=self.order.__getitem__) if common else None

    def _branch_and_shortcut(self, a, b, alpha: float):
        """``(branch, shortcut, scale)`` of ``a + alpha·b`` from one fork: the scaled operand is the branch
        (``alpha`` ≠ 1, or a multiplication by a constant at its end); else the longer one."""
        if alpha != 1.0:
            return b, a, alpha
        scaled = [x for x in (a, b) if self.cap.pieces.get(x) is not None and self.cap.pieces[x].kind == "scale"]
        if len(scaled) == 1:
            return scaled[0], (b if scaled[0] is a else a), 1.0
        return (a, b, 1.0) if len(self.ancestors[a]) >= len(self.ancestors[b]) else (b, a, 1.0)

    def check_covered(self, start, end) -> None:
        """Every node computed from the input is on the chain, and each is read only by the chain."""
        cap = self.cap
        for n in cap.graph.nodes:
            if n in cap.data and n is not start and n not in self.visited and cap.pieces[n].kind != "inert":
                raise TypeError(f"{cap.name}: node {_place(cap, n)} is not on the path to the output; {_NOT_A_CHAIN}")
        owner = lambda u: cap.pieces[u].info.get("owner", u) if u in cap.pieces else u  # noqa: E731  a block's part
        for n in self.visited | {start}:
            readers = [u for u in dict.fromkeys(map(owner, n.users))
                       if u.op == "output" or cap.pieces[u].kind != "inert"]
            if len(readers) != 1 + self.skips.get(n, 0):
                raise TypeError(f"{cap.name}: the value of node {n.name} is read by {len(readers)} nodes "
                                f"({', '.join(u.name for u in readers)}); {_NOT_A_CHAIN}")


def _specs(items, problems: list) -> list:
    """The layers of walked ``items`` as plain specs (a Dense absorbs the bias and activation
    after it; residual items keep their inner specs); a node that fits nowhere goes to ``problems``."""
    specs: list = []
    for item in items:
        if item[0] == "residual":
            _, join, scales, scale, inner, short = item
            specs.append(("residual", join, scales, scale, _specs(inner, problems),
                          None if short is None else _specs(short, problems)))
            continue
        node, piece = item
        last = specs[-1] if specs and isinstance(specs[-1], dict) else None
        if piece.kind == "structural":
            continue
        if piece.kind == "unsupported":  # listed already; what follows it fuses with nothing
            specs.append({"kind": "unsupported"})
        elif piece.kind == "dense":
            specs.append({"kind": "dense", "params": dict(piece.params), "act": None, "nodes": [node]})
        elif piece.kind == "bias" and last and last["kind"] == "dense" and "b" not in last["params"] \
                and last["act"] is None:
            last["params"].update(piece.params)
            last["nodes"].append(node)
        elif piece.kind == "prelu":
            specs.append({"kind": "prelu", "params": dict(piece.params), "nodes": [node]})
        elif piece.kind in ("conv", "batchnorm"):
            specs.append({"kind": piece.kind, "params": dict(piece.params), "info": piece.info, "act": None,
                          "nodes": [node]})
        elif piece.kind == "pool":  # a mean over H, W without keepdim: the pool and a Flatten
            specs += [{"kind": "pool", "params": {}, "make": make, "nodes": [node]} for make in piece.info["make"]]
        elif piece.kind == "flatten":
            specs.append({"kind": "flatten", "params": {}, "nodes": [node]})
        elif piece.kind == "act" and last and last["kind"] in ("dense", "conv", "batchnorm") and last["act"] is None:
            last["act"] = piece.info["name"]
            last["nodes"] += [node, *piece.info.get("parts", ())]
        elif piece.kind == "act":  # after a norm, a residual join or another activation: a layer of its own
            specs.append({"kind": "activation", "act": piece.info["name"], "params": {},
                          "nodes": [node, *piece.info.get("parts", ())]})
        elif piece.kind in TOKEN_LAYERS:
            specs.append({"kind": piece.kind, "params": dict(piece.params), "info": piece.info,
                          "nodes": [node, *piece.info.get("parts", ())]})
        elif piece.kind == "layer":  # one layer its op reader makes (ops_vit: the token layers)
            specs.append({"kind": "layer", "params": dict(piece.params), "make": piece.info["make"], "nodes": [node]})
        elif piece.kind in ("layernorm", "rmsnorm"):
            specs.append({"kind": piece.kind, "params": piece.params, "info": piece.info, "nodes": [node]})
        else:
            problems.append((node, {
                "bias": "a bias added where it is not the first thing after a bias-free matrix product",
                "scale": "a multiplication by a constant outside the end of a residual branch: no layer",
            }[piece.kind]))
    return specs


def _layers(cap, specs, prefix: str, conv, first: int = 0) -> list:
    """The jacgrad layers of ``specs``, labelling their nodes' rows with the layer each became
    (numbered from ``first``: a shortcut's continue its block's inner layers')."""
    out = []
    for spec in specs:
        at = f"layer {prefix}{first + len(out)}"
        if isinstance(spec, tuple):
            _, join, scales, scale, inner, short = spec
            inner_layers = _layers(cap, inner, f"{prefix}{len(out)}.", conv)
            if short is not None and not short:
                raise TypeError(f"{cap.name}: the residual join {_place(cap, join)} has a shortcut of no layers")
            short_layers = None if short is None else _layers(cap, short, f"{prefix}{len(out)}.", conv,
                                                               first=len(inner_layers))
            layer = Residual(inner_layers, scale, short_layers)
            what = "" if short is None else ", projection shortcut"
            for n in [join] + scales:
                role = " (its join)" if n is join else " (its scale)"
                cap.labels[n] = f"{at}: Residual(scale={scale:g}{what}){role}"
        else:
            roles = {"dense": ("W", "b") if "b" in spec["params"] else ("W",), "layernorm": ("gamma", "beta"),
                     "rmsnorm": ("gamma",), "prelu": ("weight",),
                     "activation": (), "pool": (), "flatten": (), "attention": ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"),
                     "transpose_tokens": ()}.get(spec["kind"])
            if roles is None:  # conv, batchnorm: only the parameters torch has (no zeros/ones added)
                roles = tuple(spec["params"])
            elif spec["kind"] in ("dense", "layernorm", "rmsnorm", "attention"):  # a bias-free Linear, a norm without affine
                roles = tuple(r for r in roles if spec["params"].get(r) is not None)  # parameters: only torch's
            spec.update(cap=cap, at=at)
            arrays = {role: _array(cap, conv, spec["params"].get(role), f"{at} ({role})") for role in roles}
            layer = _activation(cap, spec) if spec["kind"] == "activation" else _make(spec, arrays, conv)
            for n in spec["nodes"]:
                cap.labels[n] = f"{at}: {layer!r}"
        out.append(layer)
    return out


def _activation(cap, spec) -> Activation:
    """An activation layer of its own: on ``(B, n)`` (or tokens) its width, on images its ``(C, H, W)``."""
    shape = cap.shape(spec["nodes"][0])
    if len(shape) > 2 and cap.in_shape is not None:
        return Activation(spec["act"], in_shape=shape[1:])
    return Activation(spec["act"], shape[-1])


def _takes_images(L) -> bool:
    """Whether the layer ``L`` takes the images ``(B, C, …)`` of an image input."""
    if getattr(L, "branch", None) is not None:
        return _takes_images(L.branch[0])
    return type(L).__module__.startswith("jacgrad.conv") or len(tuple(getattr(L, "in_shape", None) or ())) > 1


def _array(cap, conv, param, what: str):
    """The array of ``param`` (``(placeholder, transposed)``), recorded in ``cap.sources``; None
    (recorded as ``(None, False)``) where torch has no parameter and jacgrad makes zeros or ones."""
    if param is None:
        cap.sources.append((None, False))
        return None
    placeholder, transposed, *cols = param  # cols: jacgrad's columns (lo, hi) of a fused projection (token_graph)
    t = cap.tensor(placeholder)
    name = cap.param_names[placeholder.name]
    cap.sources.append((name, transposed))
    t = t.T if transposed else t
    if cols:
        (lo, hi), = cols
        t, name = (t[:, lo:hi], f"{name}[{lo}:{hi}]ᵀ") if t.ndim == 2 else (t[lo:hi], f"{name}[{lo}:{hi}]")
    return conv(t, f"{what}: the torch parameter {name!r}")


def _make(spec: dict, a: dict, conv):
    kind, info = spec["kind"], spec.get("info", {})
    if kind == "conv":
        cls = Conv1d if info["dims"] == 1 else Conv2d
        return cls(a["W"], a.get("b"), stride=info["stride"], padding=info["padding"], dilation=info["dilation"],
                   groups=info["groups"], activation=spec["act"] or "identity")
    if kind == "batchnorm":
        cls = BatchNorm1d if info["dims"] == 1 else BatchNorm2d
        mean, var = (conv(spec["cap"].tensor(ph), f"{spec['at']}: {spec['cap'].buffer_names[ph.name]!r}")
                     for ph in info["stats"])
        return cls(a.get("weight"), a.get("bias"), mean, var, eps=info["eps"], activation=spec["act"] or "identity")
    if kind in TOKEN_LAYERS:
        return TOKEN_LAYERS[kind](a, info)
    if kind == "pool":
        return spec["make"]()
    if kind == "layer":
        return spec["make"](a)
    if kind == "prelu":
        return PReLU(a["weight"])
    if kind == "flatten":
        return Flatten()
    if spec["kind"] == "dense":
        return Dense(a["W"], a.get("b"), spec["act"] or "identity", bias="b" in a)  # Linear(bias=False): no bias
    n, eps = spec["info"]["width"], spec["info"]["eps"]
    # torch's elementwise_affine=False: a norm without parameters, its scale the constant ones;
    # LayerNorm(bias=False): γ without β (a weight without a bias: torch has no other case)
    affine = a.get("gamma") is not None
    gamma = a["gamma"] if affine else conv.ones(n)
    if spec["kind"] == "layernorm":
        if not affine and a.get("beta") is not None:
            raise TypeError(f"{spec['at']}: a layer_norm with a bias but no weight: jacgrad's LayerNorm has γ with β, "
                            f"γ alone, or neither")
        return LayerNorm(gamma, a.get("beta"), eps=eps, bias=a.get("beta") is not None, affine=affine)
    return RMSNorm(gamma, eps=eps if eps is not None else float(np.finfo(gamma.dtype).eps), affine=affine)

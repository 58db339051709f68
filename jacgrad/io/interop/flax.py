"""Flax: the parameters of a ``flax.linen`` stack of ``Dense`` layers as a ``NetSpec``.

``params`` is the dict ``model.init(...)`` returns, with or without its top ``'params'`` key:
``{'Dense_0': {'kernel': (in, out), 'bias': (out,)}, 'Dense_1': {...}, ...}``. A Dense kernel is
already ``(H_{j-1}, H_j)``, jacgrad's layout; a missing ``bias`` (``use_bias=False``) is a None in
the spec's ``biases``: a bias-free layer (``Sequential.from_flax`` makes it ``Dense(W, bias=False)``,
so P is flax's; ``MLP.from_flax`` refuses it, naming the layer), never a zero bias that would be a
parameter flax does not have.
Layers are taken in the numeric order of their names' suffix (``Dense_10`` after ``Dense_9``),
which is flax's order of creation; names without a numeric suffix (``nn.Dense(name="fc")``)
have no order to read, and are an error. So are names with several prefixes (``Dense_0``,
``Dense_1``, ``Head_0``): flax numbers each prefix on its own, so the numbers say nothing about
the order between ``Dense_1`` and ``Head_0``. Plain dicts (or flax's FrozenDict) of NumPy or JAX
arrays are enough: no flax install is needed. Activations are not stored in flax parameters,
so the caller gives them: one name, or one per Dense layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ...core.backend import asarray
from . import NetSpec, Origin

__all__ = ["spec_from_flax"]

_NUMBERED = re.compile(r"^(.*)_(\d+)$")


def spec_from_flax(params, activations, copy: bool = True) -> NetSpec:
    """A ``NetSpec`` of flax Dense parameters (see the module docstring)."""
    if not isinstance(params, Mapping):
        raise TypeError(f"from_flax takes a dict of layer parameters, not {type(params).__name__}")
    if set(params) == {"params"}:
        params = params["params"]
    order = []
    for key in params:
        m = _NUMBERED.match(str(key))
        if m is None:
            raise ValueError(f"flax layer {key!r} has no numeric suffix (like 'Dense_0'), so its place in the stack "
                             f"is unknown; layers: {', '.join(map(str, params))}")
        order.append((int(m.group(2)), key))
    prefixes = sorted({_NUMBERED.match(str(key)).group(1) for key in params})
    if len(prefixes) > 1:
        raise ValueError(f"flax layers {', '.join(map(str, params))} have several name prefixes ({', '.join(prefixes)}): "
                         f"flax numbers each prefix on its own, so their order in the stack is unknown; rename them "
                         f"with one prefix in layer order (e.g. Dense_0, Dense_1, ...)")
    order.sort()
    if not order:
        raise ValueError("the flax parameters hold no layers")
    weights, biases = [], []
    for _, key in order:
        layer = params[key]
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise ValueError(f"flax layer {key!r} has no 'kernel' (is it a Dense layer?)")
        extra = set(layer) - {"kernel", "bias"}
        if extra:
            raise ValueError(f"flax layer {key!r} has {', '.join(sorted(extra))} besides kernel and bias: not a Dense layer")
        W = asarray(layer["kernel"])
        if W.ndim != 2:
            raise ValueError(f"flax layer {key!r}: kernel has shape {tuple(W.shape)}, not (in, out)")
        b = asarray(layer["bias"]) if "bias" in layer else None
        if b is not None and tuple(b.shape) != (W.shape[1],):
            raise ValueError(f"flax layer {key!r}: bias has shape {tuple(b.shape)} but its kernel {tuple(W.shape)} "
                             f"has {W.shape[1]} outputs")
        if b is not None and b.dtype != W.dtype:
            raise TypeError(f"flax layer {key!r}: bias has dtype {b.dtype} but its kernel {W.dtype}; use one dtype")
        if copy:
            W, b = W.copy(), (None if b is None else b.copy())
        weights.append(W)
        biases.append(b)
    names = [activations] * len(weights) if isinstance(activations, str) else list(activations)
    if len(names) != len(weights):
        raise ValueError(f"got {len(names)} activations for {len(weights)} Dense layers ({', '.join(k for _, k in order)})")
    return NetSpec(weights, biases, names, source="flax params", origin=Origin("flax"))

"""The table of gates and their local gradients, one row per gate, as in the backprop notes.

A gate computes one output from its inputs; its VJP takes the gradient ``g`` on that output and
returns the gradient on every input — the gate multiplies ``g`` into its local gradients (chain
rule). Each row gives the forward rule ``f(xp, *inputs)`` and the backward rule
``df(xp, g, out, *inputs)``, which may reuse the forward output ``out`` (``exp``: ``g·out``).

Conventions:

- Inputs are float32/float64 arrays (NumPy or CuPy) or Python numbers; every returned gradient
  has its input's shape. Inputs of elementwise gates broadcast, and the gradient of a
  broadcast input is summed back to its shape (``add(x (B, H), b (H,))`` gives ``∂b: (H,)``).
- The constants of ``add_const`` (``f = c + x``), ``scale`` (``f = a·x``) and ``pow``
  (``f = x^p``) are keyword parameters, not inputs: as in the notes these are unary gates and
  the VJP returns one gradient. For a gradient on the constant, use the binary ``add``/``mul``.
- ``max``/``min`` route ``g`` to the larger/smaller input; at a tie each input gets ``g/2``,
  as ``torch.maximum``/``torch.minimum`` do. ``relu`` passes no gradient at 0, as ``torch.relu``.
- ``matmul`` follows cs231n: ``D = W·X`` with ``W: (M, K)``, ``X: (K, N)``, ``D: (M, N)``;
  ``dW = dD·Xᵀ``, ``dX = Wᵀ·dD``.
- ``sum``/``mean`` take ``axis`` (None, an int or a tuple); ``softmax`` is over the last axis.

    >>> from jacgrad import gates
    >>> mul = gates.get("mul")
    >>> mul.forward(3.0, -4.0), mul.vjp(2.0, 3.0, -4.0)   # the mul gate swaps its inputs
    (-12.0, (-8.0, 6.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from ._validate import float_array, shape_str
from .backend import get_xp

__all__ = ["GATES", "Gate", "get", "names"]


def _shape(a: Any) -> tuple:
    return tuple(getattr(a, "shape", ()))


def _unbroadcast(d, shape: tuple):
    """``d`` summed over the axes that broadcasting added or stretched, back to ``shape``."""
    d_shape = _shape(d)
    if d_shape == shape:
        return d
    lead = len(d_shape) - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and d_shape[lead + i] != 1)
    return d.sum(axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)


@dataclass(frozen=True)
class Gate:
    """One row of the table: ``name``, ``arity``, the textbook ``formula`` and its two rules.

    ``f(xp, *inputs, **params)`` is the forward rule and ``df(xp, g, out, *inputs, **params)``
    the backward rule (one gradient per input). ``required``/``optional`` name the keyword
    parameters. Call ``forward`` and ``vjp``: they check the inputs and shapes, then apply
    the rules.
    """

    name: str
    arity: int
    formula: str
    f: Callable
    df: Callable
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    def _inputs(self, inputs: tuple, params: dict):
        if len(inputs) != self.arity:
            raise TypeError(f"gate {self.name!r} takes {self.arity} input(s); got {len(inputs)}")
        unknown = sorted(set(params) - set(self.required) - set(self.optional))
        missing = [p for p in self.required if p not in params]
        if unknown or missing:
            problems = [f"{what} keyword parameter(s) {', '.join(which)}"
                        for what, which in (("missing", missing), ("unknown", unknown)) if which]
            valid = ", ".join(self.required + self.optional) or "none"
            raise TypeError(f"gate {self.name!r}: {'; '.join(problems)}; its keyword parameters are: {valid}")
        for p in self.required:
            if isinstance(params[p], bool) or not isinstance(params[p], (int, float)):
                raise TypeError(f"gate {self.name!r}: {p} must be a real number; got {params[p]!r}")
        xp = get_xp(*inputs)
        return xp, tuple(self._number_or_array(x, f"input {i} of gate {self.name!r}", xp)
                         for i, x in enumerate(inputs))

    @staticmethod
    def _number_or_array(x: Any, what: str, xp):
        # Python numbers stay Python floats: NumPy treats them as weak, so float32 stays float32.
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
        return float_array(x, what, xp)

    def forward(self, *inputs: Any, **params: Any):
        """The gate's output for ``inputs`` (``arity`` of them) and keyword ``params``."""
        xp, inputs = self._inputs(inputs, params)
        return self.f(xp, *inputs, **params)

    def vjp(self, g: Any, *inputs: Any, **params: Any) -> tuple:
        """The gradients on the inputs, given the gradient ``g`` on the output (output's shape)."""
        xp, inputs = self._inputs(inputs, params)
        out = self.f(xp, *inputs, **params)
        g = self._number_or_array(g, f"g of gate {self.name!r}", get_xp(g, *inputs))
        if _shape(g) != _shape(out):
            raise ValueError(f"gate {self.name!r}: g has shape {shape_str(_shape(g))} "
                             f"but the output has shape {shape_str(_shape(out))}")
        grads = self.df(xp, g, out, *inputs, **params)
        return tuple(_unbroadcast(d, _shape(x)) for d, x in zip(grads, inputs))


def _sigmoid(xp, x):
    # From e = exp(−|x|) ≤ 1, so no overflow at any x: 1/(1+e) for x ≥ 0, e/(1+e) below.
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _matmul(xp, W, X):
    if len(_shape(W)) != 2 or len(_shape(X)) != 2 or W.shape[1] != X.shape[0]:
        raise ValueError(f"gate 'matmul' computes D = W·X with W (M, K) and X (K, N); "
                         f"got W {shape_str(_shape(W))} and X {shape_str(_shape(X))}")
    return W @ X


def _reduced_axes(x, axis) -> tuple:
    ndim = len(_shape(x))
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in (axis if isinstance(axis, tuple) else (axis,)))


def _spread(xp, g, x, axis):
    """``g`` of a reduction over ``axis``, copied back along the reduced axes to ``x``'s shape."""
    axes = _reduced_axes(x, axis)
    kept = tuple(1 if i in axes else n for i, n in enumerate(_shape(x)))
    g = g.reshape(kept) if hasattr(g, "reshape") else g  # a Python float stays weak (float32 stays)
    return g * xp.ones_like(x)


def _count(x, axis) -> int:
    return math.prod(_shape(x)[a] for a in _reduced_axes(x, axis))


def _softmax(xp, x):
    if not _shape(x):
        raise ValueError("gate 'softmax' is over the last axis and needs an input of at least 1-D; got a scalar")
    e = xp.exp(x - x.max(axis=-1, keepdims=True))  # shifted: no overflow at large inputs
    return e / e.sum(axis=-1, keepdims=True)


def _route(g, x_wins, y_wins, tie):
    """``g`` to the winning input of max/min; at a tie half to each (torch.maximum/minimum)."""
    half = g * tie / 2
    return g * x_wins + half, g * y_wins + half


_TABLE = (
    Gate("add", 2, "f = x + y      ∂f/∂x = 1, ∂f/∂y = 1 (distributes g)",
         lambda xp, x, y: x + y,
         lambda xp, g, out, x, y: (g, g)),
    Gate("mul", 2, "f = x·y        ∂f/∂x = y, ∂f/∂y = x (swaps)",
         lambda xp, x, y: x * y,
         lambda xp, g, out, x, y: (g * y, g * x)),
    Gate("max", 2, "f = max(x, y)  ∂f/∂x = 1(x > y), ∂f/∂y = 1(y > x), ½ each at a tie (routes g)",
         lambda xp, x, y: xp.maximum(x, y),
         lambda xp, g, out, x, y: _route(g, x > y, y > x, x == y)),
    Gate("min", 2, "f = min(x, y)  ∂f/∂x = 1(x < y), ∂f/∂y = 1(y < x), ½ each at a tie",
         lambda xp, x, y: xp.minimum(x, y),
         lambda xp, g, out, x, y: _route(g, x < y, y < x, x == y)),
    Gate("exp", 1, "f = eˣ          df/dx = eˣ",
         lambda xp, x: xp.exp(x),
         lambda xp, g, out, x: (g * out,)),
    Gate("log", 1, "f = log x       df/dx = 1/x",
         lambda xp, x: xp.log(x),
         lambda xp, g, out, x: (g / x,)),
    Gate("reciprocal", 1, "f = 1/x         df/dx = −1/x²",
         lambda xp, x: 1 / x,
         lambda xp, g, out, x: (-g * out * out,)),
    Gate("add_const", 1, "f_c = c + x     df/dx = 1",
         lambda xp, x, *, c: c + x,
         lambda xp, g, out, x, *, c: (g,),
         required=("c",)),
    Gate("scale", 1, "f_a = a·x       df/dx = a",
         lambda xp, x, *, a: a * x,
         lambda xp, g, out, x, *, a: (a * g,),
         required=("a",)),
    Gate("pow", 1, "f = xᵖ          df/dx = p·xᵖ⁻¹",
         lambda xp, x, *, p: x**p,
         lambda xp, g, out, x, *, p: (g * p * x ** (p - 1),),
         required=("p",)),
    Gate("sigmoid", 1, "f = σ(x)        df/dx = (1 − σ(x))·σ(x)",
         _sigmoid,
         lambda xp, g, out, x: (g * (1 - out) * out,)),
    Gate("tanh", 1, "f = tanh x      df/dx = 1 − tanh²x",
         lambda xp, x: xp.tanh(x),
         lambda xp, g, out, x: (g * (1 - out * out),)),
    Gate("relu", 1, "f = max(x, 0)   df/dx = 1(x > 0)",
         lambda xp, x: xp.maximum(x, 0),
         lambda xp, g, out, x: (g * (x > 0),)),
    Gate("matmul", 2, "D = W·X         dW = dD·Xᵀ, dX = Wᵀ·dD",
         _matmul,
         lambda xp, g, out, W, X: (g @ X.T, W.T @ g)),
    Gate("sum", 1, "f = Σ x         ∂f/∂x = 1 (g copied along the summed axes)",
         lambda xp, x, *, axis=None: xp.sum(x, axis=axis),
         lambda xp, g, out, x, *, axis=None: (_spread(xp, g, x, axis),),
         optional=("axis",)),
    Gate("mean", 1, "f = Σ x / n     ∂f/∂x = 1/n",
         lambda xp, x, *, axis=None: xp.mean(x, axis=axis),
         lambda xp, g, out, x, *, axis=None: (_spread(xp, g, x, axis) / _count(x, axis),),
         optional=("axis",)),
    Gate("softmax", 1, "y = softmax(x)  ∂/∂x = y ⊙ (g − Σ g ⊙ y)",
         _softmax,
         lambda xp, g, out, x: (out * (g - (g * out).sum(axis=-1, keepdims=True)),)),
)

GATES: dict[str, Gate] = {gate.name: gate for gate in _TABLE}


def names() -> list[str]:
    """The gate names, in table order."""
    return list(GATES)


def get(name: str) -> Gate:
    """The gate called ``name``; a ``KeyError`` listing the valid names otherwise.

        >>> get("exp").vjp(1.0, 0.0)
        (np.float64(1.0),)
    """
    try:
        return GATES[name]
    except (KeyError, TypeError):
        raise KeyError(f"unknown gate {name!r}; valid names: {', '.join(names())}") from None

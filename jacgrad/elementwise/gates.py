"""The table of gates and their local gradients, one row per gate, as in the backprop notes.

A gate computes one output from its inputs; its VJP takes the gradient ``g`` on that output and
returns the gradient on every input — the gate multiplies ``g`` into its local gradients (chain
rule). Each row gives the forward rule ``f(xp, *inputs)`` and the backward rule
``df(xp, g, out, *inputs)``, which may reuse the forward output ``out`` (``exp``: ``g·out``).

Conventions:

- Inputs are float32/float64 arrays (NumPy or CuPy) or Python numbers; every returned gradient
  has its input's shape. Inputs of elementwise gates broadcast, and the gradient of a
  broadcast input is summed back to its shape (``add(x (B, H), b (H,))`` gives ``∂b: (H,)``).
- Python numbers behave like 0-d arrays: beside an array they are weak (a float32 array keeps
  float32, as in NumPy); when no input is an array they become 0-d float64 arrays (results are
  NumPy scalars), so ``log(0.0)`` is ``-inf`` and ``pow(-1.0, p=0.5)`` is ``nan`` (with NumPy's
  RuntimeWarning), never a ``ZeroDivisionError`` or a complex number. ``None``, strings and
  complex numbers are a ``TypeError``.
- Every returned gradient is new memory: never ``g``, an input or another returned gradient
  (``add`` hands ``g`` to its two inputs as two copies), so editing one in place changes nothing else.
- A local gradient that is a mask or a constant zero gives exactly 0, as in torch: ``pow`` with
  ``p=0`` has gradient 0 (not 0·∞ at ``x=0``), and ``max``/``min``/``relu`` give 0 to the losing
  input even where ``g`` is ±∞ or NaN.
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
    >>> float(mul.forward(3.0, -4.0)), [float(d) for d in mul.vjp(2.0, 3.0, -4.0)]  # mul swaps
    (-12.0, [-8.0, 6.0])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..core.validation import FLOAT_DTYPES, float_array, shape_str
from ..core.backend import get_xp

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

    def _inputs(self, inputs: tuple, params: dict, g: Any = None):
        """``(xp, inputs, g)`` checked and converted; ``g`` only for ``vjp``."""
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
        named = [(x, f"input {i} of gate {self.name!r}") for i, x in enumerate(inputs)]
        if g is not None:
            named.append((g, f"g of gate {self.name!r}"))
        for x, what in named:
            _check_real(x, what)
        # Beside an array a Python number stays a Python float (weak: float32 stays float32).
        # Without one it becomes a 0-d array, so the rules run with NumPy's array semantics.
        if any(hasattr(x, "dtype") for x in inputs):
            scalar = float
        else:
            dtype = g.dtype if hasattr(g, "dtype") and np.dtype(g.dtype) in FLOAT_DTYPES else np.float64
            scalar = functools.partial(np.asarray, dtype=dtype)
        xp = get_xp(*(x for x, _ in named))
        converted = tuple(_number_or_array(x, what, xp, scalar) for x, what in named)
        if g is None:
            return xp, converted, None
        return xp, converted[:-1], converted[-1]

    def forward(self, *inputs: Any, **params: Any):
        """The gate's output for ``inputs`` (``arity`` of them) and keyword ``params``."""
        xp, inputs, _ = self._inputs(inputs, params)
        return _fresh(self.f(xp, *inputs, **params), inputs)

    def vjp(self, g: Any, *inputs: Any, **params: Any) -> tuple:
        """The gradients on the inputs, given the gradient ``g`` on the output (output's shape).

        Each gradient is new memory: neither ``g``, an input, nor another returned gradient."""
        if g is None:
            raise TypeError(f"g of gate {self.name!r} is None; it must be the gradient on the output")
        xp, inputs, g = self._inputs(inputs, params, g)
        out = self.f(xp, *inputs, **params)
        if _shape(g) != _shape(out):
            raise ValueError(f"gate {self.name!r}: g has shape {shape_str(_shape(g))} "
                             f"but the output has shape {shape_str(_shape(out))}")
        grads: list = []
        for d, x in zip(self.df(xp, g, out, *inputs, **params), inputs):
            grads.append(_fresh(_unbroadcast(d, _shape(x)), (g, *inputs, *grads)))
        return tuple(grads)


def _check_real(x: Any, what: str) -> None:
    """A ``TypeError`` for what is neither an array, a real Python number, nor a list of them."""
    if hasattr(x, "dtype") or (isinstance(x, (int, float))):
        return
    if isinstance(x, (list, tuple)):
        try:
            kind = np.asarray(x).dtype.kind
        except (TypeError, ValueError):
            kind = "O"
        if kind in "biuf":
            return
    raise TypeError(f"{what} is {type(x).__name__} {x!r:.40}; gates take float32/float64 arrays or real numbers")


def _number_or_array(x: Any, what: str, xp, scalar):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return scalar(x)
    return float_array(x, what, xp)


def _fresh(d, others):
    """``d``, copied if it may share memory with any of ``others`` (a gate never hands back its
    caller's arrays, nor one array twice); a 0-d NumPy array as the NumPy scalar NumPy's own
    operations return."""
    if isinstance(d, np.ndarray) and d.ndim == 0:
        return d[()]
    if not hasattr(d, "shape") or isinstance(d, np.generic):
        return d  # Python and NumPy scalars are immutable
    xp = get_xp(d)
    for o in others:
        if hasattr(o, "shape") and not isinstance(o, np.generic) and get_xp(o) is xp \
                and xp.may_share_memory(d, o):
            return d.copy()
    return d


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


def _softmax_vjp(xp, g, out, x):
    """``y ⊙ (w − Σ w ⊙ y)`` with ``w = g − g_k``, k the argmax of ``y``: the same product (Σ y = 1),
    without the cancellation of ``g_k − Σ g ⊙ y`` where ``y_k`` rounds to 1 (as
    ``loss_hessians.hessian_vp``)."""
    w = g - xp.take_along_axis(g, out.argmax(axis=-1)[..., None], axis=-1)
    return (out * (w - (w * out).sum(axis=-1, keepdims=True)),)


def _result_dtype(*xs):
    """NumPy's result dtype of ``xs`` — from their dtypes, so CuPy arrays are never converted;
    Python numbers stay weak."""
    return np.result_type(*(x.dtype if hasattr(x, "dtype") else x for x in xs))


def _route(xp, g, out, x_loses, y_loses, tie):
    """``g`` to the winning input of max/min, half to each at a tie — torch.maximum/minimum's rule.

    Selected, not multiplied by a 0/1 mask: the loser gets 0 even where ``g`` is ±∞ or NaN."""
    dtype = _result_dtype(g, out)
    routed = xp.where(tie, g / 2, g)
    return xp.where(x_loses, 0, routed).astype(dtype), xp.where(y_loses, 0, routed).astype(dtype)


def _pow_grad(xp, g, x, p):
    """``g·p·xᵖ⁻¹``; exactly 0 for ``p = 0`` (torch, autograd), not 0·∞ = NaN at ``x = 0``."""
    if p == 0:
        return xp.zeros(_shape(x), dtype=_result_dtype(g, x))
    return g * p * x ** (p - 1)


_TABLE = (
    Gate("add", 2, "f = x + y      ∂f/∂x = 1, ∂f/∂y = 1 (distributes g)",
         lambda xp, x, y: x + y,
         lambda xp, g, out, x, y: (g, g)),
    Gate("mul", 2, "f = x·y        ∂f/∂x = y, ∂f/∂y = x (swaps)",
         lambda xp, x, y: x * y,
         lambda xp, g, out, x, y: (g * y, g * x)),
    Gate("max", 2, "f = max(x, y)  ∂f/∂x = 1(x > y), ∂f/∂y = 1(y > x), ½ each at a tie (routes g)",
         lambda xp, x, y: xp.maximum(x, y),
         lambda xp, g, out, x, y: _route(xp, g, out, x < y, y < x, x == y)),
    Gate("min", 2, "f = min(x, y)  ∂f/∂x = 1(x < y), ∂f/∂y = 1(y < x), ½ each at a tie",
         lambda xp, x, y: xp.minimum(x, y),
         lambda xp, g, out, x, y: _route(xp, g, out, x > y, y > x, x == y)),
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
         lambda xp, g, out, x, *, p: (_pow_grad(xp, g, x, p),),
         required=("p",)),
    Gate("sigmoid", 1, "f = σ(x)        df/dx = (1 − σ(x))·σ(x)",
         _sigmoid,
         lambda xp, g, out, x: (g * (1 - out) * out,)),
    Gate("tanh", 1, "f = tanh x      df/dx = 1 − tanh²x",
         lambda xp, x: xp.tanh(x),
         lambda xp, g, out, x: (g * (1 - out * out),)),
    Gate("relu", 1, "f = max(x, 0)   df/dx = 1(x > 0)",
         lambda xp, x: xp.maximum(x, 0),
         lambda xp, g, out, x: (xp.where(x <= 0, 0, g).astype(_result_dtype(g, out)),)),
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
         _softmax, _softmax_vjp),
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

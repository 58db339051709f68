"""The activation table: one row per activation — forward, derivative, derivative from the
output, sup|φ'| and the CUDA functor that computes the same on the GPU.

Like the tables of gates and gradients in the textbooks (and HIPS autograd's VJP table), each
activation is one ``Activation`` row. Its functions take a NumPy or CuPy array ``h`` of any
shape, float32 or float64, and return an array of the same shape and dtype; the math is written
once against ``xp = get_xp(h)``. The same formulas, operation for operation, live in
``kernels/activations.cuh`` (the functor named by ``Activation.cuda``), and the host test
compares the two on a grid with 0, ±tiny, ±large and ±inf.

Conventions:
- derivatives at kinks are PyTorch autograd's: relu'(0) = 0, leaky_relu'(0) = 0.01,
  hard_tanh'(±1) = 0, elu'(0) = 1;
- everything is finite and warning-free at ±1000 and ±inf, with the limits the math gives
  (sigmoid(-inf) = 0, silu(-inf) = 0, tanh'(±inf) = 0, ...), and NaN propagates through ``f``;
- ``df_from_output(y)`` is φ' written in terms of ``y = φ(h)`` where that is exact, so a
  backward pass can keep only the output; None where it is not (softplus, gelu, gelu_tanh, silu).

    >>> import numpy as np
    >>> act = get("tanh")
    >>> y = act.f(np.array([0.0, 1.0]))
    >>> bool(np.allclose(act.df_from_output(y), act.df(np.array([0.0, 1.0]))))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ._erf import erf, erfc
from ._validate import float_array
from .backend import get_xp

__all__ = ["Activation", "erf", "erfc", "get", "names"]

Fn = Callable[[Any], Any]


@dataclass(frozen=True)
class Activation:
    """One row of the table.

    name: the key of ``get``; f(h), df(h): φ and φ' elementwise, any shape → same shape/dtype;
    df_from_output(y): φ' as a function of the output y = φ(h), or None;
    bound: sup over ℝ of |φ'(h)| (never below the true sup; used for norm bounds);
    cuda: the C++ functor in kernels/activations.cuh that the GPU kernels instantiate;
    kinks: the points where φ' jumps (its value there is PyTorch's convention);
    f_into(h, out): φ(h) written straight into ``out`` (which may be ``h``), bitwise equal to
    ``f(h)``, for the activations that are a single ufunc — the forward pass then allocates
    nothing; None where φ takes several steps (``f`` is computed, then copied);
    df_from_output_into(y, out, scratch): ``df_from_output(y)`` written into ``out`` with one
    more buffer of y's shape to work in, bitwise equal to it — the backward pass of the
    common activations then allocates no temporaries; None elsewhere;
    f_and_df(h): ``(f(h), df(h))``, bitwise those two, computing their common part once (the
    normal CDF of gelu, the logistic of silu and gelu_tanh) — for a backward pass that needs
    both φ(h) and φ'(h); None where they share nothing worth it.
    """

    name: str
    f: Fn
    df: Fn
    df_from_output: Optional[Fn]
    bound: float
    cuda: str
    kinks: tuple[float, ...] = ()
    f_into: Optional[Callable[[Any, Any], Any]] = None
    df_from_output_into: Optional[Callable[[Any, Any, Any], Any]] = None
    f_and_df: Optional[Callable[[Any], tuple]] = None

    @property
    def smooth(self) -> bool:
        """True when φ' is continuous (no kinks)."""
        return not self.kinks

    def __repr__(self) -> str:
        return f"Activation({self.name!r})"


def _array(h):
    """h as a float array and its namespace (lists and Python floats become float64)."""
    xp = get_xp(h)
    return float_array(h, "h", xp), xp


def _const(h, value):
    """``value`` as a scalar of h's dtype, so np.where and friends keep float32 float32."""
    return h.dtype.type(value)


# |h| beyond which the smooth activations have saturated exactly in float32 and float64
# (σ, Φ and exp(-h²/2) are 0 or 1 there). Clamping to it keeps ±inf·0 from becoming NaN and
# h³ from overflowing, without changing any finite result. Same constant as in the .cuh.
_SAT = 1e5


def _logistic(t, xp):
    """σ(t) and σ(t)·σ(-t) from one exp(-|t|): exact-stable for every t, ±inf included."""
    e = xp.exp(-xp.abs(t))
    s1 = 1.0 / (1.0 + e)
    return xp.where(t >= 0, s1, e * s1), e * s1 * s1


# --- identity, relu, leaky_relu, hard_tanh: piecewise linear -------------------------------

def _identity_f(h):
    h, xp = _array(h)
    return xp.array(h, copy=True)


def _ones(x):
    x, xp = _array(x)
    return xp.ones_like(x)


def _relu_f(h):
    h, xp = _array(h)
    return xp.maximum(h, _const(h, 0.0))


def _positive(x):
    """1 where x > 0 else 0 (NaN → 0): relu' from h, and from y = relu(h) as well."""
    x, xp = _array(x)
    return (x > 0).astype(x.dtype)


_LEAK = 0.01


def _leaky_relu_f(h):
    h, xp = _array(h)
    return xp.where(h > 0, h, _LEAK * h)


def _leaky_slope(x):
    """1 where x > 0 else 0.01: leaky_relu' from h, and from y (same sign as h)."""
    x, xp = _array(x)
    return xp.where(x > 0, _const(x, 1.0), _const(x, _LEAK))


def _hard_tanh_f(h):
    h, xp = _array(h)
    return xp.clip(h, _const(h, -1.0), _const(h, 1.0))


def _inside_unit(x):
    """1 where -1 < x < 1 else 0: hard_tanh' from h, and from y (torch: 0 at ±1)."""
    x, xp = _array(x)
    return ((x > -1) & (x < 1)).astype(x.dtype)


# --- sigmoid, tanh, softplus, elu ---------------------------------------------------------

def _sigmoid_f(h):
    h, xp = _array(h)
    return _logistic(h, xp)[0]


def _sigmoid_df(h):
    h, xp = _array(h)
    return _logistic(h, xp)[1]


def _sigmoid_df_y(y):
    # y (1 - y), with the product written into the (1 - y) temporary: one allocation
    y, xp = _array(y)
    d = 1.0 - y
    return xp.multiply(d, y, out=d)


def _tanh_f(h):
    h, xp = _array(h)
    return xp.tanh(h)


def _tanh_df(h):
    # 1 - tanh² = 4e / (1 + e)² with e = exp(-2|h|): full relative accuracy in the tails
    h, xp = _array(h)
    e = xp.exp(-2.0 * xp.abs(h))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


def _tanh_df_y(y):
    # (1 - y)(1 + y) rather than 1 - y², which cancels as |y| -> 1; product written in place
    y, xp = _array(y)
    d = 1.0 - y
    return xp.multiply(d, 1.0 + y, out=d)


def _softplus_f(h):
    h, xp = _array(h)
    return xp.maximum(h, _const(h, 0.0)) + xp.log1p(xp.exp(-xp.abs(h)))


def _elu_f(h):
    h, xp = _array(h)
    return xp.where(h > 0, h, xp.expm1(xp.minimum(h, _const(h, 0.0))))


def _elu_df(h):
    h, xp = _array(h)
    return xp.where(h > 0, _const(h, 1.0), xp.exp(xp.minimum(h, _const(h, 0.0))))


def _elu_df_y(y):
    y, xp = _array(y)
    return xp.where(y > 0, _const(y, 1.0), y + 1.0)


# --- gelu (erf form), gelu_tanh, silu -----------------------------------------------------

def _normal_cdf(h):
    # Φ(h) = erfc(-h/√2)/2: erfc keeps the left tail where 1 + erf(h/√2) would cancel
    return 0.5 * erfc(h * -0.7071067811865476)


def _gelu_f(h, cdf=None):
    h, xp = _array(h)
    return xp.maximum(h, _const(h, -_SAT)) * (_normal_cdf(h) if cdf is None else cdf)


def _gelu_df(h, cdf=None):
    # Φ(h) + h·φ(h)
    h, xp = _array(h)
    c = xp.clip(h, _const(h, -_SAT), _const(h, _SAT))
    pdf = 0.3989422804014327 * xp.exp(-0.5 * c * c)
    return (_normal_cdf(h) if cdf is None else cdf) + c * pdf


def _gelu_f_and_df(h):
    h, _ = _array(h)
    cdf = _normal_cdf(h)
    return _gelu_f(h, cdf), _gelu_df(h, cdf)


_K0 = 0.7978845608028654  # sqrt(2/pi), as torch's M_SQRT2 * M_2_SQRTPI * 0.5
_K1 = 0.044715


def _gelu_tanh_parts(h, xp):
    """(c, σ(2u), σ(2u)σ(-2u)) for u = √(2/π)(c + 0.044715 c³), c = h clamped to ±_SAT."""
    c = xp.clip(h, _const(h, -_SAT), _const(h, _SAT))
    u = _K0 * (c + _K1 * (c * c * c))
    s, q = _logistic(2.0 * u, xp)
    return c, s, q


def _gelu_tanh_f(h, parts=None):
    # h/2 (1 + tanh u) = h σ(2u)
    h, xp = _array(h)
    _, s, _ = _gelu_tanh_parts(h, xp) if parts is None else parts
    return xp.maximum(h, _const(h, -_SAT)) * s


def _gelu_tanh_df(h, parts=None):
    # σ(2u) + h · 2σ(2u)σ(-2u) · du/dh
    h, xp = _array(h)
    c, s, q = _gelu_tanh_parts(h, xp) if parts is None else parts
    du = _K0 * (1.0 + (3 * _K1) * (c * c))
    return s + 2.0 * c * q * du


def _gelu_tanh_f_and_df(h):
    h, xp = _array(h)
    parts = _gelu_tanh_parts(h, xp)
    return _gelu_tanh_f(h, parts), _gelu_tanh_df(h, parts)


def _silu_f(h, sq=None):
    h, xp = _array(h)
    s, _ = _logistic(h, xp) if sq is None else sq
    return xp.maximum(h, _const(h, -_SAT)) * s


def _silu_df(h, sq=None):
    # σ(h) + h σ(h) σ(-h)
    h, xp = _array(h)
    s, q = _logistic(h, xp) if sq is None else sq
    return s + xp.clip(h, _const(h, -_SAT), _const(h, _SAT)) * q


def _silu_f_and_df(h):
    h, xp = _array(h)
    sq = _logistic(h, xp)
    return _silu_f(h, sq), _silu_df(h, sq)


# --- forms written into buffers (Activation.f_into, Activation.df_from_output_into) -------

def _identity_into(h, out):
    get_xp(h).copyto(out, h)
    return out


def _relu_into(h, out):
    return get_xp(h).maximum(h, _const(h, 0.0), out=out)


def _tanh_into(h, out):
    return get_xp(h).tanh(h, out=out)


def _hard_tanh_into(h, out):
    return get_xp(h).clip(h, _const(h, -1.0), _const(h, 1.0), out=out)


def _positive_into(y, out, scratch):
    return get_xp(y).greater(y, _const(y, 0.0), out=out)


def _sigmoid_df_y_into(y, out, scratch):
    xp = get_xp(y)
    xp.subtract(_const(y, 1.0), y, out=out)
    return xp.multiply(out, y, out=out)


def _tanh_df_y_into(y, out, scratch):
    xp = get_xp(y)
    xp.subtract(_const(y, 1.0), y, out=out)
    xp.add(_const(y, 1.0), y, out=scratch)
    return xp.multiply(out, scratch, out=out)


# --- the table ----------------------------------------------------------------------------
# bound = sup |φ'|. For gelu, gelu_tanh and silu it is attained where φ'' = 0; it was derived
# with mpmath at 60 digits, rounded *up* to a double, and raised 4 ulp more so that it also
# bounds the rounded values df computes near the maximum (silu's reach 1 ulp past the sup):
#   gelu:      φ'' = φ(h)(2 - h²) = 0 at h = √2, so sup = Φ(√2) + √2 φ(√2)
#              = 1.128904145185154786340744...
#   gelu_tanh: root of φ'' at h = 1.418504008790828355548..., sup = 1.128993068658771765455904...
#   silu:      φ'' = 0 ⇔ h tanh(h/2) = 2, h = 2.399357280515467667832..., sup = 1.099839320128866916958184...
# The other sups are attained or approached in closed form (σ' ≤ 1/4 at 0, tanh' ≤ 1 at 0).

_TABLE: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", _identity_f, _ones, _ones, 1.0, "jacgrad::Identity", f_into=_identity_into),
        Activation("relu", _relu_f, _positive, _positive, 1.0, "jacgrad::Relu", kinks=(0.0,), f_into=_relu_into,
                   df_from_output_into=_positive_into),
        Activation("leaky_relu", _leaky_relu_f, _leaky_slope, _leaky_slope, 1.0, "jacgrad::LeakyRelu", kinks=(0.0,)),
        Activation("sigmoid", _sigmoid_f, _sigmoid_df, _sigmoid_df_y, 0.25, "jacgrad::Sigmoid",
                   df_from_output_into=_sigmoid_df_y_into),
        Activation("tanh", _tanh_f, _tanh_df, _tanh_df_y, 1.0, "jacgrad::Tanh", f_into=_tanh_into,
                   df_from_output_into=_tanh_df_y_into),
        Activation("softplus", _softplus_f, _sigmoid_f, None, 1.0, "jacgrad::Softplus"),
        Activation("elu", _elu_f, _elu_df, _elu_df_y, 1.0, "jacgrad::Elu"),
        Activation("gelu", _gelu_f, _gelu_df, None, 1.1289041451851558, "jacgrad::Gelu", f_and_df=_gelu_f_and_df),
        Activation("gelu_tanh", _gelu_tanh_f, _gelu_tanh_df, None, 1.1289930686587728, "jacgrad::GeluTanh",
                   f_and_df=_gelu_tanh_f_and_df),
        Activation("silu", _silu_f, _silu_df, None, 1.0998393201288679, "jacgrad::Silu", f_and_df=_silu_f_and_df),
        Activation("hard_tanh", _hard_tanh_f, _inside_unit, _inside_unit, 1.0, "jacgrad::HardTanh", kinks=(-1.0, 1.0),
                   f_into=_hard_tanh_into),
    )
}


class UnknownActivationError(KeyError, ValueError):
    """An activation name that is not in the table; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def names() -> list[str]:
    """The activation names, in table order."""
    return list(_TABLE)


def get(name: str | Activation) -> Activation:
    """The table row of ``name`` (an ``Activation`` is returned as is).

        >>> get("sigmoid").bound
        0.25
    """
    if isinstance(name, Activation):
        return name
    try:
        return _TABLE[name]
    except (KeyError, TypeError):
        raise UnknownActivationError(
            f"unknown activation {name!r}; valid names: {', '.join(_TABLE)}"
        ) from None

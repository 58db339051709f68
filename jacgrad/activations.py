"""The activation table: one row per activation — forward, derivative, derivative from the
output, sup|φ'| and the CUDA functor that computes the same on the GPU.

Like the tables of gates and gradients in the textbooks (and HIPS autograd's VJP table), each
activation is one ``Activation`` row. Its functions take a NumPy or CuPy array ``h`` of any
shape, float32 or float64, and return an array of the same shape and dtype; the math is written
once against ``xp = get_xp(h)``. The same formulas, operation for operation, live in
``kernels/activations.cuh`` (the functor named by ``Activation.cuda``), and the host test
compares the two on a grid with 0, ±tiny, ±large and ±inf.

Conventions:
- derivatives at kinks are PyTorch autograd's: relu'(0) = 0, leaky_relu'(0) = negative_slope,
  hard_tanh'(min_val) = hard_tanh'(max_val) = 0, elu'(0) = alpha; softplus is torch's, linear
  where ``beta·h > threshold`` (φ' = 1 there, σ(beta·h) below);
- four rows take parameters (torch's names and defaults): ``leaky_relu(negative_slope=0.01)``,
  ``elu(alpha=1.0)``, ``softplus(beta=1.0, threshold=20.0)``, ``hard_tanh(min_val=-1.0,
  max_val=1.0)``. ``get("elu", alpha=0.5)`` and ``get("elu(alpha=0.5)")`` are the same row, and
  that string — the canonical spelling, no spaces, only the parameters that differ from their
  defaults — is its ``name``, so a name written to a file reads back as the same activation;
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

__all__ = ["Activation", "erf", "erfc", "get", "names", "parameters", "split_names"]

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
    both φ(h) and φ'(h); None where they share nothing worth it;
    params: ``((name, value), ...)`` of a parameterised row, every parameter in order (defaults
    included); ``()`` for the rows without parameters;
    kernel_args: the two numbers the CUDA functor reads from its ``Params<T>{a, b}`` argument
    (e.g. hard_tanh's ``(min_val, max_val)``); ``(0.0, 0.0)`` where it reads none.
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
    params: tuple = ()
    kernel_args: tuple = (0.0, 0.0)

    @property
    def family(self) -> str:
        """The bare table name: ``"elu"`` for ``elu(alpha=0.5)``."""
        return self.name.partition("(")[0]

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


# --- identity, relu: piecewise linear ------------------------------------------------------

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


# --- sigmoid, tanh ------------------------------------------------------------------------

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


# --- the parameterised rows: leaky_relu, elu, softplus, hard_tanh --------------------------
# Each is a function of its parameters (Python floats, so float32 stays float32) that returns
# the row; ``get`` builds one per distinct parameter set and keeps it. The same formulas, with
# the parameters read from ``Params<T>{a, b}``, are the functors LeakyRelu, Elu, Softplus and
# HardTanh of kernels/activations.cuh.

def _leaky_relu(negative_slope: float) -> dict:
    s = negative_slope

    def f(h):
        h, xp = _array(h)
        return xp.where(h > 0, h, s * h)

    def slope(x):  # 1 where x > 0 else s: φ' from h, and from y (y has h's sign, s > 0)
        x, xp = _array(x)
        return xp.where(x > 0, _const(x, 1.0), _const(x, s))

    return dict(f=f, df=slope, df_from_output=slope, bound=max(1.0, s), kinks=(0.0,), kernel_args=(s, 0.0))


def _elu(alpha: float) -> dict:
    a = alpha

    def f(h):
        h, xp = _array(h)
        return xp.where(h > 0, h, a * xp.expm1(xp.minimum(h, _const(h, 0.0))))

    def df(h):  # torch: alpha·exp(h) for h ≤ 0, so elu'(0) = alpha
        h, xp = _array(h)
        return xp.where(h > 0, _const(h, 1.0), a * xp.exp(xp.minimum(h, _const(h, 0.0))))

    def df_y(y):  # y > 0 ⇔ h > 0 (alpha ≥ 0); below, alpha·exp(h) = y + alpha
        y, xp = _array(y)
        return xp.where(y > 0, _const(y, 1.0), y + a)

    kinks = () if a == 1.0 else (0.0,)  # φ' runs from alpha·e^h up to alpha at 0, then jumps to 1
    return dict(f=f, df=df, df_from_output=df_y, bound=max(1.0, a), kinks=kinks, kernel_args=(a, 0.0))


def _softplus(beta: float, threshold: float) -> dict:
    b, t = beta, threshold

    def f(h):  # torch: h where beta·h > threshold, else log(1 + exp(beta·h)) / beta, computed stably
        h, xp = _array(h)
        bh = b * h
        with_log = (xp.maximum(bh, _const(h, 0.0)) + xp.log1p(xp.exp(-xp.abs(bh)))) / b
        return xp.where(bh > t, h, with_log)

    def df(h):  # σ(beta·h), and 1 where torch's linear branch is taken
        h, xp = _array(h)
        bh = b * h
        return xp.where(bh > t, _const(h, 1.0), _logistic(bh, xp)[0])

    # φ' (and φ itself, by log1p(e^-threshold)/beta) jumps where torch switches to the identity
    return dict(f=f, df=df, df_from_output=None, bound=1.0, kinks=(t / b,), kernel_args=(b, t))


def _hard_tanh(min_val: float, max_val: float) -> dict:
    lo, hi = min_val, max_val

    def f(h):
        h, xp = _array(h)
        return xp.clip(h, _const(h, lo), _const(h, hi))

    def inside(x):  # 1 where lo < x < hi else 0: φ' from h, and from y (torch: 0 at the ends)
        x, xp = _array(x)
        return ((x > lo) & (x < hi)).astype(x.dtype)

    def f_into(h, out):
        return get_xp(h).clip(h, _const(h, lo), _const(h, hi), out=out)

    return dict(f=f, df=inside, df_from_output=inside, bound=1.0, kinks=(lo, hi), kernel_args=(lo, hi), f_into=f_into)


def _positive_param(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _nonnegative_param(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be ≥ 0 (φ' is taken from the output, which needs it), got {value}")


@dataclass(frozen=True)
class _Family:
    """A parameterised row: its parameters with torch's defaults, its CUDA functor, its builder."""

    name: str
    defaults: tuple  # ((parameter, default), ...)
    cuda: str
    build: Callable[..., dict]
    check: Callable[[dict], None]


def _check_leaky_relu(p):
    # slope 0 is relu, and 0·(-inf) would make φ(-inf) NaN: say so rather than carry it
    if not p["negative_slope"] > 0:
        raise ValueError(f"negative_slope must be > 0 (for 0 use 'relu'), got {p['negative_slope']}")


def _check_hard_tanh(p):
    if not p["min_val"] < p["max_val"]:
        raise ValueError(f"min_val must be below max_val, got min_val={p['min_val']}, max_val={p['max_val']}")


_FAMILIES: dict[str, _Family] = {
    f.name: f
    for f in (
        _Family("leaky_relu", (("negative_slope", 0.01),), "jacgrad::LeakyRelu", _leaky_relu, _check_leaky_relu),
        _Family("elu", (("alpha", 1.0),), "jacgrad::Elu", _elu, lambda p: _nonnegative_param("alpha", p["alpha"])),
        _Family("softplus", (("beta", 1.0), ("threshold", 20.0)), "jacgrad::Softplus", _softplus,
                lambda p: _positive_param("beta", p["beta"])),
        _Family("hard_tanh", (("min_val", -1.0), ("max_val", 1.0)), "jacgrad::HardTanh", _hard_tanh, _check_hard_tanh),
    )
}


# --- the table ----------------------------------------------------------------------------
# bound = sup |φ'|. For gelu, gelu_tanh and silu it is attained where φ'' = 0; it was derived
# with mpmath at 60 digits, rounded *up* to a double, and raised 4 ulp more so that it also
# bounds the rounded values df computes near the maximum (silu's reach 1 ulp past the sup):
#   gelu:      φ'' = φ(h)(2 - h²) = 0 at h = √2, so sup = Φ(√2) + √2 φ(√2)
#              = 1.128904145185154786340744...
#   gelu_tanh: root of φ'' at h = 1.418504008790828355548..., sup = 1.128993068658771765455904...
#   silu:      φ'' = 0 ⇔ h tanh(h/2) = 2, h = 2.399357280515467667832..., sup = 1.099839320128866916958184...
# The other sups are attained or approached in closed form (σ' ≤ 1/4 at 0, tanh' ≤ 1 at 0,
# leaky_relu's and elu's max(1, parameter), hard_tanh's and softplus' 1).

_FIXED = (
    Activation("identity", _identity_f, _ones, _ones, 1.0, "jacgrad::Identity", f_into=_identity_into),
    Activation("relu", _relu_f, _positive, _positive, 1.0, "jacgrad::Relu", kinks=(0.0,), f_into=_relu_into,
               df_from_output_into=_positive_into),
    Activation("sigmoid", _sigmoid_f, _sigmoid_df, _sigmoid_df_y, 0.25, "jacgrad::Sigmoid",
               df_from_output_into=_sigmoid_df_y_into),
    Activation("tanh", _tanh_f, _tanh_df, _tanh_df_y, 1.0, "jacgrad::Tanh", f_into=_tanh_into,
               df_from_output_into=_tanh_df_y_into),
    Activation("gelu", _gelu_f, _gelu_df, None, 1.1289041451851558, "jacgrad::Gelu", f_and_df=_gelu_f_and_df),
    Activation("gelu_tanh", _gelu_tanh_f, _gelu_tanh_df, None, 1.1289930686587728, "jacgrad::GeluTanh",
               f_and_df=_gelu_tanh_f_and_df),
    Activation("silu", _silu_f, _silu_df, None, 1.0998393201288679, "jacgrad::Silu", f_and_df=_silu_f_and_df),
)
_ORDER = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "softplus", "elu", "gelu", "gelu_tanh", "silu",
          "hard_tanh")
_BUILT: dict[str, Activation] = {a.name: a for a in _FIXED}  # canonical name -> row (parameterised ones on demand)


class UnknownActivationError(KeyError, ValueError):
    """An activation name that is not in the table; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def names() -> list[str]:
    """The activation names, in table order (the parameterised ones by their bare name)."""
    return list(_ORDER)


def parameters(name: str) -> dict:
    """The parameters of a row with torch's defaults, ``{}`` for the rows without any.

        >>> parameters("softplus")
        {'beta': 1.0, 'threshold': 20.0}
    """
    family = _FAMILIES.get(name)
    if family is None and name not in _BUILT:
        raise _unknown(name)
    return dict(family.defaults) if family else {}


def _unknown(name) -> UnknownActivationError:
    spelled = ", ".join(f"{f.name}({','.join(p + '=' + repr(v) for p, v in f.defaults)})" for f in _FAMILIES.values())
    return UnknownActivationError(
        f"unknown activation {name!r}; valid names: {', '.join(_ORDER)} (with parameters: {spelled})"
    )


def _parse(name: str) -> tuple[str, dict]:
    """``"hard_tanh(min_val=-2.0,max_val=2.0)"`` -> ``("hard_tanh", {"min_val": -2.0, "max_val": 2.0})``."""
    base, _, rest = name.strip().partition("(")
    base = base.strip()
    if not rest:
        return base, {}
    if not rest.rstrip().endswith(")"):
        raise ValueError(f"activation {name!r}: the parameters must be closed by ')', as in 'elu(alpha=0.5)'")
    params = {}
    body = rest.rstrip()[:-1].strip()
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"activation {name!r}: write each parameter as key=value, as in 'elu(alpha=0.5)'")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"activation {name!r}: parameter {key.strip()} = {value.strip()!r} is not a number") from None
    return base, params


def _canonical(family: _Family, params: dict) -> str:
    changed = [f"{p}={params[p]!r}" for p, default in family.defaults if params[p] != default]
    return f"{family.name}({','.join(changed)})" if changed else family.name


def get(name: str | Activation, **params: float) -> Activation:
    """The table row of ``name`` (an ``Activation`` is returned as is).

    Parameterised rows take their parameters as keywords or in the name's canonical spelling,
    ``name(key=value,...)``; the two give the same row, whose ``name`` is that spelling with only
    the non-default parameters (``"elu"`` when alpha is 1).

        >>> get("sigmoid").bound
        0.25
        >>> get("leaky_relu", negative_slope=0.2).name
        'leaky_relu(negative_slope=0.2)'
        >>> get("hard_tanh(min_val=-2.0, max_val=2.0)") is get("hard_tanh", min_val=-2, max_val=2)
        True
    """
    if isinstance(name, Activation):
        if params:
            raise TypeError(f"get({name.name!r}, ...): parameters go with a name, not with an Activation row")
        return name
    if not isinstance(name, str):
        raise _unknown(name)
    row = _BUILT.get(name)
    if row is not None and not params:
        return row
    base, spelled = _parse(name)
    family = _FAMILIES.get(base)
    if family is None:
        if base in _BUILT and (spelled or params):
            raise TypeError(f"activation {base!r} takes no parameters, got {sorted({**spelled, **params})}")
        raise _unknown(name)
    both = set(spelled) & set(params)
    if both:
        raise TypeError(f"activation {name!r}: {', '.join(sorted(both))} given both in the name and as a keyword")
    values = dict(family.defaults)
    for key, value in {**spelled, **params}.items():
        if key not in values:
            raise TypeError(f"activation {base!r} has no parameter {key!r}; its parameters: {', '.join(values)}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"activation {base!r}: {key} must be a real number, got {value!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"activation {base!r}: {key} must be finite, got {value}")
        values[key] = value
    try:
        family.check(values)
    except ValueError as exc:
        raise ValueError(f"activation {base!r}: {exc}") from None
    canonical = _canonical(family, values)
    row = _BUILT.get(canonical)
    if row is None:
        parts = family.build(**values)
        row = _BUILT[canonical] = Activation(canonical, cuda=family.cuda, params=tuple(values.items()), **parts)
    return row


def split_names(text: str) -> list[str]:
    """A comma-separated list of activation names, split at the commas outside parentheses
    (for a command line's ``--activation relu,hard_tanh(min_val=-2.0,max_val=2.0),identity``);
    each name is checked with ``get`` and returned in its canonical spelling.

        >>> split_names("relu, elu(alpha=0.5),identity")
        ['relu', 'elu(alpha=0.5)', 'identity']
    """
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    if not all(out):
        raise ValueError(f"activation list {text!r} has an empty entry")
    return [get(n).name for n in out]

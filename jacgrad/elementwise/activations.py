"""The activation table: one row per activation — forward, derivative, derivative from the
output, sup|φ'| and the CUDA functor that computes the same on the GPU.

Like the tables of gates and gradients in the textbooks (and HIPS autograd's VJP table), each
activation is one ``Activation`` row. Its functions take a NumPy or CuPy array ``h`` of any
shape, float32 or float64, and return an array of the same shape and dtype; the math is written
once against ``xp = get_xp(h)``. The same formulas, operation for operation, live in
``kernels/activations.cuh`` (the functor named by ``Activation.cuda``), and the host test
compares the two on a grid with 0, ±tiny, ±large and ±inf. The row type is in
``_activation_row``; the parameterised rows and their spelling in ``_activation_params``; mish,
selu, hard_swish, hard_sigmoid, softsign and log_sigmoid in ``_activation_more``.

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

import copyreg
import dataclasses
import numbers

import numpy as np

from .activation_more import ROWS as _MORE
from .activation_params import _FAMILIES, _canonical, _parse
from .activation_row import Activation, _array, _const, _logistic, _SAT
from .activation_row import (
    _identity_into,
    _positive_into,
    _relu_into,
    _sigmoid_df_y_into,
    _tanh_df_y_into,
    _tanh_into,
)
from .erf import erf, erfc

__all__ = ["Activation", "erf", "erfc", "get", "names", "parameters", "split_names"]


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
          "hard_tanh") + tuple(a.name for a in _MORE)  # mish, selu, hard_swish, ... (_activation_more)
_BUILT: dict[str, Activation] = {a.name: a for a in _FIXED + _MORE}  # canonical name -> row (parameterised ones on demand)


class UnknownActivationError(KeyError, ValueError):
    """An activation name that is not in the table; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


def _is_table_row(act: Activation) -> bool:
    """True when ``act`` is the row ``get(act.name)`` gives (what pickling relies on)."""
    return _BUILT.get(act.name) is act


def _reduce_row(act: Activation):
    """Pickle a table row as its spelling: the parameterised rows hold closures, which pickle
    cannot carry, and ``get(name)`` rebuilds the same row (the very object, in the process that
    loads it) — so networks go to process pools and Dask's process workers. A row built by hand,
    not in the table, pickles field by field (its functions must then be module-level)."""
    if _is_table_row(act):
        return get, (act.name,)
    return Activation, tuple(getattr(act, f.name) for f in dataclasses.fields(act))


copyreg.pickle(Activation, _reduce_row)


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
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"activation {base!r}: {key} must be a real number, got {value!r}")
        value = float(value)
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

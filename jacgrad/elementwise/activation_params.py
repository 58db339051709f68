"""The parameterised rows of the activation table — leaky_relu(negative_slope), elu(alpha),
softplus(beta, threshold), hard_tanh(min_val, max_val) — with torch's defaults, and their one
string spelling ``name(key=value,...)`` (``jacgrad.elementwise.activations.get`` reads and writes it)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .activation_row import _array, _const, _logistic
from ..core.backend import get_xp

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


# a number as Python writes a float: no underscores, no hex; nan and inf are read so that ``get``
# can refuse them by name
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf|infinity)", re.IGNORECASE)
_KEY = re.compile(r"[A-Za-z_]\w*")


def _parse(name: str) -> tuple[str, dict]:
    """``"hard_tanh(min_val=-2.0,max_val=2.0)"`` -> ``("hard_tanh", {"min_val": -2.0, "max_val": 2.0})``.

    Spaces around the parts are allowed; anything else not of the form ``name(key=value,...)`` is a
    ``ValueError`` naming what is wrong: a key given twice, an empty entry or an empty list, a
    value without its key, a value that is not a plain decimal number, text after the ``)``."""
    base, _, rest = name.strip().partition("(")
    base = base.strip()
    if not rest:
        return base, {}
    rest = rest.rstrip()
    if not rest.endswith(")"):
        raise ValueError(f"activation {name!r}: the parameters must be closed by ')', as in 'elu(alpha=0.5)'")
    body = rest[:-1]
    if "(" in body or ")" in body:
        raise ValueError(f"activation {name!r}: one parenthesised list of key=value parameters, as in 'elu(alpha=0.5)'")
    if not body.strip():
        raise ValueError(f"activation {name!r}: an empty parameter list; write {base!r} for the defaults")
    params: dict = {}
    for item in (part.strip() for part in body.split(",")):
        if not item:
            raise ValueError(f"activation {name!r}: an empty entry between commas")
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise ValueError(f"activation {name!r}: {item!r} has no key; write each parameter as key=value, as in "
                             f"'elu(alpha=0.5)' (positional values are not accepted)")
        if not _KEY.fullmatch(key):
            raise ValueError(f"activation {name!r}: {item!r} does not start with a parameter name")
        if key in params:
            raise ValueError(f"activation {name!r}: {key} is given twice")
        if not _NUMBER.fullmatch(value):
            raise ValueError(f"activation {name!r}: parameter {key} = {value!r} is not a number")
        params[key] = float(value)
    return base, params


def _canonical(family: _Family, params: dict) -> str:
    changed = [f"{p}={params[p]!r}" for p, default in family.defaults if params[p] != default]
    return f"{family.name}({','.join(changed)})" if changed else family.name

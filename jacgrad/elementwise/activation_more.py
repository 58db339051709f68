"""The rows of the activation table after the first eleven: mish, selu, hard_swish, hard_sigmoid,
softsign, log_sigmoid — torch's definitions (``F.mish``, ``F.selu``, ``F.hardswish``,
``F.hardsigmoid``, ``F.softsign``, ``F.logsigmoid``), their derivatives with torch autograd's
values at the kinks, and the same formulas, operation for operation, as the functors ``Mish``,
``Selu``, ``HardSwish``, ``HardSigmoid``, ``Softsign``, ``LogSigmoid`` of ``kernels/activations.cuh``.

Conventions (``jacgrad.elementwise.activations`` has the table's): finite and warning-free at ±inf with the
limits the math gives (mish(-inf) = 0, hard_swish(-inf) = 0, softsign(±inf) = ±1, where torch's
own formulas give NaN), NaN propagates through ``f``; at the kinks torch's autograd values:
selu'(0) = scale·alpha, hard_swish'(-3) = 0 and hard_swish'(3) = 1 (the outer pieces: torch
2.x's hardswish_backward), hard_sigmoid'(±3) = 0. One deliberate difference: torch's float64
hardsigmoid backward multiplies by a float32 1/6 (0.16666667163...); ours is 1/6 in the input's
dtype.

    >>> import numpy as np
    >>> [round(float(r.f(np.array(1.0))), 6) for r in ROWS]
    [0.865098, 1.050701, 0.666667, 0.666667, 0.5, -0.313262]
"""

from __future__ import annotations

from .activation_row import Activation, _array, _const, _logistic, _SAT

__all__ = ["ROWS"]

# torch's SELU constants (torch/nn/functional.py, ATen's selu): φ = scale·(max(0, h) + min(0, alpha·(e^h − 1)))
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_SELU_SA = SELU_SCALE * SELU_ALPHA

# |h| beyond which 1 + |h| == |h| in float32 and float64 (2^60): softsign is exactly ±1 there, and
# clamping to it keeps inf/inf from becoming NaN. Same constant as in the .cuh.
_BIG = 1.152921504606846976e18


# --- mish: h·tanh(softplus(h)) ------------------------------------------------------------

def _mish_parts(h, xp):
    """``(c, t, 1 − t)`` with ``t = tanh(softplus(c))``, ``c = h`` clamped to ±_SAT, written with
    ``e = exp(−|c|)``: for h ≤ 0, ``n = e(e + 2)``, ``t = n/(n + 2)``; for h > 0 (``e = e^−h``),
    ``t = (1 + 2e)/(1 + 2e + 2e²)`` — no overflow, and ``1 − t`` without cancellation."""
    c = xp.clip(h, _const(h, -_SAT), _const(h, _SAT))
    e = xp.exp(-xp.abs(c))
    neg = c <= 0
    num = xp.where(neg, e * (e + 2.0), 1.0 + 2.0 * e)
    rest = xp.where(neg, _const(h, 2.0), 2.0 * (e * e))
    den = num + rest
    return c, num / den, rest / den


def _mish_f(h):
    h, xp = _array(h)
    _, t, _ = _mish_parts(h, xp)
    return xp.maximum(h, _const(h, -_SAT)) * t


def _mish_df(h):
    # tanh(sp) + h·σ(h)·sech²(sp), sech² = (1 − t)(1 + t): torch's mish_backward
    h, xp = _array(h)
    c, t, omt = _mish_parts(h, xp)
    s, _ = _logistic(c, xp)
    return t + c * s * (omt * (1.0 + t))


def _mish_f_and_df(h):
    h, xp = _array(h)
    c, t, omt = _mish_parts(h, xp)
    s, _ = _logistic(c, xp)
    return xp.maximum(h, _const(h, -_SAT)) * t, t + c * s * (omt * (1.0 + t))


# --- selu ---------------------------------------------------------------------------------

def _selu_f(h):
    h, xp = _array(h)
    return xp.where(h > 0, SELU_SCALE * h, _SELU_SA * xp.expm1(xp.minimum(h, _const(h, 0.0))))


def _selu_df(h):  # torch: scale·alpha·e^h for h ≤ 0, so selu'(0) = scale·alpha
    h, xp = _array(h)
    return xp.where(h > 0, _const(h, SELU_SCALE), _SELU_SA * xp.exp(xp.minimum(h, _const(h, 0.0))))


def _selu_df_y(y):  # y > 0 ⇔ h > 0; below, scale·alpha·e^h = y + scale·alpha
    y, xp = _array(y)
    return xp.where(y > 0, _const(y, SELU_SCALE), y + _SELU_SA)


# --- hard_swish, hard_sigmoid: piecewise -------------------------------------------------

def _hard_swish_f(h):  # h·clip(h + 3, 0, 6)/6, h clamped below so that -inf·0 stays 0
    h, xp = _array(h)
    return xp.maximum(h, _const(h, -_SAT)) * xp.clip(h + 3.0, _const(h, 0.0), _const(h, 6.0)) / 6.0


def _hard_swish_df(h):  # torch: 0 up to -3, h/3 + 1/2 strictly inside (-3, 3), 1 from 3 on
    h, xp = _array(h)
    mid = h / 3.0 + 0.5
    return xp.where(h <= -3.0, _const(h, 0.0), xp.where(h < 3.0, mid, _const(h, 1.0)))


def _hard_sigmoid_f(h):
    h, xp = _array(h)
    return xp.clip(h + 3.0, _const(h, 0.0), _const(h, 6.0)) / 6.0


def _hard_sigmoid_df(x):  # 1/6 strictly inside (-3, 3), 0 at and beyond the kinks (torch)
    x, xp = _array(x)
    return xp.where((x > -3.0) & (x < 3.0), _const(x, 1.0 / 6.0), _const(x, 0.0))


# --- softsign, log_sigmoid ----------------------------------------------------------------

def _softsign_f(h):
    h, xp = _array(h)
    c = xp.clip(h, _const(h, -_BIG), _const(h, _BIG))
    return c / (1.0 + xp.abs(c))


def _softsign_df(h):  # 1/(1 + |h|)², as the reciprocal squared: no overflow
    h, xp = _array(h)
    r = 1.0 / (1.0 + xp.abs(h))
    return r * r


def _softsign_df_y(y):  # 1 − |y| = 1/(1 + |h|)
    y, xp = _array(y)
    r = 1.0 - xp.abs(y)
    return r * r


def _log_sigmoid_f(h):  # torch: min(h, 0) − log1p(exp(−|h|))
    h, xp = _array(h)
    return xp.minimum(h, _const(h, 0.0)) - xp.log1p(xp.exp(-xp.abs(h)))


def _log_sigmoid_df(h):  # σ(−h)
    h, xp = _array(h)
    return _logistic(-h, xp)[0]


def _log_sigmoid_df_y(y):  # σ(−h) = 1 − e^y (y ≤ 0; a larger y, no output of φ, is read as 0)
    y, xp = _array(y)
    return -xp.expm1(xp.minimum(y, _const(y, 0.0)))


# bound = sup |φ'|: mish's at h = 1.4905711794854284592944... where φ'' = 0, φ' = 1.0884981612517278612282...
# (mpmath, 60 digits), rounded up to a double and raised 4 ulp more, as the table's other smooth rows;
# selu's scale·alpha (h → 0⁻), hard_swish's 1.5 (as h → 3⁻), hard_sigmoid's 1/6, softsign's and
# log_sigmoid's 1 (at 0, and as h → -inf).
ROWS = (
    Activation("mish", _mish_f, _mish_df, None, 1.088498161251729, "jacgrad::Mish", f_and_df=_mish_f_and_df),
    Activation("selu", _selu_f, _selu_df, _selu_df_y, _SELU_SA, "jacgrad::Selu", kinks=(0.0,)),
    Activation("hard_swish", _hard_swish_f, _hard_swish_df, None, 1.5, "jacgrad::HardSwish", kinks=(-3.0, 3.0)),
    # no derivative from the output: y = (h + 3)/6 rounds to 1 for h within 2 ulp below 3, where φ' is 1/6
    Activation("hard_sigmoid", _hard_sigmoid_f, _hard_sigmoid_df, None, 1.0 / 6.0,
               "jacgrad::HardSigmoid", kinks=(-3.0, 3.0)),
    Activation("softsign", _softsign_f, _softsign_df, _softsign_df_y, 1.0, "jacgrad::Softsign"),
    Activation("log_sigmoid", _log_sigmoid_f, _log_sigmoid_df, _log_sigmoid_df_y, 1.0, "jacgrad::LogSigmoid"),
)

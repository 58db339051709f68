"""One row of the activation table (``jacgrad.elementwise.activations``), the helpers every row's math uses, and
the forms of the common rows that write into buffers (``Activation.f_into``, ``df_from_output_into``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..core.validation import float_array
from ..core.backend import get_xp

__all__ = ["Activation"]

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

    A row pickles as its spelling (``activations`` registers the reducer with ``copyreg``).
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

"""erf and erfc for NumPy arrays (NumPy has none), and for CuPy arrays through CUDA's.

The NumPy version follows Sun's fdlibm ``s_erf.c`` (the algorithm behind glibc's and musl's
``erf``/``erfc``, hence behind ``math.erf``): rational approximations on [0, 0.84375),
[0.84375, 1.25), [1.25, 1/0.35), [1/0.35, 28) and a constant beyond, with exp(-x²) split as
exp(-s²)·exp((s-x)(s+x)) for s = x with its low 32 bits cleared so the tail keeps full
relative accuracy. It is within 1 ulp of ``math.erf``/``math.erfc`` in float64.

float32 inputs are evaluated in float64 and rounded once to float32; the result has the
input's dtype. ``erfc`` of float32 (the normal CDF of ``gelu``) has a faster form of its own:
erfc(|x|) = t·exp(g(t) − x²), t = 1/(1 + |x|/2), with g a degree-13 polynomial fitted to
1.3e-10 (``tools/fit_erfc32.py``), evaluated in float64 in cache-sized chunks without masks,
so it is within 0.51 ulp of the true value (0.04% of results not correctly rounded) at about a
third of the cost of the fdlibm path.

The coefficients are fdlibm's, under this notice:

    Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
    Developed at SunPro, a Sun Microsystems, Inc. business.
    Permission to use, copy, modify, and distribute this software is freely granted,
    provided that this notice is preserved.

    >>> import numpy as np
    >>> float(erf(np.array(0.5)))  # math.erf(0.5)
    0.5204998778130465
"""

from __future__ import annotations

import numpy as np

from ..core.cuda_build import special
from ..core.backend import is_gpu_array

__all__ = ["erf", "erfc"]

_ERX = 8.45062911510467529297e-01  # erf(1) rounded to 24 bits
_EFX = 1.28379167095512586316e-01  # 2/sqrt(pi) - 1
# erf(x) = x + x·P(x²)/Q(x²) on |x| < 0.84375
_PP = (1.28379167095512558561e-01, -3.25042107247001499370e-01, -2.84817495755985104766e-02,
       -5.77027029648944159157e-03, -2.37630166566501626084e-05)
_QQ = (1.0, 3.97917223959155352819e-01, 6.50222499887672944485e-02, 5.08130628187576562776e-03,
       1.32494738004321644526e-04, -3.96022827877536812320e-06)
# erf(1 + s) = erx + P(s)/Q(s) on 0.84375 <= |x| < 1.25
_PA = (-2.36211856075265944077e-03, 4.14856118683748331666e-01, -3.72207876035701323847e-01,
       3.18346619901161753674e-01, -1.10894694282396677476e-01, 3.54783043256182359371e-02,
       -2.16637559486879084300e-03)
_QA = (1.0, 1.06420880400844228286e-01, 5.40397917702171048937e-01, 7.18286544141962662868e-02,
       1.26171219808761642112e-01, 1.36370839120290507362e-02, 1.19844998467991074170e-02)
# erfc(x) = exp(-x² - 0.5625 + R(1/x²)/S(1/x²)) / x on [1.25, 1/0.35) ...
_RA = (-9.86494403484714822705e-03, -6.93858572707181764372e-01, -1.05586262253232909814e+01,
       -6.23753324503260060396e+01, -1.62396669462573470355e+02, -1.84605092906711035994e+02,
       -8.12874355063065934246e+01, -9.81432934416914548592e+00)
_SA = (1.0, 1.96512716674392571292e+01, 1.37657754143519042600e+02, 4.34565877475229228821e+02,
       6.45387271733267880336e+02, 4.29008140027567833386e+02, 1.08635005541779435134e+02,
       6.57024977031928170135e+00, -6.04244152148580987438e-02)
# ... and on [1/0.35, 28)
_RB = (-9.86494292470009928597e-03, -7.99283237680523006574e-01, -1.77579549177547519889e+01,
       -1.60636384855821916062e+02, -6.37566443368389627722e+02, -1.02509513161107724954e+03,
       -4.83519191608651397019e+02)
_SB = (1.0, 3.03380607434824582924e+01, 3.25792512996573918826e+02, 1.53672958608443695994e+03,
       3.19985821950859553908e+03, 2.55305040643316442583e+03, 4.74528541206955367215e+02,
       -2.24409524465858183362e+01)


def _poly(coeffs, z):
    """coeffs[0] + z·(coeffs[1] + z·(...)) by Horner, as fdlibm nests it."""
    acc = np.full_like(z, coeffs[-1])
    for c in coeffs[-2::-1]:
        acc *= z
        acc += c
    return acc


def _small(x):
    """erf(x) - x, divided by x, on |x| < 0.84375."""
    z = x * x
    return _poly(_PP, z) / _poly(_QQ, z)


def _near_one(ax):
    """erf(|x|) - erx on 0.84375 <= |x| < 1.25."""
    s = ax - 1.0
    return _poly(_PA, s) / _poly(_QA, s)


def _tail(ax):
    """erfc(|x|) on 1.25 <= |x| < 28 (exact-tail form, never 1 - erf)."""
    s = 1.0 / (ax * ax)
    near = ax < 1 / 0.35
    ratio = np.where(near, _poly(_RA, s) / _poly(_SA, s), _poly(_RB, s) / _poly(_SB, s))
    z = (ax.view(np.uint64) & np.uint64(0xFFFFFFFF00000000)).view(np.float64)
    return np.exp(-z * z - 0.5625) * np.exp((z - ax) * (z + ax) + ratio) / ax


def _regions(x, tiny_below):
    """Masks of x's elements: (tiny, small, near_one, tail); |x| >= 28 and NaN are in none."""
    ax = np.abs(x)
    tiny = ax < tiny_below
    small = (ax < 0.84375) & ~tiny
    near_one = (ax >= 0.84375) & (ax < 1.25)
    tail = (ax >= 1.25) & (ax < 28.0)
    return tiny, small, near_one, tail


def _erf64(x):
    tiny, small, near_one, tail = _regions(x, 2.0**-28)
    out = np.sign(x)  # |x| >= 28 (and +-inf): +-1; NaN stays NaN; +-0 stays +-0
    # tiny: x + efx·x, scaled by 8 so subnormal x keeps its bits
    out[tiny] = 0.125 * (8.0 * x[tiny] + (8.0 * _EFX) * x[tiny])
    xs = x[small]
    out[small] = xs + xs * _small(xs)
    xn = x[near_one]
    out[near_one] = np.copysign(_ERX + _near_one(np.abs(xn)), xn)
    xt = x[tail]
    out[tail] = np.copysign(1.0 - _tail(np.abs(xt)), xt)
    return out


def _erfc64(x):
    # below 2**-56, erf(x) < ulp(1)/2 and erfc(x) rounds to 1 - x
    tiny, small, near_one, tail = _regions(x, 2.0**-56)
    out = np.where(x > 0, 0.0, 2.0)  # |x| >= 28 and +-inf
    out[np.isnan(x)] = np.nan
    out[tiny] = 1.0 - x[tiny]
    xs = x[small]
    y = _small(xs)
    # below 1/4, 1 - erf loses nothing; above it, regroup so 0.5 absorbs the rounding
    out[small] = np.where(xs < 0.25, 1.0 - (xs + xs * y), 0.5 - (xs * y + (xs - 0.5)))
    xn = x[near_one]
    p = _near_one(np.abs(xn))
    out[near_one] = np.where(xn > 0, (1.0 - _ERX) - p, 1.0 + (_ERX + p))
    xt = x[tail]
    r = _tail(np.abs(xt))
    out[tail] = np.where(xt > 0, r, 2.0 - r)
    return out


# erfc(|x|) = t·exp(g(t) − x²) for float32: see the module docstring and tools/fit_erfc32.py
_G32 = (-0.5631567857103916, 0.5746099746163724, 0.016716069156522184, -0.030147671397386434,
        -0.001230864741045203, 0.0038772993126169266, -0.0002664000477965634, -0.0005876728177541567,
        0.00015140615038793445, 7.481518312770161e-05, -4.0812725886090576e-05, -4.635572468640486e-06,
        5.598329301652197e-06, -3.196414906397585e-07)  # in u = (t - 0.58) / 0.42, low to high
_Z_MAX32 = 10.5  # erfc(10.5) < 1e-49: 0 in float32
_CHUNK = 16384  # float64 work arrays of 128 KiB: every pass of a chunk stays in cache


def _erfc32(x):
    """erfc of a float32 array (any shape) → float32, via ``_G32`` in float64, chunk by chunk."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty(flat.shape, np.float32)
    m = min(flat.size, _CHUNK)
    z, t, u, acc, w = np.empty(m), np.empty(m), np.empty(m), np.empty(m), np.empty(m)
    top, rest = _G32[-1], _G32[-2::-1]
    for start in range(0, flat.size, _CHUNK):
        stop = min(flat.size, start + _CHUNK)
        n = stop - start
        zc, tc, uc, ac, wc = z[:n], t[:n], u[:n], acc[:n], w[:n]
        zc[...] = flat[start:stop]
        np.copysign(1.0, zc, out=wc)
        np.subtract(1.0, wc, out=wc)  # 0 where x ≥ +0, 2 where x ≤ -0
        np.abs(zc, out=zc)
        np.minimum(zc, _Z_MAX32, out=zc)  # NaN stays NaN; inf becomes Z_MAX (erfc rounds to 0)
        np.multiply(zc, 0.5, out=tc)
        tc += 1.0
        np.reciprocal(tc, out=tc)
        np.subtract(tc, 0.58, out=uc)
        uc *= 1.0 / 0.42
        ac.fill(top)
        for c in rest:
            ac *= uc
            ac += c
        zc *= zc
        ac -= zc
        np.exp(ac, out=ac)
        ac *= tc
        np.subtract(1.0, ac, out=uc)  # erfc(-z) = 2 - erfc(z) = r + 2(1 - r): r + w(1 - r), no masked ufunc
        uc *= wc
        ac += uc
        out[start:stop] = ac
    return out.reshape(np.shape(x))


def _apply(name, fn64, x):
    if is_gpu_array(x):
        return special(name, x)  # CUDA's own, through jacgrad.core.cuda_build (below the activation table)
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} takes float32 or float64 arrays, not {x.dtype}")
    with np.errstate(under="ignore"):  # the far tail underflows to 0 by design
        if name == "erfc" and x.dtype == np.float32:
            return _erfc32(x)
        out = fn64(np.atleast_1d(x).astype(np.float64, copy=True))
    return out.reshape(x.shape).astype(x.dtype, copy=False)


def erf(x):
    """The error function, elementwise. x: any shape, float32 or float64 → same shape and dtype."""
    return _apply("erf", _erf64, x)


def erfc(x):
    """1 - erf(x), accurate in the tail (erfc(10) ≈ 2.1e-45 to full precision). Same shapes as ``erf``."""
    return _apply("erfc", _erfc64, x)

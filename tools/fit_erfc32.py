"""Fit the float32 erfc of ``jacgrad/elementwise/erf.py`` and print its coefficients.

For z = |x| in [0, 10.5] and t = 1/(1 + z/2) in [0.16, 1], erfc(z) = t·exp(g(t) − z²) with g
smooth. g is fitted by least squares in the Chebyshev basis of u = (t − 0.58)/0.42 ∈ [−1, 1]
(degree 13, 6000 Chebyshev points, reference values from ``math.erfc``), then written as a
power series in u (evaluated by Horner in float64). Beyond z = 10.5, erfc(z) < 1e-49 rounds to
0 in float32. Its absolute error in g — the relative error of erfc before the final rounding
to float32 — is printed; the tests check the float32 results against ``math.erfc``.

    python tools/fit_erfc32.py
"""

import math

import numpy as np
from numpy.polynomial import chebyshev

Z_MAX, DEGREE, POINTS = 10.5, 13, 6000
T_MIN = 1.0 / (1.0 + Z_MAX / 2)  # 0.16
HALF, MID = (1.0 - T_MIN) / 2, (1.0 + T_MIN) / 2  # u = (t - MID) / HALF


def g_exact(t: np.ndarray) -> np.ndarray:
    z = 2.0 / t - 2.0
    return np.array([math.log(math.erfc(zi) / ti) + zi * zi for zi, ti in zip(z, t)])


def main() -> None:
    t = np.cos(np.linspace(0.0, np.pi, POINTS)) * HALF + MID
    coeffs = chebyshev.cheb2poly(chebyshev.chebfit((t - MID) / HALF, g_exact(t), DEGREE))
    check = np.linspace(T_MIN, 1.0, 100_001)
    err = np.abs(np.polynomial.polynomial.polyval((check - MID) / HALF, coeffs) - g_exact(check)).max()
    print(f"T_MIN = {T_MIN!r}; u = (t - {MID!r}) / {HALF!r}; max |error of g| = {err:.2e}")
    print("_G32 = (" + ", ".join(repr(float(c)) for c in coeffs) + ")  # low to high")


if __name__ == "__main__":
    main()

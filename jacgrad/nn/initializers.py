"""Weight initialisations, one row per scheme: ``W: (fan_in, fan_out)`` drawn in float64 on the host.

Drawing on the host from one NumPy generator is what makes "same seed, same weights" hold on
every device and dtype: the network casts and moves the float64 draw afterwards.

| name            | distribution of W[i, j]                              | source                        |
|-----------------|------------------------------------------------------|-------------------------------|
| normal          | N(0, gain² / fan_in)         (gain = σ_w)            | mean-field papers             |
| xavier_normal   | N(0, gain² · 2 / (fan_in + fan_out))                 | Glorot & Bengio 2010          |
| xavier_uniform  | U[±gain · √6 / √(fan_in + fan_out)]  ("normalised")  | Glorot & Bengio 2010          |
| he_normal       | N(0, gain² · 2 / fan_in)                             | He et al. 2015                |
| he_uniform      | U[±gain · √6 / √fan_in]                              | He et al. 2015                |
| lecun_normal    | N(0, gain² / fan_in)                                 | LeCun et al. 1998             |
| orthogonal      | gain · Haar-random orthonormal rows or columns        | Saxe et al. 2014              |
| uniform_fan_in  | U[±gain / √fan_in]            ("standard")            | Glorot & Bengio 2010, eq. 15  |
"""

from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["INITS", "init_weight", "names"]


def _normal(std: Callable[[int, int], float]):
    return lambda fan_in, fan_out, gain, rng: rng.normal(0.0, gain * std(fan_in, fan_out), (fan_in, fan_out))


def _uniform(limit: Callable[[int, int], float]):
    def draw(fan_in, fan_out, gain, rng):
        a = gain * limit(fan_in, fan_out)
        return rng.uniform(-a, a, (fan_in, fan_out))

    return draw


def _orthogonal(fan_in: int, fan_out: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Haar-distributed: QR of a Gaussian matrix with R's diagonal signs folded into Q
    (Mezzadri 2007). Rectangular: orthonormal columns when fan_in ≥ fan_out, rows otherwise."""
    big, small = max(fan_in, fan_out), min(fan_in, fan_out)
    q, r = np.linalg.qr(rng.standard_normal((big, small)))
    q *= np.where(np.diag(r) < 0, -1.0, 1.0)
    return gain * (q if fan_in >= fan_out else q.T)


INITS: dict[str, Callable] = {
    "normal": _normal(lambda i, o: 1.0 / np.sqrt(i)),
    "xavier_normal": _normal(lambda i, o: np.sqrt(2.0 / (i + o))),
    "xavier_uniform": _uniform(lambda i, o: np.sqrt(6.0 / (i + o))),
    "he_normal": _normal(lambda i, o: np.sqrt(2.0 / i)),
    "he_uniform": _uniform(lambda i, o: np.sqrt(6.0 / i)),
    "lecun_normal": _normal(lambda i, o: np.sqrt(1.0 / i)),
    "orthogonal": _orthogonal,
    "uniform_fan_in": _uniform(lambda i, o: 1.0 / np.sqrt(i)),
}


def names() -> list[str]:
    return list(INITS)


def init_weight(name: str, fan_in: int, fan_out: int, gain: float, rng: np.random.Generator) -> np.ndarray:
    """One float64 weight matrix ``(fan_in, fan_out)`` drawn by scheme ``name``."""
    try:
        draw = INITS[name]
    except KeyError:
        raise KeyError(f"unknown init {name!r}; valid names: {', '.join(INITS)}") from None
    gain = float(gain)
    if not np.isfinite(gain) or gain < 0:  # a negative gain would silently flip orthogonal's signs
        raise ValueError(f"gain must be finite and ≥ 0, got {gain}")
    return draw(fan_in, fan_out, gain, rng)

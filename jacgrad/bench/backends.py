"""The registry of ``jacgrad bench`` backends: jacgrad on NumPy and CuPy, and the peers.

    >>> names()
    ['jacgrad-numpy', 'jacgrad-cupy', 'torch-cpu', 'torch-cuda', 'jax-cpu', 'jax-gpu']
"""

from __future__ import annotations

from .backend_jacgrad import Jacgrad
from .base import Backend, Prepared
from .peer_jax import Jax
from .peer_torch import Torch

__all__ = ["BACKENDS", "Backend", "Prepared", "get", "names"]

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Jacgrad("cpu"), Jacgrad("gpu"), Torch("cpu"), Torch("gpu"), Jax("cpu"), Jax("gpu"))}


def names() -> list[str]:
    """``jacgrad-numpy, jacgrad-cupy, torch-cpu, torch-cuda, jax-cpu, jax-gpu``."""
    return list(BACKENDS)


def get(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise KeyError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}") from None

"""jacgrad: the chain rule of deep networks with every dense layer's Jacobian kept as
its two factors, diag(φ'(h))·Wᵀ — VJPs, JVPs, per-sample Jacobians, spectra and
gradient-flow diagnostics, on NumPy and on CuPy with the same results."""

from . import backend
from .backend import get_xp, to_device, to_numpy

__version__ = "0.1.0"

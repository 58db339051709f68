"""jacgrad: the chain rule of deep networks with every dense layer's Jacobian kept as
its two factors, diag(φ'(h))·Wᵀ — VJPs, JVPs, per-sample Jacobians, spectra and
gradient-flow diagnostics, on NumPy and on CuPy with the same results.

    >>> import numpy as np, jacgrad as jg
    >>> J = jg.LayerJacobian(np.array([0.5, 1.0]), np.eye(2))
    >>> jg.Chain([J, J]).jacobian()
    array([[0.25, 0.  ],
           [0.  , 1.  ]])
"""

from . import (
    activations,
    backend,
    block_flow,
    chain,
    check,
    checkpoints,
    compiled,
    curvature,
    diagnostics,
    distributed,
    factors,
    gates,
    hostpool,
    initializers,
    jacobian,
    kernels,
    layers,
    loss_hessians,
    losses,
    mlp,
    monitor,
    per_sample,
    private,
    sequential,
    spectra,
    torch,
)
from .backend import asarray, get_xp, to_device, to_numpy
from .chain import Chain
from .checkpoints import load
from .jacobian import LayerJacobian
from .mlp import MLP
from .monitor import Monitor
from ._passes import Gradients
from .diagnostics import gradient_flow
from .interop.torch_graph import explain, from_torch
from .ntk import ntk
from .products import clipped_grad, ggn_diagonal, ggn_vp, per_sample_grad_norms, per_sample_grads
from .sequential import Sequential

__version__ = "0.1.0"

# the user's concepts; internals (backend, hostpool, kernels, the modules behind the networks and
# products) stay importable by path and as attributes (jg.backend.gpu_available(), jg.hostpool)
__all__ = [
    # networks and their layers
    "MLP", "Sequential", "layers", "Gradients", "from_torch", "explain", "load",
    # factors and chains
    "LayerJacobian", "Chain", "factors",
    # products: each also a method of the network
    "ntk", "per_sample_grads", "per_sample_grad_norms", "clipped_grad", "ggn_vp", "ggn_diagonal",
    # the gradient-flow report
    "gradient_flow", "diagnostics", "Monitor",
    # losses, activations, gates, checks, initialisers
    "losses", "activations", "gates", "check", "initializers",
    # arrays and devices
    "asarray", "to_device", "to_numpy", "get_xp",
    # scale and frameworks
    "distributed", "torch",
]

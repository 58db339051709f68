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
from .diagnostics import gradient_flow
from .interop.torch_graph import explain, from_torch
from .ntk import ntk
from .products import clipped_grad, ggn_diagonal, ggn_vp, per_sample_grad_norms, per_sample_grads
from .sequential import Sequential

__version__ = "0.1.0"

__all__ = [
    "Chain",
    "LayerJacobian",
    "MLP",
    "Monitor",
    "Sequential",
    "activations",
    "asarray",
    "backend",
    "block_flow",
    "chain",
    "check",
    "checkpoints",
    "compiled",
    "curvature",
    "diagnostics",
    "distributed",
    "explain",
    "factors",
    "from_torch",
    "gates",
    "get_xp",
    "ggn_diagonal",
    "ggn_vp",
    "gradient_flow",
    "hostpool",
    "initializers",
    "jacobian",
    "kernels",
    "layers",
    "load",
    "loss_hessians",
    "losses",
    "mlp",
    "monitor",
    "ntk",
    "per_sample",
    "per_sample_grad_norms",
    "per_sample_grads",
    "clipped_grad",
    "private",
    "sequential",
    "spectra",
    "to_device",
    "to_numpy",
    "torch",
]

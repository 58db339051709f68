"""jacgrad: the chain rule of deep networks with every dense layer's Jacobian kept as
its two factors, diag(φ'(h))·Wᵀ — VJPs, JVPs, per-sample Jacobians, spectra and
gradient-flow diagnostics, on NumPy and on CuPy with the same results.

    >>> import numpy as np, jacgrad as jg
    >>> J = jg.LayerJacobian(np.array([0.5, 1.0]), np.eye(2))
    >>> jg.Chain([J, J]).jacobian()
    array([[0.25, 0.  ],
           [0.  , 1.  ]])
"""

from .elementwise import activations, gates
from .core import backend
from .flow import block_flow, diagnostics, monitor
from .algebra import chain, check, factors, jacobian, per_sample, spectra
from .models import checkpoints
from .steps import compiled
from . import distributed
from .cuda import hostpool, kernels
from .nn import initializers, layers, loss_hessians, losses
from .network import mlp, sequential, torch_dp as torch
from .params import curvature, private
from .core.backend import asarray, get_xp, to_device, to_numpy
from .algebra.chain import Chain
from .models.checkpoints import load
from .algebra.jacobian import LayerJacobian
from .network.mlp import MLP
from .flow.monitor import Monitor
from .protocol.passes import Gradients
from .flow.diagnostics import gradient_flow
from .models.graph import explain, from_torch
from .params.ntk import ntk
from .params.products import clipped_grad, ggn_diagonal, ggn_vp, per_sample_grad_norms, per_sample_grads
from .network.sequential import Sequential

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


# ---- public module paths (tools/regroup.py): ``import jacgrad.layers`` still gives jacgrad.nn.layers,
# the very module (not a copy), so imports written for the flat layout keep working.
import importlib as _importlib  # noqa: E402
import sys as _sys  # noqa: E402

_PUBLIC_PATHS = {
    "activations": "elementwise.activations",
    "backend": "core.backend",
    "check": "algebra.check",
    "compiled": "steps.compiled",
    "diagnostics": "flow.diagnostics",
    "gates": "elementwise.gates",
    "hostpool": "cuda.hostpool",
    "layers": "nn.layers",
    "losses": "nn.losses",
    "torch": "network.torch_dp",
}
for _name, _path in _PUBLIC_PATHS.items():
    _module = _importlib.import_module(f"{__name__}.{_path}")
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
    globals().setdefault(_name, _module)
del _name, _path, _module

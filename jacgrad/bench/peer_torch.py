"""PyTorch as a peer of ``jacgrad bench``: ``torch-cpu`` and ``torch-cuda`` (eager).

It computes what jacgrad computes: ``z = φ(z @ W + b)`` per layer (identity on the last), mean
squared error and ``torch.autograd.grad`` of every W and b (training step); the input cotangent
of an output cotangent through a retained graph (VJP); ``vmap(jacrev)`` and ``vmap(jacfwd)``
from ``torch.func`` (per-sample Jacobians — the better of the two is reported). The recipes of
the parameter-space tasks (torch.func, BackPACK) are in ``peer_param_space``.
"""

from __future__ import annotations

import numpy as np

from .base import Backend, Prepared, gemm_operands
from .cases import PARAM_SPACE_TASKS, NetData

__all__ = ["Torch"]


def _torch_activation(name: str):
    import torch
    import torch.nn.functional as F

    table = {
        "identity": lambda h: h,
        "relu": torch.relu,
        "leaky_relu": lambda h: F.leaky_relu(h, 0.01),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softplus": F.softplus,
        "elu": F.elu,
        "gelu": F.gelu,
        "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
        "silu": F.silu,
        "hard_tanh": F.hardtanh,
    }
    if name not in table:
        raise KeyError(f"activation {name!r} has no PyTorch twin in jacgrad bench")
    return table[name]


class Torch(Backend):
    """PyTorch eager: autograd for the training step and the VJP, ``torch.func`` for Jacobians."""

    family = "torch"

    def __init__(self, device: str):
        self.device = device

    @property
    def device_label(self) -> str:
        return "cuda" if self.device == "gpu" else "cpu"

    def unavailable(self):
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - any broken install means "not here"
            return f"torch is not importable ({type(exc).__name__})"
        if self.device == "gpu" and not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None

    def threads(self) -> str:
        import torch

        if self.device == "gpu":
            return "CUDA"
        blas = "MKL" if torch.backends.mkl.is_available() else "its BLAS"
        return f"{torch.get_num_threads()} threads ({blas})"

    def _sync(self, result):
        if self.device == "gpu":
            import torch

            torch.cuda.synchronize()

    def _tensors(self, data: NetData):
        import torch

        if self.device == "gpu":
            torch.backends.cuda.matmul.allow_tf32 = False  # full float32, as jacgrad and CuPy compute

        dev = "cuda" if self.device == "gpu" else "cpu"
        to = lambda a: torch.tensor(data.cast(a), device=dev)  # noqa: E731
        return to, [to(W) for W in data.weights], [to(b) for b in data.biases]

    def prepare(self, case, data):
        import torch

        if case.spec is not None:  # the CNN / transformer (models)
            from .models import prepare_torch

            return prepare_torch(case, data.dtype, self._sync, self.device)
        to, Ws, bs = self._tensors(data)
        acts = [_torch_activation(a) for a in data.activations]
        x, t, v = to(data.x), to(data.target), to(data.v)
        if case.task in PARAM_SPACE_TASKS:
            from .peer_param_space import prepare_param_space

            def fmlp(p, z):  # the net on the tuple (W_0, b_0, W_1, b_1, …)
                for W, b, f in zip(p[0::2], p[1::2], acts):
                    z = f(z @ W + b)
                return z

            return prepare_param_space(case, data, fmlp, tuple(p for wb in zip(Ws, bs) for p in wb), to, self._sync)

        def mlp(z):
            for W, b, f in zip(Ws, bs, acts):
                z = f(z @ W + b)
            return z

        if case.task == "train":
            params = Ws + bs
            for p in params:
                p.requires_grad_(True)

            def fn():
                loss = ((mlp(x) - t) ** 2).mean()
                return loss, torch.autograd.grad(loss, params)

            def outputs(r):
                return [np.asarray(a.detach().cpu().numpy(), dtype=np.float64) for a in (r[0], *r[1])]

            return Prepared({"": fn}, self._sync, outputs)
        if case.task == "vjp":
            xr = x.clone().requires_grad_(True)
            y = mlp(xr)

            def fn():
                return torch.autograd.grad(y, xr, v, retain_graph=True)[0]

            return Prepared({"": fn}, self._sync, lambda r: [r.cpu().numpy().astype(np.float64)])
        from torch.func import jacfwd, jacrev, vmap

        rev, fwd = vmap(jacrev(mlp)), vmap(jacfwd(mlp))
        return Prepared({"jacrev": lambda: rev(x), "jacfwd": lambda: fwd(x)}, self._sync,
                        lambda r: [r.cpu().numpy().astype(np.float64)])

    def gemm_floor(self, gemms, dtype):
        import torch

        dev = "cuda" if self.device == "gpu" else "cpu"
        gen = torch.Generator().manual_seed(0)
        tdt = getattr(torch, dtype)
        ops = gemm_operands(gemms, lambda s: torch.randn(s, generator=gen, dtype=tdt).to(dev))
        ops = [(a.mT if lay == "tn" else a, b.mT if lay == "nt" else b, c) for a, b, c, lay in ops]

        def fn():
            with torch.no_grad():
                for a, b, c in ops:
                    torch.matmul(a, b, out=c)
            return c

        return Prepared({"": fn}, self._sync)

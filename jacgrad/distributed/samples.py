"""The per-sample quantities over a whole dataset: outputs and input-output Jacobian spectra.

Each is ``map_samples`` of the network's own single-batch code on one chunk, with the memory
estimate of that code (``budget``): Dask in, lazy Dask out; NumPy/CuPy in, computed in chunks.
"""

from __future__ import annotations

from typing import Any

from ..core.validation import require_network
from . import budget
from .mapping import map_samples

__all__ = ["forward", "jacobian_singular_values", "jacobian_spectral_norm", "lazy_method"]


def forward(net, X, *, max_memory: int | None = None):
    """``net(x)`` over the batch: ``X: (N, n_in) -> (N, n_out)``; ``net(X)`` with a Dask ``X``
    comes here.

        >>> import numpy as np, dask.array as da, jacgrad as jg
        >>> net = jg.MLP.init([3, 4, 2], seed=0)
        >>> X = da.ones((10, 3), chunks=(5, 3))
        >>> Y = net(X)
        >>> Y.chunks, bool(np.allclose(Y.compute(), net(np.ones((10, 3)))))
        (((5, 5), (2,)), True)
    """
    require_network(net, "jacgrad.distributed.forward")
    return map_samples(_outputs, net, X, out_shape=(net.sizes[-1],), bytes_per_sample=budget.forward_bytes,
                       max_memory=max_memory)


def jacobian_spectral_norm(net, X, *, method: str = "auto", max_memory: int | None = None):
    """‖∂y/∂x‖₂ of every sample: ``X: (N, n_in) -> (N,)``, by ``Chain.spectral_norm(method)``
    on each chunk (``"auto"``: exact SVD while a chunk's Jacobians are small, Lanczos beyond).

        >>> import dask.array as da, jacgrad as jg
        >>> net = jg.MLP.init([3, 4, 2], seed=0)
        >>> s = jg.distributed.jacobian_spectral_norm(net, da.ones((10, 3), chunks=(5, 3)))
        >>> s.shape, s.chunks
        ((10,), ((5, 5),))
    """
    require_network(net, "jacgrad.distributed.jacobian_spectral_norm")
    if method not in ("auto", "exact", "lanczos", "power"):
        raise ValueError(f"method {method!r} is not one of auto, exact, lanczos, power")
    return map_samples(_SpectralNorm(method), net, X, bytes_per_sample=budget.jacobian_bytes, max_memory=max_memory)


def jacobian_singular_values(net, X, k: int | None = None, *, max_memory: int | None = None):
    """The ``k`` largest singular values of every sample's ``∂y/∂x``, descending: ``(N, k)``;
    ``k=None`` gives all ``min(n_in, n_out)``. Exact (``Chain.singular_values``) per chunk."""
    require_network(net, "jacgrad.distributed.jacobian_singular_values")
    full = min(int(net.sizes[0]), int(net.sizes[-1]))
    k = full if k is None else int(k)
    if not 1 <= k <= full:
        raise ValueError(f"k={k} singular values asked for, but each Jacobian is "
                         f"{net.sizes[-1]} x {net.sizes[0]}: k must be in [1, {full}]")
    return map_samples(_SingularValues(k), net, X, out_shape=(k,), bytes_per_sample=budget.jacobian_bytes,
                       max_memory=max_memory)


def _outputs(net, x):
    return net.forward(x)[0]


class _SpectralNorm:
    """``f(net, x) -> (b,)``: a picklable per-chunk function (a class, not a closure)."""

    __name__ = "jacobian_spectral_norm"

    def __init__(self, method: str):
        self.method = method

    def __call__(self, net, x):
        return net.jacobian_chain(net.forward(x)[1]).spectral_norm(method=self.method)


class _SingularValues:
    __name__ = "jacobian_singular_values"

    def __init__(self, k: int):
        self.k = k

    def __call__(self, net, x):
        s = net.jacobian_chain(net.forward(x)[1]).singular_values()
        return s[:, : self.k] if s.shape[1] != self.k else s


class _Method:
    """``f(net, x, *t) = net.<name>(x, *t, **kwargs)``: a network method mapped over chunks."""

    def __init__(self, name: str, kwargs: dict):
        self.name, self.kwargs = name, kwargs
        self.__name__ = name

    def __call__(self, net, x, *others):
        return getattr(net, self.name)(x, *others, **self.kwargs)


def lazy_method(name: str, net, X, *args: Any, **kwargs: Any):
    """What a network method does with a Dask ``X`` (registered in ``jacgrad.core.lazy``):
    ``__call__`` is ``forward``; ``per_sample_grad_norms(X, T, loss=…, per_layer=…)`` maps the
    method over the chunks, ``(N,)`` or ``(N, L)`` with ``per_layer=True``."""
    if name == "__call__":
        return forward(net, X)
    if name == "per_sample_grad_norms":
        out = (len(net.sizes) - 1,) if kwargs.get("per_layer") else ()  # layers: MLP depth, Sequential top level
        return map_samples(_Method(name, kwargs), net, X, *args, out_shape=out)
    raise TypeError(f"{type(net).__name__}.{name} takes in-memory arrays only, not a Dask array; "
                    "jacgrad.distributed has the per-sample functions that map over Dask chunks")

"""The same computations over datasets bigger than one batch: Dask arrays chunked along the
batch (lazy in, lazy out), and NumPy/CuPy batches computed in chunks under a memory budget.

    import dask.array as da
    X = da.from_array(np.load("X.npy", mmap_mode="r"), chunks=(10_000, -1))
    s = jg.distributed.jacobian_spectral_norm(net, X)        # lazy (N,)
    sv = jg.distributed.jacobian_singular_values(net, X)     # lazy (N, k)
    Y = net(X)                                               # lazy (N, n_out)

A ``distributed.Client``, when one is active, runs the graphs; otherwise Dask's local
scheduler does. Dask itself is imported only when a Dask array is met (``pip install
jacgrad[dask]``); the NumPy paths need nothing more.

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([3, 4, 2], seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1000, 3))
    >>> s = jg.distributed.jacobian_spectral_norm(net, x, max_memory=20_000)   # chunks of 49 rows
    >>> bool(np.allclose(s, net.jacobian_chain(net.forward(x)[1]).spectral_norm()))
    True
"""

from ..core import lazy as _lazy
from . import budget
from .budget import default_max_memory
from .cluster import compute, session
from .data import DatasetError, open_npy, read_dataset
from .mapping import embed, map_samples, reduce_in_memory, reduce_samples
from .samples import forward, jacobian_singular_values, jacobian_spectral_norm, lazy_method

__all__ = [
    "DatasetError",
    "budget",
    "compute",
    "default_max_memory",
    "embed",
    "forward",
    "jacobian_singular_values",
    "jacobian_spectral_norm",
    "map_samples",
    "open_npy",
    "read_dataset",
    "reduce_in_memory",
    "reduce_samples",
    "session",
]

_lazy.register("dask", lazy_method)

"""Where the networks hand over chunked (lazy) arrays such as Dask arrays.

``MLP`` sits below ``jacgrad.distributed`` and may not import it, so the upper layer
registers here, when it is imported, a handler for the array types it maps over chunks;
``net(X)`` with such an ``X`` calls ``handler("__call__", net, X)``. Nothing here imports an
array library: the type is recognised by the name of its module (``dask.array.core.Array``
lives in ``dask.array``), so a NumPy call pays one ``type(x) is ndarray`` test.

    >>> import numpy as np
    >>> handler_for(np.ones(2)) is None
    True
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

__all__ = ["handler_for", "register"]

_HANDLERS: dict[str, Callable] = {}  # module prefix of the array type -> handler(name, net, *args, **kwargs)


def register(module_prefix: str, handler: Callable) -> None:
    """Send arrays whose type lives in ``module_prefix`` (or a submodule) to ``handler``."""
    _HANDLERS[module_prefix] = handler


def handler_for(x: Any) -> Callable | None:
    """The handler registered for ``x``'s type, or None (always None for NumPy arrays)."""
    if type(x) is np.ndarray or not _HANDLERS:
        return None
    module = type(x).__module__ or ""
    for prefix, handler in _HANDLERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return handler
    return None

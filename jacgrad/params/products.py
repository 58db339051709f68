"""The products as free functions: ``jg.per_sample_grad_norms(net, x, t)`` is
``net.per_sample_grad_norms(x, t)``, with the same arguments after ``net`` (one implementation, the
method's; the free spelling for code that passes networks around, as ``jg.ntk(net, x)`` and
``jg.gradient_flow(net, x)`` are spelled).

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([3, 4, 2], seed=0)
    >>> x, t = np.ones((5, 3)), np.zeros((5, 2))
    >>> bool((jg.per_sample_grad_norms(net, x, t) == net.per_sample_grad_norms(x, t)).all())
    True
    >>> net.jacobian(x).shape  # the forward-then-chain idiom in one call
    (5, 2, 3)
"""

from __future__ import annotations

import inspect

from .param_space import SequentialParameterSpace
from ..core.validation import require_network

NAMES = ("per_sample_grads", "per_sample_grad_norms", "clipped_grad", "ggn_vp", "ggn_diagonal")
__all__ = list(NAMES)


def _free(name: str):
    """``name(net, *args, **kwargs)``: ``net``'s method ``name``, after the one check of ``net``
    (``require_network``: a torch model or sklearn estimator is told which importer to call)."""
    method = getattr(SequentialParameterSpace, name)

    def product(net, *args, **kwargs):
        require_network(net, name)
        return getattr(net, name)(*args, **kwargs)

    product.__name__ = product.__qualname__ = name
    product.__module__ = __name__
    product.__doc__ = (f"``jg.{name}(net, ...)`` is ``net.{name}(...)``, with the same arguments after ``net``.\n\n"
                       + inspect.cleandoc(method.__doc__ or ""))
    sig = inspect.signature(method)
    net = inspect.Parameter("net", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    product.__signature__ = sig.replace(parameters=[net, *list(sig.parameters.values())[1:]])
    return product


per_sample_grads = _free("per_sample_grads")
per_sample_grad_norms = _free("per_sample_grad_norms")
clipped_grad = _free("clipped_grad")
ggn_vp = _free("ggn_vp")
ggn_diagonal = _free("ggn_diagonal")

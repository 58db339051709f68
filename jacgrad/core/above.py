"""Methods of a network whose code lives above the networks: ``net.gradient_flow(x)`` is
``jacgrad.flow.diagnostics.gradient_flow(net, x)``, but ``Sequential`` may not import the report (imports
point one way), so ``jacgrad.flow.diagnostics`` registers its function here when imported (``import
jacgrad`` imports it) and the method calls what is registered.

    >>> register("twice", lambda net, x: 2 * x)
    >>> call("twice", None, 3)
    6
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["call", "register"]

_FUNCS: dict[str, Callable] = {}


def register(name: str, fn: Callable) -> None:
    """Make ``net.<name>(*args)`` call ``fn(net, *args)``."""
    _FUNCS[name] = fn


def call(name: str, net, *args: Any, **kwargs: Any):
    """``fn(net, *args, **kwargs)`` of the function registered as ``name``."""
    fn = _FUNCS.get(name)
    if fn is None:
        raise RuntimeError(f"net.{name} is jacgrad.flow.diagnostics.{name}, which is not imported: import jacgrad")
    return fn(net, *args, **kwargs)

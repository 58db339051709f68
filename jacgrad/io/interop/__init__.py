"""Bring your own model: read networks made elsewhere, and write them back.

One module per framework, each importing its framework only when called (a missing framework
is an ``ImportError`` that says what to install):

- ``interop.torch``    ``nn.Sequential`` (or an iterable of modules) <-> a ``NetSpec``
- ``interop.sklearn``  a fitted ``MLPClassifier`` / ``MLPRegressor`` -> a ``NetSpec``, and
                       sklearn's loss conventions (its ``_backprop``) from jacgrad's gradients
- ``interop.flax``     ``{'Dense_0': {'kernel', 'bias'}, ...}`` parameter dicts -> a ``NetSpec``
- ``interop.torch_graph``  any torch model by graph capture (``torch.export``) -> layers and their
                       ``Sequential``
                       (``jg.from_torch``, ``jg.explain``; its op table: ``interop.torch_ops``)

The importers return plain ``NetSpec``s — weights, biases, activation names — and never build
a network themselves (``jacgrad.io.mlp_interop`` builds one from a spec: ``MLP.from_sklearn``,
``MLP.from_flax``, ``Sequential.from_flax``). Arrays of other frameworks become
NumPy or CuPy through ``jacgrad.core.backend.asarray`` (DLPack, zero-copy where possible).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["NetSpec", "Origin", "plain_message", "require"]


@dataclass
class NetSpec:
    """A dense stack as plain data: ``weights[j]: (H_{j-1}, H_j)``, ``biases[j]: (H_j,)`` or None
    for a bias-free layer (NumPy or CuPy arrays) and ``activations[j]``, one canonical activation
    name per layer.
    ``source`` says where it came from, for error messages (a file, a module); ``origin`` is
    what the network built from it remembers of that (``net.imported_from``, the link check)."""

    weights: list
    biases: list
    activations: list
    source: str = field(default="")
    origin: "Origin | None" = None


class Origin:
    """The framework a network was imported from (``net.imported_from``: ``"torch"``, ...), kept
    by the network for messages in that framework's words. ``check()`` runs before every read of
    the parameters (forward, and every use of a forward cache); nothing to check here — a
    ``copy=False`` torch import checks that the parameters still hold the memory it shares
    (``jacgrad.io.interop.torch.TorchLink``)."""

    __slots__ = ("framework",)

    def __init__(self, framework: str):
        self.framework = framework

    def check(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"Origin({self.framework!r})"


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal escape codes (torch bolds parts of some messages)


def plain_message(exc: BaseException) -> str:
    """The message of ``exc`` (another framework's error that jacgrad re-raises in its own words)
    without terminal escape codes, which a log file or notebook shows as ``[1m...[0m``.

        >>> plain_message(RuntimeError("two options, \x1b[1mdo this\x1b[0m."))
        'two options, do this.'
    """
    return _ANSI.sub("", str(exc))


def require(module: str, purpose: str, install: str):
    """Import ``module`` for ``purpose``, or raise an ``ImportError`` that says what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{purpose} needs {module}, which is not importable here ({plain_message(exc)}); "
                          f"install it: {install}") from None

"""``--model package.module:factory``: the user's own torch module, built by their own code, whose
names the ``--weights`` checkpoint's keys are matched against (``jacgrad.models.checkpoints.load``); without
``--weights`` the module is reported with the weights the factory gave it.

The module is imported as ``python -m`` would import it: the current directory first on
``sys.path`` (for the import only). Each way this can fail is one ``UsageError`` saying which:
a spec that is not ``module:attribute``, a module that is not found (or whose own imports fail),
an attribute it lacks, one that is not callable, a factory that raises or returns something that
is not a ``torch.nn.Module``.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from .common import UsageError
from .words import cli_words

__all__ = ["network_of_model", "torch_model"]

_FORMAT = "give it as package.module:factory (a function or class that builds the nn.Module, called with no arguments)"


def _a(obj) -> str:
    name = type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _words(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"


def torch_model(spec: str):
    """The ``nn.Module`` that ``factory()`` of ``package.module:factory`` returns."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not all(p.isidentifier() for p in module_name.split(".")) \
            or not all(p.isidentifier() for p in attr.split(".")):
        raise UsageError(f"--model {spec!r} is not a module and a factory: {_FORMAT}")
    try:
        import torch
    except ImportError:
        raise UsageError("--model needs PyTorch: pip install torch") from None
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"--model {spec!r}: no module named {exc.name!r} in the current directory ({here}) "
                             f"or on sys.path; run jacgrad from the folder that holds it, or install it") from None
        raise UsageError(f"--model {spec!r}: importing {module_name} failed ({_words(exc)})") from None
    except Exception as exc:  # the user's module raised while it was imported
        raise UsageError(f"--model {spec!r}: importing {module_name} failed ({_words(exc)})") from None
    finally:
        if added:
            sys.path.remove(here)
    factory = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(factory, part):
            where = ".".join([module_name, *attr.split(".")[:i]])
            names = [n for n in dir(factory) if not n.startswith("_")][:12]
            raise UsageError(f"--model {spec!r}: {where} has no attribute {part!r} (it has: {', '.join(names) or 'nothing'})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {attr} is {_a(factory)}, not callable: {_FORMAT}")
    try:
        model = factory()
    except Exception as exc:
        raise UsageError(f"--model {spec!r}: {attr}() raised {_words(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r}: {attr}() returned {_a(model)}, not a torch.nn.Module")
    return model.eval()


def network_of_model(spec: str, weights: str | None, dtype: str, device: str):
    """The network of ``--model`` with the parameters of the ``--weights`` checkpoint (else its
    own), in ``dtype``, on ``device``; every parameter finite."""
    from ..core.backend import to_device, to_numpy
    from ..models.checkpoints import fill, load, network_from_torch
    from ..nn.layers import leaf_layers

    model = torch_model(spec)
    what = f"--weights {weights!r}" if weights is not None else f"--model {spec!r}"
    try:
        if weights is not None:
            net = load(weights, model=model, dtype=dtype)
        else:
            net = network_from_torch(model, copy=True, dtype=dtype)
    except FileNotFoundError:
        raise UsageError(f"--weights {weights!r}: no such file") from None
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise UsageError(f"{what}: {cli_words(msg).replace('load it without model=', 'leave out --model')}") from None
    arrays = {}
    for where, L in leaf_layers(net.layers):
        for name, a in zip(L.names, L.params):
            key = f"{'.'.join(map(str, where))}.{name}"
            bad = np.argwhere(~np.isfinite(to_numpy(a)))
            if len(bad):
                raise UsageError(f"{what}: layer {key.rsplit('.', 1)[0]}: {name} has non-finite values (inf or NaN; "
                                 f"first at index {tuple(int(i) for i in bad[0])})")
            arrays[key] = to_device(a, device)
    out = fill(net, arrays)
    out._origin = net._origin
    return out

"""Checkpoints: ``jg.load(path, model=None, activations=None, dtype=None)`` reads a network from
jacgrad's own files or from a torch checkpoint with named keys.

- Without ``model``: a file in jacgrad's own layouts, read by the loaders of ``MLP.load`` and
  ``Sequential.load`` (``jacgrad.io.netfile``): a ``Sequential.save`` file gives a ``Sequential``,
  anything else (``MLP.save``'s ``W0, b0, …``, an ``nn.Sequential`` state dict of Linears with
  ``activations=``) an ``MLP`` — or a ``Sequential`` where a layer has no bias in the file (a
  ``Linear(bias=False)``), which it keeps bias-free (an MLP has a bias in every layer).
- With ``model`` (a torch module that ``MLP.from_torch`` or ``Sequential.from_torch`` imports):
  its layer structure and activations come from the module, its parameters from the file, matched
  by the module's own names (``fc1.weight``, ``blocks.0.ln.weight``; ``model.state_dict()``'s
  keys). The file is a state dict (``.pt``/``.pth``/``.ckpt``, ``.safetensors``, ``.npz``), or a
  training checkpoint holding one under ``"state_dict"`` (Lightning) or ``"model"``; a prefix on
  every key (Lightning's ``model.``, DDP's ``module.``) is read past (``jacgrad.io.state_keys``).
  The module's own parameters are not read or changed: the network holds the file's arrays.

Which torch parameter is which jacgrad parameter is found, not assumed: the module is imported
with ``copy=False``, and each jacgrad array is a view of the torch parameter whose memory it
shares (``parameter_places``: ``[Place(torch_name, key, transposed)]``). ``read_state(path, model,
places)`` reads and checks the file against them, and ``fill(net, arrays)`` builds the same
network over the new arrays: the three work for any importer that shares memory.

Files are data, as for ``MLP.load``: ``.pt`` through ``torch.load(weights_only=True)`` only, every
tensor's layout checked against its storage, every name and shape checked before any array is
read. Keys that do not match the module's are one ``ValueError`` (also a ``KeyError``) listing the
expected and found keys (the first few, and how many); a shape that differs names the key and both
shapes.

    >>> import torch, tempfile, os, jacgrad as jg
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> torch.save({"epoch": 3, "model": model.state_dict()}, path)
    >>> jg.load(path, model=model).activations
    ['tanh', 'identity']
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..io import netfile
from ..io.file_safety import NetworkFileError as Bad
from ..io.file_safety import NetworkFileKeyError, checked_suffix, open_regular, quote
from ..io.state_keys import strip_prefix
from ..core.backend import is_gpu_array, to_numpy
from ..io.interop import Origin
from ..nn.layers import leaf_layers
from ..network.mlp import MLP
from ..network.sequential import Sequential

__all__ = ["Place", "fill", "load", "network_from_torch", "parameter_places", "read_state"]

SHOWN = 5  # keys an error lists of each kind


class Place(NamedTuple):
    """Where one jacgrad parameter comes from: ``torch_name`` (the module's ``state_dict`` key;
    None for one the module does not have; a ``Linear(bias=False)`` is a bias-free Dense, no such array), ``key``
    (jacgrad's name for it: ``"<j>.W"``, ``"<j>.<i>.gamma"`` inside a residual block) and whether
    the jacgrad array is the transpose of the torch tensor (``W = weight.T``)."""

    torch_name: str | None
    key: str
    transposed: bool


def load(path, model=None, activations=None, dtype: str | None = None):
    """The network in the file ``path`` (see the module docstring): an ``MLP`` or a ``Sequential``
    on the CPU, in the file's float dtype or ``dtype``. ``activations``: for a file without a
    model that carries none (one name, or one per layer)."""
    path = os.fspath(path)
    if model is None:
        return _own_layout(path, activations, dtype)
    if activations is not None:
        raise TypeError("activations= names the layers of a file read without a model; with model= the module's "
                        "activation modules give them: leave it out")
    net = network_from_torch(model, copy=False, eval_mode=True)  # the mode changes no parameter
    places = parameter_places(model, net)
    arrays, dt = read_state(path, model, places, dtype)
    for where, L in leaf_layers(net.layers):  # what the module does not hold (a missing bias): as imported
        for name, a in zip(L.names, L.params):
            arrays.setdefault(f"{'.'.join(map(str, where))}.{name}", np.array(to_numpy(a), dtype=dt))
    out = fill(net, arrays)
    out._origin = Origin("torch")
    return out


def network_from_torch(model, copy: bool = True, dtype=None, eval_mode: bool = False):
    """``MLP.from_torch(model)`` for a stack of Linears and activations, else
    ``Sequential.from_torch(model)`` (norms, residual blocks); a module neither reads is the
    ``TypeError``/``ValueError`` of ``Sequential.from_torch``, which names what it supports.
    ``eval_mode``: import it as in eval mode (a training Dropout passes through), every
    submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()] if eval_mode and hasattr(model, "modules") else []
    for m, _ in modes:
        m.training = False
    try:
        try:
            return MLP.from_torch(model, copy=copy, dtype=dtype)
        except TypeError:  # a module MLP does not hold (LayerNorm, a residual block, or one nothing reads)
            return Sequential.from_torch(model, copy=copy, dtype=dtype)
    finally:
        for m, training in modes:
            m.training = training


def _address(a) -> int:
    return int(a.data.ptr) if is_gpu_array(a) else int(a.__array_interface__["data"][0])


def parameter_places(model, net) -> list[Place]:
    """One ``Place`` per parameter of ``net`` (imported from ``model`` with ``copy=False``, in
    ``leaf_layers`` order): the ``state_dict`` key of the torch tensor whose memory it views, found
    by address, shape and strides (``W`` viewing ``weight.T`` is transposed)."""
    tensors = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            tensors.setdefault((t.data_ptr(), tuple(t.shape), tuple(s * t.element_size() for s in t.stride())), name)
    places = []
    for where, L in leaf_layers(net.layers):
        for name, a in zip(L.names, L.params):
            key = f"{'.'.join(map(str, where))}.{name}"
            ptr, shape, strides = _address(a), tuple(a.shape), tuple(a.strides)
            same = tensors.get((ptr, shape, strides))
            flipped = tensors.get((ptr, shape[::-1], strides[::-1])) if a.ndim == 2 else None
            if same is not None and flipped is not None and same != flipped:
                raise RuntimeError(f"{key}: the module's {same} and {flipped} share its memory: which one it is "
                                   f"is ambiguous")
            places.append(Place(same or flipped, key, same is None and flipped is not None))
    return places


def fill(net, arrays: dict):
    """A network like ``net`` (same class, layers, activations, eps, scales) over ``arrays``, its
    parameters by jacgrad's names (``"<j>.W"``, ``"<j>.b"``, ``"<j>.<i>.gamma"``), used as given."""
    if isinstance(net, MLP):
        K = len(net.weights)
        return MLP([arrays[f"{j}.W"] for j in range(K)], [arrays[f"{j}.b"] for j in range(K)], list(net.activations))
    return Sequential(netfile._build([L.spec() for L in net.layers], "", arrays))


# ---------------------------------------------------------------------- the file
def _own_layout(path: str, activations, dtype):
    """jacgrad's own files: ``Sequential.load``'s reader for a file with a ``spec``, ``MLP.load``'s else
    (a ``Sequential`` of its Dense layers where one is bias-free)."""
    suffix = checked_suffix(path, netfile.SUFFIXES, "reads")
    if suffix in (".npz", ".safetensors") and _has_spec(path, suffix):
        return Sequential(netfile.load_layers(path, activations, dtype))
    spec = netfile.load(path, activations=activations, dtype=dtype)  # MLP.load's reader
    return (Sequential if any(b is None for b in spec.biases) else MLP).from_spec(spec)


def _has_spec(path: str, suffix: str) -> bool:
    """Whether the file declares a ``spec`` (read from its headers only); a file that cannot be read
    is left to the loader, whose error names the problem."""
    try:
        with open_regular(path) as f:
            return "spec" in netfile._READERS[suffix](f).text
    except (Bad, OSError):
        return False


def read_state(path: str, model, places: list[Place], dtype) -> tuple[dict, np.dtype]:
    """``(arrays, dtype)``: jacgrad's name -> array of every parameter ``places`` reads from the
    file, after every key and shape of the file was checked against ``model.state_dict()``, and
    the network's dtype (``dtype``, else the file's)."""
    suffix = checked_suffix(path, netfile.SUFFIXES, "reads")
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    with open_regular(path) as f:
        try:
            c = netfile._READERS[suffix](f)
            found = list(c.arrays)
            prefix = strip_prefix(found, lambda keys: set(keys) == set(expected))
            if prefix is None:
                raise _key_mismatch(found, expected, c.text)
            for k in found:
                shape = tuple(c.arrays[k][0])
                if shape != expected[k[len(prefix):]]:
                    raise Bad(f"key {quote(k)} has shape {shape} in the file but the model's {k[len(prefix):]} has shape "
                              f"{expected[k[len(prefix):]]}")
            declared = {p.key: (c.arrays[prefix + p.torch_name][0], prefix + p.torch_name,
                                c.arrays[prefix + p.torch_name][1]) for p in places if p.torch_name is not None}
            dt = netfile._check_dtypes(declared, dtype)
            arrays = {}
            for p in places:
                if p.torch_name is not None:
                    a = c.read(prefix + p.torch_name, dtype)
                    arrays[p.key] = np.asarray(a.T if p.transposed else a, dtype=dt)
        except NetworkFileKeyError as exc:
            raise NetworkFileKeyError(f"checkpoint {path!r}: {exc}") from None
        except Bad as exc:
            raise Bad(f"checkpoint {path!r}: {exc}") from None
    return arrays, dt


def _listing(keys, n: int) -> str:
    shown = ", ".join(quote(k) for k in keys[:SHOWN])
    return f"{n} key{'s' if n != 1 else ''}" + (f" ({shown}{', …' if n > SHOWN else ''})" if n else "")


def _key_mismatch(found: list, expected: dict, text: dict) -> NetworkFileKeyError:
    """The keys expected and found (counts, the first few), and the differences under the trainer
    prefix that explains most of them."""
    candidates = [""] + [".".join(found[0].split(".")[:n]) + "." for n in range(1, found[0].count(".") + 1)] if found else [""]
    prefix = max(candidates, key=lambda p: sum(k.startswith(p) and k[len(p):] in expected for k in found))
    stripped = {k[len(prefix):] if k.startswith(prefix) else k for k in found}
    missing = sorted(set(expected) - stripped)
    extra = sorted(k for k in found if not (k.startswith(prefix) and k[len(prefix):] in expected))
    msg = (f"its keys do not match the model's: expected {_listing(list(expected), len(expected))}, found "
           f"{_listing(sorted(found), len(found))}")
    if prefix:
        msg += f"; read past the prefix {quote(prefix)}"
    if missing and len(missing) < len(expected):
        msg += f"; missing {_listing(missing, len(missing))}"
    if extra and len(extra) < len(found):
        msg += f"; unexpected {_listing(extra, len(extra))}"
    if "spec" in text or all(k[:1] in "Wb" and k[1:].isdigit() for k in found):
        msg += "; this file is in jacgrad's own layout: load it without model="
    return NetworkFileKeyError(msg)

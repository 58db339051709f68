"""PyTorch: the pieces of the one torch reader (``interop.torch_blocks.layers_and_origin``, behind
``Sequential.from_torch`` and ``MLP.from_torch``) that need no torch at import: the activation
table both ways, the walk, the parameter reads and the ``copy=False`` link.

The walk (``flatten``) takes an ``nn.Sequential``, an iterable of modules or one module; nested
``nn.Sequential``s are flattened (an index is their ``state_dict`` path such as ``"2"`` or
``"1.0"``); a module listed twice is applied twice, and a parameter used in several places (a
re-used module, tied weights) is one shared parameter (``docs/sharing.md``). For a dense stack:

- ``nn.Linear(in, out, bias=True|False)`` starts a layer. ``W = weight.T`` — a transposed view
  of the same memory, never a transposing copy; a missing bias is zeros;
- one activation module may follow a Linear: ``ReLU``, ``LeakyReLU(negative_slope)``, ``Tanh``,
  ``Sigmoid``, ``Softplus(beta, threshold)``, ``ELU(alpha)``, ``GELU(approximate='none'|'tanh')``,
  ``SiLU``, ``Hardtanh(min_val, max_val)`` (and ``ReLU6``, a Hardtanh), ``Mish``, ``SELU``,
  ``Hardswish``, ``Hardsigmoid``, ``Softsign``, ``LogSigmoid``; a Linear followed by
  another Linear, or last, gets ``identity``;
- ``nn.Identity``, ``nn.Flatten()`` of ``(B, n)`` inputs and ``nn.Dropout`` in eval mode pass
  through (they compute nothing at inference);
- anything else is a ``TypeError`` naming the module, its index and what is supported (a
  LayerNorm, RMSNorm or Residual: ``jg.Sequential.from_torch`` reads them, ``MLP.from_torch`` refuses them).

``copy=False`` shares the parameters' memory: the weights are NumPy views of CPU parameters, or
CuPy views (DLPack) of CUDA ones. A torch optimiser updates parameters in place, so the network
sees each step without re-importing. A forward cache taken before a step still holds the
activations of the old weights, while ``backward`` and ``jacobian_chain`` read the current ones:
run ``forward`` again after every step (a cache mixes the two otherwise). Replacing a parameter
rather than updating it (``model.double()``, ``.to(device)``, loading a state dict with
``assign=True``) breaks the link: the network's next read of its parameters (forward, backward,
any product, a compiled step, pickling) raises ``RuntimeError`` (``TorchLink``); import again.

float16 and bfloat16 parameters are a ``TypeError`` unless ``dtype=`` is given; they are then
cast (a copy, so ``copy=False`` with a cast is an error too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...elementwise import activations as _activations
from ...core.backend import asarray, is_gpu_array
from . import Origin, require

__all__ = ["SUPPORTED", "TorchLink", "activation_module", "activation_name", "check_attention_module",
           "check_embedding_module", "custom_note", "describe", "flatten", "origin", "parameter_converter",
           "passes_through", "tensor"]

SUPPORTED = ("Linear", "ReLU", "LeakyReLU", "Tanh", "Sigmoid", "Softplus", "ELU", "GELU", "SiLU", "Hardtanh",
             "ReLU6", "Mish", "SELU", "Hardswish", "Hardsigmoid", "Softsign", "LogSigmoid", "Identity", "Dropout (eval mode)", "Flatten (of (B, n) inputs)")


def _torch():
    return require("torch", "reading or writing a PyTorch model", "pip install torch")


# The one table between torch's activation modules and jacgrad's activation rows, read both ways:
# (jacgrad family, torch module class, the parameters shared by name, fixed module attributes).
_ACTIVATION_MODULES = (
    ("relu", "ReLU", (), {}),
    ("tanh", "Tanh", (), {}),
    ("sigmoid", "Sigmoid", (), {}),
    ("silu", "SiLU", (), {}),
    ("gelu", "GELU", (), {"approximate": "none"}),
    ("gelu_tanh", "GELU", (), {"approximate": "tanh"}),
    ("leaky_relu", "LeakyReLU", ("negative_slope",), {}),
    ("elu", "ELU", ("alpha",), {}),
    ("softplus", "Softplus", ("beta", "threshold"), {}),
    ("hard_tanh", "Hardtanh", ("min_val", "max_val"), {}),
    ("mish", "Mish", (), {}),
    ("selu", "SELU", (), {}),
    ("hard_swish", "Hardswish", (), {}),
    ("hard_sigmoid", "Hardsigmoid", (), {}),
    ("softsign", "Softsign", (), {}),
    ("log_sigmoid", "LogSigmoid", (), {}),
)
_READ_AS = {"ReLU6": "Hardtanh"}  # read through its base class's row (ReLU6 is Hardtanh(0, 6))


def activation_name(nn, m) -> str | None:
    """The jacgrad name of the activation module ``m`` with its parameters (``"leaky_relu(negative_slope=0.2)"``),
    or None when ``m`` is not one (only torch's own classes, not subclasses of them).

        >>> import torch
        >>> activation_name(torch.nn, torch.nn.LeakyReLU(0.2)), activation_name(torch.nn, torch.nn.Linear(2, 2))
        ('leaky_relu(negative_slope=0.2)', None)
    """
    cls = type(m).__name__
    if getattr(nn, cls, None) is not type(m):
        return None
    cls = _READ_AS.get(cls, cls)
    for family, torch_cls, params, fixed in _ACTIVATION_MODULES:
        if torch_cls == cls and all(getattr(m, k) == v for k, v in fixed.items()):
            try:
                return _activations.get(family, **{p: getattr(m, p) for p in params}).name
            except ValueError as exc:  # a parameter value jacgrad's row does not take (LeakyReLU(-0.5))
                raise ValueError(f"{m!r} has no jacgrad activation: {exc}") from None
    return None


def activation_module(nn, name: str):
    """A torch module computing the jacgrad activation ``name`` (None for identity); the inverse
    of ``activation_name``.

        >>> import torch
        >>> activation_module(torch.nn, "elu(alpha=0.5)"), activation_module(torch.nn, "identity")
        (ELU(alpha=0.5), None)
    """
    act = _activations.get(name)
    if act.family == "identity":
        return None
    values = dict(act.params)
    for family, torch_cls, params, fixed in _ACTIVATION_MODULES:
        if family == act.family:
            return getattr(nn, torch_cls)(**{p: values[p] for p in params}, **fixed)
    raise TypeError(f"activation {name!r} has no torch module; torch has: "
                    f"{', '.join(f for f, *_ in _ACTIVATION_MODULES)}")


def flatten(torch, module, where: str = "module", seen: dict | None = None, _prefix: str = "") -> list[tuple[str, Any]]:
    """``(index, module)`` pairs in order — of an ``nn.Sequential``, an iterable of modules, or one
    module — nested ``nn.Sequential``s flattened with dotted indices (``"1.0"``), a module listed
    twice kept twice (``named_children`` would drop the second). The one walk of both importers.

    A re-used module (one ``nn.Tanh()``, or one ``nn.Linear``, in two places) is applied in each
    place, as torch does; its parameters, like any parameter in several places, become ONE shared
    jacgrad parameter (the importer reads a tensor once: ``torch_blocks._Convert``). ``seen``
    carries what was read across calls (a residual block's inner modules are walked by a second
    call).
    """
    nn = torch.nn
    seen = {} if seen is None else seen
    if isinstance(module, nn.Sequential):
        items = list(module._modules.items())
    elif isinstance(module, nn.Module):
        items = [("0", module)]
    else:
        try:
            items = [(str(i), m) for i, m in enumerate(module)]
        except TypeError:
            raise TypeError(f"from_torch takes an nn.Sequential or an iterable of modules, not {type(module).__name__}") from None
    out = []
    for name, m in items:
        index = f"{_prefix}{name}"
        if isinstance(m, nn.Sequential):
            out += flatten(torch, m, where, seen, f"{index}.")
        elif not isinstance(m, nn.Module):
            raise TypeError(f"{where} {index} is a {type(m).__name__}, not a torch.nn.Module")
        else:
            out.append((index, m))
    return out


def describe(m) -> str:
    """A short name for module ``m`` in a message: the repr of a torch leaf layer (``Linear(in_features=3,
    ...)``, short), else the class name (a container's or custom module's repr may be pages long)."""
    if type(m).__module__.startswith("torch.nn.") and next(m.children(), None) is None:
        return repr(m)
    return type(m).__name__


def custom_note(m, also: str = "") -> str:
    """``": it is a custom module (pkg.mod.Class), ..."`` for a module class not from torch (its full
    name, where the repr could be pages long), else ``""``; ``also``: what else is read."""
    if type(m).__module__.startswith("torch."):
        return ""
    return (f": it is a custom module ({type(m).__module__}.{type(m).__qualname__}), and jacgrad reads only torch's "
            f"own classes{also}")


def _parameter(torch, p, what: str, copy: bool, dtype):
    """A parameter tensor as a NumPy/CuPy array: a view when ``copy`` is False."""
    if p.dtype in (torch.float16, torch.bfloat16) and dtype is None:
        raise TypeError(f"{what} is {str(p.dtype).removeprefix('torch.')}; jacgrad computes in float32 or float64 — "
                        f"pass dtype='float32' (or 'float64') to cast it")
    wanted = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(dtype)
    if wanted is not None and p.dtype != wanted:
        if not copy:
            raise ValueError(f"{what} is {str(p.dtype).removeprefix('torch.')}: casting it to {dtype} makes a copy, "
                             f"so copy=False cannot share it")
        return asarray(p.detach().to(wanted))
    a = asarray(p)
    if copy:
        return a.copy(order="K")
    return a


def parameter_converter(copy: bool = True, dtype=None):
    """``convert(tensor, what) -> array``: ``_parameter`` with ``copy`` and the cast ``dtype`` fixed —
    how ``torch_blocks.attention_from_torch``/``embedding_from_torch`` bring a parameter (or a view of one: a slice, ``.T``) over."""
    import torch

    cast = cast_dtype(dtype)
    return lambda p, what: _parameter(torch, p, what, copy, cast)


def check_attention_module(m, what: str) -> None:
    """A ``ValueError`` saying why an ``nn.MultiheadAttention`` is not jacgrad's self-attention layer:
    ``batch_first=False``, separate q/k/v weights, ``add_bias_kv``/``add_zero_attn``, train-mode dropout."""
    if not m.batch_first:
        raise ValueError(f"{what}: batch_first=False; jacgrad takes (B, T, d) inputs — build the module with "
                         f"batch_first=True")
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        raise ValueError(f"{what}: kdim/vdim differ from embed_dim (separate q/k/v weights); only self-attention "
                         f"with the packed in_proj_weight is supported")
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        raise ValueError(f"{what}: add_bias_kv/add_zero_attn are not supported")
    if m.training and m.dropout > 0:
        raise ValueError(f"{what}: dropout={m.dropout} in train mode makes the layer random; call .eval() or "
                         f"build it with dropout=0")


def check_embedding_module(m, what: str) -> None:
    """A ``ValueError`` for an ``nn.Embedding`` with ``max_norm`` (it renormalises rows of the weight
    inside forward, which jacgrad does not)."""
    if m.max_norm is not None:
        raise ValueError(f"{what}: max_norm={m.max_norm} renormalises the rows of the weight inside forward; "
                         f"not supported")


def passes_through(nn, where: str, m) -> bool:
    """True for a module that computes nothing at inference on ``(B, n)`` inputs: ``nn.Identity``,
    ``nn.Dropout`` in eval mode (or with p = 0), ``nn.Flatten()``. A Dropout in training mode or a
    Flatten of other axes is a ``TypeError`` naming ``where`` (``"module 3"``); anything else is False."""
    if type(m) is nn.Dropout and m.training and m.p > 0:
        raise TypeError(f"{where} ({m!r}) is in training mode, where it zeroes inputs at random; call model.eval() "
                        f"first (in eval mode a Dropout passes its input through)")
    if type(m) is nn.Flatten and (m.start_dim, m.end_dim) != (1, -1):
        raise TypeError(f"{where} ({m!r}) flattens other than (B, ...) -> (B, n); supported: {', '.join(SUPPORTED)}")
    return type(m) in (nn.Identity, nn.Dropout, nn.Flatten)


def cast_dtype(dtype):
    """``dtype`` (a cast asked of an importer) as a NumPy float32/float64 dtype, None kept; any
    other is a ``TypeError``."""
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype {dtype}: jacgrad computes in float32 or float64")
    return dtype


class TorchLink(Origin):
    """What a ``copy=False`` import shares with the torch model: each parameter's module,
    name, tensor, address, dtype and shape at import. ``check()`` — O(number of parameters),
    run by the network before it reads its parameters (forward, and every use of a forward
    cache) — raises ``RuntimeError`` once torch has re-allocated one (``model.double()``,
    ``.to()``, ``load_state_dict(assign=True)``, ``p.data = ...``): the network's views still
    point at the old memory, and would silently compute with stale weights. In-place updates
    (an optimiser's step, ``load_state_dict`` without ``assign``) keep the memory, and are seen.
    A pickled network holds copies, not views: it keeps only ``Origin("torch")`` (pickling
    checks first, so a stale network cannot be shipped to a worker either)."""

    __slots__ = ("_entries", "_importer")

    def __init__(self, entries, importer: str):
        super().__init__("torch")
        self._importer = importer
        self._entries = tuple((where, m, name, p, p.data_ptr(), p.dtype, p.shape) for where, m, name, p in entries)

    def check(self) -> None:
        for where, m, name, p, ptr, dtype, shape in self._entries:
            q = m._parameters.get(name)
            if q is not p or q.data_ptr() != ptr or q.dtype != dtype or q.shape != shape:
                if q is not p:
                    now = "is a new tensor" if q is not None else "is gone"
                elif q.dtype != dtype:
                    now = f"is now {str(q.dtype).removeprefix('torch.')} (was {str(dtype).removeprefix('torch.')})"
                else:
                    now = "now lives in other memory"
                raise RuntimeError(
                    f"the torch model's parameters were re-allocated (e.g. by .double(), .to(), "
                    f"load_state_dict(assign=True)) since import with copy=False: the {name} of {where} {now}, and "
                    f"this network still reads the old memory; re-import it ({self._importer}(model, copy=False))")

    def __reduce__(self):  # pickling reads the views too (a Dask task's copy of the net): check first
        self.check()
        return (Origin, ("torch",))


def origin(modules, copy: bool, importer: str) -> Origin:
    """``Origin("torch")`` for a copied import; for ``copy=False`` a ``TorchLink`` over the
    parameters of ``modules`` (``(where, module)`` pairs), checked before each read."""
    if copy:
        return Origin("torch")
    return TorchLink([(where, m, name, p) for where, m in modules for name, p in m.named_parameters(recurse=False)],
                     importer)


def tensor(torch, a):
    """A torch view of a NumPy or CuPy array, to be copied into a module; a NumPy array torch
    cannot view (negative strides, read-only memory) is copied first."""
    if is_gpu_array(a):
        return torch.from_dlpack(a)
    a = np.asarray(a)
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = a.copy()
    return torch.from_numpy(a)

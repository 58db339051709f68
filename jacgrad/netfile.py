"""Network files: ``.npz``, ``.safetensors`` and PyTorch ``.pt``/``.pth`` state dicts, by suffix.

``load`` returns a plain ``jacgrad.interop.NetSpec`` (``MLP.load`` builds the network from it), so
this module never imports the network classes. Layouts:

- ``.npz`` (jacgrad's; ``MLP.save``): arrays ``W0, b0, W1, b1, …`` and ``activations``. ``Wj`` is
  ``(H_{j-1}, H_j)`` (the batch-first convention ``h = z @ W + b``), ``bj`` is ``(H_j,)`` and may be
  omitted (zeros), ``activations`` is an array of strings with one name per layer (or a single
  name for all). Write one from any framework with ``np.savez(path, W0=..., b0=...,
  activations=np.array(["tanh", "identity"]))`` — from a ``torch.nn.Linear`` take ``weight.T``.
- ``.safetensors``, jacgrad's layout (``MLP.save``): tensors ``W0, b0, …`` as above, the
  activation names in the metadata (``{"format": "jacgrad", "activations": "[\\"tanh\\", …]"}``,
  JSON). Loading runs no code.
- ``.safetensors`` or ``.pt``/``.pth``, a torch ``nn.Sequential`` state dict: ``0.weight``
  ``(out, in)``, ``0.bias``, ``2.weight``, … — Linear layers at numeric module paths, taken in
  numeric order, ``W = weight.T``. A state dict carries no activations: pass ``activations=``
  (one name, or one per Linear). ``.pt``/``.pth`` are read with ``torch.load(weights_only=True)``
  only, which unpickles tensors and plain containers and never code.

Every problem — a missing file, a truncated or hostile file, a missing, extra or misshapen key,
a non-float (integer, complex) array — is one ``ValueError`` naming the file and the key.
float16/bfloat16 arrays need ``dtype=``. Activation names are checked by ``jacgrad.activations``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from . import activations as _activations
from .backend import asarray, to_device, to_numpy
from .interop import NetSpec, plain_message

__all__ = ["SUFFIXES", "load", "save"]

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
_JACGRAD_KEY = re.compile(r"^([Wb])(\d+)$")
_TORCH_KEY = re.compile(r"^(\d+(?:\.\d+)*)\.(weight|bias)$")


class _FileError(ValueError):
    pass


def save(weights, biases, activations, path) -> None:
    """Write a network to ``path``: ``.safetensors`` in jacgrad's layout, else ``.npz``
    (a path without a suffix gets ``.npz``, as ``np.savez`` does)."""
    suffix = Path(path).suffix.lower()
    arrays = {}
    for j, (W, b) in enumerate(zip(weights, biases)):
        arrays[f"W{j}"], arrays[f"b{j}"] = np.ascontiguousarray(to_numpy(W)), np.ascontiguousarray(to_numpy(b))
    if suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(path), metadata={"format": "jacgrad", "activations": json.dumps(list(activations))})
    elif suffix in (".npz", ""):
        np.savez(path, activations=np.array(list(activations)), **arrays)
    else:
        raise ValueError(f"cannot write {str(path)!r}: MLP.save writes .npz or .safetensors, not {suffix!r}")


def load(path, activations=None, dtype: str | None = None, device: str = "cpu") -> NetSpec:
    """The ``NetSpec`` in ``path`` (format by suffix, see the module docstring), its arrays cast to
    ``dtype`` when given (else the file's float32/float64) and placed on ``device``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    suffix = Path(path).suffix.lower()
    readers = {".npz": _read_npz, ".npy": _read_npz, ".safetensors": _read_safetensors, ".pt": _read_torch,
               ".pth": _read_torch}
    reader = readers.get(suffix)
    if reader is None:  # np.savez's archives are zip files, whatever they are called
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise ValueError(f"weights file {path!r}: unknown suffix {suffix!r}; jacgrad reads {', '.join(SUFFIXES)}")
        reader = _read_npz
    try:
        weights, biases, names = reader(path, activations, dtype)
        names = _resolve_names(names, len(weights))
        weights, biases = _checked_arrays(weights, biases, dtype)
    except _FileError as exc:
        raise ValueError(f"weights file {path!r}: {exc}") from None
    weights = [to_device(W, device) for W in weights]
    biases = [to_device(b, device) for b in biases]
    return NetSpec(weights, biases, names, source=path)


# ---------------------------------------------------------------------- the readers
def _read_npz(path, activations, dtype):
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with loaded as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc) and "single" not in str(exc):  # np.load's word for "not an .npy/.npz at all" or object arrays
            raise _FileError("is not an .npz archive of plain numeric arrays") from None
        raise _FileError(f"is not a readable .npz archive ({exc})") from None
    except Exception as exc:
        raise _FileError(f"is not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    for k, a in arrays.items():  # NpzFile hands back raw bytes for a member without the .npy header
        if not isinstance(a, np.ndarray):
            raise _FileError(f"member {k!r} is not a valid .npy array")
    weights, biases = _jacgrad_layout(arrays, strict=False)
    names = arrays.get("activations")
    if names is not None:
        if activations is not None:
            raise _FileError("carries its own 'activations'; leave out activations=")
        names = [str(a) for a in np.atleast_1d(names)]
    elif activations is None:
        raise _FileError("has no 'activations' array (one name per layer); add one, or pass activations=")
    else:
        names = activations
    return weights, biases, names


def _read_safetensors(path, activations, dtype):
    try:
        from safetensors import safe_open
    except ImportError:
        raise _FileError("reading .safetensors needs the safetensors package: pip install safetensors") from None
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
            arrays = {}
            for k in keys:
                try:
                    arrays[k] = f.get_tensor(k)
                except Exception as exc:  # e.g. BF16, which NumPy has no dtype for
                    raise _FileError(f"tensor {k!r} cannot be read as a NumPy array ({exc}); save it as float32 or float64")
    except _FileError:
        raise
    except Exception as exc:  # safetensors' SafetensorError: truncated, malformed header, ...
        raise _FileError(f"is not a readable .safetensors file ({type(exc).__name__}: {exc})") from None
    if metadata.get("format") == "jacgrad" or any(_JACGRAD_KEY.match(k) for k in keys):
        names = metadata.get("activations")
        if names is not None:
            if activations is not None:
                raise _FileError("carries its own activations (metadata); leave out activations=")
            try:
                names = json.loads(names)
            except ValueError:
                raise _FileError(f"metadata 'activations' is not a JSON list of names: {names[:80]!r}") from None
            if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
                raise _FileError("metadata 'activations' is not a JSON list of names")
        elif activations is None:
            raise _FileError("has no activations in its metadata; pass activations=")
        else:
            names = activations
        return (*_jacgrad_layout(arrays), names)
    return (*_torch_layout(arrays), _caller_names(activations))


def _read_torch(path, activations, dtype):
    try:
        import torch
    except ImportError:
        raise _FileError("reading .pt/.pth needs PyTorch: pip install torch (or save the state dict as .safetensors)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and plain containers, or a broken file
        text = plain_message(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        why = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)  # torch's reason, pages down
        if why:
            first = f"{first.split('.')[0]}: {why.group(1).split('. ')[0].strip()}"
        raise _FileError(f"is not a state dict that torch.load(weights_only=True) reads ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise _FileError(f"holds a {type(state).__name__}, not a state dict of tensors (save model.state_dict())")
    arrays = {}
    for k, v in state.items():
        if v.dtype in (torch.float16, torch.bfloat16):  # NumPy has no bfloat16: cast here, or ask for dtype=
            if dtype is None:
                raise _FileError(f"{k} is {str(v.dtype)[6:]}; jacgrad computes in float32 or float64: "
                                 f"pass dtype='float32' to cast it")
            v = v.to(torch.float64 if np.dtype(dtype) == np.float64 else torch.float32)
        arrays[k] = asarray(v)
    return (*_torch_layout(arrays), _caller_names(activations))


def _caller_names(activations):
    if activations is None:
        raise _FileError("is a torch state dict, which carries no activations; pass activations= (one per Linear)")
    return activations


def _jacgrad_layout(arrays, strict: bool = True):
    """(weights, biases) as (key, array) pairs from ``W0, b0, W1, …``; ``strict``: no other keys
    (an .npz may carry others, such as its ``activations``)."""
    bad = sorted(k for k in arrays if not _JACGRAD_KEY.match(k))
    if strict and bad:
        raise _FileError(f"key {bad[0]!r} is not part of jacgrad's layout (W0, b0, W1, b1, ...)")
    n = 0
    while f"W{n}" in arrays:
        n += 1
    if n == 0:
        raise _FileError(f"has no array W0 (found: {', '.join(sorted(arrays)) or 'nothing'})")
    extra = sorted(k for k in arrays if _JACGRAD_KEY.match(k) and int(k[1:]) >= n)
    if extra:
        raise _FileError(f"{', '.join(extra)} present but W{n} is missing")
    return [(f"W{j}", arrays[f"W{j}"]) for j in range(n)], [(f"b{j}", arrays.get(f"b{j}")) for j in range(n)]


def _torch_layout(arrays):
    """Linear layers of an nn.Sequential state dict, in numeric module order: W = weight.T."""
    layers: dict[tuple, dict] = {}
    for k in arrays:
        m = _TORCH_KEY.match(k)
        if m is None:
            raise _FileError(f"key {k!r} is not the weight or bias of a Linear at a numeric module path "
                             f"(like '0.weight', '2.bias'): jacgrad reads nn.Sequential state dicts of Linears")
        layers.setdefault(tuple(int(p) for p in m.group(1).split(".")), {})[m.group(2)] = k
    if not layers:
        raise _FileError("holds no tensors")
    weights, biases = [], []
    for index in sorted(layers):
        keys = layers[index]
        if "weight" not in keys:
            raise _FileError(f"key {keys['bias']!r} has no matching {keys['bias'][:-4] + 'weight'!r}")
        w = arrays[keys["weight"]]
        if w.ndim != 2:
            raise _FileError(f"key {keys['weight']!r} has shape {tuple(w.shape)}, not a Linear's (out, in)")
        weights.append((keys["weight"], w.T))
        biases.append((keys.get("bias", "bias"), arrays[keys["bias"]] if "bias" in keys else None))
    return weights, biases


# ---------------------------------------------------------------------- checks
def _resolve_names(names, n: int) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if len(names) == 1:
        names = names * n
    if len(names) != n:
        raise _FileError(f"{len(names)} activations for {n} layers")
    try:
        return [_activations.get(a).name for a in names]
    except (KeyError, ValueError, TypeError) as exc:
        raise _FileError(str(exc)) from None


def _checked_arrays(weights, biases, dtype):
    """(weights, biases) as float arrays of one dtype, every key's dtype and shape checked."""
    for key, a in weights + [(k, b) for k, b in biases if b is not None]:
        kind = np.dtype(a.dtype)
        if kind.kind != "f":
            raise _FileError(f"{key} has dtype {kind}, not floating point (complex and integer arrays are refused)")
        if dtype is None and kind == np.float16:
            raise _FileError(f"{key} is float16; jacgrad computes in float32 or float64: pass dtype='float32' to cast it")
    for j, (key, W) in enumerate(weights):
        if W.ndim != 2:
            raise _FileError(f"layer {j}: {key} must be 2-D (H_in, H_out), got shape {tuple(W.shape)}")
        if j and W.shape[0] != weights[j - 1][1].shape[1]:
            raise _FileError(f"layer {j}: {key} has shape {tuple(W.shape)} but layer {j - 1} outputs "
                             f"{weights[j - 1][1].shape[1]} features")
        key_b, b = biases[j]
        if b is not None and b.shape != (W.shape[1],):
            raise _FileError(f"layer {j}: {key_b} has shape {tuple(b.shape)} but {key} has {W.shape[1]} outputs")
    dt = np.dtype(dtype) if dtype is not None else np.result_type(*[W.dtype for _, W in weights])
    if dt not in (np.float32, np.float64):
        raise _FileError(f"dtype {dt}: jacgrad computes in float32 or float64")
    out_w = [np.asarray(W, dtype=dt) for _, W in weights]
    out_b = [np.asarray(b, dtype=dt) if b is not None else np.zeros(W.shape[1], dt) for (_, b), W in zip(biases, out_w)]
    return out_w, out_b

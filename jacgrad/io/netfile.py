"""Network files: ``.npz``, ``.safetensors`` and PyTorch ``.pt``/``.pth``/``.ckpt`` state dicts, by suffix
(compared in any case; a file is written at exactly the path given).

One reader serves ``MLP.load`` and ``Sequential.load``: every file becomes a layer list (the
``spec``) and its parameters by canonical name (``"<j>.W"``, ``"<j>.<i>.gamma"`` inside a
residual block); ``load`` turns a list of dense layers into a ``jacgrad.io.interop.NetSpec``,
``load_layers`` builds ``jacgrad.nn.layers``. Layouts:

- Sequential's (``Sequential.save``): ``spec`` (the layer list as JSON: an ``.npz`` string member,
  or the ``.safetensors`` metadata ``{"spec": ...}``) and each parameter as ``"<j>.<name>"``.
- jacgrad's dense layout (``MLP.save``): ``W0, b0, W1, b1, …`` and ``activations`` (an ``.npz``
  string array with one name per layer, or a single name for all; in ``.safetensors`` metadata
  ``{"format": "jacgrad", "activations": "[\\"tanh\\", …]"}``, JSON). ``Wj`` is ``(H_{j-1}, H_j)``
  (``h = z @ W + b``), ``bj`` is ``(H_j,)`` and may be omitted: layer j is then bias-free (``Dense(W, bias=False)``,
  no bias parameter; ``MLP.load`` refuses such a file, ``Sequential.load`` reads it). Write one from any
  framework with ``np.savez(path, W0=..., b0=..., activations=np.array(["tanh", "identity"]))``
  — from a ``torch.nn.Linear`` take ``weight.T``. Numbers are written without leading zeros.
- A torch ``nn.Sequential`` state dict (``.safetensors``, ``.pt``/``.pth``/``.ckpt``): ``0.weight``
  ``(out, in)``, ``0.bias``, ``2.weight``, … — Linear layers at numeric module paths, in numeric
  order, ``W = weight.T``; a Linear without its ``.bias`` (``bias=False``) is a bias-free Dense
  (no zero bias: P is torch's), which ``Sequential.load`` reads and ``MLP.load`` refuses, naming
  the layer. It carries no activations: pass ``activations=``. ``.pt``/``.pth``/``.ckpt``
  are read with ``torch.load(weights_only=True)`` only (torch's zip format), which unpickles
  tensors and plain containers and never code; a training checkpoint's state dict is read from
  under its ``"state_dict"`` (Lightning) or ``"model"`` key, and a prefix on every key
  (``model.0.weight``) is read past (``jacgrad.io.state_keys``). Named keys (``fc1.weight``) need
  the torch module that names them: ``jacgrad.models.checkpoints.load(path, model=module)``.

Files are data: loading runs no code and allocates no more than the file's real contents
justify (``jacgrad.io.file_readers``); only regular files are opened; a save goes to a temporary
file that is renamed over the old one only once complete (``jacgrad.io.file_safety``). Every
problem with a file — truncated, hostile, a missing, extra, duplicate or misshapen key, a
non-float array — is one ``ValueError`` naming the file and what is wrong (an unknown name is
also a ``KeyError``); a missing file is a ``FileNotFoundError``. float16/bfloat16 need ``dtype=``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from ..elementwise import activations as _activations
from .file_layouts import PARAMS, dense_layers, inner_specs, plan
from .file_readers import read_npz, read_safetensors, read_torch
from .file_safety import NetworkFileError as Bad
from .file_safety import NetworkFileKeyError, atomic_write, checked_suffix, open_regular, quote
from ..core.backend import to_device, to_numpy
from .interop import NetSpec
from ..protocol.layer import layer_class, leaf_layers, stored_arrays, stored_names
from ..protocol.sharing import Ties

__all__ = ["SUFFIXES", "SAVE_SUFFIXES", "load", "load_layers", "save", "save_layers"]

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth", ".ckpt")
SAVE_SUFFIXES = (".npz", ".safetensors")
_READERS = {".npz": read_npz, ".safetensors": read_safetensors, ".pt": read_torch, ".pth": read_torch,
            ".ckpt": read_torch}
MAX_NAME = 120  # characters: longer than any activation's canonical spelling


# ---------------------------------------------------------------------- saving
def save(weights, biases, activations, path) -> None:
    """Write a dense stack in jacgrad's layout (``MLP.save``): ``.npz`` or ``.safetensors``."""
    acts = [str(a) for a in activations]
    arrays = {}
    for j, (W, b) in enumerate(zip(weights, biases)):
        arrays[f"W{j}"], arrays[f"b{j}"] = W, b
    _write(path, arrays, {"activations": np.array(acts)}, {"format": "jacgrad", "activations": json.dumps(acts)})


def save_layers(layers, path) -> None:
    """Write a layer list in Sequential's layout (``Sequential.save``): ``.npz`` or ``.safetensors``.
    A shared parameter (``protocol.sharing``) is stored once, under its first use's key; every
    later use is a ``ties`` entry ``{key: [first use's key, transposed]}`` (text beside the spec)
    and loading makes it that array (or its transpose) again."""
    named = [(f"{'.'.join(map(str, where))}.{name}", p) for where, L in leaf_layers(layers)
             for name, p in stored_arrays(L)]
    ties = Ties(named)
    arrays, tied = {}, {}
    for (key, p), (q, t) in zip(named, ties.uses):
        if ties.where[q] == key:
            arrays[key] = p
        else:
            tied[key] = [ties.where[q], t]
    spec = json.dumps([L.spec() for L in layers])
    text, meta = {"spec": np.array(spec)}, {"spec": spec}
    if tied:
        text["ties"] = np.array(json.dumps(tied))
        meta["ties"] = json.dumps(tied)
    _write(path, arrays, text, meta)


def _write(path, arrays: dict, npz_text: dict, metadata: dict) -> None:
    suffix = checked_suffix(path, SAVE_SUFFIXES, "writes")
    arrays = {k: np.ascontiguousarray(to_numpy(a)) for k, a in arrays.items()}
    if suffix == ".safetensors":
        atomic_write(path, lambda f: _write_safetensors(f, arrays, metadata))
    else:
        atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **npz_text, **arrays))


_ST_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def _write_safetensors(f, arrays: dict, metadata: dict) -> None:
    """The safetensors format: an 8-byte little-endian header length, the JSON header (padded with
    spaces to 8 bytes), then each tensor's bytes, little-endian, in header order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, a in arrays.items():
        header[name] = {"dtype": _ST_CODES[np.dtype(a.dtype.name)], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for a in arrays.values():
        f.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(-1).view(np.uint8).data)


# ---------------------------------------------------------------------- loading
def load(path, activations=None, dtype: str | None = None, device: str = "cpu") -> NetSpec:
    """The ``NetSpec`` of a file holding dense layers, its arrays cast to ``dtype`` when given (else
    the file's float32/float64) and placed on ``device``; a layer whose bias the file leaves out
    has None in ``biases`` (bias-free: ``MLP.from_spec`` refuses it, ``Sequential.from_spec`` keeps it). ``activations``: one name, or one per
    layer, for files that carry none (a file's own are never overridden)."""
    path = os.fspath(path)
    spec, arrays = _read(path, activations, dtype, replace=False)
    other = sorted({s["kind"] for s in spec} - {"dense"})
    if other:
        raise Bad(f"network file {path!r} holds {', '.join(other)} layers; MLP holds dense layers only: "
                  f"load it with jg.Sequential.load")
    W = [to_device(arrays[f"{j}.W"], device) for j in range(len(spec))]
    b = [to_device(arrays[f"{j}.b"], device) if f"{j}.b" in arrays else None for j in range(len(spec))]
    return NetSpec(W, b, [s["activation"] for s in spec], source=f"network file {path!r}")


def load_layers(path, activations=None, dtype: str | None = None) -> list:
    """The ``jacgrad.nn.layers`` of any network file; ``activations``: names replacing the file's,
    one per Dense layer in layer order (residual inner layers included), or one for all;
    ``dtype``: cast every array (else the file's float32/float64)."""
    path = os.fspath(path)
    spec, arrays = _read(path, activations, dtype, replace=True)
    try:
        return _build(spec, "", arrays)
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        cls = NetworkFileKeyError if isinstance(exc, KeyError) else Bad
        raise cls(f"network file {path!r}: {msg}") from None


def _read(path, activations, dtype, replace):
    """``(spec, arrays)``: the checked layer list (activation names canonical) and every parameter
    by canonical name (a dense bias the file leaves out is not there: the layer is bias-free), one
    float dtype."""
    if os.path.splitext(path)[1].lower() == ".npy":
        raise Bad(f"network file {path!r} holds a single .npy array, not an .npz archive; "
                  f"jacgrad reads {', '.join(SUFFIXES)}")
    suffix = checked_suffix(path, SUFFIXES, "reads")
    with open_regular(path) as f:
        try:
            contents = _READERS[suffix](f)
            spec, sources, names, missing = plan(contents, suffix)
            _set_activations(spec, names, activations, replace, missing)
            declared = {k: (_flip(contents.arrays[src[0]][0], src[1]), src[0], contents.arrays[src[0]][1])
                        for k, src in sources.items()}
            _check_shapes(spec, declared, "", None)
            dt = _check_dtypes(declared, dtype)
            arrays = {}
            for k, src in sources.items():
                a = contents.read(src[0], dtype)
                arrays[k] = np.asarray(a.T if src[1] else a, dtype=dt)
            for k, src in sources.items():  # a tie (Sequential's 'ties'): the first use's array itself
                if src[0] != k and src[0] in sources:
                    arrays[k] = arrays[src[0]].T if src[1] else arrays[src[0]]
        except NetworkFileKeyError as exc:
            raise NetworkFileKeyError(f"network file {path!r}: {exc}") from None
        except Bad as exc:
            raise Bad(f"network file {path!r}: {exc}") from None
    return spec, arrays


def _flip(shape, transpose):
    return tuple(shape[::-1]) if transpose else tuple(shape)


def _set_activations(spec, names, given, replace, missing):
    """Write the activation names into the spec's dense layers, in order: the file's own (one
    for all, or one each), or ``given`` (which may replace the file's only when ``replace``)."""
    dense = list(dense_layers(spec))
    if given is not None:
        if names is not None and not replace:
            raise Bad("carries its own 'activations'; leave out activations=")
        names = given
    elif names is None:
        raise Bad(missing)
    names = [names] if isinstance(names, str) else list(names)
    if len(names) == 1:
        names = names * len(dense)
    if len(names) != len(dense):
        raise Bad(f"{len(names)} activations for {len(dense)} {'Dense layers' if replace else 'layers'}")
    for j, (s, name) in enumerate(zip(dense, names)):
        if isinstance(name, str) and len(name) > MAX_NAME:  # (an Activation row passes as itself)
            raise NetworkFileKeyError(f"activation {j}: {quote(name)} is not an activation name")
        try:
            s["activation"] = _activations.get(name).name
        except KeyError as exc:
            raise NetworkFileKeyError(f"activation {j}: {exc.args[0] if exc.args else exc}") from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise Bad(f"activation {j}: {exc}") from None


def _check_shapes(spec, declared, prefix, width, first: int = 0):
    """Every declared shape against the layers' widths, before any array is read; the width out.
    A layer's own shapes are checked by its class (``file_widths``, through the registry).
    ``first``: the number of the first layer (a residual block's shortcut continues its inner layers')."""
    before = "the input"
    for j, s in enumerate(spec, first):
        where, kind = f"{prefix}{j}", s["kind"]
        if "layers" in s and "shortcut" in s:  # a residual block p(z) + s·f(z): both H -> H'
            out = _check_shapes(s["layers"], declared, f"{where}.", width)
            short = _check_shapes(s["shortcut"], declared, f"{where}.", width, len(s["layers"]))
            if None not in (out, short) and out != short:
                raise Bad(f"layer {where}: its inner layers output {out} features but its shortcut {short}")
        elif "layers" in s:  # a container (a residual block): H -> H through its inner layers
            out = _check_shapes(s["layers"], declared, f"{where}.", width)
            if width is not None and out != width:
                raise Bad(f"layer {where}: its inner layers map {width} -> {out} features; a residual block needs H -> H")
        else:
            cls = layer_class(kind)
            names = stored_names(cls, s)
            shapes = {n: declared[f"{where}.{n}"][:2] for n in names}
            try:
                n_in, out = cls.file_widths(where, shapes)
            except ValueError as exc:
                raise Bad(str(exc)) from None
            if n_in is None and hasattr(cls, "spec_widths"):  # a layer without arrays whose spec says its widths
                n_in, out = cls.spec_widths(s)
            elif n_in is None and not hasattr(cls, "bind_in_shape"):  # a layer without arrays (Activation) keeps the width
                n_in = out = width
            if width is not None and n_in is not None and n_in != width:  # (image layers: (None, None), not chained)
                first = shapes[names[0]]
                tag = f"layer {where}" if kind == "dense" else f"layer {where} ({kind})"
                raise Bad(f"{tag}: {first[1]} has shape {first[0]} but {before} outputs {width} features")
        width, before = out, f"layer {where}"
    return width


def _check_dtypes(declared, dtype):
    """The one float dtype of the network: ``dtype``, or the file's (float32 or float64)."""
    found = []
    for shape, key, kind in declared.values():
        name = kind if isinstance(kind, str) else np.dtype(kind).name
        if name not in ("bfloat16",) and np.dtype(kind).kind != "f":
            raise Bad(f"{key} has dtype {name}, not floating point (complex and integer arrays are refused)")
        if dtype is None and name in ("float16", "bfloat16"):
            raise Bad(f"{key} is {name}; jacgrad computes in float32 or float64: pass dtype='float32' to cast it")
        found.append(np.float32 if name == "bfloat16" else kind)
    dt = np.dtype(dtype) if dtype is not None else np.result_type(*found)
    if dt not in (np.float32, np.float64):
        raise Bad(f"dtype {dt}: jacgrad computes in float32 or float64")
    return dt


def _build(spec, prefix, arrays) -> list:
    """The layers of ``spec``, each built by its registered class (``from_spec``)."""
    out = []
    for j, s in enumerate(spec):
        key, kind = f"{prefix}{j}", s["kind"]
        try:
            cls = layer_class(kind)
            inner = _build(inner_specs(s), f"{key}.", arrays) if "layers" in s else None
            out.append(cls.from_spec(s, {n: arrays[f"{key}.{n}"] for n in stored_names(cls, s)}, inner))
        except (KeyError, ValueError, TypeError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            if str(msg).startswith("layer "):
                raise
            raise type(exc)(f"layer {key}: {msg}") from None
    return out

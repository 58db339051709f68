"""Network files: ``.npz``, ``.safetensors`` and PyTorch ``.pt``/``.pth`` state dicts, by suffix
(compared in any case; a file is written at exactly the path given).

One reader serves ``MLP.load`` and ``Sequential.load``: every file becomes a layer list (the
``spec``) and its parameters by canonical name (``"<j>.W"``, ``"<j>.<i>.gamma"`` inside a
residual block); ``load`` turns a list of dense layers into a ``jacgrad.interop.NetSpec``,
``load_layers`` builds ``jacgrad.layers``. Layouts:

- Sequential's (``Sequential.save``): ``spec`` (the layer list as JSON: an ``.npz`` string member,
  or the ``.safetensors`` metadata ``{"spec": ...}``) and each parameter as ``"<j>.<name>"``.
- jacgrad's dense layout (``MLP.save``): ``W0, b0, W1, b1, …`` and ``activations`` (an ``.npz``
  string array with one name per layer, or a single name for all; in ``.safetensors`` metadata
  ``{"format": "jacgrad", "activations": "[\\"tanh\\", …]"}``, JSON). ``Wj`` is ``(H_{j-1}, H_j)``
  (``h = z @ W + b``), ``bj`` is ``(H_j,)`` and may be omitted (zeros). Write one from any
  framework with ``np.savez(path, W0=..., b0=..., activations=np.array(["tanh", "identity"]))``
  — from a ``torch.nn.Linear`` take ``weight.T``. Numbers are written without leading zeros.
- A torch ``nn.Sequential`` state dict (``.safetensors``, ``.pt``/``.pth``): ``0.weight``
  ``(out, in)``, ``0.bias``, ``2.weight``, … — Linear layers at numeric module paths, in numeric
  order, ``W = weight.T``. It carries no activations: pass ``activations=``. ``.pt``/``.pth``
  are read with ``torch.load(weights_only=True)`` only (torch's zip format), which unpickles
  tensors and plain containers and never code.

Files are data: loading runs no code and allocates no more than the file's real contents
justify (``jacgrad._file_readers``); only regular files are opened; a save goes to a temporary
file that is renamed over the old one only once complete (``jacgrad._file_safety``). Every
problem with a file — truncated, hostile, a missing, extra, duplicate or misshapen key, a
non-float array — is one ``ValueError`` naming the file and what is wrong (an unknown name is
also a ``KeyError``); a missing file is a ``FileNotFoundError``. float16/bfloat16 need ``dtype=``.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from . import activations as _activations
from ._file_readers import read_npz, read_safetensors, read_torch
from ._file_safety import NetworkFileError as Bad
from ._file_safety import NetworkFileKeyError, atomic_write, checked_suffix, open_regular, quote
from .backend import to_device, to_numpy
from .interop import NetSpec
from .layers import NORMS, Dense, LayerNorm, leaf_layers, Residual, RMSNorm

__all__ = ["SUFFIXES", "SAVE_SUFFIXES", "load", "load_layers", "save", "save_layers"]

SUFFIXES = (".npz", ".safetensors", ".pt", ".pth")
SAVE_SUFFIXES = (".npz", ".safetensors")
_READERS = {".npz": read_npz, ".safetensors": read_safetensors, ".pt": read_torch, ".pth": read_torch}
_N = r"(?:0|[1-9]\d*)"  # one spelling per number: W1 and W01 never both name layer 1
_JACGRAD_KEY = re.compile(rf"^([Wb])({_N})$")
_TORCH_KEY = re.compile(rf"^({_N}(?:\.{_N})*)\.(weight|bias)$")
_PARAMS = {"dense": Dense.names, **{k: cls.names for k, cls in NORMS.items()}}
_FIELDS = {"dense": {"activation": str}, "residual": {"scale": (int, float), "layers": list},
           **{k: {"eps": (int, float)} for k in NORMS}}
MAX_NAME, MAX_DEPTH = 120, 32


# ---------------------------------------------------------------------- saving
def save(weights, biases, activations, path) -> None:
    """Write a dense stack in jacgrad's layout (``MLP.save``): ``.npz`` or ``.safetensors``."""
    acts = [str(a) for a in activations]
    arrays = {}
    for j, (W, b) in enumerate(zip(weights, biases)):
        arrays[f"W{j}"], arrays[f"b{j}"] = W, b
    _write(path, arrays, {"activations": np.array(acts)}, {"format": "jacgrad", "activations": json.dumps(acts)})


def save_layers(layers, path) -> None:
    """Write a layer list in Sequential's layout (``Sequential.save``): ``.npz`` or ``.safetensors``."""
    arrays = {f"{'.'.join(map(str, where))}.{name}": p
              for where, L in leaf_layers(layers) for name, p in zip(L.names, L.params)}
    spec = json.dumps([L.spec() for L in layers])
    _write(path, arrays, {"spec": np.array(spec)}, {"spec": spec})


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
        header[name] = {"dtype": _ST_CODES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    f.write(len(text).to_bytes(8, "little"))
    f.write(text)
    for a in arrays.values():
        f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() if a.dtype.byteorder == ">" else memoryview(a).cast("B"))


# ---------------------------------------------------------------------- loading
def load(path, activations=None, dtype: str | None = None, device: str = "cpu") -> NetSpec:
    """The ``NetSpec`` of a file holding dense layers, its arrays cast to ``dtype`` when given (else
    the file's float32/float64) and placed on ``device``. ``activations``: one name, or one per
    layer, for files that carry none (a file's own are never overridden)."""
    path = os.fspath(path)
    spec, arrays = _read(path, activations, dtype, replace=False)
    other = sorted({s["kind"] for s in spec} - {"dense"})
    if other:
        raise Bad(f"network file {path!r} holds {', '.join(other)} layers; MLP holds dense layers only: "
                  f"load it with jg.Sequential.load")
    W = [to_device(arrays[f"{j}.W"], device) for j in range(len(spec))]
    b = [to_device(arrays[f"{j}.b"] if arrays[f"{j}.b"] is not None else np.zeros(w.shape[1], w.dtype), device)
         for j, w in enumerate(W)]
    return NetSpec(W, b, [s["activation"] for s in spec], source=path)


def load_layers(path, activations=None) -> list:
    """The ``jacgrad.layers`` of any network file; ``activations``: names replacing the file's,
    one per Dense layer in layer order (residual inner layers included), or one for all."""
    path = os.fspath(path)
    spec, arrays = _read(path, activations, None, replace=True)
    try:
        return _build(spec, "", arrays)
    except (KeyError, ValueError, TypeError) as exc:
        msg = exc.args[0] if exc.args else str(exc)
        cls = NetworkFileKeyError if isinstance(exc, KeyError) else Bad
        raise cls(f"network file {path!r}: {msg}") from None


def _read(path, activations, dtype, replace):
    """``(spec, arrays)``: the checked layer list (activation names canonical) and every parameter
    by canonical name (a dense bias the file leaves out is None), one float dtype."""
    if os.path.splitext(path)[1].lower() == ".npy":
        raise Bad(f"network file {path!r} holds a single .npy array, not an .npz archive; "
                  f"jacgrad reads {', '.join(SUFFIXES)}")
    suffix = checked_suffix(path, SUFFIXES, "reads")
    with open_regular(path) as f:
        try:
            contents = _READERS[suffix](f)
            spec, sources, names, missing = _plan(contents, suffix)
            _set_activations(spec, names, activations, replace, missing)
            declared = {k: None if src is None else (_flip(contents.arrays[src[0]][0], src[1]), src[0],
                                                     contents.arrays[src[0]][1]) for k, src in sources.items()}
            _check_shapes(spec, declared, "", None)
            dt = _check_dtypes(declared, dtype)
            arrays = {}
            for k, src in sources.items():
                if src is not None:
                    a = contents.read(src[0], dtype)
                    arrays[k] = np.asarray(a.T if src[1] else a, dtype=dt)
                else:
                    arrays[k] = None
        except NetworkFileKeyError as exc:
            raise NetworkFileKeyError(f"network file {path!r}: {exc}") from None
        except Bad as exc:
            raise Bad(f"network file {path!r}: {exc}") from None
    return spec, arrays


def _flip(shape, transpose):
    return tuple(shape[::-1]) if transpose else tuple(shape)


# ---------------------------------------------------------------------- layouts
def _plan(c, suffix):
    """``(spec, sources, names, missing)``: the layer list, canonical key -> ``(file key,
    transposed)`` (None: a bias left out), the file's own activation names (None: it has none)
    and what to say when it has none. Every name in the file is checked here, before any data is
    read: a name that no layer claims is an error naming it."""
    if "spec" in c.text:
        return _sequential_plan(c)
    if suffix == ".npz" or c.text.get("format") == "jacgrad" or any(_JACGRAD_KEY.match(k) for k in c.arrays):
        return _jacgrad_plan(c, suffix)
    return _torch_plan(c)


def _sequential_plan(c):
    spec = _json(c.text["spec"], "its 'spec'", "a JSON list of layers")
    _check_spec(spec, "", 0)
    sources = {}
    for key, kind in _param_keys(spec, ""):
        if key not in c.arrays:
            raise Bad(f"layer {key.rsplit('.', 1)[0]} ({kind}): array {quote(key)} is missing")
        sources[key] = (key, False)
    _no_others(c.arrays, sources, "is not a parameter of any layer in its 'spec'")
    names = [s["activation"] for s in _dense(spec)]
    return spec, sources, names, None


def _jacgrad_plan(c, suffix):
    for k in sorted(c.arrays):
        if not _JACGRAD_KEY.match(k):
            raise Bad(f"key {quote(k)} is not part of jacgrad's layout (W0, b0, W1, b1, ..., numbers without "
                      f"leading zeros{', and activations' if suffix == '.npz' else ''})")
    n = 0
    while f"W{n}" in c.arrays:
        n += 1
    if n == 0:
        raise Bad(f"has no array W0 (found: {', '.join(quote(k) for k in sorted(c.arrays)[:8]) or 'nothing'})")
    extra = sorted(k for k in c.arrays if int(k[1:]) >= n)
    if extra:
        raise Bad(f"{', '.join(extra[:8])} present but W{n} is missing")
    sources = {}
    for j in range(n):
        sources[f"{j}.W"], sources[f"{j}.b"] = (f"W{j}", False), ((f"b{j}", False) if f"b{j}" in c.arrays else None)
    names = c.text.get("activations")
    if suffix == ".safetensors" and names is not None:
        names = _json(names, "metadata 'activations'", "a JSON list of names")
        if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
            raise Bad("metadata 'activations' is not a JSON list of names")
    missing = ("has no 'activations' array (one name per layer); add one, or pass activations=" if suffix == ".npz"
               else "has no activations in its metadata; pass activations=")
    return [{"kind": "dense", "activation": None} for _ in range(n)], sources, names, missing


def _torch_plan(c):
    layers: dict[tuple, dict] = {}
    for k in c.arrays:
        m = _TORCH_KEY.match(k)
        if m is None:
            raise Bad(f"key {quote(k)} is not the weight or bias of a Linear at a numeric module path "
                      f"(like '0.weight', '2.bias', numbers without leading zeros): jacgrad reads nn.Sequential "
                      f"state dicts of Linears")
        layers.setdefault(tuple(int(p) for p in m.group(1).split(".")), {})[m.group(2)] = k
    if not layers:
        raise Bad("holds no tensors")
    sources = {}
    for j, index in enumerate(sorted(layers)):
        keys = layers[index]
        if "weight" not in keys:
            raise Bad(f"key {quote(keys['bias'])} has no matching {quote(keys['bias'][:-4] + 'weight')}")
        shape = c.arrays[keys["weight"]][0]
        if len(shape) != 2:
            raise Bad(f"key {quote(keys['weight'])} has shape {shape}, not a Linear's (out, in)")
        sources[f"{j}.W"] = (keys["weight"], True)
        sources[f"{j}.b"] = (keys["bias"], False) if "bias" in keys else None
    spec = [{"kind": "dense", "activation": None} for _ in layers]
    return spec, sources, None, "is a torch state dict, which carries no activations; pass activations= (one per Linear)"


def _no_others(arrays, sources, why):
    claimed = {src[0] for src in sources.values() if src is not None}
    other = sorted(k for k in arrays if k not in claimed)
    if other:
        raise Bad(f"key {quote(other[0])} {why}")


def _json(text, what, want):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past Python's limit
        raise Bad(f"{what} is not {want} ({type(exc).__name__}): {quote(text)}") from None


def _check_spec(spec, prefix, depth):
    """A layer list of known kinds, each with exactly its fields of the right types."""
    if depth > MAX_DEPTH:
        raise Bad(f"layer {prefix[:-1]}: residual blocks nested more than {MAX_DEPTH} deep")
    if not isinstance(spec, list) or not spec:
        raise Bad(f"{'the spec' if not prefix else f'layer {prefix[:-1]}'}: the layer list is not a non-empty JSON list")
    for j, s in enumerate(spec):
        where = f"layer {prefix}{j}"
        kind = s.get("kind") if isinstance(s, dict) else None
        if not isinstance(kind, str) or kind not in _FIELDS:
            text = quote(kind) if isinstance(s, dict) else f"{type(s).__name__} {quote(json.dumps(s))}"
            raise NetworkFileKeyError(f"{where}: unknown layer kind {text}; valid: {', '.join(_FIELDS)}")
        fields = _FIELDS[kind]
        if set(s) != {"kind", *fields}:
            raise Bad(f"{where} ({kind}): fields {', '.join(quote(k) for k in sorted(s)[:8])}; a {kind} layer has "
                      f"{', '.join(['kind', *fields])}")
        for name, types in fields.items():
            if not isinstance(s[name], types) or isinstance(s[name], bool):
                raise Bad(f"{where} ({kind}): {name} is {quote(json.dumps(s[name]))}, not a {name} value")
        if kind == "residual":
            _check_spec(s["layers"], f"{prefix}{j}.", depth + 1)


def _param_keys(spec, prefix):
    for j, s in enumerate(spec):
        if s["kind"] == "residual":
            yield from _param_keys(s["layers"], f"{prefix}{j}.")
        else:
            yield from ((f"{prefix}{j}.{name}", s["kind"]) for name in _PARAMS[s["kind"]])


def _dense(spec):
    for s in spec:
        if s["kind"] == "residual":
            yield from _dense(s["layers"])
        elif s["kind"] == "dense":
            yield s


def _set_activations(spec, names, given, replace, missing):
    """Write the activation names into the spec's dense layers, in order: the file's own (one
    for all, or one each), or ``given`` (which may replace the file's only when ``replace``)."""
    dense = list(_dense(spec))
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
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise NetworkFileKeyError(f"activation {j}: {quote(name)} is not an activation name")
        try:
            s["activation"] = _activations.get(name).name
        except KeyError as exc:
            raise NetworkFileKeyError(f"activation {j}: {exc.args[0] if exc.args else exc}") from None
        except (ValueError, TypeError, RecursionError) as exc:
            raise Bad(f"activation {j}: {exc}") from None


def _check_shapes(spec, declared, prefix, width):
    """Every declared shape against the layers' widths, before any array is read; the width out."""
    before = "the input"
    for j, s in enumerate(spec):
        where, kind = f"{prefix}{j}", s["kind"]
        if kind == "residual":
            out = _check_shapes(s["layers"], declared, f"{where}.", width)
            if width is not None and out != width:
                raise Bad(f"layer {where}: its inner layers map {width} -> {out} features; a residual block needs H -> H")
        elif kind == "dense":
            (W, key, _), b = declared[f"{where}.W"], declared[f"{where}.b"]
            if len(W) != 2:
                raise Bad(f"layer {where}: {key} must be 2-D (H_in, H_out), got shape {W}")
            if width is not None and W[0] != width:
                raise Bad(f"layer {where}: {key} has shape {W} but {before} outputs {width} features")
            if b is not None and b[0] != (W[1],):
                raise Bad(f"layer {where}: {b[1]} has shape {b[0]} but {key} has {W[1]} outputs")
            out = W[1]
        else:
            for name in _PARAMS[kind]:
                shape, key, _ = declared[f"{where}.{name}"]
                if len(shape) != 1 or (width is not None and shape[0] != width):
                    raise Bad(f"layer {where} ({kind}): {key} has shape {shape} but {before} outputs {width} features")
            out = shape[0]
        width, before = out, f"layer {where}"
    return width


def _check_dtypes(declared, dtype):
    """The one float dtype of the network: ``dtype``, or the file's (float32 or float64)."""
    found = []
    for shape, key, kind in filter(None, declared.values()):
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
    out = []
    for j, s in enumerate(spec):
        key, kind = f"{prefix}{j}", s["kind"]
        try:
            if kind == "dense":
                out.append(Dense(arrays[f"{key}.W"], arrays[f"{key}.b"], s["activation"]))
            elif kind == "residual":
                out.append(Residual(_build(s["layers"], f"{key}.", arrays), s["scale"]))
            elif kind == "layernorm":
                out.append(LayerNorm(arrays[f"{key}.gamma"], arrays[f"{key}.beta"], s["eps"]))
            else:
                out.append(RMSNorm(arrays[f"{key}.gamma"], s["eps"]))
        except (KeyError, ValueError, TypeError) as exc:
            msg = exc.args[0] if exc.args else str(exc)
            if str(msg).startswith("layer "):
                raise
            raise type(exc)(f"layer {key}: {msg}") from None
    return out

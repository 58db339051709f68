"""Reading the three container formats as data, in two steps: first what the file DECLARES (the
names, shapes and dtypes of its arrays, and its small text entries), then, once the caller has
checked those against the layout it expects, each array's bytes. No array's data is
decompressed, materialised or allocated before its name and declared size have been checked
(of an .npz member only the first bytes, its .npy header, are read to learn that size), and no
declared size is believed beyond what the file's bytes can hold.

- ``.npz``: the zip directory, then each member's ``.npy`` header (shape, dtype) read from the
  first bytes of the member; a member whose declared size is out of proportion to its compressed
  size is refused; object arrays never load (no pickle).
- ``.safetensors``: the 8-byte header length and the JSON header (duplicate names refused), every
  tensor's offsets checked to tile the data exactly; tensors read with plain file reads.
- ``.pt``/``.pth``/``.ckpt``: torch's zip format only, every member stored (uncompressed), read
  with ``torch.load(weights_only=True)``; a training checkpoint's state dict is taken from under
  its ``"state_dict"`` or ``"model"`` key (``jacgrad.io.state_keys``); each tensor's strides, offset
  and storage size are checked before it is turned into an array.

A ``Contents`` has ``.arrays`` (name -> ``(shape, dtype)``, dtype a NumPy dtype or
``"bfloat16"``), ``.text`` (name -> str or list of str) and ``.read(name, dtype)``. Problems are
``_file_safety.NetworkFileError`` with a message that the caller prefixes with the file's name.
"""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from .file_safety import NetworkFileError as Bad
from .file_safety import clip, quote
from .state_keys import WRAPPERS, unwrap
from .interop import plain_message

__all__ = ["Contents", "read_npz", "read_safetensors", "read_torch"]

TEXT_BYTES = 1 << 20  # an .npz's text members (activations, spec): at most this many bytes
RATIO, SLACK = 100, 1 << 20  # a zip member may inflate to at most RATIO x its compressed size, or SLACK
CHUNK = 1 << 20
_NPZ_TEXT = ("activations", "spec", "ties")  # ties: shared parameters (netfile)


class Contents:
    def __init__(self, arrays: dict, text: dict, read):
        self.arrays, self.text, self._read = arrays, text, read

    def read(self, name: str, dtype=None) -> np.ndarray:
        """The array ``name``; ``dtype`` is needed (and used) only for a bfloat16 one."""
        return self._read(name, dtype)


def _fill(stream, out: np.ndarray, what: str) -> None:
    """Read exactly ``out.nbytes`` bytes from ``stream`` into ``out``, with no copy of them beside it."""
    view, pos = memoryview(out.reshape(-1).view(np.uint8)), 0
    direct = isinstance(stream, io.BufferedReader)  # a plain file reads straight into the array
    while pos < len(view):
        if direct:
            n = stream.readinto(view[pos:])
        else:  # a zip member: a chunk at a time (its readinto would read everything into one bytes first)
            chunk = stream.read(min(CHUNK, len(view) - pos))
            n = len(chunk)
            view[pos:pos + n] = chunk
        if not n:
            raise Bad(f"{what} is truncated: {pos:,} of {len(view):,} bytes")
        pos += n


def _nbytes(shape, dtype) -> int:
    n = int(np.prod(shape, dtype=object)) if shape else 1
    return n * (2 if isinstance(dtype, str) else np.dtype(dtype).itemsize)


def _size(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _numeric(name: str, dtype: np.dtype) -> np.dtype:
    if dtype.hasobject or dtype.kind not in "biufc" or dtype.names is not None or dtype.subdtype is not None:
        raise Bad(f"{quote(name)} has dtype {quote(str(dtype))}: not a plain numeric array "
                  f"(object arrays never load: no pickle)")
    return dtype


# ---------------------------------------------------------------------- .npz
def read_npz(f) -> Contents:
    size = os.fstat(f.fileno()).st_size
    try:
        zf = zipfile.ZipFile(f)
        infos = zf.infolist()
    except Exception as exc:  # BadZipFile, NotImplementedError (zip version, method), OSError, ...
        raise Bad(f"is not an .npz archive (a zip of .npy arrays): {clip(exc)}") from None
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise Bad(f"holds the member {quote(dup)} twice")
    members, text = {}, {}
    for info in infos:
        if not info.filename.endswith(".npy") or info.is_dir():
            raise Bad(f"member {quote(info.filename)} is not an .npy array: not an .npz archive of numeric arrays")
        if info.flag_bits & 0x1:
            raise Bad(f"member {quote(info.filename)} is encrypted")
        key = info.filename[:-4]
        if info.file_size > max(RATIO * info.compress_size, SLACK) or info.compress_size > size:
            raise Bad(f"member {quote(key)} inflates {_size(info.compress_size)} to {_size(info.file_size)}: "
                      f"out of proportion (at most {RATIO}x); write the file with np.savez")
        members[key] = (info, *_npy_header(zf, info, key))
    for key in _NPZ_TEXT:
        if key in members:
            text[key] = _npz_text(zf, key, *members.pop(key))

    def read(key, dtype=None):
        info, offset, shape, fortran, dt = members[key]
        out = _member(zf, key, info, offset, shape, dt)
        return out.reshape(shape[::-1]).T if fortran else out.reshape(shape)

    return Contents({k: (m[2], m[4]) for k, m in members.items()}, text, read)


def _npy_header(zf, info, key):
    """(offset of the data, shape, fortran_order, dtype) from the member's first bytes; its size
    must be exactly the header plus the declared array."""
    fmt = np.lib.format
    try:
        with zf.open(info) as m:
            version = fmt.read_magic(m)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy version {version}")
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read_header(m, max_header_size=10_000)
            offset = m.tell()
    except Bad:
        raise
    except Exception as exc:  # the header is text that numpy parses: anything wrong is this member's fault
        raise Bad(f"member {quote(key)} is not a valid .npy array ({clip(exc)})") from None
    dtype = np.dtype(dtype)
    if key not in _NPZ_TEXT:
        _numeric(key, dtype)
    declared = _nbytes(shape, dtype)
    if offset + declared != info.file_size:
        raise Bad(f"member {quote(key)}: its .npy header declares shape {shape} {dtype} ({_size(declared)}) "
                  f"but the member holds {_size(info.file_size - offset)}")
    return offset, tuple(shape), bool(fortran), dtype


def _member(zf, key, info, offset, shape, dtype) -> np.ndarray:
    """The member's array data, 1-D: exactly the bytes its header declares, CRC checked."""
    out = np.empty(int(np.prod(shape, dtype=object)), dtype=dtype)
    try:
        with zf.open(info) as m:
            m.read(offset)
            _fill(m, out, f"member {quote(key)}")
            if m.read(1):  # also where zipfile checks the CRC
                raise Bad(f"member {quote(key)} holds more bytes than its .npy header declares")
    except Bad:
        raise
    except Exception as exc:  # a CRC mismatch, a broken deflate stream, ...
        raise Bad(f"member {quote(key)} cannot be read: {clip(exc)}") from None
    return out


def _npz_text(zf, key, info, offset, shape, fortran, dtype):
    if dtype.kind != "U" or len(shape) > 1 or info.file_size > TEXT_BYTES:
        raise Bad(f"member {quote(key)} must be a short string array (one name per entry), got shape {shape} "
                  f"{quote(str(dtype))} of {_size(info.file_size)}")
    out = _member(zf, key, info, offset, shape, dtype)
    return [str(s) for s in out] if shape else str(out[0])


# ---------------------------------------------------------------------- .safetensors
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bfloat16", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise Bad(f"its header names {quote(k)} twice")
        seen[k] = v
    return seen


def read_safetensors(f) -> Contents:
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise Bad(f"is not a .safetensors file: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > 100 * 2**20:
        raise Bad(f"is not a readable .safetensors file: its header length {n:,} is more than the "
                  f"{max(size - 8, 0):,} bytes after it")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except Bad:
        raise
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, nested past Python's recursion limit
        raise Bad(f"is not a readable .safetensors file: its header is not JSON ({clip(type(exc).__name__)})") from None
    if not isinstance(header, dict):
        raise Bad(f"is not a readable .safetensors file: its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise Bad("is not a readable .safetensors file: its __metadata__ is not an object of strings")
    data, spans, arrays = 8 + n, [], {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise Bad(f"tensor {quote(name)}: its header entry is not {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = _ST_DTYPES.get(entry["dtype"]), entry["shape"], entry["data_offsets"]
        if dtype is None:
            raise Bad(f"tensor {quote(name)} has dtype {quote(entry['dtype'])}, which jacgrad does not read "
                      f"(valid: {', '.join(_ST_DTYPES)})")
        dtype = dtype if dtype == "bfloat16" else np.dtype(dtype)
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
            raise Bad(f"tensor {quote(name)}: shape {quote(shape)} or data_offsets {quote(offsets)} is malformed")
        if offsets[1] - offsets[0] != _nbytes(shape, dtype) or offsets[0] < 0:
            raise Bad(f"tensor {quote(name)}: shape {tuple(shape)} {entry['dtype']} needs "
                      f"{_nbytes(shape, dtype):,} bytes but its data_offsets {offsets} span {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
        arrays[name] = (tuple(shape), dtype)
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise Bad(f"tensor {quote(name)}: its data starts at {begin:,}, not where the previous one ends ({end:,})")
        end = stop
    if data + end != size:
        raise Bad(f"is not a readable .safetensors file: its tensors need {data + end:,} bytes, the file has {size:,}")
    starts = {name: begin for begin, _, name in spans}

    def read(name, dtype=None):
        shape, dt = arrays[name]
        f.seek(data + starts[name])
        out = np.empty(shape, np.uint16 if dt == "bfloat16" else dt)
        _fill(f, out, f"tensor {quote(name)}")
        if dt == "bfloat16":  # the high half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    return Contents(arrays, dict(meta), read)


# ---------------------------------------------------------------------- .pt / .pth
def read_torch(f) -> Contents:
    try:
        import torch
    except ImportError:
        raise Bad("reading .pt/.pth needs PyTorch: pip install torch (or save the state dict as .safetensors)") from None
    size = os.fstat(f.fileno()).st_size
    try:
        with zipfile.ZipFile(f) as zf:
            infos = zf.infolist()
    except Exception as exc:  # BadZipFile, NotImplementedError (zip version, method), OSError, ...
        raise Bad(f"is not a state dict that torch.load(weights_only=True) reads: not a zip archive "
                  f"({clip(exc)}); jacgrad reads torch.save's zip format (torch >= 1.6), not the legacy one") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
            raise Bad(f"member {quote(info.filename)} is compressed or larger than the file: torch.save stores "
                      f"its members uncompressed")
    f.seek(0)
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and plain containers, or a broken file
        text = plain_message(exc)
        lines = [ln for ln in text.splitlines() if "WeightsUnpickler error" in ln] or [text]
        why = clip(lines[0]) or type(exc).__name__
        raise Bad(f"is not a state dict that torch.load(weights_only=True) reads ({why})") from None
    state, wrapper = unwrap(state)  # a training checkpoint: {"state_dict": sd, ...} or {"model": sd, ...}
    inside = f" under {wrapper!r}" if wrapper else ""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise Bad(f"holds a {type(state).__name__}{inside}, not a state dict of tensors (save model.state_dict())")
    arrays = {}
    for k, v in state.items():
        if type(v) not in (torch.Tensor, torch.nn.Parameter):
            raise Bad(f"holds a {type(v).__name__} at {quote(k)}{inside}, not a state dict of tensors (save "
                      f"model.state_dict(), or a checkpoint with it under {' or '.join(map(repr, WRAPPERS))})")
        arrays[k] = (tuple(v.shape), _torch_storage(k, v, torch))

    def read(name, dtype=None):
        t = state[name].detach()
        if t.dtype in (torch.bfloat16,):
            t = t.to(torch.float32)
        return t.numpy()

    return Contents(arrays, {}, read)


def _torch_storage(key, t, torch):
    """The NumPy dtype (or "bfloat16") of ``t`` once its layout is known to be dense,
    non-overlapping and inside its storage: nothing may claim more memory than the file holds."""
    if t.layout != torch.strided or t.is_quantized or t.is_conj() or t.is_neg() or t.device.type != "cpu":
        raise Bad(f"tensor {quote(key)} is not a plain strided CPU tensor ({t.layout}, {t.dtype})")
    shape, strides, offset, item = tuple(t.shape), t.stride(), t.storage_offset(), t.element_size()
    have, need = t.untyped_storage().nbytes(), (offset + int(np.prod(shape, dtype=object))) * item
    dims, expect = sorted((s, n) for n, s in zip(shape, strides) if n != 1), 1
    dense = True
    for s, n in dims:
        dense, expect = dense and s == expect, expect * n
    if 0 in shape:
        dense, need = True, 0
    if not dense or need > have:
        raise Bad(f"tensor {quote(key)} claims shape {shape} (strides {strides}, offset {offset}: {_size(need)}) "
                  f"over a storage of {_size(have)}: not a dense layout inside its storage")
    if t.dtype == torch.bfloat16:
        return "bfloat16"
    try:
        return np.dtype(torch.empty(0, dtype=t.dtype).numpy().dtype)
    except (TypeError, RuntimeError):
        raise Bad(f"tensor {quote(key)} has dtype {t.dtype}, which NumPy cannot hold") from None

"""Checks at the public edge: float dtypes and shapes, with messages that name what is wrong
(``_layer_list.LayerList``: the per-layer lists of an MLP that check every entry put into them)."""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
from typing import Any

import numpy as np

from .backend import asarray, get_xp, is_foreign_array, is_gpu_array

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_array(x: Any, name: str, xp=None):
    """``x`` as a float32/float64 array of namespace ``xp`` (no copy when it already is one).

    Python lists and scalars are converted with NumPy's default float64; integer, bool and
    complex arrays are a ``TypeError`` — jacgrad does not guess a float width for them. torch,
    JAX and other DLPack arrays become NumPy or CuPy views first (``backend.asarray``).
    """
    t = type(x)  # the common cases first: a float NumPy (or CuPy) array of the namespace asked for
    if (t is np.ndarray if xp is None or xp is np else t is getattr(xp, "ndarray", None)) and x.dtype in FLOAT_DTYPES:
        return x
    if is_foreign_array(x):
        x = asarray(x)
    if xp is None:
        xp = get_xp(x)
    if not hasattr(x, "dtype"):
        x = xp.asarray(x, dtype=np.float64)
    if is_gpu_array(x) != (xp is not np):
        where = "CuPy (GPU)" if is_gpu_array(x) else "NumPy (CPU)"
        raise TypeError(f"{name} is a {where} array but the other inputs are not; move it with jacgrad.to_device")
    if np.dtype(x.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; jacgrad works in float32 or float64 — cast it first")
    return x


_IMPORTERS = (  # (framework module, how to import its model), for the message of require_network
    ("torch.", "import it first with jg.Sequential.from_torch(model) (or jg.MLP.from_torch(model) for a stack of "
               "nn.Linear and activations)"),
    ("sklearn.", "import it first with jg.MLP.from_sklearn(estimator)"),
)


def require_network(net: Any, who: str) -> None:
    """The one check of the ``net`` argument of every public product and report (``gradient_flow``,
    ``ntk``, ``jacgrad.distributed``): a jacgrad network (``MLP``, ``Sequential``: anything with
    ``forward``, ``jacobian_chain``, ``sizes`` and ``dtype``), else a ``TypeError`` naming the
    class in full — and for a torch model or sklearn estimator, the importer to call.

        >>> require_network(3, "ntk")
        Traceback (most recent call last):
        ...
        TypeError: ntk needs a jacgrad network (jg.MLP or jg.Sequential), got a builtins.int
    """
    if all(hasattr(net, a) for a in ("forward", "jacobian_chain", "sizes", "dtype")):
        return
    cls = type(net)
    msg = f"{who} needs a jacgrad network (jg.MLP or jg.Sequential), got a {cls.__module__}.{cls.__qualname__}"
    for prefix, how in _IMPORTERS:
        if any((c.__module__ or "").startswith(prefix) for c in cls.__mro__):  # a subclass of nn.Module too
            msg += f"; {how}"
            break
    raise TypeError(msg)


def network_input(x: Any, name: str, xp, dtype, in_shape: tuple | None = None, tokens: bool = False):
    """``x`` checked as an input of a network whose parameters are ``dtype``: a float array of
    namespace ``xp`` (``float_array``'s checks: int, bool and complex arrays are a ``TypeError``),
    never rounded. float64 into a float32 network is a ``TypeError`` naming both dtypes and the way
    out; float32 into a float64 network is returned as it is (the network's cast to float64 is
    exact); Python lists and scalars, which have no dtype of their own, are made in ``dtype``.
    The one check of ``x`` for every entry point of ``MLP`` and ``Sequential`` (forward, hence
    loss_and_grads and every product), the compiled steps and the reports.

        >>> network_input(np.ones(2), "x", np, np.float32)
        Traceback (most recent call last):
        ...
        TypeError: x is float64 but the network is float32, and jacgrad does not round inputs silently: pass x.astype(np.float32), or build the network in float64 (dtype='float64' in MLP.init, load, from_torch)
    """
    dtype = np.dtype(dtype)
    if not hasattr(x, "dtype") and not is_foreign_array(x):
        x = xp.asarray(x, dtype=dtype)
    x = float_array(x, name, xp)
    check_input_dtype(name, x.dtype, dtype)
    if in_shape is not None:
        check_sample_shape(x.shape, name, tuple(in_shape), tokens)
    return x


def check_sample_shape(shape: tuple, name: str, in_shape: tuple, tokens: bool) -> None:
    """A ``ValueError`` unless ``shape`` is ``(B, *in_shape)`` or, where the network acts per token
    (``tokens``), ``(B, T, *in_shape)``; it names the shape and what the network takes."""
    shape = tuple(shape)
    per = shape[1:]
    if per == in_shape or (tokens and len(per) == len(in_shape) + 1 and per[1:] == in_shape):
        return
    want = f"(B, {', '.join(map(str, in_shape))})" + (f" or, per token, (B, T, {', '.join(map(str, in_shape))})"
                                                      if tokens else "")
    if len(in_shape) == 1 and len(per) == 1:  # (B, n): the right rank, the wrong width
        raise ValueError(f"layer 0 expects {in_shape[-1]} features, got {per[-1]} ({name} must be {want})")
    raise ValueError(f"layer 0 expects {in_shape[-1]} features, got an array of shape {shape_str(shape)} "
                     f"({name} must be {want})")


def check_input_dtype(name: str, have, dtype) -> None:
    """The ``TypeError`` of ``network_input`` when an input of dtype ``have`` would be rounded to the
    network's ``dtype`` (float64 into float32); for inputs checked by their dtype alone (a Dask batch)."""
    have, dtype = np.dtype(have), np.dtype(dtype)
    if have.kind == "f" and have.itemsize > dtype.itemsize:
        raise TypeError(
            f"{name} is {have} but the network is {dtype}, and jacgrad does not round inputs silently: pass "
            f"{name}.astype(np.{dtype}), or build the network in {have} (dtype='{have}' in MLP.init, load, "
            f"from_torch)"
        )


def shape_str(shape) -> str:
    """``(3,)``, ``(4, 5)``: the shape as Python prints a tuple of ints."""
    return str(tuple(int(s) for s in shape))


def replacement(j: int, new, old, what: str):
    """``new`` if it may replace layer ``j``'s array ``old`` (same shape, dtype and device);
    else a ``TypeError``/``ValueError`` naming the layer and what differs. Not copied."""
    if not (isinstance(new, np.ndarray) or is_gpu_array(new)):
        kind = type(new).__module__.split(".")[0] + "." + type(new).__name__ if hasattr(new, "shape") else type(new).__name__
        raise TypeError(f"layer {j}: {what} must be a NumPy or CuPy array, not {kind}")
    if is_gpu_array(new) != is_gpu_array(old):
        raise TypeError(
            f"layer {j}: {what} is a {'CuPy (GPU)' if is_gpu_array(new) else 'NumPy (CPU)'} array but this "
            f"network is on the {'GPU' if is_gpu_array(old) else 'CPU'}; move it with jacgrad.to_device"
        )
    new = float_array(new, f"layer {j}: {what}", get_xp(old))
    if new.shape != old.shape:
        raise ValueError(
            f"layer {j}: {what} has shape {shape_str(new.shape)} but this network's layer {j} needs "
            f"{shape_str(old.shape)}; build a new MLP to change the widths"
        )
    if new.dtype != old.dtype:
        raise TypeError(f"layer {j}: {what} has dtype {new.dtype} but this network is {old.dtype}; cast it first")
    if is_gpu_array(old) and new.device.id != old.device.id:
        raise ValueError(f"layer {j}: {what} is on GPU {new.device.id} but this network is on GPU {old.device.id}")
    return new


def layer_widths(sizes) -> list[int]:
    """``sizes`` as a list of ints ≥ 1: integers, or integer-valued floats; anything else names the entry."""
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"sizes must be a list of layer widths [n_in, …, n_out], got {sizes!r}") from None
    if len(sizes) < 2:
        raise ValueError(f"sizes must be at least two positive widths [n_in, …, n_out], got {sizes}")
    out = []
    for i, s in enumerate(sizes):
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, numbers.Real):
            raise TypeError(f"sizes[{i}] = {s!r}: layer widths must be integers")
        if not isinstance(s, numbers.Integral):
            if not math.isfinite(s) or s != int(s):
                raise ValueError(f"sizes[{i}] = {s!r}: layer widths must be integers (not truncated silently)")
        s = int(s)
        if s < 1:
            where = "the input width" if i == 0 else f"layer {i - 1}'s output width"
            raise ValueError(
                f"sizes[{i}] = {s}: {where} must be at least 1 (zero-width layers are not supported); got sizes {sizes}"
            )
        out.append(s)
    return out


def nonnegative_finite(value, name: str) -> float:
    """``value`` as a float that is finite and ≥ 0; else an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and ≥ 0, got {value}")
    return value


def byte_size(n: float) -> str:
    """``n`` bytes in the unit its size calls for: ``"100 bytes"``, ``"1.95 KiB"``, ``"16 MiB"``,
    ``"1.5 GiB"`` (three significant digits).

        >>> byte_size(100), byte_size(2000), byte_size(16 << 20), byte_size(3 << 29)
        ('100 bytes', '1.95 KiB', '16 MiB', '1.5 GiB')
    """
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} bytes" if isinstance(n, float) and n != int(n) else f"{int(n)} bytes"


def check_max_memory(value: Any, none_means: str = "no limit"):
    """``value``, a memory budget in bytes: ``None`` (which means ``none_means``) or a real number
    > 0 and finite. Anything else is a ``ValueError`` that says what it got: a bool, a non-number
    (its type), NaN, ±inf (pass None), zero or a negative number.

        >>> check_max_memory(float("nan"))
        Traceback (most recent call last):
        ...
        ValueError: max_memory must be a number of bytes > 0, or None for no limit; got nan, which is not a size
    """
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)):
        why = f"{value!r}, a bool"
    elif not isinstance(value, numbers.Real):
        why = f"{value!r} (a {type(value).__name__}, not a number)"
    elif math.isnan(value):
        why = "nan, which is not a size"
    elif math.isinf(value):
        why = f"{float(value)}; for {none_means} pass None"
    elif value <= 0:
        why = f"{value!r}"
    else:
        return value
    raise ValueError(f"max_memory must be a number of bytes > 0, or None for {none_means}; got {why}")


def check_out(out: Any, shape: tuple, dtype, who: str, xp):
    """``out`` checked as the array a product ``who`` writes its result into: an array of ``xp``
    (the inputs' device), of exactly ``shape`` and ``dtype``, C-contiguous; returned as it is."""
    if not hasattr(out, "shape") or not hasattr(out, "flags") or is_gpu_array(out) != (xp is not np):
        raise TypeError(f"{who}: out must be a {xp.__name__} array on the inputs' device, not {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or np.dtype(out.dtype) != np.dtype(dtype):
        raise ValueError(f"{who}: out is {shape_str(out.shape)} {out.dtype}; the result is {shape_str(shape)} "
                         f"{np.dtype(dtype)}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{who}: out must be C-contiguous (its views are handed out as the result)")
    return out


def require_finite(a, where: str) -> None:
    """A ``FloatingPointError`` naming ``where`` and the first index when ``a`` has a NaN or Inf."""
    xp = get_xp(a)
    bad = ~xp.isfinite(a)
    if bool(bad.any()):
        first = tuple(int(i) for i in np.argwhere(np.asarray(xp.asnumpy(bad) if xp is not np else bad))[0])
        raise FloatingPointError(f"{where} has non-finite values (first at index {first})")


_IDS_CHECKED = contextvars.ContextVar("jacgrad_ids_checked", default=False)


@contextlib.contextmanager
def ids_checked():
    """Within it, integer inputs — softmax cross-entropy's labels, an ``Embedding``'s token ids — are
    taken as already range-checked: the caller (a compiled step, at load, before its CUDA graph) did
    so on the host, and the check's device-to-host read could not be recorded in a graph. Shapes and
    dtypes are still checked."""
    token = _IDS_CHECKED.set(True)
    try:
        yield
    finally:
        _IDS_CHECKED.reset(token)


def ids_are_checked() -> bool:
    """True inside ``ids_checked()``."""
    return _IDS_CHECKED.get()

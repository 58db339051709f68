"""Losses and their gradients with respect to the network output.

Each loss returns ``(value, gradient)``: ``value`` is a 0-d array and ``gradient`` has the shape
of the first argument; both have the first argument's dtype and live on its backend (NumPy or
CuPy — results stay on the device of their inputs). Float targets are cast to that dtype, so
a float32 network stays float32. With the matching output activation (identity, softmax,
sigmoid) every gradient has the form ``(Ŷ − Y) / n``.

An empty output (``B = 0`` or ``N = 0``) gives value ``0.0`` and an all-zero gradient of the
output's shape: the mean over nothing is taken as zero, without a warning.

    >>> import numpy as np
    >>> from jacgrad import losses
    >>> value, grad = losses.get("mse")(np.array([1.0, 3.0]), np.array([1.0, 1.0]))
    >>> float(value), grad.tolist()
    (2.0, [0.0, 2.0])
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..core import lazy as _lazy
from ..core.validation import float_array, ids_are_checked, shape_str
from ..core.backend import asarray, get_xp, is_gpu_array, to_numpy
from .loss_workspace import LossWorkspace

__all__ = [
    "ALIASES", "LOSSES", "LossWorkspace", "canonical", "check_target", "one_layout", "get", "mse", "names", "sigmoid_bce",
    "softmax_cross_entropy",
]


def _in_memory_target(t: Any) -> None:
    """A chunked (Dask) target beside an in-memory output is a ``TypeError`` saying what to pass."""
    if _lazy.handler_for(t) is not None:
        raise TypeError(f"the target is a {type(t).__module__}.{type(t).__name__} (chunked, lazy) but the input x is an "
                        f"in-memory array: pass x and the target both as Dask arrays (jacgrad.distributed maps the "
                        f"call over their chunks), or neither (target.compute())")


def _output_and_target(y: Any, t: Any, y_name: str, loss: str | None = None):
    """``y`` as a float array, ``t`` as a float array of ``y``'s dtype and shape, and their xp.
    Integer targets are a ``TypeError`` that points to ``softmax_cross_entropy`` (they are
    class labels, most likely), not to a cast."""
    _in_memory_target(t)
    xp = get_xp(y, t)
    y = float_array(y, y_name, xp)
    if loss is not None and hasattr(t, "dtype"):  # an integer array (a Python list of ints is taken as floats)
        t = asarray(t)  # torch / JAX / DLPack targets: their NumPy dtype
    if loss is not None and hasattr(t, "dtype") and np.dtype(t.dtype).kind in "iub":
        dt = t.dtype
        raise TypeError(
            f"target t has dtype {dt}: {loss} takes float targets of the output's shape {shape_str(y.shape)}; "
            f"for integer class labels use loss=\"softmax_cross_entropy\" (or pass one-hot rows as floats)"
        )
    t = float_array(t, "target t", xp).astype(y.dtype, copy=False)
    if t.shape != y.shape:
        raise ValueError(f"target has shape {shape_str(t.shape)} but the output has shape {shape_str(y.shape)}")
    return xp, y, t


def _empty(xp, y):
    """The loss of an empty output: value 0 and an (empty) all-zero gradient, no warning."""
    return xp.zeros((), dtype=y.dtype), xp.zeros_like(y)


def mse(y: Any, t: Any):
    """Mean squared error over all elements: ``L = Σ (y − t)² / N``, ``∂L/∂y = 2 (y − t) / N``.

    ``y``: output, any shape ``S`` (``(B, n_out)`` for a network); ``t``: target, shape ``S``;
    ``N = y.size``. Returns ``(L: (), ∂L/∂y: S)``.

        >>> import numpy as np
        >>> value, grad = mse(np.array([[0.0, 2.0]]), np.array([[1.0, 1.0]]))
        >>> float(value), grad.tolist()
        (1.0, [[-1.0, 1.0]])
    """
    return _elementwise("mse", y, t, "output y")


def _labels(xp, t, B: int, C: int):
    """Integer labels ``t: (B,)`` checked against the batch and the ``C`` classes."""
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"labels have shape {shape_str(t.shape)} but the logits have shape ({B}, {C}); "
                         f"expected labels of shape {shape_str((B,))}")
    if B and not ids_are_checked():
        lo, hi = (int(v) for v in to_numpy(xp.stack([t.min(), t.max()])))  # one transfer, not two
        if lo < 0 or hi >= C:
            bad = lo if lo < 0 else hi
            raise ValueError(f"label {bad} is out of range for C={C} classes (labels must be in [0, {C}))")
    return t


def softmax_cross_entropy(z: Any, t: Any):
    """Softmax cross-entropy, mean over the batch: ``L = −Σ_b Σ_c T_bc log softmax(z_b)_c / B``.

    ``z``: logits ``(B, C)``. ``t``: integer labels ``(B,)`` in ``[0, C)`` (T is their one-hot),
    or float rows of probabilities ``T: (B, C)``. A 1-D float ``t`` is a ``TypeError``: labels
    must be integers. Returns ``(L: (), ∂L/∂z: (B, C))`` with

        ∂L/∂z = (Ŷ − T) / B,   Ŷ = softmax(z) row by row,

    for rows of ``T`` that sum to 1; for any other rows the exact ``(rowsum(T)·Ŷ − T) / B`` is
    returned, as PyTorch does. Log-sum-exp is shifted by the row maximum, so logits of ±1e4
    give finite values and gradients.

        >>> import numpy as np
        >>> value, grad = softmax_cross_entropy(np.array([[0.0, 0.0]]), np.array([1]))
        >>> round(float(value), 6), grad.tolist()
        (0.693147, [[0.5, -0.5]])
    """
    xp, z, labels, T = _softmax_inputs(z, t)
    if not z.shape[0]:
        return _empty(xp, z)
    ws = LossWorkspace("softmax_cross_entropy", xp, z.shape, z.dtype)
    if T is None:
        ws.labels[...] = labels
    ws(z, T, labels=T is None)
    return ws.value, ws.grad


def _softmax_inputs(z: Any, t: Any):
    """``(xp, z, labels, T)`` of softmax cross-entropy, checked: ``labels (B,)`` and ``T = None``,
    or ``labels = None`` and float rows ``T: (B, C)``."""
    _in_memory_target(t)
    xp = get_xp(z, t)
    z = float_array(z, "logits z", xp)
    if z.ndim != 2:
        raise ValueError(f"logits z must be 2-D (B, C); got shape {shape_str(z.shape)}")
    B, C = z.shape
    if B and not C:
        raise ValueError(f"logits z have shape {shape_str(z.shape)}: softmax needs at least one class")
    t = asarray(t) if hasattr(t, "dtype") else xp.asarray(t)
    kind = np.dtype(t.dtype).kind
    if kind in "iu":
        labels = _labels(xp, t, B, C)
        T = None
    elif kind == "f" and t.ndim == 2:
        _, _, T = _output_and_target(z, t, "logits z")
    elif kind == "f":
        raise TypeError(f"labels must be integers but t is a {t.dtype} array of shape {shape_str(t.shape)}; "
                        f"pass int labels (B,) or float rows of probabilities (B, C)")
    else:
        raise TypeError(f"target t has dtype {t.dtype}; pass int labels (B,) or float rows of probabilities (B, C)")
    return xp, z, (labels if T is None else None), T


def sigmoid_bce(z: Any, t: Any):
    """Binary cross-entropy of sigmoid(z), mean over all elements.

    ``z``: logits, any shape ``S``; ``t``: targets in ``[0, 1]``, shape ``S``; ``N = z.size``.
    ``L = Σ [max(z, 0) − z·t + log(1 + exp(−|z|))] / N`` (which equals
    ``−Σ [t log σ(z) + (1 − t) log(1 − σ(z))] / N`` without ever overflowing, finite for
    ``|z|`` up to 1e4 and beyond) and ``∂L/∂z = (σ(z) − t) / N``. Targets outside ``[0, 1]``
    are not rejected: the formula stays the exact value and gradient (as in PyTorch).
    Returns ``(L: (), ∂L/∂z: S)``.

        >>> import numpy as np
        >>> value, grad = sigmoid_bce(np.array([0.0, 1e4]), np.array([1.0, 1.0]))
        >>> round(float(value), 6), grad.tolist()
        (0.346574, [-0.25, 0.0])
    """
    return _elementwise("sigmoid_bce", z, t, "logits z")


def _elementwise(name: str, y, t, what: str):
    """``(value, gradient)`` of a loss whose target has the output's shape, through its workspace."""
    xp, y, t = _output_and_target(y, t, what, name)
    if not y.size:
        return _empty(xp, y)
    ws = LossWorkspace(name, xp, y.shape, y.dtype)
    ws(y, t)
    return ws.value, ws.grad


def one_layout(t: Any) -> Any:
    """A 2-D NumPy/CuPy target made C-contiguous (anything else as given): the layout a compiled
    step copies targets into, so ``loss_and_grads`` sums in the same order (bitwise the same)."""
    if getattr(t, "ndim", 0) == 2 and (isinstance(t, np.ndarray) or is_gpu_array(t)):
        return get_xp(t).ascontiguousarray(t)
    return t


def check_target(name: str, y: Any, t: Any) -> None:
    """The checks loss ``name`` makes of its output ``y`` and target ``t`` — shapes, dtypes, devices,
    the label range — raising its errors, without computing the loss."""
    name = canonical(name)  # ValueError listing the losses
    if name == "softmax_cross_entropy":
        _softmax_inputs(y, t)
    else:
        _output_and_target(y, t, "logits z" if name == "sigmoid_bce" else "output y", name)


LOSSES: dict[str, Callable] = {
    "mse": mse,
    "softmax_cross_entropy": softmax_cross_entropy,
    "sigmoid_bce": sigmoid_bce,
}


# torch.nn.functional's names for the same losses (same reductions: mean over the batch; mean over
# all elements). torch's ``mse_loss`` and ``binary_cross_entropy`` are not listed: the first is a
# different spelling only, the second takes probabilities, not logits.
ALIASES: dict[str, str] = {
    "cross_entropy": "softmax_cross_entropy",
    "binary_cross_entropy_with_logits": "sigmoid_bce",
}


def names() -> list[str]:
    """The loss names, sorted (aliases in ``ALIASES``)."""
    return sorted(LOSSES)


def canonical(name: str) -> str:
    """The loss name ``name`` stands for: itself, or what its torch alias means (``ALIASES``);
    a ``ValueError`` listing the valid names (and aliases) otherwise. The one lookup of a loss
    name: everything that takes ``loss=`` goes through it.

        >>> canonical("cross_entropy")
        'softmax_cross_entropy'
    """
    if isinstance(name, str):
        if name in LOSSES:
            return name
        if name in ALIASES:
            return ALIASES[name]
    aliases = ", ".join(f"{a} (= {c})" for a, c in ALIASES.items())
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(names())}; aliases: {aliases}")


def get(name: str) -> Callable:
    """The loss called ``name`` (or its torch alias, ``ALIASES``); a ``ValueError`` listing the
    valid names otherwise.

        >>> get("mse").__name__
        'mse'
        >>> get("binary_cross_entropy_with_logits").__name__
        'sigmoid_bce'
    """
    return LOSSES[canonical(name)]

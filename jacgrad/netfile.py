"""The ``.npz`` network file: arrays ``W0, b0, W1, b1, …`` and ``activations``.

``Wj`` is ``(H_{j-1}, H_j)`` (the batch-first convention ``h = z @ W + b``), ``bj`` is ``(H_j,)``
and may be omitted (zeros), ``activations`` is an array of strings with one name per layer
(or a single name for all). Write one from any framework with
``np.savez(path, W0=..., b0=..., W1=..., b1=..., activations=np.array(["tanh", "identity"]))``
— from a ``torch.nn.Linear`` take ``weight.T``.
"""

from __future__ import annotations

import os

import numpy as np

from .backend import to_device, to_numpy

__all__ = ["load", "save"]


def save(net, path) -> None:
    arrays = {}
    for j, (W, b) in enumerate(zip(net.weights, net.biases)):
        arrays[f"W{j}"], arrays[f"b{j}"] = to_numpy(W), to_numpy(b)
    np.savez(path, activations=np.array(net.activations), **arrays)


def load(path, dtype: str | None = None, device: str = "cpu"):
    """An ``MLP`` from ``path``; errors name the file and the missing or malformed array."""
    from .mlp import MLP

    if not os.path.exists(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single .npy array, not an .npz archive")
        with loaded as archive:
            arrays = {k: archive[k] for k in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc) and "single" not in str(exc):  # np.load's word for "not an .npy/.npz at all" or object arrays
            raise ValueError(f"weights file {path!r} is not an .npz archive of plain numeric arrays") from None
        raise ValueError(f"weights file {path!r} is not a readable .npz archive ({exc})") from None
    except Exception as exc:
        raise ValueError(f"weights file {path!r} is not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    for k, a in arrays.items():  # NpzFile hands back raw bytes for a member without the .npy header
        if not isinstance(a, np.ndarray):
            raise ValueError(f"weights file {path!r}: member {k!r} is not a valid .npy array")
    keys = set(arrays)
    n = 0
    while f"W{n}" in keys:
        n += 1
    if n == 0:
        raise ValueError(f"weights file {path!r} has no array W0 (found: {', '.join(sorted(keys)) or 'nothing'})")
    extra = sorted(k for k in keys if k[:1] in "Wb" and k[1:].isdigit() and int(k[1:]) >= n)
    if extra:
        raise ValueError(f"weights file {path!r}: {', '.join(extra)} present but W{n} is missing")
    if "activations" not in keys:
        raise ValueError(f"weights file {path!r} has no 'activations' array (one name per layer)")
    acts = [str(a) for a in np.atleast_1d(arrays["activations"])]
    if len(acts) == 1:
        acts = acts * n
    weights = [arrays[f"W{j}"] for j in range(n)]
    for j, W in enumerate(weights):
        if W.ndim != 2:
            raise ValueError(f"weights file {path!r}: W{j} must be 2-D (H_in, H_out), got shape {W.shape}")
    biases = [arrays[f"b{j}"] if f"b{j}" in keys else np.zeros(weights[j].shape[-1]) for j in range(n)]
    for j, W in enumerate(weights):
        if W.dtype.kind != "f":
            raise ValueError(f"weights file {path!r}: W{j} has dtype {W.dtype}, not floating point")
    dt = np.dtype(dtype) if dtype is not None else np.result_type(*[W.dtype for W in weights])
    weights = [to_device(np.asarray(W, dtype=dt), device) for W in weights]
    biases = [to_device(np.asarray(b, dtype=dt), device) for b in biases]
    return MLP(weights, biases, acts)

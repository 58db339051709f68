"""The convolutional family in network files (``Sequential``'s layout, ``jacgrad.netfile``): each
kind's ``spec`` fields, the arrays it stores (``"<j>.weight"``, ``"<j>.bias"``, and BatchNorm's
``"<j>.running_mean"``/``"<j>.running_var"``, which are constants, not parameters), their shape
checks before any data is read, and the layer built from them.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers.Conv2d(np.ones((4, 3, 3, 3)), None, padding="same", activation="relu")
    >>> array_names(L.spec())
    ('weight',)
"""

from __future__ import annotations

from ._file_safety import NetworkFileError as Bad
from .batchnorm_layers import BatchNorm1d, BatchNorm2d
from .conv_layers import Conv1d, Conv2d
from .pool_layers import AdaptiveAvgPool2d, AvgPool2d, Flatten, MaxPool2d

__all__ = ["FIELDS", "array_names", "build", "check_shapes", "file_arrays"]

_SIZE = (int, list)
_CONV = {"activation": str, "stride": _SIZE, "padding": (int, str, list), "dilation": _SIZE, "groups": int, "bias": bool}
_POOL = {"kernel_size": _SIZE, "stride": _SIZE, "padding": _SIZE}
FIELDS = {"conv1d": _CONV, "conv2d": _CONV, "avgpool2d": _POOL, "maxpool2d": {**_POOL, "dilation": _SIZE},
          "adaptiveavgpool2d": {"output_size": int}, "flatten": {},
          "batchnorm1d": {"eps": (int, float), "affine": bool, "activation": str},
          "batchnorm2d": {"eps": (int, float), "affine": bool, "activation": str}}
_CLASSES = {"conv1d": Conv1d, "conv2d": Conv2d, "avgpool2d": AvgPool2d, "maxpool2d": MaxPool2d,
            "adaptiveavgpool2d": AdaptiveAvgPool2d, "flatten": Flatten, "batchnorm1d": BatchNorm1d,
            "batchnorm2d": BatchNorm2d}


def array_names(spec: dict) -> tuple:
    """The arrays a layer of ``spec`` stores, by name."""
    kind = spec["kind"]
    if kind in ("conv1d", "conv2d"):
        return ("weight", "bias") if spec["bias"] else ("weight",)
    if kind in ("batchnorm1d", "batchnorm2d"):
        return (("weight", "bias") if spec["affine"] else ()) + ("running_mean", "running_var")
    return ()


def file_arrays(layer) -> list:
    """``[(name, array)]`` a layer of this family stores: its parameters, and BatchNorm's running statistics."""
    out = list(zip(layer.names, layer.params))
    if isinstance(layer, BatchNorm2d):
        out += [("running_mean", layer.running_mean), ("running_var", layer.running_var)]
    return out


def check_shapes(spec: dict, declared: dict, where: str):
    """The stored arrays' dimensions against ``spec`` (a conv weight is 3-D/4-D, everything else
    1-D with one length); returns None: widths do not chain through image layers."""
    kind, names = spec["kind"], array_names(spec)
    if kind in ("conv1d", "conv2d"):
        W, key, _ = declared[f"{where}.weight"]
        want = 3 if kind == "conv1d" else 4
        if len(W) != want:
            raise Bad(f"layer {where} ({kind}): {key} must be {want}-D (C_out, C_in/groups, …), got shape {W}")
        names = names[1:]
        n = W[0]
    else:
        n = declared[f"{where}.{names[0]}"][0][0] if names else None
    for name in names:
        shape, key, _ = declared[f"{where}.{name}"]
        if shape != (n,):
            raise Bad(f"layer {where} ({kind}): {key} has shape {shape}; it must be ({n},)")
    return None


def build(spec: dict, key: str, arrays: dict):
    """The layer of ``spec`` from ``arrays`` (canonical names ``"<key>.<name>"``)."""
    kind, a = spec["kind"], (lambda name: arrays[f"{key}.{name}"])
    if kind in ("conv1d", "conv2d"):
        return _CLASSES[kind](a("weight"), a("bias") if spec["bias"] else None, stride=_size(spec["stride"]),
                              padding=_size(spec["padding"]), dilation=_size(spec["dilation"]),
                              groups=spec["groups"], activation=spec["activation"])
    if kind in ("batchnorm1d", "batchnorm2d"):
        w, b = (a("weight"), a("bias")) if spec["affine"] else (None, None)
        return _CLASSES[kind](w, b, a("running_mean"), a("running_var"), eps=spec["eps"], activation=spec["activation"])
    if kind in ("avgpool2d", "maxpool2d"):
        extra = {"dilation": _size(spec["dilation"])} if kind == "maxpool2d" else {}
        return _CLASSES[kind](_size(spec["kernel_size"]), _size(spec["stride"]), _size(spec["padding"]), **extra)
    if kind == "adaptiveavgpool2d":
        return AdaptiveAvgPool2d(spec["output_size"])
    return Flatten()


def _size(v):
    return tuple(v) if isinstance(v, list) else v

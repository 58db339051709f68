"""The convolutional family of ``jacgrad.Sequential.from_torch`` (``torch_blocks``'s walk): torch's
own ``nn.Conv1d``/``nn.Conv2d`` (``padding_mode="zeros"``), ``nn.AvgPool2d``, ``nn.MaxPool2d``,
``nn.AdaptiveAvgPool2d(1)``, ``nn.Flatten`` after an image layer, and ``nn.BatchNorm1d``/
``nn.BatchNorm2d`` in eval mode, each to its ``jacgrad.nn.layers`` twin with torch's arguments.
An activation module right after a convolution or a BatchNorm is fused into it, as after an ``nn.Linear``.
``conv_modules`` goes back (``Sequential.to_torch``): each layer of the family to its torch module,
its fused activation as the module after it, a BatchNorm in eval mode.

A BatchNorm in train mode is refused: it normalises each sample with the batch's statistics,
which couples the samples (a per-sample Jacobian or gradient would depend on the rest of the
batch); ``model.eval()`` makes it the per-channel affine map of its running statistics.

    >>> import torch, jacgrad as jg
    >>> from jacgrad.io.interop.torch_blocks import layers_from_torch
    >>> m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
    ...                         torch.nn.Flatten(), torch.nn.Linear(64, 2))
    >>> [type(L).__name__ for L in layers_from_torch(m)]
    ['Conv2d', 'MaxPool2d', 'Flatten', 'Dense']
"""

from __future__ import annotations

import torch
from torch import nn

from ...conv.batchnorm import BatchNorm1d, BatchNorm2d
from ...conv.layers import Conv1d, Conv2d
from ...conv.pools import AdaptiveAvgPool2d, AvgPool2d, Flatten, MaxPool2d
from ...conv.prelu import PReLU
from .torch import activation_module

__all__ = ["IMAGE_MODULES", "conv_layer", "conv_modules"]

IMAGE_MODULES = ("nn.Conv1d", "nn.Conv2d", "nn.AvgPool2d", "nn.MaxPool2d", "nn.AdaptiveAvgPool2d(1)",
                 "nn.BatchNorm1d (eval)", "nn.BatchNorm2d (eval)", "nn.Flatten", "nn.PReLU")
_IMAGE_LAYERS = (Conv1d, Conv2d, AvgPool2d, MaxPool2d, AdaptiveAvgPool2d, BatchNorm1d, BatchNorm2d, PReLU)


def _refuse(at: str, m, why: str):
    raise TypeError(f"{at} ({m!r}): {why}")


def conv_layer(m, at: str, conv, before: list):
    """The jacgrad layer of torch module ``m`` when it is one of this family, else None.
    ``conv(tensor, what)``: the importer's array maker; ``before``: the layers made so far (an
    ``nn.Flatten`` becomes a layer only where they give images, else it passes through)."""
    kind = type(m)
    if kind in (nn.Conv1d, nn.Conv2d):
        if m.padding_mode != "zeros":
            _refuse(at, m, f"padding_mode={m.padding_mode!r} is not supported; only 'zeros'")
        one = (lambda t: t[0]) if kind is nn.Conv1d else (lambda t: t)
        padding = m.padding if isinstance(m.padding, str) else one(m.padding)
        cls = Conv1d if kind is nn.Conv1d else Conv2d
        return cls(conv(m.weight, f"{at}: weight"), None if m.bias is None else conv(m.bias, f"{at}: bias"),
                   stride=one(m.stride), padding=padding, dilation=one(m.dilation), groups=m.groups)
    if kind is nn.MaxPool2d:
        if m.ceil_mode or m.return_indices:
            _refuse(at, m, "ceil_mode=True and return_indices=True are not supported")
        return MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation)
    if kind is nn.AvgPool2d:
        if m.ceil_mode or not m.count_include_pad or m.divisor_override is not None:
            _refuse(at, m, "only ceil_mode=False, count_include_pad=True and divisor_override=None are supported")
        return AvgPool2d(m.kernel_size, m.stride, m.padding)
    if kind is nn.AdaptiveAvgPool2d:
        try:
            return AdaptiveAvgPool2d(m.output_size)
        except ValueError as exc:
            raise TypeError(f"{at}: {exc}") from None
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if m.training:
            _refuse(at, m, "is in train mode, where it normalises with the batch's own statistics: that couples the "
                           "samples, so per-sample Jacobians and gradients are not defined; call model.eval() first")
        if m.running_mean is None:
            _refuse(at, m, "has no running statistics (track_running_stats=False), so it always uses the batch's: "
                           "that couples the samples; build it with track_running_stats=True")
        cls = BatchNorm1d if kind is nn.BatchNorm1d else BatchNorm2d
        w = None if m.weight is None else conv(m.weight, f"{at}: weight")
        b = None if m.bias is None else conv(m.bias, f"{at}: bias")
        return cls(w, b, conv(m.running_mean, f"{at}: running_mean"), conv(m.running_var, f"{at}: running_var"), eps=m.eps)
    if kind is nn.PReLU:  # a parameterised activation: a layer of its own (one slope, or one per channel)
        return PReLU(conv(m.weight, f"{at}: weight"))
    if kind is nn.Flatten and (m.start_dim, m.end_dim) == (1, -1) and _gives_images(before):
        return Flatten()
    return None


def _gives_images(layers) -> bool:
    """Whether the last of ``layers`` outputs images: an image layer, a residual block whose branch
    ends in one, or activations after either (they keep the shape)."""
    for L in reversed(layers):
        if isinstance(L, _IMAGE_LAYERS):
            return True
        if L.kind == "residual":
            return _gives_images(L.branch)
        if L.kind != "activation":
            return False
    return False


_CLASSES = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "batchnorm1d": nn.BatchNorm1d, "batchnorm2d": nn.BatchNorm2d,
            "avgpool2d": nn.AvgPool2d, "maxpool2d": nn.MaxPool2d}


def conv_modules(L, tensor, tie) -> list | None:
    """The torch modules of jacgrad layer ``L`` when it is one of this family, else None: the inverse
    of ``conv_layer`` (``conv_layer`` of the first gives ``L`` back; its fused activation is the
    module after it). ``tensor(a)``: a torch view of array ``a``, copied into the module (same dtype,
    same device); ``tie(a, t)``: the torch tensor of ``a``'s first use (``t`` the first time), so a
    shared array is one torch parameter or buffer in every place. A BatchNorm comes in eval mode
    (its running statistics: the per-channel affine map ``L`` computes).

        >>> import numpy as np, jacgrad as jg
        >>> from jacgrad.io.interop.torch import tensor
        >>> conv_modules(jg.layers.Conv2d(np.ones((4, 2, 1, 1)), None, stride=2, activation="relu"),
        ...              lambda a: tensor(torch, a), lambda a, t: t)
        [Conv2d(2, 4, kernel_size=(1, 1), stride=(2, 2), bias=False), ReLU()]
    """
    kind, spec = L.kind, L.spec()
    if kind in ("conv1d", "conv2d"):
        W = tensor(L.W)
        m = _CLASSES[kind](L.in_channels, L.out_channels, tuple(W.shape[2:]), stride=spec["stride"],
                           padding=spec["padding"], dilation=spec["dilation"], groups=L.groups,
                           bias=L.b is not None, dtype=W.dtype, device=W.device)
        _fill(m, [("weight", L.W), ("bias", L.b)], tensor, tie)
    elif kind in ("batchnorm1d", "batchnorm2d"):
        mean = tensor(L.running_mean)
        m = _CLASSES[kind](L.num_features, eps=L.eps, affine=L.weight is not None, dtype=mean.dtype,
                           device=mean.device).eval()
        _fill(m, [("weight", L.weight), ("bias", L.bias), ("running_mean", L.running_mean),
                  ("running_var", L.running_var)], tensor, tie)
    elif kind == "prelu":
        w = tensor(L.weight)
        m = nn.PReLU(L.num_parameters, dtype=w.dtype, device=w.device)
        _fill(m, [("weight", L.weight)], tensor, tie)
    elif kind in ("avgpool2d", "maxpool2d"):
        sizes = {k: tuple(v) for k, v in spec.items() if k in ("kernel_size", "stride", "padding", "dilation")}
        return [_CLASSES[kind](**sizes)]
    elif kind == "adaptiveavgpool2d":
        return [nn.AdaptiveAvgPool2d(1)]
    elif kind == "flatten":
        return [nn.Flatten()]
    else:
        return None
    act = activation_module(nn, spec.get("activation", "identity"))
    return [m] if act is None else [m, act]


def _fill(m, arrays, tensor, tie) -> None:
    """Copy each ``(name, array)`` (None: the module has no such tensor) into ``m``'s tensor of
    that name, then put ``tie``'s tensor in its place."""
    arrays = [(name, a) for name, a in arrays if a is not None]
    with torch.no_grad():
        for name, a in arrays:
            getattr(m, name).copy_(tensor(a))
    for name, a in arrays:
        setattr(m, name, tie(a, getattr(m, name)))

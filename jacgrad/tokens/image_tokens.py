"""``ImageToTokens``: an image's positions as tokens, ``(B, C, H, W) -> (B, H·W, C)`` — torch's
``x.flatten(2).transpose(1, 2)``. After a patch convolution (``Conv2d`` with stride = kernel =
patch) it makes a ViT's patch embedding: ``Conv2d -> ImageToTokens``. Any number of spatial axes:
``(B, C, L) -> (B, L, C)`` too. Its factor (``ImageTokensFactor``) is a permutation per sample.

    >>> import numpy as np
    >>> L = ImageToTokens(in_shape=(2, 1, 3))
    >>> L.forward(np.arange(6.0).reshape(1, 2, 1, 3))[0][0], L.out_shape
    (array([[0., 3.],
           [1., 4.],
           [2., 5.]]), (3, 2))
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..core.validation import shape_str
from ..core.backend import get_xp
from ..protocol.layer import buffers, register_layer
from .token_axis_factor import ImageTokensFactor

__all__ = ["ImageToTokens"]


class ImageToTokens:
    """``(B, C, *spatial) -> (B, T, C)``, ``T = prod(spatial)``; ``in_shape = (C, *spatial)`` given, or
    bound by the ``Sequential`` from the layer before it (as an image layer's)."""

    kind = "image_to_tokens"
    names: tuple = ()
    params: list = []
    spec_fields = {"in_shape": (list, type(None))}

    def __init__(self, in_shape=None):
        self.in_shape = self.out_shape = None
        if in_shape is not None:
            self.bind_in_shape(in_shape)

    def bind_in_shape(self, in_shape) -> tuple:
        """Fix the per-sample input shape ``(C, *spatial)``; returns ``out_shape = (T, C)``. A layer
        built for another shape is a ``ValueError``."""
        in_shape = tuple(int(s) for s in in_shape)
        if len(in_shape) < 2 or min(in_shape) < 1:
            raise ValueError(f"{self!r}: in_shape must be (C, *spatial) with at least one spatial axis, got {in_shape}")
        if self.in_shape is not None and self.in_shape != in_shape:
            raise ValueError(f"{self!r} was built for inputs {self.in_shape} but is given {in_shape}")
        self.in_shape, self.out_shape = in_shape, (math.prod(in_shape[1:]), in_shape[0])
        return self.out_shape

    n_in = property(lambda self: None if self.in_shape is None else math.prod(self.in_shape),
                    doc="C·prod(spatial): the flat width of the image (what a convolution before it outputs)")
    n_out = property(lambda self: None if self.in_shape is None else self.in_shape[0], doc="C, per token")
    tokens = property(lambda self: None if self.in_shape is None else self.out_shape[0], doc="T = prod(spatial)")

    def __repr__(self) -> str:
        return f"ImageToTokens({'' if self.in_shape is None else f'in_shape={self.in_shape}'})"

    def spec(self) -> dict:
        return {"kind": self.kind, "in_shape": None if self.in_shape is None else list(self.in_shape)}

    @classmethod
    def from_spec(cls, spec: dict, params: dict, inner=None) -> "ImageToTokens":
        return cls(spec["in_shape"])

    @staticmethod
    def file_widths(where: str, shapes: dict) -> tuple:
        """No arrays; ``(None, None)``: image widths do not chain."""
        return None, None

    def param_leaves(self) -> list:
        return []

    def _need_shape(self, what: str) -> None:
        if self.in_shape is None:
            raise ValueError(f"{self!r}: {what} needs in_shape; build it with in_shape=(C, H, W) or put it after "
                             f"an image layer in a Sequential")

    def output_lead(self, B) -> tuple:
        """``B -> (B, T)``: the batch becomes a token batch."""
        self._need_shape("output_lead")
        if not isinstance(B, int):
            raise ValueError(f"{self!r} takes image batches (B, {', '.join(map(str, self.in_shape))}), not a token "
                             f"batch {B!r}")
        return B, self.tokens

    def forward_shapes(self, B) -> list:
        return [self.output_lead(B) + (self.n_out,)]

    def backward_shapes(self, B, input_grad: bool = True) -> list:
        self._need_shape("backward_shapes")
        return [(int(B),) + self.in_shape] if input_grad else []

    def _where(self, where) -> str:
        return f"{where if isinstance(where, str) else f'layer {where}'} ({self!r})"

    def forward(self, z, check=None, where: Any = 0, out=None):
        """``z: (B, C, *spatial) -> (B, T, C)``; the state is ``(B, anchor)`` (an empty array of z's
        dtype and device)."""
        shape = tuple(getattr(z, "shape", ()))
        if len(shape) < 3 or (self.in_shape is not None and shape[1:] != self.in_shape):
            want = "(B, C, *spatial)" if self.in_shape is None else f"(B, {', '.join(map(str, self.in_shape))})"
            raise ValueError(f"{self._where(where)}: the input has shape {shape_str(shape)}; needs images {want}")
        if self.in_shape is None:
            self.bind_in_shape(shape[1:])
        B = shape[0]
        (y,) = buffers(out, self.forward_shapes(B), z)
        anchor = get_xp(z).empty(0, dtype=z.dtype)
        y[...] = self.factor((B, anchor)).jvp(z.reshape(B, -1))
        return y, (B, anchor)

    def factor(self, state) -> ImageTokensFactor:
        return ImageTokensFactor(state[0], self.n_out, self.tokens, state[1])

    def backward(self, state, g, grads: Sequence[Any] = (), input_grad: bool = True, check=None, where: Any = 0,
                 sq=None, out=None):
        """``g: (B, T, C)`` (only read) -> ``(∂L/∂z: (B, C, *spatial), δ = g)``."""
        B = state[0]
        if tuple(g.shape) != (B, self.tokens, self.n_out):
            raise ValueError(f"{self._where(where)}: grad_y has shape {shape_str(g.shape)}; needs "
                             f"{shape_str((B, self.tokens, self.n_out))}")
        if not input_grad:
            return None, g
        (gin,) = buffers(out, self.backward_shapes(B, True), g)
        gin[...] = self.factor(state).vjp(g).reshape((B,) + self.in_shape)
        return gin, g


register_layer("image_to_tokens", ImageToTokens)

"""The one gradient type, one buffer carver, and a dense layer's two steps written into buffers the
caller gives: ``jacgrad.nn.layers.Dense`` runs them for every network (``Sequential``, ``MLP``) and
every compiled step (``_block_passes`` walks the layers). Per Dense layer:

    forward    h = z_prev @ W + b ;  z = φ(h)
    backward   δ = J.scale(g)          (the fused g ⊙ φ'(h) pass of the factor J = diag(φ'(h))·Wᵀ)
               ∂L/∂W = z_prevᵀ δ ;  ∂L/∂b = Σ_batch δ ;  ∂L/∂z_prev = δ Wᵀ

Buffers come from ``carve``: ONE allocation split into views. A training step makes a few
large arrays (the saved activations, the deltas, the gradients), one block each; on NumPy the
plain passes take their blocks from ``jacgrad.cuda.hostpool``, so a training loop reuses the blocks
of the steps it has finished with instead of page-faulting fresh memory in every step (measured
with ``benchmarks/page_faults.py``). On CuPy a block is one pool allocation instead of many.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np

from ..cuda import hostpool
from ..cuda.gemm import matmul_into
from ..core.backend import get_xp
from ..cuda.kernels import activation_forward, bias_activation_forward, forward_with_derivative

__all__ = ["Gradients", "block", "carve", "column_sums", "dense_backward", "dense_forward"]

Check = Callable[[Any, str], None]


class Gradients:
    """The one gradient type: what ``MLP.backward``, ``Sequential.backward``, their compiled steps
    and the parameter-space products return.

    ``flat``: every parameter gradient in ONE 1-D array, in layer order (Dense: ``∂W`` row-major,
    then ``∂b``: the order of ``save``); every other array here is a view into it, so a global
    norm or clipping is one operation (``xp.linalg.norm(g.flat)``, ``g.flat *= c``). A view keeps
    its whole block alive. ``layers[j]``: layer j's gradients by name (``"W"``, ``"b"``,
    ``"gamma"``, ``"beta"``) — for a Residual, a list of its inner layers' entries.
    ``weights[j]: (H_{j-1}, H_j)`` and ``biases[j]: (H_j,)``: for a net of Dense layers only.
    ``input: (B, n_in)`` or None. ``deltas[j]``: ∂L/∂h_j (pre-activation) for a Dense layer,
    ∂L/∂(output of layer j) for the others; None where not computed. Per-sample results carry a
    leading ``B`` axis on every array.

    Built with ``weights``/``biases`` (a dense net) or ``layers``; the other view is derived.
    ``BlockGradients`` is another name for this type.
    """

    __slots__ = ("_weights", "_biases", "_layers", "input", "deltas", "flat")

    def __init__(self, weights: list | None = None, biases: list | None = None, input: Any = None,
                 deltas: list | None = None, flat: Any = None, *, layers: list | None = None):
        if (weights is None) != (biases is None) or (weights is None) == (layers is None):
            raise TypeError("Gradients takes weights and biases (a dense net) or layers, not both")
        self._weights, self._biases, self._layers = weights, biases, layers
        self.input, self.deltas, self.flat = input, deltas, flat

    @property
    def weights(self) -> list:
        """``∂L/∂W_j: (H_{j-1}, H_j)`` per layer: a net of Dense layers only."""
        if self._weights is None:
            self._weights = [self._dense(j, e)["W"] for j, e in enumerate(self._layers)]
        return self._weights

    @property
    def biases(self) -> list:
        """``∂L/∂b_j: (H_j,)`` per layer: a net of Dense layers only."""
        if self._biases is None:
            self._biases = [self._dense(j, e)["b"] for j, e in enumerate(self._layers)]
        return self._biases

    @property
    def layers(self) -> list:
        """Per layer, its gradients by name."""
        if self._layers is None:
            return [{"W": W, "b": b} for W, b in zip(self._weights, self._biases)]
        return self._layers

    @staticmethod
    def _dense(j: int, entry) -> dict:
        if not (isinstance(entry, dict) and set(entry) == {"W", "b"}):
            names = sorted(entry) if isinstance(entry, dict) else "a block of inner layers"
            raise AttributeError(f"Gradients.weights and .biases are for nets of Dense layers; layer {j} has {names}: "
                                 f"read Gradients.layers[{j}] by name")
        return entry

    def __repr__(self) -> str:
        n = None if self.flat is None else self.flat.shape
        return f"Gradients(layers={len(self.layers)}, flat={n}, input={self.input is not None}, deltas={self.deltas is not None})"


def carve(xp, shapes: Sequence[tuple], dtype, zero: bool = False, pooled: bool = False) -> tuple[Any, list]:
    """``(flat, views)``: one 1-D array of ``Σ prod(shape)`` elements and a C-contiguous view of
    it per shape, in order. ``zero`` fills the block with zeros (else its contents are undefined).
    ``pooled``: on NumPy, take the block from ``jacgrad.cuda.hostpool`` (a block of a finished call
    that nothing refers to any more) — for per-call results; long-lived buffers are not pooled."""
    flat = block(xp, sum(math.prod(s) for s in shapes), dtype, zero, pooled)
    return flat, _views(flat, shapes)


def block(xp, n: int, dtype, zero: bool = False, pooled: bool = False):
    """``carve``'s one 1-D array of ``n`` elements, without the views."""
    if pooled and not zero and xp is np:
        return hostpool.take(n, dtype)
    return (xp.zeros if zero else xp.empty)(n, dtype=dtype)


def _views(flat, shapes: Sequence[tuple]) -> list:
    """C-contiguous views of consecutive pieces of the 1-D ``flat``, one per shape."""
    views, at = [], 0
    for shape in shapes:
        n = math.prod(shape)
        views.append(flat[at : at + n].reshape(shape))
        at += n
    return views


def dense_forward(z, W, b, act, h_out, z_out=None, d_out=None, check: Check | None = None, where: Any = 0):
    """The forward step of ``jacgrad.nn.layers.Dense``: ``h = z @ W + b``
    written into ``h_out: (B, H_out)``, then ``φ(h)`` — into ``h_out`` itself where ``φ'`` is a
    function of the output, else into ``z_out`` (fresh when None), with ``φ'(h)`` into ``d_out``
    in the same pass when it is given. ``where``: the layer's name in ``check``'s messages
    (an int ``j`` reads "layer j")."""
    h = matmul_into(z, W, h_out)
    if check is None and d_out is None and type(h) is not np.ndarray and _fusable(h, b):  # the GPU: one kernel
        return bias_activation_forward(h, b, act, out=h if act.df_from_output is not None else z_out)
    if b is not None:  # None: a bias-free layer (Dense(W, bias=False))
        h += b
    if check is not None:
        check(h, f"{_where(where)}: pre-activation h")
    if act.df_from_output is not None:
        z = activation_forward(h, act, out=h)
    elif d_out is not None:
        z = forward_with_derivative(h, act, out=(z_out, d_out))[0]
    else:
        z = activation_forward(h, act, out=z_out)
    if check is not None:
        check(z, f"{_where(where)}: output z")
    return z


def _fusable(h, b) -> bool:
    """True on the GPU for a C-contiguous ``h (…, H)`` and bias ``(H,)`` of its dtype, non-empty."""
    return (get_xp(h) is not np and b is not None and h.size > 0 and b.shape == h.shape[-1:]
            and b.dtype == h.dtype and h.flags.c_contiguous and b.flags.c_contiguous)


def column_sums(delta, out):
    """``Σ_batch δ``: ``delta (B, H) -> out (H,)`` (``∂L/∂b``). On NumPy it is the GEMV
    ``1ᵀ δ`` through the BLAS: a third faster than ``delta.sum(axis=0)`` at (256, 1024) float32
    on 2 AVX-512 cores (``benchmarks/train_step_parts.py``) and at least as accurate (the BLAS
    accumulates in blocks; NumPy's axis-0 sum row after row). CuPy keeps its reduction kernel."""
    if get_xp(delta) is np and delta.ndim == 2:
        return np.matmul(_ones(delta.shape[0], delta.dtype), delta, out=out)
    return delta.sum(axis=0, out=out)


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype) -> np.ndarray:
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def _where(where) -> str:
    return f"layer {where}" if isinstance(where, int) else str(where)


def dense_backward(J, g, z_prev, dW, db, delta_out, gin=None, check: Check | None = None, where: Any = 0):
    """The backward step of ``jacgrad.nn.layers.Dense``, its factor ``J``
    given: ``δ = J.scale(g)`` into ``delta_out``, ``∂L/∂W = z_prevᵀ δ`` into ``dW``, ``∂L/∂b =
    Σ_batch δ`` into ``db`` (None: no bias) and, when ``gin`` is given, ``δ Wᵀ`` into it. Returns ``δ``."""
    delta = J.scale(g, out=delta_out)
    if check is not None:
        check(delta, f"{_where(where)}: gradient ∂L/∂h")
    matmul_into(z_prev.T, delta, dW)
    if db is not None:  # None: a bias-free layer
        column_sums(delta, db)
    if gin is not None:
        J.through_weights_t(delta, out=gin)
    return delta

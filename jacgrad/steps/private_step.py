"""The private part of a compiled training step: ``net.compile(B, loss, clip=C, noise_multiplier=σ)``.

With ``clip=C`` the compiled step (``compiled.TrainingStep``, for an ``MLP`` or a ``Sequential``)
returns ``(loss,
ClippedGradients)``: DP-SGD's ``(Σ_i clip_C(g_i) + N(0, σ²C² I)) / B`` instead of the mean
gradient, the numbers of ``net.clipped_grad`` (bitwise on NumPy, the noise too when both start
from the same ``seed``). It runs in two parts:

- the recorded part (one CUDA graph on CuPy, replayed each call like today's step): the step's
  own forward into its buffers, the loss gradient, then ONE reverse sweep over the chain's factors
  to every leaf's per-sample deltas (``per_sample.output_partials``), the norms and the clipped
  sums ``Aᵀ diag(c) Δ`` into a buffer (``private.sweep_and_clip``; the dense leaves' GEMMs go
  through ``_gemm``, direct cuBLAS while recording). The ordinary mean gradient is not computed.
  Not yet run on a GPU; on the fake CuPy of the tests every layer kind records (no CuPy matmul,
  no host read: ``tests/test_compiled_capture_layers.py``). The sweep's
  temporaries (``O(B · Σ H)``) come from the graph's private pool on CuPy and are allocated per
  call on NumPy.
- the noise, drawn eagerly after every call (or replay): ``out = sum/B + (σC/B)·n`` with ``n`` drawn
  by the step's generator into a preallocated buffer in the network's dtype (NumPy:
  ``Generator(SFC64(seed))``; CuPy: ``cupy.random.default_rng(seed)``). A generator's draw inside a
  CUDA graph would replay the SAME numbers every step (the host advances its offset only at
  capture), so the draw is deliberately left out of the graph: one generator kernel and two
  element-wise kernels per call. One generator per step, made at compile time: fresh noise every
  call, the same sequence for the same seed; not cryptographically secure (see ``jacgrad.params.private``).

Batch size: a compiled step has a fixed B (its buffers are B rows). Poisson sampling draws a
different B every step: call ``net.clipped_grad`` (any B, nothing to compile, NumPy or CuPy), or
compile one step per batch size you meet; in either case pass ``expected_batch_size`` to divide by
the expected size as the accountant assumes.
"""

from __future__ import annotations

from typing import Any

from ..params import private

__all__ = ["PrivatePart", "check_clip_args"]


def check_clip_args(clip: Any, noise_multiplier: Any, expected_batch_size: Any):
    """``(C or None, σ)``: ``clip=None`` is the ordinary step (then σ must be 0)."""
    if clip is None:
        if noise_multiplier not in (0, 0.0) or expected_batch_size is not None:
            raise ValueError(f"noise_multiplier={noise_multiplier!r} / expected_batch_size={expected_batch_size!r} "
                             f"need clip=C (the per-sample clipping norm): DP-SGD's noise is scaled by C")
        return None, 0.0
    return private.check_private_args(clip, noise_multiplier, expected_batch_size)


class PrivatePart:
    """Buffers and generator of a private step: ``sum (P,)`` (the recorded clipped sum, divided by B; P
    counts a shared parameter once), ``norms (B,)``, the noise scratch ``(P,)`` when σ > 0."""

    def __init__(self, xp, n_params: int, batch: int, dtype, max_norm: float, noise_multiplier: float, seed: Any,
                 expected_batch_size: Any):
        self.C, self.sigma, self.denom = max_norm, noise_multiplier, private.denominator(batch, expected_batch_size)
        self.sum = xp.zeros(n_params, dtype=dtype)
        self.norms = xp.zeros(batch, dtype=dtype)
        self.noise = xp.empty(n_params, dtype=dtype) if noise_multiplier else None
        self.gen = private.noise_generator(seed, xp) if noise_multiplier else None

    def run(self, factors, inputs, grad_y, views, shared=None) -> None:
        """The recorded part: the clipped sums into ``views`` (of ``self.sum``), the norms into ``self.norms``.
        ``shared``: ``(SharedGroup, param_views of self.sum)`` where a parameter is shared: its uses'
        gradients summed per sample before the norms (the cross terms), as ``net.clipped_grad`` does."""
        if shared is not None:
            self.sum[...] = 0  # the group adds its parameters' clipped sums into their views
            shared = shared + (None,)  # every parameter counted (a step has no trainable flags)
        norms, _ = private.sweep_and_clip(factors, inputs, grad_y, views, self.C, scale=1.0 / self.denom,
                                          shared=shared)
        self.norms[...] = norms

    def finish(self, out):
        """The eager part: ``out = sum/B + (σC/B)·n``; returns ``(clipped_fraction, noise_std)``."""
        return private.private_finish(self.sum, self.norms, self.C, self.sigma, self.denom, self.gen, buf=self.noise,
                                      out=out)

    def results(self, grads, frac, std, copy: bool):
        norms = self.norms.copy() if copy else self.norms
        return private.ClippedGradients(grads, norms, frac, std)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.sum, self.norms, self.noise) if a is not None))

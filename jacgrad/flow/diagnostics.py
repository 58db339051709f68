"""Gradient-flow report: why a deep network's gradients vanish or explode, layer by layer.

``gradient_flow(net, x)`` runs the network on ``x``, back-propagates (a loss gradient, or a
random unit cotangent that describes the network itself), and reads every number off the
layer factors ``J_j = diag(φ'_j(h_j)) · W_jᵀ`` of ``net.jacobian_chain(cache)``:

- per layer: the gradient and delta norms, the exact spectral norm of each sample's ``J_j``
  against its bound ``max|d|·‖W‖₂``, the activation's derivative (mean, active, dead and
  saturated units) and ``‖W_j‖₂``;
- ``chi``: per layer, ``χ_j = ‖J_j‖_F² / H_j`` averaged over the batch — the factor by which the
  layer scales the squared norm of an isotropic cotangent on its way back (the χ of mean-field
  theory); ``chi_bar`` is their geometric mean and ``backward_gain`` their product (the one
  definition is in docs/gradient-flow.md);
- the input-output Jacobian's singular values, a verdict and concrete hints.

``‖J_j‖_F² = Σ_i d_i² ‖W[:, i]‖²`` costs one ``(B, H) @ (H,)`` product; the ``‖J_j‖₂`` of all
samples (to 1e-6) comes from batched Lanczos through the factor (``jacgrad.algebra.lanczos``), from
the bounds ``max d_i²‖W[:, i]‖² ≤ ‖J_j‖₂² ≤ max d_i² ‖W‖₂²`` where they meet (orthogonal
layers), or from one batched Gram eigensolve for small or near-isometric layers. Work stays on
the network's device (NumPy or CuPy); only the report's numbers come to the host, one transfer
per layer plus Lanczos's checks.

    >>> import numpy as np, jacgrad as jg
    >>> net = jg.MLP.init([32] * 9, activation="sigmoid", init="xavier_normal", seed=0)
    >>> rep = gradient_flow(net, np.random.default_rng(0).standard_normal((16, 32)))
    >>> rep.verdict
    'vanishing'
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import above as _above
from ..nn import losses as _losses
from .statistics import SATURATION, LayerFlow
from ..core.validation import check_input_dtype, float_array, require_network, shape_str
from ..distributed import compute, reduce_samples
from ..distributed.mapping import is_dask
from .report_blocks import BlockFlowReport, GradientFlowReport
from .block_flow import ReportChunk, block_report, merge, report_bytes, report_from_partial
from .verdict import GAIN_BAND, VERDICTS, decide
from .report import hints, usual_init

# The per-layer ‖J_j‖₂ of a Dask batch (every chunk's ~50 GEMMs per layer per sample) are
# measured on a seeded subsample of this many samples unless norm_samples says otherwise.
DATASET_NORM_SAMPLES = 2048

__all__ = [
    "DATASET_NORM_SAMPLES",
    "GAIN_BAND",
    "BlockFlowReport",
    "GradientFlowReport",
    "LayerFlow",
    "SATURATION",
    "VERDICTS",
    "decide",
    "gradient_flow",
    "report_from_partials",
    "usual_init",
]

# ---------------------------------------------------------------------------- the report
def gradient_flow(
    net,
    x: Any,
    target: Any = None,
    loss: str = "mse",
    *,
    seed: int = 0,
    spectrum_samples: int | None = None,
    label: str = "",
    max_memory: int | None = None,
    norm_samples: int | None = None,
) -> GradientFlowReport:
    """The gradient-flow report of ``net`` at inputs ``x: (B, n_in)`` (on the net's device).

    One sweep builds every report (``jacgrad.flow.block_flow``): an ``MLP``'s has ``.layers`` only;
    any other ``jacgrad.Sequential``'s (the same ``GradientFlowReport`` type) has ``.blocks`` too: one row per top-level block (dense,
    residual, layernorm, rmsnorm) with its χ, ‖J‖₂ and bound, the same verdict rule over the
    blocks' χ, hints that know the net's residual blocks and norm layers, and the input-output
    spectrum as below (``norm_samples`` applies to the ‖J‖₂ and bound columns). It takes Dask batches and large in-memory ones too, as below.

    With ``target`` (``(B, n_out)``, or labels for ``softmax_cross_entropy``) the gradients are
    those of ``loss``; without, each sample back-propagates a random unit cotangent
    (seeded by ``seed``), so the report describes the network itself.

    ``report.jacobian_singular_values`` is ``(S, k)``: the exact spectra of the first ``S``
    samples' input-output Jacobians, accumulated a few samples at a time. ``spectrum_samples``
    sets S; None means every sample, up to what 2³⁵ multiply-adds allow (all 64 samples of a
    20 x 256 net; fewer for much bigger nets). ``0`` skips the spectrum and its norm (NaN) and
    estimates the mean squared singular value from 16 random directions per sample. When one
    sample's accumulation would exceed 2²⁶ elements the spectrum is skipped whatever was asked:
    ``jacobian_spectral_norm`` then comes from batched Lanczos through the chain's JVP and VJP
    and the mean squared singular value from the random directions
    (``spectrum_method`` and ``mean_squared_singular_value_method`` say which was done).

    Cost: one forward and backward, then per layer ~50 ``(B, H) @ (H, H)`` products for the
    ‖J_j‖₂ of every sample (to 1e-6; none for orthogonal layers, a batched eigensolve of the
    Gram matrices for small or near-isometric ones); memory: a few ``(B, H)`` blocks per layer.
    ``x`` must be float32 or float64 (int, bool, float16 and complex are a ``TypeError``, as in
    ``net.forward``); ``spectrum_samples`` None or an int ≥ 0 (else ``ValueError``).

    ``norm_samples``: the per-layer ‖J_j‖₂ (and its bound), ~50 GEMMs per layer per sample and
    the report's cost, are averaged over a seeded random subsample of this many samples
    (reproducible: the same ``seed`` draws the same rows, however the batch is chunked);
    every other number (gradient and delta norms, χ, derivative statistics, dead units,
    ‖W_j‖₂, the loss) stays over all samples. None: every sample of an in-memory batch, and
    ``DATASET_NORM_SAMPLES`` (2048) of a Dask batch. ``report.norm_samples`` says how many.

    Non-finite gradients do not raise: ``report.nonfinite`` names the first layer (forward
    order, then backward order) whose values overflowed. Non-finite inputs or weights are a
    ``ValueError`` naming them.

    Over a dataset: a Dask ``x: (N, n_in)`` chunked along the batch (``target`` Dask or in
    memory) is never loaded whole: each chunk's mergeable partial (``jacgrad.flow.block_flow``) is computed
    where its rows are, the partials are merged up a tree (``jacgrad.distributed.reduce_samples``)
    and the report is of all N samples, equal to the one-batch report up to floating-point
    summation order; the spectrum is that of the first S rows. It runs on the active
    ``distributed.Client`` or Dask's local scheduler (``jacgrad.distributed.compute``: the
    progress bar of an enclosing ``session(progress=…)``). A NumPy batch whose intermediates
    would exceed ``max_memory`` bytes (default ``jacgrad.distributed.default_max_memory``) is
    reported the same way, a chunk at a time; a CuPy batch only when ``max_memory`` is given.
    """
    require_network(net, "gradient_flow")
    _check_count("spectrum_samples", spectrum_samples, 0, "as many samples as the cost allows; 0 skips the spectrum")
    _check_count("norm_samples", norm_samples, 1, f"every sample; {DATASET_NORM_SAMPLES} of a Dask batch")
    if is_dask(x) or is_dask(target):
        norm_samples = DATASET_NORM_SAMPLES if norm_samples is None else norm_samples
        report = _dataset_report(net, x, target, loss, seed, label, max_memory, norm_samples, spectrum_samples)
    else:
        report = block_report(net, x, target, loss, seed=seed, label=label, max_memory=max_memory,
                              norm_samples=norm_samples, spectrum_samples=spectrum_samples)
    return _in_words_of(net, report)


def _in_words_of(net, report: GradientFlowReport) -> GradientFlowReport:
    """``report`` with its hints in the words of the framework ``net`` was imported from
    (``nn.init.xavier_normal_`` for a torch model rather than ``init='xavier_normal'``); a block
    report's hints (``block_hints``) name no initialiser call."""
    framework = getattr(net, "imported_from", None)
    if framework is not None and not report.has_blocks:
        report.hints = hints(report, framework=framework)
    return report


def _check_count(name: str, value, minimum: int, none: str) -> None:
    """``value`` None or an int ≥ ``minimum`` (bools refused), else a ``ValueError`` naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum):
        raise ValueError(f"{name} must be None ({none}) or an int >= {minimum}; got {value!r}")


_report_bytes = report_bytes  # bytes per sample of one chunk's partial


def _identity(p):
    return p


def _dataset_report(net, X, target, loss, seed, label, max_memory, norm_samples, spectrum_samples):
    """The report over the Dask batch ``X``: a ``ReportChunk`` partial per chunk, merged up a tree,
    computed on the active client (or Dask's local scheduler) through ``jacgrad.distributed.compute``.
    Equal to the one-batch report up to summation order; a block's measuring method (exact or
    estimated) is chosen by the whole batch's size, so every chunk takes the same one."""
    X = _as_dask_batch(X, target)
    check_input_dtype("x", X.dtype, net.dtype)  # as forward: never rounded (the tasks cast float32 up, exactly)
    if target is not None:
        _losses.get(loss)  # an unknown name fails here, not in every task
    targets = () if target is None else (target,)
    chunk = ReportChunk(loss, seed, X.shape[0], norm_samples, spectrum_samples)
    lazy = reduce_samples(chunk, merge, _identity, net, X, *targets, bytes_per_sample=report_bytes,
                          max_memory=max_memory, with_start=True)
    (p,) = compute(lazy)
    return report_from_partial(p, label=label)


def _as_dask_batch(X, target):
    """``X`` as a Dask batch (in-memory samples with Dask targets: chunked as the targets), not empty."""
    if not is_dask(X):
        import dask.array as da

        X = float_array(X, "x", np)
        if X.ndim < 1 or X.shape[0] != target.shape[0]:
            raise ValueError(f"x has shape {shape_str(X.shape)} but the target has {target.shape[0]} samples: "
                             f"their first axes must both be the batch")
        X = da.from_array(X, chunks=(target.chunks[0], X.shape[1:]))
    if X.ndim == 2 and X.shape[0] == 0:
        raise ValueError("x has no samples (N = 0); the report needs at least one")
    return X


report_from_partials = report_from_partial  # the report of a (merged) block_flow.partials partial


_above.register("gradient_flow", gradient_flow)  # net.gradient_flow(x, ...): this function

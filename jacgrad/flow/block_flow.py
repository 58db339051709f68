"""Gradient flow per block of a ``jacgrad.Sequential``: one row per top-level layer (a dense
layer, a residual block, a normalisation), read off its structured factor.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers
    >>> net = jg.Sequential([L.Residual([L.Dense(np.eye(3) * 0.5, None, "tanh")], scale=0.1), L.LayerNorm(np.ones(3))])
    >>> rows = jg.block_flow.block_flow(net, np.arange(6.0).reshape(2, 3))
    >>> [(r.kind, round(r.jacobian_bound, 3)) for r in rows]
    [('residual', 1.03), ('layernorm', 1.2)]

``block_report`` turns the rows into a ``BlockFlowReport`` (the verdict of ``_verdict.decide``
over the blocks' χ, hints that know which cures the net already has); it is what
``diagnostics.gradient_flow`` returns for a ``Sequential``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..core import sample_rng as _sample_rng
from ..nn import losses
from .statistics import norm_subsample
from .layer_rows import finish_leaves, leaf_partials, merge_leaves
from .io_spectrum import finish_spectrum, merge_spectrum, spectrum_partial
from .verdict import decide
from ..core.validation import float_array, require_network
from ..core.backend import get_xp, to_numpy
from ..algebra.bracketing import stack_jvp
from ..algebra.chain import Chain
from ..distributed import reduce_in_memory
from .report_blocks import BlockFlowReport, block_hints
from .token_flow import is_token_batch, reduce_tokens, report_chains, token_rows
from ..nn.layers import NORMS, leaf_layers
from ..protocol.layer import anchor as _anchor
from ..network.sequential import Sequential

__all__ = ["BlockChunk", "BlockFlow", "BlockFlowReport", "block_flow", "block_report", "block_report_bytes",
           "merge_block_partials",
           "report_from_block_partial"]

# Below this many elements of B·n·n a block's Frobenius norm and ‖J‖₂ are exact (dense); above,
# ‖J‖_F² is a Hutchinson estimate (PROBES Rademacher probes) and ‖J‖₂ comes from Lanczos.
EXACT_ELEMENTS = 1 << 22
PROBES = 16


@dataclass
class BlockFlow:
    """Layer ``index`` of the network (``kind``: dense, residual, layernorm, rmsnorm), batch means:
    chi: ‖J‖_F²/h_out, the MLP report's χ_j = ‖J_j‖_F²/H_j (docs/gradient-flow.md) (exact, or a Hutchinson estimate for large blocks — ``chi_exact``);
    jacobian_norm: ‖J‖₂ per sample, averaged; jacobian_bound: the factor's ``norm_bound`` per
    sample, averaged (dense: max|d|·‖W‖₂; residual: 1 + |s|·Π of the inner bounds;
    normalisation: max|γ|/σ); grad_norm: ‖∂L/∂θ‖ of the block's parameters (Euclidean, all
    together; 0 for a layer without any); scale: the residual branch scale, else None; inner:
    a residual block's inner layers (``dense:tanh``, ``layernorm``), else []."""

    index: int
    kind: str
    h_in: int
    h_out: int
    chi: float
    chi_exact: bool
    jacobian_norm: float
    jacobian_bound: float
    grad_norm: float
    scale: float | None = None
    inner: list[str] = field(default_factory=list)


def _exact(total: int, h_in: int, h_out: int) -> bool:
    """Whether blocks of this shape are measured exactly (dense) for a batch of ``total`` samples:
    decided by the whole batch, so every chunk of a dataset takes the same method."""
    return total * h_in * h_out <= EXACT_ELEMENTS


def _measures(F, exact: bool, seed: int, sel=None) -> tuple[float, float]:
    """``(Σ_i ‖J_i‖_F²/h_out, Σ_i ‖J_i‖₂)`` over the chunk's samples (the second over the rows
    ``sel`` only, when given: ``norm_samples``). Exact: from the dense
    factor and its SVD; else the Hutchinson estimate with ``PROBES`` Rademacher probes drawn from
    ``seed`` alone (the same probes for every sample, however the batch is chunked) and Lanczos.
    A factor with non-finite entries (the forward overflowed before it) measures ``(inf, inf)``:
    an overflow, as in the MLP report, not an SVD that does not converge."""
    xp = F.xp
    if exact:
        D = F.dense()
        if not bool(to_numpy(xp.isfinite(D).all())):
            return math.inf, math.inf
        chi = float(to_numpy((D * D).sum())) / F.h_out
        return chi, _norm_sum(F, "exact", seed, sel)
    rng = np.random.default_rng(seed)
    u = xp.asarray(rng.choice([-1.0, 1.0], size=(PROBES, F.h_in)).astype(F.dtype))
    Ju = stack_jvp(F, u)  # (B, PROBES, h_out): E‖J u‖² = ‖J‖_F²
    chi = float(to_numpy((Ju * Ju).sum(axis=-1).mean(axis=-1).sum())) / F.h_out
    if not math.isfinite(chi):
        return math.inf, math.inf
    return chi, _norm_sum(F, "lanczos", seed, sel)


def _norm_sum(F, method: str, seed: int, sel) -> float:
    """Σ ‖J_i‖₂ of a factor (or a ``Chain``) over its samples, or over the rows ``sel``."""
    chain = F if isinstance(F, Chain) else Chain([F])
    if sel is not None:
        if not len(sel):
            return 0.0
        chain = chain.rows(sel)
    return float(to_numpy(chain.spectral_norm(method, seed=seed).sum()))


def block_flow(net: Sequential, x, target=None, loss: str = "mse", seed: int = 0, *,
               grad_y=None) -> list[BlockFlow]:
    """One ``BlockFlow`` per layer of ``net`` on the batch ``x: (B, n_in)``; gradients of
    ``loss`` against ``target`` (default: zeros of the output's shape), or, when ``grad_y:
    (B, n_out)`` is given, of that cotangent (``target`` and ``loss`` are then unused)."""
    require_network(net, "block_flow")
    if not isinstance(net, Sequential):
        raise TypeError(f"block_flow reads a jacgrad.Sequential, got {type(net).__name__}")
    return _finish_rows(_partial(net, x, target, loss, seed, grad_y, 0, None))


def _partial(net, x, target, loss, seed, grad_y, start: int, total, norm_rows=None, spectrum=False,
             spectrum_samples=None) -> dict:
    """The sums of one chunk ``x`` = samples ``start .. start+B-1`` of a batch of ``total``
    (None: this chunk is the batch); ``target`` None: zeros: per block Σχ, Σ‖J‖₂, Σbound and the parameter gradient
    summed over the samples; Σ‖J‖₂ of the whole chain; the loss sum (None for ``grad_y``); with
    ``spectrum``, the input-output spectrum's partial (``jacgrad.flow.io_spectrum``; None after an overflow)."""
    y, cache = net.forward(x)
    B = cache.batch
    total = B if total is None else int(total)
    loss_sum, factor = None, 1.0  # a cotangent's gradients are already sums over the samples
    xp = get_xp(y)
    if grad_y is None:
        value, grad_y = losses.get(loss)(y, xp.zeros_like(y) if target is None else target)
        loss_sum, factor = float(to_numpy(value)) * B, float(B)  # a mean loss: its gradients times B are sums
    g = net.backward(cache, grad_y, input_grad=False)
    chain = net.jacobian_chain(cache)
    flat, io = report_chains(chain)  # on a token batch: each sample's flattened tokens (jacgrad.flow.token_flow)
    sel = None  # the chunk's rows among the norm subsample (norm_rows: indices into the whole batch)
    if norm_rows is not None:
        lo, hi = np.searchsorted(norm_rows, [start, start + B])
        sel = np.asarray(norm_rows[lo:hi], dtype=np.int64) - start
    blocks, at = [], 0
    ties = net._ties() if hasattr(net, "_ties") else None
    uses = None if ties is None or not ties.shared else ties.use_views(ties.param_views(g.flat))
    for j, (layer, F) in enumerate(zip(net.layers, flat.factors)):
        n_par = sum(int(p.size) for p in layer.params)
        exact = _exact(total, F.h_in, F.h_out)
        chi_sum, norm_sum = _measures(F, exact, seed + j, sel)
        bound = F.norm_bound()
        if not getattr(F, "per_sample", True):  # one Jacobian shared by the samples (a pool): each sample's row
            chi_sum, norm_sum = chi_sum * B, norm_sum * (B if sel is None else len(sel))
            bound = xp.full(B, float(to_numpy(bound)), dtype=net.dtype)
        blocks.append(dict(
            kind=layer.kind, h_in=F.h_in, h_out=F.h_out, chi_exact=exact, chi_sum=chi_sum,
            norm_sum=norm_sum, bound_sum=float(to_numpy((bound if sel is None else bound[xp.asarray(sel)]).sum())),
            grad=(g.flat[at:at + n_par] if uses is None else  # a shared parameter: its gradient in each use
                  xp.concatenate([u.ravel() for u in uses[at:at + len(layer.params)]])) * factor,  # fresh: the block is pooled
            scale=getattr(layer, "scale", None) if layer.kind == "residual" else None, inner=_inner(layer)))
        at += n_par if uses is None else len(layer.params)
    measure = None if chain.tokens is None else (  # a norm's or attention's χ and ‖J‖₂ on tokens, per sample
        lambda F, k, T: tuple(v / T for v in _measures(F, _exact(total * T, F.h_in, F.h_out), seed + len(net.layers) + k,
                                                       token_rows(sel, T) if T > 1 else sel)))
    leaves = leaf_partials(xp, net.layers, chain, g, B, factor, seed, sel, measure)  # the report's .layers rows
    exact = _exact(total, io.n_in, io.n_out)
    if all(math.isfinite(b["chi_sum"]) for b in blocks):
        whole = _norm_sum(io, "exact" if exact else "lanczos", seed, sel)
    else:
        whole = math.inf  # a block overflowed: so does the whole Jacobian's norm
    sv = (spectrum_partial(xp, io, start, total, spectrum_samples, seed) if spectrum and math.isfinite(whole)
          else None)
    return dict(count=B, spectrum=sv, norm_count=B if sel is None else len(sel), loss=None if loss_sum is None else loss,
                loss_sum=loss_sum, norm_sum=whole, blocks=blocks, layers=leaves,
                sizes=net.sizes, activations=[L.activation for L in _dense_layers(net.layers)],
                io_widths=(io.n_in, io.n_out), has_residual=any(L.kind == "residual" for L in net.layers),
                norms=sorted(set(_norm_kinds(net.layers))),
                dtype=str(np.dtype(net.dtype)), device="cpu" if xp is np else "gpu")


def merge_block_partials(a: dict, b: dict) -> dict:
    """The partial of two disjoint chunks of one batch (sums and counts added)."""
    if a["sizes"] != b["sizes"] or [p["kind"] for p in a["blocks"]] != [p["kind"] for p in b["blocks"]]:
        raise ValueError("partials of different networks cannot be merged")
    for what, key in (("losses", lambda p: (p["loss"], p["loss_sum"] is None)), ("dtypes", lambda p: p["dtype"]),
                      ("methods (exact / estimated: the chunks of different batches)",
                       lambda p: [q["chi_exact"] for q in p["blocks"]])):
        if key(a) != key(b):
            raise ValueError(f"partials of different {what} cannot be merged: {key(a)} and {key(b)}")
    blocks = [dict(pa, chi_sum=pa["chi_sum"] + pb["chi_sum"], norm_sum=pa["norm_sum"] + pb["norm_sum"],
                   bound_sum=pa["bound_sum"] + pb["bound_sum"], grad=pa["grad"] + pb["grad"])
              for pa, pb in zip(a["blocks"], b["blocks"])]
    sv = None if a["spectrum"] is None or b["spectrum"] is None else merge_spectrum(a["spectrum"], b["spectrum"])
    layers = merge_leaves(a["layers"], b["layers"])
    return dict(a, spectrum=sv, count=a["count"] + b["count"], norm_count=a["norm_count"] + b["norm_count"],
                norm_sum=a["norm_sum"] + b["norm_sum"], blocks=blocks, layers=layers,
                loss_sum=None if a["loss_sum"] is None else a["loss_sum"] + b["loss_sum"])


def _finish_rows(p: dict) -> list[BlockFlow]:
    N, S = p["count"], p["norm_count"] or math.nan  # the norms' samples: all N, or the subsample
    per = N if p["loss_sum"] is not None else 1  # a mean loss's gradient: the per-sample sums over N
    rows = []
    for j, b in enumerate(p["blocks"]):
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowed gradient's norm is inf (or NaN), no warning
            grad_norm = float(to_numpy(get_xp(b["grad"]).linalg.norm(b["grad"]))) / per if b["grad"].size else 0.0
        rows.append(BlockFlow(j, b["kind"], b["h_in"], b["h_out"], b["chi_sum"] / N, b["chi_exact"], b["norm_sum"] / S,
                              b["bound_sum"] / S, grad_norm, b["scale"], b["inner"]))
    return rows


def _inner(layer) -> list[str]:
    """What a residual block holds: its inner layers' kinds (``dense:tanh``, ``layernorm``); a
    projection shortcut's layers after them, marked ``shortcut>conv2d``."""
    name = lambda L: f"{L.kind}:{L.activation}" if L.kind == "dense" else L.kind  # noqa: E731
    branch, short = getattr(layer, "branch", getattr(layer, "layers", ())), getattr(layer, "shortcut", None) or ()
    return [name(L) for L in branch] + [f"shortcut>{name(L)}" for L in short]


def _dense_layers(layers) -> list:
    return [L for _, L in leaf_layers(layers) if L.kind == "dense"]


def _norm_kinds(layers) -> list[str]:
    return [L.kind for _, L in leaf_layers(layers) if L.kind in NORMS]


class BlockChunk:
    """``f(net, x, [target], start=) -> partial`` of one chunk ``x: (B, n_in)`` (samples
    ``start .. start+B-1``) of a batch of ``total`` samples (a picklable per-chunk function for
    ``distributed.reduce_samples``): the gradients of ``loss`` against the chunk's targets
    (``(B, n_out)``, or labels ``(B,)``), or, without, each sample's random unit cotangent drawn
    by its row (the same however the batch is chunked). Non-finite ``x`` or parameters are a
    ``ValueError`` naming the rows or the layer.

        >>> import numpy as np, jacgrad as jg
        >>> net = jg.Sequential([jg.layers.Dense(np.eye(3), None, "tanh"), jg.layers.RMSNorm(np.ones(3))])
        >>> x = np.arange(12.0).reshape(4, 3) / 10
        >>> f = BlockChunk("mse", seed=0, total=4)
        >>> p = merge_block_partials(f(net, x[:1], start=0), f(net, x[1:], start=1))
        >>> bool(np.allclose(report_from_block_partial(p).chi, block_report(net, x).chi, rtol=1e-12))
        True
    """

    def __init__(self, loss: str, seed: int, total: int, norm_samples: int | None = None,
                 spectrum_samples: int | None = None):
        self.loss, self.seed, self.total, self.spectrum_samples = loss, int(seed), int(total), spectrum_samples
        self.norm_rows = norm_subsample(self.total, norm_samples, self.seed)  # ‖J‖₂ of these rows only

    def __call__(self, net, x, target=None, *, start: int = 0):
        xp = net.xp
        x = xp.asarray(x)
        tokens = is_token_batch(net, x)
        if tuple(x.shape[1 + tokens:]) != tuple(net.in_shape) or x.ndim < 2:
            raise ValueError(f"x has shape {tuple(x.shape)} but the network takes (B, {', '.join(map(str, net.in_shape))}) inputs")
        _check_finite(net, x, start)
        grad_y = None
        if target is None:  # a random unit cotangent per sample: of its flattened (T·n_out) output on tokens
            B, T = int(x.shape[0]), int(x.shape[1]) if tokens else 1
            v = _sample_rng.rows((self.seed,), start, start + B, T * net.n_out)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
            grad_y = xp.asarray(v.astype(net.dtype).reshape((B, T, net.n_out) if tokens else (B, net.n_out)))
        with np.errstate(all="ignore"):
            return _partial(net, x, target, self.loss, self.seed, grad_y, start, self.total, self.norm_rows,
                            spectrum=True, spectrum_samples=self.spectrum_samples)


def _check_finite(net, x, start: int) -> None:
    """A ``ValueError`` naming the layer (and the inner layer of a residual block) and the
    parameter with a NaN or inf, or the rows of ``x`` (samples ``start ..``) that have one."""
    xp = net.xp
    for path, L in leaf_layers(net.layers):
        where = "layer " + ", inner layer ".join(map(str, path))
        for name, p in zip(L.names, L.params):
            if not bool(to_numpy(xp.isfinite(p).all())):
                raise ValueError(f"{where}: {name} has non-finite values (inf or NaN); the report needs finite parameters")
    if x.dtype.kind in "fc" and not bool(to_numpy(xp.isfinite(x).all())):
        bad = np.flatnonzero(~to_numpy(xp.isfinite(x).reshape(x.shape[0], -1).all(axis=1))) + start
        raise ValueError(f"x has non-finite values (inf or NaN) in {len(bad)} rows (first: sample {int(bad[0])}); "
                         f"the report needs finite inputs")


def block_report_bytes(net: Sequential) -> int:
    """Bytes per sample of one chunk's partial: the forward states and backward cotangents of
    every layer (a few ``(B, H)`` blocks each) and the Hutchinson probes' ``(B, PROBES, H)``.
    The exact (dense) measures are bounded by ``EXACT_ELEMENTS`` for the whole batch."""
    widths = [L.n_out for L in _all_layers(net.layers)]
    return np.dtype(net.dtype).itemsize * (6 * sum(widths) + 2 * PROBES * max(widths + [net.n_in]))


def _all_layers(layers):
    for L in layers:
        yield L
        if L.kind == "residual":
            yield from _all_layers(L.layers)


def block_report(net: Sequential, x, target=None, loss: str = "mse", *, seed: int = 0,
                 label: str = "", max_memory: int | None = None, norm_samples: int | None = None,
                 spectrum_samples: int | None = None) -> BlockFlowReport:
    """The report of ``net`` at ``x: (B, n_in)``, one row per top-level layer. With ``target``
    the gradients are those of ``loss``; without, each sample back-propagates a random unit
    cotangent (seeded by ``seed``, as in ``gradient_flow`` of an MLP). Over chunks of a dataset:
    ``report_from_block_partial`` of the merged ``BlockChunk`` partials is the same report.

    A batch whose intermediates (``block_report_bytes`` per sample) exceed ``max_memory`` bytes
    (default for NumPy: ``jacgrad.distributed.default_max_memory``; a CuPy batch only when it is
    given) is measured a chunk at a time (``distributed.reduce_samples``), as for an MLP.
    ``norm_samples``: the ‖J‖₂ and bound columns (and the whole net's ‖J‖₂) over a seeded subsample
    of that many samples (``gradient_flow``'s ``norm_samples``; None: all); ``spectrum_samples``: the
    input-output singular values of the first S samples, as ``gradient_flow`` of an MLP."""
    require_network(net, "block_report")
    if not isinstance(net, Sequential):
        raise TypeError(f"block_report reads a jacgrad.Sequential, got {type(net).__name__}")
    try:
        xp = get_xp(x, _anchor(net.layers))
    except TypeError as exc:
        raise TypeError(f"x and the network live on different devices: {exc}") from None
    tokens = is_token_batch(net, x)
    if not (tokens and hasattr(net.layers[0], "check_tokens")):  # token ids are checked by the Embedding
        x = float_array(x, "x", xp)  # torch (requires_grad too), JAX, DLPack: as gradient_flow of an MLP takes them
    if x.ndim >= 2 and x.shape[0] == 0:
        raise ValueError("x has no samples (B = 0); the report needs at least one")
    chunk = BlockChunk(loss, seed, x.shape[0] if x.ndim >= 2 else 0, norm_samples, spectrum_samples)
    targets = () if target is None else (target,)
    if tokens:  # chunks of whole samples, T token rows each
        p = reduce_tokens(chunk, merge_block_partials, net, x, targets, x.shape[1] * block_report_bytes(net), max_memory)
    else:
        p = reduce_in_memory(chunk, merge_block_partials, net, x, *targets, bytes_per_sample=block_report_bytes,
                             max_memory=max_memory)
    return report_from_block_partial(p, label=label)


def report_from_block_partial(p: dict, label: str = "") -> BlockFlowReport:
    """The ``BlockFlowReport`` of a (merged) partial of ``BlockChunk``."""
    rows = _finish_rows(p)
    chi = [r.chi for r in rows]
    gains = [r.chi for r in rows if r.kind != "embedding"]  # ids in: an Embedding has no input Jacobian
    verdict, chi_bar, gamma, xi = decide(gains, not all(math.isfinite(c) for c in gains))
    N, (n_in, n_out) = p["count"], p.get("io_widths", (p["sizes"][0], p["sizes"][-1]))
    spectrum = finish_spectrum(p["spectrum"], n_in, min(n_in, n_out), p["spectrum"] is None)
    spectrum.pop("jacobian_spectral_norm")  # the blocks' own: over the norm_samples subsample
    first = next((r for r in rows if not math.isfinite(r.chi)), None)
    report = BlockFlowReport(
        block_rows=rows, layers=finish_leaves(p), chi=chi, chi_bar=chi_bar, backward_gain=gamma, depth_scale=xi, verdict=verdict,
        jacobian_spectral_norm=p["norm_sum"] / (p["norm_count"] or math.nan), sizes=p["sizes"], activations=p["activations"],
        has_residual=p["has_residual"], norms=p["norms"], batch=N, dtype=p["dtype"], device=p["device"],
        loss=p["loss"], loss_value=None if p["loss_sum"] is None else p["loss_sum"] / N,
        label=label, norm_samples=int(p["norm_count"]), **spectrum,
        nonfinite=None if first is None else {"layer": first.index, "stage": "blocks",
                                              "message": f"block {first.index} ({first.kind}) went non-finite"},
    )
    report.hints = block_hints(report)
    return report

"""The one sweep of the gradient-flow report, for every network (an MLP, a ``Sequential`` of
dense layers, residual blocks, norms, convolutions, attention, tokens): per chunk of samples one
forward and backward pass, the factors of ``net.jacobian_chain(cache)``, and a mergeable partial
(``partials``; ``merge`` of two disjoint chunks, ``report_from_partial`` of the merged one). One
batch is one chunk, so the same code serves a single call, a batch above the memory budget and a
map-reduce over a Dask dataset (``ReportChunk`` per chunk, ``merge`` as the combine step).

Its rows: ``.layers``, one per parameterised layer (``jacgrad.flow.layer_rows``, a Dense's from
``jacgrad.flow.statistics``), and ``.blocks``, one per top-level layer, read off its structured
factor. An ``MLP`` is reported in layers-only mode (``layers_only``): no block rows, the
input-output ``‖J‖₂`` from its spectrum and ``nonfinite``: where the values first went non-finite
(``statistics.first_nonfinite``), after which the numbers of the overflowed layers are NaN.

    >>> import numpy as np, jacgrad as jg
    >>> L = jg.layers
    >>> net = jg.Sequential([L.Residual([L.Dense(np.eye(3) * 0.5, None, "tanh")], scale=0.1), L.LayerNorm(np.ones(3))])
    >>> rows = jg.block_flow.block_flow(net, np.arange(6.0).reshape(2, 3))
    >>> [(r.kind, round(r.jacobian_bound, 3)) for r in rows]
    [('residual', 1.03), ('layernorm', 1.2)]

``block_report`` (what ``diagnostics.gradient_flow`` returns for an in-memory batch) validates the
batch and reduces its chunks; the verdict is ``_verdict.decide`` over the rows' χ (the blocks', or
an MLP's layers'), the hints know which cures the net already has.
"""

from __future__ import annotations

import math

import numpy as np

from ..core import sample_rng as _sample_rng
from ..nn import losses
from .statistics import all_finite, first_nonfinite, norm_subsample
from .layer_rows import is_token_batch, leaf_partials, merge_leaves, reduce_tokens, report_chains, token_rows
from .io_spectrum import merge_spectrum, spectrum_partial
from ..core.validation import float_array, network_input, require_network
from ..core.backend import get_xp, to_numpy
from ..algebra.bracketing import stack_jvp
from ..algebra.chain import Chain
from ..distributed import budget, reduce_in_memory
from .report_blocks import BlockFlow, BlockFlowReport, GradientFlowReport, finish_blocks, inner_kinds, report_from_partial
from ..nn.layers import NORMS, leaf_layers
from ..protocol.layer import anchor as _anchor
from ..network.sequential import Sequential

__all__ = ["BlockChunk", "BlockFlow", "BlockFlowReport", "ReportChunk", "block_flow", "block_report",
           "block_report_bytes", "layers_only", "merge", "merge_block_partials", "partials", "report_bytes",
           "report_from_partial"]

# Below this many elements of B·n·n a block's Frobenius norm and ‖J‖₂ are exact (dense); above,
# ‖J‖_F² is a Hutchinson estimate (PROBES Rademacher probes) and ‖J‖₂ comes from Lanczos.
EXACT_ELEMENTS = 1 << 22
PROBES = 16


def layers_only(net) -> bool:
    """Whether ``net``'s report has ``.layers`` rows only (an ``MLP``: a Sequential of Dense layers
    with ``weights``/``biases``/``activations`` lists), not ``.blocks``."""
    return hasattr(net, "weights")


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
    return finish_blocks(partials(net, x, target, loss, seed=seed, grad_y=grad_y, zero_target=True, blocks=True,
                                  spectrum=False))


@np.errstate(all="ignore")  # overflows are reported (nonfinite, inf rows), not warned about
def partials(net, x, target=None, loss: str = "mse", *, seed: int = 0, spectrum_samples: int | None = None,
             start: int = 0, total: int | None = None, norm_rows=None, grad_y=None, zero_target: bool = False,
             blocks: bool | None = None, spectrum: bool = True) -> dict:
    """The partial of the chunk ``x`` = samples ``start .. start+B-1`` of a batch of ``total``
    (None: this chunk is the batch): the gradients of ``loss`` against ``target`` (``(B, n_out)``,
    or labels), of the cotangent ``grad_y``, of zeros as the target (``zero_target``), or else of
    each sample's random unit cotangent drawn by its row (the same however the batch is chunked).
    ``norm_rows``: sorted host indices into the whole batch of the samples whose ‖J‖₂ and bound
    are measured (``statistics.norm_subsample``; None: all). ``blocks``: with the block rows
    (None: unless ``layers_only(net)``; False only for a net of Dense layers); ``spectrum``: with the input-output spectrum's partial
    (``jacgrad.flow.io_spectrum``; None after an overflow). Per block Σχ, Σ‖J‖₂, Σbound and the
    parameter gradient summed over the samples; per parameterised layer its row's partial; Σ‖J‖₂
    of the whole chain; the loss sum (None for a cotangent). ``x`` is checked by the caller."""
    dense = layers_only(net) if blocks is None else not blocks
    y, cache = net.forward(x)
    B = cache.batch
    total = B if total is None else int(total)
    loss_sum, factor = None, 1.0  # a cotangent's gradients are already sums over the samples
    xp = get_xp(y)
    if grad_y is None and target is None and not zero_target:  # of its flattened (T·n_out) output on tokens
        v = _sample_rng.rows((seed,), start, start + B, int(np.prod(y.shape[1:])))
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), np.finfo(float).tiny)
        grad_y = xp.asarray(v.astype(y.dtype).reshape(y.shape))
    if grad_y is None:
        value, grad_y = losses.get(loss)(y, xp.zeros_like(y) if target is None else target)
        loss_sum, factor = float(to_numpy(value)) * B, float(B)  # a mean loss: its gradients times B are sums
    g = net.backward(cache, grad_y, input_grad=dense)  # ∂L/∂x: the last place first_nonfinite looks
    chain = net.jacobian_chain(cache)
    flat, io = report_chains(chain)  # on a token batch: each sample's flattened tokens (layer_rows)
    sel = None  # the chunk's rows among the norm subsample (norm_rows: indices into the whole batch)
    if norm_rows is not None:
        lo, hi = np.searchsorted(norm_rows, [start, start + B])
        sel = np.asarray(norm_rows[lo:hi], dtype=np.int64) - start
    nonfinite = first_nonfinite(xp, cache, g, grad_y, len(net.layers)) if dense else None
    # After a forward overflow at layer k, layers k.. see inf/NaN inputs: their numbers are NaN.
    poisoned = nonfinite["layer"] if nonfinite and nonfinite["stage"] == "forward" else None
    rows = None if dense else _block_partials(net, flat, g, B, total, factor, seed, sel)
    measure = None if chain.tokens is None else (  # a norm's or attention's χ and ‖J‖₂ on tokens, per sample
        lambda F, k, T: tuple(v / T for v in _measures(F, _exact(total * T, F.h_in, F.h_out), seed + len(net.layers) + k,
                                                       token_rows(sel, T) if T > 1 else sel)))
    leaves = leaf_partials(xp, net.layers, chain, g, B, factor, seed, sel, measure, poisoned)  # the .layers rows
    if dense:  # the whole Jacobian's ‖J‖₂: the spectrum's
        whole, ok = math.nan, nonfinite is None
    elif all(math.isfinite(b["chi_sum"]) for b in rows):
        whole = _norm_sum(io, "exact" if _exact(total, io.n_in, io.n_out) else "lanczos", seed, sel)
        ok = math.isfinite(whole)
    else:
        whole, ok = math.inf, False  # a block overflowed: so does the whole Jacobian's norm
    sv = spectrum_partial(xp, io, start, total, spectrum_samples, seed) if spectrum and ok else None
    return dict(count=B, spectrum=sv, norm_count=B if sel is None else len(sel), loss=None if loss_sum is None else loss,
                loss_sum=loss_sum, norm_sum=whole, blocks=rows, layers=leaves, nonfinite=nonfinite,
                sizes=net.sizes, activations=[L.activation for L in _dense_layers(net.layers)],
                io_widths=(io.n_in, io.n_out), has_residual=any(L.kind == "residual" for L in net.layers),
                norms=sorted(set(_norm_kinds(net.layers))),
                dtype=str(np.dtype(net.dtype)), device="cpu" if xp is np else "gpu")


def _block_partials(net, flat: Chain, g, B: int, total: int, factor: float, seed: int, sel) -> list[dict]:
    """Per top-level layer (a factor of ``flat``) its Σχ, Σ‖J‖₂, Σbound and its parameters' gradient
    summed over the chunk's ``B`` samples (times ``factor``: B for a mean loss)."""
    xp, blocks, at = flat.xp, [], 0
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
            scale=getattr(layer, "scale", None) if layer.kind == "residual" else None, inner=inner_kinds(layer)))
        at += n_par if uses is None else len(layer.params)
    return blocks


def merge(a: dict, b: dict) -> dict:
    """The partial of two disjoint chunks of one batch (in any order): sums and counts added,
    maxima and flags combined, the first non-finite place of either."""
    kinds = lambda p: None if p["blocks"] is None else [q["kind"] for q in p["blocks"]]  # noqa: E731
    if a["sizes"] != b["sizes"] or kinds(a) != kinds(b) or len(a["layers"]) != len(b["layers"]):
        raise ValueError("partials of different networks cannot be merged")
    for what, key in (("losses", lambda p: (p["loss"], p["loss_sum"] is None)), ("dtypes", lambda p: p["dtype"]),
                      ("methods (exact / estimated: the chunks of different batches)",
                       lambda p: [q["chi_exact"] for q in p["blocks"] or ()])):
        if key(a) != key(b):
            raise ValueError(f"partials of different {what} cannot be merged: {key(a)} and {key(b)}")
    blocks = None if a["blocks"] is None else [
        dict(pa, chi_sum=pa["chi_sum"] + pb["chi_sum"], norm_sum=pa["norm_sum"] + pb["norm_sum"],
             bound_sum=pa["bound_sum"] + pb["bound_sum"], grad=pa["grad"] + pb["grad"])
        for pa, pb in zip(a["blocks"], b["blocks"])]
    sv = None if a["spectrum"] is None or b["spectrum"] is None else merge_spectrum(a["spectrum"], b["spectrum"])
    firsts = [p["nonfinite"] for p in (a, b) if p["nonfinite"] is not None]
    return dict(a, spectrum=sv, count=a["count"] + b["count"], norm_count=a["norm_count"] + b["norm_count"],
                norm_sum=a["norm_sum"] + b["norm_sum"], blocks=blocks, layers=merge_leaves(a["layers"], b["layers"]),
                loss_sum=None if a["loss_sum"] is None else a["loss_sum"] + b["loss_sum"],
                nonfinite=min(firsts, key=lambda n: n["key"]) if firsts else None)


def _dense_layers(layers) -> list:
    return [L for _, L in leaf_layers(layers) if L.kind == "dense"]


def _norm_kinds(layers) -> list[str]:
    return [L.kind for _, L in leaf_layers(layers) if L.kind in NORMS]


class ReportChunk:
    """``f(net, x, [target], start=) -> partial`` of one chunk ``x: (B, n_in)`` (samples
    ``start .. start+B-1``) of a batch of ``total`` samples (a picklable per-chunk function for
    ``distributed.reduce_samples``): the gradients of ``loss`` against the chunk's targets
    (``(B, n_out)``, or labels ``(B,)``), or, without, each sample's random unit cotangent drawn
    by its row (the same however the batch is chunked). Non-finite ``x`` or parameters are a
    ``ValueError`` naming the rows or the layer. ``BlockChunk`` is another name of this class.

        >>> import numpy as np, jacgrad as jg
        >>> net = jg.Sequential([jg.layers.Dense(np.eye(3), None, "tanh"), jg.layers.RMSNorm(np.ones(3))])
        >>> x = np.arange(12.0).reshape(4, 3) / 10
        >>> f = ReportChunk("mse", seed=0, total=4)
        >>> p = merge(f(net, x[:1], start=0), f(net, x[1:], start=1))
        >>> bool(np.allclose(report_from_partial(p).chi, block_report(net, x).chi, rtol=1e-12))
        True
    """

    def __init__(self, loss: str, seed: int, total: int, norm_samples: int | None = None,
                 spectrum_samples: int | None = None):
        self.loss, self.seed, self.total, self.spectrum_samples = loss, int(seed), int(total), spectrum_samples
        self.norm_rows = norm_subsample(self.total, norm_samples, self.seed)  # ‖J‖₂ of these rows only

    def __call__(self, net, x, target=None, *, start: int = 0):
        xp = net.xp
        x = xp.asarray(x)
        tokens = is_token_batch(net, x) and not layers_only(net)
        if tuple(x.shape[1 + tokens:]) != tuple(net.in_shape) or x.ndim < 2:
            raise ValueError(f"x has shape {tuple(x.shape)} but the network takes (B, {', '.join(map(str, net.in_shape))}) inputs")
        _check_finite(net, x, start)
        return partials(net, x, target, self.loss, seed=self.seed, start=start, total=self.total,
                        norm_rows=self.norm_rows, spectrum_samples=self.spectrum_samples)


def _check_finite(net, x, start: int) -> None:
    """A ``ValueError`` naming the layer (and the inner layer of a residual block) and the
    parameter with a NaN or inf, or the rows of ``x`` (samples ``start ..``) that have one; every
    flag comes to the host in one transfer."""
    xp = net.xp
    named = [("layer " + ", inner layer ".join(map(str, path)), name, p)
             for path, L in leaf_layers(net.layers) for name, p in zip(L.names, L.params)]
    floats = x.dtype.kind in "fc"  # token ids are checked by the Embedding
    ok = all_finite(xp, [p for *_, p in named] + ([x] if floats else []))
    for (where, name, _), good in zip(named, ok):
        if not good:
            raise ValueError(f"{where}: {name} has non-finite values (inf or NaN); the report needs finite parameters")
    if floats and not ok[-1]:
        bad = np.flatnonzero(~to_numpy(xp.isfinite(x).reshape(x.shape[0], -1).all(axis=1))) + start
        raise ValueError(f"x has non-finite values (inf or NaN) in {len(bad)} rows (first: sample {int(bad[0])}); "
                         f"the report needs finite inputs")


def report_bytes(net: Sequential) -> int:
    """Bytes per sample of one chunk's partial. Layers only: a loss's forward and backward pass and a
    few ``(B, H)`` blocks of the layer being measured (Lanczos and the spectrum bound their own);
    with blocks: the forward states and backward cotangents of every layer (a few ``(B, H)`` blocks
    each) and the Hutchinson probes' ``(B, PROBES, H)``. The exact (dense) measures are bounded by
    ``EXACT_ELEMENTS`` for the whole batch. ``block_report_bytes`` is another name of it."""
    item = np.dtype(net.dtype).itemsize
    if layers_only(net):
        return budget.backward_bytes(net) + 6 * item * max(int(s) for s in net.sizes[1:])
    widths = [L.n_out for L in _all_layers(net.layers)]
    return item * (6 * sum(widths) + 2 * PROBES * max(widths + [net.n_in]))


def _all_layers(layers):
    for L in layers:
        yield L
        if L.kind == "residual":
            yield from _all_layers(L.layers)


def block_report(net: Sequential, x, target=None, loss: str = "mse", *, seed: int = 0,
                 label: str = "", max_memory: int | None = None, norm_samples: int | None = None,
                 spectrum_samples: int | None = None) -> GradientFlowReport:
    """The report of ``net`` at ``x: (B, n_in)`` (``diagnostics.gradient_flow`` of an in-memory
    batch: its options). With ``target`` the gradients are those of ``loss``; without, each sample
    back-propagates a random unit cotangent (seeded by ``seed``). Over chunks of a dataset:
    ``report_from_partial`` of the merged ``ReportChunk`` partials is the same report.

    A batch whose intermediates (``report_bytes`` per sample) exceed ``max_memory`` bytes
    (default for NumPy: ``jacgrad.distributed.default_max_memory``; a CuPy batch only when it is
    given) is measured a chunk at a time (``distributed.reduce_samples``).
    ``norm_samples``: the ‖J‖₂ and bound columns (and a block report's whole-net ‖J‖₂) over a
    seeded subsample of that many samples (None: all); ``spectrum_samples``: the input-output
    singular values of the first S samples."""
    require_network(net, "block_report")
    if not isinstance(net, Sequential):
        raise TypeError(f"block_report reads a jacgrad.Sequential, got {type(net).__name__}")
    try:
        xp = get_xp(x, _anchor(net.layers))
    except TypeError as exc:
        raise TypeError(f"x and the network live on different devices: {exc}") from None
    tokens = is_token_batch(net, x) and not layers_only(net)
    if not tokens:  # torch (requires_grad too), JAX, DLPack; lists made in the net's dtype; never rounded
        x = network_input(x, "x", xp, net.dtype)
    elif not hasattr(net.layers[0], "check_tokens"):  # token ids are checked by the Embedding
        x = float_array(x, "x", xp)
    if x.ndim >= 2 and x.shape[0] == 0:
        raise ValueError("x has no samples (B = 0); the report needs at least one")
    chunk = ReportChunk(loss, seed, x.shape[0] if x.ndim >= 2 else 0, norm_samples, spectrum_samples)
    targets = () if target is None else (target,)
    if tokens:  # chunks of whole samples, T token rows each
        p = reduce_tokens(chunk, merge, net, x, targets, x.shape[1] * report_bytes(net), max_memory)
    else:
        p = reduce_in_memory(chunk, merge, net, x, *targets, bytes_per_sample=report_bytes, max_memory=max_memory)
    return report_from_partial(p, label=label)


BlockChunk, merge_block_partials = ReportChunk, merge  # older names
block_report_bytes = report_bytes

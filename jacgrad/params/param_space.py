"""The parameter-space products of every network (``Sequential``, and ``MLP``, a stack of Dense
layers): per-sample gradients and their norms, Gauss–Newton products and diagonal, the private
(clipped) gradient, and what ``jacgrad.params.ntk`` reads. The networks inherit these methods; the
algebra on the leaves' ``(a, δ)`` pairs lives in ``jacgrad.algebra.per_sample``, ``jacgrad.params.curvature``,
``jacgrad.nn.loss_hessians`` and ``jacgrad.params.private``, which know no network.

A "leaf" is a layer with parameters (``Dense``, ``LayerNorm``, ``RMSNorm``); a residual block's
inner layers are leaves in their order, so the leaves' parameters, in order, are exactly
``Gradients.flat``. The batch loss is the mean of per-sample losses ℓ_i, so sample i's
cotangent is B times the batch one: ONE forward and one stacked reverse sweep serve every
per-sample quantity. Convention: the gradient of ℓ_i itself, as
``torch.func.vmap(torch.func.grad(ℓ))`` gives it.
"""

from __future__ import annotations

from typing import Any

from ..core import lazy as _lazy
from ..algebra import per_sample
from . import curvature
from ..algebra.token_factor import DEFAULT_MAX_MEMORY as DEFAULT_TOKEN_MEMORY
from ..nn import loss_hessians, losses
from . import ntk as _ntk, private
from ..core.backend import get_xp
from ..protocol.passes import Gradients
from ..protocol.passes import carve
from ..protocol.layer import anchor
from ..protocol.leaves import check_method
from .leaf_views import by_name, leaves_of, leaf_inputs, leaf_views, shared_group
from ..core.renamed import renamed
from ..core.validation import check_out

__all__ = ["SequentialParameterSpace"]


__getattr__ = renamed(__name__, {"ParamArrays": ("jacgrad.Gradients", Gradients)})


class SequentialParameterSpace:
    """Per-sample gradients and norms, ``clipped_grad``, ``ggn_vp`` and ``ggn_diagonal`` for a
    network (``Sequential``, ``MLP``) that supplies ``forward`` (whose cache has ``x``, ``batch``
    and ``states``, one Dense-style state per layer), ``backward``, ``jacobian_chain``,
    ``layers``, ``n_params``, ``n_in``, ``n_out``, ``dtype``."""

    # ------------------------------------------------------------------ the leaves
    def _param_leaf_inputs(self, cache) -> list:
        """``[(leaf_k, a_k)]``: each leaf (``jacgrad.protocol.leaves``) and its input to its parameter
        gradients (``z_prev`` of a Dense, ``x̂`` of a norm layer: ``(B, [T,] p)``)."""
        return leaf_inputs(self.layers, cache.states)

    def _param_widths(self) -> list[int]:
        """The input width and every leaf's output width (for memory estimates)."""
        return [self.n_in] + [L.n_out for _, L, _ in leaves_of(self.layers)]

    def _leaf_views(self, flat) -> list:
        """Per leaf, the list of views of ``flat: (…, P)`` in its parameters' shapes (a shared
        parameter's view in every leaf that uses it, transposed where the use is)."""
        return leaf_views(self.layers, flat, self._ties())

    def _shared_group(self):
        """The leaves holding a shared parameter (``jacgrad.params.shared.SharedGroup``), or None
        where no parameter is shared: every product then runs its leaves' own rules."""
        return shared_group(self.layers, self._ties())

    def _sample_partials(self, x: Any, target: Any, loss: str):
        """``(cache, [(leaf, a)], partials)``: ``partials`` yields ``(k, G_k: (B, 1, [T,] H_k))``, the
        batch loss's cotangent ``∂L/∂h_k`` at leaf k (``per_sample.output_partials``); sample i's
        own is B times its row i (scaled by the callers after their sums, as a backward's deltas)."""
        loss_fn = losses.get(loss)
        y, cache = self.forward(x)
        _, grad_y = loss_fn(y, target)
        V = grad_y.copy()[:, None]
        factors = self.jacobian_chain(cache).factors
        return cache, self._param_leaf_inputs(cache), per_sample.output_partials(factors, V)

    # ------------------------------------------------------------------ per sample
    def per_sample_grad_norms(self, x: Any, target: Any, loss: str = "mse", per_layer: bool = False,
                              method: str = "auto", out: Any = None):
        """Euclidean norms of every sample's own gradient ``∇_θ ℓ_i``: ``(B,)``, or ``(B, L)`` per
        top-level layer (a residual block's inner layers together) with ``per_layer=True``.

        From one reverse sweep, no per-sample gradient built (each leaf's ``sq_norms``,
        ``jacgrad.protocol.leaves``): dense ``(‖z_prev,i‖² + 1)‖δ_i‖²``, norm layers ``‖x̂_i⊙g_i‖² +
        ‖g_i‖²``; extra memory ``O(B·Σ H)``. With a token axis, ``method`` picks a weight's form:
        ``"gram"`` ``⟨A_iA_iᵀ, Δ_iΔ_iᵀ⟩``, ``"instantiate"`` ``‖A_iᵀΔ_i‖²``, ``"auto"`` (default) the
        Gram form when ``2T² ≤ p·d``; all three agree. A Dask ``x`` gives a lazy Dask result
        (``jacgrad.distributed``). ``out``: an array of the result's shape and dtype to write it into
        (what ``net.compile(B, product="grad_norms")`` passes: its buffer).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.Sequential([jg.layers.Dense(np.ones((3, 4)), activation="tanh"),
            ...                      jg.layers.LayerNorm(np.ones(4)), jg.layers.Dense(np.ones((4, 2)))])
            >>> net.per_sample_grad_norms(np.eye(3), np.zeros((3, 2)), per_layer=True).shape
            (3, 3)
        """
        method = check_method(method)
        lazy = _lazy.handler_for(x)
        if lazy is not None:  # a Dask array: jacgrad.distributed maps this method over its chunks
            if out is not None:
                raise ValueError("out= takes the result of an in-memory batch; a Dask x gives a lazy result")
            kw = {} if method == "auto" else {"method": method}
            return lazy("per_sample_grad_norms", self, x, target, loss=loss, per_layer=per_layer, **kw)
        cache, pairs, partials = self._sample_partials(x, target, loss)
        owner = [j for j, _, _ in leaves_of(self.layers)]
        xp = get_xp(cache.x)
        sq = xp.zeros((cache.batch, len(self.layers)), dtype=self.dtype)
        group, M = self._shared_group(), None
        for k, G in partials:
            leaf, a = pairs[k]
            if group is not None and k in group:  # a shared parameter: ‖Σ_uses g‖², from the gradients
                M = group.zeros(cache.batch, G) if M is None else M
                group.add_leaf(M, k, leaf, a, G)
                continue
            sq[:, owner[k]] += leaf.sq_norms(a, G[:, 0], method=method)
        if M is not None:
            group.sq_by_owner(M, sq)
        sq *= float(cache.batch) ** 2  # after the sums, as MLP's: a dense stack gives its norms to the last bit
        res = sq if per_layer else sq.sum(axis=1)
        if out is None:
            return xp.sqrt(res)
        return xp.sqrt(res, out=check_out(out, res.shape, self.dtype, "per_sample_grad_norms", xp))

    def per_sample_grads(self, x: Any, target: Any, loss: str = "mse", max_memory: float | None = per_sample.GIB,
                         out: Any = None):
        """Every sample's own gradient ``∇_θ ℓ_i`` as a ``Gradients``: ``flat: (B, P)`` (row i laid
        out as ``Gradients.flat``), ``layers[j]`` named views ``(B, *shape)`` (``weights[j]: (B,
        H_{j-1}, H_j)`` and ``biases[j]: (B, H_j)`` for a net of Dense layers); ``deltas[k]: (B,
        H_k)`` sample i's own ``∂ℓ_i/∂h_k`` per leaf (where every layer is a leaf; else None);
        ``input`` None.

        Convention: the gradient of ℓ_i itself, as ``torch.func.vmap(torch.func.grad(ℓ))`` gives
        it; BackPACK's BatchGrad differentiates ``ℓ_i / B`` (its per-sample gradients sum to the
        batch gradient), so it is ours divided by B; ``mean_i`` of ours is ``loss_and_grads``'
        gradient. It materialises ``B × P`` numbers on purpose; when ``B·P·itemsize`` exceeds
        ``max_memory`` bytes (default 1 GiB; None: no limit) it raises ``ValueError`` with the size
        before allocating — ``per_sample_grad_norms`` gives the norms in ``O(B·Σ H)``. ``out: (B, P)``:
        the block to write ``flat`` into (then no budget check: the memory exists).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.Sequential([jg.layers.Dense(np.ones((3, 4))), jg.layers.RMSNorm(np.ones(4))])
            >>> g = net.per_sample_grads(np.eye(3), np.zeros((3, 4)))
            >>> g.flat.shape, g.layers[0]["W"].shape, g.layers[1]["gamma"].shape
            ((3, 20), (3, 3, 4), (3, 4))
        """
        cache, pairs, partials = self._sample_partials(x, target, loss)
        ties = self._ties()
        B, P, xp = cache.batch, ties.n_uses, get_xp(cache.x)  # a shared parameter: each use's gradient, then their sum
        if out is None or ties.shared:
            per_sample.check_budget(
                f"per_sample_grads of B={B} samples x P={P} parameters ({self.dtype})", B * P * self.dtype.itemsize,
                max_memory, "per_sample_grad_norms gives their norms without building them; or raise max_memory, "
                "or split the batch")
        flat = (xp.empty((B, P), dtype=self.dtype) if out is None or ties.shared else
                check_out(out, (B, P), self.dtype, "per_sample_grads", xp))
        views, deltas = leaf_views(self.layers, flat), [None] * len(pairs)
        for k, G in partials:
            deltas[k] = G[:, 0] * B  # sample i's own cotangent: B times the batch loss's (the sweep reads G on)
        for k, delta in enumerate(deltas):  # then the (B, P) block front to back: fresh memory faults in faster
            leaf, a = pairs[k]
            leaf.fill(views[k], a, delta)
        if ties.shared:
            flat = ties.reduce(flat)
            if out is not None:
                check_out(out, flat.shape, self.dtype, "per_sample_grads", xp)[...] = flat
                flat = out
            views = self._leaf_views(flat)
        flat_net = len(pairs) == len(self.layers)
        return Gradients(layers=by_name(self.layers, views), flat=flat, deltas=deltas if flat_net else None)

    def clipped_grad(self, x: Any, target: Any, loss: str = "mse", *, max_norm: float, noise_multiplier: float = 0.0,
                     seed: Any = None, expected_batch_size: float | None = None, trainable: Any = None):
        """DP-SGD's private gradient ``(Σ_i clip_C(g_i) + N(0, σ²C² I)) / B`` from one forward and
        one reverse sweep over every leaf (Dense, LayerNorm, RMSNorm, inside residual blocks too),
        as ``jacgrad.params.private.ClippedGradients`` (``.grads``: a ``Gradients`` with ``input``
        and ``deltas`` None); arguments and conventions as ``MLP.clipped_grad``.

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.Sequential([jg.layers.Dense(np.ones((3, 4))), jg.layers.RMSNorm(np.ones(4))])
            >>> r = net.clipped_grad(np.eye(3), np.zeros((3, 4)), max_norm=1.0, noise_multiplier=1.0, seed=0)
            >>> r.grads.layers[1]["gamma"].shape, r.norms.shape, r.noise_std == 1 / 3
            ((4,), (3,), True)
        """
        C, sigma = private.check_private_args(max_norm, noise_multiplier, expected_batch_size)
        loss = private.check_loss(loss)
        y, cache = self.forward(x)
        _, grad_y = losses.get(loss)(y, losses.one_layout(target))
        xp, denom = get_xp(y), private.denominator(cache.batch, expected_batch_size)
        ties, group = self._ties(), self._shared_group()
        flat = carve(xp, [(ties.n_params,)], self.dtype, pooled=True)[0]  # as backward: reused host blocks
        views = self._leaf_views(flat)
        pairs = self._param_leaf_inputs(cache)
        shared = None
        if group is not None:  # shared parameters: their clipped sum written once, into their own views
            flat[...] = 0
            flags = None
            if trainable is not None:  # one flag per parameter (a shared one once), in flat order
                flags = [bool(f) for f in trainable]
                if len(flags) != len(ties.params):
                    raise ValueError(f"trainable has {len(flags)} flags but the network has {len(ties.params)} "
                                     "parameter arrays (a shared one once; one flag each, in flat order)")
                trainable = [flags[q] for q, _ in ties.uses]
            shared = (group, ties.param_views(flat), None if flags is None else {q for q, f in enumerate(flags) if f})
        norms, _ = private.sweep_and_clip(self.jacobian_chain(cache).factors, pairs, grad_y, views, C,
                                          private.leaf_flags(trainable, [len(v) for v in views]), 1.0 / denom,
                                          shared=shared)
        gen = private.noise_generator(seed, xp) if sigma else None
        frac, std = private.private_finish(flat, norms, C, sigma, denom, gen)
        return private.ClippedGradients(Gradients(layers=by_name(self.layers, views), flat=flat), norms, frac,
                                        std)

    # ------------------------------------------------------------------ Gauss–Newton
    def ggn_vp(self, x: Any, v: Any, target: Any = None, loss: str = "mse", out: Any = None):
        """The Gauss–Newton product ``G v = (1/B) Σ_i J_iᵀ H_i J_i v``: ``v``, result flat ``(P,)``
        in ``Gradients.flat`` order; as ``MLP.ggn_vp`` (``target`` optional, only checked).

        One forward-mode pass in parameter space through every layer kind
        (``curvature.leaf_parameter_jvp``), ``H_i / B`` per sample, one ``backward``; ``out: (P,)``
        receives the result (a copy of the backward's block).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.Sequential([jg.layers.Dense(np.ones((3, 4))), jg.layers.LayerNorm(np.ones(4))])
            >>> net.ggn_vp(np.eye(3), np.ones(24)).shape
            (24,)
        """
        v = per_sample.check_direction(v, anchor(self.layers), self.n_params, self.dtype,
                                       f"Gradients.flat (layer order; Dense: W, b; LayerNorm: gamma, beta; "
                                       "RMSNorm: gamma)")
        y, cache = self.forward(x)
        t = curvature.leaf_parameter_jvp(self.jacobian_chain(cache).factors, self._param_leaf_inputs(cache),
                                         leaf_views(self.layers, self._ties().expand(v)))  # backward sums the uses
        u = loss_hessians.hessian_vp(loss, _rows(y), _rows(t), _rows(target, y)).reshape(y.shape)
        u /= max(cache.batch, 1)
        g = self.backward(cache, u, input_grad=False).flat
        if out is None:
            return g
        check_out(out, g.shape, self.dtype, "ggn_vp", get_xp(g))[...] = g
        return out

    def ggn_diagonal(self, x: Any, target: Any = None, loss: str = "mse", max_memory: float | None = 1 << 28,
                     out: Any = None):
        """The exact diagonal of ``ggn_vp``'s ``G`` as ``ParamArrays`` (``flat: (P,)``) — BackPACK's
        DiagGGNExact. Samples go through in chunks whose working blocks — the loss-Hessian factor's
        ``(chunk, n_out, n_out)`` and the sweep's ``(chunk, n_out, max H)`` — stay under
        ``max_memory`` bytes (default 256 MiB; the forward cache comes on top). ``target`` as for
        ``ggn_vp``. ``out: (P,)``: the block ``flat`` is (zeroed, then summed into).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.Sequential([jg.layers.Dense(np.ones((3, 4))), jg.layers.RMSNorm(np.ones(4))])
            >>> net.ggn_diagonal(np.eye(3)).layers[1]["gamma"].shape
            (4,)
        """
        per_sample.check_max_memory(max_memory)
        y, cache = self.forward(x)
        xp, B, C, item = get_xp(y), cache.batch, _rows(y).shape[1], self.dtype.itemsize
        if out is None:
            flat = xp.zeros(self.n_params, dtype=self.dtype)
        else:
            flat = check_out(out, (self.n_params,), self.dtype, "ggn_diagonal", xp)
            flat[...] = 0
        views = self._leaf_views(flat)
        # per sample: its (C, C) factor block as it is made, then the sweep's (C, H) cotangent blocks
        T = y.shape[1] if y.ndim == 3 else 1  # a token output: the sweep's blocks are (C, T, H)
        per_row = loss_hessians.factor_bytes_per_sample(C, item) + 3 * C * T * max(self._param_widths()) * item
        chain = self.jacobian_chain(cache)
        pairs = self._param_leaf_inputs(cache)
        chunks = loss_hessians.hessian_factor_chunks(loss, _rows(y), _rows(target, y), per_sample.chunk_rows(max_memory, per_row, B))
        group = self._shared_group()
        for sel, V in chunks:  # a token output (B, T, d) is one (B, T·d) output for the loss
            V = V.reshape(V.shape[:2] + y.shape[1:])
            if group is None:
                curvature.accumulate_leaf_diagonal(chain.rows(sel).factors, [(leaf, a[sel]) for leaf, a in pairs],
                                                   V, views, 1.0 / B)
                continue
            M = group.zeros(V.shape[0] * V.shape[1], V)  # shared parameters: Σ_ρ (Σ_uses g_ρ)², from the gradients
            for k, G in per_sample.output_partials(chain.rows(sel).factors, V):
                leaf, a = pairs[k]
                if k in group:
                    group.add_leaf(M, k, leaf, a[sel], G)
                else:
                    leaf.ggn_diag_add(views[k], a[sel], G, 1.0 / B)
            group.write(self._ties().param_views(flat), (M * M).sum(axis=0) / B)
        return Gradients(layers=by_name(self.layers, views), flat=flat)

    # ------------------------------------------------------------------ shorthands
    def ntk(self, x1: Any, x2: Any = None, trace: bool = False, max_memory: float | None = _ntk.DEFAULT_MAX_MEMORY,
            out: Any = None):
        """``jg.ntk(net, x1, x2, trace, max_memory, out)``: the empirical NTK ``J_θ(x1) J_θ(x2)ᵀ``,
        ``(N1, N2, n_out, n_out)``, or ``(N1, N2)`` with ``trace=True``."""
        return _ntk.ntk(self, x1, x2, trace=trace, max_memory=max_memory, out=out)

    def jacobian(self, x: Any, order: str = "auto", max_memory: float | None = DEFAULT_TOKEN_MEMORY):
        """``J: (B, n_out, n_in)``, the per-sample input-output Jacobians at ``x: (B, n_in)``: the
        forward pass, then ``jacobian_chain(cache).jacobian(order, max_memory)`` (``order``: "auto",
        the cheapest bracketing, "forward" or "reverse"). A token batch ``(B, T, n_in)``: each
        sample's ``(T·n_out, T·n_in)`` of its flattened tokens, refused over ``max_memory`` bytes
        (default 1 GiB; None: no limit; ``Chain.jacobian``)."""
        return self.jacobian_chain(self.forward(x)[1]).jacobian(order, max_memory)


def _rows(a, like=None):
    """A token output ``(B, T, d)`` (or its target, shaped as ``like``) as ``(B, T·d)``: the
    per-sample loss of a token output is the loss of its flattened entries. Others as they are."""
    ref = a if like is None else like
    if a is None or getattr(ref, "ndim", 2) <= 2 or getattr(a, "shape", None) != ref.shape:
        return a
    return a.reshape(a.shape[0], -1)

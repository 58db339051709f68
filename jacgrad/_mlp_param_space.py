"""The parameter-space products of ``MLP``, from the factors of one ordinary forward and backward
pass: per-sample gradients and their norms, Gauss–Newton products and diagonal. ``MLP`` inherits
these methods; the algebra on ``(z_{j-1}, δ_j)`` pairs lives in ``jacgrad.per_sample``,
``jacgrad.curvature`` and ``jacgrad.loss_hessians``, which know no network.

The batch loss is the mean of per-sample losses ℓ_i (mse and sigmoid_bce: ℓ_i averages over
sample i's outputs), so sample i's deltas are B times the batch deltas: one ordinary forward and
backward pass serve every per-sample quantity.
"""

from __future__ import annotations

from typing import Any

from . import _lazy, curvature, loss_hessians, losses, per_sample, private
from ._passes import Gradients, carve_gradients, grad_views
from .backend import get_xp

__all__ = ["ParameterSpaceMethods"]


class ParameterSpaceMethods:
    """Per-sample gradients and norms, ``ggn_vp`` and ``ggn_diagonal`` for a network with ``forward``,
    ``backward``, ``weights``, ``biases`` and ``dtype`` (``MLP``)."""

    def _per_sample_deltas(self, x: Any, target: Any, loss: str):
        """``(cache, deltas)``: the forward cache and ``∂L/∂h_j: (B, H_j)`` of the batch loss."""
        loss_fn = losses.get(loss)
        y, cache = self.forward(x)
        _, grad_y = loss_fn(y, target)
        return cache, self.backward(cache, grad_y, input_grad=False).deltas

    def per_sample_grad_norms(self, x: Any, target: Any, loss: str = "mse", per_layer: bool = False):
        """Euclidean norms of every sample's own gradient ``∇_θ ℓ_i``: ``(B,)``, or ``(B, L)`` per layer
        (weights and bias of layer j together) with ``per_layer=True``.

        From ``‖∇_{W_j} ℓ_i‖² + ‖∇_{b_j} ℓ_i‖² = (‖z_{j-1,i}‖² + 1)‖δ_{j,i}‖²`` with the deltas of one
        backward pass: extra memory ``O(B·Σ H)``, no per-sample gradient is built. The norms of
        ``per_sample_grads`` (and of torch.func's ``vmap(grad)``; BackPACK's BatchL2Grad is B² times
        smaller in its squares: it differentiates ``ℓ_i / B``).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.MLP.init([3, 5, 2], seed=0)
            >>> net.per_sample_grad_norms(np.ones((4, 3)), np.zeros((4, 2)), per_layer=True).shape
            (4, 2)
        """
        lazy = _lazy.handler_for(x)
        if lazy is not None:  # a Dask array: jacgrad.distributed maps this method over its chunks
            return lazy("per_sample_grad_norms", self, x, target, loss=loss, per_layer=per_layer)
        cache, deltas = self._per_sample_deltas(x, target, loss)
        sq = per_sample.grad_sq_norms(cache.layer_output, deltas, float(cache.batch))
        xp = get_xp(sq)
        return xp.sqrt(sq) if per_layer else xp.sqrt(sq.sum(axis=1))

    def per_sample_grads(self, x: Any, target: Any, loss: str = "mse", max_memory: float | None = per_sample.GIB):
        """Every sample's own gradient ``∇_θ ℓ_i`` as a ``Gradients``: ``weights[j]: (B, H_{j-1}, H_j)``,
        ``biases[j]: (B, H_j)``, ``flat: (B, P)`` (row i laid out as ``Gradients.flat``; the others
        are views of it), ``deltas[j] = ∂ℓ_i/∂h_{j,i}: (B, H_j)``, ``input`` None.

        Convention: the gradient of ℓ_i itself, as ``torch.func.vmap(torch.func.grad(ℓ))`` gives it;
        BackPACK's BatchGrad differentiates ``ℓ_i / B`` (its per-sample gradients sum to the batch
        gradient), so it is ours divided by B; ``mean_i`` of ours is ``loss_and_grads``' gradient.

        It materialises ``B × P`` numbers on purpose; when ``B·P·itemsize`` exceeds ``max_memory``
        bytes (default 1 GiB; None: no limit) it raises ``ValueError`` with the size before
        allocating — ``per_sample_grad_norms`` gives the norms in ``O(B·Σ H)``.

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.MLP.init([3, 5, 2], seed=0)
            >>> g = net.per_sample_grads(np.ones((4, 3)), np.zeros((4, 2)))
            >>> g.flat.shape, g.weights[0].shape, g.biases[1].shape
            ((4, 32), (4, 3, 5), (4, 2))
        """
        cache, deltas = self._per_sample_deltas(x, target, loss)
        B, P = cache.batch, sum(W.size + W.shape[1] for W in self.weights)
        per_sample.check_budget(
            f"per_sample_grads of B={B} samples x P={P} parameters ({self.dtype})", B * P * self.dtype.itemsize,
            max_memory, "per_sample_grad_norms gives their norms without building them; or raise max_memory, "
            "or split the batch")
        xp = get_xp(deltas[0])
        for d in deltas:
            d *= B  # ours: a fresh block from this call's backward
        flat = xp.empty((B, P), dtype=self.dtype)
        dW, db = per_sample.per_sample_views(flat, self.weights)
        per_sample.fill_grads(dW, db, cache.layer_output, deltas)
        return Gradients(dW, db, None, deltas, flat)

    def clipped_grad(self, x: Any, target: Any, loss: str = "mse", *, max_norm: float, noise_multiplier: float = 0.0,
                     seed: Any = None, expected_batch_size: float | None = None, trainable: Any = None):
        """DP-SGD's private gradient ``(Σ_i clip_C(g_i) + N(0, σ²C² I)) / B`` from one forward and
        one reverse sweep, as ``jacgrad.private.ClippedGradients`` (``.grads``: a ``Gradients``
        with ``input`` and ``deltas`` None; ``.norms: (B,)`` before clipping; ``.clipped_fraction``).

        ``g_i = ∇_θ ℓ_i``, ``clip_C(g) = g · min(1, C/‖g‖)``; per layer the clipped sum is one GEMM
        ``z_{j-1}ᵀ diag(c) Δ_j`` (``jacgrad.private``), no per-sample gradient is built (extra memory
        ``O(B·Σ H)``). ``max_norm``: C > 0; ``noise_multiplier``: σ ≥ 0 (0: no noise); ``seed``: None,
        an int or a ``numpy.random.Generator`` (a seed gives the same noise every call: pass one
        Generator to get fresh noise each step); ``expected_batch_size``: divide by it instead of
        B (Poisson sampling, as Opacus); ``trainable``: one bool per parameter array in
        ``Gradients.flat`` order (None: all), the norms count only the True ones (frozen layers).
        Any B, no recompilation. Not cryptographically secure noise unless the Generator is.

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.MLP.init([3, 5, 2], seed=0)
            >>> r = net.clipped_grad(np.ones((4, 3)), np.zeros((4, 2)), max_norm=1e-3)
            >>> r.grads.flat.shape, r.norms.shape, float(r.clipped_fraction)
            ((32,), (4,), 1.0)
        """
        C, sigma = private.check_private_args(max_norm, noise_multiplier, expected_batch_size)
        private.check_loss(loss)
        y, cache = self.forward(x)
        _, grad_y = losses.get(loss)(y, losses.one_layout(target))
        xp, denom = get_xp(y), private.denominator(cache.batch, expected_batch_size)
        flat, dW, db = carve_gradients(xp, self.weights, self.dtype, pooled=True)  # as loss_and_grads: reused blocks
        inputs = [cache.layer_output(j - 1) for j in range(self.depth)]
        norms, _ = private.sweep_and_clip(self.jacobian_chain(cache).factors, inputs, grad_y, list(zip(dW, db)), C,
                                          private.leaf_flags(trainable, [2] * self.depth), 1.0 / denom)
        gen = private.noise_generator(seed, xp) if sigma else None
        frac, std = private.private_finish(flat, norms, C, sigma, denom, gen)
        return private.ClippedGradients(Gradients(dW, db, None, None, flat), norms, frac, std)

    def ggn_vp(self, x: Any, v: Any, target: Any = None, loss: str = "mse"):
        """The Gauss–Newton product ``G v = (1/B) Σ_i J_iᵀ H_i J_i v``: ``v``, result flat ``(P,)``
        in ``Gradients.flat`` order. ``J_i = ∂y_i/∂θ``, ``H_i`` the Hessian of sample i's loss in its
        output (``jacgrad.loss_hessians``).

        One forward-mode pass in parameter space (``curvature.parameter_jvp``), ``H_i / B`` per
        sample in closed form, one ``backward``. For ``mse``, ``sigmoid_bce`` and
        ``softmax_cross_entropy`` (labels or probability rows) ``H`` does not depend on the
        target; ``target`` is optional and, when given, only checked (softmax float rows that do
        not sum to 1 scale ``H_i`` by their sum, as they scale the loss).

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.MLP.init([3, 5, 2], seed=0)
            >>> net.ggn_vp(np.ones((4, 3)), np.ones(32)).shape
            (32,)
        """
        v = per_sample.check_direction(v, self.weights[0], sum(W.size + W.shape[1] for W in self.weights), self.dtype,
                                       "Gradients.flat (W0, b0, W1, b1, ...)")
        y, cache = self.forward(x)
        vW, vb = grad_views(v, self.weights)
        factors = [self._factor(cache, j) for j in range(self.depth)]
        t = curvature.parameter_jvp(factors, cache.layer_output, vW, vb)
        u = loss_hessians.hessian_vp(loss, y, t, target)
        u /= max(cache.batch, 1)
        return self.backward(cache, u, input_grad=False).flat

    def ggn_diagonal(self, x: Any, target: Any = None, loss: str = "mse", max_memory: float | None = 1 << 28):
        """The exact diagonal of ``ggn_vp``'s ``G``, as a ``Gradients`` (``weights[j]: (H_{j-1}, H_j)``,
        ``biases[j]``, ``flat (P,)``; ``input`` and ``deltas`` None) — BackPACK's DiagGGNExact.

        Per layer ``(1/B) Σ_i outer(z_{j-1,i}², Σ_ρ G_j[i, ρ]²)`` with ``G_j[i] = V_i ∂y_i/∂h_{j,i}``
        and ``H_i = V_iᵀ V_i`` (``curvature``); the samples go through in chunks whose working
        blocks — ``V``'s ``(chunk, n_out, n_out)`` and the sweep's ``(chunk, n_out, max H)`` — stay
        under ``max_memory`` bytes (default 256 MiB; the forward pass's cache comes on top).
        ``target`` as for ``ggn_vp``.

            >>> import numpy as np, jacgrad as jg
            >>> net = jg.MLP.init([3, 5, 2], seed=0)
            >>> net.ggn_diagonal(np.ones((4, 3))).weights[0].shape
            (3, 5)
        """
        per_sample.check_max_memory(max_memory)
        y, cache = self.forward(x)
        xp, B, C, item = get_xp(y), cache.batch, self.sizes[-1], self.dtype.itemsize
        flat, dW, db = carve_gradients(xp, self.weights, self.dtype, zero=True)
        # per sample: its (C, C) factor block as it is made, then the sweep's two (C, H) cotangent blocks
        per_row = loss_hessians.factor_bytes_per_sample(C, item) + 2 * C * max(self.sizes) * item
        chain = self.jacobian_chain(cache)
        zs = [cache.layer_output(j) for j in range(-1, self.depth - 1)]  # recomputed once, not per chunk
        for sel, V in loss_hessians.hessian_factor_chunks(loss, y, target, per_sample.chunk_rows(max_memory, per_row, B)):
            curvature.accumulate_diagonal(chain.rows(sel).factors, lambda j: zs[j + 1][sel], V, dW, db, 1.0 / B)
        return Gradients(dW, db, None, None, flat)

"""For PyTorch users: DP-SGD's clipped, noised gradient written into ``.grad``, so that your own
torch optimiser takes the step. torch is imported inside the functions: ``import jacgrad`` does
not import it.

    >>> import torch, jacgrad as jg
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> x, y = torch.ones(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    >>> r = jg.torch.dp_backward(model, x, y, loss="softmax_cross_entropy", max_norm=1.0,
    ...                          noise_multiplier=1.1, generator=torch.Generator().manual_seed(0))
    >>> [tuple(p.grad.shape) for p in model.parameters()], tuple(r.norms.shape)
    ([(4, 3), (4,), (2, 4), (2,)], (5,))
    >>> opt.step()

Privacy accounting is yours (jacgrad does none): DP-SGD with Poisson sampling at rate ``q =
expected batch / N``, noise multiplier σ and ``steps`` steps is (ε, δ)-DP with ε from Opacus'
accountant::

    from opacus.accountants import RDPAccountant       # or PRVAccountant
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]                  # or acc.step(noise_multiplier=sigma, sample_rate=q) per step
    eps = acc.get_epsilon(delta=1e-5)

The accountant's guarantee assumes Poisson sampling and a division by the EXPECTED batch size
(pass ``expected_batch_size=q·N``); a shuffled fixed-size batch is the common approximation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["dp_backward"]


def dp_backward(model, x: Any, y: Any, loss: str = "softmax_cross_entropy", *, max_norm: float,
                noise_multiplier: float = 0.0, generator: Any = None, expected_batch_size: float | None = None):
    """Write ``(Σ_i clip_C(∇ℓ_i) + N(0, σ²C² I)) / B`` into every parameter's ``.grad`` (replacing
    what is there) and return the ``jacgrad.params.private.ClippedGradients`` (per-sample norms before
    clipping: ``.norms: (B,)``, ``.clipped_fraction``; ``.grads``: the same numbers as the
    ``.grad``s, noise included, in jacgrad's flat layout).

    model: an ``nn.Sequential`` that ``jacgrad.Sequential.from_torch`` reads (``nn.Linear`` +
    activations, ``nn.LayerNorm``, ``nn.RMSNorm``, ``jacgrad.io.interop.torch_blocks.Residual``),
    float32 or float64, on the CPU (or CUDA with CuPy); it is imported with ``copy=False`` on every
    call, so it sees the optimiser's in-place updates. ``x: (B, n_in)``, ``y``: the target of
    ``loss`` (int labels ``(B,)`` or rows ``(B, n_out)``), torch tensors or arrays. ``max_norm``:
    C > 0; ``noise_multiplier``: σ ≥ 0; ``expected_batch_size``: divide by it instead of B
    (Poisson sampling, as Opacus' optimiser does).

    The noise: ``torch.randn(P, generator=generator)`` (float64 on the parameters' device, cast
    to their dtype), times σC; ``generator`` None uses torch's global generator (seeded by
    ``torch.manual_seed``). Reproducible from a seeded generator, different across steps from
    one generator; NOT cryptographically secure (torch's CPU generator is a Mersenne Twister,
    CUDA's Philox) unless you pass a secure generator (e.g. torchcsprng's), and, unlike Opacus'
    ``secure_mode``, no protection against floating-point attacks on the Gaussian sampler.
    """
    import torch

    from ..params import private
    from ..core.backend import asarray, get_xp
    from ..algebra.per_sample import param_views
    from .sequential import Sequential

    C, sigma = private.check_private_args(max_norm, noise_multiplier, expected_batch_size)
    loss = private.check_loss(loss, "dp_backward")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("dp_backward: the model has no parameter that requires grad")
    net = Sequential.from_torch(model, copy=False)
    ours = net._ties().params  # every parameter once: a shared one (tied weights, a re-used module) too
    live = {p.data_ptr() for _, p in params}  # a frozen parameter is not clipped
    x, y = (asarray(a.detach() if isinstance(a, torch.Tensor) else a) for a in (x, y))
    r = net.clipped_grad(x, y, loss=loss, max_norm=C, expected_batch_size=expected_batch_size,
                         trainable=[_address(a) in live for a in ours])
    if sigma:  # r.flat is (Σ clip) / B': add σC·N(0, I) / B', drawn by torch from the caller's generator
        p0 = params[0][1]
        noise = torch.randn(r.flat.shape[0], generator=generator, dtype=p0.dtype, device=p0.device)
        r.noise_std = sigma * C / (float(expected_batch_size) if expected_batch_size is not None else x.shape[0])
        r.grads.flat += asarray(noise.mul_(r.noise_std))
    grads = {_address(a): g for a, g in zip(ours, param_views(r.flat, [a.shape for a in ours]))}
    for name, p in params:
        g = grads.get(p.data_ptr())
        if g is None:
            raise TypeError(f"dp_backward: parameter {name!r} {tuple(p.shape)} is not one that "
                            f"Sequential.from_torch(model, copy=False) reads")
        a = ours[[_address(o) for o in ours].index(p.data_ptr())]
        g = torch.from_numpy(g) if get_xp(g) is np else torch.from_dlpack(g)
        # a Linear's W is weight.T; an Embedding's E (and a head tied to it) is weight itself
        g = g.T if p.ndim == 2 and tuple(a.strides) != tuple(s * p.element_size() for s in p.stride()) else g
        if p.grad is None:
            p.grad = g.contiguous().clone()
        else:
            p.grad.copy_(g)
    return r


def _address(a) -> int:
    """The first byte of a NumPy or CuPy array (a Linear's ``W = weight.T`` starts where ``weight`` does)."""
    return int(a.__array_interface__["data"][0]) if hasattr(a, "__array_interface__") else int(a.data.ptr)

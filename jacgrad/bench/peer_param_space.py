"""The PyTorch peers of the parameter-space tasks of ``jacgrad bench`` (``torch-cpu``, ``torch-cuda``).

The one copy of these recipes (``benchmarks/param_space.py`` was folded into ``jacgrad bench``):

- ``per_sample``: ``torch.autograd.grad`` of the mean loss (the scale), torch.func
  ``vmap(grad)`` and its norms, BackPACK ``BatchGrad`` and ``BatchL2Grad`` (they differentiate
  ``ℓ_i / B``: multiplied back by ``B`` here, so every row gives ``∇_θ ℓ_i``);
- ``ntk``: the two recipes of PyTorch's "Neural Tangent Kernels" tutorial, Jacobian
  contraction (``vmap(jacrev)`` of both sides, then an einsum; ``≥ 2·N·O·P`` numbers) and
  NTK-vector products (``vmap`` over the ``N²`` pairs and the ``O`` basis vectors of a vjp
  then a jvp; ``≥ N²·O·P`` numbers) — a recipe runs when twice that lower bound fits in the
  available memory, else its row is skipped with the figure;
- ``ggn``: torch.func's jvp → the softmax cross-entropy Hessian ``(diag p − p pᵀ)/B`` → vjp,
  and BackPACK ``DiagGGNExact``.

Parameters are the tuple ``(W_0, b_0, W_1, b_1, …)`` with ``W_j: (H_{j-1}, H_j)`` — jacgrad's
layout and its ``Gradients.flat`` order; BackPACK's ``nn.Linear`` holds ``W_jᵀ`` (transposed
back for the check). The loss is softmax cross-entropy on the labels ``NetData.labels``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from .base import Prepared
from .cases import Case, NetData
from .machine import available_memory

__all__ = ["BACKPACK_ACTIVATIONS", "ntk_memory", "prepare_param_space"]

# jacgrad activation → the torch.nn module BackPACK's extensions know (they need modules)
BACKPACK_ACTIVATIONS = {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "elu": "ELU",
                        "leaky_relu": "LeakyReLU", "identity": None}


def _host(t) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy(), dtype=np.float64)


def ntk_memory(case: Case, itemsize: int) -> dict[str, int]:
    """Lower bounds in bytes of the two torch.func NTK recipes: the Jacobians of both sides
    ``2·N·O·P`` (contraction) and the ``N²·O`` vjps of ``P`` numbers (NTK-vector products)."""
    N, O, P = case.batch, case.widths[-1], case.parameters
    return {"jacobian_contraction": 2 * N * O * P * itemsize, "ntk_vps": N * N * O * P * itemsize}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def prepare_param_space(case: Case, data: NetData, mlp: Callable, params: tuple, to: Callable,
                        sync: Callable) -> Prepared:
    """The torch ``Prepared`` of a ``per_sample``, ``ntk`` or ``ggn`` case. ``mlp(params, z)`` is the
    network on the tuple ``params``; ``to`` makes a tensor of a NumPy array."""
    import torch
    import torch.func as tf
    import torch.nn.functional as F

    x = to(data.x)
    if case.task == "ntk":
        return _ntk(case, data, mlp, params, x, sync)
    labels = torch.as_tensor(data.labels, device=x.device)
    variants: dict[str, Callable[[], Any]] = {}
    kinds: dict[str, str] = {}
    outputs_of: dict[str, Callable] = {}

    def add(name, kind, fn, outputs):
        variants[name], kinds[name], outputs_of[name] = fn, kind, outputs

    def autograd():
        ps = [p.detach().requires_grad_(True) for p in params]
        loss = F.cross_entropy(mlp(ps, x), labels)
        return loss, torch.autograd.grad(loss, ps)

    def split(grads) -> list:  # (W_0, b_0, …) → [W_0, W_1, …, b_0, b_1, …], as jacgrad's rows list them
        return [_host(g) for g in grads[0::2]] + [_host(g) for g in grads[1::2]]

    add("autograd", "loss_and_grads", autograd, lambda r: [_host(r[0])] + split(r[1]))
    skipped = {}
    if case.task == "per_sample":
        def ell(p, xi, ti):
            return F.cross_entropy(mlp(p, xi[None]), ti[None])

        psg = tf.vmap(tf.grad(ell), in_dims=(None, 0, 0))

        def norms():
            g = psg(params, x, labels)
            return torch.sqrt(sum((v.reshape(v.shape[0], -1) ** 2).sum(1) for v in g))

        add("vmap(grad)", "grads", lambda: psg(params, x, labels), split)
        add("vmap(grad)+norm", "norms", norms, lambda r: [_host(r)])
        B = case.batch
        for ext, kind, outputs in (
            ("BatchGrad", "grads",
             lambda m: [B * _host(lin.weight.grad_batch.transpose(1, 2)) for lin in m.linears]
             + [B * _host(lin.bias.grad_batch) for lin in m.linears]),
            ("BatchL2Grad", "norms",
             lambda m: [B * np.sqrt(sum(_host(p.batch_l2) for lin in m.linears for p in (lin.weight, lin.bias)))]),
        ):
            _add_backpack(add, skipped, kinds, ext, kind, outputs, data, x, labels)
    else:  # ggn
        v = torch.as_tensor(data.cast(data.direction()), device=x.device)
        sizes = [p.numel() for p in params]
        vt = tuple(piece.reshape(p.shape) for piece, p in zip(torch.split(v, sizes), params))

        def f(p):
            return mlp(p, x)

        def ggn_vp():
            y, Jv = tf.jvp(f, (params,), (vt,))
            p = torch.softmax(y, 1)
            HJv = p * (Jv - (p * Jv).sum(1, keepdim=True)) / x.shape[0]
            return torch.cat([g.reshape(-1) for g in tf.vjp(f, params)[1](HJv)[0]])

        add("jvp-H-vjp", "ggn_vp", ggn_vp, lambda r: [_host(r)])
        _add_backpack(add, skipped, kinds, "DiagGGNExact", "ggn_diagonal",
                      lambda m: [_host(lin.weight.diag_ggn_exact.T) for lin in m.linears]
                      + [_host(lin.bias.diag_ggn_exact) for lin in m.linears], data, x, labels)
    return Prepared(variants, sync, kinds=kinds, outputs_of=outputs_of, own_rows=tuple(variants), skipped=skipped)


def _backpack_model(data: NetData, x):
    """``nn.Sequential`` of ``nn.Linear`` (weights ``W_jᵀ``) and activation modules, extended by
    BackPACK, with its linears in ``.linears``; ValueError for an activation BackPACK lacks."""
    import torch
    from backpack import extend

    layers, linears = [], []
    for W, b, a in zip(data.weights, data.biases, data.activations):
        if a not in BACKPACK_ACTIVATIONS:
            raise ValueError(f"BackPACK has no module for the activation {a!r} "
                             f"(it runs {', '.join(k for k in BACKPACK_ACTIVATIONS if k != 'identity')})")
        lin = torch.nn.Linear(*W.shape, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(data.cast(W.T)))
            lin.bias.copy_(torch.as_tensor(data.cast(b)))
        layers.append(lin)
        linears.append(lin)
        if BACKPACK_ACTIVATIONS[a]:
            module = getattr(torch.nn, BACKPACK_ACTIVATIONS[a])
            layers.append(module(0.01) if a == "leaky_relu" else module())
    model = extend(torch.nn.Sequential(*layers))
    model.linears = linears
    return model


def _add_backpack(add, skipped: dict, kinds: dict, ext: str, kind: str, outputs, data: NetData, x, labels) -> None:
    """One BackPACK row: a backward pass of the mean cross-entropy with the extension ``ext``;
    skipped with the reason where BackPACK is not installed or lacks the activation."""
    name = f"backpack.{ext}"
    try:
        import torch
        from backpack import backpack, extend, extensions

        model = _backpack_model(data, x)
    except ImportError as exc:
        kinds[name] = kind
        skipped[name] = f"BackPACK (backpack-for-pytorch) is not importable ({type(exc).__name__}: {exc})"
        return
    except ValueError as exc:
        kinds[name] = kind
        skipped[name] = str(exc)
        return
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    extension = getattr(extensions, ext)

    def run():
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "Full backward hook is firing …" (no input needs a gradient)
            warnings.simplefilter("ignore", UserWarning)
            with backpack(extension()):
                loss_fn(model(x), labels).backward()
        return model

    add(name, kind, run, outputs)


def _ntk(case: Case, data: NetData, mlp, params: tuple, x, sync) -> Prepared:
    """PyTorch's NTK tutorial, in substance: Jacobian contraction and NTK-vector products, both
    ``(N, N, O, O)``; the better one is the torch row."""
    import torch
    import torch.func as tf

    def single(p, z):
        return mlp(p, z.unsqueeze(0)).squeeze(0)

    def jacobian_contraction(x1, x2):
        jac1 = [j.flatten(2) for j in tf.vmap(tf.jacrev(single), (None, 0))(params, x1)]
        jac2 = [j.flatten(2) for j in tf.vmap(tf.jacrev(single), (None, 0))(params, x2)]
        return torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)]).sum(0)

    def ntk_vps(x1, x2):
        def get_ntk(a, b):
            out, vjp_fn = tf.vjp(lambda p: single(p, a), params)

            def get_ntk_slice(vec):
                _, jvps = tf.jvp(lambda p: single(p, b), (params,), vjp_fn(vec))
                return jvps

            basis = torch.eye(out.numel(), dtype=out.dtype, device=out.device).view(out.numel(), -1)
            return tf.vmap(get_ntk_slice)(basis)

        return tf.vmap(tf.vmap(get_ntk, (None, 0)), (0, None))(x1, x2)

    recipes = {"jacobian_contraction": jacobian_contraction, "ntk_vps": ntk_vps}
    need = ntk_memory(case, np.dtype(data.dtype).itemsize)
    free = available_memory()
    variants, skipped = {}, {}
    for name, recipe in recipes.items():
        if free is not None and 2 * need[name] > free:  # a lower bound: leave it room to be wrong by 2×
            skipped[name] = (f"needs at least {_gib(need[name])} of memory; {_gib(free)} available "
                             "(a recipe runs when twice its lower bound fits)")
        else:
            variants[name] = (lambda r: lambda: r(x, x))(recipe)
    return Prepared(variants, sync, lambda r: [_host(r)], kinds=dict.fromkeys(recipes, "ntk"), skipped=skipped)

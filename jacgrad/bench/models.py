"""The issue's two models, for ``jacgrad bench --tasks cnn_norms,transformer_norms`` and for the
scripts ``benchmarks/cnn_products.py`` and ``benchmarks/transformer_products.py``: one builder and
one torch.func recipe each, so the bench and the scripts time the same thing.

- ``cnn_norms``: the small CNN (input ``3×S×S``; 3×3 convs of ``c1-c2-c3`` channels, padding 1,
  each with ReLU and a 2×2 max-pool; Flatten; Linear to 10 classes), softmax cross-entropy on
  integer labels, at ``B`` images;
- ``transformer_norms``: Embedding(V, d) → K pre-norm blocks (LayerNorm → causal
  MultiHeadAttention(d, heads), residual; LayerNorm → Linear(d, 4d) → GELU → Linear(4d, d),
  residual) → Linear(d, O), mse against ``(B, T, O)`` targets, on ``(B, T)`` token ids.

Each case times jacgrad's ``loss_and_grads`` (the scale), the same step compiled
(``net.compile``; on token batches ``tokens=T``), ``per_sample_grad_norms`` with ``method="auto"``,
``"gram"`` and ``"instantiate"``, and, with torch, torch's own ``autograd`` step and torch.func
``vmap(grad)`` + norm. ``SIZES["issue"]`` are the issue's sizes; ``SIZES["tiny"]`` a smoke test.
torch is needed to build the models (jacgrad imports them with ``Sequential.from_torch``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np

__all__ = ["MODEL_TASKS", "SIZES", "build_cnn", "build_transformer", "cnn_module", "prepare_jacgrad",
           "prepare_torch", "vmap_grad_norms"]

MODEL_TASKS = ("cnn_norms", "transformer_norms")
SIZES = {
    "issue": {"cnn_norms": dict(batch=64, size=32, channels=(32, 64, 128), classes=10),
              "transformer_norms": dict(batch=16, T=128, d=256, heads=4, blocks=2, vocab=512, n_out=2)},
    "tiny": {"cnn_norms": dict(batch=3, size=8, channels=(2, 3, 4), classes=3),
             "transformer_norms": dict(batch=2, T=4, d=8, heads=2, blocks=1, vocab=11, n_out=2)},
}


def label(task: str, s: dict) -> str:
    """The net column of a case: ``cnn 3×32×32 32-64-128`` / ``transformer 2×(T=128, d=256, h=4)``."""
    if task == "cnn_norms":
        return f"cnn 3×{s['size']}×{s['size']} {'-'.join(map(str, s['channels']))}"
    return f"transformer {s['blocks']}×(T={s['T']}, d={s['d']}, h={s['heads']})"


def cnn_module(seed: int = 0, size: int = 32, channels=(32, 64, 128), classes: int = 10):
    """The torch CNN in float32 (eval mode), seeded."""
    import torch

    nn = torch.nn
    torch.manual_seed(seed)
    c1, c2, c3 = channels
    return nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c3 * (size // 8) ** 2, classes)).float().eval()


def build_cnn(batch: int, size: int = 32, channels=(32, 64, 128), classes: int = 10, dtype: str = "float32",
              device: str = "cpu", seed: int = 0) -> dict:
    """``{model, net, f1, params, x, y, loss1}``: the torch CNN and jacgrad's import of it in ``dtype``
    (float32 weights, exactly cast), ``x (B, 3, S, S)``, labels ``y (B,)``; ``f1(p, x_i)`` and
    ``loss1(p, x_i, y_i)`` one sample through the torch module."""
    import torch

    import jacgrad as jg

    model = cnn_module(seed, size, channels, classes).to(getattr(torch, dtype)).to("cuda" if device == "gpu" else "cpu")
    net = jg.Sequential.from_torch(model, in_shape=(3, size, size))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32).astype(dtype)
    y = rng.integers(0, classes, batch)
    call = torch.func.functional_call

    def f1(p, xi):
        return call(model, p, (xi[None],))[0]

    def loss1(p, xi, yi):
        return torch.nn.functional.cross_entropy(f1(p, xi)[None], yi[None])

    params = {k: v.detach() for k, v in model.named_parameters()}
    return dict(model=model, net=net, f1=f1, params=params, x=x, y=y, loss1=loss1, loss="softmax_cross_entropy",
                torch_loss=lambda out, t: torch.nn.functional.cross_entropy(out, t), context=contextlib.nullcontext)


def build_transformer(batch: int, T: int = 128, d: int = 256, heads: int = 4, blocks: int = 2, vocab: int = 512,
                      n_out: int = 2, dtype: str = "float32", device: str = "cpu", seed: int = 0) -> dict:
    """``{model, net, f, params, x, y, loss1, context}``: the torch transformer and jacgrad's
    import of it (the attention made causal: torch passes that mask at call time), token ids
    ``x (B, T)``, targets ``y (B, T, O)``; ``f(p, tok): (N, T) -> (N, T, O)`` through the torch
    modules with the causal mask; ``context()``: torch's math attention kernel (what vmap needs)."""
    import torch
    from torch import nn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import jacgrad as jg
    from jacgrad.io.interop.torch_blocks import Residual

    torch.manual_seed(seed)
    mods = []
    for _ in range(blocks):
        mods += [Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True))),
                 Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)))]
    model = nn.Sequential(nn.Embedding(vocab, d), *mods, nn.Linear(d, n_out)).float()
    model = model.to(getattr(torch, dtype)).to("cuda" if device == "gpu" else "cpu")
    L = jg.layers
    layers = list(jg.Sequential.from_torch(model).layers)
    for j in range(1, 1 + 2 * blocks, 2):
        ln, mha = layers[j].layers
        layers[j] = L.Residual([ln, L.MultiHeadAttention(mha.Wq, mha.Wk, mha.Wv, mha.Wo, mha.heads, mha.bq, mha.bk,
                                                         mha.bv, mha.bo, causal=True)])
    net = jg.Sequential(layers)
    cm = torch.triu(torch.ones(T, T, dtype=torch.bool, device=next(model.parameters()).device), 1)
    call = torch.func.functional_call

    def f(p, tok):
        sub = lambda pre: {k[len(pre):]: v for k, v in p.items() if k.startswith(pre)}  # noqa: E731
        z = call(model[0], sub("0."), (tok,))
        for j in range(1, 1 + 2 * blocks, 2):
            ln, mha = model[j].inner
            u = call(ln, sub(f"{j}.inner.0."), (z,))
            z = z + call(mha, sub(f"{j}.inner.1."), (u, u, u), dict(attn_mask=cm, need_weights=False))[0]
            z = z + call(model[j + 1].inner, sub(f"{j + 1}.inner."), (z,))
        return call(model[-1], sub(f"{len(model) - 1}."), (z,))

    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, (batch, T))
    y = rng.standard_normal((batch, T, n_out)).astype(np.float32).astype(dtype)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return dict(model=model, net=net, f=f, params=params, x=x, y=y, loss="mse",
                loss1=lambda p, ti, yi: ((f(p, ti[None])[0] - yi) ** 2).mean(),
                torch_loss=lambda out, t: ((out - t) ** 2).mean(), forward=lambda p, tok: f(p, tok),
                context=lambda: sdpa_kernel(SDPBackend.MATH))


def _build(task: str, size: dict, dtype: str, device: str) -> dict:
    return (build_cnn if task == "cnn_norms" else build_transformer)(dtype=dtype, device=device, **size)


def vmap_grad_norms(m: dict) -> Callable[[], Any]:
    """torch.func's per-sample gradient norms of a built model ``m``: ``vmap(grad(loss1))`` over the
    batch, then ``sqrt(Σ_params ‖g_i‖²)``: a ``(B,)`` tensor."""
    import torch

    g = torch.func.vmap(torch.func.grad(m["loss1"]), in_dims=(None, 0, 0))
    dev = next(iter(m["params"].values())).device
    X, Y = torch.as_tensor(m["x"], device=dev), torch.as_tensor(m["y"], device=dev)
    B = X.shape[0]

    def norms():
        with m["context"]():
            grads = g(m["params"], X, Y)
        return torch.sqrt(sum((v.reshape(B, -1) ** 2).sum(1) for v in grads.values()))

    return norms


def prepare_jacgrad(case, dtype: str, to_host: Callable, sync: Callable, device: str):
    """jacgrad's ``Prepared`` of a model case: ``loss_and_grads``, ``compiled`` (the compiled step),
    ``per_sample_grad_norms[auto|gram|instantiate]``, each a row of its own."""
    from .base import Prepared

    m = _build(case.task, case.spec, dtype, device)
    net, loss = m["net"], m["loss"]
    xp = net.xp
    x = xp.asarray(m["x"])
    y = xp.asarray(m["y"])
    tokens = m["x"].shape[1] if case.task == "transformer_norms" else None
    step = net.compile(case.batch, loss=loss, input_grad=False, tokens=tokens)
    table = {"loss_and_grads": (lambda: net.loss_and_grads(x, y, loss=loss, input_grad=False), "loss_and_grads"),
             "compiled": (lambda: step(x, y), "loss_and_grads")}
    for method in ("auto", "gram", "instantiate"):
        table[f"per_sample_grad_norms[{method}]"] = (
            lambda method=method: net.per_sample_grad_norms(x, y, loss=loss, method=method), "norms")
    outputs = {k: (lambda r: to_host([r[0]])) if kind == "loss_and_grads" else (lambda r: to_host([r]))
               for k, (_, kind) in table.items()}
    return Prepared({k: fn for k, (fn, _) in table.items()}, sync, own_rows=tuple(table),
                    kinds={k: kind for k, (_, kind) in table.items()}, outputs_of=outputs)


def prepare_torch(case, dtype: str, sync: Callable, device: str):
    """torch's ``Prepared`` of a model case: its own ``autograd`` step (loss and every gradient)
    and torch.func ``vmap(grad)`` + norm."""
    import torch

    from .base import Prepared

    m = _build(case.task, case.spec, dtype, device)
    model = m["model"]
    dev = next(model.parameters()).device
    X, Y = torch.as_tensor(m["x"], device=dev), torch.as_tensor(m["y"], device=dev)
    params = [p for p in model.parameters()]
    fwd = m.get("forward")

    def autograd():
        with m["context"]():
            out = fwd(dict(model.named_parameters()), X) if fwd else model(X)
            loss = m["torch_loss"](out, Y)
            return loss, torch.autograd.grad(loss, params)

    host = lambda t: np.asarray(t.detach().cpu().numpy(), dtype=np.float64)  # noqa: E731
    return Prepared({"autograd": autograd, "vmap(grad)+norm": vmap_grad_norms(m)}, sync,
                    own_rows=("autograd", "vmap(grad)+norm"),
                    kinds={"autograd": "loss_and_grads", "vmap(grad)+norm": "norms"},
                    outputs_of={"autograd": lambda r: [host(r[0])], "vmap(grad)+norm": lambda r: [host(r)]})

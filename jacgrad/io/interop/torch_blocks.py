"""PyTorch blocks that ``jacgrad.Sequential.from_torch`` understands, and the converter.

``Residual(inner, scale, shortcut=None)`` is a tiny ``nn.Module`` whose forward is
``x + scale·inner(x)`` (``shortcut(x) + scale·inner(x)`` with a projection shortcut): put it in a
torch model to mark a residual block. ``layers_from_torch(module)`` reads an ``nn.Sequential``
of ``nn.Linear`` (an activation module right after it is its activation), ``nn.LayerNorm``,
``nn.RMSNorm``, ``Residual`` and activation modules elsewhere (after a norm, a residual block or
another activation: an ``Activation`` layer) into ``jacgrad.nn.layers`` (arrays copied to NumPy;
``W = weight.T``); ``nn.Identity``, ``nn.Dropout`` in eval mode and ``nn.Flatten()`` pass through
as in ``MLP.from_torch``, and only torch's own classes are read (a subclass may compute something
else), besides the token modules ``to_torch`` writes (``interop.torch_tokens``). The modules are
walked as ``MLP.from_torch`` walks them (``jacgrad.io.interop.torch.flatten``): an iterable of
modules is taken too, nested ``nn.Sequential``s are flattened (``"1.0"``), a re-used module is applied in each place, and a
parameter used in several places (a re-used module, ``b.weight = a.weight``) is ONE shared
jacgrad parameter (``docs/sharing.md``). A missing bias
(``nn.Linear(bias=False)``) is a bias-free ``Dense`` (no bias parameter); RMSNorm's ``eps=None`` becomes ``torch.finfo(dtype).eps``, as torch computes it.

    >>> import torch, jacgrad as jg
    >>> from jacgrad.io.interop.torch_blocks import Residual
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
    ...                         Residual(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()), 0.5),
    ...                         torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    >>> jg.Sequential.from_torch(m)
    Sequential([Dense(3->4, tanh), Residual([Dense(4->4, relu)], scale=0.5), LayerNorm(4, eps=1e-05), Dense(4->2, identity)], float32)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ...nn.layers import (
    Activation as _JgActivation,
    Dense,
    Embedding,
    LayerNorm,
    MultiHeadAttention,
    Residual as _JgResidual,
    RMSNorm,
)
from ...core.backend import asarray, get_xp
from ...protocol.layer import stored_arrays
from .torch import SUPPORTED, _parameter, activation_module, activation_name, cast_dtype, custom_note, describe, flatten
from .torch import check_attention_module, check_embedding_module, origin, parameter_converter, passes_through, tensor
from .torch_conv import IMAGE_MODULES, conv_layer, conv_modules
from .torch_tokens import TOKEN_MODULES, token_layer_of, token_modules
from .torch_write import TorchTies, linear_module

__all__ = ["Residual", "attention_from_torch", "embedding_from_torch", "layers_from_torch", "layers_to_torch", "token_layer"]

_TO_TORCH = ("Dense", "Activation", "LayerNorm", "RMSNorm", "Residual (with or without a shortcut)", "Conv1d", "Conv2d",
             "BatchNorm1d", "BatchNorm2d", "AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten",
             "PReLU") + TOKEN_MODULES


class Residual(nn.Module):
    """``x + scale·inner(x)``, ``inner`` mapping a shape to itself (``(B, H)``, ``(B, C, H, W)``);
    or, with ``shortcut`` (a projection, e.g. ``nn.Sequential(nn.Conv2d(C, C', 1, stride=2),
    nn.BatchNorm2d(C'))``), ``shortcut(x) + scale·inner(x)``, both mapping the input to one shape:
    jacgrad's ``Residual(layers, scale, shortcut=...)``. Its state dict has ``inner.*`` (and
    ``shortcut.*`` with a shortcut: without one, the keys of a block saved before shortcuts)."""

    def __init__(self, inner: nn.Module, scale: float = 1.0, shortcut: nn.Module | None = None):
        super().__init__()
        self.inner, self.scale = inner, float(scale)
        if shortcut is not None:  # none otherwise: a block without one keeps its state dict and repr
            self.shortcut = shortcut

    def forward(self, x):
        shortcut = getattr(self, "shortcut", None)  # None in a block pickled before shortcuts too
        return (x if shortcut is None else shortcut(x)) + self.scale * self.inner(x)

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


def layers_from_torch(module, where: str = "module", dtype=None, copy: bool = True) -> list:
    """``jacgrad.nn.layers`` equivalent to ``module`` (an ``nn.Sequential``, an iterable of modules,
    or one supported module); an unsupported module is a ``TypeError`` naming its index.
    Parameters become NumPy arrays (CPU) or CuPy arrays (CUDA, through DLPack) on the module's device, as in
    ``MLP.from_torch``: copies, or with ``copy=False`` views of the parameters' own memory (an
    optimiser's in-place steps are seen). ``dtype``: cast every parameter to float32/float64 (a
    copy; needed for float16/bfloat16 parameters, which are a ``TypeError`` naming the module
    without it); default: the parameters' own, and that of the first parameter for norm layers
    without any (float32 when the module has none)."""
    layers, _ = layers_and_origin(module, where, dtype, copy)
    return layers


def layers_and_origin(module, where: str = "module", dtype=None, copy: bool = True,
                      importer: str = "jg.Sequential.from_torch", dense_only: bool = False):
    """``(layers, origin)``: ``layers_from_torch``'s layers and the ``Origin`` the network keeps
    (with ``copy=False``, the ``TorchLink`` that checks the shared memory before each read) — the
    one reader behind ``Sequential.from_torch`` and ``MLP.from_torch``. ``dense_only`` (an MLP):
    a module that becomes anything but a Dense layer is a ``TypeError`` pointing to
    ``importer``'s Sequential counterpart."""
    cast = cast_dtype(dtype)
    seen: dict = {}
    items = flatten(torch, module, where, seen)
    params = [p for _, m in items for p in m.parameters()]
    first = params[0] if params else None
    xp = np if first is None or first.device.type == "cpu" else get_xp(asarray(first.detach()))
    conv = _Convert(copy, cast, xp, cast if cast is not None else _dtype(params), seen)
    layers = _layers(items, where, conv, dense_only)
    return layers, origin(conv.read, copy, importer)

class _Convert:
    """How each parameter is brought over: copied or viewed, cast, on which array module; the
    walk's places (``seen``, for tied parameters) and the ``(where, module)`` pairs read."""

    def __init__(self, copy: bool, cast, xp, dtype, seen: dict):
        self.copy, self.cast, self.xp, self.dtype = bool(copy), cast, xp, np.dtype(dtype)
        self.seen, self.read = seen, []

    def __call__(self, p, what: str):
        """``p`` brought over, once: a tensor read again (a re-used module, a tied parameter) gives
        the same array, and its transpose (``head.weight = emb.weight`` read as ``W = weight.T``)
        that array's transpose — one shared jacgrad parameter (``protocol.sharing``), with copies too."""
        key = (p.data_ptr(), tuple(p.shape), tuple(p.stride()), p.dtype)
        memo = self.seen.setdefault("arrays", {})
        if key in memo:
            return memo[key]
        if p.dim() == 2:
            flipped = (key[0], key[1][::-1], key[2][::-1], p.dtype)
            if flipped in memo:
                return memo[flipped].T
        a = memo[key] = _parameter(torch, p, what, self.copy, self.cast)
        return a

    def ones(self, n: int):
        return self.xp.ones(n, dtype=self.dtype)

    def zeros(self, n: int):
        return self.xp.zeros(n, dtype=self.dtype)


def _layers(items, where: str, conv: _Convert, dense_only: bool = False) -> list:
    """The layers of the ``(index, module)`` pairs of ``flatten``."""
    out: list = []
    after_linear = None  # the last module that computes something, when it was an nn.Linear (Identity computes nothing)
    last_act = None  # (index, name) of the activation just read
    width = None  # (features, index, class) of the last layer's output
    for i, m in items:
        at = f"{where} {i} ({type(m).__name__})"
        if next(m.parameters(recurse=False), None) is not None:
            conv.read.append((at, m))
        if conv.cast is None:
            for name, p in m.named_parameters(recurse=False):
                if p.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"{at}: parameter {name!r} is {p.dtype}; jacgrad works in float32 or float64: "
                                    f"cast the model first (model.float() or model.double()), or pass dtype='float32' "
                                    f"(or 'float64') to cast it")
        image = None if dense_only else conv_layer(m, at, conv, out)  # the convolutional family (interop.torch_conv)
        if image is None and not dense_only:  # the token modules of to_torch (interop.torch_tokens)
            image = token_layer_of(m, conv, at)
        if image is None and passes_through(nn, f"{where} {i}", m):  # Identity, Dropout (eval), Flatten: they compute nothing
            continue
        try:
            act = activation_name(nn, m)
        except ValueError as exc:
            raise ValueError(f"{at}: {exc}") from None
        computes = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)  # what an activation may follow
        linear, after_linear, act_before = after_linear, (i if type(m) in computes else None), last_act
        last_act = None if act is None else (i, act, m)
        if image is not None:
            out.append(image)
        elif type(m) is nn.Linear:  # torch's own classes only: a subclass may compute something else
            if width is not None and width[0] is not None and m.in_features != width[0]:
                raise ValueError(f"{where} {i} ({describe(m)}) takes {m.in_features} features but the {width[2]} "
                                 f"before it ({where} {width[1]}) gives {width[0]}")
            if dense_only and m.bias is None:  # MLP's biases list has one (H_j,) array per layer
                raise TypeError(f"{at} has no bias (bias=False): an MLP's layers all have one (its biases list); "
                                f"jg.Sequential.from_torch(model) imports it as a bias-free Dense")
            W = conv(m.weight.T, f"{at}: weight")  # W = weight.T: a transposed view, never a transposing copy
            b = None if m.bias is None else conv(m.bias, f"{at}: bias")
            out.append(Dense(W, b, "identity", bias=b is not None))  # Linear(bias=False): a bias-free Dense
        elif act is not None:
            if linear is not None:  # fused into the layer before it (a Dense, a convolution, an eval BatchNorm)
                last = out.pop()
                out.append(_fused(last, act))
            elif out and not dense_only:  # after a norm, a residual block or another activation: a layer of its own
                out.append(_JgActivation(act, out[-1].n_out))
            else:
                rule = ("an activation must directly follow an nn.Linear" if dense_only else
                        "an activation must follow a layer (an nn.Linear, a norm, a Residual), whose width it takes")
                if act_before is not None:
                    k, name, prev = act_before
                    raise TypeError(f"{where} {i} ({describe(m)}) follows another activation ({name}) at {where} {k} "
                                    f"({describe(prev)}): {rule}" + ("; jg.Sequential.from_torch(model) imports it as "
                                                                     "an Activation layer" if dense_only else ""))
                raise TypeError(f"{at}: {rule}" + ("" if out else ", and this one comes before any "
                                                   + ("Linear" if dense_only else "layer")))
        elif dense_only and (type(m) in (nn.LayerNorm, nn.RMSNorm) or type(m) is Residual):
            raise TypeError(f"{where} {i} ({describe(m)}) is not a dense layer: MLP.from_torch reads stacks of "
                            f"nn.Linear and activations; jg.Sequential.from_torch(model) imports LayerNorm, RMSNorm "
                            f"and residual blocks too")
        elif type(m) is nn.LayerNorm:
            if len(m.normalized_shape) != 1:
                raise TypeError(f"{at}: only a LayerNorm over the last axis (one width) is supported")
            n = m.normalized_shape[0]  # elementwise_affine=False: no parameters (γ the constant ones); bias=False: no β
            gamma = conv(m.weight, f"{at}: weight") if m.weight is not None else conv.ones(n)
            beta = conv(m.bias, f"{at}: bias") if m.bias is not None else None
            out.append(LayerNorm(gamma, beta, eps=m.eps, bias=beta is not None, affine=m.weight is not None))
        elif type(m) is nn.RMSNorm:
            if len(m.normalized_shape) != 1:
                raise TypeError(f"{at}: only an RMSNorm over the last axis (one width) is supported")
            n = m.normalized_shape[0]
            gamma = conv(m.weight, f"{at}: weight") if m.weight is not None else conv.ones(n)
            eps = m.eps if m.eps is not None else float(np.finfo(gamma.dtype).eps)
            out.append(RMSNorm(gamma, eps=eps, affine=m.weight is not None))
        elif type(m) in (nn.Embedding, nn.MultiheadAttention):  # (B, T) tokens / (B, T, d) sequences
            out.append(token_layer(m, conv, at))
        elif type(m) is Residual:
            parts = [(f"{at}: {name} module", part) for name, part in (("inner", m.inner),
                     ("shortcut", getattr(m, "shortcut", None))) if part is not None]
            branch, *short = [_layers(flatten(torch, part, name, conv.seen), name, conv) for name, part in parts]
            out.append(_JgResidual(branch, m.scale, short[0] if short else None))
        else:
            note = custom_note(m, f" and {__name__}.Residual")
            raise TypeError(f"{at} is not supported{note}; supported: {', '.join(SUPPORTED)}, nn.LayerNorm, "
                            f"nn.RMSNorm, nn.Embedding, nn.MultiheadAttention(batch_first=True), {', '.join(IMAGE_MODULES)}, "
                            f"jacgrad.io.interop.torch_blocks.Residual, the modules of jacgrad.io.interop.torch_tokens")
        if act is None:
            width = (out[-1].n_out, i, type(m).__name__)
    if not out:
        raise ValueError(f"{where}s: no layers to convert (no nn.Linear, nn.LayerNorm, nn.RMSNorm or Residual)")
    return out


def _fused(layer, act: str):
    """``layer`` (a Dense, a convolution, an eval BatchNorm: one whose spec has an ``activation``)
    with ``act`` fused, on the very same arrays: rebuilt through its file protocol (``spec``,
    ``from_spec`` of its stored arrays)."""
    return type(layer).from_spec({**layer.spec(), "activation": act}, dict(stored_arrays(layer)), None)


def token_layer(m, convert, where: str, causal: bool = False):
    """The jacgrad layer of an ``nn.Embedding`` or an ``nn.MultiheadAttention(batch_first=True)``
    (self-attention; ``causal`` as the caller knows it: torch passes masks at call time).
    ``convert(tensor, what)``: how parameters come over (``_Convert``, or
    ``interop.torch.parameter_converter``); refusals name ``where``."""
    conv = lambda p, what: convert(p, f"{where}: {what}")  # noqa: E731
    if type(m) is nn.Embedding:
        return embedding_from_torch(m, convert=conv, where=where)
    return attention_from_torch(m, causal=causal, convert=conv, where=where)


def attention_from_torch(module, copy: bool = True, dtype=None, causal: bool = False,
                      convert=None, where: str | None = None) -> MultiHeadAttention:
    """From a torch ``nn.MultiheadAttention(batch_first=True)`` (self-attention: the packed
    ``in_proj_weight``): ``Wq, Wk, Wv = in_proj_weight.chunk(3)ᵀ``, ``Wo = out_proj.weight.T``,
    biases from ``in_proj_bias``/``out_proj.bias``. ``copy=False`` shares the memory (views);
    ``dtype`` casts (a copy); ``causal``: torch passes the mask at call time, so say it here.
    ``convert(tensor, what) -> array``: how a parameter is brought over (``interop.torch``'s,
    by default); ``where``: the module's place, for the messages. Refused, with the reason: ``batch_first=False``, separate q/k/v weights
    (``kdim``/``vdim`` ≠ ``embed_dim``), ``add_bias_kv``, ``add_zero_attn``, dropout > 0 in
    train mode."""

    check_attention_module(module, where or f"attention_from_torch({type(module).__name__})")
    conv = convert if convert is not None else parameter_converter(copy, dtype)
    m, d = module, module.embed_dim
    Ws = [conv(m.in_proj_weight[i * d:(i + 1) * d].T, f"in_proj_weight[{i * d}:{(i + 1) * d}]") for i in range(3)]
    Wo = conv(m.out_proj.weight.T, "out_proj.weight")
    bs = [None] * 4
    if m.in_proj_bias is not None:
        bs = [conv(m.in_proj_bias[i * d:(i + 1) * d], f"in_proj_bias[{i * d}:{(i + 1) * d}]") for i in range(3)]
        bs.append(conv(m.out_proj.bias, "out_proj.bias"))
    return MultiHeadAttention(*Ws, Wo, m.num_heads, *bs, causal=causal, bias=m.in_proj_bias is not None)


def embedding_from_torch(module, copy: bool = True, dtype=None, convert=None,
                      where: str | None = None) -> Embedding:
    """From a torch ``nn.Embedding``: ``E = weight`` (same layout), ``padding_idx`` kept.
    ``copy=False`` shares the memory; ``dtype`` casts (a copy); ``convert(tensor, what) -> array``:
    how the weight is brought over (``interop.torch``'s, by default); ``where``: its place, for
    the messages. ``max_norm`` (which
    renormalises rows of the weight inside forward) is refused."""

    check_embedding_module(module, where or "embedding_from_torch")
    conv = convert if convert is not None else parameter_converter(copy, dtype)
    return Embedding(conv(module.weight, "weight"), module.padding_idx)


def layers_to_torch(layers, _tied: TorchTies | None = None, _where=None) -> nn.Sequential:
    """An ``nn.Sequential`` computing the ``jacgrad.nn.layers`` in order — ``nn.Linear`` (+ its
    activation module), the norms, activation modules, ``Residual`` around an inner ``nn.Sequential``
    (and a ``shortcut`` one), the convolutional family (``torch_conv.conv_modules``; BatchNorm in
    eval mode), the token layers (``torch_tokens.token_modules``: ``nn.Embedding``, attention, ...)
    — with copies of the parameters in their dtype, on their device (CUDA for CuPy arrays).
    ``layers_from_torch`` of it gives the same layers back, exactly. A shared parameter
    (``protocol.sharing``) is one torch parameter in every place (``b.weight = a.weight``; a tied
    unembedding ``Dense(E.T)`` is the ``nn.Embedding``'s weight: ``torch_write.TorchTies``); a Dense
    whose W is another Dense's W transposed has no torch spelling: a ``ValueError``; a layer with no
    torch module here a ``TypeError`` naming its place."""
    tie = TorchTies() if _tied is None else _tied  # one torch Parameter (or buffer) per jacgrad array
    where = _where or (lambda j: f"layer {j}")  # j -> the layer's place, for the messages
    modules = []
    for j, L in enumerate(layers):
        image = conv_modules(L, _tensor, tie)
        token = None if image is not None else token_modules(L, _tensor, tie, where(j))
        if image is not None or token is not None:
            modules.extend(image if image is not None else token)
        elif L.kind == "dense":
            modules.append(linear_module(L.W, L.b if L.has_bias else None, _tensor, tie, f"{where(j)}'s"))
            act = activation_module(nn, L.activation)
            if act is not None:
                modules.append(act)
        elif L.kind == "residual":  # inner layers numbered as jacgrad does: the branch's, then the shortcut's
            n, at = len(L.branch), where(j)
            body = layers_to_torch(L.branch, tie, lambda i: f"{at}.{i}")
            short = None if L.shortcut is None else layers_to_torch(
                L.shortcut, tie, lambda i: f"{at}.{n + i} (shortcut layer {i})")
            modules.append(Residual(body, L.scale, short))
        elif L.kind == "activation":
            modules.append(activation_module(nn, L.activation) or nn.Identity())
        elif L.kind in ("layernorm", "rmsnorm"):
            gamma = _tensor(L.gamma)
            with_beta = L.kind == "layernorm" and L.beta is not None
            kw = {"bias": with_beta} if L.kind == "layernorm" and L.affine else {}
            cls = nn.LayerNorm if L.kind == "layernorm" else nn.RMSNorm
            norm = cls(gamma.shape[0], eps=L.eps, elementwise_affine=L.affine, dtype=gamma.dtype, device=gamma.device, **kw)
            if L.affine:
                with torch.no_grad():
                    norm.weight.copy_(gamma)
                    if with_beta:
                        norm.bias.copy_(_tensor(L.beta))
                norm.weight = tie(L.gamma, norm.weight)
                if with_beta:
                    norm.bias = tie(L.beta, norm.bias)
            modules.append(norm)
        else:
            raise TypeError(f"to_torch: {where(j)}: {L!r} cannot be converted: to_torch converts "
                            f"{', '.join(_TO_TORCH)}")
    return nn.Sequential(*modules)


def _tensor(a):
    return tensor(torch, a)


def _dtype(params):
    """The NumPy dtype of the first of ``params`` (float32 without any)."""
    for p in params:
        return {torch.float32: np.float32, torch.float64: np.float64}.get(p.dtype, np.float32)
    return np.float32

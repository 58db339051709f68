"""A fake CuPy for counting device-to-host transfers on a machine without a GPU.

``FakeCupy()`` is a module named ``cupy`` that wraps NumPy: its arrays are an ``ndarray``
subclass whose ``type(a).__module__`` is ``"cupy"``, so ``jacgrad.core.backend.get_xp`` dispatches to
it exactly as to the real CuPy (``sys.modules["cupy"]``). Like CuPy, reductions and scalar
indexing give 0-d device arrays, not host scalars, so every read of a value on the host goes
through one of the calls a real CuPy array syncs on: ``.get()``, ``float()``, ``int()``,
``bool()``, ``.item()``, ``.tolist()`` — each counted in ``fake.transfers`` (with the jacgrad
line that asked, in ``fake.where``) when the caller is jacgrad's code.

``install(monkeypatch)`` puts it in ``sys.modules`` and routes jacgrad's CUDA kernels (the
elementwise ones, the norm layers' ``jacgrad.cuda.norm_kernels`` and attention's softmax and its
Jacobian, ``jacgrad.cuda.softmax_kernels``) and its direct cuBLAS path to
their NumPy versions, so whole reports run on fake device arrays.
Its only stream is ``cuda.get_current_stream()``, whose ``record``/``wait_event`` (what a compiled
step orders its calls with) do nothing; it has no graphs or RawModule: for recording and failing
GPU plumbing calls (CUDA graphs, kernel modules), see ``fake_cupy_calls.py``.
"""

from __future__ import annotations

import collections
import functools
import sys
import types

import numpy as np


class _FakeDevice:
    """GPU 0, usable as ``with array.device:`` (what a compiled step does), as CuPy's ``Device``."""

    id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeStream:
    """The current stream: events are recorded and waited for in order, so nothing to do."""

    def record(self):
        return object()

    def wait_event(self, event):
        pass


class FakeArray(np.ndarray):
    """A NumPy array that says it lives in ``cupy`` and counts its transfers to the host."""

    _fake = None  # the FakeCupy that counts, set by FakeCupy.__init__
    device = _FakeDevice()

    def __array_wrap__(self, arr, context=None, return_scalar=False):
        return np.asarray(arr).view(FakeArray)  # 0-d results stay device arrays, as in CuPy

    def __getitem__(self, key):
        out = super().__getitem__(key)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(FakeArray)

    def _count(self, what: str) -> None:
        frame = sys._getframe(2)
        name = frame.f_globals.get("__name__", "")
        if name.startswith("jacgrad"):
            FakeArray._fake.transfers += 1
            FakeArray._fake.where[f"{name}:{frame.f_lineno} {what}"] += 1

    def get(self):
        self._count("get")
        return np.array(self.view(np.ndarray))

    def __float__(self):
        self._count("float")
        return float(self.view(np.ndarray))

    def __int__(self):
        self._count("int")
        return int(self.view(np.ndarray))

    def __index__(self):
        self._count("index")
        return self.view(np.ndarray).__index__()

    def __bool__(self):
        self._count("bool")
        return bool(self.view(np.ndarray))

    def item(self, *args):
        self._count("item")
        return self.view(np.ndarray).item(*args)

    def tolist(self):
        self._count("tolist")
        return self.view(np.ndarray).tolist()


FakeArray.__module__ = "cupy"


def _wrap(value):
    if isinstance(value, np.ndarray):
        return value.view(FakeArray)
    if isinstance(value, (tuple, list)):
        return type(value)(_wrap(v) for v in value)
    if isinstance(value, np.generic):
        return np.asarray(value).view(FakeArray)
    return value


def _plain(value):
    if isinstance(value, FakeArray):
        return value.view(np.ndarray)
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    return value


def _device_function(fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        return _wrap(fn(*args, **kwargs))

    return call


def _namespace(name: str, source) -> types.ModuleType:
    mod = types.ModuleType(name)

    def getattr_(attr):
        value = getattr(source, attr)
        if isinstance(value, types.ModuleType):
            return _namespace(f"{name}.{attr}", value)
        if callable(value) and not isinstance(value, (type, np.ufunc)):
            return _device_function(value)
        return value

    mod.__getattr__ = getattr_
    return mod


class FakeCupy:
    def __init__(self):
        self.transfers = 0
        self.where: collections.Counter = collections.Counter()
        self.module = _namespace("cupy", np)
        self.module.ndarray = FakeArray
        self.module.asnumpy = lambda a: np.array(_plain(a))
        self.module.cuda = types.SimpleNamespace(get_current_stream=_FakeStream)
        FakeArray._fake = self

    def asarray(self, a):
        return np.array(a).view(FakeArray)

    def reset(self) -> None:
        self.transfers = 0
        self.where.clear()


def install(monkeypatch) -> FakeCupy:
    """The fake as ``sys.modules["cupy"]``, with jacgrad's kernels and GEMM on their NumPy paths."""
    import jacgrad.cuda.gemm as gemm
    import jacgrad.protocol.passes as passes
    import jacgrad.cuda.kernels as kernels
    import jacgrad.cuda.norm_kernels as norm_kernels
    import jacgrad.cuda.softmax_kernels as softmax_kernels

    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake.module)
    monkeypatch.setattr(gemm, "_direct", [])  # no direct_cublas() block open: GEMMs go through xp.matmul
    for name in ("scale_cotangent", "derivative", "activation_forward", "bias_activation_forward",
                 "forward_with_derivative", "special"):
        original = getattr(kernels, name)

        def on_numpy(*args, _original=original, **kwargs):
            if not any(isinstance(a, FakeArray) for a in list(args) + list(kwargs.values())):
                return _original(*args, **kwargs)
            return _wrap(_original(*_plain(list(args)), **{k: _plain(v) for k, v in kwargs.items()}))

        monkeypatch.setattr(kernels, name, on_numpy)
        if hasattr(passes, name):
            monkeypatch.setattr(passes, name, on_numpy)
        for mod in [m for n, m in sys.modules.items() if n.startswith("jacgrad.") and m is not None]:
            if getattr(mod, name, None) is original:  # every module that imported it by name (network.cache)
                monkeypatch.setattr(mod, name, on_numpy)
    for name, fn in _norm_steps_on_numpy().items():  # the norm layers' kernels (jacgrad.cuda.norm_kernels)
        monkeypatch.setattr(norm_kernels, name, _routed(fn))
    monkeypatch.setattr(softmax_kernels, "softmax_jvp", _routed(_softmax_jvp_on_numpy))
    monkeypatch.setattr(softmax_kernels, "softmax_rows", _routed(_softmax_rows_on_numpy))
    return fake


def _softmax_rows_on_numpy(S, scale, causal, key_padding_mask=None, out=None):
    """``jacgrad.cuda.softmax_kernels.softmax_rows`` by its NumPy reference (attention_factor._softmax_rows)."""
    from jacgrad.tokens.attention_factor import _softmax_rows

    if out is None:
        return _softmax_rows(S.copy(), scale, causal, key_padding_mask)
    if out is not S:
        out[...] = S
    return _softmax_rows(out, scale, causal, key_padding_mask)


def _softmax_jvp_on_numpy(P, v, out=None):
    """``jacgrad.cuda.softmax_kernels.softmax_jvp`` by its NumPy reference (attention_factor._softmax_jvp)."""
    from jacgrad.tokens.attention_factor import _softmax_jvp

    if out is None:
        return _softmax_jvp(P, v.copy())
    if out is not v:
        out[...] = v
    return _softmax_jvp(P, out)


def _routed(fn):
    """``fn`` on the NumPy views of fake device arrays (outputs written through them), results wrapped."""
    def call(*args, **kwargs):
        return _wrap(fn(*_plain(list(args)), **{k: _plain(v) for k, v in kwargs.items()}))

    return call


def _norm_steps_on_numpy() -> dict:
    """``jacgrad.cuda.norm_kernels``' three steps computed by the NumPy reference they are tested against
    (``jacgrad.nn.layers``' norm layers and ``jacgrad.algebra.factors.NormFactor`` on NumPy arrays)."""
    from jacgrad.algebra import factors
    from jacgrad.nn import layers

    def layer(gamma, with_beta, eps=1e-5):
        return layers.LayerNorm(gamma, np.zeros_like(gamma), eps) if with_beta else layers.RMSNorm(gamma, eps)

    def forward(x, gamma, beta, eps, centered, out=None):
        norm = layers.LayerNorm(gamma, beta, eps) if centered else layers.RMSNorm(gamma, eps)
        bufs = None if out is None else list(out) + [np.empty((x.shape[0], 1), x.dtype)]
        y, (xhat, inv) = norm.forward(x, out=bufs)
        return y, xhat, inv

    def project(a, xhat, gamma, inv, centered, transpose, stack=False, out=None):
        F = factors.NormFactor(gamma, inv, xhat, centered)
        res = getattr(F, ("vjp" if transpose else "jvp") + ("_stack" if stack else ""))(a)
        if out is not None:
            out[...] = res
            return out
        return res

    def backward(g, xhat, inv, gamma, centered, dgamma, dbeta=None, sq=None, input_grad=True, dx_out=None):
        grads = [dgamma] + ([] if dbeta is None else [dbeta])
        dx = layer(gamma, dbeta is not None).backward((xhat, inv), g, grads, input_grad, sq=sq)[0]
        if dx_out is not None and dx is not None:
            dx_out[...] = dx
            return dx_out
        return dx

    return {"forward": forward, "project": project, "backward": backward}

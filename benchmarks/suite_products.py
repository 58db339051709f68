"""The ``products`` section of ``gpu_suite.py``: every product and layer built since the first H100
run, on the device, each validated against the same call in float64 NumPy and timed against the
peers that are importable (torch CUDA through ``torch.func``, Opacus for the private step, JAX jit
and neural-tangents for the NTK of a ReLU FCN).

Nets, each built ONCE in torch (float64, seeded) and read by ``jg.Sequential.from_torch``: the
device net from the float32 CUDA copy (the torch peer is that very module), the reference from the
float64 module on the host — the same numbers, rounded to float32 on the device:

- ``cnn``: Conv2d(3→16, 3×3, same) ReLU, MaxPool2d(2), Conv2d(16→16, groups 2) ReLU,
  AdaptiveAvgPool2d(1), Flatten, Linear(16→10) — the im2col GEMMs (through ``jacgrad.cuda.gemm``),
  the pools, the convolution leaves;
- ``transformer``: Embedding, a pre-norm residual attention block (MultiheadAttention: the fused
  softmax-Jacobian kernel), a residual GELU MLP block, Linear — token batches ``(B, T)``.

Rows (op, net): ``forward``, ``loss_and_grads``, ``per_sample_grad_norms`` (peer: ``vmap(grad)``
and the norms), ``per_sample_grads`` (peer: ``vmap(grad)``), ``ggn_vp``, ``ntk`` (peer:
``vmap(jacrev)`` contracted), ``jacobian_chain`` (cnn; peer ``vmap(jacrev)``), ``private step``
(``clipped_grad`` without noise; peer Opacus' ``GradSampleModule`` + clipping, when importable),
``compiled step`` and ``compiled private step`` (``net.compile(B)``, ``clip=1.0``), ``compiled <product>``
(``net.compile(B, product=...)``; grad norms timed against ``vmap(grad)``), on both nets (the
transformer's with ``tokens=T``), each tagged ``captured``/``capture_error`` after it ran; the kernels:
``softmax_jvp`` and ``softmax_rows`` (``kernels/softmax.cu``, the softmax Jacobian's product and
attention's masked forward softmax) against float64 and the unfused expressions they replaced;
the spectra: ``singular_values(method="gram")`` (one batched eigensolve) against the SVD, both timed,
the error as max |Δσ| / σ_max (the gram path's documented floor: ~sqrt(eps)); ``ntk`` of a
3 × 2048 ReLU FCN (N = 16, O = 8: the issue's target) against JAX jit and neural-tangents'
structured derivatives when importable.

Tolerance: relative Frobenius error ≤ 1e-4 float32 (these nets chain more rounding than the blocks
section's), ≤ 1e-10 float64; a failed check or an exception is a failed row, not a stopped
section. The dry run (``--dry-run-cpu``) runs it all on NumPy with tiny sizes, torch on the CPU.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np

import jacgrad as jg
from suite_device import Device, _frobenius_error
from suite_ntk import fcn_ntk_rows
from suite_blocks import _torch_sync as _sync
from suite_torch_peers import opacus_peer as _opacus_peer, torch_peers as _torch_peers

TOL = {"float32": 1e-4, "float64": 1e-10}
GPU = dict(cnn=dict(B=64, hw=32), transformer=dict(B=32, T=64, d=64, V=100), fcn=dict(N=16, width=2048, O=8, n_in=64),
           softmax=dict(rows=64 * 8 * 256, n=256), spectra=dict(B=256, m=32, n=128))
DRY = dict(cnn=dict(B=4, hw=8), transformer=dict(B=3, T=5, d=8, V=11), fcn=dict(N=4, width=16, O=3, n_in=5),
           softmax=dict(rows=24, n=7), spectra=dict(B=5, m=3, n=6))
COMPILED_PRODUCTS = ("grad_norms", "ntk", "ggn_vp")


def products(dev: Device) -> dict:
    rows: list[dict] = []
    sizes = GPU if dev.gpu else DRY
    try:
        import torch
    except ImportError:
        return {"rows": [], "ok": True, "note": "torch is not importable: the nets are built in torch; section skipped"}
    for kind in ("cnn", "transformer"):
        try:
            _net_rows(rows, dev, torch, kind, sizes[kind])
        except Exception as exc:  # noqa: BLE001 - a net that cannot be built is one failed row
            _fail(rows, "build", kind, exc)
        dev.free()
    _softmax_rows(rows, dev, sizes["softmax"])
    _spectra_rows(rows, dev, sizes["spectra"])
    fcn_ntk_rows(rows, dev, sizes["fcn"], _row)
    return {"rows": rows, "tol": TOL, "ok": all(r["ok"] or r.get("skipped") for r in rows)}


# ---------------------------------------------------------------------- rows
def _fail(rows: list, op: str, net: str, exc: Exception) -> None:
    r = {"op": op, "net": net, "dtype": "float32", "rel_err": float("inf"), "ok": False,
         "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    rows.append(r)
    _log(r)


def _row(rows: list, dev: Device, op: str, net: str, got, want, peers: dict | None = None, on_dev=None,
         tol: float | None = None, dtype: str = "float32", error=_frobenius_error, after=None, **tags) -> None:
    """Validate ``got()`` (arrays) against ``want()`` (float64), time ``on_dev or got`` and each
    peer (name → callable, None where not importable: noted); ``after()``: tags read once it has run
    (a compiled step's ``captured``/``capture_error``, known after its first call)."""
    r = {"op": op, "net": net, "dtype": dtype, "tol": TOL[dtype] if tol is None else tol, **tags}
    fast = {} if dev.gpu else {"repeats": 1, "min_time": 0.0}
    try:
        pairs = list(zip(got(), want(), strict=True))
        r["rel_err"] = max(error(a, b) for a, b in pairs)
        r["ok"] = bool(r["rel_err"] <= r["tol"])
        r["ms"] = dev.time(on_dev or got, **{"repeats": 5, **fast})["median_ms"]
        if after is not None:
            r.update(after())
        for name, fn in (peers or {}).items():
            if fn is None or isinstance(fn, str):
                r.setdefault("peers_missing", {})[name] = fn or "not importable"
                continue
            try:
                ms = dev.time(fn, **{"repeats": 5, **fast})["median_ms"]
                r.setdefault("peers", {})[name] = {"ms": ms, "speedup": ms / r["ms"]}
            except Exception as exc:  # noqa: BLE001 - the peer's failure is noted, jacgrad's row stands
                r.setdefault("peers_missing", {})[name] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a failed op is a failed row
        r.update(rel_err=float("inf"), ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
    rows.append(r)
    _log(r)


def _log(r: dict) -> None:
    peers = ", ".join(f"{k} {v['ms']:.3g} ms" for k, v in (r.get("peers") or {}).items())
    print(f"[products] {r['op']} | {r['net']} | rel. err. {r['rel_err']:.2e} ({'ok' if r['ok'] else 'FAILED'}) | "
          f"ms {r.get('ms')} | {peers} {r.get('error', '')}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the nets
def _torch_model(torch, kind: str, s: dict):
    nn = torch.nn
    torch.manual_seed(0)
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(16, 16, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(16, 10)).double()
    from jacgrad.io.interop.torch_blocks import Residual

    d = s["d"]
    return nn.Sequential(nn.Embedding(s["V"], d),
                         Residual(nn.Sequential(nn.LayerNorm(d), nn.MultiheadAttention(d, 4, batch_first=True))),
                         Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))),
                         nn.Linear(d, 3)).double()


def _inputs(kind: str, s: dict):
    rng = np.random.default_rng(5)
    if kind == "cnn":
        x = rng.standard_normal((s["B"], 3, s["hw"], s["hw"])).astype(np.float32)
        return x, (0.5 * rng.standard_normal((s["B"], 10))).astype(np.float32), (3, s["hw"], s["hw"])
    x = rng.integers(0, s["V"], (s["B"], s["T"]))
    return x, (0.5 * rng.standard_normal((s["B"], s["T"], 3))).astype(np.float32), None


def _net_rows(rows: list, dev: Device, torch, kind: str, s: dict) -> None:
    model64 = _torch_model(torch, kind, s)
    device = "cuda" if dev.gpu else "cpu"
    model = _torch_model(torch, kind, s).float().to(device)
    model.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    model.eval()
    x, t, in_shape = _inputs(kind, s)
    kw = {} if in_shape is None else {"in_shape": in_shape}
    net = jg.Sequential.from_torch(model, **kw)
    ref = jg.Sequential.from_torch(model64, **kw)
    x64 = x if kind == "transformer" else x.astype(np.float64)
    t64 = t.astype(np.float64)
    xd, td = dev.put(x), dev.put(t)
    v = np.random.default_rng(7).standard_normal(ref.n_params)
    vd = dev.put(v, "float32")
    label = f"{kind} B={s['B']}"
    xt = torch.as_tensor(x, device=device)
    tt = torch.as_tensor(t, device=device)
    # torch's MultiheadAttention takes (q, k, v): the transformer's torch module is jacgrad's reading of
    # it, not a callable model, so only the cnn has torch peers
    peers = _torch_peers(torch, model, xt, tt) if kind == "cnn" else {}
    no_peer = "the torch module is not callable as one model (MultiheadAttention takes q, k, v)"
    n_ntk = min(4, s["B"])

    _row(rows, dev, "forward", label, lambda: [net.forward(xd)[0]], lambda: [ref.forward(x64)[0]],
         {"torch": _sync(torch, lambda: model(xt)) if kind == "cnn" else no_peer})
    _row(rows, dev, "loss_and_grads", label, lambda: list(_lg(net, xd, td)), lambda: list(_lg(ref, x64, t64)))
    _row(rows, dev, "per_sample_grad_norms", label, lambda: [net.per_sample_grad_norms(xd, td)],
         lambda: [ref.per_sample_grad_norms(x64, t64)], {"torch.func vmap(grad)+norm": peers.get("norms", no_peer)})
    _row(rows, dev, "per_sample_grads", label, lambda: [net.per_sample_grads(xd, td).flat],
         lambda: [ref.per_sample_grads(x64, t64).flat], {"torch.func vmap(grad)": peers.get("grads", no_peer)})
    _row(rows, dev, "ggn_vp", label, lambda: [net.ggn_vp(xd, vd, target=td)], lambda: [ref.ggn_vp(x64, v, target=t64)])
    _row(rows, dev, "ntk", f"{kind} N={n_ntk}", lambda: [jg.ntk(net, xd[:n_ntk])], lambda: [jg.ntk(ref, x64[:n_ntk])])
    _row(rows, dev, "private step (clipped_grad, no noise)", label,
         lambda: [net.clipped_grad(xd, td, max_norm=1.0).grads.flat],
         lambda: [ref.clipped_grad(x64, t64, max_norm=1.0).grads.flat], {"opacus": _opacus_peer(torch, model, xt, tt) if kind == "cnn" else no_peer})
    if kind == "cnn":
        _row(rows, dev, "jacobian_chain (auto)", label, lambda: [net.jacobian_chain(net.forward(xd)[1]).jacobian()],
             lambda: [ref.jacobian_chain(ref.forward(x64)[1]).jacobian()], {"torch.func vmap(jacrev)": peers.get("jac")})
    _compiled_rows(rows, dev, net, ref, xd, td, x64, t64, label, {} if kind == "cnn" else {"tokens": s["T"]},
                   {"torch.func vmap(grad)+norm": peers.get("norms", no_peer)})


def _lg(net, x, t):
    loss, g = net.loss_and_grads(x, t, input_grad=False)
    return loss, g.flat


def _captured(step):
    """The tags of a compiled step once it has run: whether it replays a CUDA graph, and why not."""
    return lambda: {"captured": bool(getattr(step, "captured", False)),
                    "capture_error": str(getattr(step, "capture_error", "") or "")}


def _compiled_rows(rows, dev, net, ref, xd, td, x64, t64, label, kw, norm_peers) -> None:
    """The compiled training step, private step and products (``kw``: ``tokens=T`` for token batches),
    each with whether it recorded a graph (read after its first calls)."""
    B = int(xd.shape[0])
    for op, make, got, want in [
        ("compiled step", lambda: net.compile(B, **kw), lambda s: [s(xd, td, copy=True)[1].flat],
         lambda: [_lg(ref, x64, t64)[1]]),
        ("compiled private step (no noise)", lambda: net.compile(B, clip=1.0, **kw),
         lambda s: [s(xd, td, copy=True)[1].grads.flat], lambda: [ref.clipped_grad(x64, t64, max_norm=1.0).grads.flat]),
    ]:
        try:
            step = make()
        except Exception as exc:  # noqa: BLE001
            _fail(rows, op, label, exc)
            continue
        _row(rows, dev, op, label, lambda s=step, g=got: g(s), want, after=_captured(step))
    for product in COMPILED_PRODUCTS:
        op = f"compiled {product}"
        try:
            step = net.compile(B, product=product, **kw)
        except TypeError as exc:
            if "product" not in str(exc):
                raise
            rows.append({"op": op, "net": label, "dtype": "float32", "rel_err": 0.0, "ok": True, "skipped": True,
                         "note": "net.compile(B, product=...) is not in this checkout"})
            _log(rows[-1])
            continue
        except Exception as exc:  # noqa: BLE001
            _fail(rows, op, label, exc)
            continue
        want = {"grad_norms": lambda: [ref.per_sample_grad_norms(x64, t64)], "ntk": lambda: [jg.ntk(ref, x64)],
                "ggn_vp": lambda: [ref.ggn_vp(x64, np.ones(ref.n_params))]}[product]  # mse: G does not read the target
        args = {"grad_norms": (xd, td), "ntk": (xd,), "ggn_vp": (xd, dev.put(np.ones(ref.n_params), "float32"))}
        _row(rows, dev, op, label, lambda s=step, a=args[product]: [s(*a)], want,
             norm_peers if product == "grad_norms" else None, after=_captured(step))


def _softmax_rows(rows: list, dev: Device, s: dict) -> None:
    from jacgrad.tokens.attention_factor import _softmax_jvp

    rng = np.random.default_rng(9)
    a = rng.standard_normal((s["rows"], s["n"])) * 3
    P = np.exp(a - a.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    v = rng.standard_normal((s["rows"], s["n"]))
    want = P * (v - (P * v).sum(axis=1, keepdims=True))  # (diag(p) − ppᵀ)v in float64
    for dtype in ("float32", "float64"):
        Pd, vd = dev.put(P, dtype), dev.put(v, dtype)
        scratch = dev.xp.empty_like(vd)
        xp = dev.xp

        def fused():
            scratch[...] = vd
            return [_softmax_jvp(Pd, scratch)]

        def unfused():
            w = vd - (Pd * vd).sum(axis=-1, keepdims=True)
            return w * Pd

        _row(rows, dev, "softmax_jvp (kernels/softmax.cu)", f"{s['rows']} rows of {s['n']}", fused, lambda: [want],
             {"unfused CuPy expression": unfused if xp is not np else "NumPy: the reference itself"}, dtype=dtype,
             tol=TOL[dtype] / 10)
    _softmax_forward_rows(rows, dev, s)


def _softmax_forward_rows(rows: list, dev: Device, s: dict) -> None:
    """Attention's forward softmax (``softmax_rows``: scale, causal and key-padding masks, normalise) on
    ``(rows/n, 1, n, n)`` scores (``(B, h, T, T)``) against float64, timed against the array expression it replaced."""
    from jacgrad.tokens.attention_factor import _softmax_rows, attention_mask

    rng = np.random.default_rng(10)
    n = s["n"]
    S = rng.standard_normal((s["rows"] // n, 1, n, n)) * 3
    pad = rng.random((S.shape[0], n)) < 0.2
    scale = 0.125
    want = _softmax_rows(S.copy(), scale, True, pad)
    for dtype in ("float32", "float64"):
        Sd, padd = dev.put(S, dtype), dev.xp.asarray(pad)
        scratch = dev.xp.empty_like(Sd)
        xp = dev.xp

        def fused():
            scratch[...] = Sd
            return [_softmax_rows(scratch, scale, True, padd)]

        def unfused():  # attention_weights' lines before the kernel: the mask array, 12 kernels
            mask = attention_mask(xp, Sd.shape[0], n, True, padd)
            P = xp.where(mask, -xp.inf, Sd * scale)
            m = P.max(axis=-1, keepdims=True)
            P -= xp.where(xp.isfinite(m), m, 0.0)
            xp.exp(P, out=P)
            t = P.sum(axis=-1, keepdims=True)
            P /= xp.where(t > 0, t, 1.0)
            return P

        _row(rows, dev, "softmax_rows (kernels/softmax.cu)", f"{S.shape[0]} × 1 × ({n} × {n}), causal + padding", fused,
             lambda: [want], {"unfused CuPy expression": unfused if xp is not np else "NumPy: the reference itself"},
             dtype=dtype, tol=TOL[dtype] / 10)


def _spectra_rows(rows: list, dev: Device, s: dict) -> None:
    from jacgrad.algebra.spectra import singular_values

    a = np.random.default_rng(11).standard_normal((s["B"], s["m"], s["n"]))
    want = np.linalg.svd(a, compute_uv=False)

    def rel_to_top(got, ref):
        g = np.asarray(jg.to_numpy(got), dtype=np.float64)
        return float((np.abs(g - ref) / ref[:, :1]).max())

    for dtype in ("float32", "float64"):
        ad = dev.put(a, dtype)
        floor = 8 * np.sqrt(min(s["m"], s["n"]) * np.finfo(dtype).eps)
        _row(rows, dev, "singular_values(method='gram')", f"{s['B']} × ({s['m']} × {s['n']})",
             lambda: [singular_values(ad, method="gram")], lambda: [want],
             {"singular_values(method='svd')": lambda: singular_values(ad, method="svd")}, dtype=dtype, tol=floor,
             error=rel_to_top)

"""The ``norm_kernels`` section of ``gpu_suite.py``: the normalisation layers' fused kernels
(``kernels/norm.cu``) on the device, each result validated against the float64 NumPy reference
and timed as a bandwidth next to the device-to-device copy.

Per (norm, dtype, B × n) it runs the library's own calls — ``LayerNorm``/``RMSNorm``
``forward`` and ``backward`` and the factor's ``vjp``/``jvp`` — which launch the kernels on
CuPy arrays (and are NumPy in the dry run), and:

- validates y, x̂, inv, ∂x, ∂γ, ∂β and the products against the same calls on float64 NumPy
  copies (relative Frobenius error ≤ 1e-5 float32, ≤ 1e-12 float64);
- counts the bytes each step must move (inputs read once, outputs written once: 3·B·n values for
  each step, the backward's column sums fused where the row fits the registers, else g and x̂ read
  once more by the column kernel) and reports GB/s and % of copy bandwidth;
- times the unfused array expression the kernel replaces (the NumPy reference's code run on
  CuPy arrays) for the × faster column.
"""

from __future__ import annotations

import numpy as np

import jacgrad as jg
from jacgrad.cuda.norm_kernels import row_fits
from suite_device import Device, _frobenius_error

TOL = {"float32": 1e-5, "float64": 1e-12}
# (norm, dtype, B, n): a wide float32 row (the packed path), a width off the pack, short rows, float64
# (64 MiB per float32 array: well past the L2; the float64 reference on the host takes seconds)
GPU_CASES = [("layernorm", "float32", 4096, 4096), ("rmsnorm", "float32", 4096, 4096),
             ("layernorm", "float32", 16384, 1000), ("layernorm", "float32", 262144, 64),
             ("layernorm", "float64", 2048, 4096)]
DRY_CASES = [("layernorm", "float32", 16, 32), ("rmsnorm", "float64", 8, 33), ("layernorm", "float64", 4, 1)]


def norm_kernels(dev: Device, copy_gbps: float | None) -> dict:
    rows, ok = [], True
    for spec in (GPU_CASES if dev.gpu else DRY_CASES):
        case_rows = _case(dev, *spec, copy_gbps)
        ok &= all(r["ok"] for r in case_rows)
        rows += case_rows
        dev.free()
    return {"copy_GB_per_s": copy_gbps, "rows": rows, "ok": ok}


def _layer(kind: str, gamma, beta):
    return jg.layers.LayerNorm(gamma, beta) if kind == "layernorm" else jg.layers.RMSNorm(gamma)


def _case(dev: Device, kind: str, dtype: str, B: int, n: int, copy_gbps: float | None) -> list[dict]:
    xp = dev.xp
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(shape) for k, shape in
            (("x", (B, n)), ("g", (B, n)), ("u", (B, n)), ("gamma", (n,)), ("beta", (n,)))}
    host["x"] = host["x"] * 3 + 1
    d = {k: dev.put(v, dtype) for k, v in host.items()}
    ref = {k: np.asarray(v, dtype=dtype).astype(np.float64) for k, v in host.items()}  # the same inputs, in f64
    L, L64 = _layer(kind, d["gamma"], d["beta"]), _layer(kind, ref["gamma"], ref["beta"])
    y64, st64 = L64.forward(ref["x"])
    F64 = L64.factor(st64)
    npar = len(L.params)
    g64 = [np.empty(n) for _ in range(npar)]
    dx64, _ = L64.backward(st64, ref["g"], g64)
    item = np.dtype(dtype).itemsize
    size = B * n * item
    out = []

    def row(step, fn, nbytes, results, want, unfused=None):
        t = dev.time(fn, repeats=5)
        errs = [_frobenius_error(r, w) for r, w in zip(results, want)]
        r = {"norm": kind, "step": step, "dtype": dtype, "B": B, "n": n, **t,
             "GB_per_s": nbytes / (t["median_ms"] * 1e-3) / 1e9, "rel_err": max(errs), "tol": TOL[dtype]}
        r["ok"] = bool(r["rel_err"] <= TOL[dtype])
        if copy_gbps:
            r["pct_of_copy"] = 100 * r["GB_per_s"] / copy_gbps
        if unfused is not None:
            u = dev.time(unfused, repeats=5)
            r["unfused_ms"] = u["median_ms"]
            r["speedup_vs_unfused"] = u["median_ms"] / t["median_ms"]
        out.append(r)

    y, st = L.forward(d["x"])
    row("forward", lambda: L.forward(d["x"]), 3 * size + B * item + 2 * n * item,
        [y, st[0], st[1]], [y64, st64[0], st64[1]], lambda: _unfused_forward(xp, L, d["x"]))
    F = L.factor(st)
    for step, fn64 in (("vjp", F64.vjp), ("jvp", F64.jvp)):
        fn = getattr(F, step)
        scale_first = step == "vjp"
        row(f"factor {step}", lambda fn=fn: fn(d["u"]), 3 * size + n * item + B * item, [fn(d["u"])],
            [fn64(ref["u"])], lambda s=scale_first: _unfused_product(F, d["u"], s))
    grads = [xp.empty(n, dtype=dtype) for _ in range(npar)]
    dx, _ = L.backward(st, d["g"], grads)
    fused = row_fits(n, item)  # the column sums in the row kernel: g and x̂ read once
    moved = (3 if fused else 5) * size + (1 + npar) * n * item + B * item
    row("backward (dx, dγ, dβ)", lambda: L.backward(st, d["g"], grads), moved,
        [dx, *grads], [dx64, *g64])
    return out


def _unfused_forward(xp, L, x):
    """What the forward kernel replaces: the NumPy reference's expressions, one array op each."""
    xc = x - x.mean(axis=1, keepdims=True) if L.centered else x
    inv = 1.0 / xp.sqrt((xc * xc).mean(axis=1) + L.eps)
    xhat = xc * inv[:, None]
    return xhat * L.gamma + (L.beta if L.centered else 0.0), xhat, inv


def _unfused_product(F, a, scale_first: bool):
    """What the product kernel replaces: the projection ``P`` as array expressions, one op each
    (``a − (a·x̂)x̂/n − mean(a)``), on the device's arrays, before or after the scale ``γ·inv``."""
    def project(t):
        n = max(F.h_in, 1)
        out = t - (t * F.xhat).sum(axis=-1, keepdims=True) * (F.xhat / n)
        if F.centered:
            out -= t.mean(axis=-1, keepdims=True)
        return out

    return project(a * F.scale) if scale_first else project(a) * F.scale

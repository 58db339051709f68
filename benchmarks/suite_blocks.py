"""The ``blocks`` section of ``gpu_suite.py``: ``jg.Sequential`` (residual blocks, LayerNorm and
RMSNorm, issue 13) on the device, every result validated against the same net in float64 NumPy
and timed against NumPy (same dtype, on the host) and, where cheap, torch (``net.to_torch()``).

Nets: ``Dense(H, H, tanh)``, K pre-norm residual blocks ``z + 0.5·Dense(Dense(Norm(z), tanh))``
(the norm alternating LayerNorm / RMSNorm, 2 dense layers of H × H each), ``Dense(H, n_out)``.
On the GPU: float32 at B=256, 4 blocks of 2×1024 (the passes, the Jacobians, the compiled step)
at B=64, 2 blocks of 2×256 (the parameter-space products, whose per-sample results are
B × n_params) and at B=32, 2 blocks of 2×128 (``gradient_flow``, exact spectra per sample and
block); float64 at the small sizes for everything. Sized for the section's 60 s floor (not yet run on a
GPU; this plan with NumPy standing in for the device and one timing repeat took 31 s on a loaded
2-core CPU, where the float64 references and the NumPy timings are the host's share). The same parameter-space products run on a plain ``jg.MLP`` too.

Rows (op, dtype, net): ``forward``, ``loss_and_grads`` (loss, ∂θ in ``g.flat``, ∂x),
``jacobian_chain`` (per-sample Jacobians, auto order), ``compiled step`` (``net.compile(B,
capture="auto")``: the first call and two replays with new batches; the row says whether a CUDA
graph was recorded and, if not, why), ``compiled jacobian`` (``net.compile_jacobian(B)``, the same
three calls against the float64 eager Jacobian), ``per_sample_grad_norms``, ``per_sample_grads``, ``ggn_vp``,
``ggn_diagonal``, ``ntk``, ``gradient_flow`` (the exact numbers of the block report: loss, each
block's ‖∂θ‖ and bound, and χ and ‖J‖₂ where exact). Relative Frobenius error
‖a − ref‖_F / ‖ref‖_F, the worst over a row's arrays, ≤ 1e-5 (float32) or ≤ 1e-11 (float64).
Times: median ms on the device, the same call on NumPy arrays of the same dtype (× faster than
NumPy), and torch's equivalent on the same device (× faster than torch: eager forward, a training
step ``zero_grad; mse; backward`` against ``loss_and_grads`` and the compiled step, and
``vmap(jacrev)`` against the Jacobians). The whole section runs in its own process (a capture
can crash it); a failed check or an exception in one op is a failed row, not a stopped section.
Each row is also printed to stderr as it is done, so the rows before a crash are in suite.log.
"""

from __future__ import annotations

import sys
import traceback

import numpy as np

import jacgrad as jg
from suite_device import Device, _frobenius_error

TOL = {"float32": 1e-5, "float64": 1e-11}
BIG, SMALL = dict(B=256, H=1024, blocks=4, n_out=10), dict(B=64, H=256, blocks=2, n_out=10)
FLOW = dict(B=32, H=128, blocks=2, n_out=10)  # gradient_flow: exact spectra per sample and block (host: ~1 s)
DRY_BIG, DRY_SMALL = dict(B=8, H=16, blocks=2, n_out=3), dict(B=4, H=8, blocks=2, n_out=3)
# (dtype, net for the passes / Jacobians / compiled step, for the parameter-space products, for gradient_flow)
GPU_PLAN = [("float32", BIG, SMALL, FLOW), ("float64", SMALL, SMALL, FLOW)]
DRY_PLAN = [("float32", DRY_BIG, DRY_SMALL, DRY_SMALL), ("float64", DRY_SMALL, DRY_SMALL, DRY_SMALL)]
REPEATS = 5


def blocks(dev: Device) -> dict:
    rows: list[dict] = []
    host = Device("cpu")
    for dtype, big, small, flow in (GPU_PLAN if dev.gpu else DRY_PLAN):
        rows += _passes(dev, host, dtype, big)
        rows += _param_space(dev, host, dtype, small, "sequential")
        rows += _param_space(dev, host, dtype, small, "mlp")
        rows += _flow(dev, host, dtype, flow)
        dev.free()
    return {"rows": rows, "tol": TOL, "ok": all(r["ok"] for r in rows)}


# ---------------------------------------------------------------------- nets and inputs
def _net(spec: dict, to, kind: str = "sequential"):
    """The section's net with parameters ``to(float64 array)``; the same numbers for every ``to``."""
    rng = np.random.default_rng(13)
    H, L = spec["H"], jg.layers
    W = lambda a, b: to(rng.standard_normal((a, b)) / np.sqrt(a))  # noqa: E731
    b = lambda n: to(0.1 * rng.standard_normal(n))  # noqa: E731
    if kind == "mlp":
        widths = [H] * (2 * spec["blocks"] + 2) + [spec["n_out"]]
        return jg.MLP([W(m, n) for m, n in zip(widths, widths[1:])], [b(n) for n in widths[1:]],
                      ["tanh"] * (len(widths) - 2) + ["identity"])
    layers = [L.Dense(W(H, H), b(H), "tanh")]
    for k in range(spec["blocks"]):
        gamma = to(1 + 0.2 * rng.standard_normal(H))
        norm = L.LayerNorm(gamma, b(H)) if k % 2 == 0 else L.RMSNorm(gamma)
        layers.append(L.Residual([norm, L.Dense(W(H, H), b(H), "tanh"), L.Dense(W(H, H), b(H))], scale=0.5))
    layers.append(L.Dense(W(H, spec["n_out"]), b(spec["n_out"])))
    return jg.Sequential(layers)


def _trio(dev: Device, dtype: str, spec: dict, kind: str = "sequential"):
    """(device net in dtype, host net in dtype, float64 reference) with the same dtype-rounded numbers."""
    return (_net(spec, lambda a: dev.put(a, dtype), kind), _net(spec, lambda a: np.asarray(a, dtype), kind),
            _net(spec, lambda a: np.asarray(a, dtype).astype(np.float64), kind))


def _data(spec: dict, dtype: str, seed: int) -> dict:
    """x (B, H), t (B, n_out), rounded to dtype (float64 references upcast them)."""
    rng = np.random.default_rng(seed)
    return {"x": np.asarray(rng.standard_normal((spec["B"], spec["H"])), dtype),
            "t": np.asarray(0.5 * rng.standard_normal((spec["B"], spec["n_out"])), dtype)}


def _label(spec: dict, kind: str = "sequential") -> str:
    if kind == "mlp":
        return f"MLP B={spec['B']}, {2 * spec['blocks'] + 2}×{spec['H']} tanh"
    return f"Sequential B={spec['B']}, {spec['blocks']} blocks of 2×{spec['H']}"


# ---------------------------------------------------------------------- one row
def _row(rows: list, dev: Device, host: Device, op: str, dtype: str, net: str, got, want, on_dev=None,
         on_host=None, torch_fn=None, **tags) -> None:
    """Validate ``got()`` (a list of arrays) against ``want()`` (float64), then time ``on_dev``
    (default: ``got``), ``on_host`` and ``torch_fn``. An exception is a failed row with its error."""
    r = {"op": op, "dtype": dtype, "net": net, "tol": TOL[dtype], **tags}
    try:
        pairs = list(zip(got(), want(), strict=True))
        r["rel_err"] = max(_frobenius_error(a, b) for a, b in pairs)
        r["ok"] = bool(r["rel_err"] <= TOL[dtype])
        fast = {} if dev.gpu else {"repeats": 1, "min_time": 0.0}  # the dry run: the code path, not numbers
        r["ms"] = dev.time(on_dev or got, **{"repeats": REPEATS, **fast})["median_ms"]
        if on_host is not None:
            r["numpy_ms"] = host.time(on_host, repeats=3 if dev.gpu else 1, min_time=0.0)["median_ms"]
            r["speedup_vs_numpy"] = r["numpy_ms"] / r["ms"]
        if torch_fn is not None:
            try:
                r["torch_ms"] = dev.time(torch_fn, **{"repeats": REPEATS, **fast})["median_ms"]
                r["speedup_vs_torch"] = r["torch_ms"] / r["ms"]
            except Exception as exc:  # noqa: BLE001 - the peer's failure is noted, jacgrad's row stands
                r["torch_error"] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a failed op is a failed row
        r.update(rel_err=float("inf"), ok=False, error=f"{type(exc).__name__}: {exc}",
                 traceback=traceback.format_exc())
    rows.append(r)
    _log(r)


def _log(r: dict) -> None:
    """One line per row on stderr, flushed: kept in suite.log even if a later op (a capture)
    takes the process down before the section's JSON is written."""
    print(f"[blocks] {r['op']} | {r['net']} | {r['dtype']} | rel. err. {r['rel_err']:.2e} "
          f"({'ok' if r['ok'] else 'FAILED'}) | ms {r.get('ms')} | numpy_ms {r.get('numpy_ms')} | "
          f"torch_ms {r.get('torch_ms')} {r.get('error', '')}", file=sys.stderr, flush=True)


def _torch(net):
    """(torch module of ``net`` on its device, torch) or None where torch is missing or fails."""
    try:
        import torch

        return net.to_torch(), torch
    except Exception:  # noqa: BLE001 - no torch on this machine: no torch column
        return None


def _torch_sync(torch, fn):
    def run():
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return run


# ---------------------------------------------------------------------- the ops
def _passes(dev: Device, host: Device, dtype: str, spec: dict) -> list[dict]:
    rows: list[dict] = []
    net, hnet, ref = _trio(dev, dtype, spec)
    data = _data(spec, dtype, 1)
    x, t = dev.put(data["x"]), dev.put(data["t"])
    x64, t64 = data["x"].astype(np.float64), data["t"].astype(np.float64)
    label = _label(spec)
    peer = _torch(net)
    tf = {}
    if peer is not None:
        tnet, torch = peer
        xt = torch.as_tensor(data["x"], device=next(tnet.parameters()).device)
        tt = torch.as_tensor(data["t"], device=xt.device)

        def tstep():
            tnet.zero_grad(set_to_none=True)
            xg = xt.detach().requires_grad_(True)
            loss = torch.nn.functional.mse_loss(tnet(xg), tt)
            loss.backward()
            return loss

        def tfwd():
            with torch.no_grad():
                return tnet(xt)

        tjac = torch.func.vmap(torch.func.jacrev(lambda xi: tnet(xi[None])[0]))
        tf = {"forward": _torch_sync(torch, tfwd), "step": _torch_sync(torch, tstep),
              "jacobian": _torch_sync(torch, lambda: tjac(xt))}

    _row(rows, dev, host, "forward", dtype, label, lambda: [net.forward(x)[0]], lambda: [ref.forward(x64)[0]],
         on_host=lambda: hnet.forward(data["x"]), torch_fn=tf.get("forward"))

    def grads(n, xa, ta):
        loss, g = n.loss_and_grads(xa, ta)
        return [loss, g.flat, g.input]

    _row(rows, dev, host, "loss_and_grads", dtype, label, lambda: grads(net, x, t), lambda: grads(ref, x64, t64),
         on_host=lambda: hnet.loss_and_grads(data["x"], data["t"]), torch_fn=tf.get("step"))
    _row(rows, dev, host, "jacobian_chain (auto)", dtype, label,
         lambda: [net.jacobian_chain(net.forward(x)[1]).jacobian()],
         lambda: [ref.jacobian_chain(ref.forward(x64)[1]).jacobian()],
         on_host=lambda: hnet.jacobian_chain(hnet.forward(data["x"])[1]).jacobian(), torch_fn=tf.get("jacobian"))
    _compiled(rows, dev, host, dtype, spec, net, hnet, ref, tf.get("step"))
    _compiled_jacobian(rows, dev, host, dtype, spec, net, hnet, ref, tf.get("jacobian"))
    return rows


def _compiled(rows, dev, host, dtype, spec, net, hnet, ref, torch_step) -> None:
    """``net.compile(B, capture="auto")``: its first call (eager; recording) and two replays with
    new batches, each against float64; then the replay's time."""
    label = _label(spec)
    try:
        step = net.compile(spec["B"], capture="auto")
        hstep = hnet.compile(spec["B"])
    except Exception as exc:  # noqa: BLE001 - a failed construction is a failed row
        rows.append({"op": "compiled step", "dtype": dtype, "net": label, "tol": TOL[dtype], "rel_err": float("inf"),
                     "ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        _log(rows[-1])
        return
    batches = [_data(spec, dtype, 20 + call) for call in range(3)]
    parts = []

    def got():
        out = []
        for b in batches:
            loss, g = step(dev.put(b["x"]), dev.put(b["t"]), copy=True)
            out += [loss, g.flat, g.input]
        parts.append((step.captured, step.capture_error or ""))
        return out

    def want():
        out = []
        for b in batches:
            loss, g = ref.loss_and_grads(b["x"].astype(np.float64), b["t"].astype(np.float64))
            out += [loss, g.flat, g.input]
        return out

    x, t = dev.put(batches[0]["x"]), dev.put(batches[0]["t"])
    _row(rows, dev, host, "compiled step", dtype, label, got, want, on_dev=lambda: step(x, t),
         on_host=lambda: hstep(batches[0]["x"], batches[0]["t"]), torch_fn=torch_step)
    rows[-1]["captured"], rows[-1]["capture_error"] = (parts[0] if parts else (None, ""))
    print(f"[blocks] compiled step | {label} | {dtype} | captured {rows[-1]['captured']} "
          f"{rows[-1]['capture_error']}", file=sys.stderr, flush=True)


def _compiled_jacobian(rows, dev, host, dtype, spec, net, hnet, ref, torch_jacobian) -> None:
    """``net.compile_jacobian(B, capture="auto")``: its first call (eager; recording) and two replays
    with new batches, each against the float64 eager Jacobian; then the replay's time."""
    label = _label(spec)
    batches = [_data(spec, dtype, 30 + call)["x"] for call in range(3)]
    parts = []
    try:
        step, hstep = net.compile_jacobian(spec["B"]), hnet.compile_jacobian(spec["B"])
    except Exception as exc:  # noqa: BLE001 - a failed construction is a failed row
        rows.append({"op": "compiled jacobian", "dtype": dtype, "net": label, "tol": TOL[dtype],
                     "rel_err": float("inf"), "ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()})
        _log(rows[-1])
        return

    def got():
        out = [step(dev.put(b), copy=True) for b in batches]
        parts.append((step.captured, step.capture_error or ""))
        return out

    x = dev.put(batches[0])
    _row(rows, dev, host, "compiled jacobian", dtype, label, got,
         lambda: [ref.jacobian_chain(ref.forward(b.astype(np.float64))[1]).jacobian() for b in batches],
         on_dev=lambda: step(x), on_host=lambda: hstep(batches[0]), torch_fn=torch_jacobian)
    rows[-1]["captured"], rows[-1]["capture_error"] = (parts[0] if parts else (None, ""))
    print(f"[blocks] compiled jacobian | {label} | {dtype} | captured {rows[-1]['captured']} "
          f"{rows[-1]['capture_error']}", file=sys.stderr, flush=True)


PRODUCTS = {
    "per_sample_grad_norms": lambda n, x, t, v: [n.per_sample_grad_norms(x, t)],
    "per_sample_grads": lambda n, x, t, v: [n.per_sample_grads(x, t).flat],
    "ggn_vp": lambda n, x, t, v: [n.ggn_vp(x, v, target=t)],
    "ggn_diagonal": lambda n, x, t, v: [n.ggn_diagonal(x).flat],
    "ntk": lambda n, x, t, v: [jg.ntk(n, x)],
}


def _n_params(net) -> int:
    """Parameters of a Sequential (``n_params``) or an MLP (its weights and biases)."""
    if hasattr(net, "n_params"):
        return net.n_params
    return sum(a.size for a in (*net.weights, *net.biases))


def _param_space(dev: Device, host: Device, dtype: str, spec: dict, kind: str) -> list[dict]:
    rows: list[dict] = []
    net, hnet, ref = _trio(dev, dtype, spec, kind)
    data = _data(spec, dtype, 2)
    v = np.asarray(np.random.default_rng(3).standard_normal(_n_params(ref)), dtype)
    dv = {k: dev.put(a) for k, a in (*data.items(), ("v", v))}
    label = _label(spec, kind)
    for op, fn in PRODUCTS.items():
        _row(rows, dev, host, op, dtype, label, lambda fn=fn: fn(net, dv["x"], dv["t"], dv["v"]),
             lambda fn=fn: fn(ref, data["x"].astype(np.float64), data["t"].astype(np.float64), v.astype(np.float64)),
             on_host=lambda fn=fn: fn(hnet, data["x"], data["t"], v))
    return rows


def _flow_numbers(report) -> list[np.ndarray]:
    """The block report's numbers that are exact (not estimated): loss, per block ‖∂θ‖, bound, and χ
    and ‖J‖₂ where exact."""
    exact = [v for b in report.blocks if b.chi_exact for v in (b.chi, b.jacobian_norm)]
    return [np.array([report.loss_value]), np.array([b.grad_norm for b in report.blocks]),
            np.array([b.jacobian_bound for b in report.blocks]), np.array(exact)]


def _flow(dev: Device, host: Device, dtype: str, spec: dict) -> list[dict]:
    rows: list[dict] = []
    net, hnet, ref = _trio(dev, dtype, spec)
    data = _data(spec, dtype, 4)
    x, t = dev.put(data["x"]), dev.put(data["t"])
    flow = jg.diagnostics.gradient_flow
    _row(rows, dev, host, "gradient_flow (block report)", dtype, _label(spec),
         lambda: _flow_numbers(flow(net, x, t)),
         lambda: _flow_numbers(flow(ref, data["x"].astype(np.float64), data["t"].astype(np.float64))),
         on_host=lambda: flow(hnet, data["x"], data["t"]))
    return rows

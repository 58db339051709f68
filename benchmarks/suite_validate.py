"""Validation for ``gpu_suite.py``: every device result against the float64 NumPy reference.

The same weights and inputs, rounded to the dtype under test, run twice: on the device in that
dtype, and on NumPy in float64. Each result is compared with ``jacgrad.algebra.check.relative_error``
(``max|a − ref| / max|ref|``) against 1e-5 (float32) or 1e-12 (float64):

- per activation (every row of the table), a 16-32-32-8 net at B=8: forward output, MSE loss,
  weight / bias / input gradients, the chain's VJP and JVP, and the kernels themselves
  (``activation_forward``, ``derivative``, ``scale_cotangent`` from h and from the output);
- for tanh (diagonal from the output) and gelu (from h), a tapering and an hourglass net:
  per-sample Jacobians in the three orders, and their singular values;
- ``validate_compiled``, the suite's ``compiled`` section (its own process): the compiled
  training step (``net.compile(B)``: a recorded CUDA graph on the GPU) for every loss, on its
  first call (eager) and on two replays with new inputs: loss and gradients. The rows say whether
  a graph was recorded (``captured``) and, if not, why.
"""

from __future__ import annotations

import numpy as np

import jacgrad as jg
from jacgrad.algebra.check import relative_error

TOL = {"float32": 1e-5, "float64": 1e-12}
ACT_NET = [16, 32, 32, 8]
JAC_NETS = {"tapering": [48, 32, 16, 4], "hourglass": [24, 24, 3, 24, 24]}
_SEEDS = {"tapering": 11, "hourglass": 12}
B = 8


def _net_pair(dev, widths, activation, dtype, seed):
    """(device net in dtype, float64 reference net) with identical (dtype-rounded) weights."""
    net = jg.MLP.init(widths, activation=activation, output_activation="identity", bias_std=0.2, seed=seed)
    Ws = [np.asarray(W, dtype=dtype) for W in net.weights]
    bs = [np.asarray(b, dtype=dtype) for b in net.biases]
    ref = jg.MLP([W.astype(np.float64) for W in Ws], [b.astype(np.float64) for b in bs], net.activations)
    on_dev = jg.MLP([dev.put(W) for W in Ws], [dev.put(b) for b in bs], net.activations)
    return on_dev, ref


def _inputs(rng, dtype, *shapes):
    """Arrays rounded to ``dtype`` (returned as that dtype; the reference upcasts them)."""
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in shapes]


class Checks:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, what: str, dtype: str, got, ref, **tags) -> None:
        """Compare ``got`` with ``ref``; either may be a zero-argument callable, so a computation
        that raises on the device is a failed check with its error, not a crashed section."""
        try:
            got = got() if callable(got) else got
            ref = ref() if callable(ref) else ref
            err = relative_error(got, ref)
        except Exception as exc:  # noqa: BLE001
            err, tags["error"] = float("inf"), f"{type(exc).__name__}: {exc}"
        tol = TOL[dtype]
        self.rows.append({"check": what, "dtype": dtype, **tags, "rel_err": err, "tol": tol,
                          "ok": bool(err <= tol)})


def validate(dev, dtypes=("float32", "float64")) -> dict:
    """Every eager check on ``dev``; returns the rows and a per-dtype summary."""
    checks = Checks()
    rng = np.random.default_rng(7)
    for dtype in dtypes:
        for i, act in enumerate(jg.activations.names()):
            _activation_checks(checks, dev, act, dtype, rng, seed=100 + i)
        for act in ("tanh", "gelu"):
            for name, widths in JAC_NETS.items():
                _jacobian_checks(checks, dev, name, widths, act, dtype, rng)
    return _summary(checks, dtypes)


def validate_compiled(dev, dtypes=("float32", "float64")) -> dict:
    """The compiled training step (a recorded CUDA graph on the GPU) for every loss: its own
    section, in its own process, since a bad capture or replay can take the process down."""
    checks = Checks()
    rng = np.random.default_rng(8)
    for dtype in dtypes:
        for loss in ("mse", "sigmoid_bce", "softmax_cross_entropy"):
            _compiled_checks(checks, dev, loss, dtype, rng)
    return _summary(checks, dtypes)


def _summary(checks: Checks, dtypes) -> dict:
    summary = {}
    for dtype in dtypes:
        rows = [r for r in checks.rows if r["dtype"] == dtype]
        worst = max(rows, key=lambda r: r["rel_err"]) if rows else None
        summary[dtype] = {"checks": len(rows), "failed": sum(not r["ok"] for r in rows), "tol": TOL[dtype],
                          "worst": {k: worst.get(k) for k in ("check", "activation", "loss", "rel_err")} if worst else None}
    return {"rows": checks.rows, "summary": summary, "ok": all(r["ok"] for r in checks.rows)}


def _activation_checks(checks: Checks, dev, act: str, dtype: str, rng, seed: int) -> None:
    net, ref = _net_pair(dev, ACT_NET, act, dtype, seed)
    x, t, v, u = _inputs(rng, dtype, (B, ACT_NET[0]), (B, ACT_NET[-1]), (B, ACT_NET[-1]), (B, ACT_NET[0]))
    tag = {"activation": act}

    y_r, c_r = ref.forward(x.astype(np.float64))
    y_d, c_d = net.forward(dev.put(x))
    checks.add("forward", dtype, y_d, y_r, **tag)
    l_r, gy_r = jg.losses.mse(y_r, t.astype(np.float64))
    l_d, gy_d = jg.losses.mse(y_d, dev.put(t))
    checks.add("mse loss", dtype, l_d, l_r, **tag)
    g_r, g_d = ref.backward(c_r, gy_r), net.backward(c_d, gy_d)
    for j in range(ref.depth):
        checks.add(f"grad W[{j}]", dtype, g_d.weights[j], g_r.weights[j], **tag)
        checks.add(f"grad b[{j}]", dtype, g_d.biases[j], g_r.biases[j], **tag)
    checks.add("grad input", dtype, g_d.input, g_r.input, **tag)
    C_r, C_d = ref.jacobian_chain(c_r), net.jacobian_chain(c_d)
    checks.add("chain vjp", dtype, lambda: C_d.vjp(dev.put(v)), C_r.vjp(v.astype(np.float64)), **tag)
    checks.add("chain jvp", dtype, lambda: C_d.jvp(dev.put(u)), C_r.jvp(u.astype(np.float64)), **tag)

    # The kernels themselves, on pre-activations spread over ±4 (both tails, and 0).
    h = np.asarray(4 * np.tanh(rng.standard_normal((B, 64))), dtype=dtype)
    w = np.asarray(rng.standard_normal((B, 64)), dtype=dtype)
    h64, w64 = h.astype(np.float64), w.astype(np.float64)
    a = jg.activations.get(act)
    checks.add("kernel activation_forward", dtype, lambda: jg.kernels.activation_forward(dev.put(h), act),
               a.f(h64), **tag)
    checks.add("kernel derivative", dtype, lambda: jg.kernels.derivative(dev.put(h), act), a.df(h64), **tag)
    checks.add("kernel scale_cotangent(h)", dtype, lambda: jg.kernels.scale_cotangent(dev.put(w), dev.put(h), act),
               w64 * a.df(h64), **tag)
    if a.df_from_output is not None:
        y = np.asarray(a.f(h64), dtype=dtype)  # the output as the device would hold it
        checks.add("kernel scale_cotangent(y)", dtype,
                   lambda: jg.kernels.scale_cotangent(dev.put(w), dev.put(y), act, from_output=True),
                   w64 * a.df_from_output(y.astype(np.float64)), **tag)


def _jacobian_checks(checks: Checks, dev, name: str, widths, act: str, dtype: str, rng) -> None:
    net, ref = _net_pair(dev, widths, act, dtype, seed=_SEEDS[name])
    (x,) = _inputs(rng, dtype, (B, widths[0]))
    C_r = ref.jacobian_chain(ref.forward(x.astype(np.float64))[1])
    C_d = net.jacobian_chain(net.forward(dev.put(x))[1])
    J_r = C_r.jacobian("auto")
    tag = {"activation": act, "net": name}
    for order in ("forward", "reverse", "auto"):
        checks.add(f"jacobian {order}", dtype, lambda: C_d.jacobian(order), J_r, **tag)
    checks.add("singular values", dtype, lambda: C_d.singular_values(), jg.spectra.singular_values(J_r), **tag)


def _raising(exc: BaseException):
    """A callable that raises ``exc``: ``Checks.add`` records it as a failed check."""
    def fail():
        raise exc
    return fail


def _compiled_checks(checks: Checks, dev, loss: str, dtype: str, rng) -> None:
    net, ref = _net_pair(dev, ACT_NET, "tanh", dtype, seed=300)
    try:
        step = net.compile(B, loss=loss)
    except Exception as exc:  # noqa: BLE001 - a failed construction is a failed check
        checks.add("compiled step", dtype, _raising(exc), np.zeros(1), loss=loss)
        return
    for call in range(3):  # 0: eager (and recording); 1, 2: replays
        (x,) = _inputs(rng, dtype, (B, ACT_NET[0]))
        if loss == "softmax_cross_entropy":
            t = rng.integers(0, ACT_NET[-1], B)
        else:
            t = np.asarray(rng.random((B, ACT_NET[-1])), dtype=dtype)
        l_r, g_r = ref.loss_and_grads(x.astype(np.float64), t if t.dtype.kind == "i" else t.astype(np.float64), loss=loss)
        try:
            l_d, g_d = step(dev.put(x), dev.put(t), copy=True)
        except Exception as exc:  # noqa: BLE001
            checks.add("compiled step", dtype, _raising(exc), np.zeros(1), loss=loss, call=call)
            return
        tag = {"loss": loss, "call": call, "captured": step.captured, "capture_error": step.capture_error or ""}
        checks.add("compiled loss", dtype, l_d, l_r, **tag)
        for j in range(len(ACT_NET) - 1):
            checks.add(f"compiled grad W[{j}]", dtype, g_d.weights[j], g_r.weights[j], **tag)
            checks.add(f"compiled grad b[{j}]", dtype, g_d.biases[j], g_r.biases[j], **tag)

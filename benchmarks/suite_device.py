"""The device side of ``gpu_suite.py``: where arrays live, how to time on it, and the ceilings.

``Device("gpu")`` is CuPy (reached through ``jacgrad.core.backend``, never imported here);
``Device("cpu")`` is NumPy — the dry run's stand-in, so every section runs here too.

Ceilings measured on the device:
- device-to-device copy bandwidth (``copyto`` of a large float32 array; bytes read + written);
- the GEMM rate (float32 and float64 square products);
- the fused elementwise kernels of ``jacgrad.cuda.kernels`` on big arrays (``scale_cotangent`` same-shape
  and with one (H,) row shared by every row, ``forward_with_derivative``), as a bandwidth (the
  bytes each must move) and as a % of the copy bandwidth, next to the unfused array expression
  one of them replaces.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import numpy as np

import jacgrad as jg


class Device:
    """``where``: ``"gpu"`` (CuPy) or ``"cpu"`` (NumPy, the dry run)."""

    def __init__(self, where: str):
        self.where = where
        self.xp = jg.get_xp(jg.to_device(np.zeros(1, np.float32), where))

    @property
    def gpu(self) -> bool:
        return self.where == "gpu"

    def put(self, a: Any, dtype=None):
        a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
        return jg.to_device(np.ascontiguousarray(a), self.where)

    def randn(self, shape, dtype: str, rng):
        """Standard normals made where they are used (no host round trip for big GPU arrays)."""
        if self.gpu:
            return self.xp.random.standard_normal(shape, dtype=dtype)
        return rng.standard_normal(shape).astype(dtype)

    def sync(self) -> None:
        if self.gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def free(self) -> None:
        """Give cached device memory back between sections (CuPy's and torch's pools)."""
        import gc

        gc.collect()
        if self.gpu:
            self.xp.get_default_memory_pool().free_all_blocks()
            torch = __import__("sys").modules.get("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.empty_cache()

    def time(self, fn: Callable[[], Any], repeats: int = 7, min_time: float = 0.02) -> dict:
        """Median and IQR (ms per call) of ``repeats`` samples, each a synchronised loop."""
        fn()
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        one = max(time.perf_counter() - t0, 1e-7)
        number = max(1, min(1000, int(min_time / one) + 1))
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            self.sync()
            samples.append((time.perf_counter() - t0) / number * 1e3)
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [samples[0]] * 3
        return {"median_ms": statistics.median(samples), "iqr_ms": q[2] - q[0], "min_ms": min(samples),
                "number": number, "repeats": repeats}


def copy_bandwidth(dev: Device, nbytes: int) -> dict:
    """Device-to-device copy of ``nbytes`` (float32): GB/s counting the bytes read and written."""
    xp = dev.xp
    n = nbytes // 4
    a = xp.ones(n, dtype=np.float32)
    b = xp.empty_like(a)
    t = dev.time(lambda: xp.copyto(b, a))
    a = b = None  # noqa: F841 - release the buffers before the pools are emptied
    out = {"bytes": n * 4, **t, "GB_per_s": 2 * n * 4 / (t["median_ms"] * 1e-3) / 1e9}
    if dev.gpu:
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        clock, bus = props.get("memoryClockRate"), props.get("memoryBusWidth")  # gone from CUDA 13's props
        if clock and bus:  # HBM/GDDR: 2 transfers per memory clock (kHz) over the bus width (bits)
            peak = 2 * clock * 1e3 * bus / 8 / 1e9
            out["theoretical_GB_per_s"] = peak
            out["pct_of_theoretical"] = 100 * out["GB_per_s"] / peak
    dev.free()
    return out


def gemm_rate(dev: Device, n: int, dtype: str) -> dict:
    """``(n, n) @ (n, n)`` in ``dtype``: TFLOP/s."""
    xp = dev.xp
    rng = np.random.default_rng(0)
    a = dev.randn((n, n), dtype, rng)
    b = dev.randn((n, n), dtype, rng)
    c = xp.empty_like(a)
    t = dev.time(lambda: xp.matmul(a, b, out=c), repeats=5)
    a = b = c = None  # noqa: F841
    dev.free()
    return {"n": n, "dtype": dtype, **t, "TFLOP_per_s": 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e12,
            "tf32_env": os.environ.get("CUPY_TF32", "unset")}


def fused_kernel(dev: Device, n: int, copy_gbps: float | None) -> list[dict]:
    """The fused elementwise kernels on ``n`` elements (n/2 in float64), against copy bandwidth
    (issue 10's target: ≥ 85%) and, for one row, the unfused expression. Rows: kernel, activation,
    dtype, from_output, shape, GB/s (the bytes each kernel must move: inputs read once, outputs
    written once), % of copy, speedup."""
    rng = np.random.default_rng(0)
    rows = []
    specs = [("scale_cotangent", "tanh", "float32", True, "same"), ("scale_cotangent", "tanh", "float32", False, "same"),
             ("scale_cotangent", "relu", "float32", True, "same"), ("scale_cotangent", "gelu", "float32", False, "same"),
             ("scale_cotangent", "silu", "float32", False, "same"), ("scale_cotangent", "tanh", "float64", True, "same"),
             ("scale_cotangent", "tanh", "float32", True, "row"), ("scale_cotangent", "tanh", "float64", True, "row"),
             ("forward_with_derivative", "gelu", "float32", False, "same"),
             ("forward_with_derivative", "tanh", "float64", False, "same")]
    for kernel, act, dtype, from_output, shape in specs:
        m = n if dtype == "float32" else n // 2
        rows.append(_fused_row(dev, rng, kernel, act, dtype, from_output, shape, m, copy_gbps))
        dev.free()
    return rows


_ROW = 4096  # H of the (B, H) ⊙ (H,) broadcast rows


def _fused_row(dev: Device, rng, kernel: str, act: str, dtype: str, from_output: bool, shape: str, m: int,
               copy_gbps: float | None) -> dict:
    xp = dev.xp
    if shape == "row":
        H = min(_ROW, m)
        m = (m // H) * H
        v, x = dev.randn((m // H, H), dtype, rng), dev.randn(H, dtype, rng)
    else:
        v, x = dev.randn(m, dtype, rng), dev.randn(m, dtype, rng)
    if from_output:
        x = jg.kernels.activation_forward(x, act)
    if kernel == "scale_cotangent":
        out = xp.empty_like(v)
        t = dev.time(lambda: jg.kernels.scale_cotangent(v, x, act, from_output=from_output, out=out))
        nbytes = 2 * v.nbytes + x.nbytes
    else:
        pair = (xp.empty_like(v), xp.empty_like(v))
        t = dev.time(lambda: jg.kernels.forward_with_derivative(v, act, out=pair))
        nbytes = 3 * v.nbytes
    row = {"kernel": kernel, "activation": act, "dtype": dtype, "from_output": from_output, "shape": shape,
           "elements": m, **t, "GB_per_s": nbytes / (t["median_ms"] * 1e-3) / 1e9}
    if copy_gbps:
        row["pct_of_copy"] = 100 * row["GB_per_s"] / copy_gbps
    if kernel == "scale_cotangent" and act == "tanh" and from_output and shape == "same":
        # what the fused kernel replaces: v * (1 - y*y), temporaries and all
        u = dev.time(lambda: xp.multiply(v, (1 - x * x), out=out))
        row["unfused_ms"] = u["median_ms"]
        row["speedup_vs_unfused"] = u["median_ms"] / t["median_ms"]
    return row


def _frobenius_error(a, ref) -> float:
    a = np.asarray(jg.to_numpy(a), dtype=np.float64)
    return float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-300))


def tf32_mode(dev: Device, widths: list[int], batch: int, time_widths: list[int], time_batch: int) -> dict:
    """``jacgrad.core.backend.tf32``: accuracy (normwise relative error of one GEMM and of the weight
    gradients of a net, against float64) and speed of a float32 training step, TF32 off and on."""
    import warnings

    from jacgrad.core.backend import tf32

    rng = np.random.default_rng(0)
    out: dict = {"accuracy": [], "timing": []}
    a64, b64 = rng.standard_normal((1024, 1024)), rng.standard_normal((1024, 1024))
    a, b = dev.put(a64, "float32"), dev.put(b64, "float32")
    ref = a64.astype(np.float32).astype(np.float64) @ b64.astype(np.float32).astype(np.float64)
    net = jg.MLP.init(widths, seed=0, dtype="float32", device=dev.where)
    ref_net = jg.MLP([jg.to_numpy(W).astype(np.float64) for W in net.weights],
                     [jg.to_numpy(b_).astype(np.float64) for b_ in net.biases], net.activations)
    x = np.asarray(rng.standard_normal((batch, widths[0])), dtype=np.float32)
    t = np.asarray(0.5 * rng.standard_normal((batch, widths[-1])), dtype=np.float32)
    _, g_ref = ref_net.loss_and_grads(x.astype(np.float64), t.astype(np.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the dry run: TF32 is a no-op on NumPy
        for on in (False, True):
            with tf32(on):
                _, g = net.loss_and_grads(dev.put(x), dev.put(t))
                out["accuracy"].append({
                    "tf32": on,
                    "gemm_1024_rel_err": _frobenius_error(a @ b, ref),
                    "net": "-".join(map(str, widths)), "batch": batch,
                    "grad_W_rel_err_max": max(_frobenius_error(gw, r) for gw, r in zip(g.weights, g_ref.weights)),
                })
        big = jg.MLP.init(time_widths, seed=0, dtype="float32", device=dev.where)
        xb = dev.randn((time_batch, time_widths[0]), "float32", rng)
        tb = dev.randn((time_batch, time_widths[-1]), "float32", rng)
        step = big.compile(time_batch) if hasattr(big, "compile") else None

        def eager():
            y, cache = big.forward(xb)
            return big.backward(cache, jg.losses.mse(y, tb)[1], input_grad=False)

        for on in (False, True):
            with tf32(on):
                row = {"tf32": on, "net": f"{len(time_widths) - 1}×{time_widths[1]}", "batch": time_batch,
                       "eager_ms": dev.time(eager, repeats=5)["median_ms"]}
                if step is not None:
                    row["compiled_ms"] = dev.time(lambda: step(xb, tb), repeats=5)["median_ms"]
                out["timing"].append(row)
    return out

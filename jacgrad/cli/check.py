"""``jacgrad check`` (GPU against the float64 NumPy reference) and ``jacgrad info``."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import numpy as np

from .common import (
    UsageError,
    check_network_fits,
    hidden_activations,
    load_weights,
    output_activation,
    parse_activations,
    random_net,
    resolve_device,
)

__all__ = ["run_check", "run_info", "quantities"]


# ---------------------------------------------------------------------------- check
def quantities(net, x, t) -> dict[str, list]:
    """Everything ``check`` compares, computed on ``net``'s device and dtype: name -> arrays."""
    from ..nn import losses
    from ..flow.diagnostics import gradient_flow
    from ..algebra.spectra import singular_values

    y, cache = net.forward(x)
    value, grad_y = losses.mse(y, t)
    g = net.backward(cache, grad_y)
    J = net.jacobian_chain(cache).jacobian()
    rep = gradient_flow(net, x, t, loss="mse", spectrum_samples=0)
    return {
        "forward output y": [y],
        "mse loss": [value],
        "∂L/∂W, every layer": list(g.weights),
        "∂L/∂b, every layer": list(g.biases),
        "∂L/∂h (deltas), every layer": list(g.deltas),
        "∂L/∂x": [g.input],
        "per-sample input-output Jacobian": [J],
        "its singular values": [singular_values(J)],
        "‖J_j‖₂ per layer (Lanczos)": [np.array([f.jacobian_norm for f in rep.layers])],
        "χ per layer": [np.array(rep.chi)],
        "‖∂L/∂W_j‖ per layer (report)": [np.array([f.grad_norm for f in rep.layers])],
    }


def _candidates(device_option: str) -> tuple[list[tuple[str, str, str]], str]:
    """``([(label, device, dtype)], note)``. ``auto`` means what ``device="auto"`` means
    everywhere in jacgrad: ``JACGRAD_BACKEND`` when set, else the GPU when one runs."""
    from ..core import backend

    device = resolve_device(device_option)
    if device == "gpu":
        return [("cupy float64", "gpu", "float64"), ("cupy float32", "gpu", "float32")], "the GPU path"
    forced = os.environ.get("JACGRAD_BACKEND", "").strip()
    reason = backend.gpu_unavailable_reason() if device_option == "auto" and not forced else None
    if reason is not None:
        note = f"no GPU here ({reason}); validating NumPy float32 against float64 instead"
    elif device_option == "auto":
        note = f"JACGRAD_BACKEND={forced}: validating NumPy float32 against float64"
    else:
        note = "--device cpu: validating NumPy float32 against float64"
    return [("numpy float32", "cpu", "float32")], note


def run_check(args) -> int:
    from ..core.backend import to_device
    from ..algebra.check import relative_error
    from ..network.mlp import MLP

    candidates, note = _candidates(args.device)
    out_spec = getattr(args, "output_activation", None)
    model = getattr(args, "model", None)
    if model is not None:
        from .model import network_of_model

        if args.activation is not None or out_spec is not None:
            raise UsageError("--model cannot be combined with --activation or --output-activation: the module's "
                             "activation modules name the activations")
        ref_net = network_of_model(model, args.weights, "float64", "cpu")
        if not isinstance(ref_net, MLP):
            raise UsageError(f"--model {model!r}: jacgrad check validates dense stacks (nn.Linear and activations); "
                             f"this module has norms or residual blocks: use jacgrad report")
        what = f"{args.weights or model}"
    elif args.weights is not None:
        ref_net = load_weights(args.weights, "float64", "cpu", args.activation, out_spec)
        what = f"{args.weights}"
    else:
        sizes = [args.width] * (args.depth + 1)
        check_network_fits(sizes, "float64", "--depth, --width")
        args.activation = args.activation or "tanh"
        hidden = hidden_activations(args.activation, args.depth - 1) or parse_activations(args.activation)[:1]
        ref_net = random_net(sizes, hidden, output_activation(out_spec), init="xavier_normal", bias_std=0.1,
                             seed=args.seed)
        what = f"a random {args.activation} network {args.width}x{args.depth}"
    from . import threads as _cli_threads

    _cli_threads.limit(_cli_threads.gemm_macs(ref_net.sizes, args.batch))
    rng = np.random.default_rng([args.seed, 2])
    x = rng.standard_normal((args.batch, ref_net.sizes[0]))
    t = rng.standard_normal((args.batch, ref_net.sizes[-1]))
    print(f"jacgrad check: {note}")
    print(f"network: {what}, sizes {'-'.join(map(str, ref_net.sizes))}, B={args.batch}, mse loss; "
          "error = max|a − b| / max|b| against float64 NumPy")
    with np.errstate(all="ignore"):
        try:
            reference = quantities(ref_net, x, t)
        except ValueError as exc:  # numpy.linalg.LinAlgError is one: the spectra of an overflowed net
            raise UsageError(f"{what}: the float64 reference cannot be computed ({exc})") from None
        nonfinite = [k for k, arrays in reference.items() if not all(np.isfinite(a).all() for a in arrays)]
        if nonfinite:
            raise UsageError(f"{what}: the float64 reference is not finite ({', '.join(nonfinite)}); "
                             "check compares finite numbers only")
        results, broken = [], []
        for label, device, dtype in candidates:
            tol = args.tol64 if dtype == "float64" else args.tol32
            try:
                net = MLP([W.astype(dtype) for W in ref_net.weights], [b.astype(dtype) for b in ref_net.biases],
                          ref_net.activations).to(device)
                got = quantities(net, to_device(x.astype(dtype), device), to_device(t.astype(dtype), device))
                errs = {k: max(relative_error(a, b) for a, b in zip(got[k], reference[k])) for k in reference}
            except (ValueError, FloatingPointError) as exc:  # e.g. float32 overflows where float64 does not
                errs = {k: float("nan") for k in reference}
                broken.append(f"{label} could not be computed ({type(exc).__name__}: {exc})")
            results.append((label, tol, errs))
    width = max(len(k) for k in reference)
    print(f"  {'quantity':<{width}}" + "".join(f"  {label:>14} (tol {tol:.0e})" for label, tol, _ in results))
    failed = []
    for k in reference:
        cells = []
        for label, tol, errs in results:
            e = errs[k]
            ok = e <= tol  # NaN fails
            if not ok:
                failed.append(f"{label}: {k}")
            cells.append(f"  {e:>14.2e} {'ok' if ok else 'FAIL':>10}")
        print(f"  {k:<{width}}" + "".join(cells))
    if failed:
        print(f"FAILED: {len(failed)} above tolerance — " + "; ".join(broken or failed))
        return 1
    print(f"passed: all {len(reference) * len(results)} comparisons within tolerance")
    return 0


# ---------------------------------------------------------------------------- info
def _version(*dists: str) -> str | None:
    for d in dists:
        try:
            return f"{importlib.metadata.version(d)}" + (f" ({d})" if len(dists) > 1 else "")
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _gpu_lines() -> list[str]:
    from ..core import backend

    reason = backend.gpu_unavailable_reason()
    if reason is not None:
        return [f"GPU: none usable — {reason}"]
    cp = backend.cupy()
    lines = []
    try:
        rt = cp.cuda.runtime
        n = rt.getDeviceCount()
        for i in range(n):
            props = rt.getDeviceProperties(i)
            name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
            mem = props.get("totalGlobalMem", 0) / 2**30
            lines.append(f"GPU {i}: {name}, compute capability {props['major']}.{props['minor']}, {mem:.1f} GiB")
        rv, dv = rt.runtimeGetVersion(), rt.driverGetVersion()
        lines.append(f"CUDA runtime {rv // 1000}.{rv % 1000 // 10}, driver supports CUDA {dv // 1000}.{dv % 1000 // 10}")
    except Exception as exc:  # report, never crash `info`
        lines.append(f"GPU: usable, but its properties could not be read ({type(exc).__name__}: {exc})")
    return lines


def run_info() -> int:
    from .. import __version__
    from ..core import backend

    package = os.path.abspath(__file__)
    for _ in range(__name__.count(".")):  # up to jacgrad/, wherever this module sits
        package = os.path.dirname(package)
    print(f"jacgrad {__version__} ({package})")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"numpy {np.__version__}")
    optional = {
        "cupy": ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"),
        "torch": ("torch",),
        "jax": ("jax",),
        "matplotlib": ("matplotlib",),
    }
    for name, dists in optional.items():
        print(f"{name} {_version(*dists) or 'not installed'}")
    print(f"backends: {', '.join(backend.available())}")
    try:
        print(f"default device (device='auto'): {backend.default_device()}")
    except (RuntimeError, ValueError) as exc:
        print(f"default device (device='auto'): error: {exc}")
    for line in _gpu_lines():
        print(line)
    from . import threads as _cli_threads

    print(f"BLAS threads: {_cli_threads.describe()}")
    print("kernels:")
    try:
        from ..cuda.kernels import compile_report

        rows = compile_report()
        failures = {message for _, ok, message in rows if not ok}
        if rows and len(failures) == 1 and not any(ok for _, ok, _ in rows):
            print(f"  {', '.join(k for k, _, _ in rows)}: {failures.pop()}")
        else:
            for kernel, ok, message in rows:
                print(f"  {kernel}: {'ok, ' if ok else ''}{message}")
    except Exception as exc:  # a broken CUDA toolchain is information here, not a crash
        print(f"  could not build the kernel report ({type(exc).__name__}: {exc})")
    from ..examples import TINY_MLP

    print(f"example network: {TINY_MLP}")
    return 0

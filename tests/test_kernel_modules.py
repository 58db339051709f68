"""How the CUDA kernels are compiled, counted with a fake CuPy (no GPU needed): one NVRTC module
per (source, dtype) holding every instantiation, instead of one per instantiation (~130 on a cold
start); and the build layer sits below the activation table (no import cycle)."""

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fake_cupy_calls import FakeCupy
from jacgrad.core import cuda_build as _cuda_build, validation as _validate, backend
from jacgrad.elementwise import erf as _erf, activations
from jacgrad.cuda import kernels


@pytest.fixture
def fake(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_build.backend, "cupy", lambda: cp)
    _cuda_build._module.cache_clear()
    _cuda_build._function.cache_clear()
    yield cp
    _cuda_build._module.cache_clear()
    _cuda_build._function.cache_clear()


def _every_launchable():
    """(kernel, dtype, activation, from_output) of every instantiation the dispatchers may launch."""
    for kernel, (_, takes_act, takes_fo) in kernels.KERNELS.items():
        for dtype in (np.float32, np.float64):
            for act in ([activations.get(n) for n in activations.names()] if takes_act else [None]):
                modes = (False, True) if takes_fo and act.df_from_output is not None else (False,)
                for fo in modes:
                    yield kernel, dtype, act, fo


def test_a_cold_start_compiles_one_module_per_source_and_dtype(fake):
    launchable = list(_every_launchable())
    assert len(launchable) == sum(len(kernels.instantiations(k)) for k in kernels.KERNELS) > 100
    for kernel, dtype, act, fo in launchable:
        fn = kernels.compiled_kernel(kernel, dtype, act, fo)
        assert fn == ("kernel", kernels.name_expression(kernel, dtype, act, fo))
    sources = sorted({src for src, _, _ in kernels.KERNELS.values()})
    assert sources == ["fused.cu", "norm.cu", "softmax.cu", "special.cu"]
    assert len(fake.modules) == 8  # one per source, float and double (was one per instantiation)
    first = {kernels.name_expression(k, dt).split("<")[0]: src for k, (src, act, _) in kernels.KERNELS.items()
             if not act for dt in ("float32",)}
    first["jacgrad::scale_cotangent"] = "fused.cu"
    for code, options, exprs in fake.modules:
        source = first[exprs[0].split("<")[0]]
        assert code == kernels.module_source(source) and options == _cuda_build.NVRTC_OPTIONS
        dtype = np.float32 if "<float" in exprs[0] else np.float64
        assert exprs == kernels.module_expressions(source, dtype)
    compiled = sorted(e for _, _, exprs in fake.modules for e in exprs)
    assert compiled == sorted(e for k in kernels.KERNELS for e in kernels.instantiations(k))
    for kernel, dtype, act, fo in launchable:  # warm: nothing compiles again
        kernels.compiled_kernel(kernel, dtype, act, fo)
    assert len(fake.modules) == 8


def test_erf_on_the_gpu_shares_the_special_module(fake):
    for name in ("erf", "erfc"):
        for dtype in ("float32", "float64"):
            _cuda_build.compiled_function(f"{name}_elementwise", dtype,
                                          _cuda_build.source_expressions("special.cu", dtype, ()))
    kernels.compiled_kernel("erfc_elementwise", np.float32)  # the same module, by the same expressions
    assert [m[2] for m in fake.modules] == [("jacgrad::erf_elementwise<float>", "jacgrad::erfc_elementwise<float>"),
                                           ("jacgrad::erf_elementwise<double>", "jacgrad::erfc_elementwise<double>")]


def test_a_failed_compile_names_the_source_and_dtype_and_is_retried(fake):
    fake.fail_at.add("compile")
    n = len(kernels.module_expressions("fused.cu", np.float64))
    with pytest.raises(RuntimeError, match=rf"compiling kernels/fused\.cu for double \({n} instantiations\) failed: "
                                           r".*identifier \"Nope\" is undefined"):
        kernels.compiled_kernel("scale_cotangent", np.float64, activations.get("tanh"), True)
    fake.fail_at.clear()
    assert kernels.compiled_kernel("scale_cotangent", np.float64, activations.get("tanh"), True)
    assert len(fake.modules) == 2


def test_a_kernel_outside_the_module_is_a_key_error(fake):
    with pytest.raises(KeyError, match="not among the instantiations compiled for kernels/special.cu"):
        _cuda_build.compiled_function("erf_elementwise", "float32", ("jacgrad::erfc_elementwise<float>",))


def _jacgrad_imports(module) -> set[str]:
    """The full names of the jacgrad modules ``module`` imports anywhere in its file (lazy imports
    included), read from the module's own file: the same check in the flat and the regrouped layout."""
    tree = ast.parse(Path(module.__file__).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), module.__package__)
            found |= {base} if node.module else {f"{base}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jacgrad.")}
    return found


def test_the_build_layer_is_below_the_activation_table():
    """activations -> _erf -> kernels -> _cuda_build -> activations was a cycle (issue 9 item 12)."""
    assert _jacgrad_imports(_cuda_build) <= {backend.__name__, _validate.__name__}
    assert _jacgrad_imports(_erf) <= {backend.__name__, _validate.__name__, _cuda_build.__name__}
    assert kernels.__name__ not in _jacgrad_imports(activations)


def test_the_grid_is_sized_for_16_bytes_per_thread():
    grids = []

    def kernel(grid, block, args):
        grids.append((grid, block))

    _cuda_build.launch(kernel, 0, ())
    _cuda_build.launch(kernel, 1_000_000, (), 4)  # float: 4 per thread
    _cuda_build.launch(kernel, 1_000_000, (), 8)  # double: 2 per thread
    _cuda_build.launch(kernel, 5, (), 4)
    _cuda_build.launch(kernel, 1 << 40, (), 4)
    assert grids == [((977,), (256,)), ((1954,), (256,)), ((1,), (256,)), ((8192,), (256,))]


def test_a_launch_lists_the_module_expressions_once_per_source_and_dtype(fake, monkeypatch):
    built = []

    def counting(source, dtype, functors):
        built.append((source, np.dtype(dtype)))
        return _cuda_build.source_expressions(source, dtype, functors)

    monkeypatch.setattr(kernels, "source_expressions", counting)
    kernels._module_expressions.cache_clear()
    tanh = activations.get("tanh")
    try:
        for _ in range(3):  # the per-launch path: compiled_kernel on every call of a dispatcher
            for dtype in ("float32", np.float32, np.dtype("float64")):
                assert kernels.compiled_kernel("scale_cotangent", dtype, tanh, True) == (
                    "kernel", kernels.name_expression("scale_cotangent", dtype, tanh, True))
    finally:
        kernels._module_expressions.cache_clear()  # later tests list them with the real function
    assert built == [("fused.cu", np.dtype(np.float32)), ("fused.cu", np.dtype(np.float64))]


def test_the_norm_layers_compile_one_module_per_dtype_with_their_four_kernels(fake):
    from jacgrad.cuda import norm_kernels

    names = ["norm_forward", "norm_product", "norm_backward", "norm_param_grads"]
    for _ in range(2):  # the second round compiles nothing
        for dtype in ("float32", "float64"):
            for name in names:
                assert norm_kernels._kernel(name, dtype) == ("kernel", kernels.name_expression(name, dtype))
    assert [m[2] for m in fake.modules] == [tuple(f"jacgrad::{k}<{t}>" for k in names) for t in ("float", "double")]
    assert all(code == kernels.module_source("norm.cu") and "struct DeviceBlock" in code for code, _, _ in fake.modules)

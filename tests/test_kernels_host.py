"""The CUDA sources without a GPU, and jacgrad.cuda.kernels' dispatchers.

- ``kernels/activations.cuh`` is built for the host with g++ and with nvcc (host code); a driver
  evaluates f, df and df_y of every activation in float and double on a grid with 0, ±tiny,
  ±large, ±inf, NaN and random points, and the values are compared with the NumPy table.
- every ``kernels/*.cu`` is compiled for sm_90 by nvcc with every instantiation the library
  launches (the exact name expressions CuPy hands to NVRTC), so each template body is compiled.
- the NumPy path of the dispatchers, their errors, and (marker ``gpu``) the CuPy kernels against
  the float64 NumPy reference.

All compilers run once per module, in parallel; a test whose compiler is missing skips and says so.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jacgrad.elementwise import activations
from jacgrad.cuda import kernels

ROOT = Path(__file__).resolve().parent.parent
NAMES = activations.names()
GRID = [0.0, 1e-30, 1e-8, 0.5, 1.0, 1.5, 3.0, 20.0, 1000.0, 1e19, np.inf]  # 3: hard_swish's kinks
_rng = np.random.default_rng(7)
# random points: pre-activations, and outputs in [-1, 1] for the df_y of sigmoid, tanh, hard_tanh
POINTS = np.concatenate([GRID, np.negative(GRID), [np.nan], _rng.normal(0.0, 4.0, 200), _rng.uniform(-1.0, 1.0, 100)])
# These derivatives cross zero where their two terms (about 0.2 to 0.5 each) cancel: a 1-ulp
# difference in a term is many ulps of the small result, so there the gap is counted in ulps of 1/2.
CANCELLING_DF = {"gelu", "gelu_tanh", "silu", "mish"}
CTYPE = {"float": np.float32, "double": np.float64}

DRIVER = r"""
#include <cstdio>
#include <vector>
#include "activations.cuh"

template <class Act, class T> void run(const char* name, const char* type, const std::vector<double>& xs) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const T x = static_cast<T>(xs[i]);
    std::printf("%s %s f %zu %a\n", name, type, i, (double)Act::template f<T>(x));
    std::printf("%s %s df %zu %a\n", name, type, i, (double)Act::template df<T>(x));
    if constexpr (Act::has_df_y)
      std::printf("%s %s df_y %zu %a\n", name, type, i, (double)Act::template df_y<T>(x));
  }
}

int main() {
  std::vector<double> xs;
  double v;
  while (std::scanf("%la", &v) == 1) xs.push_back(v);
%s
  return 0;
}
"""


def driver_source() -> str:
    """The host driver, with one run<>() per table row, named by the row's ``cuda`` functor."""
    calls = "\n".join(
        f'  run<{activations.get(n).cuda}, {ctype}>("{n}", "{ctype}", xs);' for n in NAMES for ctype in CTYPE
    )
    return DRIVER.replace("%s\n  return", calls + "\n  return")


CU_SOURCES = sorted(p.name for p in kernels.source_dir().glob("*.cu"))


def instantiation_unit(source: str) -> tuple[str, int]:
    """A .cu that includes ``source`` and takes the address of every instantiation in it, and their count."""
    exprs = [e for k, (src, _, _) in kernels.KERNELS.items() if src == source for e in kernels.instantiations(k)]
    body = ",\n".join(f"    (void*)&{e}" for e in exprs)
    table = f"extern void* const jg_instances[];\nvoid* const jg_instances[] = {{\n{body}\n}};\n"
    return f'#include "{source}"\n{table}', len(exprs)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compile, started at once: {job: (output path, count of kernels expected) or the failure}."""
    tmp = tmp_path_factory.mktemp("kernels")
    std, inc = "-std=c++17", f"-I{kernels.source_dir()}"
    (tmp / "driver.cpp").write_text(driver_source())
    jobs = {  # job: (command, output, kernels expected in it)
        "g++": (["g++", std, "-O2", "-Wall", "-Werror", inc, "driver.cpp", "-o", "driver_gxx"], "driver_gxx", None),
        "nvcc-host": (["nvcc", std, "-O2", "-x", "cu", inc, "driver.cpp", "-o", "driver_nvcc"], "driver_nvcc", None),
    }
    for source in CU_SOURCES:
        text, count = instantiation_unit(source)
        (tmp / f"inst_{source}").write_text(text)
        cubin = source.replace(".cu", ".cubin")
        flags = [std, "-arch=sm_90", "-cubin", "--Werror", "all-warnings", inc]
        jobs[f"sm_90:{source}"] = (["nvcc", *flags, f"inst_{source}", "-o", cubin], cubin, count)
    results, running = {}, {}
    for job, (cmd, out, count) in jobs.items():
        if shutil.which(cmd[0]) is None:
            results[job] = pytest.skip.Exception(f"{job}: {cmd[0]} is not on PATH")
        else:
            proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running[job] = (proc, out, count)
    for job, (proc, out, count) in running.items():
        log, _ = proc.communicate(timeout=300)
        results[job] = (tmp / out, count) if proc.returncode == 0 else AssertionError(f"{job} failed:\n{log}")
    return results


def built(builds, job):
    """(output path, expected kernel count) of a compile job; skips when its compiler is missing."""
    result = builds[job]
    if isinstance(result, BaseException):
        raise result
    return result


def run_driver(path) -> dict:
    """{(activation, ctype, fn): values} from one driver run on POINTS."""
    stdin = "\n".join(float(x).hex() for x in POINTS)
    lines = subprocess.run([str(path)], input=stdin, capture_output=True, text=True, check=True, timeout=60).stdout
    values: dict = {}
    for line in lines.splitlines():
        name, ctype, fn, i, v = line.split()
        values.setdefault((name, ctype, fn), np.empty(len(POINTS)))[int(i)] = float.fromhex(v.replace("-nan", "nan"))
    return values


def table_values(name, ctype):
    act, x = activations.get(name), POINTS.astype(CTYPE[ctype])
    with np.errstate(invalid="ignore"):  # NaN is one of the points
        out = {"f": act.f(x), "df": act.df(x)}
        if act.df_from_output is not None:
            out["df_y"] = act.df_from_output(x)
    return out


def ulp_gap(ours, reference, dtype, floor=0.0):
    """|ours - reference| in ulps of dtype at max(|reference|, floor) (0 where equal, NaN or inf alike)."""
    ours, reference = ours.astype(np.float64), reference.astype(np.float64)
    same = (ours == reference) | (np.isnan(ours) & np.isnan(reference))
    spacing = np.spacing(np.maximum(np.abs(reference), floor).astype(dtype)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(same, 0.0, np.abs(ours - reference) / spacing)


@pytest.mark.parametrize("compiler", ["g++", "nvcc-host"])
def test_header_on_the_host_matches_the_numpy_table(builds, compiler):
    path, _ = built(builds, compiler)
    host = run_driver(path)
    failures = []
    for name in NAMES:
        piecewise = name in {"identity", "relu", "leaky_relu", "hard_tanh", "hard_sigmoid", "hard_swish"}
        for ctype, dtype in CTYPE.items():
            for fn, reference in table_values(name, ctype).items():
                got = host.get((name, ctype, fn))
                if got is None:
                    failures.append(f"{name} {ctype} {fn}: missing from the driver (has_df_y disagrees with the table)")
                    continue
                gap = ulp_gap(got, reference, dtype, 0.5 if fn == "df" and name in CANCELLING_DF else 0.0)
                limit = 0 if piecewise else 4
                if not gap.max() <= limit:
                    i = int(np.nanargmax(gap)) if not np.isnan(gap).all() else 0
                    failures.append(f"{name} {ctype} {fn}: {gap[i]} ulp at h={POINTS[i]!r}: "
                                    f"host {got[i]!r} vs numpy {reference[i]!r}")
        extra = {fn for (n, _, fn) in host if n == name} - set(table_values(name, "double"))
        if extra:
            failures.append(f"{name}: the header has {extra} but the table has no df_from_output")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("source", CU_SOURCES)
def test_every_instantiation_compiles_for_sm90(builds, source):
    cubin, count = built(builds, f"sm_90:{source}")
    entries = set(re.findall(rb"\.text\.(_Z[0-9A-Za-z_]+)", cubin.read_bytes()))
    assert len(entries) == count, f"{source}: {count} instantiations requested, {len(entries)} kernels in the cubin"


# --- sources ----------------------------------------------------------------------------

def test_every_row_names_a_functor_of_the_header():
    header = kernels.read_source("activations.cuh")
    structs = dict(re.findall(r"struct (\w+) \{[^\n]*\n\s*static constexpr bool has_df_y = (true|false);", header))
    for name in NAMES:
        act = activations.get(name)
        functor = act.cuda.removeprefix("jacgrad::")
        assert functor in structs, f"{name}: {act.cuda} is not a functor of kernels/activations.cuh"
        assert (structs[functor] == "true") == (act.df_from_output is not None), f"{name}: has_df_y disagrees"


def test_source_dir_holds_the_sources():
    folder = kernels.source_dir()
    assert {"activations.cuh", "fused.cu", "special.cu"} <= {p.name for p in folder.iterdir()}
    text = kernels.module_source("fused.cu")
    assert '#include "' not in text and "struct Tanh" in text and "scale_cotangent" in text
    with pytest.raises(FileNotFoundError, match="fused.cu"):
        kernels.read_source("missing.cu")


@pytest.mark.slow
def test_installed_wheel_finds_its_sources(tmp_path):
    build = subprocess.run([sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
    if build.returncode != 0:
        pytest.skip(f"could not build a wheel here: {build.stderr.strip()[-300:]}")
    (wheel,) = tmp_path.glob("*.whl")
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = "import jacgrad.cuda.kernels as k; print(k.source_dir()); print(len(k.module_source('fused.cu')))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(tmp_path / "site" / "jacgrad" / "_kernels") and int(out[1]) > 1000


def test_name_expressions():
    tanh = activations.get("tanh")
    expr = kernels.name_expression("scale_cotangent", np.float32, tanh, True)
    assert expr == "jacgrad::scale_cotangent<float, jacgrad::Tanh, true>"
    assert kernels.name_expression("erfc_elementwise", "float64") == "jacgrad::erfc_elementwise<double>"
    with_df_y = sum(activations.get(n).df_from_output is not None for n in NAMES)  # identity, relu, ..., selu, softsign
    assert len(kernels.instantiations("scale_cotangent")) == 2 * (len(NAMES) + with_df_y)
    with pytest.raises(TypeError, match="float16"):
        kernels.name_expression("activation_forward", np.float16, tanh)


def test_compile_report_says_why_without_a_gpu():
    from jacgrad.core import backend

    if backend.gpu_available():
        pytest.skip("a GPU is usable here: test_gpu_compile_report covers it")
    report = kernels.compile_report()
    assert [k for k, _, _ in report] == list(kernels.KERNELS)
    assert all(not ok and "not compiled" in msg for _, ok, msg in report)


# --- the NumPy path of the dispatchers --------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_scale_cotangent_numpy_is_v_times_df(name, rng):
    act = activations.get(name)
    v, h = rng.normal(size=(4, 5)), rng.normal(0.0, 3.0, size=(4, 5))
    np.testing.assert_array_equal(kernels.scale_cotangent(v, h, name), v * act.df(h))
    np.testing.assert_array_equal(kernels.scale_cotangent(v, h[0], act), v * act.df(h[0]))  # (H,) broadcast
    if act.df_from_output is not None:
        y = act.f(h)
        np.testing.assert_array_equal(kernels.scale_cotangent(v, y, name, from_output=True), v * act.df_from_output(y))
    v32, h32 = v.astype(np.float32), h.astype(np.float32)
    assert kernels.scale_cotangent(v32, h32, name).dtype == np.float32
    np.testing.assert_array_equal(kernels.derivative(h, name), act.df(h))
    np.testing.assert_array_equal(kernels.activation_forward(h, name), act.f(h))
    y, d = kernels.forward_with_derivative(h32, name)
    assert y.dtype == d.dtype == np.float32
    np.testing.assert_array_equal(y, act.f(h32))
    np.testing.assert_array_equal(d, act.df(h32))


@pytest.mark.parametrize("name", ["gelu", "silu", "tanh"])
def test_forward_with_derivative_writes_into_a_pair(rng, name):
    h = rng.normal(size=(3, 5)).astype(np.float32)
    y, d = np.empty_like(h), np.empty_like(h)
    ry, rd = kernels.forward_with_derivative(h, name, out=(y, d))
    assert ry is y and rd is d
    act = activations.get(name)
    np.testing.assert_array_equal(y, act.f(h))
    np.testing.assert_array_equal(d, act.df(h))
    with pytest.raises(TypeError, match="pair"):
        kernels.forward_with_derivative(h, name, out=y)
    with pytest.raises(ValueError, match="shape"):
        kernels.forward_with_derivative(h, name, out=(y, np.empty((3, 4), np.float32)))
    with pytest.raises(TypeError, match="dtype"):
        kernels.forward_with_derivative(h, name, out=(y, np.empty((3, 5))))


def test_scale_cotangent_writes_into_out(rng):
    v, h = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    expected = v * activations.get("tanh").df(h)
    assert kernels.scale_cotangent(v, h, "tanh", out=v) is v  # in place
    np.testing.assert_array_equal(v, expected)
    out = np.empty(4)
    assert kernels.activation_forward(h[0], "relu", out=out) is out


def test_dispatcher_errors_name_the_problem(rng):
    v = rng.normal(size=(3, 4))
    with pytest.raises(ValueError, match=r"x has shape \(3,\) but v has shape \(3, 4\)"):
        kernels.scale_cotangent(v, np.zeros(3), "tanh")
    with pytest.raises(TypeError, match="v is float64 but x is float32"):
        kernels.scale_cotangent(v, np.zeros(4, np.float32), "tanh")
    with pytest.raises(ValueError, match=r"'gelu' has no derivative from its output.*tanh"):
        kernels.scale_cotangent(v, np.zeros(4), "gelu", from_output=True)
    with pytest.raises(KeyError, match="valid names: identity"):
        kernels.derivative(v, "swish")
    with pytest.raises(TypeError, match="name or an Activation"):
        kernels.derivative(v, 3)
    with pytest.raises(ValueError, match=r"out has shape \(4,\) but the result is \(3, 4\)"):
        kernels.scale_cotangent(v, np.zeros(4), "tanh", out=np.empty(4))
    with pytest.raises(TypeError, match="out has dtype float32"):
        kernels.derivative(v, "relu", out=np.empty((3, 4), np.float32))


# --- the CuPy kernels against the float64 NumPy reference (needs a GPU) -----------------

TOL = {np.float32: 1e-5, np.float64: 1e-12}
SPECIAL = np.array([0.0, 1.0, -1.0, 1e-8, -1e-8, 20.0, -20.0, 1000.0, -1000.0, np.inf, -np.inf])


def gpu_inputs(rng, dtype):
    h = np.concatenate([rng.normal(0.0, 3.0, 6 * 64 - SPECIAL.size), SPECIAL]).reshape(6, 64)
    return h.astype(dtype), rng.normal(size=(6, 64)).astype(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_kernels_match_numpy(name, dtype, rng):
    import cupy as cp

    act, tol = activations.get(name), TOL[dtype]
    h, v = gpu_inputs(rng, dtype)
    h64, v64 = h.astype(np.float64), v.astype(np.float64)

    def check(got, reference, what):
        assert got.dtype == dtype, f"{name} {what}: {got.dtype}"
        message = f"{name} {what} {dtype.__name__}"
        np.testing.assert_allclose(cp.asnumpy(got), reference, rtol=tol, atol=tol, err_msg=message)

    gh, gv = cp.asarray(h), cp.asarray(v)
    check(kernels.activation_forward(gh, name), act.f(h64), "activation_forward")
    check(kernels.derivative(gh, name), act.df(h64), "derivative")
    check(kernels.scale_cotangent(gv, gh, name), v64 * act.df(h64), "scale_cotangent")
    check(kernels.scale_cotangent(gv, gh[2], name), v64 * act.df(h64[2]), "scale_cotangent, (H,) broadcast")
    y, d = kernels.forward_with_derivative(gh, name)
    check(y, act.f(h64), "forward_with_derivative y")
    check(d, act.df(h64), "forward_with_derivative d")
    check(act.f(gh), act.f(h64), "Activation.f on CuPy")
    check(act.df(gh), act.df(h64), "Activation.df on CuPy")
    if act.df_from_output is not None:
        y = act.f(h)  # the output in dtype, as a layer would have saved it
        gy, d64 = cp.asarray(y), act.df_from_output(y.astype(np.float64))
        check(kernels.scale_cotangent(gv, gy, name, from_output=True), v64 * d64, "from output")
        check(kernels.scale_cotangent(gv, gy[1], name, from_output=True), v64 * d64[1], "from output, broadcast")
        check(kernels.derivative(gy, name, from_output=True), d64, "derivative from output")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_erf_matches_numpy(dtype):
    import cupy as cp

    x = np.linspace(-8.0, 8.0, 4001).astype(dtype)
    for fn in (activations.erf, activations.erfc):
        got = fn(cp.asarray(x))
        assert got.dtype == dtype
        np.testing.assert_allclose(cp.asnumpy(got), fn(x.astype(np.float64)), rtol=TOL[dtype], atol=TOL[dtype] * 1e-3)


@pytest.mark.gpu
def test_gpu_compile_report():
    report = kernels.compile_report()
    assert all(ok for _, ok, _ in report), report


@pytest.mark.parametrize("name", [n for n in NAMES if activations.get(n).df_from_output_into is not None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_df_from_output_into_is_bitwise_and_reuses_its_work_arrays(name, dtype, rng):
    act = activations.get(name)
    y = act.f(rng.standard_normal((6, 9)).astype(dtype) * 3)
    y[0, :3] = [0.0, 1.0, -1.0]
    v = rng.standard_normal((6, 9)).astype(dtype)
    out, work = np.empty_like(y), np.empty_like(y)
    np.testing.assert_array_equal(act.df_from_output_into(y, out, work), act.df_from_output(y))
    first = kernels.scale_cotangent(v, y, act, from_output=True)
    np.testing.assert_array_equal(first, v * act.df_from_output(y))
    kept = kernels.scratch_nbytes()
    assert kept == 2 * y.nbytes
    again = kernels.scale_cotangent(v, y, act, from_output=True, out=v.copy())
    np.testing.assert_array_equal(again, first)
    assert kernels.scratch_nbytes() == kept  # reused, not grown

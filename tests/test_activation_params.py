"""The parameterised activations: leaky_relu(negative_slope), elu(alpha), softplus(beta, threshold),
hard_tanh(min_val, max_val) — the spelling, the errors, PyTorch autograd for several parameter
values, the bound, and the CUDA header built for the host against the NumPy table."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.elementwise import activations
from jacgrad.cuda import kernels

# (name, keyword parameters, how torch computes it on x with F = torch.nn.functional)
CASES = [
    ("leaky_relu", {"negative_slope": 0.2}, "F.leaky_relu(x, 0.2)"),
    ("leaky_relu", {"negative_slope": 1e-3}, "F.leaky_relu(x, 1e-3)"),
    ("leaky_relu", {"negative_slope": 3.0}, "F.leaky_relu(x, 3.0)"),
    ("elu", {"alpha": 0.5}, "F.elu(x, alpha=0.5)"),
    ("elu", {"alpha": 2.5}, "F.elu(x, alpha=2.5)"),
    ("softplus", {"beta": 2.0}, "F.softplus(x, beta=2.0)"),
    ("softplus", {"beta": 0.5, "threshold": 3.0}, "F.softplus(x, beta=0.5, threshold=3.0)"),
    ("softplus", {"beta": 1.0, "threshold": 5.0}, "F.softplus(x, threshold=5.0)"),
    ("hard_tanh", {"min_val": -2.0, "max_val": 0.5}, "F.hardtanh(x, -2.0, 0.5)"),
    ("hard_tanh", {"min_val": 0.0, "max_val": 6.0}, "F.hardtanh(x, 0.0, 6.0)"),  # relu6
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}" for n, p, _ in CASES]
PIECEWISE_LINEAR = {"leaky_relu", "hard_tanh"}
EPS = np.finfo(np.float64).eps


def row(case):
    name, params, _ = case
    return activations.get(name, **params)


# --- spelling -----------------------------------------------------------------------------

def test_keywords_and_the_spelled_name_give_the_same_row():
    act = activations.get("leaky_relu", negative_slope=0.2)
    assert act.name == "leaky_relu(negative_slope=0.2)"
    assert activations.get(act.name) is act
    assert activations.get("leaky_relu( negative_slope = 0.2 )") is act
    assert act.params == (("negative_slope", 0.2),) and act.kernel_args == (0.2, 0.0)
    ht = activations.get("hard_tanh", min_val=-2, max_val=2)
    assert ht.name == "hard_tanh(min_val=-2.0,max_val=2.0)" and activations.get(ht.name) is ht
    # only the parameters that differ from torch's defaults are spelled; all defaults: the bare name
    assert activations.get("softplus", beta=2.0, threshold=20.0).name == "softplus(beta=2.0)"
    assert activations.get("elu(alpha=1.0)") is activations.get("elu")
    assert activations.get("hard_tanh", max_val=3.0).name == "hard_tanh(max_val=3.0)"
    assert activations.parameters("softplus") == {"beta": 1.0, "threshold": 20.0}
    assert activations.parameters("tanh") == {}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_name_round_trips(case):
    act = row(case)
    assert activations.get(act.name) is act
    assert dict(act.params) == {**activations.parameters(case[0]), **{k: float(v) for k, v in case[1].items()}}


def test_split_names_keeps_the_parameters_together():
    got = activations.split_names("relu,hard_tanh(min_val=-2.0, max_val=2.0) , elu(alpha=0.5),identity")
    assert got == ["relu", "hard_tanh(min_val=-2.0,max_val=2.0)", "elu(alpha=0.5)", "identity"]
    with pytest.raises(ValueError, match="empty entry"):
        activations.split_names("relu,,tanh")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: activations.get("elu", beta=2.0), TypeError, "'elu' has no parameter 'beta'; its parameters: alpha"),
        (lambda: activations.get("elu(beta=2.0)"), TypeError, "has no parameter 'beta'"),
        (lambda: activations.get("tanh", alpha=1.0), TypeError, "'tanh' takes no parameters"),
        (lambda: activations.get("tanh(alpha=1.0)"), TypeError, "'tanh' takes no parameters"),
        (lambda: activations.get("elu(alpha=0.5)", alpha=0.5), TypeError, "alpha given both"),
        (lambda: activations.get("elu(alpha=0.5"), ValueError, r"closed by '\)'"),
        (lambda: activations.get("elu(0.5)"), ValueError, "key=value"),
        (lambda: activations.get("elu(alpha=big)"), ValueError, "'big' is not a number"),
        (lambda: activations.get("elu", alpha="big"), TypeError, "alpha must be a real number"),
        (lambda: activations.get("elu", alpha=float("nan")), ValueError, "alpha must be finite"),
        (lambda: activations.get("softplus", beta=0.0), ValueError, "beta must be > 0"),
        (lambda: activations.get("leaky_relu", negative_slope=-0.1), ValueError, "negative_slope must be > 0"),
        (lambda: activations.get("leaky_relu", negative_slope=0.0), ValueError, "use 'relu'"),
        (lambda: activations.get("elu", alpha=-1.0), ValueError, "alpha must be ≥ 0"),
        (lambda: activations.get("hard_tanh", min_val=1.0, max_val=1.0), ValueError, "min_val must be below max_val"),
        (lambda: activations.get("swish(beta=1.0)"), KeyError, r"valid names: .*elu\(alpha=1.0\)"),
        (lambda: activations.get(activations.get("elu"), alpha=2.0), TypeError, "not with an Activation"),
    ],
)
def test_bad_parameters_are_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- the math -----------------------------------------------------------------------------

def grid_for(act):
    kinks = list(act.kinks)
    base = np.linspace(-12.0, 12.0, 2401)
    near = [k + s for k in kinks for s in (0.0, 1e-9, -1e-9, 1e-3, -1e-3)]
    return np.concatenate([base, near, [1e-300, -1e-300, 30.0, -30.0]])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_torch_autograd(case):
    torch = pytest.importorskip("torch")
    act = row(case)
    grid = grid_for(act)
    x = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
    y = eval(case[2], {"F": torch.nn.functional, "x": x})
    (dy,) = torch.autograd.grad(y.sum(), x)
    for what, ours, theirs in [("f", act.f(grid), y.detach().numpy()), ("df", act.df(grid), dy.numpy())]:
        if case[0] in PIECEWISE_LINEAR:
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{act.name}.{what}")
        else:
            gap = np.abs(ours - theirs) / (EPS * np.maximum(1.0, np.abs(grid)))
            assert gap.max() <= 4, f"{act.name}.{what}: {gap.max():.1f} eps from torch at h={grid[gap.argmax()]}"
    if act.df_from_output is not None:
        np.testing.assert_allclose(act.df_from_output(act.f(grid)), act.df(grid), rtol=4 * EPS, atol=4 * EPS)


@pytest.mark.parametrize(
    "name, params, h, expected",
    [("leaky_relu", {"negative_slope": 0.2}, 0.0, 0.2), ("elu", {"alpha": 2.5}, 0.0, 2.5),
     ("hard_tanh", {"min_val": -2.0, "max_val": 0.5}, -2.0, 0.0), ("hard_tanh", {"min_val": -2.0, "max_val": 0.5}, 0.5, 0.0),
     ("softplus", {"beta": 2.0, "threshold": 10.0}, 5.0, 1 / (1 + np.exp(-10.0))),  # beta·h = threshold: the log side
     ("softplus", {"beta": 2.0, "threshold": 10.0}, 5.0 + 1e-12, 1.0)],
)
def test_kinks_follow_torch(name, params, h, expected):
    act = activations.get(name, **params)
    assert act.df(np.array([h]))[0] == expected
    if act.df_from_output is not None:
        assert act.df_from_output(act.f(np.array([h])))[0] == expected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bound_is_the_sup_and_df_matches_differences(case, rng):
    act = row(case)
    grid = np.linspace(-20.0, 20.0, 400001)
    peak = np.abs(act.df(grid)).max()
    assert peak <= act.bound and act.bound - peak < 1e-6, f"{act.name}: bound {act.bound}, grid max {peak}"
    x = rng.uniform(-6.0, 6.0, 400)
    for k in act.kinks:
        x = x[np.abs(x - k) > 1e-3]
    numeric = (act.f(x + 1e-6) - act.f(x - 1e-6)) / 2e-6
    np.testing.assert_allclose(act.df(x), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_float32_stays_float32_and_ends_are_finite(case):
    act = row(case)
    h = np.array([-np.inf, -1000.0, -1.0, 0.0, 1.0, 1000.0, np.inf], np.float32)
    f, df = act.f(h), act.df(h)  # RuntimeWarnings are errors in this suite
    assert f.dtype == df.dtype == np.float32
    assert np.isfinite(df).all()
    np.testing.assert_allclose(f, act.f(h.astype(np.float64)), rtol=1e-6, atol=1e-37)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dispatchers_use_the_parameters(case, rng):
    act = row(case)
    v, h = rng.normal(size=(4, 5)), rng.normal(0.0, 4.0, size=(4, 5))
    np.testing.assert_array_equal(kernels.scale_cotangent(v, h, act.name), v * act.df(h))
    np.testing.assert_array_equal(kernels.activation_forward(h, act), act.f(h))
    y, d = kernels.forward_with_derivative(h, act)
    np.testing.assert_array_equal(d, act.df(h))
    if act.df_from_output is not None:
        y = act.f(h)
        np.testing.assert_array_equal(kernels.scale_cotangent(v, y, act, from_output=True), v * act.df_from_output(y))


def test_an_mlp_keeps_and_saves_the_parameters(tmp_path, rng):
    names = ["leaky_relu(negative_slope=0.2)", "hard_tanh(min_val=-2.0,max_val=0.5)", "softplus(beta=2.0)"]
    net = jg.MLP([rng.normal(size=(3, 4)), rng.normal(size=(4, 4)), rng.normal(size=(4, 2))], None, names)
    assert net.activations == names
    x = rng.normal(size=(5, 3))
    h0 = x @ net.weights[0]
    z0 = np.where(h0 > 0, h0, 0.2 * h0)  # independent of the table
    z1 = np.clip(z0 @ net.weights[1], -2.0, 0.5)
    h2 = 2.0 * (z1 @ net.weights[2])
    np.testing.assert_allclose(net(x), np.logaddexp(0.0, h2) / 2.0, rtol=1e-13)
    net.save(tmp_path / "net.npz")
    back = jg.MLP.load(tmp_path / "net.npz")
    assert back.activations == names
    np.testing.assert_array_equal(back(x), net(x))


# --- the CUDA header, built for the host, against the NumPy table ---------------------------

DRIVER = r"""
#include <cstdio>
#include <vector>
#include "activations.cuh"

template <class Act, class T> void run(int c, double a, double b, const char* type, const std::vector<double>& xs) {
  const jacgrad::Params<T> p{static_cast<T>(a), static_cast<T>(b)};
  for (size_t i = 0; i < xs.size(); ++i) {
    const T x = static_cast<T>(xs[i]);
    std::printf("%d %s f %zu %a\n", c, type, i, (double)Act::template f<T>(x, p));
    std::printf("%d %s df %zu %a\n", c, type, i, (double)Act::template df<T>(x, p));
    if constexpr (Act::has_df_y)
      std::printf("%d %s df_y %zu %a\n", c, type, i, (double)Act::template df_y<T>(x, p));
  }
}

int main() {
  std::vector<double> xs;
  double v;
  while (std::scanf("%la", &v) == 1) xs.push_back(v);
%CALLS%
  return 0;
}
"""
CTYPE = {"float": np.float32, "double": np.float64}


def host_points(acts):
    rng = np.random.default_rng(3)
    grid = [0.0, 1e-30, 1e-8, 0.5, 1.0, 3.0, 20.0, 1000.0, np.inf]
    kinks = [k + s for a in acts for k in a.kinks for s in (0.0, 1e-6, -1e-6)]
    return np.concatenate([grid, np.negative(grid), [np.nan], kinks, rng.normal(0.0, 4.0, 200)])


@pytest.mark.parametrize("compiler", ["g++", "nvcc"])
def test_header_with_parameters_matches_the_numpy_table(compiler, tmp_path):
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} is not on PATH")
    acts = [row(c) for c in CASES]
    calls = "\n".join(
        f'  run<{a.cuda}, {ct}>({i}, {float(a.kernel_args[0])!r}, {float(a.kernel_args[1])!r}, "{ct}", xs);'
        for i, a in enumerate(acts) for ct in CTYPE
    )
    (tmp_path / "driver.cpp").write_text(DRIVER.replace("%CALLS%", calls))
    cmd = [compiler, "-std=c++17", "-O2", f"-I{kernels.source_dir()}", "driver.cpp", "-o", "driver"]
    if compiler == "nvcc":
        cmd[1:1] = ["-x", "cu"]
    else:
        cmd[1:1] = ["-Wall", "-Werror"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True, timeout=300)
    points = host_points(acts)
    out = subprocess.run([str(tmp_path / "driver")], input="\n".join(float(p).hex() for p in points),
                         capture_output=True, text=True, check=True, timeout=60).stdout
    host: dict = {}
    for line in out.splitlines():
        c, ct, fn, i, v = line.split()
        host.setdefault((int(c), ct, fn), np.empty(len(points)))[int(i)] = float.fromhex(v.replace("-nan", "nan"))
    failures = []
    for i, (act, case) in enumerate(zip(acts, CASES)):
        for ct, dtype in CTYPE.items():
            x = points.astype(dtype)
            with np.errstate(invalid="ignore", over="ignore"):
                table = {"f": act.f(x), "df": act.df(x)}
                if act.df_from_output is not None:
                    table["df_y"] = act.df_from_output(x)
            assert {fn for (c, t, fn) in host if c == i and t == ct} == set(table), f"{act.name}: has_df_y disagrees"
            for fn, ref in table.items():
                got = host[(i, ct, fn)].astype(dtype)
                same = (got == ref) | (np.isnan(got) & np.isnan(ref))
                with np.errstate(invalid="ignore"):
                    gap = np.abs(got.astype(np.float64) - ref) / np.spacing(np.abs(ref)).astype(np.float64)
                ulps = np.where(same, 0.0, gap)
                limit = 0 if case[0] in PIECEWISE_LINEAR else 4
                if not ulps.max() <= limit:
                    j = int(np.nanargmax(ulps))
                    failures.append(f"{act.name} {ct} {fn}: {ulps[j]} ulp at h={points[j]!r}: {got[j]!r} vs {ref[j]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gpu_kernels_take_the_parameters(case, dtype, rng):
    import cupy as cp

    act, tol = row(case), {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    h = rng.normal(0.0, 4.0, (6, 64)).astype(dtype)
    v = rng.normal(size=(6, 64)).astype(dtype)
    h64, v64 = h.astype(np.float64), v.astype(np.float64)
    gh, gv = cp.asarray(h), cp.asarray(v)
    pairs = [(kernels.activation_forward(gh, act), act.f(h64)), (kernels.derivative(gh, act), act.df(h64)),
             (kernels.scale_cotangent(gv, gh, act), v64 * act.df(h64)), *zip(kernels.forward_with_derivative(gh, act),
                                                                            (act.f(h64), act.df(h64)))]
    if act.df_from_output is not None:
        y = act.f(h)
        pairs.append((kernels.scale_cotangent(gv, cp.asarray(y), act, from_output=True),
                      v64 * act.df_from_output(y.astype(np.float64))))
    for got, ref in pairs:
        assert got.dtype == dtype
        np.testing.assert_allclose(cp.asnumpy(got), ref, rtol=tol, atol=tol, err_msg=act.name)

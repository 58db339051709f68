"""The activation table: one spec per activation, one checker per property.

Every activation is checked for its derivative (finite differences, and the from-output form),
its sup|φ'| bound, dtype preservation, limits at ±1000 and ±inf, and against PyTorch autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from jacgrad.elementwise import activations

EPS = np.finfo(np.float64).eps
INF = math.inf
SCALE, SA = 1.0507009873554804934193349852946, 1.0507009873554804934193349852946 * 1.6732632423543772848170429916717


@dataclass(frozen=True)
class Spec:
    name: str
    torch: str  # how to call it on a tensor x (evaluated with F = torch.nn.functional)
    # f and df at (-inf, -1000, 1000, inf): the limits the math gives
    f_ends: tuple[float, float, float, float]
    df_ends: tuple[float, float, float, float]


SPECS = [
    Spec("identity", "x", (-INF, -1000.0, 1000.0, INF), (1, 1, 1, 1)),
    Spec("relu", "F.relu(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("leaky_relu", "F.leaky_relu(x)", (-INF, -10.0, 1000.0, INF), (0.01, 0.01, 1, 1)),
    Spec("sigmoid", "torch.sigmoid(x)", (0, 0, 1, 1), (0, 0, 0, 0)),
    Spec("tanh", "torch.tanh(x)", (-1, -1, 1, 1), (0, 0, 0, 0)),
    # torch's threshold=20: the identity above it, as ours
    Spec("softplus", "F.softplus(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("elu", "F.elu(x)", (-1, -1, 1000.0, INF), (0, 0, 1, 1)),
    Spec("gelu", "F.gelu(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("gelu_tanh", "F.gelu(x, approximate='tanh')", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("silu", "F.silu(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("hard_tanh", "F.hardtanh(x)", (-1, -1, 1, 1), (0, 0, 0, 0)),
    # the rows of _activation_more (tests/test_activations_more.py checks them further)
    Spec("mish", "F.mish(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("selu", "F.selu(x)", (-SA, -SA, 1000.0 * SCALE, INF), (0, 0, SCALE, SCALE)),
    Spec("hard_swish", "F.hardswish(x)", (0, 0, 1000.0, INF), (0, 0, 1, 1)),
    Spec("hard_sigmoid", "F.hardsigmoid(x)", (0, 0, 1, 1), (0, 0, 0, 0)),
    Spec("softsign", "F.softsign(x)", (-1, -1000 / 1001, 1000 / 1001, 1), (0, (1 / 1001) * (1 / 1001),
                                                                           (1 / 1001) * (1 / 1001), 0)),
    Spec("log_sigmoid", "F.logsigmoid(x)", (-INF, -1000.0, 0, 0), (1, 1, 0, 0)),
]
BY_NAME = {s.name: s for s in SPECS}
ENDS = np.array([-INF, -1000.0, 1000.0, INF])
PIECEWISE_LINEAR = {"identity", "relu", "leaky_relu", "hard_tanh", "hard_swish"}  # bitwise torch's
# torch's float64 hardsigmoid backward multiplies by a float32 1/6; ours is 1/6 (test_activations_more)
TORCH_ROUNDS_DF = {"hard_sigmoid": 3e-8}


@pytest.fixture(params=[s.name for s in SPECS])
def act(request):
    return activations.get(request.param)


def away_from_kinks(act, x, margin=1e-3):
    for k in act.kinks:
        x = x[np.abs(x - k) > margin]
    return x


# --- the table --------------------------------------------------------------------------

def test_table_lists_every_activation():
    assert activations.names() == [s.name for s in SPECS]
    for name in activations.names():
        act = activations.get(name)
        assert act.name == name and act.cuda.startswith("jacgrad::")
        assert activations.get(act) is act


def test_names_is_every_row_of_the_table_once():
    # names() is a hand-written order: a row added to the fixed table or to the parameterised
    # families but not to it would get no kernel instantiation (kernels._functors reads names())
    from jacgrad.elementwise.activation_params import _FAMILIES

    rows = [a.name for a in activations._FIXED + activations._MORE] + list(_FAMILIES)
    assert sorted(activations.names()) == sorted(rows) and len(set(rows)) == len(rows)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(KeyError) as info:
        activations.get("swish")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'swish'" in message
    assert all(name in message for name in activations.names())


def test_from_output_exists_exactly_where_it_is_exact():
    have = {n for n in activations.names() if activations.get(n).df_from_output is not None}
    assert have == {"identity", "relu", "leaky_relu", "sigmoid", "tanh", "elu", "hard_tanh", "selu", "softsign",
                    "log_sigmoid"}


# --- derivatives ------------------------------------------------------------------------

def test_df_matches_central_differences(act, rng):
    x = away_from_kinks(act, rng.uniform(-6.0, 6.0, 400))
    step = 1e-5
    numeric = (act.f(x + step) - act.f(x - step)) / (2 * step)
    np.testing.assert_allclose(act.df(x), numeric, rtol=1e-7, atol=1e-9)


WITH_OUTPUT_FORM = [n for n in activations.names() if activations.get(n).df_from_output is not None]


@pytest.mark.parametrize("name", WITH_OUTPUT_FORM)
def test_df_from_output_agrees_with_df(name, rng):
    act = activations.get(name)
    h = np.concatenate([rng.uniform(-8.0, 8.0, 1000), [-30.0, -1.0, -1e-8, 0.0, 1e-8, 1.0, 30.0], ENDS])
    # tanh and sigmoid's output forms cancel (1 - y², y(1 - y)); exact for the piecewise ones
    np.testing.assert_allclose(act.df_from_output(act.f(h)), act.df(h), rtol=4 * EPS, atol=4 * EPS)


@pytest.mark.parametrize(
    "name, h, expected",
    [("relu", 0.0, 0.0), ("leaky_relu", 0.0, 0.01), ("hard_tanh", 1.0, 0.0), ("hard_tanh", -1.0, 0.0),
     ("elu", 0.0, 1.0), ("selu", 0.0, SA), ("hard_swish", -3.0, 0.0), ("hard_swish", 3.0, 1.0),
     ("hard_sigmoid", -3.0, 0.0), ("hard_sigmoid", 3.0, 0.0)],
)
def test_kink_conventions_are_torchs(name, h, expected):
    act = activations.get(name)
    assert act.df(np.array([h]))[0] == expected
    if act.df_from_output is not None:
        assert act.df_from_output(act.f(np.array([h])))[0] == expected


# --- bounds -----------------------------------------------------------------------------

def test_bound_is_the_sup_of_the_derivative(act):
    grid = np.linspace(-20.0, 20.0, 400001)
    peak = np.abs(act.df(grid)).max()
    assert peak <= act.bound
    if act.smooth:
        assert act.bound - peak < 1e-6, f"{act.name}: bound {act.bound} but max |φ'| on the grid is {peak}"


@pytest.mark.parametrize("name, start", [("gelu", 1.4), ("gelu_tanh", 1.4), ("silu", 2.4)])
def test_bound_rederived_with_mpmath(name, start):
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    s = lambda h: 1 / (1 + mp.exp(-h))  # noqa: E731
    k0, k1 = mp.sqrt(2 / mp.pi), mp.mpf("0.044715")
    df = {
        "gelu": lambda h: mp.ncdf(h) + h * mp.npdf(h),
        "gelu_tanh": lambda h: mp.diff(lambda t: t / 2 * (1 + mp.tanh(k0 * (t + k1 * t**3))), h),
        "silu": lambda h: s(h) * (1 + h * (1 - s(h))),
    }[name]
    sup = df(mp.findroot(lambda h: mp.diff(df, h), start))
    bound = activations.get(name).bound
    assert sup <= bound <= sup + 1e-14


# --- dtypes, extremes -------------------------------------------------------------------

def test_float32_stays_float32(act, rng):
    h64 = rng.normal(0.0, 3.0, 1000)
    h = h64.astype(np.float32)
    fns = [("f", act.f(h), act.f(h64)), ("df", act.df(h), act.df(h64))]
    if act.df_from_output is not None:
        fns.append(("df_from_output", act.df_from_output(act.f(h)), act.df_from_output(act.f(h64))))
    for what, got, reference in fns:
        assert got.dtype == np.float32, f"{act.name}.{what} returned {got.dtype} for float32 input"
        np.testing.assert_allclose(got, reference, rtol=2e-6, atol=2e-6 * act.bound, err_msg=f"{act.name}.{what}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_limits_at_large_and_infinite_inputs(act, dtype):
    spec = BY_NAME[act.name]
    h = ENDS.astype(dtype)
    f, df = act.f(h), act.df(h)  # RuntimeWarnings are errors in this suite
    np.testing.assert_allclose(f, np.array(spec.f_ends, dtype), rtol=1e-6, err_msg=f"{act.name}.f at ±1000, ±inf")
    np.testing.assert_array_equal(df, np.array(spec.df_ends, dtype), err_msg=f"{act.name}.df at ±1000, ±inf")
    if act.df_from_output is not None:
        np.testing.assert_allclose(act.df_from_output(f), df, atol=1e-6)


def test_nan_propagates_through_f(act):
    with np.errstate(invalid="ignore"):
        assert np.isnan(act.f(np.array([np.nan]))).all()


def test_scalars_and_lists_are_accepted():
    assert activations.get("relu").f([-1.0, 2.0]).tolist() == [0.0, 2.0]
    with pytest.raises(TypeError, match="int64"):
        activations.get("tanh").f(np.arange(3))


# --- against PyTorch autograd ----------------------------------------------------------

def test_matches_torch_autograd(act):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional  # noqa: N806 (used by the spec strings)
    grid = np.concatenate([np.linspace(-12.0, 12.0, 2401), [0.0, 1.0, -1.0, 1e-300, -1e-300, 30.0, -30.0]])
    x = torch.tensor(grid, dtype=torch.float64, requires_grad=True)
    y = eval(BY_NAME[act.name].torch, {"torch": torch, "F": F, "x": x})
    (dy,) = torch.autograd.grad(y.sum(), x)
    for what, ours, theirs in [("f", act.f(grid), y.detach().numpy()), ("df", act.df(grid), dy.numpy())]:
        if act.name in PIECEWISE_LINEAR:
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{act.name}.{what}")
        elif what == "df" and act.name in TORCH_ROUNDS_DF:
            np.testing.assert_allclose(ours, theirs, rtol=TORCH_ROUNDS_DF[act.name], atol=0, err_msg=act.name)
        else:
            # torch's 1 - tanh², 1 + erf, 1 + tanh cancel in the tails, so the two agree to a few
            # ulp of max(1, |h|) — not relatively where the value is tiny (ours keeps those digits)
            gap = np.abs(ours - theirs) / (EPS * np.maximum(1.0, np.abs(grid)))
            worst = grid[gap.argmax()]
            assert gap.max() <= 4, f"{act.name}.{what}: {gap.max():.1f} eps·max(1,|h|) from torch at h={worst}"


@pytest.mark.parametrize("name", [n for n in activations.names() if activations.get(n).f_and_df is not None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_f_and_df_are_bitwise_f_and_df(name, dtype):
    act = activations.get(name)
    h = np.concatenate([np.linspace(-40, 40, 4001), [0.0, -0.0, 1e-30, -1e-30, 1000.0, -1000.0, INF, -INF]]).astype(dtype)
    f, df = act.f_and_df(h)
    np.testing.assert_array_equal(f, act.f(h))
    np.testing.assert_array_equal(df, act.df(h))
    assert f.dtype == df.dtype == dtype


# --- erf, erfc --------------------------------------------------------------------------

def ulps(ours, reference):
    return np.abs(ours - reference) / np.spacing(np.abs(reference))


def test_erf_within_2_ulp_of_math_erf():
    x = np.concatenate([np.linspace(-7.0, 7.0, 140001), np.logspace(-310, 1, 3000), -np.logspace(-310, 1, 3000),
                        [0.84375, 1.25, 1 / 0.35, 6.0, 28.0, 2.0**-28, 2.0**-56]])
    assert ulps(activations.erf(x), np.array([math.erf(v) for v in x])).max() <= 2
    assert ulps(activations.erfc(x), np.array([math.erfc(v) for v in x])).max() <= 4


def test_erfc_within_2_ulp_of_the_true_value(rng):
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    x = np.concatenate([rng.uniform(-6.0, 27.0, 1500), np.logspace(-20, 0, 200)])
    reference = np.array([float(mp.erfc(mp.mpf(v))) for v in x])
    assert ulps(activations.erfc(x), reference).max() <= 2


def test_float32_erfc_is_within_half_an_ulp_plus_a_hair_of_the_true_value():
    """The float32 form (fitted polynomial, chunked) against math.erfc in float64: the error of
    the float32 result, in float32 ulps of the true value (0.5 = correctly rounded)."""
    x = np.concatenate([np.linspace(-11.0, 11.0, 300001), np.logspace(-30, 1.05, 20001), -np.logspace(-30, 1.05, 20001),
                        [10.04, 10.05, 10.1, 10.5, 10.6, 12.0]]).astype(np.float32)
    got = activations.erfc(x)
    exact = np.array([math.erfc(float(v)) for v in x])
    ulp32 = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - exact) / np.maximum(ulp32, np.finfo(np.float32).smallest_subnormal)
    assert got.dtype == np.float32 and err.max() <= 0.51, f"{err.max():.3f} ulp at x={x[err.argmax()]}"
    assert np.mean(got != exact.astype(np.float32)) < 1e-3  # all but a few correctly rounded


@pytest.mark.parametrize("shape", [(), (0,), (16384,), (16385,), (3, 7001), (2, 0, 5)])
def test_float32_erfc_keeps_shapes_across_chunk_boundaries(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32) * 4
    got = activations.erfc(x)
    assert got.shape == x.shape and got.dtype == np.float32
    ref = activations.erfc(x.astype(np.float64)).astype(np.float32)  # the fdlibm path, rounded
    assert np.all(np.abs(got - ref) <= np.spacing(np.abs(ref)))
    strided = rng.standard_normal((40, 30)).astype(np.float32)[:, ::3]  # a non-contiguous input
    np.testing.assert_allclose(activations.erfc(strided), activations.erfc(np.ascontiguousarray(strided)), rtol=0)


def test_erf_special_values_and_dtype():
    x = np.array([-INF, -0.0, 0.0, INF, np.nan])
    np.testing.assert_array_equal(activations.erf(x), [-1.0, -0.0, 0.0, 1.0, np.nan])
    np.testing.assert_array_equal(activations.erfc(x), [2.0, 1.0, 1.0, 0.0, np.nan])
    assert activations.erf(np.ones((2, 3), np.float32)).dtype == np.float32
    assert activations.erfc(np.float32(3.0)).dtype == np.float32
    np.testing.assert_array_equal(activations.erfc(x.astype(np.float32)), np.array([2.0, 1.0, 1.0, 0.0, np.nan], np.float32))
    assert activations.erfc(np.array(10.0)) == pytest.approx(2.088487583762545e-45, rel=1e-15)


@pytest.mark.parametrize("name", [n for n in activations.names() if activations.get(n).f_into is not None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_f_into_is_bitwise_f_also_in_place(name, dtype):
    act = activations.get(name)
    h = np.array([0.0, -0.0, 1e-30, -1.0, 1.0, 0.5, -3.0, 20.0, -1000.0, np.inf, -np.inf, np.nan], dtype=dtype)
    expected = act.f(h)
    out = np.empty_like(h)
    assert act.f_into(h, out) is out
    np.testing.assert_array_equal(out, expected)
    inplace = h.copy()
    act.f_into(inplace, inplace)
    np.testing.assert_array_equal(inplace, expected)
    assert inplace.dtype == dtype

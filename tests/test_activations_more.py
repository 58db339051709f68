"""The rows of ``jacgrad.elementwise.activation_more`` (mish, selu, hard_swish, hard_sigmoid, softsign,
log_sigmoid) against torch autograd in float64 (1e-12) and float32, at and around the kinks, and
against mpmath. tests/test_activations.py walks them through the table's common checks too;
tests/test_kernels_host.py compares the CUDA header with them."""

from __future__ import annotations

import numpy as np
import pytest

from jacgrad.elementwise import activations

NEW = ["mish", "selu", "hard_swish", "hard_sigmoid", "softsign", "log_sigmoid"]
TORCH = {"mish": "mish", "selu": "selu", "hard_swish": "hardswish", "hard_sigmoid": "hardsigmoid",
         "softsign": "softsign", "log_sigmoid": "logsigmoid"}
KINKS = [-3.0, 3.0, 0.0]
GRID = np.concatenate([np.linspace(-15.0, 15.0, 3001), KINKS, np.nextafter(KINKS, -np.inf),
                       np.nextafter(KINKS, np.inf), [1e-300, -1e-300, 1e-8, -1e-8, 40.0, -40.0, 300.0, -300.0]])


def torch_values(name, x, dtype):
    torch = pytest.importorskip("torch")
    t = torch.tensor(x, dtype=dtype, requires_grad=True)
    y = getattr(torch.nn.functional, TORCH[name])(t)
    (dy,) = torch.autograd.grad(y.sum(), t)
    return y.detach().numpy(), dy.numpy()


@pytest.mark.parametrize("name", NEW)
def test_float64_matches_torch_to_1e_12(name):
    torch = pytest.importorskip("torch")
    act = activations.get(name)
    y, dy = torch_values(name, GRID, torch.float64)
    np.testing.assert_allclose(act.f(GRID), y, rtol=1e-12, atol=1e-300, err_msg=f"{name}.f")
    rtol = 3e-8 if name == "hard_sigmoid" else 1e-12  # torch's float64 hardsigmoid'(h) is float32(1/6)
    np.testing.assert_allclose(act.df(GRID), dy, rtol=rtol, atol=1e-14, err_msg=f"{name}.df")
    if act.df_from_output is not None:  # the same derivative from the output, also at the kinks
        np.testing.assert_allclose(act.df_from_output(act.f(GRID)), dy, rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("name", NEW)
def test_float32_matches_torch(name):
    torch = pytest.importorskip("torch")
    act = activations.get(name)
    x = GRID.astype(np.float32)
    f, df = act.f(x), act.df(x)
    assert f.dtype == df.dtype == np.float32
    # within a float32 rounding of torch's float64 values at the float32 points...
    y, dy = torch_values(name, x.astype(np.float64), torch.float64)
    np.testing.assert_allclose(f, y, rtol=4e-7, atol=1e-37, err_msg=f"{name}.f")
    np.testing.assert_allclose(df, dy, rtol=4e-7, atol=4e-7, err_msg=f"{name}.df")
    # ... and close to torch's own float32, which loses mish's 1 + O(h e^-2h) tail (1 - t² rounds to 0)
    y32, dy32 = torch_values(name, x, torch.float32)
    np.testing.assert_allclose(f, y32, rtol=1e-6, atol=1e-37, err_msg=f"{name}.f")
    np.testing.assert_allclose(df, dy32, rtol=2e-6, atol=2e-6, err_msg=f"{name}.df")


def test_kinks_follow_torch_autograd():
    torch = pytest.importorskip("torch")
    for name in NEW:
        act = activations.get(name)
        for k in act.kinks:
            x = np.array([k])
            _, dy = torch_values(name, x, torch.float64)
            assert act.df(x)[0] == pytest.approx(dy[0], rel=3e-8), (name, k)
    # the values themselves, written out (torch 2.x): outer pieces at hard_swish's kinks
    assert activations.get("hard_swish").df(np.array([-3.0, 3.0])).tolist() == [0.0, 1.0]
    assert activations.get("hard_sigmoid").df(np.array([-3.0, 3.0])).tolist() == [0.0, 0.0]
    selu = activations.get("selu")
    assert selu.df(np.array([0.0]))[0] == selu.bound == pytest.approx(1.0507009873554805 * 1.6732632423543772)


def test_mish_bound_and_derivatives_against_mpmath(rng):
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    fs = {
        "mish": lambda h: h * mp.tanh(mp.log1p(mp.exp(h))),
        "selu": lambda h: mp.mpf("1.0507009873554804934193349852946") * (
            h if h > 0 else mp.mpf("1.6732632423543772848170429916717") * mp.expm1(h)),
        "softsign": lambda h: h / (1 + abs(h)),
        "log_sigmoid": lambda h: -mp.log1p(mp.exp(-h)),
    }
    for name, f in fs.items():
        act = activations.get(name)
        for h in np.concatenate([rng.normal(0.0, 4.0, 40), [-25.0, -1e-6, 1e-6, 25.0]]):
            if name == "selu" and abs(h) < 1e-5:
                continue
            assert act.f(np.array([h]))[0] == pytest.approx(float(f(mp.mpf(h))), rel=4e-16, abs=1e-300), (name, h)
            assert act.df(np.array([h]))[0] == pytest.approx(float(mp.diff(f, mp.mpf(h))), rel=1e-14, abs=1e-300), \
                (name, h)
    df = lambda h: mp.diff(fs["mish"], h)  # noqa: E731
    sup = df(mp.findroot(lambda h: mp.diff(df, h), 1.5))
    assert sup <= activations.get("mish").bound <= sup + 1e-14


def test_limits_are_the_math_ones_where_torch_gives_nan():
    h = np.array([-np.inf, np.inf])
    assert activations.get("mish").f(h).tolist() == [0.0, np.inf]
    assert activations.get("hard_swish").f(h).tolist() == [0.0, np.inf]
    assert activations.get("softsign").f(h).tolist() == [-1.0, 1.0]
    assert activations.get("softsign").f(np.array([1e30, -1e30], np.float32)).tolist() == [1.0, -1.0]


def test_unknown_name_lists_the_new_rows():
    with pytest.raises(KeyError) as info:
        activations.get("hardswish")
    assert all(n in str(info.value) for n in NEW)

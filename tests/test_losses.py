"""jacgrad.nn.losses: one spec per loss, one checker against finite differences and PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jacgrad.nn import losses
from jacgrad.algebra.check import numerical_jacobian, relative_error

TOL = {np.float32: 1e-5, np.float64: 1e-12}


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Spec:
    id: str
    loss: str
    make: Callable  # (rng, B, C) -> (output or logits (B, C), target), in float64
    torch: Callable  # (F, output tensor, target tensor) -> value


SPECS = [
    Spec("mse", "mse",
         lambda rng, B, C: (rng.standard_normal((B, C)), rng.standard_normal((B, C))),
         lambda F, y, t: F.mse_loss(y, t)),
    Spec("ce-labels", "softmax_cross_entropy",
         lambda rng, B, C: (3 * rng.standard_normal((B, C)), rng.integers(0, C, B)),
         lambda F, z, t: F.cross_entropy(z, t)),
    Spec("ce-probabilities", "softmax_cross_entropy",
         lambda rng, B, C: (3 * rng.standard_normal((B, C)), softmax(rng.standard_normal((B, C)))),
         lambda F, z, t: F.cross_entropy(z, t)),
    Spec("bce-soft", "sigmoid_bce",
         lambda rng, B, C: (3 * rng.standard_normal((B, C)), rng.uniform(0, 1, (B, C))),
         lambda F, z, t: F.binary_cross_entropy_with_logits(z, t)),
    Spec("bce-hard", "sigmoid_bce",
         lambda rng, B, C: (3 * rng.standard_normal((B, C)), rng.integers(0, 2, (B, C)).astype(float)),
         lambda F, z, t: F.binary_cross_entropy_with_logits(z, t)),
]


@pytest.fixture(params=SPECS, ids=[s.id for s in SPECS])
def spec(request):
    return request.param


def _cast(t, dtype):
    return t.astype(dtype) if t.dtype.kind == "f" else t


def _torch_value_and_grad(spec, z, t):
    torch = pytest.importorskip("torch")
    tz = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64 if t.dtype.kind == "f" else torch.long)
    value = spec.torch(torch.nn.functional, tz, tt)
    value.backward()
    return value.detach().numpy(), tz.grad.numpy()


def test_gradient_matches_finite_differences(spec, rng):
    z, t = spec.make(rng, 4, 3)
    fn = losses.get(spec.loss)
    _, grad = fn(z, t)
    assert relative_error(grad, numerical_jacobian(lambda z: fn(z, t)[0], z)) < 1e-7


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_value_and_gradient_match_torch(spec, rng, dtype):
    z, t = spec.make(rng, 5, 4)
    z, t = z.astype(dtype), _cast(t, dtype)
    value, grad = losses.get(spec.loss)(z, t)
    assert value.shape == () and value.dtype == dtype
    assert grad.shape == z.shape and grad.dtype == dtype
    # the reference is float64 torch on the same (rounded) inputs
    ref_value, ref_grad = _torch_value_and_grad(spec, z.astype(np.float64), _cast(t, np.float64))
    assert relative_error(value, ref_value) <= TOL[dtype]
    assert relative_error(grad, ref_grad) <= TOL[dtype]


def test_gradients_have_the_form_prediction_minus_target_over_n(rng):
    z, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    labels = np.array([2, 0, 1, 1])
    onehot = np.eye(3)[labels]
    sigmoid = 1 / (1 + np.exp(-z))
    t = rng.uniform(0, 1, (4, 3))
    assert relative_error(losses.mse(y, t)[1], 2 * (y - t) / 12) < 1e-15
    assert relative_error(losses.softmax_cross_entropy(z, labels)[1], (softmax(z) - onehot) / 4) < 1e-14
    assert relative_error(losses.softmax_cross_entropy(z, onehot)[1], (softmax(z) - onehot) / 4) < 1e-14
    assert relative_error(losses.sigmoid_bce(z, t)[1], (sigmoid - t) / 12) < 1e-14


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_logits_give_exact_finite_results(dtype):
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype=dtype)
    value, grad = losses.softmax_cross_entropy(z, np.array([1, 1]))
    assert value == 1e4  # row 0 pays 2e4, row 1 pays nothing
    assert np.array_equal(grad, np.array([[0.5, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=dtype))
    value_p, grad_p = losses.softmax_cross_entropy(z, np.eye(3, dtype=dtype)[[1, 1]])
    assert value_p == value and np.array_equal(grad_p, grad)

    z = np.array([1e4, -1e4, 1e4, -1e4], dtype=dtype)
    value, grad = losses.sigmoid_bce(z, np.array([1.0, 0.0, 0.0, 1.0], dtype=dtype))
    assert value == 5e3
    assert np.array_equal(grad, np.array([0.0, 0.0, 0.25, -0.25], dtype=dtype))


def test_huge_logits_match_torch(spec, rng):
    z, t = spec.make(rng, 3, 4)
    z = 1e4 * np.sign(z)
    value, grad = losses.get(spec.loss)(z, t)
    ref_value, ref_grad = _torch_value_and_grad(spec, z, t)
    assert np.isfinite(value) and np.isfinite(grad).all()
    assert relative_error(value, ref_value) < 1e-12 and relative_error(grad, ref_grad) < 1e-12


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 5), C=st.integers(1, 5), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_softmax_cross_entropy_properties(B, C, scale, seed):
    rng = np.random.default_rng(seed)
    z, labels = scale * rng.standard_normal((B, C)), rng.integers(0, C, B)
    value, grad = losses.softmax_cross_entropy(z, labels)
    value_p, grad_p = losses.softmax_cross_entropy(z, np.eye(C)[labels])
    assert np.isfinite(value) and value >= 0 and np.isfinite(grad).all()
    assert relative_error(value_p, value) < 1e-12 and relative_error(grad_p, grad) < 1e-12
    assert np.abs(grad.sum(axis=1)).max() < 1e-15 * C  # softmax − one-hot sums to zero per row
    if C == 1:
        assert value == 0 and not grad.any()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), scale=st.sampled_from([1e-3, 1.0, 1e4]),
       seed=st.integers(0, 2**16))
def test_sigmoid_bce_and_mse_properties(shape, scale, seed):
    rng = np.random.default_rng(seed)
    z, t = scale * rng.standard_normal(shape), rng.uniform(0, 1, shape)
    value, grad = losses.sigmoid_bce(z, t)
    assert np.isfinite(value) and value >= 0 and grad.shape == z.shape
    assert np.abs(grad).max() <= 1 / z.size  # |σ(z) − t| ≤ 1
    value, grad = losses.mse(z, t)
    assert value >= 0 and relative_error(grad, 2 * (z - t) / z.size) < 1e-15


def test_empty_batch_gives_zero_and_an_empty_gradient():
    for value, grad, shape in [
        (*losses.mse(np.zeros((0, 3)), np.zeros((0, 3))), (0, 3)),
        (*losses.softmax_cross_entropy(np.zeros((0, 3)), np.zeros(0, dtype=int)), (0, 3)),
        (*losses.softmax_cross_entropy(np.zeros((0, 3)), np.zeros((0, 3))), (0, 3)),
        (*losses.sigmoid_bce(np.zeros((0, 2), dtype=np.float32), np.zeros((0, 2))), (0, 2)),
    ]:
        assert value.shape == () and value == 0.0 and grad.shape == shape


def test_targets_take_the_outputs_dtype():
    y = np.ones((2, 2), dtype=np.float32)
    for fn in (losses.mse, losses.sigmoid_bce, losses.softmax_cross_entropy):
        value, grad = fn(y, np.full((2, 2), 0.5))
        assert value.dtype == grad.dtype == np.float32
    value, grad = losses.mse(y, [[1, 0], [0, 1]])  # Python lists are fine
    assert value == 0.5 and grad.dtype == np.float32
    assert losses.softmax_cross_entropy(y, [0, 1])[0].dtype == np.float32


def test_losses_keep_the_backend_of_their_inputs(xp):
    z = xp.asarray([[0.5, -1.0], [2.0, 0.25]])
    for fn, t in ((losses.mse, z), (losses.sigmoid_bce, z * 0), (losses.softmax_cross_entropy, xp.asarray([1, 0]))):
        value, grad = fn(z, t)
        assert type(value) is type(z) and value.shape == () and type(grad) is type(z)


@pytest.mark.gpu
def test_mixing_numpy_and_cupy_is_an_error():
    cupy = pytest.importorskip("cupy")
    with pytest.raises(TypeError, match="different devices"):
        losses.mse(cupy.ones((2, 2)), np.ones((2, 2)))
    with pytest.raises(TypeError, match="different devices"):
        losses.softmax_cross_entropy(cupy.ones((2, 2)), np.array([0, 1]))


def test_errors_name_what_is_wrong():
    z = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"target has shape \(4, 3\) but the output has shape \(4, 2\)"):
        losses.mse(np.zeros((4, 2)), z)
    with pytest.raises(ValueError, match=r"target has shape \(4, 2\) but the output has shape \(4, 3\)"):
        losses.softmax_cross_entropy(z, np.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"target has shape \(3,\) but the output has shape \(4, 3\)"):
        losses.sigmoid_bce(z, np.zeros(3))
    with pytest.raises(ValueError, match=r"label 3 is out of range for C=3 classes \(labels must be in \[0, 3\)\)"):
        losses.softmax_cross_entropy(z, np.array([0, 1, 3, 2]))
    with pytest.raises(ValueError, match="label -1 is out of range for C=3"):
        losses.softmax_cross_entropy(z, np.array([0, -1, 2, 2]))
    with pytest.raises(ValueError, match=r"labels have shape \(5,\) but the logits have shape \(4, 3\)"):
        losses.softmax_cross_entropy(z, np.zeros(5, dtype=int))
    with pytest.raises(ValueError, match=r"labels have shape \(4, 1\)"):
        losses.softmax_cross_entropy(z, np.zeros((4, 1), dtype=int))
    with pytest.raises(TypeError, match=r"labels must be integers but t is a float64 array of shape \(4,\)"):
        losses.softmax_cross_entropy(z, np.zeros(4))
    with pytest.raises(TypeError, match="target t has dtype bool"):
        losses.softmax_cross_entropy(z, np.zeros(4, dtype=bool))
    with pytest.raises(ValueError, match=r"logits z must be 2-D \(B, C\); got shape \(3,\)"):
        losses.softmax_cross_entropy(np.zeros(3), np.array([0]))
    with pytest.raises(ValueError, match="at least one class"):
        losses.softmax_cross_entropy(np.zeros((2, 0)), np.array([0, 0]))
    with pytest.raises(TypeError, match="logits z has dtype int64"):
        losses.softmax_cross_entropy(np.zeros((4, 3), dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(TypeError, match="logits z has dtype complex128"):
        losses.sigmoid_bce(np.zeros(2, dtype=complex), np.zeros(2))
    with pytest.raises(TypeError, match="target t has dtype int64"):
        losses.mse(z, np.zeros((4, 3), dtype=int))
    with pytest.raises(ValueError, match="unknown loss 'hinge'; valid names: mse, sigmoid_bce, softmax_cross_entropy"):
        losses.get("hinge")
    assert losses.names() == ["mse", "sigmoid_bce", "softmax_cross_entropy"]

"""MLP.from_torch / to_torch against PyTorch itself: for every supported activation module and
parameter value, in float64 and float32, the forward pass, the mse loss, every dW/db/dx (torch
autograd on the original module) and the per-sample Jacobians in all three orders
(torch.func.vmap(jacrev) of the module); copy=False sharing memory with a model that keeps
training; the exact round trip; and the errors for what cannot be imported."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import relative_error

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch

# (activation module factory, the jacgrad name it imports as)
ACTIVATION_MODULES = [
    (lambda: nn.ReLU(), "relu"),
    (lambda: nn.LeakyReLU(), "leaky_relu"),
    (lambda: nn.LeakyReLU(0.2), "leaky_relu(negative_slope=0.2)"),
    (lambda: nn.Tanh(), "tanh"),
    (lambda: nn.Sigmoid(), "sigmoid"),
    (lambda: nn.Softplus(), "softplus"),
    (lambda: nn.Softplus(beta=2.0, threshold=3.0), "softplus(beta=2.0,threshold=3.0)"),
    (lambda: nn.ELU(), "elu"),
    (lambda: nn.ELU(alpha=0.5), "elu(alpha=0.5)"),
    (lambda: nn.GELU(), "gelu"),
    (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"),
    (lambda: nn.SiLU(), "silu"),
    (lambda: nn.Hardtanh(), "hard_tanh"),
    (lambda: nn.Hardtanh(-2.0, 0.5), "hard_tanh(min_val=-2.0,max_val=0.5)"),
    (lambda: nn.ReLU6(), "hard_tanh(min_val=0.0,max_val=6.0)"),
    (lambda: nn.Identity(), "identity"),
]
IDS = [name for _, name in ACTIVATION_MODULES]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def make_model(act, dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6, bias=bias), act(), nn.Dropout(0.3), nn.Linear(6, 3))
    with torch.no_grad():  # wide pre-activations, so kinks, saturation and softplus' threshold are crossed
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(4.0)
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("act, name", ACTIVATION_MODULES, ids=IDS)
def test_matches_torch_autograd_and_torch_func(act, name, dtype):
    model = make_model(act, dtype)
    net = jg.MLP.from_torch(model)
    assert net.activations == [name, name, "identity"]
    assert net.dtype == {torch.float64: np.float64, torch.float32: np.float32}[dtype]
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, dtype=dtype, generator=gen, requires_grad=True)
    t = torch.randn(8, 3, dtype=dtype, generator=gen)

    y_torch = model(x)
    loss_torch = torch.nn.functional.mse_loss(y_torch, t)
    loss_torch.backward()
    y, cache = net.forward(x)
    assert relative_error(y, y_torch.detach().numpy()) <= tol
    loss, g = net.loss_and_grads(x, t, loss="mse")
    assert abs(float(loss) - loss_torch.item()) <= tol * abs(loss_torch.item())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for j, m in enumerate(linears):
        assert relative_error(g.weights[j], m.weight.grad.T.numpy()) <= tol, f"dW{j}"
        ref_b = m.bias.grad.numpy() if m.bias is not None else None
        if ref_b is not None:
            assert relative_error(g.biases[j], ref_b) <= tol, f"db{j}"
    assert relative_error(g.input, x.grad.numpy()) <= tol, "dx"

    jac_torch = torch.func.vmap(torch.func.jacrev(model))(x.detach()).detach().numpy()  # (B, n_out, n_in)
    chain = net.jacobian_chain(cache)
    for order in ("forward", "reverse", "auto"):
        assert relative_error(chain.jacobian(order=order), jac_torch) <= tol, order


def test_weights_are_transposed_views_and_copy_false_shares_the_parameters():
    model = make_model(lambda: nn.Tanh(), torch.float64, bias=False)
    with pytest.raises(TypeError, match="bias=False"):  # an MLP has a bias per layer: Sequential.from_torch reads it
        jg.MLP.from_torch(model)
    shared = jg.Sequential.from_torch(model, copy=False)
    copied = jg.Sequential.from_torch(model)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for j, m in enumerate(linears):
        w = m.weight.detach().numpy()
        W, Wc = shared.layers[j].W, copied.layers[j].W
        assert np.shares_memory(W, w) and W.ctypes.data == m.weight.data_ptr()
        assert W.strides == w.T.strides  # W = weight.T, a view, not a transposed copy
        assert not np.shares_memory(Wc, w)
        np.testing.assert_array_equal(Wc, w.T)
        if m.bias is not None:
            assert np.shares_memory(shared.layers[j].b, m.bias.detach().numpy())
    assert linears[1].bias is None and shared.layers[1].b is None and shared.layers[1].names == ("W",)  # no bias


def test_a_model_that_keeps_training_is_seen_live():
    model = make_model(lambda: nn.SiLU(), torch.float64)
    net = jg.MLP.from_torch(model, copy=False)
    frozen = jg.MLP.from_torch(model, copy=True)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(3)
    x, t = torch.randn(16, 5, dtype=torch.float64, generator=gen), torch.randn(16, 3, dtype=torch.float64, generator=gen)
    before = net(x).copy()
    for _ in range(3):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), t)
        loss.backward()
        opt.step()
        # no re-import: the next forward, loss and gradients are the trained model's
        value, g = net.loss_and_grads(x, t, loss="mse")
        loss_now = torch.nn.functional.mse_loss(model(x), t)
        assert abs(float(value) - loss_now.item()) <= 1e-12 * loss_now.item()
    np.testing.assert_allclose(net(x), model(x).detach().numpy(), rtol=1e-12, atol=1e-13)
    assert np.abs(net(x) - before).max() > 1e-3  # the steps did change it
    np.testing.assert_array_equal(frozen(x), before)  # the copy did not follow


@pytest.mark.parametrize("act, name", ACTIVATION_MODULES, ids=IDS)
def test_round_trip_is_exact(act, name):
    model = make_model(act, torch.float64)
    net = jg.MLP.from_torch(model)
    back = net.to_torch()
    again = jg.MLP.from_torch(back)
    assert again.activations == net.activations
    for W, W2, b, b2 in zip(net.weights, again.weights, net.biases, again.biases):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    x = torch.randn(4, 5, dtype=torch.float64)
    np.testing.assert_array_equal(back(x).detach().numpy(), model(x).detach().numpy())  # same modules, same math
    assert back[0].weight.dtype == torch.float64


def test_round_trip_from_jacgrad(rng):
    acts = ["relu", "elu(alpha=0.5)", "softplus(beta=2.0)", "identity"]
    net = jg.MLP.init([3, 4, 5, 4, 2], activation="tanh", seed=0, dtype="float32")
    net = jg.MLP(net.weights, net.biases, acts)
    module = net.to_torch()
    assert [type(m).__name__ for m in module] == ["Linear", "ReLU", "Linear", "ELU", "Linear", "Softplus", "Linear"]
    back = jg.MLP.from_torch(module)
    assert back.activations == acts and back.dtype == np.float32
    for W, W2 in zip(net.weights, back.weights):
        np.testing.assert_array_equal(W, W2)


def test_iterables_nested_sequentials_flatten_and_two_linears():
    torch.manual_seed(0)
    layers = [nn.Linear(4, 3), nn.Linear(3, 3), nn.Sequential(nn.Flatten(), nn.Tanh(), nn.Identity()), nn.Linear(3, 2)]
    net = jg.MLP.from_torch(layers)
    assert net.activations == ["identity", "tanh", "identity"]
    x = torch.randn(5, 4)
    np.testing.assert_allclose(net(x), nn.Sequential(*layers)(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    single = jg.MLP.from_torch(nn.Linear(4, 2))
    assert single.sizes == [4, 2]


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), TypeError,
         r"module 1 \(BatchNorm1d.*is not supported; supported: Linear, ReLU"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.ReLU(), nn.Conv1d(1, 1, 1))), TypeError,
         r"module 1\.1 \(Conv1d"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2)), ValueError,
         r"module 2 .* takes 5 features but the Linear before it \(module 0\) gives 3"),
        (lambda: nn.Sequential(nn.ReLU(), nn.Linear(4, 3)), TypeError, "module 0 .* comes before any Linear"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Tanh()), TypeError,
         r"module 2 \(Tanh\(\)\) follows another activation \(relu\)"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train(), TypeError, "training mode"),
        (lambda: nn.Sequential(nn.Flatten(0)), TypeError, "flattens"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(-0.5)), ValueError, "negative_slope must be > 0"),
        (lambda: nn.Sequential(), ValueError, "no nn.Linear"),
        (lambda: [nn.Linear(4, 3), "relu"], TypeError, "module 1 is a str"),
        (lambda: 3, TypeError, "nn.Sequential or an iterable"),
        (lambda: nn.Sequential(nn.Linear(4, 3).double(), nn.Linear(3, 2)), TypeError, "dtype"),
    ],
)
def test_what_cannot_be_imported_says_why(build, error, match):
    with pytest.raises(error, match=match):
        jg.MLP.from_torch(build())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_needs_a_dtype(half):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).to(half)
    with pytest.raises(TypeError, match=f"{str(half)[6:]}.*pass dtype='float32'"):
        jg.MLP.from_torch(model)
    net = jg.MLP.from_torch(model, dtype="float32")
    assert net.dtype == np.float32
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().float().T.numpy())
    with pytest.raises(ValueError, match="copy=False cannot share it"):
        jg.MLP.from_torch(model, copy=False, dtype="float32")


def test_torch_missing_is_a_clear_import_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match="needs torch.*pip install torch"):
        jg.MLP.from_torch([])


@pytest.mark.gpu
def test_cuda_model_is_shared_through_dlpack():
    import cupy as cp

    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    model = make_model(lambda: nn.Tanh(), torch.float64).cuda()
    net = jg.MLP.from_torch(model, copy=False)
    assert net.device == "gpu"
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for W, m in zip(net.weights, linears):
        assert isinstance(W, cp.ndarray) and W.data.ptr == m.weight.data_ptr()
    x = torch.randn(4, 5, dtype=torch.float64, device="cuda")
    cp.testing.assert_allclose(net(x), cp.asarray(model(x).detach()), rtol=1e-12)
    back = net.to_torch()
    assert back[0].weight.is_cuda


LOSSES = {
    "mse": lambda y, t: torch.nn.functional.mse_loss(y, t),
    "softmax_cross_entropy": lambda y, t: torch.nn.functional.cross_entropy(y, t),
    "sigmoid_bce": lambda y, t: torch.nn.functional.binary_cross_entropy_with_logits(y, t),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("act, name", [ACTIVATION_MODULES[2], ACTIVATION_MODULES[6], ACTIVATION_MODULES[13]],
                         ids=[IDS[2], IDS[6], IDS[13]])
def test_every_loss_against_torch(act, name, loss, dtype):
    model = make_model(act, dtype, seed=4)
    net = jg.MLP.from_torch(model, copy=False)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, 5, dtype=dtype, generator=gen, requires_grad=True)
    t = {"mse": torch.randn(8, 3, dtype=dtype, generator=gen),
         "softmax_cross_entropy": torch.randint(0, 3, (8,), generator=gen),
         "sigmoid_bce": torch.rand(8, 3, dtype=dtype, generator=gen)}[loss]
    value_torch = LOSSES[loss](model(x), t)
    value_torch.backward()
    value, g = net.loss_and_grads(x, t, loss=loss)  # torch tensors in, the shared parameters
    tol = TOL[dtype]
    assert abs(float(value) - value_torch.item()) <= tol * abs(value_torch.item())
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for j, m in enumerate(linears):
        assert relative_error(g.weights[j], m.weight.grad.T.numpy()) <= tol, f"dW{j}"
        if m.bias is not None:
            assert relative_error(g.biases[j], m.bias.grad.numpy()) <= tol, f"db{j}"
    assert relative_error(g.input, x.grad.numpy()) <= tol

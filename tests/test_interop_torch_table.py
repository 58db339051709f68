"""One activation table between torch modules and jacgrad rows, read by MLP.from_torch,
MLP.to_torch and Sequential.from_torch alike (they used to keep three tables by hand, and the
blocks reader refused every non-default parameter)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import jacgrad as jg  # noqa: E402
from jacgrad.elementwise import activations  # noqa: E402
from jacgrad.io.interop.torch import activation_module, activation_name  # noqa: E402
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

PARAMETERISED = [nn.LeakyReLU(0.2), nn.ELU(0.7), nn.Softplus(beta=2.0, threshold=10.0), nn.Hardtanh(-2.0, 3.0),
                 nn.ReLU6(), nn.GELU(approximate="tanh"), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.ReLU()]


@pytest.mark.parametrize("family", [n for n in activations.names() if n != "identity"])
def test_every_activation_row_has_a_torch_module_and_reads_back(family):
    name = activations.get(family).name
    module = activation_module(nn, name)
    assert activation_name(nn, module) == name
    h = torch.linspace(-4, 4, 101, dtype=torch.float64)
    np.testing.assert_allclose(activations.get(name).f(h.numpy()), module(h).numpy(), rtol=1e-14, atol=1e-15)


def test_subclasses_and_foreign_modules_are_not_activations():
    class MyTanh(nn.Tanh):
        pass

    assert activation_name(nn, MyTanh()) is None
    assert activation_name(nn, nn.Linear(2, 2)) is None
    assert activation_module(nn, "identity") is None


@pytest.mark.parametrize("act", PARAMETERISED, ids=lambda m: repr(m))
def test_blocks_reader_takes_parameterised_activations_like_the_mlp_reader(act):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 5), act, nn.Linear(5, 5))
    model = nn.Sequential(nn.Linear(4, 5), act, Residual(inner, 0.5), nn.Linear(5, 3)).double()
    net = jg.Sequential.from_torch(model)
    assert net.layers[0].activation == activation_name(nn, act)
    x = torch.randn(6, 4, dtype=torch.float64)
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=1e-12, atol=1e-13)
    mlp = jg.MLP.from_torch(nn.Sequential(nn.Linear(4, 5), act, nn.Linear(5, 3)))
    assert mlp.activations[0] == net.layers[0].activation


def test_blocks_reader_error_lists_the_supported_modules():
    with pytest.raises(TypeError, match=r"module 1 \(Softmax\) is not supported; supported: .*LeakyReLU.*nn.LayerNorm"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1)))


def test_blocks_round_trip_through_torch_exactly():
    from jacgrad.io.interop.torch_blocks import layers_from_torch, layers_to_torch

    rng = np.random.default_rng(0)
    L = jg.layers
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)  # noqa: E731
    layers = [L.Dense(W(4, 6), rng.standard_normal(6), "leaky_relu(negative_slope=0.2)"),
              L.Residual([L.LayerNorm(1 + rng.standard_normal(6), rng.standard_normal(6), eps=1e-3),
                          L.Dense(W(6, 6), None, "gelu_tanh"),
                          L.Residual([L.RMSNorm(rng.standard_normal(6), eps=1e-4), L.Dense(W(6, 6), None, "elu")], 0.3)],
                         scale=0.5),
              L.Dense(W(6, 2))]
    model = layers_to_torch(layers)
    back = layers_from_torch(model)
    assert repr(back) == repr(layers)
    flat = lambda ls: [p for l in ls for p in l.params]  # noqa: E731
    for a, b in zip(flat(layers), flat(back), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    x = rng.standard_normal((5, 4))
    np.testing.assert_allclose(jg.Sequential(layers)(x), model(torch.tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-13)


def test_sequential_to_torch_and_back_and_gradients_agree():
    rng = np.random.default_rng(5)
    L = jg.layers
    W = lambda a, b: (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)  # noqa: E731
    net = jg.Sequential([L.Dense(W(3, 8), None, "silu"),
                         L.Residual([L.LayerNorm(np.ones(8, np.float32)), L.Dense(W(8, 8), None, "softplus(beta=2.0)")]),
                         L.RMSNorm(np.ones(8, np.float32)), L.Dense(W(8, 2))])
    model = net.to_torch()
    assert next(model.parameters()).dtype == torch.float32
    assert repr(jg.Sequential.from_torch(model)) == repr(net)
    x, t = rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    _, g = net.loss_and_grads(x, t)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.mse_loss(model(xt), torch.tensor(t)).backward()
    np.testing.assert_allclose(g.input, xt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g.layers[1][0]["gamma"], model[2].inner[0].weight.grad.numpy(), rtol=1e-4, atol=1e-6)


def _block_model():
    torch.manual_seed(3)
    inner = nn.Sequential(nn.LayerNorm(6), nn.Linear(6, 6), nn.Tanh(), nn.RMSNorm(6))
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), Residual(inner, 0.5), nn.LayerNorm(6, elementwise_affine=False),
                         nn.Linear(6, 2))


def test_sequential_from_torch_copy_false_shares_the_parameters_memory():
    model = _block_model().double()
    net = jg.Sequential.from_torch(model, copy=False)
    assert np.shares_memory(net.layers[0].W, model[0].weight.detach().numpy())
    assert np.shares_memory(net.layers[1].layers[0].gamma, model[2].inner[0].weight.detach().numpy())
    with torch.no_grad():  # an optimiser's in-place step
        for p in model.parameters():
            p.mul_(0.9).add_(0.01)
    x = torch.randn(5, 4, dtype=torch.float64)
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=1e-12, atol=1e-13)
    copied = jg.Sequential.from_torch(model)
    assert not np.shares_memory(copied.layers[0].W, model[0].weight.detach().numpy())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_sequential_from_torch_casts_half_models_when_asked(half):
    model = _block_model().to(half)
    with pytest.raises(TypeError, match=r"module 0 \(Linear\): parameter 'weight' is torch\.(b?float16).*pass dtype="):
        jg.Sequential.from_torch(model)
    net = jg.Sequential.from_torch(model, dtype="float32")
    assert net.dtype == np.float32 and net.layers[2].gamma.dtype == np.float32  # the parameter-free LayerNorm too
    x = torch.randn(3, 4)
    np.testing.assert_allclose(net(x.numpy()), model.float()(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="copy=False cannot share it"):
        jg.Sequential.from_torch(_block_model().to(half), copy=False, dtype="float32")
    with pytest.raises(TypeError, match="float32 or float64"):
        jg.Sequential.from_torch(model, dtype="int32")


@pytest.mark.gpu
def test_a_cuda_block_model_becomes_a_cupy_sequential_sharing_memory():
    import cupy as cp

    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA")
    model = _block_model().double().cuda()
    net = jg.Sequential.from_torch(model, copy=False)
    assert isinstance(net.layers[0].W, cp.ndarray) and net.layers[0].W.data.ptr == model[0].weight.data_ptr()
    assert isinstance(net.layers[2].gamma, cp.ndarray)  # the parameter-free LayerNorm lives on the GPU too
    x = torch.randn(4, 4, dtype=torch.float64, device="cuda")
    cp.testing.assert_allclose(net(cp.asarray(x)), cp.asarray(model(x).detach()), rtol=1e-12)
    assert net.to_torch()[0].weight.is_cuda

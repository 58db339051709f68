"""``layers_from_torch`` (the walk under ``jg.Sequential.from_torch``) on torch CNNs: each module of
the convolutional family comes in as its jacgrad layer, activations fused into the convolution, and
the chain of layers computes what the torch model computes, gradients included; train-mode
BatchNorm and unsupported options are refused with the reason."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch", reason="from_torch needs torch")
from jacgrad.io.interop.torch_blocks import layers_from_torch  # noqa: E402

nn = torch.nn


def _run(layers, x, g):
    z, states = x, []
    for L in layers:
        z, st = L.forward(z)
        states.append(st)
    grads = [[np.empty_like(p) for p in L.params] for L in layers]
    for L, st, gr in zip(reversed(layers), reversed(states), reversed(grads)):
        g, _ = L.backward(st, g, gr)
    return z, g, grads


def test_small_cnn_comes_in_and_computes_what_torch_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 6, 3, padding="same", groups=3), nn.Tanh(), nn.AvgPool2d(2),
                          nn.Conv2d(6, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    layers = layers_from_torch(model)
    assert [type(L).__name__ for L in layers] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "Conv2d", "AvgPool2d",
                                                 "Conv2d", "AdaptiveAvgPool2d", "Flatten", "Dense"]
    assert layers[3].activation == "tanh" and layers[3].groups == 3 and layers[0].names == ("weight",)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 8, 8))
    xt = torch.tensor(x, requires_grad=True)
    yt = model(xt)
    g = rng.standard_normal(tuple(yt.shape))
    y, gin, grads = _run(layers, x, g)
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gin, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    mine = [a for gr in grads for a in gr]
    ref = [p.grad.numpy() for p in model.parameters()]
    ref[-2] = ref[-2].T                                       # Dense keeps W = weight.T
    assert len(mine) == len(ref)
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_conv1d_with_its_activation_and_bn1d():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, dilation=2), nn.ReLU(), nn.BatchNorm1d(4)).double().eval()
    layers = layers_from_torch(model)
    assert [L.kind for L in layers] == ["conv1d", "batchnorm1d"] and layers[0].activation == "relu"
    x = np.random.default_rng(1).standard_normal((2, 2, 11))
    np.testing.assert_allclose(_run(layers, x, np.zeros((2, 4, 4)))[0], model(torch.tensor(x)).detach().numpy(),
                               rtol=1e-12)


@pytest.mark.parametrize("module,match", [
    (lambda: nn.BatchNorm2d(3), "train mode.*couples the samples.*model.eval"),
    (lambda: nn.BatchNorm2d(3, track_running_stats=False).eval(), "no running statistics"),
    (lambda: nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "padding_mode='circular' is not supported"),
    (lambda: nn.MaxPool2d(2, ceil_mode=True), "ceil_mode=True"),
    (lambda: nn.AvgPool2d(2, count_include_pad=False), "count_include_pad=True"),
    (lambda: nn.AdaptiveAvgPool2d(2), "only output_size=1"),
])
def test_refused_modules_say_why(module, match):
    with pytest.raises(TypeError, match=r"module 1 \(.*" + match):
        layers_from_torch(nn.Sequential(nn.Conv2d(3, 3, 1), module()))


def test_flatten_after_a_dense_layer_still_passes_through():
    layers = layers_from_torch(nn.Sequential(nn.Flatten(), nn.Linear(3, 2), nn.Flatten()))
    assert [L.kind for L in layers] == ["dense"]

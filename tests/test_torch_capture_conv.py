"""jg.from_torch / jg.explain on convolutional models by graph capture: convolutions, pools, eval
batch norm, a mean over H, W and a flatten, read from the ATen graph and checked against torch
itself (forward, every parameter gradient by autograd, per-sample gradient norms and the NTK by
torch.func) at 1e-10 in float64 and 1e-4 in float32 (a residual join around a convolution too); and
the refusals (train-mode batch norm, pool options without a layer). torch.export is slow: the zoo is small."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="graph capture imports torch models")
nn, F = torch.nn, torch.nn.functional

import jacgrad as jg  # noqa: E402
from test_torch_capture import _check_against_torch, _model  # noqa: E402 - tests/ is on sys.path

# the shared reference tries p.T on every parameter, 4-D conv weights included (their shapes never match)
pytestmark = pytest.mark.filterwarnings("ignore:The use of `x.T`:UserWarning")


class SmallCNN(nn.Module):
    """Module calls with functional activations: conv, eval BatchNorm + relu, max pool, a bias-free
    conv + tanh, avg pool, torch.flatten, a Linear head."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.c1(x))), 2)
        h = F.avg_pool2d(torch.tanh(self.c2(h)), 2)
        return self.fc(torch.flatten(h, 1))


class StridedCNN(nn.Module):
    """Stride, dilation and groups read from the node; a conv straight into BatchNorm and SiLU;
    global average pooling spelled as x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2)
        self.c2, self.bn = nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = F.gelu(self.c1(x))
        h = F.silu(self.bn(self.c2(h)))
        return self.fc(h.mean((2, 3)))


class Signal1d(nn.Module):
    """Conv1d with stride, eval BatchNorm1d + ELU, a flatten and a Linear head on (B, C, L)."""

    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.BatchNorm1d(3), nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.flatten(F.elu(self.bn(self.c(x))), 1))


class ConvResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.fc = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2 * 4 * 4, 2)

    def forward(self, x):
        return self.fc((x + F.relu(self.c(x))).flatten(1))


class CeilPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.bn, self.fc = nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Linear(2, 2)

    def forward(self, x):
        h = F.max_pool2d(self.bn(self.c(x)), 2, ceil_mode=True)
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1)[:, :2])


def _with_stats(model):
    """Running statistics moved off 0 and 1 (the references could not tell them from none)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _images(dtype, shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_a_custom_cnn_matches_torch(dtype, rtol):
    model = _with_stats(_model(SmallCNN, dtype))
    x = _images(dtype, (4, 2, 8, 8))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers] == ["Conv2d", "BatchNorm2d", "MaxPool2d", "Conv2d", "AvgPool2d",
                                                      "Flatten", "Dense"]
    assert [L.activation for L in (net.layers[0], net.layers[1], net.layers[3])] == ["identity", "relu", "tanh"]
    assert net.in_shape == (2, 8, 8) and net.dtype == x.dtype
    _check_against_torch(model, net, x, rtol)


def test_stride_dilation_groups_and_a_mean_over_the_image_match_torch():
    model = _with_stats(_model(StridedCNN, torch.float64))
    x = _images(torch.float64, (3, 2, 9, 9), seed=1)
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers] == ["Conv2d", "Conv2d", "BatchNorm2d", "AdaptiveAvgPool2d",
                                                      "Flatten", "Dense"]
    c1, c2 = net.layers[:2]
    assert (c1._torch_args(), c2.groups) == (((2, 2), (2, 2), (2, 2)), 2)
    assert net.layers[2].activation == "silu"
    _check_against_torch(model, net, x, 1e-10)


def test_a_conv1d_model_matches_torch():
    """Forward, gradients, per-sample norms and the NTK (an (N, C, L) batch is not a token batch: jg.ntk
    once took it for one and sized the kernel T·O)."""
    model = _with_stats(_model(Signal1d, torch.float64))
    x = _images(torch.float64, (3, 2, 8), seed=2)
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers] == ["Conv1d", "BatchNorm1d", "Flatten", "Dense"]
    assert net.layers[1].activation == "elu" and net.in_shape == (2, 8)
    _check_against_torch(model, net, x, 1e-10)


def test_explain_rows_of_a_cnn_name_their_layers():
    model = _with_stats(_model(SmallCNN, torch.float64))
    out = jg.explain(model, torch.randn(2, 2, 8, 8, dtype=torch.float64), file=False)
    assert not out.unsupported and not out.problem
    layer_of = {r.node: r.layer for r in out.rows}
    assert layer_of["conv2d"].startswith("layer 0: Conv2d(2->3")
    assert layer_of["batch_norm"] == layer_of["relu"] and layer_of["relu"].startswith("layer 1: BatchNorm2d(3")
    assert layer_of["max_pool2d"].startswith("layer 2: MaxPool2d") and layer_of["flatten"] == "layer 5: Flatten()"
    assert {r.node: r.op for r in out.rows}["conv2d_1"] == "conv2d"


def test_a_residual_join_around_a_convolution_is_a_residual_block():
    """x + relu(conv(x)) on images (it was refused before residual blocks took images)."""
    model = _model(ConvResidual, torch.float64)
    x = _images(torch.float64, (3, 2, 4, 4), seed=4)
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [L.kind for L in net.layers] == ["residual", "flatten", "dense"] and net.layers[0].shortcut is None
    _check_against_torch(model, net, x, 1e-10)


def test_train_mode_batch_norm_and_pool_options_without_a_layer_are_all_listed():
    with pytest.raises(TypeError, match=r"batch norm in training mode.*model\.eval\(\)"):
        jg.from_torch(SmallCNN().train(), torch.randn(2, 2, 8, 8))
    out = jg.explain(CeilPool().eval(), torch.randn(2, 2, 7, 7), file=False)
    bad = {r.node: r.layer for r in out.unsupported}
    assert set(bad) >= {"max_pool2d", "adaptive_avg_pool2d"}
    assert "ceil_mode=True" in bad["max_pool2d"] and "only output_size=1" in bad["adaptive_avg_pool2d"]

"""Attacks on ``Sequential.from_torch`` (``interop.torch_blocks.layers_from_torch``): parameter-free
norm layers take the model's dtype wherever they sit, half-precision parameters are an error
naming the module, and ``nn.Identity`` between a Linear and its activation passes through, as in
``MLP.from_torch``. References: the torch model itself (forward at 1e-13)."""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.torch


def _check_forward(m, net, n_in):
    x = np.random.default_rng(0).standard_normal((3, n_in))
    want = m.double()(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(net(x), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.RMSNorm])
def test_a_parameter_free_norm_inside_a_residual_block_takes_the_models_dtype(norm):
    """It took float32 (its own module has no parameter to read a dtype from), and the float64
    net was refused: 'layer 1: a parameter has dtype float32 but layer 0 has float64'."""
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(),
                      Residual(nn.Sequential(norm(4, elementwise_affine=False), nn.Linear(4, 4)), 0.5),
                      Residual(nn.Sequential(norm(4, elementwise_affine=False)), -0.5)).double()
    net = jg.Sequential.from_torch(m)
    assert net.dtype == np.float64
    assert all(p.dtype == np.float64 for L in net.layers for p in L.params)
    _check_forward(m, net, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_name_the_module(dtype):
    m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), Residual(nn.Sequential(nn.LayerNorm(4))))
    with pytest.raises(TypeError, match=rf"module 0 \(Linear\): parameter 'weight' is {dtype}; jacgrad works in "
                                        r"float32 or float64: cast the model first"):
        jg.Sequential.from_torch(m.to(dtype))
    m = m.float()
    m[2].inner[0].to(dtype)
    with pytest.raises(TypeError, match=rf"module 2 \(Residual\): inner module 0 \(LayerNorm\): parameter 'weight' is "
                                        rf"{dtype}"):
        jg.Sequential.from_torch(m)


def test_an_identity_between_a_linear_and_its_activation_passes_through():
    m = nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Tanh(), nn.LayerNorm(5), nn.Identity(), nn.Linear(5, 2)).double()
    net = jg.Sequential.from_torch(m)
    assert [L.kind for L in net.layers] == ["dense", "layernorm", "dense"] and net.layers[0].activation == "tanh"
    _check_forward(m, net, 4)
    assert jg.MLP.from_torch(nn.Sequential(nn.Linear(4, 5), nn.Identity(), nn.Tanh())).activations == ["tanh"]


@pytest.mark.parametrize("mods", [(nn.Linear(4, 4), nn.Tanh(), nn.ReLU()), (nn.LayerNorm(4), nn.Tanh()),
                                  (nn.Linear(4, 4), nn.Tanh(), nn.Identity(), nn.ReLU())],
                         ids=["two activations", "after a norm", "two activations around an identity"])
def test_an_activation_not_after_a_linear_is_a_layer_of_its_own(mods):
    m = nn.Sequential(*mods).double()
    net = jg.Sequential.from_torch(m)
    assert net.layers[-1].kind == "activation" and net.layers[-1].n_out == 4
    _check_forward(m, net, 4)


def test_an_activation_first_is_refused():
    with pytest.raises(TypeError, match=r"module 0 \(Tanh\): an activation must follow a layer .* whose width"):
        jg.Sequential.from_torch(nn.Sequential(nn.Tanh(), nn.Linear(4, 4)))


@pytest.mark.parametrize("reader", ["mlp", "sequential"])
@pytest.mark.parametrize("act,why", [(lambda: nn.LeakyReLU(-0.5), "negative_slope must be > 0"),
                                     (lambda: nn.ELU(-1.0), "alpha must be ≥ 0")], ids=["leaky_relu", "elu"])
def test_an_activation_jacgrad_cannot_take_names_the_module(reader, act, why):
    """The parameter check of jacgrad's activation row said what was wrong but not where."""
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), act())
    read = jg.MLP.from_torch if reader == "mlp" else jg.Sequential.from_torch
    with pytest.raises(ValueError, match=rf"module 3\b.*\(.*\) has no jacgrad activation: .*{why}"):
        read(m)
    if reader == "sequential":
        with pytest.raises(ValueError, match=rf"module 1 \(Residual\): inner module 1 .* has no jacgrad activation"):
            read(nn.Sequential(nn.Linear(3, 3), Residual(nn.Sequential(nn.Linear(3, 3), act()))))


class _TwiceLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _ShiftedLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) + 1


class _DoubledResidual(Residual):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("sub", [lambda: _TwiceLinear(3, 3), lambda: _ShiftedLayerNorm(3),
                                 lambda: _DoubledResidual(nn.Sequential(nn.Linear(3, 3)))],
                         ids=["Linear", "LayerNorm", "Residual"])
def test_a_subclass_that_computes_something_else_is_refused(sub):
    """Read as its base class, it gave a net that silently disagrees with the model (the MLP
    reader and the activation table already take only torch's own classes)."""
    with pytest.raises(TypeError, match=r"module 1 \(_\w+\) is not supported"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(3, 3), sub()))


def test_dropout_in_eval_mode_and_flatten_pass_through_as_in_mlp_from_torch():
    m = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Dropout(0.2), nn.Tanh(),
                      Residual(nn.Sequential(nn.LayerNorm(4), nn.Dropout(0.1), nn.Linear(4, 4)), 0.5),
                      nn.Dropout(0.3), nn.Linear(4, 2)).double().eval()
    net = jg.Sequential.from_torch(m)
    assert [L.kind for L in net.layers] == ["dense", "residual", "dense"] and net.layers[0].activation == "tanh"
    _check_forward(m, net, 3)
    with pytest.raises(TypeError, match=r"module 4 \(Residual\): inner module 1 \(Dropout\(.*\)\) is in training mode"):
        m[4].inner[1].train()
        jg.Sequential.from_torch(m)
    with pytest.raises(TypeError, match=r"module 1 \(Flatten\(.*\)\) flattens other than"):
        jg.Sequential.from_torch(nn.Sequential(nn.Linear(3, 3), nn.Flatten(0)))

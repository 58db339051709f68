"""One calling style for the products (issue 19 item 5): each is a method and a free function with
the same arguments, the free one the method's own result; ``net.jacobian(x)`` is the
forward-then-chain idiom; ``jg.gradient_flow`` sits at the top level. References: the method
spellings that existed before (the free spelling must give the same bits), and a finite-difference
Jacobian for ``net.jacobian``."""

import inspect

import numpy as np
import pytest

import jacgrad as jg


def _nets():
    rng = np.random.default_rng(3)
    mlp = jg.MLP.init([4, 6, 3], activation="tanh", seed=1)
    seq = jg.Sequential([jg.layers.Dense(rng.standard_normal((4, 6)) / 2, activation="tanh"),
                         jg.layers.LayerNorm(np.ones(6), np.zeros(6)),
                         jg.layers.Dense(rng.standard_normal((6, 3)) / 2)])
    return [mlp, seq]


@pytest.mark.parametrize("net", _nets(), ids=["mlp", "sequential"])
def test_free_functions_are_the_methods(net):
    rng = np.random.default_rng(0)
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    v = rng.standard_normal(net.n_params)
    pairs = [
        (jg.per_sample_grad_norms(net, x, t, per_layer=True), net.per_sample_grad_norms(x, t, per_layer=True)),
        (jg.per_sample_grads(net, x, t).flat, net.per_sample_grads(x, t).flat),
        (jg.ggn_vp(net, x, v, loss="mse"), net.ggn_vp(x, v, loss="mse")),
        (jg.ggn_diagonal(net, x).flat, net.ggn_diagonal(x).flat),
        (jg.clipped_grad(net, x, t, max_norm=0.1).flat, net.clipped_grad(x, t, max_norm=0.1).flat),
        (net.ntk(x, x[:2], trace=True), jg.ntk(net, x, x[:2], trace=True)),
    ]
    for free, method in pairs:
        assert np.array_equal(free, method)


@pytest.mark.parametrize("net", _nets(), ids=["mlp", "sequential"])
@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
def test_net_jacobian_is_the_input_output_jacobian(net, order):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4))
    J = net.jacobian(x, order=order)
    assert J.shape == (3, 3, 4)
    for i in range(3):
        fd = jg.check.numerical_jacobian(lambda z: net(z[None])[0], x[i])
        np.testing.assert_allclose(J[i], fd, rtol=1e-6, atol=1e-8)
    assert np.array_equal(J, net.jacobian_chain(net.forward(x)[1]).jacobian(order))


def test_gradient_flow_at_the_top_level_is_the_diagnostics_one():
    assert jg.gradient_flow is jg.diagnostics.gradient_flow


def test_free_functions_show_the_method_signature_with_net_first():
    sig = inspect.signature(jg.per_sample_grad_norms)
    assert list(sig.parameters)[:4] == ["net", "x", "target", "loss"]
    assert "per_sample_grad_norms" in jg.per_sample_grad_norms.__doc__


def test_a_torch_model_is_told_which_importer_to_call():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.container\.Sequential.*from_torch"):
        jg.per_sample_grad_norms(model, np.ones((2, 4)), np.zeros((2, 3)))


# ---------------------------------------------------------------------------- names (issue 19 item 5)
INTERNALS = ["backend", "hostpool", "kernels", "block_flow", "compiled", "curvature", "jacobian", "loss_hessians",
             "mlp", "per_sample", "private", "sequential", "spectra", "chain"]


def test_all_holds_user_concepts_and_the_internals_stay_reachable():
    assert not set(INTERNALS) & set(jg.__all__)
    assert {"MLP", "Sequential", "Gradients", "Chain", "LayerJacobian", "ntk", "per_sample_grad_norms",
            "gradient_flow", "losses", "activations", "asarray", "to_device"} <= set(jg.__all__)
    assert all(hasattr(jg, name) for name in jg.__all__ + INTERNALS)
    assert jg.backend.gpu_available() in (True, False) and callable(jg.hostpool.take)


RENAMED = [("jacgrad.nn.stack", "BlockGradients", "jacgrad.Gradients"),
           ("jacgrad.network.sequential", "BlockGradients", "jacgrad.Gradients"),
           ("jacgrad.params.param_space", "ParamArrays", "jacgrad.Gradients"),
           ("jacgrad.steps.compiled", "SequentialStep", "jacgrad.steps.compiled.TrainingStep"),
           ("jacgrad.steps.compiled_sequential", "SequentialStep", "jacgrad.steps.compiled.TrainingStep"),
           ("jacgrad.network.mlp", "ForwardCache", "jacgrad.network.sequential.SequentialCache")]


def test_a_renamed_name_still_works_and_warns_once_in_a_fresh_process():
    import os
    import subprocess
    import sys

    code = f"""
import importlib, warnings
import jacgrad as jg
out = []
for module, old, new in {RENAMED!r}:
    mod = importlib.import_module(module)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = getattr(mod, old) is getattr(mod, old) is eval(new.replace("jacgrad.", "jg.", 1))
    msgs = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    out.append((same, len(msgs), all(f"{{module}}.{{old}} is renamed {{new}}" in m for m in msgs)))
print(out)
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert got.strip() == str([(True, 1, True)] * len(RENAMED))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchName'"):
        jg.compiled.NoSuchName


@pytest.mark.parametrize("net", _nets(), ids=["mlp", "sequential"])
def test_gradient_flow_is_a_method_too(net):
    rng = np.random.default_rng(2)
    x, t = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    assert net.gradient_flow(x, t, seed=3).to_json() == jg.gradient_flow(net, x, t, seed=3).to_json()
    assert net.gradient_flow(x).to_text() == jg.gradient_flow(net, x).to_text()

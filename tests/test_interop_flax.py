"""MLP.from_flax against JAX: a flax.linen Dense stack's parameter dict (plain dicts of JAX
arrays, so no flax install is needed) imported and compared with ``jax.vmap(jax.jacrev)`` of the
same network written in jax.numpy — forward, and per-sample Jacobians in all three orders. The
format and error tests need neither jax nor flax."""

from __future__ import annotations

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import relative_error

NAMES = ["tanh", "relu", "gelu", "silu", "elu(alpha=0.5)", "leaky_relu(negative_slope=0.2)", "sigmoid", "identity"]


def jax_activations(jax):
    return {
        "tanh": jax.numpy.tanh,
        "relu": jax.nn.relu,
        "gelu": lambda h: jax.nn.gelu(h, approximate=False),
        "silu": jax.nn.silu,
        "elu(alpha=0.5)": lambda h: jax.nn.elu(h, alpha=0.5),
        "leaky_relu(negative_slope=0.2)": lambda h: jax.nn.leaky_relu(h, 0.2),
        "sigmoid": jax.nn.sigmoid,
        "identity": lambda h: h,
    }


def flax_params(jnp, sizes, dtype, seed=0, bias=True):
    """What ``flax.linen`` ``model.init`` returns for a stack of Dense layers, written by hand."""
    rng = np.random.default_rng(seed)
    layers = {}
    for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = {"kernel": jnp.asarray((rng.standard_normal((a, b)) * 1.5 / np.sqrt(a)).astype(dtype))}
        if bias:
            layer["bias"] = jnp.asarray((rng.standard_normal(b) * 0.3).astype(dtype))
        layers[f"Dense_{j}"] = layer
    return {"params": layers}


def jax_apply(jax, params, acts):
    layers, table = params["params"], jax_activations(jax)

    def f(x):
        for j, act in enumerate(acts):
            layer = layers[f"Dense_{j}"]
            x = table[act](x @ layer["kernel"] + layer.get("bias", 0.0))
        return x

    return f


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_jax_vmap_jacrev(dtype, rng):
    jax = pytest.importorskip("jax")
    sizes = [4, 6, 5, 7, 5, 6, 4, 5, 6, 5, 4, 3, 3]  # 12 layers: Dense_10 and Dense_11 come after Dense_9
    acts = [NAMES[j % len(NAMES)] for j in range(len(sizes) - 1)]
    tol = {"float64": 1e-12, "float32": 1e-5}[dtype]
    with jax.enable_x64(dtype == "float64"):
        params = flax_params(jax.numpy, sizes, dtype)
        shuffled = {"params": dict(reversed(list(params["params"].items())))}  # dict order is not layer order
        net = jg.MLP.from_flax(shuffled, acts)
        assert net.sizes == sizes and net.activations == acts and net.dtype == np.dtype(dtype)
        x = rng.standard_normal((6, 4)).astype(dtype)
        f = jax_apply(jax, params, acts)
        y_ref, jac_ref = map(np.asarray, jax.jit(lambda x: (f(x), jax.vmap(jax.jacrev(f))(x)))(x))
    y, cache = net.forward(x)
    assert relative_error(y, y_ref) <= tol
    chain = net.jacobian_chain(cache)
    for order in ("forward", "reverse", "auto"):
        assert relative_error(chain.jacobian(order=order), jac_ref) <= tol, order


def test_plain_numpy_dicts_without_bias_and_copy_false(rng):
    params = {"Dense_1": {"kernel": rng.standard_normal((3, 2))}, "Dense_0": {"kernel": rng.standard_normal((4, 3))}}
    with pytest.raises(ValueError, match=r"flax params: layers 0, 1 have no bias.*jg\.Sequential\.from_flax"):
        jg.MLP.from_flax(params, "tanh")  # (bias-free layers: tests/test_load_bias_free.py)
    net = jg.Sequential.from_flax(params, "tanh", copy=False)
    assert [L.has_bias for L in net.layers] == [False, False] and net.n_params == 4 * 3 + 3 * 2
    assert np.shares_memory(net.layers[0].W, params["Dense_0"]["kernel"])
    copied = jg.Sequential.from_flax(params, ["relu", "identity"])
    assert not np.shares_memory(copied.layers[0].W, params["Dense_0"]["kernel"])
    with_bias = {k: {**v, "bias": np.ones(v["kernel"].shape[1])} for k, v in params.items()}
    assert np.shares_memory(jg.MLP.from_flax(with_bias, "tanh", copy=False).weights[0], params["Dense_0"]["kernel"])


@pytest.mark.parametrize(
    "params, acts, error, match",
    [
        ({"fc": {"kernel": np.ones((2, 2))}}, "tanh", ValueError, "'fc' has no numeric suffix"),
        ({"Dense_0": {"bias": np.ones(2)}}, "tanh", ValueError, "'Dense_0' has no 'kernel'"),
        ({"Conv_0": {"kernel": np.ones((3, 1, 2)), "bias": np.ones(2)}}, "tanh", ValueError, r"kernel has shape \(3, 1, 2\)"),
        ({"BatchNorm_0": {"kernel": np.ones((2, 2)), "scale": np.ones(2)}}, "tanh", ValueError, "scale besides kernel"),
        ({"Dense_0": {"kernel": np.ones((2, 2))}}, ["tanh", "relu"], ValueError, "2 activations for 1 Dense layers"),
        ({}, "tanh", ValueError, "no layers"),
        ([np.ones((2, 2))], "tanh", TypeError, "dict of layer parameters"),
        ({"Dense_0": {"kernel": np.ones((2, 2)), "bias": np.ones(2)}, "Dense_1": {"kernel": np.ones((3, 2)),
          "bias": np.ones(2)}}, "tanh", ValueError, "layer 1: W has shape"),
        ({"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.ones(2)}}, "tanh", ValueError,
         r"'Dense_0': bias has shape \(2,\) but its kernel \(2, 3\) has 3 outputs"),
        ({"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.ones((1, 3))}}, "tanh", ValueError,
         r"'Dense_0': bias has shape \(1, 3\)"),
    ],
)
def test_bad_parameters_say_why(params, acts, error, match):
    with pytest.raises(error, match=match):
        jg.MLP.from_flax(params, acts)


def test_a_real_flax_model():
    jax = pytest.importorskip("jax")
    flax_nn = pytest.importorskip("flax.linen", reason="flax is not installed: the plain-dict tests cover the format")

    class Stack(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            for width in (5, 4):
                x = flax_nn.tanh(flax_nn.Dense(width)(x))
            return flax_nn.Dense(2)(x)

    model = Stack()
    x = np.ones((3, 6), np.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    net = jg.MLP.from_flax(params, ["tanh", "tanh", "identity"])
    np.testing.assert_allclose(net(x), np.asarray(model.apply(params, x)), rtol=1e-5, atol=1e-6)

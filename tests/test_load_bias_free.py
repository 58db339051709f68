"""Bias-free layers from files read without a model and from Flax parameters: a Linear without
its ``.bias`` key (a ``W0, b0, ...`` file without ``bj``, a flax ``Dense(use_bias=False)``) is a
``Dense(W, bias=False)``, never a zero bias that is a parameter. P is the source's; per-sample
gradient norms and the NTK agree with torch.func (``vmap(grad)``, ``vmap(jacrev)``) on the torch
model and with JAX on the same network written in jax.numpy. ``MLP.load``/``MLP.from_flax``
refuse such layers, naming them; files with every bias load as before; bad bias keys still error."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

import jacgrad as jg

TOL = {"float64": 1e-10, "float32": 2e-4}


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def ntk_from_jacobians(J1, J2):
    """``K[i, j, a, b] = <J1[i, a, :], J2[j, b, :]>``: J ``(N, n_out, P)``."""
    return np.einsum("iap,jbp->ijab", J1, J2)


# ---------------------------------------------------------------------- torch state dicts, no model
def torch_stack(torch, dtype):
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5, bias=False), nn.ReLU(),
                         nn.Linear(5, 3, bias=False)).to(getattr(torch, dtype))


ACTS = ["tanh", "relu", "identity"]


def torch_reference(torch, model, x, t):
    """Per-sample gradient norms of ``l_i = mean((f(x_i) - t_i)^2)`` and the NTK, by torch.func."""
    func = torch.func
    params = {k: v.detach() for k, v in model.named_parameters()}
    f = lambda p, xi: func.functional_call(model, p, (xi[None],))[0]
    loss_i = lambda p, xi, ti: ((f(p, xi) - ti) ** 2).mean()
    g = func.vmap(func.grad(loss_i), in_dims=(None, 0, 0))(params, x, t)
    norms = torch.sqrt(sum((v.reshape(len(x), -1) ** 2).sum(1) for v in g.values()))
    jac = func.vmap(func.jacrev(f), in_dims=(None, 0))(params, x)  # {name: (N, n_out, *shape)}
    J = torch.cat([v.reshape(len(x), v.shape[1], -1) for v in jac.values()], dim=2)
    return norms.numpy(), J.numpy()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_state_dict_without_bias_keys_is_bias_free(tmp_path, suffix, dtype):
    torch = pytest.importorskip("torch")
    model = torch_stack(torch, dtype)
    path = tmp_path / f"sd{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    for net in (jg.Sequential.load(path, activations=ACTS), jg.load(path, activations=ACTS)):
        assert type(net) is jg.Sequential
        assert [L.has_bias for L in net.layers] == [True, False, False]
        assert net.n_params == sum(p.numel() for p in model.parameters()) == 4 * 6 + 6 + 6 * 5 + 5 * 3
        rng = np.random.default_rng(1)
        x, t = rng.standard_normal((7, 4)).astype(dtype), rng.standard_normal((7, 3)).astype(dtype)
        x2 = rng.standard_normal((3, 4)).astype(dtype)
        norms_ref, J1 = torch_reference(torch, model, torch.as_tensor(x), torch.as_tensor(t))
        _, J2 = torch_reference(torch, model, torch.as_tensor(x2), torch.as_tensor(t[:3]))
        assert rel(net.per_sample_grad_norms(x, t), norms_ref) <= TOL[dtype]
        assert net.per_sample_grads(x, t).flat.shape == (7, net.n_params)
        assert rel(jg.ntk(net, x, x2), ntk_from_jacobians(J1, J2)) <= TOL[dtype]
        assert rel(net(x), model(torch.as_tensor(x)).detach().numpy()) <= TOL[dtype]
    with pytest.raises(ValueError, match=rf"sd\{suffix}'?: layers 1, 2 have no bias.*jg\.Sequential\.load"):
        jg.MLP.load(path, activations=ACTS)


def test_jacgrad_layout_without_bj_is_bias_free(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    W0, b0, W1 = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal((4, 2))
    np.savez(tmp_path / "w.npz", W0=W0, b0=b0, W1=W1, activations=np.array(["tanh", "identity"]))
    save_file({"W0": W0, "b0": b0, "W1": W1}, str(tmp_path / "w.safetensors"),
              metadata={"format": "jacgrad", "activations": json.dumps(["tanh", "identity"])})
    x = rng.standard_normal((5, 3))
    for name in ("w.npz", "w.safetensors"):
        net = jg.Sequential.load(tmp_path / name)
        assert [L.has_bias for L in net.layers] == [True, False] and net.n_params == 12 + 4 + 8
        np.testing.assert_array_equal(net.layers[1].W, W1)
        np.testing.assert_allclose(net(x), np.tanh(x @ W0 + b0) @ W1, rtol=1e-13)
        with pytest.raises(ValueError, match=rf"{name}'?: layer 1 has no bias"):
            jg.MLP.load(tmp_path / name)
        assert type(jg.load(tmp_path / name)) is jg.Sequential


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_keeps_it_bias_free(tmp_path, suffix):
    torch = pytest.importorskip("torch")
    model = torch_stack(torch, "float64")
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    net = jg.Sequential.load(tmp_path / "sd.pt", activations=ACTS)
    net.save(tmp_path / f"net{suffix}")
    if suffix == ".npz":
        with zipfile.ZipFile(tmp_path / "net.npz") as z:
            assert sorted(z.namelist()) == ["0.W.npy", "0.b.npy", "1.W.npy", "2.W.npy", "spec.npy"]
    back = jg.Sequential.load(tmp_path / f"net{suffix}")
    assert repr(back) == repr(net) and back.n_params == net.n_params
    assert [L.spec() for L in back.layers] == [L.spec() for L in net.layers]
    assert [L.spec().get("bias", True) for L in back.layers] == [True, False, False]
    for L, M in zip(back.layers, net.layers):
        assert L.names == M.names and all(np.array_equal(a, b) for a, b in zip(L.params, M.params))
    assert type(jg.load(tmp_path / f"net{suffix}")) is jg.Sequential


def test_files_with_every_bias_load_as_before(tmp_path):
    """Bitwise: the arrays are the source's (weight.T exactly), an MLP with a bias in every layer."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    for net in (jg.MLP.load(tmp_path / "sd.pt", activations=["relu", "identity"]),
                jg.load(tmp_path / "sd.pt", activations=["relu", "identity"])):
        assert type(net) is jg.MLP and all(L.has_bias for L in net.layers)
        for W, b, lin in zip(net.weights, net.biases, (model[0], model[2])):
            np.testing.assert_array_equal(W, lin.weight.detach().numpy().T)
            np.testing.assert_array_equal(b, lin.bias.detach().numpy())
    mlp = jg.MLP.init([3, 4, 2], seed=0, bias_std=0.5)
    for suffix in (".npz", ".safetensors"):
        mlp.save(tmp_path / f"m{suffix}")
        back = jg.MLP.load(tmp_path / f"m{suffix}")
        assert back.activations == mlp.activations and back.n_params == mlp.n_params
        for a, b in zip([*back.weights, *back.biases], [*mlp.weights, *mlp.biases]):
            np.testing.assert_array_equal(a, b)


def test_bad_bias_keys_still_error(tmp_path):
    torch = pytest.importorskip("torch")
    cases = {
        "orphan.pt": ({"0.weight": torch.ones(3, 2), "2.bias": torch.ones(4)}, r"'2\.bias' has no matching '2\.weight'"),
        "shape.pt": ({"0.weight": torch.ones(3, 2), "2.weight": torch.ones(4, 3), "2.bias": torch.ones(3)},
                     r"2\.bias has shape \(3,\) but 2\.weight has 4 outputs"),
    }
    for name, (sd, match) in cases.items():
        torch.save(sd, tmp_path / name)
        for load in (jg.MLP.load, jg.Sequential.load):
            with pytest.raises(ValueError, match=rf"{name}.*{match}"):
                load(tmp_path / name, activations="tanh")
    np.savez(tmp_path / "b.npz", W0=np.ones((2, 3)), W1=np.ones((3, 2)), b1=np.ones(3), activations=np.array(["tanh"]))
    np.savez(tmp_path / "o.npz", W0=np.ones((2, 3)), b1=np.ones(3), activations=np.array(["tanh"]))
    for load in (jg.MLP.load, jg.Sequential.load):
        with pytest.raises(ValueError, match=r"b\.npz.*b1 has shape \(3,\) but W1 has 2 outputs"):
            load(tmp_path / "b.npz")
        with pytest.raises(ValueError, match=r"o\.npz.*b1 present but W1 is missing"):
            load(tmp_path / "o.npz")


# ---------------------------------------------------------------------- Flax, written by hand
SIZES, FLAX_ACTS = [4, 6, 5, 3], ["tanh", "relu", "identity"]


def flax_params(jnp, dtype, bias=(True, False, False), seed=0):
    """What ``flax.linen`` ``model.init`` returns for Dense layers, ``use_bias=False`` where ``bias`` says."""
    rng = np.random.default_rng(seed)
    layers = {}
    for j, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layer = {"kernel": jnp.asarray((rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype))}
        if bias[j]:
            layer["bias"] = jnp.asarray((rng.standard_normal(b) * 0.3).astype(dtype))
        layers[f"Dense_{j}"] = layer
    return {"params": layers}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_flax_dense_without_bias_against_jax(dtype):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    table = {"tanh": jnp.tanh, "relu": jax.nn.relu, "identity": lambda h: h}
    with jax.enable_x64(dtype == "float64"):
        params = flax_params(jnp, dtype)
        net = jg.Sequential.from_flax(params, FLAX_ACTS)
        assert [L.has_bias for L in net.layers] == [True, False, False] and net.imported_from == "flax"
        assert net.n_params == sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params)) == 24 + 6 + 30 + 15

        def f(p, xi):
            for j, act in enumerate(FLAX_ACTS):
                layer = p["params"][f"Dense_{j}"]
                xi = table[act](xi @ layer["kernel"] + layer["bias"] if "bias" in layer else xi @ layer["kernel"])
            return xi

        rng = np.random.default_rng(4)
        x, t = rng.standard_normal((6, 4)).astype(dtype), rng.standard_normal((6, 3)).astype(dtype)
        x2 = rng.standard_normal((2, 4)).astype(dtype)
        loss_i = lambda p, xi, ti: jnp.mean((f(p, xi) - ti) ** 2)
        g = jax.vmap(jax.grad(loss_i), in_axes=(None, 0, 0))(params, x, t)
        norms_ref = np.sqrt(sum(np.sum(np.asarray(v).reshape(6, -1) ** 2, 1) for v in jax.tree_util.tree_leaves(g)))

        def jac(xs):
            J = jax.vmap(jax.jacrev(f), in_axes=(None, 0))(params, xs)
            return np.concatenate([np.asarray(v).reshape(len(xs), 3, -1) for v in jax.tree_util.tree_leaves(J)], 2)

        K_ref = ntk_from_jacobians(jac(x), jac(x2))
        y_ref = np.asarray(jax.vmap(f, in_axes=(None, 0))(params, x))
    assert rel(net(x), y_ref) <= TOL[dtype]
    assert rel(net.per_sample_grad_norms(x, t), norms_ref) <= TOL[dtype]
    assert rel(jg.ntk(net, x, x2), K_ref) <= TOL[dtype]


def test_mlp_from_flax_refuses_a_bias_free_layer_and_keeps_the_rest():
    params = flax_params(np, "float64", bias=(True, False, True))
    with pytest.raises(ValueError, match=r"flax params: layer 1 has no bias.*jg\.Sequential\.from_flax"):
        jg.MLP.from_flax(params, FLAX_ACTS)
    net = jg.Sequential.from_flax(params, FLAX_ACTS)
    assert [L.has_bias for L in net.layers] == [True, False, True]
    full = flax_params(np, "float64", bias=(True, True, True))
    mlp = jg.MLP.from_flax(full, FLAX_ACTS)  # every bias: an MLP, as before
    assert type(mlp) is jg.MLP and mlp.n_params == 24 + 6 + 30 + 5 + 15 + 3
    np.testing.assert_array_equal(mlp.biases[1], full["params"]["Dense_1"]["bias"])


@pytest.mark.parametrize("cls", ["MLP", "Sequential"])
def test_flax_bad_bias_says_which_layer(cls):
    make = getattr(jg, cls).from_flax
    bad = {"Dense_0": {"kernel": np.ones((2, 3)), "bias": np.ones(2)}}
    with pytest.raises(ValueError, match=r"flax layer 'Dense_0': bias has shape \(2,\) but its kernel \(2, 3\) has 3"):
        make(bad, "tanh")
    with pytest.raises(TypeError, match=r"flax layer 'Dense_0': bias has dtype float64 but its kernel float32"):
        make({"Dense_0": {"kernel": np.ones((2, 3), np.float32), "bias": np.ones(3)}}, "tanh")
    with pytest.raises(ValueError, match=r"'Dense_0' has no 'kernel'"):
        make({"Dense_0": {"bias": np.ones(2)}}, "tanh")


def test_a_real_flax_model_without_bias():
    jax = pytest.importorskip("jax")
    flax_nn = pytest.importorskip("flax.linen", reason="flax is not installed: the hand-written params cover the format")

    class Stack(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = flax_nn.tanh(flax_nn.Dense(5)(x))
            return flax_nn.Dense(3, use_bias=False)(x)

    model = Stack()
    x = np.random.default_rng(5).standard_normal((4, 2)).astype(np.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    net = jg.Sequential.from_flax(params, ["tanh", "identity"])
    assert net.n_params == sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params)) == 2 * 5 + 5 + 5 * 3
    assert rel(net(x), np.asarray(model.apply(params, x))) <= 1e-5

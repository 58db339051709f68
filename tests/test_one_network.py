"""One network (issue 19): ``jg.MLP`` is a ``jg.Sequential`` of Dense layers, with one forward
cache, one backward and one torch importer behind both classes."""

import numpy as np
import pytest

import jacgrad as jg

L = jg.layers


def _gelu_net(rng):
    """Dense layers whose φ' needs h (gelu, silu), next to a LayerNorm and a residual block: the
    cache keeps h alone where only a Dense reads a layer's output."""
    W = lambda a, b: rng.standard_normal((a, b)) / np.sqrt(a)
    return jg.Sequential([L.Dense(W(4, 6), rng.standard_normal(6) * 0.1, "gelu"),
                          L.Dense(W(6, 6), None, "silu"),
                          L.LayerNorm(1 + 0.1 * rng.standard_normal(6), 0.1 * rng.standard_normal(6)),
                          L.Dense(W(6, 6), None, "softplus"),
                          L.Residual([L.Dense(W(6, 6), None, "gelu")], scale=0.5),
                          L.Dense(W(6, 5), None, "gelu"),
                          L.Dense(W(5, 3), None, "silu")])


def test_an_mlp_is_a_sequential_of_its_dense_layers():
    net = jg.MLP.init([3, 5, 2], activation="gelu", seed=0)
    assert isinstance(net, jg.Sequential)
    assert [type(layer) for layer in net.layers] == [L.Dense, L.Dense]
    assert all(layer.W is W and layer.b is b for layer, W, b in zip(net.layers, net.weights, net.biases))


def test_a_dense_stack_keeps_one_array_per_layer_in_its_cache(rng):
    B = 7
    net = _gelu_net(rng)
    x = rng.standard_normal((B, 4))
    _, cache = net.forward(x)
    # what the states reference (x excluded): Dense 0, 1, 5, 6 keep h only (their output is the next
    # Dense's input, recomputed; Dense 1's is read by the LayerNorm's forward and not kept); the
    # LayerNorm x̂ and 1/σ; Dense 3 its input (the LayerNorm's y) and h; the block's Dense its input
    # (Dense 3's z) and h; Dense 5 its input (the block's output).
    itemsize = 8
    want = B * (6 + 6 + (6 + 1) + (6 + 6) + (6 + 6) + (6 + 5) + 3) * itemsize
    assert cache.nbytes == want
    mlp = jg.MLP.init([4, 6, 6, 3], activation="gelu", seed=0)
    assert mlp.forward(x)[1].nbytes == B * (6 + 6 + 3) * itemsize  # B·Σ H, whatever the activation


def test_gradients_of_a_lean_cache_match_torch(rng):
    torch = pytest.importorskip("torch")
    net = _gelu_net(rng)
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    loss, g = net.loss_and_grads(x, t)
    model = net.to_torch()
    xt = torch.tensor(x, requires_grad=True)
    ref = ((model(xt) - torch.tensor(t)) ** 2).mean()
    ref.backward()
    want = np.concatenate([p.grad.detach().numpy().T.ravel() if p.ndim == 2 else p.grad.numpy().ravel()
                           for p in model.parameters()])
    assert float(loss) == pytest.approx(ref.item(), rel=1e-13)
    np.testing.assert_allclose(g.flat, want, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(g.input, xt.grad.numpy(), rtol=1e-11, atol=1e-13)
    norms = net.per_sample_grad_norms(x, t)
    one = [torch.func.grad(lambda p, xi, ti: ((torch.func.functional_call(model, p, (xi[None],)) - ti) ** 2).mean())(
        dict(model.named_parameters()), torch.tensor(x[i]), torch.tensor(t[i])) for i in range(5)]
    np.testing.assert_allclose(norms, [np.sqrt(sum(float((v.detach() ** 2).sum()) for v in gi.values())) for gi in one],
                               rtol=1e-11)


@pytest.mark.parametrize("importer", ["MLP", "Sequential"])
@pytest.mark.parametrize("mods, error, match", [
    (lambda nn: (nn.Linear(4, 3), nn.ReLU(), nn.Linear(5, 2)), ValueError,
     r"^module 2 \(Linear\(in_features=5.*\) takes 5 features but the Linear before it \(module 0\) gives 3$"),
    (lambda nn: (), ValueError, r"no layers to convert \(no nn\.Linear"),
])
def test_both_networks_import_through_one_reader_with_one_message(importer, mods, error, match):
    torch = pytest.importorskip("torch")
    with pytest.raises(error, match=match):
        getattr(jg, importer).from_torch(torch.nn.Sequential(*mods(torch.nn)))


def test_an_activation_not_after_a_linear_is_a_layer_of_a_sequential_and_refused_by_mlp():
    """The one reader: a Sequential imports an activation after another as an Activation layer
    (checked against torch); MLP.from_torch, a dense stack, refuses it and says where it would fit."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Identity(), nn.Tanh()).double()
    with pytest.raises(TypeError, match=r"^module 3 \(Tanh\(\)\) follows another activation \(relu\) at module 1 "
                                        r"\(ReLU\(\)\): an activation must directly follow an nn\.Linear; "
                                        r"jg\.Sequential\.from_torch\(model\) imports it as an Activation layer$"):
        jg.MLP.from_torch(model)
    net = jg.Sequential.from_torch(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=0, atol=1e-15)
    for importer, rule in (("MLP", "directly follow an nn\\.Linear, and this one comes before any Linear"),
                           ("Sequential", "follow a layer .*, whose width it takes, and this one comes before any layer")):
        with pytest.raises(TypeError, match=rf"^module 0 \(Tanh\): an activation must {rule}$"):
            getattr(jg, importer).from_torch(nn.Sequential(nn.Tanh(), nn.Linear(4, 3)))


def test_mlp_from_torch_is_the_sequential_import_of_a_dense_model():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.LeakyReLU(0.2), nn.Sequential(nn.Linear(4, 2))).eval()
    mlp, seq = jg.MLP.from_torch(model, copy=False), jg.Sequential.from_torch(model, copy=False)
    assert [repr(a) for a in mlp.layers] == [repr(a) for a in seq.layers]
    assert all(np.shares_memory(a.W, model_W) for a, model_W in zip(mlp.layers, (model[0].weight.detach().numpy(),
                                                                               model[3][0].weight.detach().numpy())))
    x = torch.randn(5, 3)
    np.testing.assert_allclose(mlp(x.numpy()), model(x).detach().numpy(), rtol=1e-6, atol=1e-7)
    assert isinstance(jg.MLP.from_torch(model), jg.MLP)


def test_forward_of_a_net_ending_in_a_residual_block_or_a_norm(rng):
    """The output is handed out as the caller's own array whatever the last layer is."""
    W = rng.standard_normal((3, 3)) / 2
    for last in (L.Residual([L.Dense(W, None, "tanh")], scale=0.5), L.LayerNorm(np.ones(3))):
        net = jg.Sequential([L.Dense(W, None, "gelu"), last])
        x = rng.standard_normal((4, 3))
        y, cache = net.forward(x)
        h = x @ W
        z = jg.activations.get("gelu").f(h)
        want = z + 0.5 * np.tanh(z @ W) if isinstance(last, L.Residual) else (z - z.mean(1, keepdims=True)) / np.sqrt(
            z.var(1, keepdims=True) + 1e-5)
        np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
        J = net.jacobian_chain(cache).jacobian()
        y[...] = np.nan  # the caller's own array: the cache is untouched
        np.testing.assert_array_equal(net.jacobian_chain(cache).jacobian(), J)

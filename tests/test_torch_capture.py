"""jg.from_torch / jg.explain: any torch model in by graph capture (torch.export), checked
against torch itself: the forward, every parameter gradient (torch autograd), per-sample gradient
norms and the NTK (torch.func), at 1e-10 in float64 and 1e-4 in float32; and the refusals (shared
parameters, unsupported ops all listed at once, untraceable models, train-mode batch norm, several
outputs, graphs that are not a chain). torch.export takes seconds per model: the zoo is small."""

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="graph capture imports torch models")
nn, F = torch.nn, torch.nn.functional

import jacgrad as jg  # noqa: E402
from jacgrad.models.ops import OPS, PENDING, supported_ops_markdown  # noqa: E402
from jacgrad.nn.layers import named_params  # noqa: E402
import torch_func_reference as tref  # noqa: E402 - tests/ is on sys.path


# ---------------------------------------------------------------------------- the zoo
class FunctionalMLP(nn.Module):
    """Functional calls, x + f(x), a scaled residual, a raw-parameter matmul, a re-used ReLU."""

    def __init__(self):
        super().__init__()
        self.inp, self.r1, self.r2, self.out = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.W, self.b = nn.Parameter(torch.randn(6, 6) / 3), nn.Parameter(torch.randn(6) / 3)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + torch.tanh(self.r1(h))
        h = h + 0.3 * F.silu(self.r2(h))
        h = torch.sigmoid(h @ self.W.T + self.b)
        return self.out(h)


class PreNorm(nn.Module):
    """Pre-norm MLP blocks: x + W2 gelu(W1 LN(x)), x + leaky(W RMS(x)), a final LayerNorm."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 8)
        self.ln, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.rms, self.fc = nn.RMSNorm(8, eps=1e-6), nn.Linear(8, 8)
        self.norm, self.head = nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        h = F.gelu(self.inp(x), approximate="tanh")
        h = h + self.down(F.gelu(self.up(self.ln(h))))
        h = h + F.leaky_relu(self.fc(self.rms(h)), 0.2)
        return self.head(self.norm(h))


class RawProducts(nn.Module):
    """Matrix products with parameters viewed in every way: x @ W, x @ V.T, identity transposes,
    a bias on the left."""

    def __init__(self):
        super().__init__()
        self.W, self.V, self.U = (nn.Parameter(torch.randn(4, 4)) for _ in range(3))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        h = torch.tanh(self.b + x @ self.W.transpose(0, 0))
        return torch.mm(h @ self.V.permute(1, 0), self.U.transpose(-1, 0).t())


class ReusedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(torch.tanh(self.fc(x)))


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(4, 4)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -x


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = torch.exp(self.fc(x))
        h = torch.sin(self.fc2(h))
        return torch.abs(h)


class OutOfPlace(nn.Module):
    """An op without a layer and a scale outside a residual: both in one error (the activation after
    the norm is an Activation layer of its own)."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln = nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        return 2.0 * F.relu(self.ln(torch.exp(self.fc(x))))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.fc(x))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h, torch.tanh(h)


class TwoBranches(nn.Module):
    """x + f(x) + g(x): g reads x, not x + f(x): a residual block with g as its projection shortcut
    around the block x + f(x)."""

    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return x + self.f(x) + self.g(x)


class ConcatSkip(nn.Module):
    """A DenseNet-like concatenated skip: an unsupported op that also ends the chain."""

    def __init__(self):
        super().__init__()
        self.f, self.out = nn.Linear(4, 4), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(torch.cat([x, torch.tanh(self.f(x))], dim=1))


class MixerTokens(nn.Module):
    """A Mixer-like block on (B, T, d): token mixing by transposes (TransposeTokens)."""

    def __init__(self):
        super().__init__()
        self.tok, self.ch = nn.Linear(5, 5), nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.tok(x.transpose(1, 2)).transpose(1, 2)
        return x + F.gelu(self.ch(x))


# ---------------------------------------------------------------------------- the references
def _sources(net, model):
    """For each jacgrad parameter (flat order), the torch name holding the same numbers, and
    whether as its transpose: found by value, independently of the importer's bookkeeping."""
    out = []
    for where, a in named_params(net.layers):
        a = np.asarray(a)
        hits = [(k, t) for k, p in model.named_parameters() for t in (False, True)[:p.ndim]
                if (p.T if t else p).shape == a.shape and np.array_equal((p.T if t else p).detach().numpy(), a)]
        assert len(hits) == 1, f"{where}: {hits}"
        out.append(hits[0])
    return out


def _torch_flat(model, sources, grads):
    return np.concatenate([(grads[k].T if t else grads[k]).detach().numpy().ravel() for k, t in sources])


def _check_against_torch(model, net, x, rtol):
    """Forward, every parameter gradient (autograd), per-sample grad norms and the NTK (torch.func)."""
    xt = torch.as_tensor(x)
    sources = _sources(net, model)
    assert net.n_params == sum(p.numel() for p in model.parameters())
    y = model(xt)
    np.testing.assert_allclose(net(x), y.detach().numpy(), rtol=rtol, atol=rtol)

    t = np.random.default_rng(1).standard_normal(y.shape).astype(x.dtype)
    model.zero_grad()
    ((y - torch.as_tensor(t)) ** 2).mean().backward()
    _, g = net.loss_and_grads(x, t)
    want = _torch_flat(model, sources, {k: p.grad for k, p in model.named_parameters()})
    np.testing.assert_allclose(g.flat, want, rtol=rtol, atol=rtol * np.abs(want).max())

    per = tref.per_sample_grads(model, xt, torch.as_tensor(t))
    norms = tref.grad_norms(per, len(x))
    np.testing.assert_allclose(net.per_sample_grad_norms(x, t), norms, rtol=rtol, atol=rtol * norms.max())

    K = tref.ntk(model, xt, y.shape[1])
    np.testing.assert_allclose(jg.ntk(net, x), K, rtol=rtol, atol=rtol * np.abs(K).max())


_model = tref.perturbed  # _model(cls, dtype, seed=0): imported from here by other test files


# ---------------------------------------------------------------------------- the zoo passes
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_functional_mlp_matches_torch(dtype, rtol):
    model = _model(FunctionalMLP, dtype)
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(str(dtype).removeprefix("torch."))
    net = jg.from_torch(model, torch.as_tensor(x))
    assert [L.kind for L in net.layers] == ["dense", "residual", "residual", "dense", "dense"]
    assert net.layers[2].scale == pytest.approx(0.3)
    assert net.dtype == x.dtype
    _check_against_torch(model, net, x, rtol)
    out = jg.explain(model, torch.as_tensor(x), file=False)
    assert out.network == f"Sequential([{', '.join(map(repr, net.layers))}])" and not out.problem
    layer_of = {r.node: r.layer for r in out.rows}
    assert layer_of["relu"] == layer_of["linear"] == "layer 0: Dense(3->6, relu)"
    assert layer_of["mul"] == "layer 2: Residual(scale=0.3) (its scale)" and layer_of["numpy_t"].startswith("a view")


def test_prenorm_blocks_match_torch():
    model = _model(PreNorm, torch.float64)
    x = np.random.default_rng(2).standard_normal((5, 3))
    net = jg.from_torch(model, torch.as_tensor(x), copy=True)
    assert not np.shares_memory(net.layers[0].W, model.inp.weight.detach().numpy())
    assert repr(net).startswith("Sequential([Dense(3->8, gelu_tanh), Residual([LayerNorm(8, eps=1e-05), "
                                "Dense(8->8, gelu), Dense(8->8, identity)], scale=1), Residual([RMSNorm(8, eps=1e-06), "
                                "Dense(8->8, leaky_relu(negative_slope=0.2))], scale=1), LayerNorm(8")
    _check_against_torch(model, net, x, 1e-10)


def test_nn_sequential_gives_the_network_of_sequential_from_torch():
    """One ReLU module re-used in two places is applied twice; views share the model's memory,
    and model.double() afterwards is caught at the next call."""
    torch.manual_seed(3)
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 5), relu, nn.Dropout(0.2), nn.Linear(5, 5), relu, nn.LayerNorm(5),
                          nn.Linear(5, 2)).eval()
    x = torch.randn(4, 3)
    net = jg.from_torch(model, x)
    ref = jg.Sequential.from_torch(model)
    assert repr(net) == repr(ref)
    for (_, a), (_, b) in zip(named_params(net.layers), named_params(ref.layers)):
        np.testing.assert_array_equal(a, b)
    assert np.shares_memory(net.layers[0].W, model[0].weight.detach().numpy())
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    cast = jg.from_torch(model, x, copy=True, dtype="float64")
    assert cast.dtype == np.float64 and repr(cast) == repr(jg.Sequential.from_torch(model, dtype="float64"))
    with pytest.raises(ValueError, match=r"'0\.weight'.*casting it to float64 makes a copy, so copy=False cannot"):
        jg.from_torch(model, x, copy=False, dtype="float64")
    with torch.no_grad():  # an in-place update is seen through the views
        model[0].weight.mul_(2)
    np.testing.assert_allclose(net(x.numpy()), model(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    model.double()
    with pytest.raises(RuntimeError, match=r"re-allocated.*jg\.from_torch\(model, copy=False\)"):
        net(x.numpy())


def test_parameter_views_in_matrix_products_are_read_as_torch_computes_them():
    model = _model(RawProducts, torch.float64)
    x = np.random.default_rng(4).standard_normal((5, 4))
    net = jg.from_torch(model, torch.as_tensor(x))
    np.testing.assert_allclose(net(x), model(torch.as_tensor(x)).detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(net.layers[1].W, model.V.detach().numpy().T)
    np.testing.assert_array_equal(net.layers[0].b, model.b.detach().numpy())


# ---------------------------------------------------------------------------- shared parameters
@pytest.mark.parametrize("cls", [ReusedLinear, TiedLinears], ids=["reused", "tied"])
def test_a_parameter_used_in_several_places_is_one_shared_parameter(cls):
    """Refused until issue 22 (before that, tied weights were imported as two independent
    parameters: P too large, the NTK off). Checked in full in tests/test_shared_params.py."""
    model = _model(cls, torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    net = jg.from_torch(model, x)
    assert net.n_params == sum(p.numel() for p in model.parameters())
    assert net.layers[0].W is net.layers[1].W
    t = torch.randn(3, 4, dtype=torch.float64)
    _, g = net.loss_and_grads(x.numpy(), t.numpy())
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     torch.autograd.grad(((model(x) - t) ** 2).mean(), list(model.parameters()))))
    first = "fc.weight" if cls is ReusedLinear else "enc.weight"
    np.testing.assert_allclose(g.layers[0]["W"], grads[first].numpy().T, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- bad input
def test_an_untraceable_model_gets_torchs_reason_in_one_line(capsys):
    with pytest.raises(RuntimeError) as info:
        jg.from_torch(DataDependent(), torch.randn(3, 4))
    assert "def forward" not in capsys.readouterr().err  # torch prints its partial graph; held back
    msg = str(info.value)
    assert "\n" not in msg and "data-dependent" in msg and "if x.sum() > 0:" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_every_unsupported_op_is_listed_in_one_error_and_by_explain(capsys):
    model = _model(Unsupported, torch.float32)
    x = torch.randn(3, 4)
    with pytest.raises(TypeError) as info:
        jg.from_torch(model, x)
    msg = str(info.value)
    lines, first = inspect.getsourcelines(Unsupported.forward)
    line = {op: first + next(i for i, s in enumerate(lines) if f"torch.{op}(" in s) for op in ("exp", "sin", "abs")}
    assert "3 parts jacgrad cannot import" in msg
    for op in ("exp", "sin", "abs"):
        assert f"(aten.{op}, test_torch_capture.py:{line[op]})" in msg.replace(f"{__file__.rpartition('/')[0]}/", "")
    out = jg.explain(model, x)
    printed = capsys.readouterr().out
    assert str(out) in printed and "3 unsupported" in printed
    by_node = {r.node: r for r in out.rows}
    assert by_node["linear"].layer == "Dense" and by_node["linear"].module == "fc (Linear)"
    assert [r.op for r in out.unsupported] == ["exp", "sin", "abs"]
    assert all(r.source.endswith(f"test_torch_capture.py:{line[r.op]}") for r in out.unsupported)


def test_layers_out_of_place_are_listed_with_the_unsupported_ops():
    with pytest.raises(TypeError) as info:
        jg.from_torch(OutOfPlace(), torch.randn(3, 4))
    msg = str(info.value)
    assert "2 parts" in msg and "node exp (aten.exp" in msg
    assert "node relu" not in msg
    assert "node mul (aten.mul" in msg and "outside the end of a residual branch" in msg
    out = jg.explain(OutOfPlace(), torch.randn(3, 4), file=False)
    assert [r.node for r in out.unsupported] == ["exp", "mul"] and "2 parts" in out.problem
    assert {r.node: r.layer for r in out.rows}["relu"] == "activation relu"
    assert {r.node: r.layer for r in out.rows}["layer_norm"] == "LayerNorm"


def test_batch_norm_in_training_mode_is_refused_and_eval_mode_is_a_batchnorm1d():
    model = _model(WithBatchNorm, torch.float64)
    with pytest.raises(TypeError, match=r"batch norm in training mode.*model\.eval\(\)"):
        jg.from_torch(model.train(), torch.randn(3, 4))
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5), model.bn.running_var.uniform_(0.5, 1.5)
    x = np.random.default_rng(4).standard_normal((5, 4))
    net = jg.from_torch(model.eval(), torch.as_tensor(x))
    assert [type(L).__name__ for L in net.layers] == ["Dense", "BatchNorm1d"]
    _check_against_torch(model, net, x, 1e-10)


def test_two_outputs_are_refused():
    with pytest.raises(TypeError, match=r"TwoOutputs returns 2 outputs.*a jacgrad network has one"):
        jg.from_torch(TwoOutputs(), torch.randn(3, 4))


class CrossedBranches(nn.Module):
    """y + g(x) + h(y), y = tanh(f(x)): g reads x past y, h reads y: no chain of residual blocks."""

    def __init__(self):
        super().__init__()
        self.f, self.g, self.h = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = torch.tanh(self.f(x))
        return y + self.g(x) + self.h(y)


def test_two_branches_from_one_value_are_a_block_with_a_projection_shortcut():
    model = _model(TwoBranches, torch.float64)
    x = np.random.default_rng(0).standard_normal((5, 4))
    net = jg.from_torch(model, torch.as_tensor(x))
    (block,) = net.layers
    assert [L.kind for L in block.branch] == ["residual"] and [L.kind for L in block.shortcut] == ["dense"]
    _check_against_torch(model, net, x, 1e-10)


def test_a_graph_that_is_not_a_chain_is_refused_by_from_torch_and_explained():
    with pytest.raises(TypeError, match=r"the walk back from the output reached .*no general DAG"):
        jg.from_torch(CrossedBranches(), torch.randn(3, 4))
    out = jg.explain(CrossedBranches(), torch.randn(3, 4), file=False)
    assert not out.unsupported and "no general DAG" in out.problem and not out.network


def test_a_concatenated_skip_is_listed_and_said_to_end_the_chain():
    with pytest.raises(TypeError) as info:
        jg.from_torch(ConcatSkip(), torch.randn(3, 4))
    msg = str(info.value)
    assert "1 part jacgrad cannot import" in msg and "node cat (aten.cat" in msg
    assert "and besides: ConcatSkip: the walk back from the output stops at node cat" in msg


def test_a_token_axis_flattened_away_is_refused_and_token_mixing_is_read():
    net = jg.from_torch(MixerTokens(), torch.randn(2, 5, 4))  # tests/test_zoo_tokens.py checks such models' numbers
    assert "TransposeTokens(5, 4), Dense(5->5, identity), TransposeTokens(4, 5)" in repr(net)
    with pytest.raises(TypeError, match=r"token batch \(B, 5, 4\) but Flatten\(\) does not act per token"):
        jg.from_torch(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(15, 2)), torch.randn(2, 5, 4))


# ---------------------------------------------------------------------------- the op table
def test_supported_op_table_is_generated_from_the_importer_table():
    md = supported_ops_markdown()
    rows = md.splitlines()[2:]
    assert len(rows) == len(OPS) + len(PENDING)
    for name in OPS:
        assert any(r.startswith(f"| `aten.{name}` |") for r in rows)
    for name in PENDING:
        assert f"| `aten.{name}` | not read from the graph yet: {PENDING[name]} |" in rows

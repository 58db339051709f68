"""``net.compile(B, loss, clip=C, noise_multiplier=σ)``: the compiled private step gives
``clipped_grad``'s numbers bitwise on NumPy (noise off, and with noise when both start from the
same seed), fresh noise every call from its one generator, stays bound to the parameters by
reference, and on the repo's fake CuPy is recorded once and replayed while its noise is drawn
after every replay. The reference for the clipped sum itself is torch.func (``test_private``);
here the reference is ``clipped_grad``, which that file checks."""

import numpy as np
import pytest

import jacgrad as jg
from fake_cupy_calls import FakeCupy
from jacgrad.cuda import graphs as _cuda_graph
from jacgrad.cuda.graphs import GraphCache

L = jg.layers


def _blocks(dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(dtype)  # noqa: E731
    return jg.Sequential([L.Dense(r(4, 6), rng.standard_normal(6).astype(dtype) * 0.1, "tanh"),
                          L.Residual([L.LayerNorm(np.ones(6, dtype) + r(6) * 0.3, r(6) * 0.2), L.Dense(r(6, 6), None, "gelu")], 0.5),
                          L.RMSNorm(np.ones(6, dtype) + r(6) * 0.3), L.Dense(r(6, 3))])


def _nets(dtype="float64"):
    return {"mlp": jg.MLP.init([4, 6, 5, 3], activation=["gelu", "relu"], seed=1, bias_std=0.2, dtype=dtype),
            "blocks": _blocks(dtype)}


def _data(loss, B=6, seed=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 4)).astype(dtype)
    t = {"mse": lambda: rng.standard_normal((B, 3)).astype(dtype), "sigmoid_bce": lambda: rng.uniform(0, 1, (B, 3)).astype(dtype),
         "softmax_cross_entropy": lambda: rng.integers(0, 3, B)}[loss]()
    return x, t


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("loss", ["mse", "sigmoid_bce", "softmax_cross_entropy"])
@pytest.mark.parametrize("kind", ["mlp", "blocks"])
def test_step_is_bitwise_clipped_grad_across_calls_and_updates(kind, loss, dtype):
    net = _nets(dtype)[kind]
    x, t = _data(loss, dtype=np.dtype(dtype))
    C = float(np.median(net.per_sample_grad_norms(x, t, loss=loss)))
    step = net.compile(6, loss=loss, clip=C)
    for _ in range(3):
        value, r = step(x, t)
        want = net.clipped_grad(x, t, loss=loss, max_norm=C)
        assert np.array_equal(r.flat, want.flat) and np.array_equal(r.norms, want.norms)
        assert float(r.clipped_fraction) == float(want.clipped_fraction) and r.noise_std == 0.0
        assert value == net.loss_and_grads(x, t, loss=loss)[0]
        assert r.grads.input is None and r.grads.deltas is None
        flat = r.flat.copy()
        W = net.weights[0] if kind == "mlp" else net.layers[0].params[0]
        W -= 0.1 * (r.grads.weights[0] if kind == "mlp" else r.grads.layers[0]["W"])  # in place: seen next call
    assert not np.array_equal(step(x, t)[1].flat, flat)


@pytest.mark.parametrize("kind", ["mlp", "blocks"])
def test_noise_matches_clipped_grad_from_the_same_seed_and_is_fresh_every_call(kind):
    net = _nets()[kind]
    x, t = _data("mse")
    step = net.compile(6, loss="mse", clip=0.3, noise_multiplier=1.3, seed=11)
    first = step(x, t, copy=True)[1]
    want = net.clipped_grad(x, t, loss="mse", max_norm=0.3, noise_multiplier=1.3, seed=11)
    assert np.array_equal(first.flat, want.flat) and first.noise_std == pytest.approx(1.3 * 0.3 / 6, rel=1e-15)
    second = step(x, t, copy=True)[1]
    assert not np.array_equal(first.flat, second.flat)
    again = net.compile(6, loss="mse", clip=0.3, noise_multiplier=1.3, seed=11)
    assert np.array_equal(again(x, t)[1].flat, first.flat)  # the same seed: the same sequence


def test_results_are_buffers_unless_copied_and_nbytes_counts_the_private_ones():
    net = _nets()["mlp"]
    x, t = _data("mse")
    plain, step = net.compile(6), net.compile(6, clip=1.0, noise_multiplier=1.0, seed=0)
    a = step(x, t)[1]
    b = step(x, t)[1]
    assert a.flat is b.flat and a.norms is b.norms
    c = step(x, t, copy=True)[1]
    assert c.flat is not b.flat and not np.shares_memory(c.grads.weights[0], b.flat)
    assert step.nbytes > plain.nbytes


def test_bad_private_arguments():
    net = _nets()["mlp"]
    with pytest.raises(ValueError, match="need clip=C"):
        net.compile(4, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        net.compile(4, clip=0.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        net.compile(4, clip=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="input_grad=False"):
        net.compile(4, clip=1.0, input_grad=True)


# ---------------------------------------------------------------------- the CUDA-graph path, faked
@pytest.fixture
def fake_cupy(monkeypatch):
    cp = FakeCupy()
    monkeypatch.setattr(_cuda_graph.backend, "cupy", lambda: cp)
    return cp


@pytest.mark.parametrize("kind", ["mlp", "blocks"])
def test_recorded_once_and_replayed_with_fresh_noise_after_every_replay(fake_cupy, kind):
    """The fake records by running the step again and replays by doing nothing: what a replay
    returns is what the recording wrote plus what runs outside the graph. The clipped sum is
    recorded; the noise is drawn after the graph on every call, so it differs between replays."""
    net = _nets()[kind]
    x, t = _data("softmax_cross_entropy")
    step = net.compile(6, loss="softmax_cross_entropy", clip=0.2, noise_multiplier=1.0, seed=5)
    step._graphs = GraphCache()  # the real cache over the fake CuPy: the step's own code is recorded
    clean = net.clipped_grad(x, t, loss="softmax_cross_entropy", max_norm=0.2).flat
    outs = []
    for _ in range(3):
        outs.append(step(x, t, copy=True)[1].flat)
    assert fake_cupy.calls.count("begin_capture") == 1 and fake_cupy.calls[-1] == "launch"
    noises = [o - clean for o in outs]
    assert all(np.abs(n).max() > 0 for n in noises)
    assert not np.allclose(noises[1], noises[2])
    # each is N(0, (σC/B)²) around the clean clipped mean: within 6 std of it everywhere (P < 200)
    assert all(np.abs(n).max() < 6 * 0.2 / 6 for n in noises)


def test_import_jacgrad_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, jacgrad; assert callable(jacgrad.network.torch_dp.dp_backward); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

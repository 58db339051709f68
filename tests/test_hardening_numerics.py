"""Hardening, round 3 (issue 20), the numerics: the activation spelling and pickling, the input
dtype, ggn_vp where the softmax saturates (against mpmath), ggn_diagonal's memory budget
(tracemalloc) and the budget messages."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.elementwise import activations

L = jg.layers

# every activation, bare and with parameters that differ from the defaults
ROWS = activations.names() + ["leaky_relu(negative_slope=0.2)", "elu(alpha=0.5)", "softplus(beta=2.0,threshold=5.0)",
                              "hard_tanh(min_val=-2.0,max_val=0.5)"]


# --------------------------------------------------------------------------- item 10: the spelling
@pytest.mark.parametrize("spelling, match", [
    ("elu(alpha=0.5,alpha=2)", "alpha is given twice"),
    ("hard_tanh(min_val=-2,max_val=2,min_val=-3)", "min_val is given twice"),
    ("elu()", "an empty parameter list; write 'elu' for the defaults"),
    ("elu(alpha=0.5,)", "an empty entry"),
    ("elu(,alpha=0.5)", "an empty entry"),
    ("elu(0.5, alpha=2)", "'0.5' has no key.*positional values are not accepted"),
    ("elu(=0.5)", "does not start with a parameter name"),
    ("elu(alpha=1_0)", "'1_0' is not a number"),
    ("elu(alpha=0x10)", "'0x10' is not a number"),
    ("elu(alpha=(0.5))", "one parenthesised list"),
    ("elu(alpha=0.5))", "one parenthesised list"),
])
def test_sloppy_spellings_are_refused_by_name(spelling, match):
    with pytest.raises(ValueError, match=match):
        activations.get(spelling)
    with pytest.raises(ValueError, match=match):
        jg.MLP.init([2, 3, 1], activation=spelling)


@pytest.mark.parametrize("value", [True, np.True_, "0.5", None, [0.5]])
def test_a_keyword_parameter_must_be_a_real_number(value):
    with pytest.raises(TypeError, match=r"alpha must be a real number"):
        activations.get("elu", alpha=value)


def test_numpy_scalars_are_real_numbers():
    assert activations.get("elu", alpha=np.float32(0.5)) is activations.get("elu(alpha=0.5)")


# --------------------------------------------------------------------------- item 15: pickling
@pytest.mark.parametrize("name", ROWS)
def test_every_activation_row_pickles_as_itself(name):
    act = activations.get(name)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        assert pickle.loads(pickle.dumps(act, protocol)) is act


def test_a_row_built_by_hand_pickles_field_by_field():
    act = activations.Activation("mine", np.tanh, np.cos, None, 1.0, "jacgrad::Tanh")
    back = pickle.loads(pickle.dumps(act))
    assert back == act and back is not act and activations.get("tanh") is not back


def _nets(name):
    rng = np.random.default_rng(0)
    mlp = jg.MLP.init([4, 6, 5, 3], activation=name, bias_std=0.1, seed=1)
    seq = jg.Sequential([L.Dense(rng.standard_normal((4, 6)) / 2, rng.standard_normal(6) / 4, name),
                         L.Residual([L.LayerNorm(1 + 0.1 * rng.standard_normal(6)),
                                     L.Dense(rng.standard_normal((6, 6)) / 3, None, name)], 0.5),
                         L.Dense(rng.standard_normal((6, 3)) / 3)])
    return mlp, seq


@pytest.mark.parametrize("name", ROWS)
def test_networks_with_every_activation_pickle_and_compute_the_same(name):
    x = np.random.default_rng(2).standard_normal((5, 4)) * 2
    t = np.random.default_rng(3).standard_normal((5, 3))
    for net in _nets(name):
        back = pickle.loads(pickle.dumps(net))
        np.testing.assert_array_equal(back(x), net(x))
        np.testing.assert_array_equal(back.loss_and_grads(x, t)[1].flat, net.loss_and_grads(x, t)[1].flat)


def test_a_fresh_process_rebuilds_the_parameterised_rows(tmp_path):
    """What ProcessPoolExecutor and Dask's process workers do: unpickle where the rows were never built."""
    names = ROWS[-4:]
    x = np.random.default_rng(4).standard_normal((5, 4))
    nets = [net for name in names for net in _nets(name)]
    (tmp_path / "nets.pkl").write_bytes(pickle.dumps((nets, x)))
    code = textwrap.dedent(f"""
        import pickle, sys, numpy as np
        nets, x = pickle.loads(open({str(tmp_path / 'nets.pkl')!r}, 'rb').read())
        np.save({str(tmp_path / 'out.npy')!r}, np.stack([net(x) for net in nets]))
        from jacgrad.nn.layers import leaf_layers
        print(sorted({{L.activation for net in nets for _, L in leaf_layers(net.layers)
                      if hasattr(L, 'activation')}} - {{'identity'}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.stack([net(x) for net in nets]))
    assert done.stdout.strip() == str(sorted(names))


# --------------------------------------------------------------------------- item 9: ggn_vp, saturated softmax
SCALES = [1.0, 30.0, 1000.0]


def _scaled_mlp(scale):
    """An MLP 3-5-4 (tanh, identity) whose logits are spread over ~0.3: ×1000 the softmax's top
    probability rounds to 1 while the others stay above float64's underflow (e^-50 … e^-300)."""
    rng = np.random.default_rng(7)
    W0, b0 = rng.standard_normal((3, 5)), 0.2 * rng.standard_normal(5)
    W1, b1 = 0.1 * rng.standard_normal((5, 4)), 0.05 * rng.standard_normal(4)
    return jg.MLP([W0, scale * W1], [b0, scale * b1], ["tanh", "identity"])


def _scaled_seq(scale):
    rng = np.random.default_rng(8)
    return jg.Sequential([L.Dense(rng.standard_normal((3, 5)), 0.2 * rng.standard_normal(5), "tanh"),
                          L.LayerNorm(1 + 0.1 * rng.standard_normal(5), 0.1 * rng.standard_normal(5)),
                          L.Dense(0.05 * scale * rng.standard_normal((5, 4)), 0.02 * scale * rng.standard_normal(4))])


X = np.random.default_rng(9).standard_normal((3, 3))


def _mp_ggn_vp(net, x, v, loss):
    """Gv = (1/B) Σ_i J_iᵀ H_i J_i v of the 2-layer MLP y = tanh(x W0 + b0) W1 + b1, every step in
    mpmath at 800 digits from the float64 parameters (forward, the tangent, H_i, the pullback)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(800):
        M = lambda a: mpmath.matrix([[mpmath.mpf(float(e)) for e in row] for row in np.atleast_2d(a)])  # noqa: E731
        (W0, W1), (b0, b1) = net.weights, net.biases
        n0, n1, C = W0.shape[0], W0.shape[1], W1.shape[1]
        vW0, vb0 = v[:n0 * n1].reshape(n0, n1), v[n0 * n1:n0 * n1 + n1]
        rest = v[n0 * n1 + n1:]
        vW1, vb1 = rest[:n1 * C].reshape(n1, C), rest[n1 * C:]
        W0m, W1m, b0m, b1m, vW0m, vW1m, vb0m, vb1m = map(M, (W0, W1, b0, b1, vW0, vW1, vb0, vb1))
        gW0, gb0 = mpmath.zeros(n0, n1), mpmath.zeros(1, n1)
        gW1, gb1 = mpmath.zeros(n1, C), mpmath.zeros(1, C)
        B = x.shape[0]
        for i in range(B):
            xi = M(x[i])
            h = xi * W0m + b0m
            z = h.apply(mpmath.tanh)
            d = z.apply(lambda e: 1 - e * e)
            y = z * W1m + b1m
            hdot = mpmath.matrix([[(xi * vW0m + vb0m)[0, j] * d[0, j] for j in range(n1)]])
            t = hdot * W1m + z * vW1m + vb1m  # J_i v
            if loss == "softmax_cross_entropy":
                m = max(y[0, c] for c in range(C))
                e = [mpmath.exp(y[0, c] - m) for c in range(C)]
                p = [ec / sum(e) for ec in e]
                pt = sum(p[c] * t[0, c] for c in range(C))
                u = [p[c] * (t[0, c] - pt) for c in range(C)]
            else:  # sigmoid_bce: diag(σ(1 - σ)) / C
                u = [t[0, c] * mpmath.exp(-y[0, c]) / (1 + mpmath.exp(-y[0, c])) ** 2 / C for c in range(C)]
            u = mpmath.matrix([[uc / B for uc in u]])
            gW1 += z.T * u
            gb1 += u
            delta = mpmath.matrix([[(u * W1m.T)[0, j] * d[0, j] for j in range(n1)]])
            gW0 += xi.T * delta
            gb0 += delta
        flat = [gW0[a, b] for a in range(n0) for b in range(n1)] + [gb0[0, j] for j in range(n1)]
        flat += [gW1[a, b] for a in range(n1) for b in range(C)] + [gb1[0, c] for c in range(C)]
        return np.array([float(f) for f in flat])


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_bce"])
@pytest.mark.parametrize("scale", SCALES)
def test_ggn_vp_keeps_its_relative_accuracy_where_the_softmax_saturates(scale, loss):
    net = _scaled_mlp(scale)
    if scale == 1000.0 and loss == "softmax_cross_entropy":  # the regime of the bug: p_max rounds to 1
        s = net(X) - net(X).max(axis=1, keepdims=True)
        p = np.exp(s - np.log(np.exp(s).sum(axis=1, keepdims=True)))
        assert (p.max(axis=1) == 1.0).all() and (np.sort(p, axis=1)[:, -2] > 1e-300).all()
    P = sum(W.size + W.shape[1] for W in net.weights)
    v = np.random.default_rng(10).standard_normal(P)
    ref = _mp_ggn_vp(net, X, v, loss)
    got = net.ggn_vp(X, v, loss=loss)
    assert np.linalg.norm(got - ref) <= 1e-12 * np.linalg.norm(ref)


@pytest.mark.parametrize("scale", SCALES)
def test_hessian_vp_of_the_softmax_matches_mpmath_componentwise(scale):
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(11)
    y, u = scale * 0.1 * rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    got = jg.loss_hessians.hessian_vp("softmax_cross_entropy", y, u)
    with mpmath.workdps(800):
        for i in range(4):
            m = max(mpmath.mpf(float(a)) for a in y[i])
            e = [mpmath.exp(mpmath.mpf(float(a)) - m) for a in y[i]]
            p = [ec / sum(e) for ec in e]
            pu = sum(pc * mpmath.mpf(float(uc)) for pc, uc in zip(p, u[i]))
            ref = np.array([float(pc * (mpmath.mpf(float(uc)) - pu)) for pc, uc in zip(p, u[i])])
            np.testing.assert_allclose(got[i], ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("make", [_scaled_mlp, _scaled_seq], ids=["mlp", "sequential"])
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "sigmoid_bce"])
@pytest.mark.parametrize("scale", SCALES)
def test_ggn_vp_of_a_unit_vector_is_the_diagonal_in_every_regime(make, loss, scale):
    net = make(scale)
    D = net.ggn_diagonal(X, loss=loss).flat
    E = np.eye(D.size)
    got = np.array([net.ggn_vp(X, E[k], loss=loss)[k] for k in range(D.size)])
    np.testing.assert_allclose(got, D, rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- item 16: ggn_diagonal's budget
def _wide_output_nets(C):
    rng = np.random.default_rng(12)
    mlp = jg.MLP.init([6, 12, C], activation="tanh", seed=5)
    seq = jg.Sequential([L.Dense(rng.standard_normal((6, 12)) / 3, None, "tanh"), L.LayerNorm(np.ones(12)),
                         L.Dense(rng.standard_normal((12, C)) / 4)])
    return mlp, seq


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse", "sigmoid_bce"])
def test_ggn_diagonal_stays_within_max_memory_with_many_outputs(loss):
    """B × C × C of the loss-Hessian factor is 52 MiB here, the budget 2 MiB: made a chunk at a
    time, the peak (tracemalloc, after the inputs exist) stays within twice the budget plus the
    forward cache, and the diagonal is the unchunked one."""
    import tracemalloc

    B, C, budget = 1600, 64, 2 << 20
    rng = np.random.default_rng(13)
    x = rng.standard_normal((B, 6))
    t = rng.dirichlet(np.ones(C), B) if loss == "softmax_cross_entropy" else rng.random((B, C))
    for net in _wide_output_nets(C):
        ref = net.ggn_diagonal(x[:400], t[:400], loss=loss, max_memory=None).flat  # small enough to build whole
        np.testing.assert_allclose(net.ggn_diagonal(x[:400], t[:400], loss=loss, max_memory=budget).flat, ref,
                                   rtol=1e-12, atol=0)
        cache = B * (6 + 2 * 12 + 2 * C) * 8  # the forward pass's saved arrays and the output
        tracemalloc.start()
        try:
            net.ggn_diagonal(x, t, loss=loss, max_memory=budget)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert B * C * C * 8 > 20 * budget
        assert peak <= 2 * budget + cache, f"peak {peak / 2**20:.1f} MiB against a budget of {budget / 2**20:.0f} MiB"


def test_the_target_is_checked_once_for_the_whole_batch_and_rows_scale_each_chunk():
    net = _wide_output_nets(5)[0]
    rng = np.random.default_rng(14)
    x, T = rng.standard_normal((30, 6)), 2.0 * rng.dirichlet(np.ones(5), 30)  # rows summing to 2: H scaled by 2
    whole = net.ggn_diagonal(x, T, loss="softmax_cross_entropy", max_memory=None).flat
    np.testing.assert_allclose(net.ggn_diagonal(x, T, loss="softmax_cross_entropy", max_memory=1).flat, whole,
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(whole, 2 * net.ggn_diagonal(x, T / 2, loss="softmax_cross_entropy").flat, rtol=1e-12)
    bad = np.zeros(30, dtype=int)
    bad[-1] = 5  # out of range, in the last chunk: refused before any chunk runs
    with pytest.raises(ValueError, match="label 5"):
        net.ggn_diagonal(x, bad, loss="softmax_cross_entropy", max_memory=1)


# --------------------------------------------------------------------------- item 17: budget messages
@pytest.mark.parametrize("bad, why", [
    (float("nan"), r"got nan, which is not a size"),
    (float("inf"), r"got inf; for no limit pass None"),
    (-np.inf, r"got -inf; for no limit pass None"),
    (-5, r"got -5$"),
    (0, r"got 0$"),
    (True, r"got True, a bool"),
    (np.True_, r"got np.True_, a bool|got True, a bool"),
    ("1GB", r"got '1GB' \(a str, not a number\)"),
    ([1 << 20], r"got \[1048576\] \(a list, not a number\)"),
])
def test_a_bad_max_memory_is_refused_by_what_it_is(bad, why):
    net, x = _wide_output_nets(3)[0], np.ones((4, 6))
    for call in (lambda: net.ggn_diagonal(x, max_memory=bad), lambda: jg.ntk(net, x, max_memory=bad),
                 lambda: net.per_sample_grads(x, np.zeros((4, 3)), max_memory=bad)):
        with pytest.raises(ValueError, match=r"max_memory must be a number of bytes > 0, or None for no limit; " + why):
            call()
    for call in (lambda: jg.distributed.jacobian_spectral_norm(net, x, max_memory=bad),
                 lambda: jg.diagnostics.gradient_flow(net, x, max_memory=bad)):
        with pytest.raises(ValueError, match=r"max_memory must be a number of bytes > 0, or None for the default "
                                             r"budget; " + why.replace("no limit", "the default budget")):
            call()


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (100, "100 bytes"), (1023, "1023 bytes"), (1024, "1 KiB"),
                                     (2000, "1.95 KiB"), (16 << 20, "16 MiB"), (int(1.5 * 2**30), "1.5 GiB"),
                                     (5 << 40, "5 TiB"), (0.5, "0.5 bytes")])
def test_sizes_are_written_in_the_unit_their_magnitude_calls_for(n, text):
    from jacgrad.core.validation import byte_size

    assert byte_size(n) == text


def test_a_too_small_max_memory_names_real_sizes():
    net, x = _wide_output_nets(3)[0], np.ones((4, 6))
    with pytest.raises(MemoryError, match=r"one sample needs about \d+(\.\d+)? (bytes|KiB) of intermediates but "
                                          r"max_memory is 10 bytes: raise max_memory") as info:
        jg.distributed.jacobian_spectral_norm(net, x, max_memory=10)
    assert "0.0 MiB" not in str(info.value)
    with pytest.raises(ValueError, match=r"per_sample_grads of B=4 samples x P=\d+ parameters \(float64\) needs "
                                         r"\d+(\.\d+)? (bytes|KiB) \(\d+ bytes\), more than max_memory=100 bytes"):
        net.per_sample_grads(x, np.zeros((4, 3)), max_memory=100)


# --------------------------------------------------------------------------- item 8: the input dtype
def _f32_nets():
    rng = np.random.default_rng(15)
    mlp = jg.MLP.init([4, 5, 3], activation="tanh", seed=6, dtype="float32")
    seq = jg.Sequential([L.Dense((rng.standard_normal((4, 5)) / 2).astype(np.float32), None, "tanh"),
                         L.LayerNorm(np.ones(5, dtype=np.float32)),
                         L.Dense((rng.standard_normal((5, 3)) / 2).astype(np.float32))])
    return mlp, seq


def _has_dask():
    try:
        import dask.array  # noqa: F401
    except ImportError:
        return False
    return True


def _entry_points(net, x, t):
    P = sum(p.size for p in (net.weights + net.biases if hasattr(net, "weights") else
                             [q for lay in net.layers for q in lay.params]))
    yield "forward", lambda: net.forward(x)
    yield "__call__", lambda: net(x)
    yield "loss_and_grads", lambda: net.loss_and_grads(x, t)
    yield "per_sample_grads", lambda: net.per_sample_grads(x, t)
    yield "per_sample_grad_norms", lambda: net.per_sample_grad_norms(x, t)
    yield "ggn_vp", lambda: net.ggn_vp(x, np.ones(P, dtype=np.float32))
    yield "ggn_diagonal", lambda: net.ggn_diagonal(x)
    yield "ntk", lambda: jg.ntk(net, x)
    yield "gradient_flow", lambda: jg.diagnostics.gradient_flow(net, x, t)
    if _has_dask():
        import dask.array as da

        yield "gradient_flow of a Dask batch", lambda: jg.diagnostics.gradient_flow(net, da.from_array(x, chunks=3), t)
        yield "distributed, a Dask batch", lambda: jg.distributed.jacobian_spectral_norm(net, da.from_array(x, chunks=3))
    yield "distributed, in memory", lambda: jg.distributed.jacobian_spectral_norm(net, x)
    yield "compile", lambda: net.compile(x.shape[0])(x, t)
    yield "compile_jacobian", lambda: net.compile_jacobian(x.shape[0])(x)


@pytest.mark.parametrize("kind", [0, 1], ids=["mlp", "sequential"])
def test_float64_input_to_a_float32_network_is_refused_at_every_entry_point(kind):
    net = _f32_nets()[kind]
    x, t = np.random.default_rng(16).standard_normal((6, 4)), np.zeros((6, 3), dtype=np.float32)
    for name, call in _entry_points(net, x, t):
        with pytest.raises(TypeError, match=r"(x1?|X) is float64 but the network is float32, and jacgrad does not "
                                            r"round inputs silently: pass (x1?|X)\.astype\(np\.float32\), or build "
                                            r"the network in float64"):
            call()
    for name, call in _entry_points(net, x.astype(np.float32), t):  # the way out the message names
        out = call()
        out = out[0] if isinstance(out, tuple) else out  # forward's y, loss_and_grads' loss
        out = out if isinstance(out, np.ndarray) or not hasattr(out, "flat") else out.flat  # Gradients
        assert np.dtype(out.dtype) == np.float32, name  # arrays, and the reports' dtype names


def test_float32_input_to_a_float64_network_is_exact_and_lists_take_the_networks_dtype():
    x32 = np.random.default_rng(17).standard_normal((6, 4)).astype(np.float32)
    for net32 in _f32_nets():
        np.testing.assert_array_equal(net32(x32.tolist()), net32(x32))  # a list has no dtype: made in float32
    net = jg.MLP.init([4, 5, 3], activation="tanh", seed=6)
    np.testing.assert_array_equal(net(x32), net(x32.astype(np.float64)))  # float32 -> float64 is exact
    assert net([[0.5, 1, 2, 3]]).dtype == np.float64
    with pytest.raises(TypeError, match="x has dtype int64; jacgrad works in float32 or float64"):
        net(np.ones((2, 4), dtype=np.int64))


def test_a_float64_torch_tensor_to_a_float32_network_is_refused():
    torch = pytest.importorskip("torch")
    net = _f32_nets()[0]
    with pytest.raises(TypeError, match="x is float64 but the network is float32"):
        net(torch.ones(2, 4, dtype=torch.float64))
    np.testing.assert_array_equal(net(torch.ones(2, 4)), net(np.ones((2, 4), dtype=np.float32)))


def test_the_command_names_a_data_file_wider_than_dtype(tmp_path, capsys):
    pytest.importorskip("dask.array")
    from jacgrad.cli.main import main

    np.save(tmp_path / "x.npy", np.random.default_rng(18).standard_normal((20, 8)))
    code = main(["report", "--data", str(tmp_path / "x.npy"), "--dtype", "float32", "--sizes", "8,6,3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "x.npy' is float64 but the network is float32: pass --dtype float64, or save the data as float32" in err

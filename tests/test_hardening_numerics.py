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
from jacgrad import activations

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
        print(sorted({{a.name for net in nets for a in getattr(net, '_acts', [])}} - {{'identity'}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.stack([net(x) for net in nets]))
    assert done.stdout.strip() == str(sorted(names))

"""Issue 20 ("Hardening, round 3"), the command line: inputs that ended in tracebacks, loss names
(torch's aliases, integer labels with mse), separate hidden and output activations with the
``NAME*COUNT`` shorthand, and the CLI's own option names in the library's errors."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad import loss_hessians, losses
from jacgrad.cli import main

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def one_line_error(capsys, code, *needles):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- item 19: tracebacks, exits
@pytest.mark.parametrize("argv, needles", [
    (["--sizes", "99999999999999999999,2"], ["--sizes", "parameters", "RAM"]),
    (["--sizes", "4,8x99999999999,2"], ["--sizes", "layers"]),
    (["--depth", "99999999999"], ["--depth", "layers"]),
    (["--width", "99999999999", "--depth", "2"], ["--depth, --width", "parameters"]),
])
def test_absurd_sizes_are_one_line_and_exit_2(capsys, argv, needles):
    one_line_error(capsys, main(["report", *argv]), *needles)


@pytest.mark.parametrize("address", ["not a url", "tcp://host", "tcp://10.0.0.5:99999"])
def test_a_malformed_scheduler_address_is_one_line_and_exit_2(capsys, tmp_path, address):
    pytest.importorskip("distributed", reason="--scheduler needs dask.distributed")
    x = tmp_path / "X.npy"
    np.save(x, np.zeros((4, 3)))
    code = main(["report", "--sizes", "3,4,2", "--data", str(x), "--scheduler", address])
    one_line_error(capsys, code, "--scheduler", repr(address), "tcp://")


def test_an_unknown_loss_is_a_valueerror_listing_the_names_and_aliases():
    net = jg.MLP.init([3, 4, 2], seed=0)
    x, t = np.ones((2, 3)), np.zeros((2, 2))
    calls = [lambda: losses.get("hinge"), lambda: net.loss_and_grads(x, t, loss="hinge"),
             lambda: net.compile(2, loss="hinge"), lambda: loss_hessians.hessian_vp("hinge", t, t),
             lambda: jg.diagnostics.gradient_flow(net, x, t, loss="hinge")]
    for call in calls:
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        for name in ("mse", "sigmoid_bce", "softmax_cross_entropy", "cross_entropy", "binary_cross_entropy_with_logits"):
            assert name in msg, msg


def test_torch_loss_names_are_aliases_everywhere():
    torch = pytest.importorskip("torch", reason="the reference values come from torch.nn.functional")
    rng = np.random.default_rng(0)
    net = jg.MLP.init([3, 5, 4], activation="tanh", seed=1)
    x = rng.standard_normal((6, 3))
    labels, probs = rng.integers(0, 4, 6), rng.uniform(size=(6, 4))
    y = net(x)
    F = torch.nn.functional
    refs = {
        "cross_entropy": (labels, F.cross_entropy(torch.tensor(y), torch.tensor(labels)).item()),
        "binary_cross_entropy_with_logits": (
            probs, F.binary_cross_entropy_with_logits(torch.tensor(y), torch.tensor(probs)).item()),
    }
    for alias, (t, want) in refs.items():
        canonical = losses.ALIASES[alias]
        value, _ = losses.get(alias)(y, t)
        assert float(value) == pytest.approx(want, rel=1e-12)
        loss, g = net.loss_and_grads(x, t, loss=alias)
        loss_c, g_c = net.loss_and_grads(x, t, loss=canonical)
        assert float(loss) == float(loss_c) and np.array_equal(g.flat, g_c.flat)
        step = net.compile(6, loss=alias)
        assert step.loss == canonical
        s_loss, s_g = step(x, t)
        assert float(s_loss) == pytest.approx(float(loss_c), rel=1e-12)
        np.testing.assert_allclose(np.asarray(s_g.flat), g_c.flat, rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(loss_hessians.hessian_factor(alias, y, t if t.ndim == 2 else None),
                                      loss_hessians.hessian_factor(canonical, y, t if t.ndim == 2 else None))
        np.testing.assert_array_equal(net.ggn_diagonal(x, t, loss=alias).flat, net.ggn_diagonal(x, t, loss=canonical).flat)
        assert jg.diagnostics.gradient_flow(net, x, t, loss=alias).loss_value == pytest.approx(float(loss_c))


def test_integer_labels_with_mse_point_to_softmax_cross_entropy():
    net = jg.MLP.init([3, 4, 2], seed=0)
    with pytest.raises(TypeError) as info:
        net.loss_and_grads(np.ones((2, 3)), np.array([0, 1]), loss="mse")
    msg = str(info.value)
    assert "softmax_cross_entropy" in msg and "cast it first" not in msg, msg

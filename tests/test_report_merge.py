"""The report as mergeable partials: a batch cut into chunks, each chunk's partial computed on
its own and the partials merged (in any order), gives the report of the whole batch — up to
floating-point summation order (and the 1e-6 to which ‖J_j‖₂ is computed)."""

import functools

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow import block_flow as _flow
from jacgrad.flow.diagnostics import gradient_flow, report_from_partials

pytestmark = pytest.mark.usefixtures("one_blas_thread")

_EXACT = ("grad_norm", "bias_grad_norm", "delta_norm", "weight_spectral_norm", "derivative_mean", "active_fraction",
          "saturated_fraction", "chi", "jacobian_bound")


def _net(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [12, 40, 72, 30, 5]  # 72 > 64: that layer's norms come from Lanczos, the others by eigensolve
    Ws = [rng.standard_normal((a, b)) / np.sqrt(a) * 1.2 for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.standard_normal(b) * 0.2 - 0.1 for b in sizes[1:]]
    return jg.MLP(Ws, bs, ["relu", "tanh", "relu", "identity"])


def _chunked(net, x, target, cuts, order, **kw):
    edges = [0] + list(cuts) + [len(x)]
    parts = []
    for a, b in zip(edges[:-1], edges[1:]):
        t = None if target is None else target[a:b]
        parts.append(_flow.partials(net, x[a:b], t, start=a, total=len(x), **kw))
    return report_from_partials(functools.reduce(_flow.merge, [parts[i] for i in order]))


def _same(whole, merged):
    assert merged.batch == whole.batch and merged.verdict == whole.verdict
    for a, b in zip(merged.layers, whole.layers):
        for name in _EXACT:
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-10, nan_ok=True), (a.index, name)
        assert a.dead_units == b.dead_units
        assert a.jacobian_norm == pytest.approx(b.jacobian_norm, rel=1e-6)
    assert merged.chi_bar == pytest.approx(whole.chi_bar, rel=1e-10)
    assert merged.mean_squared_singular_value == pytest.approx(whole.mean_squared_singular_value, rel=1e-10)
    np.testing.assert_allclose(merged.jacobian_singular_values, whole.jacobian_singular_values, rtol=1e-10,
                               atol=1e-14)
    assert merged.spectrum_method == whole.spectrum_method


@pytest.mark.parametrize("loss", [None, "mse", "softmax_cross_entropy"])
def test_chunks_merged_in_any_order_give_the_whole_batch_report(loss):
    net = _net()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 12))
    target = {None: None, "mse": rng.standard_normal((37, 5)), "softmax_cross_entropy": rng.integers(0, 5, 37)}[loss]
    kw = {} if loss is None else {"loss": loss}
    whole = gradient_flow(net, x, target, spectrum_samples=20, **kw)
    for cuts, order in (((5, 22), (0, 1, 2)), ((1, 2, 30, 31), (4, 2, 0, 3, 1)), ((18,), (1, 0))):
        merged = _chunked(net, x, target, cuts, order, spectrum_samples=20, **kw)
        _same(whole, merged)
        if loss is not None:
            assert merged.loss_value == pytest.approx(whole.loss_value, rel=1e-12)


def test_dead_units_are_dead_over_every_chunk():
    # unit 0 of layer 0 fires for the first sample only: dead in every chunk but the first one,
    # alive over the batch
    W = np.zeros((2, 3))
    W[0] = [1.0, 1.0, 1.0]
    net = jg.MLP([W, np.ones((3, 1))], [np.array([-0.5, 0.5, 0.5]), np.zeros(1)], ["relu", "identity"])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.1, 0.0], [0.2, 0.3]])
    whole = gradient_flow(net, x)
    parts = [_flow.partials(net, x[i : i + 1], start=i, total=4) for i in range(4)]
    assert [report_from_partials(p).layers[0].dead_units for p in parts] == [0, 1, 1, 1]
    merged = report_from_partials(functools.reduce(_flow.merge, parts))
    assert merged.layers[0].dead_units == whole.layers[0].dead_units == 0
    _same(whole, merged)


def test_a_chunk_that_overflows_makes_the_merged_report_say_where():
    net = jg.MLP([1e100 * np.eye(3)] * 3, None, "identity")
    x = np.ones((4, 3)) * 1e-300
    x[3] = 1e250  # only the last sample overflows, in layer 0's forward pass
    whole = gradient_flow(net, x)
    merged = _chunked(net, x, None, (3,), (1, 0))
    assert merged.nonfinite == whole.nonfinite and whole.nonfinite["stage"] == "forward"
    assert merged.verdict == whole.verdict == "exploding"
    assert np.isnan(merged.layers[0].grad_norm)

"""The gradient-flow report over a dataset: a Dask batch is reported chunk by chunk (mergeable
partials merged up a tree) and gives the report of the same data as one NumPy batch, up to
floating-point summation order — every field of ``to_dict()``; counts exactly. The NumPy path is
the reference: the whole batch in one ``block_flow.partials``, never chunked."""

import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.flow.diagnostics import gradient_flow

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.usefixtures("one_blas_thread")

N = 150
# ‖J_j‖₂ per sample comes from Lanczos to 1e-6 relative (jacgrad.flow.statistics.report_tol): its
# mean agrees to that; every other float to summation order.
LANCZOS = {"jacobian_norm"}


def _net():
    rng = np.random.default_rng(0)
    sizes = [12, 40, 72, 30, 5]  # 72 > 64: that layer's norms by Lanczos, the others by eigensolve
    Ws = [rng.standard_normal((a, b)) / np.sqrt(a) * 1.2 for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.standard_normal(b) * 0.2 - 0.1 for b in sizes[1:]]
    return jg.MLP(Ws, bs, ["relu", "tanh", "relu", "identity"])


def _data(loss):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, 12))
    target = {None: None, "mse": rng.standard_normal((N, 5)), "softmax_cross_entropy": rng.integers(0, 5, N)}[loss]
    return x, target


def assert_same_report(got, want, path="report"):
    """Every field of two ``to_dict()``s: strings, ints and flags exactly, floats to 1e-11
    relative (1e-6 for the Lanczos norms), lists and dicts field by field."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for k in want:
            assert_same_report(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_report(a, b, f"{path}[{i}]")
    elif isinstance(want, float):
        assert isinstance(got, float), path
        rel = 1e-6 if path.split(".")[-1] in LANCZOS else 1e-11
        assert got == pytest.approx(want, rel=rel, abs=1e-300, nan_ok=True), path
    else:  # str, int (batch, dead units, spectrum samples), bool, None
        assert type(got) is type(want) and got == want, path


@pytest.mark.parametrize("loss", [None, "mse", "softmax_cross_entropy"])
@pytest.mark.parametrize("chunks", [(N,), (37, 113), (1, 60, 89), (20,) * 7 + (10,)])
def test_dask_report_equals_the_numpy_batch_report(loss, chunks):
    net = _net()
    x, target = _data(loss)
    kw = {"spectrum_samples": 50} if loss is None else {"spectrum_samples": 50, "loss": loss}
    want = gradient_flow(net, x, target, **kw).to_dict()
    X = da.from_array(x, chunks=(chunks, 5))  # the feature axis in two chunks: rechunked
    T = None if target is None else da.from_array(target, chunks=(chunks,) + target.shape[1:])
    got = gradient_flow(net, X, T, **kw)
    assert got.batch == N and got.spectrum_samples == 50
    assert_same_report(got.to_dict(), want)
    if target is not None:  # in-memory targets with Dask samples: chunked as the samples
        assert_same_report(gradient_flow(net, X, target, **kw).to_dict(), want)


def test_dead_units_over_the_dataset_and_the_default_spectrum():
    # unit 0 of layer 0 fires for sample 0 only: dead in every chunk but the first, alive overall;
    # unit 2 never fires: dead over the dataset
    W = np.zeros((2, 3))
    W[0] = [1.0, 1.0, -1.0]
    net = jg.MLP([W, np.ones((3, 1))], [np.array([-0.5, 0.5, -5.0]), np.zeros(1)], ["relu", "identity"])
    x = np.vstack([[1.0, 0.0], np.random.default_rng(2).uniform(-0.4, 0.4, (29, 2))])
    want = gradient_flow(net, x)
    got = gradient_flow(net, da.from_array(x, chunks=(4, 2)))
    assert got.layers[0].dead_units == want.layers[0].dead_units == 1
    assert_same_report(got.to_dict(), want.to_dict())


def test_the_dataset_is_never_loaded_whole(monkeypatch):
    # np.asarray(X) of the whole Dask array (what the report did before) fails here
    net = _net()
    x, _ = _data(None)
    want = gradient_flow(net, x, spectrum_samples=5).to_dict()

    def refuse(self, *a, **k):
        raise AssertionError("the whole Dask array was converted to NumPy")

    monkeypatch.setattr(da.Array, "__array__", refuse)
    got = gradient_flow(net, da.from_array(x, chunks=(40, 12)), spectrum_samples=5)
    assert_same_report(got.to_dict(), want)


def test_a_numpy_batch_above_the_budget_is_reported_in_chunks(monkeypatch):
    net = _net()
    x, target = _data("mse")
    want = gradient_flow(net, x, target, spectrum_samples=50).to_dict()
    calls = []
    real = jg.flow.block_flow.partials
    monkeypatch.setattr(jg.flow.block_flow, "partials", lambda *a, **k: calls.append(k.get("start", 0)) or real(*a, **k))
    per_sample = jg.diagnostics._report_bytes(net)
    got = gradient_flow(net, x, target, spectrum_samples=50, max_memory=40 * per_sample)
    assert calls == list(range(0, N, 40))  # 4 chunks of at most 40 rows
    assert_same_report(got.to_dict(), want)


def test_bad_dataset_inputs_are_named_before_anything_runs():
    net = _net()
    x, target = _data("mse")
    X = da.from_array(x, chunks=(50, 12))
    with pytest.raises(ValueError, match=r"takes \(N, 12\) inputs"):
        gradient_flow(net, X[:, :5])
    with pytest.raises(ValueError, match="first axis must be the batch"):
        gradient_flow(net, X, target[:10])
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        gradient_flow(net, X, target, loss="hinge")
    with pytest.raises(TypeError, match="float32 or float64"):
        gradient_flow(net, X.astype(np.int64))
    bad = x.copy()
    bad[77, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite values \(inf or NaN\) in 1 rows \(first: sample 77\)"):
        gradient_flow(net, da.from_array(bad, chunks=(50, 12)))


def test_float32_dask_samples_for_a_float64_net():
    net = _net()
    x = _data(None)[0].astype(np.float32)
    want = gradient_flow(net, x, spectrum_samples=10).to_dict()
    assert_same_report(gradient_flow(net, da.from_array(x, chunks=(64, 12)), spectrum_samples=10).to_dict(), want)


def test_on_a_two_worker_cluster_with_the_progress_bar(capsys):
    import io

    net = _net()
    x, target = _data("softmax_cross_entropy")
    want = gradient_flow(net, x, target, loss="softmax_cross_entropy", spectrum_samples=20).to_dict()
    stream = io.StringIO()
    with jg.distributed.session(workers=2, progress=stream) as client:
        got = gradient_flow(net, da.from_array(x, chunks=(30, 12)), da.from_array(target, chunks=30),
                            loss="softmax_cross_entropy", spectrum_samples=20)
        assert len(client.scheduler_info()["workers"]) == 2
    assert_same_report(got.to_dict(), want)
    assert "100%" in stream.getvalue()
    assert math.isfinite(got.loss_value)

"""Issue 20 ("Hardening, round 3"), the command line: inputs that ended in tracebacks, loss names
(torch's aliases, integer labels with mse), separate hidden and output activations with the
``NAME*COUNT`` shorthand, and the CLI's own option names in the library's errors."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.nn import loss_hessians, losses
from jacgrad.cli.main import main

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


# ---------------------------------------------------------------------------- item 25: hidden vs output activations
def _torch_state_dict(path):
    torch = pytest.importorskip("torch", reason="the --weights file is a torch state dict")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                torch.nn.Linear(6 - 1, 3)).double()
    torch.save(model.state_dict(), path)
    return torch, model


def _report_json(capsys, argv):
    import json

    code = main(["report", *argv, "--batch", "4", "--spectrum-samples", "0", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["reports"]


@pytest.mark.parametrize("extra, out_act", [([], "identity"), (["--output-activation", "sigmoid"], "sigmoid")])
def test_weights_with_activation_leaves_the_output_layer_alone(capsys, tmp_path, extra, out_act):
    path = tmp_path / "net.pt"
    torch, model = _torch_state_dict(path)
    (rep,) = _report_json(capsys, ["--weights", str(path), "--activation", "tanh", *extra])
    assert rep["activations"] == ["tanh", "tanh", out_act]
    # the loaded network computes what the torch module (tanh hidden, the output as asked) computes
    from jacgrad.cli.common import load_weights

    net = load_weights(str(path), "float64", "cpu", "tanh", extra[1] if extra else None)
    x = np.random.default_rng(1).standard_normal((5, 4))
    want = model(torch.tensor(x))
    want = torch.sigmoid(want) if out_act == "sigmoid" else want
    np.testing.assert_allclose(net(x), want.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_repeat_shorthand_names_each_hidden_layer(capsys):
    (rep,) = _report_json(capsys, ["--sizes", "3,5x9,2", "--activation", "tanh*9"])
    assert rep["activations"] == ["tanh"] * 9 + ["identity"]
    (rep,) = _report_json(capsys, ["--sizes", "3,5x4,2", "--activation", "relu*3,tanh", "--output-activation", "sigmoid"])
    assert rep["activations"] == ["relu", "relu", "relu", "tanh", "sigmoid"]
    (rep,) = _report_json(capsys, ["--sizes", "3,5x2,2", "--activation", "leaky_relu(negative_slope=0.2)*2"])
    assert rep["activations"] == ["leaky_relu(negative_slope=0.2)"] * 2 + ["identity"]
    one_line_error(capsys, main(["report", "--sizes", "3,5x4,2", "--activation", "relu*3"]),
                   "3 activations", "4 hidden layers", "--output-activation")
    one_line_error(capsys, main(["report", "--sizes", "3,5,2", "--activation", "relu*0"]), "'relu*0'", "count")


def test_check_takes_hidden_and_output_activations(capsys, monkeypatch, tmp_path):
    from jacgrad.cli import check as _cli_check

    seen, quantities = [], _cli_check.quantities
    monkeypatch.setattr(_cli_check, "quantities", lambda net, x, t: seen.append(list(net.activations)) or quantities(net, x, t))
    assert main(["check", "--device", "cpu", "--depth", "3", "--width", "6", "--batch", "3", "--activation", "relu*2",
                 "--output-activation", "tanh"]) == 0
    assert seen[0] == ["relu", "relu", "tanh"]
    path = tmp_path / "net.pt"
    _torch_state_dict(path)
    seen.clear()
    assert main(["check", "--device", "cpu", "--weights", str(path), "--activation", "tanh"]) == 0
    assert seen[0] == ["tanh", "tanh", "identity"]
    capsys.readouterr()


# ---------------------------------------------------------------------------- item 26: the CLI's words
def test_errors_name_the_cli_options_not_the_library_arguments(capsys, tmp_path):
    path = tmp_path / "net.pt"
    _torch_state_dict(path)
    line = one_line_error(capsys, main(["report", "--weights", str(path)]), "--activation", "--output-activation")
    assert "activations=" not in line
    line = one_line_error(capsys, main(["report", "--weights", __import__("jacgrad.examples").examples.TINY_MLP, "--activation", "relu"]),
                          "carries its own", "--activation")
    assert "activations=" not in line


# ---------------------------------------------------------------------------- item 24: BLAS threads
def test_the_thread_rule_keeps_small_gemms_on_one_thread():
    from jacgrad.cli import threads as T

    default_report = T.gemm_macs([256] * 21, 64)  # 64 x 256 x 256
    assert default_report == 64 * 256 * 256
    for cpus, load in ((2, 0.0), (16, 0.0), (2, 5.5)):
        assert T.choose(default_report, cpus=cpus, load=load) == 1
    big = 1024 * 2048 * 2048
    assert T.choose(big, cpus=16, load=0.0) == 16
    assert T.choose(big, cpus=16, load=12.2) == 3  # 16 - ceil(12.2) idle cores
    assert T.choose(big, cpus=2, load=5.5) == 1


@pytest.mark.parametrize("var", ["OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_a_thread_count_in_the_environment_is_honoured(monkeypatch, var):
    from jacgrad.cli import threads as T

    for v in T.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv(var, "3")
    assert T.user_setting() == (var, 3)
    assert T.limit(10**12) == {"threads": 3, "source": f"{var}=3"}


def test_info_prints_the_blas_threads(capsys, monkeypatch):
    pytest.importorskip("threadpoolctl", reason="the thread counts come from threadpoolctl")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    assert main(["info"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("BLAS threads:")]
    assert "OPENBLAS_NUM_THREADS=1" in line and "1 thread" in line


def test_report_sets_one_blas_thread_for_small_gemms(capsys, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl", reason="the thread count is read back through threadpoolctl")
    from jacgrad.cli import threads as T

    for v in T.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert main(["report", "--sizes", "4,8,2", "--batch", "4", "--spectrum-samples", "0"]) == 0
        counts = {lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"}
    capsys.readouterr()
    assert counts == {1}


def test_bench_honours_the_environment_and_prints_every_contenders_threads(tmp_path, capsys, monkeypatch):
    import json

    torch = pytest.importorskip("torch", reason="torch-cpu is the contender whose threads are printed")
    from jacgrad import bench

    before = torch.get_num_threads()
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    path = tmp_path / "out.json"
    argv = ["--batch", "3", "--width", "6", "--depth", "2", "--tasks", "vjp", "--repeats", "2", "--warmup", "1",
            "--min-time", "0", "--no-progress", "--backends", "jacgrad-numpy,torch-cpu", "--json", str(path)]
    try:
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    env = json.loads(path.read_text())["environment"]
    assert env["threads"]["requested"] == 1 and env["threads"]["source"] == "OPENBLAS_NUM_THREADS=1"
    (line,) = [ln for ln in out.splitlines() if ln.startswith("threads:")]
    assert "OPENBLAS_NUM_THREADS=1" in line and "jacgrad-numpy 1 threads" in line and "torch-cpu 1 threads" in line


# ---------------------------------------------------------------------------- item 23: report --data
def _per_sample_layer_norms(net, x):
    """Dense float64 reference: ‖diag(φ'(h_j)) W_jᵀ‖₂ of every sample and layer, (B, L)."""
    out, z = [], x
    for W, b, name in zip(net.weights, net.biases, net.activations):
        h = z @ W + b
        d = jg.activations.get(name).df(h)
        out.append(np.linalg.norm(d[:, :, None] * W.T[None], ord=2, axis=(1, 2)))
        z = jg.activations.get(name).f(h)
    return np.stack(out, axis=1)


def test_dataset_report_measures_the_norms_on_a_seeded_subsample():
    da = pytest.importorskip("dask.array", reason="the dataset report runs on Dask arrays")
    from jacgrad.flow import statistics as _flow
    from jacgrad.flow.diagnostics import gradient_flow

    rng = np.random.default_rng(0)
    net = jg.MLP.init([6, 9, 7, 3], activation="tanh", seed=2)
    x = rng.standard_normal((300, 6))
    full = gradient_flow(net, x, spectrum_samples=0, seed=3)
    S = 50
    reps = [gradient_flow(net, da.from_array(x, chunks=(c, 6)), spectrum_samples=0, seed=3, norm_samples=S)
            for c in (70, 300)]
    ref = _per_sample_layer_norms(net, x)
    rows = _flow.norm_subsample(300, S, 3)
    assert len(rows) == len(set(rows.tolist())) == S
    for rep in reps:
        assert rep.norm_samples == S and rep.batch == 300
        for j, (got, want) in enumerate(zip(rep.layers, full.layers)):
            # the cheap statistics stay those of all 300 samples
            for name in ("grad_norm", "delta_norm", "chi", "derivative_mean", "active_fraction", "saturated_fraction",
                         "weight_spectral_norm"):
                assert getattr(got, name) == pytest.approx(getattr(want, name), rel=1e-10), (j, name)
            assert got.dead_units == want.dead_units
            # the spectral norms: the mean over exactly those S samples
            assert got.jacobian_norm == pytest.approx(ref[rows, j].mean(), rel=1e-6)
            if got.activation != "identity":  # (an identity layer's norm is the same for every sample)
                assert got.jacobian_norm != pytest.approx(ref[:, j].mean(), rel=1e-6)
        assert f"subsample of {S} of the 300 samples" in rep.to_text()
        assert rep.to_dict()["norm_samples"] == S
    assert reps[0].layers[0].jacobian_norm == pytest.approx(reps[1].layers[0].jacobian_norm, rel=1e-12)
    other = gradient_flow(net, da.from_array(x, chunks=(70, 6)), spectrum_samples=0, seed=4, norm_samples=S)
    assert not np.array_equal(_flow.norm_subsample(300, S, 4), rows)
    assert other.layers[1].jacobian_norm != pytest.approx(reps[0].layers[1].jacobian_norm, rel=1e-9)


def test_report_data_says_how_many_samples_the_norms_came_from(capsys, tmp_path):
    pytest.importorskip("dask.array", reason="--data runs on Dask")
    x = tmp_path / "X.npy"
    np.save(x, np.random.default_rng(0).standard_normal((120, 5)))
    code = main(["report", "--data", str(x), "--sizes", "5,8,2", "--activation", "tanh", "--norm-samples", "30",
                 "--spectrum-samples", "0"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "subsample of 30 of the 120 samples" in out
    one_line_error(capsys, main(["report", "--sizes", "5,8,2", "--norm-samples", "0"]), "--norm-samples")


def _cli(*args, **kwargs):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "jacgrad.cli.main", "report", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_progress_on_a_non_terminal_is_a_few_plain_lines(tmp_path):
    pytest.importorskip("dask.array", reason="--data runs on Dask")
    import time

    x = tmp_path / "X.npy"
    np.save(x, np.random.default_rng(0).standard_normal((3000, 8)))
    t0 = time.monotonic()
    proc = _cli("--data", str(x), "--sizes", "8,16x3,2", "--activation", "tanh", "--norm-samples", "3000")
    out, err = proc.communicate(timeout=300)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, err
    err = err.decode()
    assert "\r" not in err and "Traceback" not in err
    progress = [ln for ln in err.splitlines() if ln.startswith("jacgrad: ")]
    assert progress[0] == "jacgrad: computing" and "tasks done (100%) in" in progress[-1]
    assert len(progress) <= 2 + elapsed // 30  # a start, an end, and one line per 30 s at most
    assert len(err) < 200 + 100 * len(progress)


@pytest.mark.parametrize("workers", [None, 1])
def test_ctrl_c_stops_the_dataset_report_at_once(tmp_path, workers):
    pytest.importorskip("dask.array", reason="--data runs on Dask")
    if workers:
        pytest.importorskip("distributed", reason="--workers starts a dask.distributed LocalCluster")
    psutil = pytest.importorskip("psutil", reason="the cluster's processes are looked up with psutil")
    import signal
    import time

    x = tmp_path / "X.npy"
    np.save(x, np.random.default_rng(0).standard_normal((60_000, 32)))  # minutes of work at --norm-samples 60000
    args = ["--data", str(x), "--sizes", "32,64x6,4", "--activation", "tanh", "--norm-samples", "60000"]
    proc = _cli(*args, *(["--workers", str(workers)] if workers else []))
    deadline = time.monotonic() + 120
    line = b""
    while not line.startswith(b"jacgrad: computing") and time.monotonic() < deadline:
        line = proc.stderr.readline()  # the work has started once this line is out
        assert line or proc.poll() is None, proc.stderr.read()
    children = psutil.Process(proc.pid).children(recursive=True)
    if workers:
        assert children, "the local cluster's worker processes"
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - t0
    err = err.decode()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "jacgrad report: interrupted" and "Traceback" not in err, err
    assert took < 30, took  # not a timing benchmark: the bound is the "within 60 s", halved
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "the cluster was left running"


def test_dataset_tasks_are_sized_for_the_threads_that_run_them(tmp_path):
    dask = pytest.importorskip("dask", reason="--data runs on Dask")
    from jacgrad.distributed import data

    path = tmp_path / "X.npy"
    np.save(path, np.zeros((100_000, 4)))
    net = jg.MLP.init([4, 8, 2], seed=0)
    for threads, rows in ((2, 12_500), (8, 4096)):  # 100000 / (4 tasks x 2 threads); the 4096-row floor
        with dask.config.set(num_workers=threads):
            X, _ = data.read_dataset(path, net=net)
        assert max(X.chunks[0]) == rows, (threads, X.chunks[0][:3])
        assert sum(X.chunks[0]) == 100_000


def test_workers_says_a_local_cluster_does_not_help(capsys, tmp_path):
    pytest.importorskip("distributed", reason="--workers starts a dask.distributed LocalCluster")
    x = tmp_path / "X.npy"
    np.save(x, np.random.default_rng(0).standard_normal((50, 3)))
    assert main(["report", "--data", str(x), "--sizes", "3,4,2", "--activation", "tanh", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "note: --workers 1" in err and "slower" in err


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_norm_samples_must_be_none_or_a_positive_int(bad):
    net = jg.MLP.init([3, 4, 2], seed=0)
    with pytest.raises(ValueError, match="norm_samples"):
        jg.diagnostics.gradient_flow(net, np.ones((3, 3)), norm_samples=bad)


def test_block_report_over_a_dataset_measures_the_norms_on_the_subsample():
    da = pytest.importorskip("dask.array", reason="the dataset report runs on Dask arrays")
    from jacgrad.flow import statistics as _flow
    from jacgrad.cli.common import block_net
    from jacgrad.flow.diagnostics import gradient_flow

    rng = np.random.default_rng(1)
    net = block_net(jg.MLP.init([5, 6, 6, 6, 6, 2], activation="tanh", seed=4), 2, 1.0, "layernorm")
    x = rng.standard_normal((240, 5))
    S, seed = 40, 2
    full = gradient_flow(net, x, seed=seed)
    got = gradient_flow(net, da.from_array(x, chunks=(50, 5)), seed=seed, norm_samples=S)
    rows = _flow.norm_subsample(240, S, seed)
    # the norms of exactly those samples: the report of a batch of them (the per-sample norms
    # of a block do not depend on the other samples)
    ref = gradient_flow(net, x[rows], seed=seed)
    assert got.norm_samples == S and got.batch == 240
    for b, f, r in zip(got.blocks, full.blocks, ref.blocks):
        assert b.chi == pytest.approx(f.chi, rel=1e-10) and b.grad_norm == pytest.approx(f.grad_norm, rel=1e-10)
        assert b.jacobian_norm == pytest.approx(r.jacobian_norm, rel=1e-6)
        assert b.jacobian_bound == pytest.approx(r.jacobian_bound, rel=1e-10)
    assert got.jacobian_spectral_norm == pytest.approx(ref.jacobian_spectral_norm, rel=1e-6)
    assert got.verdict == full.verdict
    assert f"subsample of {S} of the 240 samples" in got.to_text() and got.to_dict()["norm_samples"] == S

"""`jacgrad report --data X.npy [--targets T.npy] [--workers N | --scheduler ADDRESS]`: the report
over every sample of a memory-mapped .npy file, computed by Dask, equal to the Python report of
the same data loaded in memory; every bad file or option is one line and exit status 2."""

import json

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cli.main import main
from test_cli_errors import one_line_error
from test_distributed_report import assert_same_report

pytest.importorskip("dask.array")
pytest.importorskip("distributed")

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture
def files(tmp_path):
    net = jg.MLP.init([10, 24, 24, 3], activation="tanh", bias_std=0.1, seed=3)
    rng = np.random.default_rng(4)
    x, labels, t = rng.standard_normal((300, 10)), rng.integers(0, 3, 300), rng.standard_normal((300, 3))
    paths = {name: tmp_path / f"{name}.npy" for name in ("x", "labels", "t")}
    for name, a in (("x", x), ("labels", labels), ("t", t)):
        np.save(paths[name], a)
    net.save(tmp_path / "net.npz")
    return net, x, labels, t, {k: str(v) for k, v in paths.items()} | {"net": str(tmp_path / "net.npz")}


def _many_chunks(monkeypatch, net, rows):
    """A budget of ``rows`` samples per task, so the small files are read in several chunks."""
    from jacgrad.flow.diagnostics import _report_bytes
    from jacgrad.distributed import budget

    monkeypatch.setattr(budget, "default_max_memory", lambda x=None: rows * _report_bytes(net))


def _report(capsys, tmp_path, argv):
    out = tmp_path / "r.json"
    assert main(argv + ["--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text())["reports"][0], capsys.readouterr()


def test_report_on_two_workers_equals_the_python_report_in_memory(capsys, tmp_path, files, monkeypatch):
    net, x, labels, _, p = files
    _many_chunks(monkeypatch, net, 70)
    got, (out, err) = _report(capsys, tmp_path, ["report", "--weights", p["net"], "--data", p["x"], "--targets",
                                                 p["labels"], "--workers", "2"])
    want = jg.diagnostics.gradient_flow(net, x, labels, loss="softmax_cross_entropy", spectrum_samples=8,
                                        label="net.npz").to_dict()
    assert_same_report(got, json.loads(json.dumps(want)))
    assert got["batch"] == 300 and got["loss"] == "softmax_cross_entropy"
    assert "B=300" in out and "tasks done (100%)" in err  # the table on stdout, progress lines on stderr (not a terminal)


def test_random_net_mse_targets_on_the_local_scheduler(capsys, tmp_path, files):
    net, x, _, t, p = files
    argv = ["report", "--sizes", "10,16,3", "--activation", "relu", "--data", p["x"], "--targets", p["t"],
            "--spectrum-samples", "0", "--seed", "5"]
    got, _ = _report(capsys, tmp_path, argv)
    same = jg.MLP.init([10, 16, 3], activation="relu", init="he_normal", seed=5)
    want = jg.diagnostics.gradient_flow(same, x, t, loss="mse", seed=5, spectrum_samples=0).to_dict()
    assert got["loss_value"] == pytest.approx(want["loss_value"], rel=1e-12)
    assert got["chi"] == pytest.approx(want["chi"], rel=1e-12)
    assert got["mean_squared_singular_value"] == pytest.approx(want["mean_squared_singular_value"], rel=1e-12)


@pytest.mark.parametrize("case, needles", [
    ("missing", ("nope.npy", "no such file")),
    ("truncated", ("cut.npy", "truncated")),
    ("wide", ("wide.npy", "the network takes 10 features")),
    ("ints", ("ints.npy", "float32 or float64")),
    ("few_targets", ("labels.npy", "200 targets but")),
])
def test_bad_dataset_files_are_one_line(capsys, tmp_path, files, case, needles):
    net, x, labels, _, p = files
    data, targets = p["x"], None
    if case == "missing":
        data = str(tmp_path / "nope.npy")
    elif case == "truncated":
        data = str(tmp_path / "cut.npy")
        with open(p["x"], "rb") as f:
            open(data, "wb").write(f.read(5000))
    elif case == "wide":
        data = str(tmp_path / "wide.npy")
        np.save(data, np.zeros((300, 11)))
    elif case == "ints":
        data = str(tmp_path / "ints.npy")
        np.save(data, np.zeros((300, 10), dtype=np.int64))
    else:
        np.save(p["labels"], labels[:200])
        targets = p["labels"]
    argv = ["report", "--weights", p["net"], "--data", data] + ([] if targets is None else ["--targets", targets])
    one_line_error(capsys, main(argv), *needles)


def test_a_random_net_must_match_the_data_width(capsys, files):
    p = files[-1]
    one_line_error(capsys, main(["report", "--sizes", "7,5,3", "--data", p["x"]]), "x.npy", "takes 7 features")


@pytest.mark.parametrize("argv, needle", [
    (["--data", "X", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
    (["--workers", "2"], "--workers needs --data"),
    (["--targets", "T.npy", "--scheduler", "tcp://h:1"], "--targets, --scheduler need --data"),
    (["--data", "X", "--workers", "0"], "--workers"),
    (["--data", "X", "--device", "gpu"], "--device"),
])
def test_bad_option_combinations_are_one_line(capsys, files, argv, needle):
    p = files[-1]
    argv = [p["x"] if a == "X" else a for a in argv]
    one_line_error(capsys, main(["report", "--weights", p["net"]] + argv), needle)


def test_an_unreachable_scheduler_is_one_line(capsys, files, monkeypatch):
    import functools

    import jacgrad.distributed as jd

    monkeypatch.setattr(jd, "session", functools.partial(jd.session, timeout=2))  # the command waits 30 s
    p = files[-1]
    _, line = one_line_error(capsys, main(["report", "--weights", p["net"], "--data", p["x"],
                                        "--scheduler", "tcp://127.0.0.1:9"]), "tcp://127.0.0.1:9")
    assert "cannot reach" in line


def test_residual_norm_net_over_a_dataset_equals_the_python_block_report(capsys, tmp_path, files, monkeypatch):
    """`--residual K --norm` with `--data`: the block report over the file, in chunks, is the
    in-memory block report of the same network."""
    from jacgrad.flow import block_flow
    from jacgrad.cli.common import block_net, random_net

    _, x, _, t, p = files
    sizes = [10, 16, 16, 16, 16, 3]
    same = block_net(random_net(sizes, ["tanh"] * 4, init="xavier_normal", seed=5), 2, 0.5, "rmsnorm")
    monkeypatch.setattr(jg.distributed.budget, "default_max_memory",
                        lambda x=None: 70 * block_flow.block_report_bytes(same))  # five chunks of the 300 rows
    argv = ["report", "--sizes", ",".join(map(str, sizes)), "--activation", "tanh", "--residual", "2",
            "--residual-scale", "0.5", "--norm", "rmsnorm", "--data", p["x"], "--targets", p["t"], "--seed", "5"]
    got, (out, _) = _report(capsys, tmp_path, argv)
    want = jg.diagnostics.gradient_flow(same, x, t, loss="mse", seed=5).to_dict()
    assert got["batch"] == 300 and got["has_residual"] and got["norms"] == ["rmsnorm"]
    assert [b["kind"] for b in got["blocks"]] == [b["kind"] for b in want["blocks"]]
    for gb, wb in zip(got["blocks"], want["blocks"]):
        for f in ("chi", "jacobian_norm", "jacobian_bound", "grad_norm"):
            assert gb[f] == pytest.approx(wb[f], rel=1e-10), f
    assert got["loss_value"] == pytest.approx(want["loss_value"], rel=1e-12)
    assert "residual every 2 (s=0.5) + rmsnorm" in out

"""Inputs that used to end the ``jacgrad`` command in a traceback (or exit 0 with nothing done):
each must now be one line on stderr naming the problem and a non-zero exit, checked before
any long work where it can be. Also: ``--json -`` gives pure JSON on stdout, ``check`` honours
``JACGRAD_BACKEND``, and ``--activation a,b,c`` gives one activation per hidden layer."""

import json
import zipfile

import numpy as np
import pytest

import jacgrad as jg
from jacgrad import bench
from jacgrad.bench import cases as bench_cases
from jacgrad.bench import runner as bench_runner
from jacgrad.cli.main import main

pytestmark = pytest.mark.usefixtures("one_blas_thread")

SMALL = ["--depth", "3", "--width", "12", "--batch", "6", "--spectrum-samples", "2"]


def one_line_error(capsys, code, *needles):
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error:" in lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    return out, lines[0]


# ---------------------------------------------------------------------------- malformed --weights files
def _not_npy_members(path):
    with zipfile.ZipFile(path, "w") as z:  # an .npz whose members lack the .npy header
        z.writestr("W0.npy", b"not an npy array")
        z.writestr("activations.npy", b"nor this")


def _zero_d(path):
    np.savez(path, W0=np.array(1.5), activations=np.array(["tanh"]))


def _zero_width(path):
    np.savez(path, W0=np.ones((3, 0)), b0=np.ones(0), W1=np.ones((0, 2)), b1=np.ones(2),
             activations=np.array(["tanh", "identity"]))


def _nan(path):
    W = np.ones((3, 2))
    W[1, 0] = np.nan
    np.savez(path, W0=W, b0=np.zeros(2), W1=np.ones((2, 2)), b1=np.zeros(2), activations=np.array(["tanh", "identity"]))


@pytest.mark.parametrize("command", ["report", "check"])
@pytest.mark.parametrize(
    "write, needles",
    [
        (_not_npy_members, ["--weights", "'W0'", "not a valid .npy"]),
        (_zero_d, ["--weights", "W0", "2-D"]),
        (_zero_width, ["--weights", "layer 0", "(3, 0)", "width"]),
        (_nan, ["--weights", "layer 0", "W0", "non-finite", "(1, 0)"]),
    ],
    ids=["members-not-npy", "0-d-W0", "width-0", "nan"],
)
def test_malformed_weights_file_is_one_line(capsys, tmp_path, command, write, needles):
    path = tmp_path / "net.npz"
    write(path)
    extra = ["--device", "cpu"] if command == "check" else ["--batch", "4"]
    one_line_error(capsys, main([command, "--weights", str(path), *extra]), *needles)


def test_check_of_a_net_whose_float64_reference_overflows(capsys, tmp_path):
    path = tmp_path / "huge.npz"
    np.savez(path, W0=np.full((3, 2), 1e308), b0=np.zeros(2), activations=np.array(["tanh"]))
    one_line_error(capsys, main(["check", "--weights", str(path), "--device", "cpu"]), "huge.npz", "float64 reference")


def test_check_where_only_float32_overflows_fails_without_a_traceback(capsys, tmp_path):
    path = tmp_path / "big.npz"  # finite in float64 (outputs ~1e60), beyond float32's 3.4e38
    np.savez(path, W0=np.full((3, 2), 1e30), b0=np.zeros(2), W1=np.full((2, 2), 1e30), b1=np.zeros(2),
             activations=np.array(["identity"]))
    code = main(["check", "--weights", str(path), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 1 and not err, err
    assert "FAILED" in out and "numpy float32" in out


# ---------------------------------------------------------------------------- report
def test_output_activation_is_named_in_its_own_error(capsys):
    _, line = one_line_error(capsys, main(["report", *SMALL, "--output-activation", "foo"]),
                             "--output-activation", "unknown activation 'foo'", "sigmoid")
    assert "--activation:" not in line.replace("--output-activation", "")


def test_json_to_stdout_is_pure_json(capsys):
    code = main(["report", *SMALL, "--activation", "tanh", "--activation", "relu", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    data = json.loads(out)  # nothing but the JSON document on stdout
    assert [r["label"] for r in data["reports"]] == ["tanh, xavier_normal", "relu, he_normal"]
    assert err.count("verdict:") == 2 and "summary" in err  # the tables went to stderr


def test_activation_list_gives_one_activation_per_hidden_layer(capsys):
    code = main(["report", "--sizes", "5,7,6,4,3", "--activation", "relu,tanh,gelu", "--output-activation", "sigmoid",
                 "--batch", "4", "--spectrum-samples", "0", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    (rep,) = json.loads(out)["reports"]
    assert rep["activations"] == ["relu", "tanh", "gelu", "sigmoid"]
    assert rep["label"] == "relu,tanh,gelu, xavier_normal"  # mixed families: the xavier default


def test_activation_list_computes_with_those_activations(capsys):
    # The per-layer net must compute with its list: its forward output equals a NumPy forward
    # pass written out here with relu, tanh, gelu by hand.
    from jacgrad.cli import report as _cli_report

    class Args:
        weights = depth = width = init = gain = bias_std = None
        sizes, activation, output_activation = "5,7,6,4,3", ["relu,tanh,gelu"], None
        seed, dtype = 3, "float64"

    ((_, net),) = _cli_report._networks(Args, "cpu")
    x = np.random.default_rng(0).standard_normal((4, 5))
    from math import erf

    gelu = np.vectorize(lambda h: 0.5 * h * (1 + erf(h / np.sqrt(2))))
    z = x
    for W, b, f in zip(net.weights, net.biases, [lambda h: np.maximum(h, 0), np.tanh, gelu, lambda h: h]):
        z = f(z @ W + b)
    np.testing.assert_allclose(net(x), z, rtol=1e-12, atol=1e-14)


def test_activation_list_of_the_wrong_length(capsys):
    one_line_error(capsys, main(["report", "--sizes", "5,7,6,4,3", "--activation", "relu,tanh"]),
                   "--activation 'relu,tanh'", "2 activations", "3 hidden layers", "repeat --activation")


def test_check_takes_an_activation_list(capsys, monkeypatch):
    from jacgrad.cli import check as _cli_check

    seen, quantities = [], _cli_check.quantities
    monkeypatch.setattr(_cli_check, "quantities", lambda net, x, t: seen.append(list(net.activations)) or quantities(net, x, t))
    code = main(["check", "--device", "cpu", "--depth", "3", "--width", "8", "--batch", "4", "--activation", "relu,tanh"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "relu,tanh" in out and "passed" in out
    assert seen == [["relu", "tanh", "identity"]] * 2  # the float64 reference and the float32 candidate


# ---------------------------------------------------------------------------- check and JACGRAD_BACKEND
@pytest.mark.skipif(jg.backend.gpu_available(), reason="a GPU is usable here")
def test_check_honours_jacgrad_backend_cupy_without_a_gpu(capsys, monkeypatch):
    monkeypatch.setenv("JACGRAD_BACKEND", "cupy")
    one_line_error(capsys, main(["check", "--depth", "2", "--width", "8"]), "JACGRAD_BACKEND=cupy", "GPU")


def test_check_honours_jacgrad_backend_numpy_where_a_gpu_runs(capsys, monkeypatch):
    # pretend a GPU is usable: with JACGRAD_BACKEND=numpy, check must still validate on NumPy
    monkeypatch.setattr(jg.backend, "gpu_unavailable_reason", lambda: None)
    monkeypatch.setattr(jg.backend, "gpu_available", lambda: True)
    monkeypatch.setenv("JACGRAD_BACKEND", "numpy")
    code = main(["check", "--depth", "2", "--width", "8", "--batch", "4"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("jacgrad check: JACGRAD_BACKEND=numpy") and "numpy float32" in out and "cupy" not in out


# ---------------------------------------------------------------------------- bench
def _no_run(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the benchmark ran although its input was bad")

    monkeypatch.setattr(bench_runner, "run_case", boom)


def test_bench_refuses_a_case_too_big_for_memory_with_the_estimate(capsys, monkeypatch):
    _no_run(monkeypatch)
    monkeypatch.setattr(bench_cases, "make_data", lambda *a, **k: (_ for _ in ()).throw(AssertionError("allocated")))
    code = bench.main(["--quick", "--backends", "jacgrad-numpy", "--tasks", "train", "--width", "1000000", "--no-progress"])
    one_line_error(capsys, code, "train 4×1000000 B=64", "needs at least", "TiB", "available", "--width")


def test_bench_memory_estimate_is_a_lower_bound():
    # The estimate must not refuse what fits: tracemalloc's peak over make_data and one jacgrad
    # training step on the case (NumPy reports its allocations to tracemalloc) is at least it.
    import tracemalloc

    case = bench_cases.Case("train", [300, 400, 400, 200], 64, dtype="float32")
    from jacgrad.bench.backend_jacgrad import Jacgrad

    tracemalloc.start()
    try:
        data = bench_cases.make_data(case)
        prep = Jacgrad("cpu").prepare(case, data)
        prep.variants[""]()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 0.5 * peak <= case.memory_bytes() <= peak, (case.memory_bytes(), peak)


def test_bench_check_memory_uses_the_largest_case():
    small = bench_cases.Case("train", [8, 8], 4)
    big = bench_cases.Case("jacobian", [100, 100, 100], 8)
    bench_runner.check_memory([small, big], available=big.memory_bytes())
    with pytest.raises(bench.UsageError, match="jacobian 2×100 B=8"):
        bench_runner.check_memory([small, big], available=big.memory_bytes() - 1)


@pytest.mark.parametrize("kind", ["dir", "under-a-file"])
def test_bench_json_path_is_checked_before_the_run(capsys, monkeypatch, tmp_path, kind):
    _no_run(monkeypatch)
    if kind == "dir":
        path, needle = tmp_path, "is a directory"
    else:
        (tmp_path / "file").write_text("x")
        path, needle = tmp_path / "file" / "out.json", "does not exist"
    code = bench.main(["--quick", "--backends", "jacgrad-numpy", "--tasks", "vjp", "--json", str(path), "--no-progress"])
    one_line_error(capsys, code, "--json", needle)


def test_unwritable_json_path_is_refused_before_the_run(capsys, monkeypatch, tmp_path):
    # root may write anywhere, so the permission is simulated where the check asks for it
    from jacgrad.cli import common as _cli_common

    _no_run(monkeypatch)
    monkeypatch.setattr(_cli_common.os, "access", lambda path, mode: False)
    target = str(tmp_path / "out.json")
    one_line_error(capsys, bench.main(["--quick", "--backends", "jacgrad-numpy", "--json", target, "--no-progress"]),
                   "--json", "not writable")
    import jacgrad.flow.diagnostics

    monkeypatch.setattr(jacgrad.flow.diagnostics, "gradient_flow", lambda *a, **k: pytest.fail("the report ran"))
    one_line_error(capsys, main(["report", *SMALL, "--json", target]), "--json", "not writable")


def test_bench_json_write_failure_after_the_run_is_one_line(capsys, monkeypatch, tmp_path):
    # the early check passed, but the file system refuses at write time (a full disk, a race)
    def refuse(result, path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(bench, "run", lambda o: {"unused": True})
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    monkeypatch.setattr(bench, "write_json", refuse)
    code = bench.main(["--quick", "--backends", "jacgrad-numpy", "--json", str(tmp_path / "out.json"), "--no-progress"])
    one_line_error(capsys, code, "--json", "cannot write", "Permission denied")


def test_bench_out_of_memory_during_the_run_is_one_line(capsys, monkeypatch):
    def oom(o):
        raise MemoryError

    monkeypatch.setattr(bench, "run", oom)
    one_line_error(capsys, bench.main(["--quick", "--no-progress"]), "out of memory", "--width")


def test_bench_takes_one_activation_not_the_first_of_a_list(capsys, monkeypatch):
    _no_run(monkeypatch)
    code = bench.main(["--quick", "--backends", "jacgrad-numpy", "--activation", "relu,tanh", "--no-progress"])
    one_line_error(capsys, code, "--activation", "give one name", "relu, tanh")


def test_bench_with_no_runnable_backend_is_an_error(capsys, monkeypatch):
    from jacgrad.bench.backend_jacgrad import Jacgrad

    monkeypatch.setattr(Jacgrad, "unavailable", lambda self: "no GPU here" if self.device == "gpu" else None)
    _no_run(monkeypatch)
    code = bench.main(["--quick", "--backends", "jacgrad-cupy", "--no-progress"])
    one_line_error(capsys, code, "--backends", "jacgrad-cupy: no GPU here")

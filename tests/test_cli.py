"""The ``jacgrad`` command, called in-process through ``jacgrad.cli.main.main`` (one test runs the
installed console script). Every bad input must give exit status 2 and exactly one line on
stderr naming the problem — never a traceback."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cli import main as cli
from jacgrad.cli.main import main, parse_sizes
from jacgrad.examples import TINY_MLP

SMALL = ["--depth", "3", "--width", "12", "--batch", "6"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for m in [match] if isinstance(match, str) else match:
        assert m in lines[0], lines[0]
    return lines[0]



pytestmark = pytest.mark.usefixtures("one_blas_thread")

# ---------------------------------------------------------------------------- report
def test_default_report_compares_sigmoid_tanh_relu_with_their_verdicts(capsys):
    code, out, text = run(capsys, "report", "--json", "-")
    assert code == 0
    data = json.loads(out)  # with --json -, stdout is the JSON alone; the tables go to stderr
    labels = [r["label"] for r in data["reports"]]
    assert labels[:3] == ["sigmoid, xavier_normal", "tanh, xavier_normal", "relu, he_normal"]  # [3]: the cure
    verdicts = {r["label"].split(",")[0]: r["verdict"] for r in data["reports"][:3]}
    assert verdicts["sigmoid"] == "vanishing" and verdicts["relu"] == "healthy"
    for r in data["reports"][:3]:
        assert r["sizes"] == [256] * 21 and r["batch"] == 64 and len(r["layers"]) == 20
    assert text.count("verdict:") == 4 and "summary" in text
    assert text.count("\n   19 ") == 3  # a per-layer table of 20 rows each


def test_report_of_one_activation_with_gain(capsys):
    code, out, _ = run(capsys, "report", "--activation", "relu", "--gain", "1.6", "--depth", "20", "--width", "64",
                       "--batch", "8", "--spectrum-samples", "0")
    assert code == 0 and "relu, he_normal x1.6" in out and "verdict: EXPLODING" in out
    assert "initialisation scale" in out


def test_report_sizes_init_bias_dtype(capsys):
    code, out, _ = run(capsys, "report", "--sizes", "10,8x3,4", "--activation", "tanh", "--activation", "gelu", "--init", "orthogonal",
                       "--bias-std", "0.1", "--batch", "5", "--dtype", "float32", "--device", "cpu")
    assert code == 0
    assert out.count("sizes 10,8x3,4 (4 layers), B=5, float32 on cpu") == 2
    assert "tanh, orthogonal, bias std 0.1" in out and "gelu, orthogonal" in out


def test_parse_sizes():
    assert parse_sizes("784,256x20,10") == [784] + [256] * 20 + [10]
    assert parse_sizes(" 4 , 8X2 ,3") == [4, 8, 8, 3]
    for bad in ("784", "784,abc", "4,8x0,3", "0,3", "4,,3", "4,8x,3", "4,-2"):
        with pytest.raises(cli.UsageError, match="--sizes"):
            parse_sizes(bad)


def test_report_of_a_weights_file_and_its_outputs(capsys, tmp_path):
    js, png = tmp_path / "flow.json", tmp_path / "flow.png"
    pytest.importorskip("matplotlib")
    code, out, err = run(capsys, "report", "--weights", TINY_MLP, "--batch", "4", "--json", str(js), "--plot", str(png))
    assert code == 0, err
    assert "tiny_mlp.npz: sizes 8,16x2,3 (3 layers)" in out
    data = json.loads(js.read_text())
    assert data["reports"][0]["activations"] == ["tanh", "tanh", "identity"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"wrote {js}" in err and f"wrote {png}" in err


def test_nonfinite_gradients_are_reported_not_raised(capsys):
    code, out, err = run(capsys, "report", "--activation", "relu", "--gain", "1e40", "--depth", "12", "--width", "16",
                         "--batch", "4")
    assert code == 0 and not err
    assert "went non-finite in the forward pass" in out and "verdict: EXPLODING" in out


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "argv, match",
    [
        (["report", "--activation", "nope"], ["unknown activation 'nope'", "sigmoid", "relu"]),
        (["report", "--activation", "tanh,nope"], "unknown activation 'nope'"),
        (["report", "--output-activation", "softmax"], "unknown activation 'softmax'"),
        (["report", "--init", "glorot"], ["unknown init 'glorot'", "he_normal", "orthogonal"]),
        (["report", "--sizes", "784,abc"], ["--sizes", "'abc'"]),
        (["report", "--sizes", "784"], "at least two widths"),
        (["report", "--sizes", "4,4", "--depth", "3"], "--sizes cannot be combined"),
        (["report", "--weights", "/no/such/file.npz"], ["--weights", "no such file"]),
        (["report", "--weights", TINY_MLP, "--activation", "relu"], ["--weights", "carries its own"]),
        (["report", "--plot", "/no/such/dir/flow.png"], ["--plot", "does not exist"]),
        (["report", "--json", "/no/such/dir/flow.json"], ["--json", "does not exist"]),
        (["report", "--batch", "0"], "--batch"),
        (["report", "--gain", "-1"], "--gain"),
        (["report", "--gain", "inf"], "--gain"),
        (["report", "--bias-std", "x"], "--bias-std"),
        (["report", "--device", "tpu"], "--device"),
        (["report", "--seed", "-1"], "--seed"),
        (["check", "--seed", "x"], "--seed"),
        (["check", "--activation", "nope"], "unknown activation 'nope'"),
        (["check", "--weights", "/no/such/file.npz"], "no such file"),
        (["report", "--frobnicate"], "unrecognized arguments"),
        ([], "choose a command"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_status_2(capsys, argv, match):
    assert_usage_error(capsys, *argv, match=match)


def test_plot_path_that_is_a_directory(capsys, tmp_path):
    assert_usage_error(capsys, "report", "--plot", str(tmp_path), match="is a directory")


def test_unwritable_plot_path_found_at_save_time(capsys, tmp_path, monkeypatch):
    # the early check is skipped (root passes os.access everywhere), so savefig itself fails
    pytest.importorskip("matplotlib")
    import jacgrad.cli.report as cli_report

    monkeypatch.setattr(cli_report, "check_output_path", lambda path, option: None)
    target = tmp_path / "missing-dir" / "flow.png"
    assert_usage_error(capsys, "report", *SMALL, "--activation", "tanh", "--plot", str(target),
                       match=["--plot", "cannot write"])


def test_out_of_memory_is_one_line(capsys, monkeypatch):
    import jacgrad.flow.diagnostics

    def boom(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(jacgrad.flow.diagnostics, "gradient_flow", boom)
    assert_usage_error(capsys, "report", *SMALL, match="out of memory")


def test_missing_matplotlib_says_how_to_install(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert_usage_error(capsys, "report", "--plot", str(tmp_path / "f.png"), match='pip install "jacgrad[plot]"')


@pytest.mark.skipif(jg.backend.gpu_available(), reason="a GPU is usable here")
def test_device_gpu_without_gpu(capsys):
    line = assert_usage_error(capsys, "report", "--device", "gpu", match="--device gpu")
    assert jg.backend.gpu_unavailable_reason().split(" (")[0] in line


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"X": np.ones(3)}, "no array W0"),
        ({"W0": np.ones((3, 2)), "activations": np.array(["nope"])}, "unknown activation 'nope'"),
        ({"W0": np.ones((3, 2)), "W1": np.ones((4, 2)), "activations": np.array(["tanh", "identity"])}, "layer 1"),
        ({"W0": np.ones((3, 2))}, "activations"),
        ({"W0": np.full((3, 2), np.inf), "b0": np.zeros(2), "activations": np.array(["tanh"])}, ["layer 0", "non-finite"]),
        ({"W0": np.ones((3, 2)), "activations": np.array(["tanh"])}, ["layer 0 has no bias", "bias in every layer",
                                                                      "jg.Sequential.load"]),
        ({"W0": np.ones(3), "activations": np.array(["tanh"])}, "2-D"),
    ],
)
def test_malformed_weights_files(capsys, tmp_path, arrays, match):
    path = tmp_path / "net.npz"
    np.savez(path, **arrays)
    assert_usage_error(capsys, "report", "--weights", str(path), match=match)


def test_weights_file_that_is_not_an_npz(capsys, tmp_path):
    path = tmp_path / "net.npz"
    path.write_text("not an archive")
    assert_usage_error(capsys, "report", "--weights", str(path), match="--weights")


# ---------------------------------------------------------------------------- check, info, bench
def test_check_without_gpu_validates_float32_against_float64(capsys):
    code, out, _ = run(capsys, "check", "--device", "cpu", "--depth", "3", "--width", "16", "--batch", "4")
    assert code == 0 and "float32 against float64" in out and "passed" in out
    assert "per-sample input-output Jacobian" in out and "∂L/∂W" in out


def test_check_fails_above_tolerance(capsys):
    code, out, _ = run(capsys, "check", "--device", "cpu", "--depth", "2", "--width", "8", "--tol32", "1e-12")
    assert code == 1 and "FAIL" in out


def test_check_a_weights_file(capsys):
    code, out, _ = run(capsys, "check", "--device", "cpu", "--weights", TINY_MLP)
    assert code == 0 and TINY_MLP in out


@pytest.mark.skipif(jg.backend.gpu_available(), reason="a GPU is usable here")
def test_check_auto_says_plainly_there_is_no_gpu(capsys):
    code, out, _ = run(capsys, "check", "--depth", "2", "--width", "8")
    assert code == 0 and out.startswith("jacgrad check: no GPU here")


def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert f"jacgrad {jg.__version__}" in out and f"numpy {np.__version__}" in out
    assert "backends: numpy" in out and "kernels:" in out
    if not jg.backend.gpu_available():
        assert "GPU: none usable" in out


def test_bench_is_dispatched_with_its_arguments(capsys, monkeypatch):
    import jacgrad.bench

    seen = []
    monkeypatch.setattr(jacgrad.bench, "main", lambda argv: seen.append(argv) or 0)
    assert main(["bench", "--quick", "--tasks", "vjp"]) == 0
    assert seen == [["--quick", "--tasks", "vjp"]]


def test_help_documents_the_weights_format(capsys):
    code, out, _ = run(capsys, "report", "--help")
    assert code == 0 and "W0=..." in out and "activations" in out and "tiny_mlp.npz" in out


def test_console_script(tmp_path):
    # The script of the environment under test, beside its Python: one found on PATH may belong
    # to another environment, with another jacgrad.
    exe = shutil.which("jacgrad", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip(f"the jacgrad console script is not installed beside {sys.executable}")
    proc = subprocess.run([exe, "report", *SMALL, "--activation", "tanh"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "verdict:" in proc.stdout
    proc = subprocess.run([exe, "report", "--activation", "nope"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1

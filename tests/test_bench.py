"""``jacgrad bench`` and the GPU suite's logic — never timings (no assert on a wall time here).

Tiny sizes and one or two repeats: these tests check the command line (one-line errors, exit
code 2), the cases and their GEMM lists, the table and the JSON, that every backend computes
the reference numbers, that a peer failing at run time becomes a ``failed`` row, and that
``benchmarks/gpu_suite.py --dry-run-cpu`` runs every section on NumPy and writes its report.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jacgrad as jg
from jacgrad import bench
from jacgrad.bench import backends, cases, options, timing
from jacgrad.bench.report import Progress, format_table

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch", "3", "--width", "6", "--depth", "2", "--nets", "7-5-3,5-5-2-5-5", "--jac-batch", "2",
        "--repeats", "2", "--warmup", "1", "--min-time", "0", "--no-progress", "--threads", "1"]


def run_json(tmp_path, *args):
    path = tmp_path / "out.json"
    assert bench.main([*TINY, *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, needle", [
    (["--backends", "jacgrad-numpy,nope"], "unknown backend 'nope'; valid backends: jacgrad-numpy, jacgrad-cupy"),
    (["--batch", "64,abc"], "--batch: 'abc' is not a positive integer"),
    (["--width", "0"], "--width: '0' is not a positive integer"),
    (["--depth", "4,"], "--depth: '' is not a positive integer"),
    (["--tasks", "train,fly"], "unknown task 'fly'; valid tasks: train, vjp, jacobian"),
    (["--dtype", "float16"], "--dtype: 'float16' is not float32 or float64"),
    (["--activation", "swish"], "unknown activation 'swish'"),
    (["--nets", "tapering,5-x-3"], "--nets: net '5-x-3' is neither a named net"),
    (["--repeats", "0"], "--repeats: 0 is below the minimum 1"),
    (["--min-time", "soon"], "--min-time: 'soon' is not a number of seconds"),
    (["--json", "/no/such/folder/x.json"], "--json: the folder '/no/such/folder' does not exist"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, needle):
    assert bench.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("jacgrad bench: error: ")
    assert needle in lines[0]


def test_help_exits_zero(capsys):
    assert bench.main(["--help"]) == 0
    assert "--backends" in capsys.readouterr().out


def test_options_defaults_and_quick():
    o = options.parse([])
    assert o.backends == backends.names() and o.tasks == ["train", "vjp", "jacobian"]
    assert (o.batch, o.width, o.depth, o.dtype) == ([64, 256], [256, 1024], [4, 8], "float32")
    q = options.parse(["--quick", "--batch", "5"])
    assert q.batch == [5] and q.width == [256] and q.repeats == 3


# ---------------------------------------------------------------------- cases
@pytest.mark.parametrize("widths", [[512, 256, 128, 64, 10], [256, 256, 256, 8, 256, 256, 256], [5, 7, 3, 9, 2, 8], [4, 4]])
def test_jacobian_gemm_list_matches_the_chain_cost(widths):
    B = 3
    net = jg.MLP.init(widths, seed=0)
    C = net.jacobian_chain(net.forward(np.ones((B, widths[0])))[1])
    gemms = cases.gemm_list("jacobian", widths, B)
    forward = gemms[: len(widths) - 1]
    assert sum(g.macs for g in forward) == B * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    assert sum(g.macs for g in gemms[len(widths) - 1:]) == C.jacobian_cost("auto")


def test_train_and_vjp_flops():
    c = cases.Case("train", [1024] * 9, 256)
    assert c.label == "8×1024"
    # forward 8, weight grads 8, input grads 7 (none into the input), each 256·1024·1024 MACs
    assert c.flops == 2 * 23 * 256 * 1024 * 1024
    assert cases.Case("vjp", [6, 4, 2], 5).flops == 2 * 5 * (6 * 4 + 4 * 2)
    assert [g.layout for g in cases.gemm_list("train", [6, 4, 2], 5)] == ["nn", "nn", "tn", "tn", "nt"]


def test_named_nets_and_bad_nets():
    assert cases.parse_net("hourglass")[1] == [256, 256, 256, 8, 256, 256, 256]
    assert cases.parse_net("784-256-10") == ("784-256-10", [784, 256, 10])
    for bad in ("784", "7--3", "0-3", "wide"):
        with pytest.raises(ValueError, match="named net"):
            cases.parse_net(bad)


# ---------------------------------------------------------------------- timing and report
def test_stats_and_interleaved_timing():
    s = timing.stats([0.001, 0.002, 0.003, 0.004])
    assert s["median_ms"] == pytest.approx(2.5) and s["iqr_ms"] == pytest.approx(1.5) and s["min_ms"] == pytest.approx(1)
    calls = []
    a = timing.Entry("a", lambda: calls.append("a"))
    b = timing.Entry("b", lambda: calls.append("b"))
    timing.time_entries([a, b], repeats=3, warmup=1, min_time=0.0, settle=0.0)
    assert len(a.samples) == len(b.samples) == 3
    assert calls.count("a") == calls.count("b")


def test_an_entry_that_raises_is_recorded_not_raised():
    n = {"calls": 0}

    def flaky():
        n["calls"] += 1
        if n["calls"] > 2:
            raise MemoryError("out of memory on purpose")

    e, ok = timing.Entry("flaky", flaky), timing.Entry("ok", lambda: None)
    timing.time_entries([e, ok], repeats=3, warmup=1, min_time=0.0, settle=0.0)
    assert e.error.startswith("MemoryError: out of memory on purpose")
    assert len(ok.samples) == 3


def test_progress_bar_plain_text(tmp_path):
    with open(tmp_path / "log", "w+") as f:  # not a terminal: one line per tenth, no carriage returns
        p = Progress(20, stream=f)
        for i in range(20):
            p.advance(f"step {i}")
        p.close()
        f.seek(0)
        text = f.read()
    assert "\r" not in text and "[########################] 100% 20/20" in text
    assert 5 <= len(text.splitlines()) <= 11


# ---------------------------------------------------------------------- whole runs
def test_jacgrad_numpy_run_table_and_json(tmp_path, capsys):
    result = run_json(tmp_path, "--backends", "jacgrad-numpy")
    out = capsys.readouterr().out
    assert "median ms" in out and "GFLOP/s" in out and "%floor" in out
    rows = result["rows"]
    assert {(r["task"], r["net"]) for r in rows} == {("train", "2×6"), ("vjp", "2×6"), ("jacobian", "7-5-3"),
                                                     ("jacobian", "5-5-2-5-5")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["n"] == 2 and r["floor_ms"] > 0
        assert r["check_against"] == "float64 reference" and r["check_rel_err"] < 1e-5
        assert r["ratio_to_fastest_peer"] is None  # no peer in this run
    assert result["environment"]["threads"]["requested"] == 1
    assert set(result["skipped"]) == set()


def test_unavailable_backend_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backends.Jacgrad, "unavailable", lambda self: "no GPU here" if self.device == "gpu" else None)
    result = run_json(tmp_path, "--backends", "jacgrad-numpy,jacgrad-cupy", "--tasks", "vjp")
    assert result["skipped"] == {"jacgrad-cupy": "no GPU here"}
    assert "skipped jacgrad-cupy: no GPU here" in capsys.readouterr().out


def test_a_peer_failing_at_run_time_is_a_failed_row(tmp_path, capsys, monkeypatch):
    class Broken(backends.Jacgrad):
        family = "broken"

        @property
        def device_label(self):
            return "cpu"

        def prepare(self, case, data):
            if case.task == "vjp":
                raise MemoryError("CUDA out of memory (pretend)")
            prep = super().prepare(case, data)
            calls = {"n": 0}
            fn = prep.variants[""]

            def sometimes():
                calls["n"] += 1
                if calls["n"] > 3:
                    raise RuntimeError("no jit support for this op (pretend)")
                return fn()

            prep.variants[""] = sometimes
            return prep

    monkeypatch.setitem(backends.BACKENDS, "broken-cpu", Broken("cpu"))
    monkeypatch.setattr(options, "backend_names", backends.names)
    result = run_json(tmp_path, "--backends", "jacgrad-numpy,broken-cpu", "--tasks", "train,vjp")
    table = capsys.readouterr().out
    rows = {(r["task"], r["backend"]): r for r in result["rows"]}
    assert rows[("vjp", "broken-cpu")]["status"] == "failed"
    assert "MemoryError: CUDA out of memory (pretend)" in rows[("vjp", "broken-cpu")]["error"]
    assert rows[("train", "broken-cpu")]["status"] == "failed"
    assert "no jit support" in rows[("train", "broken-cpu")]["error"]
    assert all(rows[(t, "jacgrad-numpy")]["status"] == "ok" for t in ("train", "vjp"))
    assert "FAILED: MemoryError: CUDA out of memory (pretend)" in table


def test_torch_peer_agrees_and_is_compared(tmp_path):
    pytest.importorskip("torch")
    result = run_json(tmp_path, "--backends", "jacgrad-numpy,torch-cpu")
    by = {}
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert r["check_rel_err"] < 1e-5, r
        by.setdefault((r["task"], r["net"]), {})[r["backend"]] = r
    for group in by.values():
        torch_row, jg_row = group["torch-cpu"], group["jacgrad-numpy"]
        assert torch_row["ratio_to_fastest_peer"] == pytest.approx(1.0)
        assert jg_row["ratio_to_fastest_peer"] == pytest.approx(jg_row["median_ms"] / torch_row["median_ms"])
    jac = by[("jacobian", "7-5-3")]["torch-cpu"]
    assert jac["variant"] in ("jacrev", "jacfwd") and set(jac["variants_ms"]) == {"jacrev", "jacfwd"}


def test_jax_peer_agrees(tmp_path):
    pytest.importorskip("jax")
    result = run_json(tmp_path, "--backends", "jax-cpu", "--tasks", "train,jacobian", "--nets", "7-5-3")
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert r["check_rel_err"] < 1e-5 and r["compile_ms"]


def test_format_table_marks_failures():
    result = {"options": options.Options().to_dict(), "skipped": {},
              "environment": {"threads_line": "1", "blas_line": ""}, "elapsed_s": 0.1,
              "rows": [{"task": "train", "net": "2×6", "batch": 3, "backend": "torch-cpu", "status": "failed",
                        "error": "RuntimeError: boom"}]}
    assert "FAILED: RuntimeError: boom" in format_table(result)


# ---------------------------------------------------------------------- the GPU suite, dry run
def test_gpu_suite_dry_run_on_the_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run-cpu", "--out", str(tmp_path),
           "--skip", "pytest_gpu", "--backends", "jacgrad-numpy"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    sections = res["sections"]
    assert sections["pytest_gpu"]["status"] == "skipped"
    for name in ("environment", "validation", "ceilings", "fused_kernel", "peers", "profile"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    calls = sections["profile"]["data"]["calls"]
    assert any(c.startswith("MLP loss_and_grads") for c in calls) and any("direct cuBLAS" in c for c in calls)
    assert (tmp_path / "profile.txt").read_text().count("ms per call unprofiled") >= 6
    v = sections["validation"]["data"]
    assert v["ok"] and v["summary"]["float32"]["checks"] > 100 and v["summary"]["float32"]["failed"] == 0
    checks = {r["check"] for r in v["rows"]}
    assert {"forward", "mse loss", "grad W[0]", "grad b[0]", "grad input", "chain vjp", "chain jvp",
            "jacobian forward", "jacobian reverse", "jacobian auto", "singular values",
            "kernel scale_cotangent(y)"} <= checks
    cases_run = sections["peers"]["data"]["cases"]
    assert set(cases_run) == {"large_train", "small_train", "large_vjp", "jac_tapering", "jac_hourglass"}
    assert all(c["status"] == "ok" for c in cases_run.values())
    md = (tmp_path / "results.md").read_text()
    assert "None of these numbers is a GPU number" in md and "## Targets (issue 5)" in md


def test_gpu_suite_without_a_gpu_says_so(tmp_path):
    if jg.backend.gpu_available():
        pytest.skip("a GPU is usable here")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "no usable GPU here" in p.stderr and "--dry-run-cpu" in p.stderr


def _suite_module(name):
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_gpu_suite_records_a_check_that_raises_and_reports_it():
    validate, report = _suite_module("suite_validate"), _suite_module("suite_report")
    checks = validate.Checks()
    checks.add("singular values", "float32", lambda: 1 / 0, np.ones(2), activation="tanh")
    checks.add("forward", "float64", np.ones(2), np.ones(2), activation="tanh")
    bad, good = checks.rows
    assert not bad["ok"] and bad["rel_err"] == float("inf") and bad["error"].startswith("ZeroDivisionError")
    assert good["ok"] and good["rel_err"] == 0.0
    results = {"dry_run_cpu": True, "sections": {
        "validation": {"status": "failed", "data": {"rows": checks.rows, "summary": {}, "ok": False}},
        "peers": {"status": "failed", "error": "RuntimeError: boom", "traceback": "Traceback ...\nRuntimeError: boom"}}}
    results["targets"] = report.targets(results)
    md = report.markdown(results)
    assert "float32 tanh  singular values: rel. err. inf > 1e-05 ZeroDivisionError" in md
    assert "| peers | failed |" in md and "<summary>peers: RuntimeError: boom</summary>" in md
    assert all(t["met"] is None for t in results["targets"])  # nothing measured: no verdicts
    json.dumps(bench.report.strict_json(results), allow_nan=False)


def test_blas_kernel_warning_names_the_setting_only_when_it_costs_avx512():
    from jacgrad.bench.machine import blas_kernel_warning

    w = blas_kernel_warning("Haswell", "Haswell", {"avx2", "avx512f", "avx512bw"})
    assert w is not None and "OPENBLAS_CORETYPE=Haswell" in w and "AVX-512" in w
    assert blas_kernel_warning("Haswell", "Haswell", {"avx2"}) is None          # the right kernels for this CPU
    assert blas_kernel_warning("SkylakeX", None, {"avx2", "avx512f"}) is None    # AVX-512 kernels already
    assert blas_kernel_warning(None, None, {"avx512f"}) is None                  # not OpenBLAS / unknown
    assert "OpenBLAS's own choice" in blas_kernel_warning("Zen", None, {"avx512f"})

"""benchmarks/gpu_suite.py survives its first run: a section that segfaults or hangs costs that
section only (each runs in a child process with faulthandler on), the results are on disk after
every section, ``TimeoutExpired``'s bytes are decoded, ``--out`` is resolved before anything runs
elsewhere, and the plain ``--dry-run-cpu`` command passes."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
FAST = ["--skip", "pytest_gpu,peers,tf32,products"]


def _run(args, cwd=ROOT, inject=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GPU_SUITE_INJECT", None)
    if inject:
        env["GPU_SUITE_INJECT"] = inject
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _suite():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu_suite")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_the_plain_dry_run_command_passes():
    p = _run(["--dry-run-cpu", "--backends", "jacgrad-numpy"], timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    out = Path(p.stderr.strip().splitlines()[-1].split("wrote ", 1)[1].split("results.md")[0])
    res = json.loads((out / "results.json").read_text())
    assert all(s["status"] == "ok" for s in res["sections"].values()), res["sections"]
    assert "targets_error" not in res and len(res["targets"]) >= 10, res.get("targets_error")
    assert "| large training step (B=4096, 8×4096) vs torch eager |" in (out / "results.md").read_text()
    assert set(res["sections"]) == {"environment", "ceilings", "fused_kernel", "norm_kernels", "validation", "compiled",
                                    "blocks", "products", "tf32", "peers", "pytest_gpu", "profile"}
    fused = res["sections"]["fused_kernel"]["data"]["rows"]
    assert {(r["kernel"], r["shape"]) for r in fused} == {("scale_cotangent", "same"), ("scale_cotangent", "row"),
                                                          ("forward_with_derivative", "same")}
    compiled = res["sections"]["compiled"]["data"]
    assert compiled["ok"] and compiled["summary"]["float64"]["checks"] > 20
    assert sorted((out / n).name for n in os.listdir(out)) == ["profile.txt", "pytest_gpu.log", "results.json", "results.md", "suite.log"]


def test_a_segfaulting_section_costs_that_section_only(tmp_path):
    p = _run(["--dry-run-cpu", "--out", str(tmp_path), *FAST], inject="ceilings:crash")
    assert p.returncode == 1  # a section did not finish
    res = json.loads((tmp_path / "results.json").read_text())
    crashed = res["sections"]["ceilings"]
    assert crashed["status"] == "crashed" and "SIGSEGV" in crashed["error"]
    assert "Fatal Python error: Segmentation fault" in crashed["log_tail"]  # faulthandler's stacks
    for name in ("environment", "fused_kernel", "validation", "compiled"):
        assert res["sections"][name]["status"] == "ok", (name, res["sections"][name])
    assert "fused_kernel" in res["sections"] and "copy_GB_per_s" not in res  # measured its own copy instead
    assert "| ceilings | crashed |" in (tmp_path / "results.md").read_text()
    assert "===== ceilings (rc -11" in (tmp_path / "suite.log").read_text()


def test_a_hanging_section_is_stopped_and_the_rest_runs(tmp_path, monkeypatch):
    suite = _suite()
    monkeypatch.setattr(suite, "GRACE_S", 3)
    monkeypatch.setenv("GPU_SUITE_INJECT", "validation:hang")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = suite.parse_args(["--dry-run-cpu", "--out", str(tmp_path), "--skip", "pytest_gpu,peers,tf32,ceilings,fused_kernel"])
    s = suite.Suite(args)
    monkeypatch.setattr(s, "limit", lambda name: 6.0 if name == "validation" else 60.0)
    assert s.main() == 1
    res = json.loads((tmp_path / "results.json").read_text())
    hung = res["sections"]["validation"]
    assert hung["status"] == "timeout" and "no result within 6 s" in hung["error"]
    assert "Timeout (0:00:06)!" in hung["log_tail"] and "time.sleep" not in hung["error"]  # faulthandler's dump
    assert res["sections"]["compiled"]["status"] == "ok"


def test_results_are_on_disk_after_every_section(tmp_path, monkeypatch):
    suite = _suite()
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = suite.parse_args(["--dry-run-cpu", "--out", str(tmp_path), "--skip", "pytest_gpu,peers,tf32,validation"])
    s = suite.Suite(args)
    seen = []
    real_child = s.child

    def child(name, limit, **extra):
        if (tmp_path / "results.json").exists():
            seen.append((name, sorted(json.loads((tmp_path / "results.json").read_text())["sections"])))
        return real_child(name, limit, **extra)

    monkeypatch.setattr(s, "child", child)
    assert s.main() == 0
    assert seen == [("ceilings", ["environment"]), ("fused_kernel", ["ceilings", "environment"]),
                    ("norm_kernels", ["ceilings", "environment", "fused_kernel"]),
                    ("compiled", ["ceilings", "environment", "fused_kernel", "norm_kernels"]),
                    ("blocks", ["ceilings", "compiled", "environment", "fused_kernel", "norm_kernels", "validation"]),
                    ("products", ["blocks", "ceilings", "compiled", "environment", "fused_kernel", "norm_kernels",
                                  "validation"])]


def test_timeout_output_is_decoded(monkeypatch):
    suite = _suite()

    def timeout(*a, **k):
        raise subprocess.TimeoutExpired(["x"], 1.0, output=b"half a line \xe2\x9c", stderr=b"Timeout (0:00:01)!")

    monkeypatch.setattr(subprocess, "run", timeout)
    rc, log = suite.run_process(["x"], 1.0)
    assert rc == "timeout" and isinstance(log, str)
    assert log.startswith("half a line \ufffdTimeout (0:00:01)!") and "stopped after 1 s" in log
    assert suite.text(None) == "" and suite.text("already") == "already"


def test_out_is_resolved_before_anything_runs_elsewhere(tmp_path, monkeypatch):
    suite = _suite()
    monkeypatch.chdir(tmp_path)
    args = suite.parse_args(["--dry-run-cpu", "--out", "rel/dir"])
    assert args.out == tmp_path / "rel" / "dir" and args.out.is_absolute()
    assert suite.parse_args(["--dry-run-cpu"]).out.is_absolute()  # a dry run without --out: a temporary folder
    p = _run(["--dry-run-cpu", "--out", "relative_out", *FAST, "--skip", "pytest_gpu,peers,tf32,validation,compiled"],
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "relative_out" / "results.json").is_file()  # not under the repository, where children run


def test_the_default_budget_fits_eight_minutes():
    suite = _suite()
    args = suite.parse_args([])
    worst = args.budget + suite.GRACE_S * 2  # the last child's grace, and the parent's own start and writing
    assert worst <= 8 * 60


def test_a_failed_targets_summary_is_said_in_results_md():
    import suite_report

    res = {"sections": {}, "environment": {}, "targets": [], "targets_error": "TypeError: boom"}
    md = suite_report.markdown(res)
    assert "**The targets could not be computed** (TypeError: boom)" in md


def test_the_default_out_folder_is_named_after_the_device_and_date(monkeypatch):
    suite = _suite()

    class Done:
        stdout = "NVIDIA H100 80GB HBM3\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    assert suite.device_slug() == "nvidia-h100-80gb-hbm3"
    out = suite.parse_args([]).out
    assert out.parent == ROOT / "benchmarks" / "results" and out.name.startswith("nvidia-h100-80gb-hbm3-20")

    def missing(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", missing)
    assert suite.device_slug() == "gpu"


@pytest.mark.slow
def test_gpu_run_sh_rehearses_on_the_cpu(tmp_path):
    """benchmarks/gpu_run.sh, the one device command, end to end on the CPU: versions, the gpu tests of
    one file (skipped here: no CuPy), the suite's dry run into the given folder."""
    env = {**os.environ, "GPU_RUN_TESTS": "tests/test_gemm.py", "PYTHON": sys.executable}
    env.pop("GPU_SUITE_INJECT", None)
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), str(tmp_path), "--dry-run-cpu", "--skip",
                        "pytest_gpu,peers,tf32,products,blocks,profile"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "numpy" in (tmp_path / "versions.txt").read_text()
    assert "skipped" in (tmp_path / "pytest_gpu_direct.log").read_text()
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["dry_run_cpu"] and res["sections"]["validation"]["status"] == "ok"

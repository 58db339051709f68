"""The GPU suite's norm_kernels section (benchmarks/suite_norm.py), run on NumPy as the dry run
does: every step validated against float64, bandwidth rows, a failed check failing the section,
and the rows in results.md and the targets."""

from test_bench import _suite_module as _module


def test_the_section_validates_every_step_and_reports_bandwidth(monkeypatch):
    norm, device, report = _module("suite_norm"), _module("suite_device"), _module("suite_report")
    data = norm.norm_kernels(device.Device("cpu"), 100.0)
    assert data["ok"] and data["copy_GB_per_s"] == 100.0
    steps = {(r["norm"], r["dtype"], r["step"]) for r in data["rows"]}
    assert ("layernorm", "float32", "backward (dx, dγ, dβ)") in steps and ("rmsnorm", "float64", "factor jvp") in steps
    assert len(data["rows"]) == 4 * len(norm.DRY_CASES)
    for r in data["rows"]:
        assert r["ok"] and r["rel_err"] <= r["tol"] and r["GB_per_s"] > 0 and r["pct_of_copy"] > 0
    f32 = [r for r in data["rows"] if r["dtype"] == "float32"]
    assert max(r["rel_err"] for r in f32) > 0  # float32 against float64: a real comparison, not x vs x
    results = {"dry_run_cpu": True, "sections": {"norm_kernels": {"status": "ok", "data": data}}}
    md = report.markdown({**results, "targets": report.targets(results)})
    assert "## Normalisation kernels" in md and "| layernorm | forward | float32 | 16 × 32 |" in md
    assert "LayerNorm kernel forward (float32, 16×32) % of copy bandwidth" in md

    monkeypatch.setattr(norm, "TOL", {"float32": 0.0, "float64": 0.0})
    failed = norm.norm_kernels(device.Device("cpu"), None)
    assert not failed["ok"] and any(not r["ok"] for r in failed["rows"]) and "pct_of_copy" not in failed["rows"][0]

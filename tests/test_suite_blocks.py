"""The GPU suite's blocks section (benchmarks/suite_blocks.py), run on NumPy as the dry run does:
every op of a Sequential (and an MLP's parameter-space products) validated against float64, timed
against NumPy and torch, a failed check or a raising op failing its row (not the section), and the
rows in results.md."""

import numpy as np

import jacgrad as jg
from fake_cupy_transfers import install
from optional_imports import is_installed
from test_bench import _suite_module as _module

OPS = {"forward", "loss_and_grads", "jacobian_chain (auto)", "compiled step", "compiled jacobian", "per_sample_grad_norms",
       "per_sample_grads", "ggn_vp", "ggn_diagonal", "ntk", "gradient_flow (block report)"}


def test_the_section_validates_every_op_and_reports_it(capsys):
    blocks, device, report = _module("suite_blocks"), _module("suite_device"), _module("suite_report")
    data = blocks.blocks(device.Device("cpu"))
    assert data["ok"], [r for r in data["rows"] if not r["ok"]]
    log = capsys.readouterr().err.splitlines()  # a row per line as it is done: in suite.log before any crash
    assert len([ln for ln in log if ln.startswith("[blocks] ") and "rel. err." in ln]) == len(data["rows"])
    assert any(ln.startswith("[blocks] compiled step | Sequential B=8") and "captured" in ln for ln in log)
    assert {r["op"] for r in data["rows"]} == OPS
    for dtype in ("float32", "float64"):
        for op in OPS:
            assert any(r["op"] == op and r["dtype"] == dtype and r["net"].startswith("Sequential") for r in data["rows"])
        for op in blocks.PRODUCTS:
            assert any(r["op"] == op and r["dtype"] == dtype and r["net"].startswith("MLP") for r in data["rows"])
    for r in data["rows"]:
        assert r["ok"] and r["rel_err"] <= r["tol"] and r["ms"] > 0 and r["numpy_ms"] > 0
    assert {r["tol"] for r in data["rows"]} == {1e-5, 1e-11}
    f32 = [r for r in data["rows"] if r["dtype"] == "float32"]
    assert min(r["rel_err"] for r in f32) > 0  # float32 against float64: every row a real comparison
    timed = {r["op"] for r in data["rows"] if "speedup_vs_torch" in r}
    if is_installed("torch"):
        assert {"forward", "loss_and_grads", "jacobian_chain (auto)", "compiled step"} <= timed  # torch (CPU here)
    else:  # torch is optional: without it the section validates and times against NumPy alone
        assert timed == set() and not any("torch_error" in r for r in data["rows"])
    compiled = [r for r in data["rows"] if r["op"] == "compiled step"]
    assert all("captured" in r for r in compiled)
    results = {"dry_run_cpu": True, "sections": {"blocks": {"status": "ok", "data": data}}}
    md = report.markdown({**results, "targets": report.targets(results)})
    assert "## Sequential blocks (`jg.Sequential`, residual LayerNorm/RMSNorm) against float64 NumPy" in md
    assert "| compiled step | Sequential B=8, 2 blocks of 2×16 | float32 |" in md
    assert "| ntk | MLP B=4, 6×8 tanh | float64 |" in md


def test_a_wrong_result_and_a_raising_op_fail_their_rows_only(monkeypatch):
    blocks, device, report = _module("suite_blocks"), _module("suite_device"), _module("suite_report")
    monkeypatch.setattr(blocks, "TOL", {"float32": 0.0, "float64": 1e-11})  # float32 can't reach 0: all fail
    monkeypatch.setattr(blocks, "PRODUCTS", {"ntk": blocks.PRODUCTS["ntk"],
                                             "raises": lambda n, x, t, v: [n.no_such_product(x)]})
    data = blocks.blocks(device.Device("cpu"))
    assert not data["ok"]
    f32, f64 = ([r for r in data["rows"] if r["dtype"] == d] for d in ("float32", "float64"))
    assert all(not r["ok"] and 0 < r["rel_err"] < 1e-5 for r in f32 if r["op"] != "raises")
    raised = [r for r in data["rows"] if r["op"] == "raises"]
    assert len(raised) == 4  # Sequential and MLP, both dtypes: the section went on after each
    assert all(not r["ok"] and r["rel_err"] == float("inf") and "no_such_product" in r["error"] for r in raised)
    assert all(r["ok"] for r in f64 if r["op"] != "raises")
    assert [r["op"] for r in f64][-1] == "gradient_flow (block report)"
    md = report.markdown({"dry_run_cpu": True, "sections": {"blocks": {"status": "failed", "data": data}}})
    assert "| raises | Sequential B=4, 2 blocks of 2×8 | float64 |" in md and "**NO** | AttributeError" in md


def test_on_fake_device_arrays_every_op_but_the_capture_validates(monkeypatch):
    """The GPU plan's code path (``dev.gpu``: device-typed arrays, CuPy's dispatch, the norm kernels'
    wiring) on the fake CuPy of tests/fake_cupy_transfers.py, at the dry sizes. The fake has no
    CUDA runtime, so the compiled steps' construction fails (the training step's and the Jacobian's):
    failed rows, and the section goes on."""
    blocks, device = _module("suite_blocks"), _module("suite_device")
    fake = install(monkeypatch)
    dev = device.Device.__new__(device.Device)  # Device("gpu") would ask the (absent) CUDA runtime
    dev.where, dev.xp = "gpu", fake.module
    dev.put = lambda a, dtype=None: fake.asarray(np.asarray(a) if dtype is None else np.asarray(a, dtype))
    dev.sync = dev.free = lambda: None
    monkeypatch.setattr(blocks, "GPU_PLAN", blocks.DRY_PLAN)
    monkeypatch.setattr(blocks, "REPEATS", 1)
    data = blocks.blocks(dev)
    assert {r["op"] for r in data["rows"]} == OPS and not data["ok"]
    graphed = ("compiled step", "compiled jacobian")
    compiled = [r for r in data["rows"] if r["op"] in graphed]
    assert len(compiled) == 4 and all(not r["ok"] and "GPU" in r["error"] for r in compiled)
    rest = [r for r in data["rows"] if r["op"] not in graphed]
    assert all(r["ok"] for r in rest), [r for r in rest if not r["ok"]]
    assert all(r["rel_err"] > 0 for r in rest if r["dtype"] == "float32")
    spec = blocks.DRY_PLAN[0][1]  # the section's net as the GPU plan builds it lives on the device
    net = blocks._trio(dev, "float32", spec)[0]
    y = net.forward(dev.put(blocks._data(spec, "float32", 1)["x"]))[0]
    assert jg.backend.is_gpu_array(y) and jg.backend.is_gpu_array(net.layers[1].layers[0].gamma)

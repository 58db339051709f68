"""The GPU suite's products section (benchmarks/suite_products.py), run on NumPy as the dry run does:
every product and layer built since the first H100 run validated against float64 (a real float32
comparison, not x against x), the compiled products guarded where ``net.compile(B, product=...)`` is
absent, a failed check failing the section, and the rows in results.md."""

import pytest

from test_bench import _suite_module as _module

pytest.importorskip("torch", reason="the section builds its nets in torch (without it, it skips itself)")

OPS = {"forward", "loss_and_grads", "per_sample_grad_norms", "per_sample_grads", "ggn_vp", "ntk",
       "private step (clipped_grad, no noise)", "jacobian_chain (auto)", "compiled step",
       "softmax_jvp (kernels/softmax.cu)", "softmax_rows (kernels/softmax.cu)", "singular_values(method='gram')"}


def test_the_section_validates_every_product_and_guards_the_compiled_ones(monkeypatch):
    products, device, report = _module("suite_products"), _module("suite_device"), _module("suite_report")
    data = products.products(device.Device("cpu"))
    assert data["ok"], [(r["op"], r["net"], r.get("error")) for r in data["rows"] if not r["ok"]]
    ops = {r["op"] for r in data["rows"]}
    assert OPS <= ops
    nets = {r["net"].split()[0] for r in data["rows"]}
    assert {"cnn", "transformer"} <= nets
    for r in data["rows"]:
        if r.get("skipped"):
            assert r["op"].startswith("compiled ") and "product=" in r["note"]
            continue
        assert r["rel_err"] <= r["tol"] and r["ms"] > 0, r
    f32 = [r for r in data["rows"] if r["dtype"] == "float32" and not r.get("skipped")]
    assert max(r["rel_err"] for r in f32) > 0
    cnn_norms = next(r for r in data["rows"] if r["op"] == "per_sample_grad_norms" and r["net"].startswith("cnn"))
    assert "torch.func vmap(grad)+norm" in cnn_norms["peers"]  # torch is here: the peer ran (on the CPU)
    compiled = [r for r in data["rows"] if r["op"].startswith("compiled ") and not r.get("skipped")]
    assert {(r["op"], r["net"].split()[0]) for r in compiled} >= {
        (op, net) for op in ("compiled step", "compiled private step (no noise)", "compiled grad_norms", "compiled ntk",
                             "compiled ggn_vp") for net in ("cnn", "transformer")}
    for r in compiled:  # read after the step ran: on NumPy there is no graph, and nothing failed to record
        assert r["captured"] is False and r["capture_error"] == "", r
    cnn_compiled = next(r for r in compiled if r["op"] == "compiled grad_norms" and r["net"].startswith("cnn"))
    assert "torch.func vmap(grad)+norm" in cnn_compiled["peers"]
    results = {"dry_run_cpu": True, "sections": {"products": {"status": "ok", "data": data}}}
    md = report.markdown({**results, "targets": report.targets(results)})
    assert "## Products and layers since the first H100 run" in md and "| per_sample_grad_norms | cnn B=4 |" in md

    monkeypatch.setattr(products, "TOL", {"float32": 0.0, "float64": 0.0})
    monkeypatch.setattr(products, "fcn_ntk_rows", lambda *a: None)
    failed = products.products(device.Device("cpu"))
    assert not failed["ok"] and any(not r["ok"] for r in failed["rows"])

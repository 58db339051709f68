"""``jacgrad bench --tasks per_sample,ntk,ggn``: tiny cases, one repeat — never a timed assert.

Every jacgrad row must be checked against the float64 reference AND against its peer's result
(torch.func, BackPACK) in the same run; the peers agree with the reference too (so jacgrad's
parameter-space products are cross-checked by an independent library on every run). BackPACK
rows are skipped with the reason where BackPACK is absent (and where it is made absent here).
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import jacgrad as jg
from jacgrad import bench
from jacgrad.bench import cases, options, peer_param_space
from jacgrad.bench.report import format_table

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
HAS_BACKPACK = importlib.util.find_spec("backpack") is not None

TINY = ["--param-nets", "7-5-4", "--param-batch", "3", "--ntk-nets", "6-5-5-3", "--ntk-n", "3",
        "--repeats", "1", "--warmup", "0", "--min-time", "0", "--no-progress", "--threads", "1",
        "--backends", "jacgrad-numpy,torch-cpu,jax-cpu"]

# task → {kind: the peer rows of that kind (backend[variant]) that must be there}
PEERS = {
    "per_sample": {"loss_and_grads": ["torch-cpu[autograd]"],
                   "norms": ["torch-cpu[vmap(grad)+norm]", "torch-cpu[backpack.BatchL2Grad]"],
                   "grads": ["torch-cpu[vmap(grad)]", "torch-cpu[backpack.BatchGrad]"]},
    "ntk": {"ntk": ["torch-cpu"]},
    "ggn": {"loss_and_grads": ["torch-cpu[autograd]"], "ggn_vp": ["torch-cpu[jvp-H-vjp]"],
            "ggn_diagonal": ["torch-cpu[backpack.DiagGGNExact]"]},
}
JACGRAD = {
    "per_sample": {"jacgrad-numpy[loss_and_grads]": "loss_and_grads",
                   "jacgrad-numpy[per_sample_grad_norms]": "norms", "jacgrad-numpy[per_sample_grads]": "grads"},
    "ntk": {"jacgrad-numpy[ntk(net, x)]": "ntk", "jacgrad-numpy[ntk(net, x, x)]": "ntk"},
    "ggn": {"jacgrad-numpy[loss_and_grads]": "loss_and_grads", "jacgrad-numpy[ggn_vp]": "ggn_vp",
            "jacgrad-numpy[ggn_diagonal]": "ggn_diagonal"},
}


def run_json(tmp_path, capsys, *args):
    path = tmp_path / "out.json"
    assert bench.main([*TINY, *args, "--json", str(path)]) == 0
    return json.loads(path.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("dtype, activation", [("float32", "relu"), ("float64", "tanh")])
@pytest.mark.parametrize("task", ["per_sample", "ntk", "ggn"])
def test_every_row_is_validated_against_the_reference_and_its_peer(tmp_path, capsys, task, dtype, activation):
    result, table = run_json(tmp_path, capsys, "--tasks", task, "--dtype", dtype, "--activation", activation)
    tol = 1e-5 if dtype == "float32" else 1e-12
    rows = {r["backend"]: r for r in result["rows"]}
    assert all(r["task"] == task for r in rows.values())
    assert not any(r["family"] == "jax" for r in rows.values())  # no JAX recipe: it sits these tasks out

    def peered(kind):  # the peer rows that run here: BackPACK's only where it is installed
        return [n for n in PEERS[task][kind] if HAS_BACKPACK or "backpack" not in n]

    for name, kind in JACGRAD[task].items():
        r = rows[name]
        assert r["status"] == "ok" and r["kind"] == kind, r
        assert r["check_against"] == "float64 reference" and r["check_rel_err"] < tol, r
        if peered(kind):
            assert r["peer_rel_err"] < tol and r["peer_checked_against"] == PEERS[task][kind][0], r
            assert r["ratio_to_fastest_peer"] > 0 and "MISMATCH" not in r["note"]
        else:  # its only peer is BackPACK, absent: no peer result to compare with, no ratio
            assert "peer_rel_err" not in r and r["ratio_to_fastest_peer"] is None and "MISMATCH" not in r["note"], r
    for kind, names in PEERS[task].items():
        for name in names:
            r = rows[name]
            if "backpack" in name and not HAS_BACKPACK:
                assert r["status"] == "skipped" and "BackPACK" in r["error"]
                continue
            assert r["status"] == "ok" and r["kind"] == kind, r
            assert r["check_rel_err"] < tol, r
            assert r["median_ms"] > 0
    # ×peer compares rows of one kind: the fastest peer row of each kind is 1.00
    for kind, names in PEERS[task].items():
        if not peered(kind):
            continue
        ok = [rows[n] for n in names if rows[n]["status"] == "ok"]
        assert min(r["ratio_to_fastest_peer"] for r in ok) == pytest.approx(1.0)
        for name, k in JACGRAD[task].items():
            if k == kind:
                assert rows[name]["ratio_to_fastest_peer"] == pytest.approx(
                    rows[name]["median_ms"] / min(r["median_ms"] for r in ok))
    if task != "ntk":  # the scale: every row over jacgrad's loss_and_grads of the same run
        scale = rows["jacgrad-numpy[loss_and_grads]"]["median_ms"]
        for name in JACGRAD[task]:
            if name != "jacgrad-numpy[loss_and_grads]":
                ratio = rows[name]["ratio_to_loss_and_grads"]
                assert ratio == pytest.approx(rows[name]["median_ms"] / scale)
                assert f"{ratio:.2f}× loss_and_grads" in rows[name]["note"]
    if task == "ntk":
        assert rows["torch-cpu"]["variant"] in ("jacobian_contraction", "ntk_vps")
        assert set(rows["torch-cpu"]["variants_ms"]) == {"jacobian_contraction", "ntk_vps"}
    for kind in PEERS[task]:
        assert (f"{task}:{kind}" if kind != task else task) in table
    unpeered = [kind for kind in PEERS[task] if not peered(kind)]
    if unpeered:  # every other row was checked; say which result had no peer
        pytest.skip(f"BackPACK (backpack-for-pytorch) is not installed: {', '.join(unpeered)} has no other peer")


def test_a_wrong_jacgrad_result_is_flagged_against_its_peer(tmp_path, capsys, monkeypatch):
    """The float64 reference is jacgrad too: the peer check is what catches a jacgrad bug."""
    right = jg.MLP.per_sample_grad_norms
    monkeypatch.setattr(jg.MLP, "per_sample_grad_norms", lambda self, *a, **k: 1.01 * right(self, *a, **k))
    result, table = run_json(tmp_path, capsys, "--tasks", "per_sample")
    rows = {r["backend"]: r for r in result["rows"]}
    bad = rows["jacgrad-numpy[per_sample_grad_norms]"]
    assert bad["peer_rel_err"] == pytest.approx(0.01, rel=1e-3)  # max|a − b| / max|b|, b the peer
    assert "MISMATCH with torch-cpu[vmap(grad)+norm]" in bad["note"] and "MISMATCH with" in table
    assert "MISMATCH" in rows["torch-cpu[vmap(grad)+norm]"]["note"]  # against the (patched) reference
    assert "MISMATCH" not in rows["jacgrad-numpy[per_sample_grads]"]["note"]


def test_backpack_absent_rows_are_skipped_with_the_reason(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "backpack", None)  # `import backpack` raises ImportError
    result, table = run_json(tmp_path, capsys, "--tasks", "per_sample,ggn")
    skipped = [r for r in result["rows"] if r["status"] == "skipped"]
    assert sorted(r["backend"] for r in skipped) == [
        "torch-cpu[backpack.BatchGrad]", "torch-cpu[backpack.BatchL2Grad]", "torch-cpu[backpack.DiagGGNExact]"]
    assert all(r["error"].startswith("BackPACK (backpack-for-pytorch) is not importable") for r in skipped)
    assert sorted(r["kind"] for r in skipped) == ["ggn_diagonal", "grads", "norms"]
    assert "skipped: BackPACK (backpack-for-pytorch) is not importable" in table
    assert all(r["status"] == "ok" for r in result["rows"] if r not in skipped)


def test_a_torch_ntk_recipe_too_big_for_memory_is_skipped(tmp_path, capsys, monkeypatch):
    case = cases.Case("ntk", [6, 5, 5, 3], 3)
    need = peer_param_space.ntk_memory(case, 4)
    assert need == {"jacobian_contraction": 2 * 3 * 3 * case.parameters * 4, "ntk_vps": 9 * 3 * case.parameters * 4}
    monkeypatch.setattr(peer_param_space, "available_memory", lambda: 2 * need["jacobian_contraction"] + 1)
    result, table = run_json(tmp_path, capsys, "--tasks", "ntk")
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["torch-cpu"]["status"] == "ok" and "variants_ms" not in rows["torch-cpu"]
    assert rows["torch-cpu[ntk_vps]"]["status"] == "skipped" and rows["torch-cpu[ntk_vps]"]["kind"] == "ntk"
    assert "needs at least" in rows["torch-cpu[ntk_vps]"]["error"]


def test_param_space_tasks_are_opt_in_and_sized_by_their_own_options():
    o = options.parse([])
    assert o.tasks == ["train", "vjp", "jacobian"]
    o = options.parse(["--tasks", "per_sample,ntk,ggn", "--param-nets", "10-4", "--ntk-n", "2,5"])
    built = bench.runner.build_cases(o)
    assert [(c.task, c.label, c.batch) for c in built] == [
        ("per_sample", "10-4", 128), ("ntk", "128-512-512-512-8", 2), ("ntk", "128-512-512-512-8", 5),
        ("ggn", "10-4", 128)]
    q = options.parse(["--quick", "--tasks", "ntk"])
    assert q.ntk_nets == ["32-64-64-64-8"] and q.ntk_n == [4]


@pytest.mark.parametrize("argv, needle", [
    (["--param-nets", "7-x"], "--param-nets: net '7-x' is neither a named net"),
    (["--ntk-nets", ""], "--ntk-nets: no net given"),
    (["--ntk-n", "0"], "--ntk-n: '0' is not a positive integer"),
    (["--param-batch", "b"], "--param-batch: 'b' is not a positive integer"),
])
def test_bad_param_space_options_are_one_line_errors(capsys, argv, needle):
    assert bench.main(["--tasks", "ntk", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_an_ntk_case_too_big_for_memory_is_refused_up_front(capsys):
    big = cases.Case("ntk", [8, 8, 1000], 2000)
    small = cases.Case("ntk", [8, 8, 1000], 2)
    assert big.memory_bytes() - small.memory_bytes() >= 4 * ((2000 * 1000) ** 2 - (2 * 1000) ** 2)
    assert bench.main(["--tasks", "ntk", "--ntk-nets", "8-8-1000", "--ntk-n", "2000", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "the case ntk 8-8-1000 B=2000 needs at least" in err


def test_memory_bytes_counts_the_per_sample_gradients():
    c = cases.Case("per_sample", [7, 5, 4], 3, dtype="float32")
    t = cases.Case("train", [7, 5, 4], 3, dtype="float32")
    assert c.memory_bytes() - t.memory_bytes() == (4 + 8) * 3 * c.parameters


@pytest.mark.skipif(not HAS_BACKPACK, reason="BackPACK (backpack-for-pytorch) is not installed")
def test_backpack_lacking_an_activation_is_a_skipped_row(tmp_path, capsys):
    result, _ = run_json(tmp_path, capsys, "--tasks", "ggn", "--activation", "softplus")
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["torch-cpu[backpack.DiagGGNExact]"]["status"] == "skipped"
    assert "BackPACK has no module for the activation 'softplus'" in rows["torch-cpu[backpack.DiagGGNExact]"]["error"]
    assert rows["jacgrad-numpy[ggn_diagonal]"]["status"] == "ok"
    assert "check_rel_err" in rows["jacgrad-numpy[ggn_diagonal]"]


def test_ggn_direction_is_in_flat_order_and_the_table_formats(tmp_path, capsys):
    data = cases.make_data(cases.Case("ggn", [7, 5, 4], 3, dtype="float32"))
    v = data.direction()
    assert v.shape == (7 * 5 + 5 + 5 * 4 + 4,) and np.array_equal(v, data.direction())
    assert np.array_equal(v, v.astype(np.float32))  # rounded to the case's dtype
    result, _ = run_json(tmp_path, capsys, "--tasks", "ggn")
    assert "ggn:ggn_diagonal" in format_table(result)


def test_benchmarks_param_space_is_a_thin_wrapper_of_jacgrad_bench(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("param_space", ROOT / "benchmarks" / "param_space.py")
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.argv(["--repeats", "5"]) == [
        "--tasks", "per_sample,ntk,ggn", "--activation", "relu", "--threads", "1", "--param-nets", "784-512-512-10",
        "--repeats", "5"]
    assert wrapper.argv(["--tasks", "ntk", "--threads=2", "--param-nets", "5-2"]) == [
        "--activation", "relu", "--tasks", "ntk", "--threads=2", "--param-nets", "5-2"]
    path = tmp_path / "w.json"
    assert wrapper.main(wrapper.argv([*TINY, "--tasks", "ntk", "--json", str(path)])) == 0
    rows = json.loads(path.read_text())["rows"]
    assert {r["task"] for r in rows} == {"ntk"} and json.loads(path.read_text())["options"]["activation"] == "relu"


def test_param_space_flops_are_their_gemm_lists():
    w, B = [7, 5, 4], 3
    train = cases.Case("train", w, B).flops
    fwd = 2 * (B * 7 * 5 + B * 5 * 4)
    assert cases.Case("per_sample", w, B).flops == train  # the norms need no GEMM beyond the step's
    assert cases.Case("ggn", w, B).flops == train + fwd  # + the parameter JVP
    O, N = 4, B  # forward, the N·O cotangents back to layer 1, Gram of every layer's input and deltas
    ntk = fwd + 2 * (N * O * 4 * 5) + 2 * (N * N * 7 + N * N * 5) + 2 * ((N * O) ** 2 * 5 + (N * O) ** 2 * 4)
    assert cases.Case("ntk", w, N).flops == ntk

"""``jacgrad bench --tasks cnn_norms,transformer_norms`` at the tiny model size, one repeat — never a
timed assert. Every row runs, is checked against the float64 reference, and jacgrad's rows agree
with torch's (its own autograd step for the loss, torch.func ``vmap(grad)`` for the norms) in the
same run. The default run does not include them."""

import json

import pytest

from jacgrad import bench
from jacgrad.bench import cases, options

pytest.importorskip("torch")

TINY = ["--tasks", "cnn_norms,transformer_norms", "--model-size", "tiny", "--repeats", "1", "--warmup", "0",
        "--min-time", "0", "--no-progress", "--threads", "1", "--backends", "jacgrad-numpy,torch-cpu,jax-cpu"]

ROWS = {"jacgrad-numpy[loss_and_grads]": "loss_and_grads", "jacgrad-numpy[compiled]": "loss_and_grads",
        "torch-cpu[autograd]": "loss_and_grads", "torch-cpu[vmap(grad)+norm]": "norms",
        **{f"jacgrad-numpy[per_sample_grad_norms[{m}]]": "norms" for m in ("auto", "gram", "instantiate")}}


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 1e-4)])
def test_model_tasks_run_and_agree_with_torch(tmp_path, capsys, dtype, tol):
    path = tmp_path / "out.json"
    assert bench.main([*TINY, "--dtype", dtype, "--json", str(path)]) == 0
    table = capsys.readouterr().out
    rows = json.loads(path.read_text())["rows"]
    for task, net in (("cnn_norms", "cnn 3×8×8 2-3-4"), ("transformer_norms", "transformer 1×(T=4, d=8, h=2)")):
        got = {r["backend"]: r for r in rows if r["task"] == task}
        assert set(got) == set(ROWS), task  # jax sits the model tasks out
        for name, r in got.items():
            assert r["status"] == "ok" and r["kind"] == ROWS[name] and r["net"] == net, (task, name, r)
            assert r["check_rel_err"] <= tol, (task, name, r["check_rel_err"])
            assert "MISMATCH" not in r["note"]
            if r["family"] == "jacgrad":
                assert r["peer_rel_err"] <= tol and r["peer_checked_against"].startswith("torch-cpu"), (task, name)
            if name != "jacgrad-numpy[loss_and_grads]":
                assert r["ratio_to_loss_and_grads"] > 0
        assert net in table


def test_model_tasks_are_opt_in_and_quick_is_tiny():
    assert not {"cnn_norms", "transformer_norms"} & set(cases.default_tasks())
    assert options.parse([]).model_size == "issue" and options.parse(["--quick"]).model_size == "tiny"
    with pytest.raises(options.UsageError, match="--model-size: 'huge' is not issue or tiny"):
        options.parse(["--model-size", "huge"])

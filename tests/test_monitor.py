"""jg.Monitor (issue 22 item 6): in a plain torch loop, every `every`-th step() writes one JSONL row
whose per-layer numbers are those of the model at that step, checked against an independent
computation (torch autograd for the gradient norms and dead units, dense float64 NumPy for χ and
the per-sample ‖J_j‖₂); the writer receives the same scalars; the subsample is seeded; a Lightning
callback (a fake `lightning` module where none is installed) drives it from trainer.global_step;
`jacgrad report --log` prints and plots the history."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional
ROOT = Path(__file__).resolve().parents[1]


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3)).double()


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def reference_rows(model, x, t):
    """Per Linear: ‖∂L/∂W‖ (torch autograd, L = mse mean), χ = mean_b ‖J_b‖_F²/H_out and the mean
    ‖J_b‖₂ (dense float64 NumPy, J_b = diag(φ'(h_b)) Wᵀ), and the dead fraction (units whose φ' is 0
    for every sample)."""
    model = copy.deepcopy(model)
    model.zero_grad()
    F.mse_loss(model(x), t).backward()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    rows, z = [], x
    for i, lin in enumerate(linears):
        h = lin(z).detach()
        act = model[list(model).index(lin) + 1] if list(model).index(lin) + 1 < len(model) else None
        hh = h.clone().requires_grad_(True)
        out = act(hh) if act is not None else hh
        d = torch.autograd.grad(out.sum(), hh)[0].numpy() if act is not None else np.ones_like(h.numpy())
        W = lin.weight.detach().numpy().T
        J = d[:, :, None] * W.T[None]  # (B, H_out, H_in)
        rows.append({"grad_norm": float(lin.weight.grad.norm()),
                     "chi": float(np.mean((J ** 2).sum(axis=(1, 2)) / W.shape[1])),
                     "spectral_norm": float(np.mean([np.linalg.norm(Jb, 2) for Jb in J])),
                     "dead_fraction": float(np.mean(np.all(d == 0, axis=0)))})
        z = out.detach()
    return rows


def train(model, monitor, steps, lr=0.3):
    x, t = data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    states = {}
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), t).backward()
        opt.step()
        if monitor.step() is not None:
            states[monitor.step_count] = copy.deepcopy(model)
    return states


def test_each_row_holds_the_models_numbers_at_its_step(tmp_path):
    model = small_mlp()
    x, t = data()
    log = tmp_path / "run.jsonl"
    mon = jg.Monitor(model, x[:16], every=4, log=log, target=t[:16], spectra="all")
    states = train(model, mon, 14)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12] == sorted(states)
    assert rows == mon.rows
    for row in rows:
        want = reference_rows(states[row["step"]], x[:16], t[:16])
        assert row["rows"] == "layers" and [L["module"] for L in row["layers"]] == ["0", "2", "4"]
        for got, ref in zip(row["layers"], want):
            for k in ("grad_norm", "chi", "dead_fraction"):
                assert got[k] == pytest.approx(ref[k], rel=1e-10, abs=1e-14), (row["step"], k)
            assert got["spectral_norm"] == pytest.approx(ref["spectral_norm"], rel=1e-6)
        assert row["verdict"] in ("vanishing", "healthy", "exploding")
        with torch.no_grad():
            assert row["loss"] == pytest.approx(float(F.mse_loss(states[row["step"]](x[:16]), t[:16])), rel=1e-12)
    assert rows[0]["layers"][0]["grad_norm"] != rows[-1]["layers"][0]["grad_norm"]  # a live view: it follows training


def test_the_row_is_the_report_computed_directly(tmp_path):
    model = small_mlp(3)
    x, _ = data(40)
    mon = jg.Monitor(model, x, every=1, log=tmp_path / "r.jsonl", samples=5, seed=7)
    rep = mon.step()
    direct = jg.gradient_flow(jg.MLP.from_torch(model), mon.x_probe, seed=7, spectrum_samples=5, norm_samples=5)
    row = mon.rows[0]
    assert rep.spectrum_samples == row["spectrum_samples"] == 5 and row["norm_samples"] == 5
    assert row["chi_bar"] == direct.chi_bar and row["jacobian_spectral_norm"] == direct.jacobian_spectral_norm
    assert [L["spectral_norm"] for L in row["layers"]] == [L.jacobian_norm for L in direct.layers]
    # the subsample is the probe's rows in a seeded order: the same rows for the same seed, others for another
    probe = x.numpy()
    assert sorted(map(tuple, mon.x_probe)) == sorted(map(tuple, probe))
    again = jg.Monitor(model, x, every=1, log=None, samples=5, seed=7)
    other = jg.Monitor(model, x, every=1, log=None, samples=5, seed=8)
    np.testing.assert_array_equal(again.x_probe, mon.x_probe)
    assert not np.array_equal(other.x_probe[:5], mon.x_probe[:5])


class FakeWriter:
    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append((tag, value, step))


def test_the_writer_receives_the_rows_scalars():
    model = small_mlp()
    x, t = data()
    writer = FakeWriter()
    mon = jg.Monitor(model, x[:16], every=2, log=None, writer=writer, target=t[:16])
    train(model, mon, 4)
    assert {s for _, _, s in writer.calls} == {2, 4}
    got = {(tag, step): value for tag, value, step in writer.calls}
    for row in mon.rows:
        for L in row["layers"]:
            for k in ("grad_norm", "chi", "spectral_norm", "dead_fraction"):
                assert got[(f"jacgrad/{L['module']}/{k}", row["step"])] == L[k]
        assert got[("jacgrad/chi_bar", row["step"])] == row["chi_bar"]
        assert got[("jacgrad/verdict", row["step"])] == {"vanishing": -1, "healthy": 0, "exploding": 1}[row["verdict"]]
    assert all(isinstance(v, float) for _, v, _ in writer.calls)


def test_a_model_with_blocks_gets_a_row_per_layer(tmp_path):
    from jacgrad.io.interop.torch_blocks import Residual

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), Residual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.GELU())),
                          nn.Dropout(0.2), nn.Linear(8, 3)).double()
    model.train()
    x, _ = data()
    mon = jg.Monitor(model, x, every=1, log=tmp_path / "b.jsonl", spectra="off")
    mon.step()
    row = mon.rows[0]
    assert model.training  # imported in eval mode, train mode restored
    # one row per layer with parameters, residual blocks opened (Dense, LayerNorm, Dense, Dense)
    assert row["rows"] == "layers" and len(row["layers"]) == 4
    assert row["layers"][1]["dead_fraction"] is None and row["layers"][1]["chi"] is None  # the LayerNorm row
    assert all(L["dead_fraction"] is not None for k, L in enumerate(row["layers"]) if k != 1)
    assert all(L["spectral_norm"] is None for L in row["layers"])
    assert row["jacobian_spectral_norm"] is None
    direct = jg.gradient_flow(jg.Sequential.from_torch(model.eval()), x.numpy(), spectrum_samples=1, norm_samples=1)
    assert [L["chi"] for L in row["layers"]] == [r.chi for r in direct.layers]
    assert [L["grad_norm"] for L in row["layers"]] == [r.grad_norm for r in direct.layers]


def test_lightning_callback_steps_on_the_trainers_global_step(monkeypatch, tmp_path):
    fake = types.ModuleType("lightning")
    fake_pl = types.ModuleType("lightning.pytorch")

    class Callback:  # the base class Lightning's callbacks subclass
        pass

    fake_pl.Callback = Callback
    fake.pytorch = fake_pl
    monkeypatch.setitem(sys.modules, "lightning", fake)
    monkeypatch.setitem(sys.modules, "lightning.pytorch", fake_pl)
    model = small_mlp()
    x, _ = data()
    mon = jg.Monitor(model, x[:8], every=3, log=tmp_path / "l.jsonl")
    cb = mon.callback()
    assert isinstance(cb, Callback) and cb.monitor is mon
    trainer = types.SimpleNamespace(global_step=0)
    for step in [1, 2, 3, 3, 3, 4, 5, 6]:  # gradient accumulation: the step repeats over batches
        trainer.global_step = step
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert [r["step"] for r in mon.rows] == [3, 6]


def test_without_lightning_the_callback_says_what_to_install(monkeypatch):
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    mon = jg.Monitor(small_mlp(), data()[0][:4], every=1, log=None)
    with pytest.raises(ImportError, match="pip install lightning"):
        mon.callback()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"every": 0}, ValueError, "every=0"),
    ({"spectra": "some"}, ValueError, "valid values are 'subsample', 'all', 'off'"),
    ({"samples": 0}, ValueError, "samples=0"),
    ({"writer": object()}, TypeError, "no add_scalar"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        jg.Monitor(small_mlp(), data()[0][:4], log=None, **kwargs)


def test_a_probe_or_model_that_cannot_be_reported_fails_at_construction_not_at_step_100():
    with pytest.raises(TypeError, match="x_probe is float64 but the network is float32"):
        jg.Monitor(small_mlp().float(), data()[0], log=None)
    with pytest.raises(ValueError, match=r"x_probe has shape \(48, 5\) but the model takes \(B, 6\)"):
        jg.Monitor(small_mlp(), data()[0][:, :5], log=None)
    with pytest.raises(TypeError, match="Conv3d"):
        jg.Monitor(nn.Sequential(nn.Conv3d(1, 1, 3)), np.zeros((2, 6)), log=None)


def test_cli_prints_and_plots_a_runs_history(tmp_path):
    model = small_mlp()
    x, t = data()
    log = tmp_path / "run.jsonl"
    mon = jg.Monitor(model, x[:16], every=2, log=log, target=t[:16])
    train(model, mon, 6)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    run = lambda *a: subprocess.run([sys.executable, "-c", "import sys; from jacgrad.cli.main import main; sys.exit(main())",
                                     "report", *a], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    r = run("--log", "run.jsonl")
    assert r.returncode == 0, r.stderr
    assert "3 reports, steps 2 … 6" in r.stdout
    first, last = mon.rows[0]["layers"][0], mon.rows[-1]["layers"][0]
    assert f"{first['grad_norm']:.4g} → {last['grad_norm']:.4g}" in r.stdout
    pytest.importorskip("matplotlib")
    r = run("--log", "run.jsonl", "--out", "h.png")
    assert r.returncode == 0 and (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr
    (tmp_path / "bad.jsonl").write_text('{"step": 1}\n')
    for args, match in ((("--log", "bad.jsonl"), "line 1: not a jacgrad Monitor row"),
                        (("--log", "none.jsonl"), "no such file"),
                        (("--out", "h.png"), "--out plots a run's history: it needs --log"),
                        (("--log", "run.jsonl", "--depth", "3"), "leave out --depth")):
        r = run(*args)
        assert r.returncode == 2 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_without_matplotlib_says_what_to_install(tmp_path, monkeypatch, capsys):
    from jacgrad.cli.main import main

    mon = jg.Monitor(small_mlp(), data()[0][:4], every=1, log=tmp_path / "run.jsonl")
    mon.step()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", "--log", str(tmp_path / "run.jsonl"), "--out", str(tmp_path / "h.png")]) == 2
    assert 'plots need matplotlib: pip install "jacgrad[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()


def test_the_docs_example_runs(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / "monitor_loop.py"), "--steps", "20", "--every", "10",
                        "--log", str(tmp_path / "run.jsonl")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = jg.monitor.read_log(tmp_path / "run.jsonl")
    assert [row["step"] for row in rows] == [10, 20] and "time per step:" in r.stdout

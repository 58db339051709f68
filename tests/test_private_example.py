"""docs/examples/dp_digits.py runs (one epoch, one seed: the full run is the docs' table) and
prints its table: a non-private row and one row per noise level, ε from Opacus where installed."""

import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "docs" / "examples" / "dp_digits.py"


def test_dp_digits_example_runs(capsys, monkeypatch):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("dp_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "EPOCHS", 1)
    monkeypatch.setattr(mod, "SEEDS", [0])
    mod.main()
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(rows) == 1 + len(mod.SIGMAS) and rows[0].split()[0] == "non-private"
    accs = [float(r.split()[-1]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accs) and accs[0] > 0.5  # one epoch of plain SGD already learns digits

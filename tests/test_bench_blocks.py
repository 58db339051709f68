"""benchmarks/blocks.py runs at a tiny size and its contenders compute the same thing: the compiled
step is bitwise loss_and_grads, torch's loss and dx and JAX's dx and per-sample Jacobians agree
with jacgrad's in the same run (so the timings compare the same computation)."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_blocks_benchmark_runs_and_agrees():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "blocks.py"), "--blocks", "2", "--width", "8", "--batch", "5",
           "--n-out", "3", "--rounds", "1", "--threads", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "compiled vs loss_and_grads 0.0e+00" in p.stdout, p.stdout
    errors = [float(e) for e in re.findall(r"(?:vs torch|vs JAX|JAX) (\d\.\de[-+]\d\d)", p.stdout)]
    assert len(errors) >= 2 and all(e < 1e-5 for e in errors), p.stdout
    for name in ("jacgrad loss_and_grads", "jacgrad compiled", "torch", "jacgrad jacobian_chain", "torch.func"):
        assert re.search(rf"^\s+{re.escape(name)}.* best .* ms", p.stdout, flags=re.M), p.stdout
    assert "Model name" in p.stdout and "load:" in p.stdout and "OPENBLAS_CORETYPE=" in p.stdout

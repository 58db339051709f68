"""benchmarks/blocks_param_space.py runs at a tiny size, and every jacgrad product agrees with its
torch.func recipe in the same run (so the timings compare the same computation)."""

import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_blocks_param_space_benchmark_runs_and_agrees():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "blocks_param_space.py"), "--blocks", "2", "--width", "8",
           "--batch", "5", "--n-in", "3", "--n-out", "2", "--ntk-n", "3", "--rounds", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    rows = re.findall(r"^(\w+)\s+jacgrad .* agreement (\S+)$", p.stdout, flags=re.M)
    assert [r[0] for r in rows] == ["norms", "grads", "ggn", "ntk"], p.stdout
    assert all(float(err) < 1e-5 for _, err in rows), p.stdout

"""Without BackPACK (the quick start does not install it) only the BackPACK comparison skips: the
torch.func checks of the parameter-space products in test_param_space.py still run."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]

# BackPACK made unimportable (sys.modules entry None), then pytest collects the module.
_COLLECT = (
    "import sys; sys.modules['backpack'] = None; import pytest; "
    "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_param_space.py']))"
)


def test_param_space_tests_are_collected_without_backpack():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", _COLLECT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    collected = [line for line in run.stdout.splitlines() if line.startswith("tests/test_param_space.py::")]
    torch_func = [line for line in collected if "match_torch_func" in line]
    assert len(torch_func) > 10, run.stdout  # every activation x loss, collected although BackPACK is absent

"""Every MLP result stays bitwise what it was before MLP became a Dense-only Sequential
(issue 19): ``tests/data/mlp_reference.npz`` holds the outputs of the code at b36423c, written
by ``tools/store_mlp_reference.py``; this test recomputes them with today's code."""

import importlib.util
import os

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


def _tool():
    spec = importlib.util.spec_from_file_location("store_mlp_reference", os.path.join(HERE, "..", "tools", "store_mlp_reference.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def recomputed():
    return _tool().compute()


def test_same_entries(recomputed):
    with np.load(os.path.join(HERE, "data", "mlp_reference.npz")) as ref:
        assert sorted(ref.files) == sorted(recomputed)


def test_bitwise(recomputed):
    with np.load(os.path.join(HERE, "data", "mlp_reference.npz")) as ref:
        differ = [k for k in ref.files if k in recomputed and not (
            ref[k].dtype == recomputed[k].dtype and np.array_equal(ref[k], recomputed[k]))]
    assert not differ, f"{len(differ)} results changed bitwise, e.g. {differ[:8]}"

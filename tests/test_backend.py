"""The backend switch: the GPU probe, JACGRAD_BACKEND, device moves and the NumPy/CuPy mix.

The probe is tested against fake ``cupy`` packages put first on ``sys.path`` of a fresh
interpreter: one that imports but whose driver fails (what a CuPy wheel does on a machine
without a GPU), and one that cannot be imported at all.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import jacgrad as jg

FAKE_CUPY_NO_DRIVER = """
class _Runtime:
    @staticmethod
    def getDeviceCount():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")
class cuda:
    runtime = _Runtime
"""


def run_with_fake_cupy(tmp_path, body: str, cupy_source: str | None, env_backend: str | None = None):
    """Run ``body`` in a fresh Python whose ``import cupy`` finds the fake (or fails)."""
    pkg = tmp_path / "cupy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(cupy_source if cupy_source is not None else "raise ImportError('no CUDA here')")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JACGRAD_BACKEND", None)
    if env_backend is not None:
        env["JACGRAD_BACKEND"] = env_backend
    code = "import jacgrad as jg\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_cupy_that_imports_but_runs_no_kernel_means_no_gpu(tmp_path):
    r = run_with_fake_cupy(tmp_path, """
        print(jg.backend.gpu_available(), jg.backend.available())
        print(jg.backend.gpu_unavailable_reason())
        print(jg.backend.resolve_device("auto"))
    """, FAKE_CUPY_NO_DRIVER)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "False ('numpy',)"
    assert "CuPy imports but no kernel runs" in lines[1] and "InsufficientDriver" in lines[1]
    assert lines[2] == "cpu"


def test_unimportable_cupy_means_no_gpu(tmp_path):
    r = run_with_fake_cupy(tmp_path, "print(jg.backend.gpu_unavailable_reason())", None)
    assert r.returncode == 0, r.stderr
    assert "CuPy is not importable" in r.stdout


@pytest.mark.parametrize("body,message", [
    ("jg.backend.resolve_device('auto')", "JACGRAD_BACKEND=cupy asks for the GPU, but none is usable here"),
    ("jg.to_device(__import__('numpy').ones(2), 'gpu')", "asks for the GPU, but none is usable here"),
    ("jg.MLP.init([2, 2], device='gpu')", 'device="gpu" asks for the GPU'),
])
def test_asking_for_the_gpu_without_one_is_a_runtime_error(tmp_path, body, message):
    r = run_with_fake_cupy(tmp_path, body, FAKE_CUPY_NO_DRIVER, env_backend="cupy")
    assert r.returncode != 0
    assert "RuntimeError" in r.stderr and message in r.stderr


def test_forcing_numpy_never_probes_the_gpu(tmp_path):
    # A cupy whose import would crash the process: JACGRAD_BACKEND=numpy must not touch it.
    r = run_with_fake_cupy(tmp_path, "print(jg.backend.resolve_device('auto'))",
                           "import os; os._exit(3)", env_backend="numpy")
    assert r.returncode == 0 and r.stdout.strip() == "cpu"


def test_importing_jacgrad_does_not_import_cupy(tmp_path):
    r = run_with_fake_cupy(tmp_path, "import sys; print('cupy' in sys.modules)", "import os; os._exit(3)")
    assert r.returncode == 0 and r.stdout.strip() == "False"


def test_bad_names_are_listed(monkeypatch):
    with pytest.raises(ValueError, match="cpu, gpu, auto"):
        jg.backend.resolve_device("tpu")
    with pytest.raises(ValueError, match="cpu, gpu"):
        jg.to_device(np.ones(2), "auto")
    monkeypatch.setenv("JACGRAD_BACKEND", "torch")
    with pytest.raises(ValueError, match="valid names: numpy, cupy"):
        jg.backend.default_device()


def test_numpy_round_trip_and_get_xp():
    x = np.arange(3.0)
    assert jg.to_device(x, "cpu") is x and jg.to_numpy(x) is x
    assert jg.get_xp(x, None, 2.0) is np
    assert jg.backend.device_of(x) == "cpu"


@pytest.mark.gpu
def test_gpu_round_trip():
    import cupy

    x = np.arange(3.0)
    g = jg.to_device(x, "gpu")
    assert isinstance(g, cupy.ndarray) and jg.get_xp(g) is cupy
    np.testing.assert_array_equal(jg.to_numpy(g), x)
    with pytest.raises(TypeError, match="different devices"):
        jg.get_xp(x, g)

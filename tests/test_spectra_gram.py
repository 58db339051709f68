"""``singular_values(a, method="gram")``: one batched symmetric eigensolve of the smaller Gram
matrix, against NumPy's SVD (LAPACK, an independent reference) within the documented accuracy
(``~eps·σ_max²/σ``, a floor ``~sqrt(eps)·σ_max``); on the fake CuPy one ``eigvalsh`` call for the
whole stack; and the report's spectrum on device arrays through it."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra import spectra
from jacgrad.flow import io_spectrum
from jacgrad.flow.diagnostics import gradient_flow

from fake_cupy_transfers import _namespace, install

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _stack(rng, B, m, n, rank=None, dtype=np.float64):
    a = rng.standard_normal((B, m, n))
    if rank is not None:  # rank-deficient: exact zeros among the singular values
        a = rng.standard_normal((B, m, rank)) @ rng.standard_normal((B, rank, n))
    return (a * np.array([1.0, 1e3, 1e-3][:B] + [1.0] * max(0, B - 3))[:, None, None]).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("m, n, rank", [(4, 9, None), (9, 4, None), (6, 6, None), (7, 12, 3), (1, 5, None),
                                        (5, 1, None)])
def test_gram_matches_the_svd_within_its_accuracy(rng, dtype, m, n, rank):
    a = _stack(rng, 4, m, n, rank, dtype)
    got = spectra.singular_values(a, method="gram")
    want = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    assert got.shape == want.shape == (4, min(m, n)) and got.dtype == a.dtype
    eps, k = np.finfo(dtype).eps, min(m, n)
    top = want[:, :1]
    # λ to ~k·eps·σ_max² (plus the Gram's own rounding): σ to that over σ, and never worse than the floor
    bound = np.minimum(16 * k * eps * top ** 2 / np.maximum(want, 1e-300), 8 * np.sqrt(k * eps) * top)
    err = np.abs(got.astype(np.float64) - want)
    assert (err <= bound).all(), f"max error/σ_max {(err / top).max():.3g}"
    assert (np.diff(got, axis=-1) <= 0).all()  # descending, as the SVD's
    np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=64 * k * eps)  # σ_max: as exact as the SVD's


def test_gram_of_single_matrices_and_empty_stacks(rng):
    a = rng.standard_normal((5, 3))
    np.testing.assert_allclose(spectra.singular_values(a, "gram"), np.linalg.svd(a, compute_uv=False), rtol=1e-12)
    assert spectra.singular_values(np.zeros((0, 3, 4)), "gram").shape == (0, 3)


def test_an_unknown_method_says_the_valid_ones(rng):
    with pytest.raises(ValueError, match=r"method='eig' is not one of 'svd', 'gram'"):
        spectra.singular_values(rng.standard_normal((2, 3)), method="eig")


def _recording_eigvalsh(fake, monkeypatch):
    calls = []
    linalg = _namespace("cupy.linalg", np.linalg)
    real = linalg.eigvalsh

    def eigvalsh(g):
        calls.append((type(g).__module__, tuple(g.shape)))
        return real(g)

    linalg.eigvalsh = eigvalsh
    monkeypatch.setattr(fake.module, "linalg", linalg, raising=False)
    return calls


def test_on_device_the_whole_stack_is_one_batched_eigensolve(rng, monkeypatch):
    fake = install(monkeypatch)
    calls = _recording_eigvalsh(fake, monkeypatch)
    a = rng.standard_normal((7, 5, 11))
    got = spectra.singular_values(fake.asarray(a), method="gram")
    assert jg.backend.is_gpu_array(got)
    assert calls == [("cupy", (7, 5, 5))]  # one call, the smaller Gram of every sample
    np.testing.assert_allclose(np.asarray(got), np.linalg.svd(a, compute_uv=False), rtol=1e-10, atol=1e-12)


def test_the_report_spectrum_takes_the_gram_path_on_device_and_svd_on_numpy(rng, monkeypatch):
    assert io_spectrum.SPECTRUM_METHOD == {"numpy": "svd", "cupy": "gram"}
    net = jg.MLP.init([6, 16, 16, 4], activation="tanh", seed=0)
    x = rng.standard_normal((10, 6))
    seen = []
    real = io_spectrum.singular_values
    monkeypatch.setattr(io_spectrum, "singular_values", lambda a, method="svd": seen.append(method) or real(a, method))
    ref = gradient_flow(net, x, spectrum_samples=10)
    assert seen and set(seen) == {"svd"}
    fake = install(monkeypatch)
    calls = _recording_eigvalsh(fake, monkeypatch)
    seen.clear()
    dev = jg.MLP([fake.asarray(W) for W in net.weights], [fake.asarray(b) for b in net.biases], net.activations)
    rep = gradient_flow(dev, fake.asarray(x), spectrum_samples=10)
    assert seen == ["gram"] and ("cupy", (10, 4, 4)) in calls  # the 10 samples' (4 × 4) Grams, one solve
    np.testing.assert_allclose(rep.jacobian_singular_values, ref.jacobian_singular_values, rtol=1e-8, atol=1e-12)
    assert rep.spectrum_verdict == ref.spectrum_verdict

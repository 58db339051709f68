"""Host synchronisation of the report's loops, counted on a fake CuPy (tests/fake_cupy_transfers.py).

Every device-to-host read (``.get()``, ``float()``, ``int()``, ``bool()``, ``.item()``) made by
jacgrad's code on a fake device array is counted. On a GPU each one is a sync that drains the
queue, so the loops must gather their scalars: one transfer per layer for the layer's numbers,
one per Lanczos check (not one per step), one for the spectrum, one per loss."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.nn import losses
from jacgrad.algebra import spectra
from jacgrad.flow.diagnostics import gradient_flow

from fake_cupy_transfers import install

pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture
def fake(monkeypatch):
    return install(monkeypatch)


def _on(fake, net):
    return jg.MLP([fake.asarray(W) for W in net.weights], [fake.asarray(b) for b in net.biases], net.activations)


def test_the_fake_dispatches_like_cupy_and_counts(fake):
    a = fake.asarray(np.arange(3.0))
    assert jg.get_xp(a).__name__ == "cupy" and jg.backend.is_gpu_array(a.sum())
    fake.reset()
    jg.to_numpy(a)
    assert fake.transfers == 1


def test_small_layers_cost_three_transfers_each_and_the_report_four_more(fake):
    # widths <= 64: every ‖J_j‖₂ from one batched eigensolve, so no Lanczos checks at all
    L = 5
    net = jg.MLP.init([24, 32, 48, 32, 16, 8], activation="tanh", seed=0)
    x = np.random.default_rng(0).standard_normal((16, 24))
    ref = gradient_flow(net, x)
    fake.reset()
    rep = gradient_flow(_on(fake, net), fake.asarray(x))
    assert rep.device == "gpu"
    # per layer: its numbers, ‖W‖₂, the per-sample eigensolve; once: the input/weight check, the
    # non-finite flags, the spectrum, the gradient norms of every layer
    assert fake.transfers == 3 * L + 4, dict(fake.where)
    for a, b in zip(rep.layers, ref.layers):
        assert a.jacobian_norm == pytest.approx(b.jacobian_norm, rel=1e-12)
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-12)
        assert a.chi == pytest.approx(b.chi, rel=1e-12)


def test_lanczos_layers_transfer_once_per_check_not_per_step(fake):
    L, n, B = 3, 128, 16
    net = jg.MLP.init([n] * (L + 1), activation="tanh", init="xavier_normal", seed=1)
    x = np.random.default_rng(1).standard_normal((B, n))
    ref = gradient_flow(net, x)
    fake.reset()
    rep = gradient_flow(_on(fake, net), fake.asarray(x))
    lanczos = sum(v for k, v in fake.where.items() if k.startswith("jacgrad.algebra.lanczos"))
    assert fake.transfers - lanczos == L + 4, dict(fake.where)
    # two Lanczos runs per layer (‖W‖₂, then the batch), each checking at steps 2, 4, 8, 16, 32,
    # then every 4 steps from 40: converging by step ~60 is ≤ 11 checks a run
    assert lanczos <= 2 * 11 * L, dict(fake.where)
    for a, b in zip(rep.layers, ref.layers):
        assert a.jacobian_norm == pytest.approx(b.jacobian_norm, rel=1e-6)


def test_softmax_labels_are_checked_in_one_transfer(fake):
    z = fake.asarray(np.random.default_rng(2).standard_normal((5, 3)))
    labels = fake.asarray(np.array([0, 2, 1, 1, 0]))
    fake.reset()
    losses.softmax_cross_entropy(z, labels)
    assert fake.transfers == 1, dict(fake.where)


def test_power_iteration_asks_the_device_every_few_iterations(fake):
    rng = np.random.default_rng(3)
    A = rng.standard_normal((4, 10, 10))
    Af = fake.asarray(A)
    u0 = fake.asarray(rng.standard_normal((4, 10)))
    steps = []

    def jvp(u):
        steps.append(1)
        return (Af @ u[:, :, None])[:, :, 0]

    fake.reset()
    sigma = spectra.power_spectral_norm(jvp, lambda v: (v[:, None, :] @ Af)[:, 0, :], u0, tol=1e-10, max_iter=2000)
    np.testing.assert_allclose(sigma.get(), np.linalg.svd(A, compute_uv=False)[:, 0], rtol=1e-4)
    assert len(steps) > 16 and fake.transfers - 1 <= len(steps) // 8 + 1, (len(steps), dict(fake.where))

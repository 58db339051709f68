"""``jg.torch.dp_backward`` on torch models, and ``clipped_grad`` against Opacus.

- dp_backward writes, noise off, ``Σ_i clip_C(g_i) / B`` from torch.func ``vmap(grad)`` into every
  parameter's ``.grad`` (Linear with and without bias, LayerNorm, RMSNorm, residual blocks), and
  the user's torch optimiser steps on it: the next call sees the updated parameters (copy=False).
- Its noise comes from the caller's ``torch.Generator``: reproducible, fresh across calls, std σC/B.
- Opacus 1.6 (skipped where absent): its DPOptimizer's clipped gradient with noise 0 over a
  ``GradSampleModule`` in hooks mode, and ghost clipping (``GradSampleModuleFastGradientClipping``)
  for cross-entropy, equal ours. Opacus clips with ``C / (‖g_i‖ + 1e-6)``, we with ``C / max(‖g_i‖,
  C)``: for a clipped sample the factors differ by a relative ``1e-6 / ‖g_i‖``, the tolerance below.
"""

import numpy as np
import pytest

import jacgrad as jg

torch = pytest.importorskip("torch")
nn = torch.nn

from test_private import _clipped_mean, _close, _psg  # noqa: E402 (tests/ is on sys.path)
from test_param_space import LOSSES  # noqa: E402
from jacgrad.io.interop.torch_blocks import Residual  # noqa: E402

pytestmark = pytest.mark.torch


def _model(dtype=torch.float64, seed=0, bias=False):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), Residual(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8, bias=bias),
                                                                       nn.GELU()), 0.5),
                      nn.RMSNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                mod.weight.add_(0.3 * torch.randn_like(mod.weight))
    return m.to(dtype)


def _data(loss, B=7, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, 5))
    t = {"mse": lambda: rng.standard_normal((B, 3)), "sigmoid_bce": lambda: rng.uniform(0, 1, (B, 3)),
         "softmax_cross_entropy": lambda: rng.integers(0, 3, B)}[loss]()
    return x, t


def _grads(m):
    """``.grad`` of every parameter in jacgrad's flat order (a Linear's weight transposed)."""
    return np.concatenate([(p.grad.T if p.ndim == 2 else p.grad).detach().double().reshape(-1).numpy()
                           for p in m.parameters()])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("loss", LOSSES)
def test_dp_backward_writes_the_clipped_mean_into_grad(loss, dtype):
    m = _model(dtype)
    x, t = _data(loss)
    ref_m = _model(torch.float64)
    ref_m.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    psg = _psg(ref_m, x.astype(np.float32 if dtype == torch.float32 else np.float64), t, loss, 3)
    n = np.linalg.norm(psg, axis=1)
    C = float(np.median(n))
    xt = torch.tensor(x, dtype=dtype)
    tt = torch.tensor(t) if t.dtype.kind == "i" else torch.tensor(t, dtype=dtype)
    for p in m.parameters():
        p.grad = torch.full_like(p, 7.0)  # replaced, not accumulated
    r = jg.torch.dp_backward(m, xt, tt, loss=loss, max_norm=C)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(_grads(m), _clipped_mean(psg, C)[0], tol)
    _close(r.norms, n, tol)
    assert all(p.grad.dtype == dtype and p.grad.shape == p.shape for p in m.parameters())


def test_the_users_optimiser_steps_and_the_next_call_sees_it():
    m = _model()
    x, t = _data("softmax_cross_entropy")
    xt, tt = torch.tensor(x), torch.tensor(t)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    jg.torch.dp_backward(m, xt, tt, max_norm=0.1)
    before = _grads(m)
    opt.step()
    jg.torch.dp_backward(m, xt, tt, max_norm=0.1)
    psg = _psg(m, x, t, "softmax_cross_entropy", 3)  # of the stepped model
    _close(_grads(m), _clipped_mean(psg, 0.1)[0], 1e-10)
    assert not np.allclose(_grads(m), before)


def test_dp_backward_noise_is_reproducible_fresh_and_sized():
    m = _model()
    x, t = _data("softmax_cross_entropy", B=4)
    xt, tt = torch.tensor(x), torch.tensor(t)

    def noised(gen, sigma=1.5):
        jg.torch.dp_backward(m, xt, tt, max_norm=0.2, noise_multiplier=sigma, generator=gen)
        return _grads(m)

    clean = noised(None, 0.0)
    a, b = noised(torch.Generator().manual_seed(3)), noised(torch.Generator().manual_seed(3))
    assert np.array_equal(a, b)
    g = torch.Generator().manual_seed(3)
    c, d = noised(g), noised(g)
    assert np.array_equal(c, a) and not np.array_equal(c, d)
    # ~150 coordinates: the sample std within 4.5 standard errors (~σ/√(2P)) of σC/B = 0.075
    e = np.concatenate([noised(torch.Generator().manual_seed(s)) - clean for s in range(20)])
    std = 1.5 * 0.2 / 4
    assert abs(e.mean()) < 4.5 * std / np.sqrt(e.size)
    assert abs(e.std() / std - 1) < 4.5 / np.sqrt(2 * e.size)


def test_dp_backward_bad_input():
    m = _model()
    x, t = _data("softmax_cross_entropy")
    with pytest.raises(ValueError, match="max_norm"):
        jg.torch.dp_backward(m, torch.tensor(x), torch.tensor(t), max_norm=-1.0)
    with pytest.raises(ValueError, match="dp_backward .*per-sample losses"):
        jg.torch.dp_backward(m, torch.tensor(x), torch.tensor(t), loss=nn.CrossEntropyLoss(), max_norm=1.0)
    with pytest.raises(TypeError):
        jg.torch.dp_backward(nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5)).train(), torch.tensor(x), torch.tensor(t),
                             max_norm=1.0)


# ---------------------------------------------------------------------- Opacus
def _opacus_loss(loss):
    return {"mse": nn.MSELoss(), "sigmoid_bce": nn.BCEWithLogitsLoss(), "softmax_cross_entropy": nn.CrossEntropyLoss()}[loss]


def _tol(norms, C):
    return 2e-6 / min(float(norms.min()), C) + 1e-10


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus' hooks on an input without grad
@pytest.mark.parametrize("loss", LOSSES)
def test_equals_opacus_hooks_mode(loss):
    opacus = pytest.importorskip("opacus")
    m = _model(bias=True)  # every jacgrad parameter a torch one: the flat layouts agree
    x, t = _data(loss)
    net = jg.Sequential.from_torch(m)
    n = net.per_sample_grad_norms(x, t, loss=loss)
    for C in (0.5 * n.min(), float(np.median(n)), 2 * n.max()):
        gsm = opacus.GradSampleModule(m, loss_reduction="mean")
        opt = opacus.optimizers.DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                                            max_grad_norm=C, expected_batch_size=x.shape[0])
        opt.zero_grad()
        tt = torch.tensor(t) if t.dtype.kind == "i" else torch.tensor(t)
        _opacus_loss(loss)(gsm(torch.tensor(x)), tt).backward()
        opt.pre_step()
        want = _grads(m)
        gsm._close()
        _close(net.clipped_grad(x, t, loss=loss, max_norm=C).flat, want, _tol(n, C))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_equals_opacus_ghost_clipping():
    opacus = pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    m = _model(bias=True)
    x, t = _data("softmax_cross_entropy")
    net = jg.Sequential.from_torch(m)
    n = net.per_sample_grad_norms(x, t, loss="softmax_cross_entropy")
    for C in (0.5 * n.min(), float(np.median(n)), 2 * n.max()):
        gsm = GradSampleModuleFastGradientClipping(m, max_grad_norm=C, use_ghost_clipping=True, loss_reduction="mean")
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.0), noise_multiplier=0.0,
                                              max_grad_norm=C, expected_batch_size=x.shape[0], loss_reduction="mean")
        crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="mean")
        opt.zero_grad()
        crit(gsm(torch.tensor(x)), torch.tensor(t)).backward()
        opt.pre_step()
        want = _grads(m)
        gsm._close()
        _close(net.clipped_grad(x, t, loss="softmax_cross_entropy", max_norm=C).flat, want, _tol(n, C))
    assert opacus.__version__


def test_frozen_parameters_are_neither_clipped_nor_written():
    """A frozen LayerNorm weight: the norms count only the trainable parameters (as torch.func on
    them alone), its ``.grad`` stays None."""
    m = _model()
    x, t = _data("mse")
    names = [n for n, _ in m.named_parameters()]
    m.get_submodule("2.inner.0").weight.requires_grad_(False)
    psg = _psg(m, x, t, "mse", 3)
    sizes = [p.numel() for p in m.parameters()]
    keep = np.concatenate([np.full(k, n != "2.inner.0.weight") for n, k in zip(names, sizes)])
    psg = psg[:, keep]
    C = float(np.median(np.linalg.norm(psg, axis=1)))
    r = jg.torch.dp_backward(m, torch.tensor(x), torch.tensor(t), loss="mse", max_norm=C)
    got = np.concatenate([(p.grad.T if p.ndim == 2 else p.grad).reshape(-1).numpy()
                          for p in m.parameters() if p.requires_grad])
    _close(got, _clipped_mean(psg, C)[0], 1e-10)
    _close(r.norms, np.linalg.norm(psg, axis=1), 1e-10)
    assert m.get_submodule("2.inner.0").weight.grad is None

"""Attention's softmax forward as one kernel (kernels/softmax.cu ``softmax_rows``, math in
kernels/softmax.cuh ``forward_block``) against float64: the header built for the host by g++ and nvcc
(tests/norm_host_kernels.py runs every thread of the grid on host threads, with the device's thread
partition), launched by ``jacgrad.cuda.softmax_kernels.softmax_rows`` as on CuPy; compared with a
dense float64 softmax written here and with ``attention_weights`` on NumPy; and the attention layer
calling it on device arrays (the fake CuPy), with NumPy's numbers. A ``gpu`` test runs it on a device."""

import math

import numpy as np
import pytest

from jacgrad.cuda import norm_kernels, softmax_kernels
from jacgrad.tokens.attention_factor import _softmax_rows, attention_weights

from norm_host_kernels import host_device, host_libraries  # noqa: F401 (fixtures)
from test_attention_device import _attention, _attention_run, B, T, d

EPS = {np.float32: np.finfo(np.float32).eps, np.float64: np.finfo(np.float64).eps}
SCALE = 1 / math.sqrt(8)


def reference(S, scale, causal, pad):
    """softmax(scale·S) over the live keys of each row, in float64, row by row; a row without live keys 0."""
    x = S.astype(np.float64) * np.float64(np.dtype(S.dtype).type(scale))
    tq, n = (S.shape[-2], S.shape[-1]) if S.ndim >= 2 else (1, S.shape[-1])
    dead = np.zeros(S.shape, bool)
    if causal:
        dead |= np.arange(n)[None, :] > np.arange(tq)[:, None]
    if pad is not None:
        dead |= pad.reshape(pad.shape[:1] + (1,) * (S.ndim - 2) + pad.shape[1:])
    out = np.zeros(S.shape)
    for xr, dr, o in zip(x.reshape(-1, n), dead.reshape(-1, n), out.reshape(-1, n)):
        live = ~dr & (xr > -np.inf)
        if live.any():
            e = np.exp(xr[live] - xr[live].max())
            o[live] = e / e.sum()
    return out


def check(got, S, scale, causal, pad, dtype, what):
    want = reference(S, scale, causal, pad)
    x = np.abs(S.astype(np.float64) * scale)
    tol = 64 * EPS[dtype] * (1 + np.where(np.isfinite(x), x, 0).max(axis=-1, keepdims=True))
    err = np.abs(np.asarray(got, dtype=np.float64) - want)
    assert (err <= tol).all(), f"{what}: max error {err.max():.3g} above {tol.max():.3g}"


def padding(rng, b, n):
    pad = rng.random((b, n)) < 0.3
    pad[-1] = True  # a sample whose every key is masked: its rows all 0
    return pad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_rows_matches_float64(host_device, rng, dtype, monkeypatch):
    """Rows of every width class (a lane group, a block, several packs per thread, past the
    registers: 2049 float64, 4097 and 5000 both: the streamed path), aligned and not, causal and
    key-padding masks alone and together, in place, fewer blocks than rows."""
    fake, arrays = host_device
    monkeypatch.setattr(norm_kernels, "_MAX_GRID", 3)  # fewer blocks than rows: the row loop
    for n in (1, 2, 3, 4, 5, 17, 64, 100, 257, 1027, 2049, 4097, 5000):
        S = (rng.standard_normal((2, 2, 3, n)) * 6).astype(dtype)  # (B, h, T_q, n)
        pad = padding(rng, 2, n)
        for causal, p in ((False, None), (True, None), (False, pad), (True, pad)):
            got = softmax_kernels.softmax_rows(arrays.asarray(S), SCALE, causal, None if p is None else arrays.asarray(p))
            check(got, S, SCALE, causal, p, dtype, f"n={n} causal={causal} padding={p is not None}")
        if n == 1 or n == 5000:
            continue  # the rest: the in-place and layout variants
        inplace = arrays.asarray(S)
        assert softmax_kernels.softmax_rows(inplace, SCALE, True, arrays.asarray(pad), out=inplace) is inplace
        check(inplace, S, SCALE, True, pad, dtype, f"in place n={n}")
        flat = arrays.asarray(np.zeros(S.size + 1, dtype))[1:]  # contiguous, off the 16-byte grid
        odd = flat.reshape(S.shape)
        odd[...] = S
        check(softmax_kernels.softmax_rows(odd, SCALE, True, None), S, SCALE, True, None, dtype, f"unaligned n={n}")
        strided = arrays.asarray(np.zeros(S.shape[:-1] + (n + 1,), dtype))[..., 1:]  # not contiguous: copied into
        assert softmax_kernels.softmax_rows(arrays.asarray(S), SCALE, False, None, out=strided) is strided
        check(strided, S, SCALE, False, None, dtype, f"strided out n={n}")
    assert {e for e, _, _ in fake.launches} == {f"jacgrad::softmax_rows<{'float' if dtype == np.float32 else 'double'}>"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [8, 9, 5000])
def test_softmax_rows_without_overflow_or_nan(host_device, dtype, n):
    """Rows whose exp would overflow without the max subtracted, rows with -inf scores and rows of -inf
    only: exact answers (1/3, 1/k, 0), no NaN; +inf and NaN scores give NumPy's answer (its NaNs)."""
    _, arrays = host_device
    big = np.finfo(dtype).max / 4
    S = np.zeros((6, n), dtype)
    S[0, :3] = big  # three equal huge scores win; the rest (0, -big) underflow to 0
    S[0, 3] = -big
    S[1] = -np.inf  # a row of -inf only: all 0
    S[2, :] = -np.inf  # -inf scores among live ones: those keys 0
    S[2, 1::2] = 5.0
    S[3] = big  # every score huge and equal: uniform
    S[4] = -big  # every score hugely negative and equal: uniform too (max subtracted)
    S[5, :2] = 7.0
    S[5, 2:] = -np.inf
    want = np.zeros((6, n))
    want[0, :3] = 1 / 3
    want[2, 1::2] = 1 / len(range(1, n, 2))
    want[3] = want[4] = 1 / n
    want[5, :2] = 0.5
    got = np.asarray(softmax_kernels.softmax_rows(arrays.asarray(S), 0.5, False), dtype=np.float64)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * EPS[dtype])
    np.testing.assert_allclose(got, reference(S, 0.5, False, None), rtol=0, atol=16 * EPS[dtype])
    odd = np.ones((4, n), dtype)
    odd[0, 1], odd[1, 0], odd[2, 2], odd[3, 0] = np.inf, np.nan, -np.inf, np.inf
    odd[3, 1] = np.nan
    with np.errstate(all="ignore"):
        want = _softmax_rows(odd.copy(), 0.5, False, None)
    got = np.asarray(softmax_kernels.softmax_rows(arrays.asarray(odd), 0.5, False))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=16 * EPS[dtype], atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_rows_is_attention_weights(host_device, rng, dtype):
    """The kernel and attention_weights' NumPy lines give the same P, (B, h, T, T) with a causal
    mask and padding (a sample with every key masked: zero rows, where NumPy guards its max and sum)."""
    _, arrays = host_device
    Bs, h, Ts, dh = 3, 2, 19, 8
    Q, K = (rng.standard_normal((Bs, h, Ts, dh)).astype(dtype) for _ in range(2))
    pad = padding(rng, Bs, Ts)
    S = Q @ K.swapaxes(-1, -2)  # attention_weights' own scores
    for causal, p in ((True, pad), (False, pad), (True, None), (False, None)):
        want = attention_weights(Q, K, 1 / math.sqrt(dh), causal, p)
        check(want, S, 1 / math.sqrt(dh), causal, p, dtype, "NumPy attention_weights")
        got = np.asarray(softmax_kernels.softmax_rows(arrays.asarray(S), 1 / math.sqrt(dh), causal,
                                                      None if p is None else arrays.asarray(p)))
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS[dtype])
        assert (got[-1] == 0).all() == (p is not None)


def test_softmax_rows_says_what_is_wrong(host_device, rng):
    _, arrays = host_device
    S = rng.standard_normal((2, 3, 5))
    with pytest.raises(TypeError, match="CuPy arrays"):
        softmax_kernels.softmax_rows(S, 1.0, False)
    with pytest.raises(TypeError, match="S is int64"):
        softmax_kernels.softmax_rows(arrays.asarray(np.ones((2, 5), np.int64)), 1.0, False)
    with pytest.raises(ValueError, match=r"S has shape \(5,\); a causal"):
        softmax_kernels.softmax_rows(arrays.asarray(np.ones(5)), 1.0, True)
    with pytest.raises(TypeError, match="key_padding_mask has dtype float64; needs bool"):
        softmax_kernels.softmax_rows(arrays.asarray(S), 1.0, False, arrays.asarray(np.zeros((2, 5))))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(2, 3\) but S is \(2, 3, 5\): needs \(2, 5\)"):
        softmax_kernels.softmax_rows(arrays.asarray(S), 1.0, False, arrays.asarray(np.zeros((2, 3), bool)))
    with pytest.raises(ValueError, match=r"out is \(2, 3, 5\) float32 but S is \(2, 3, 5\) float64"):
        softmax_kernels.softmax_rows(arrays.asarray(S), 1.0, False, out=arrays.asarray(S.astype(np.float32)))


def test_softmax_rows_into_out_allocates_and_syncs_nothing(host_device, rng, monkeypatch):
    """What a CUDA graph needs of it: with ``out`` given (and contiguous inputs) no allocation, no
    copy and no host read, only the launch."""
    fake, arrays = host_device
    S = arrays.asarray(rng.standard_normal((2, 2, 5, 5)))
    pad = arrays.asarray(np.zeros((2, 5), bool))
    out = arrays.asarray(np.zeros((2, 2, 5, 5)))

    def refuse(*args, **kwargs):
        raise AssertionError("allocated a device array")

    def no_copy(a, *args, **kwargs):
        assert a.flags.c_contiguous and not args and not kwargs, "copied an input"
        return a

    for name in ("empty", "empty_like", "zeros", "zeros_like", "ones", "array", "copy"):
        monkeypatch.setattr(arrays.module, name, refuse, raising=False)
    monkeypatch.setattr(arrays.module, "ascontiguousarray", no_copy, raising=False)
    arrays.reset()
    for s_, o in ((S, out), (S, S)):  # into a buffer, and in place
        assert softmax_kernels.softmax_rows(s_, 0.5, True, pad, out=o) is o
    assert arrays.transfers == 0, dict(arrays.where)
    assert len(fake.launches) == 2


def test_attention_forward_launches_the_kernel_and_matches_numpy(host_device):
    """MultiHeadAttention (causal) with a key-padding mask on device arrays: its forward's softmax is
    the host build of the kernel, one launch, and every product after it has NumPy's numbers."""
    fake, arrays = host_device
    rng = np.random.default_rng(1)
    x, g, S = rng.standard_normal((B, T, d)), rng.standard_normal((B, T, d)), rng.standard_normal((B, 2, T, d))
    mask = np.zeros((B, T), dtype=bool)
    mask[1, 3:] = True
    mask[2, :] = True  # a sample whose every key is masked: P's rows of zeros
    want = _attention_run(_attention(np.asarray), x, mask, g, S)
    got = _attention_run(_attention(arrays.asarray), *(arrays.asarray(a) for a in (x, mask, g, S)))
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-11, atol=1e-13)
    assert [e for e, _, _ in fake.launches].count("jacgrad::softmax_rows<double>") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gpu_softmax_rows_matches_float64(rng, dtype):
    import cupy as cp

    for shape in ((2, 3, 5, 5), (4, 2, 64, 64), (2, 2, 130, 1027), (1, 1, 3, 5000)):
        S = (rng.standard_normal(shape) * 6).astype(dtype)
        pad = padding(rng, shape[0], shape[-1])
        for causal, p in ((False, None), (True, pad)):
            got = softmax_kernels.softmax_rows(cp.asarray(S), SCALE, causal, None if p is None else cp.asarray(p))
            check(cp.asnumpy(got), S, SCALE, causal, p, dtype, f"{shape} causal={causal}")
        buf = cp.asarray(S)
        assert softmax_kernels.softmax_rows(buf, SCALE, True, cp.asarray(pad), out=buf) is buf
        check(cp.asnumpy(buf), S, SCALE, True, pad, dtype, f"{shape} in place")

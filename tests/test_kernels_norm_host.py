"""The normalisation kernels' math (kernels/norm.cuh) against dense float64 NumPy, without a GPU.

The header is built for the host by g++ and by nvcc (host code) into a library that runs every
block of the grid with its threads on host threads (tests/norm_host_kernels.py); the kernels are
launched through ``jacgrad.cuda.norm_kernels`` itself, on CuPy-typed fake arrays, so the dispatcher's
arguments, grid and block are the ones a GPU would get. The references are independent: the
formulas in float64, and the factor's products against its dense matrix
``diag(γ/σ)(I − 11ᵀ/n − x̂x̂ᵀ/n)`` built here. Rows cover n = 1, 2, widths that are and are not a
multiple of the 16-byte pack, aligned and unaligned bases, huge and tiny variances, a constant
row (σ² = 0: eps alone), and a grid smaller than the rows (the kernels' row loop).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from norm_host_kernels import host_device, host_libraries  # noqa: F401 (fixtures)
from jacgrad.cuda import kernels, norm_kernels

WIDTHS = [1, 2, 3, 4, 5, 8, 17, 64, 100, 257, 1027]
EPS = {np.float32: np.finfo(np.float32).eps, np.float64: np.finfo(np.float64).eps}


@pytest.fixture
def device(host_device):
    """(the kernels' fake CuPy, a function putting a NumPy array on the fake device)."""
    fake, arrays = host_device
    return fake, arrays.asarray


def rows_for(rng, B, n, kind, dtype):
    x = rng.standard_normal((B, n))
    if kind == "offset":  # a mean far above the spread: x - mean must not cancel
        x = 1e4 + x if dtype == np.float32 else 1e8 + x
    elif kind == "tiny":
        x = x * 1e-15
    elif kind == "constant":  # variance 0: σ = sqrt(eps)
        x = np.full((B, n), 3.25)
    return x.astype(dtype)


def unaligned(to_device, a):
    """``a`` on the device at an offset of one element from a 16-byte boundary (the scalar path)."""
    flat = to_device(np.zeros(a.size + 1, a.dtype))
    view = flat[1:].reshape(a.shape)
    view[...] = a
    return view


def ref_forward(x, gamma, beta, eps, centered):
    x = x.astype(np.float64)
    xc = x - x.mean(axis=1, keepdims=True) if centered else x
    inv = 1.0 / np.sqrt((xc * xc).mean(axis=1) + eps)
    xhat = xc * inv[:, None]
    return xhat * gamma + (0.0 if beta is None else beta), xhat, inv


def dense_factor(xhat, inv, gamma, centered):
    """``(B, n, n)`` ``diag(γ·inv)·P`` in float64, formed here."""
    xhat = np.atleast_2d(xhat).astype(np.float64)
    n = xhat.shape[-1]
    P = np.eye(n) - xhat[:, :, None] * xhat[:, None, :] / n - (1.0 / n if centered else 0.0)
    return (gamma.astype(np.float64) * np.reshape(inv, (-1, 1)))[:, :, None] * P


def host_of(a):
    return np.array(a.view(np.ndarray))


def assert_close(got, want, tol, what):
    got = host_of(got).astype(np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, want {want.shape}"
    err = np.abs(got - want)
    bad = err > tol  # tol: a number, or per row (broadcast)
    assert not bad.any(), f"{what}: error {err[bad].max():.3g} above its bound at {np.argwhere(bad)[0]}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("kind", ["normal", "offset", "tiny", "constant"])
def test_forward_matches_float64(device, rng, dtype, centered, kind):
    fake, to_device = device
    u = EPS[dtype]
    for n in WIDTHS:
        for place in ("aligned", "unaligned") if kind == "normal" else ("aligned",):
            x = rows_for(rng, 5, n, kind, dtype)
            gamma, beta = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
            eps = 1e-5 if kind != "tiny" else 1e-30
            put = to_device if place == "aligned" else (lambda a: unaligned(to_device, a))
            y, xhat, inv = norm_kernels.forward(put(x), to_device(gamma), to_device(beta) if centered else None,
                                                eps, centered)
            ry, rxhat, rinv = ref_forward(x, gamma, beta if centered else None, eps, centered)
            # per row: the rounding of x − mean scales with max|x|/σ (the row's conditioning)
            scale = 1.0 + np.abs(x.astype(np.float64)).max(axis=1) * rinv
            tol = (64 * u * scale * (1 + np.abs(gamma).max() + np.abs(beta).max()))[:, None]
            where = f"{dtype.__name__} n={n} {kind} {place} centered={centered}"
            assert_close(xhat, rxhat, tol, f"xhat {where}")
            assert_close(y, ry, tol, f"y {where}")
            assert_close(inv, rinv, 64 * u * scale * rinv, f"inv {where}")
    assert {e for e, _, _ in fake.launches} == {f"jacgrad::norm_forward<{'float' if dtype == np.float32 else 'double'}>"}


def factor_case(rng, B, n, dtype, centered, shared=False):
    x = rng.standard_normal((1 if shared else B, n)) * 2 + 0.5
    _, xhat, inv = ref_forward(x, np.ones(n), None, 1e-5, centered)
    if shared:
        xhat, inv = xhat[0], inv[0]
    return xhat.astype(dtype), np.asarray(inv).astype(dtype), rng.standard_normal(n).astype(dtype)


def product_tol(dtype, xhat, inv, gamma, a):
    """Rounding bound of a row product: its terms a, (Σ a·x̂/n)·x̂ and mean(a) are each at most
    max|a|·max(1, max|x̂|²) before the scaling γ·inv (they cancel: P is near 0 for n = 2)."""
    terms = np.abs(a).max() * max(1.0, float(np.abs(xhat).max()) ** 2)
    return 64 * EPS[dtype] * float(np.abs(gamma).max() * np.abs(inv).max()) * terms


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("centered", [True, False])
def test_vjp_and_jvp_match_the_dense_factor(device, rng, dtype, centered):
    fake, to_device = device
    B = 6
    for n in WIDTHS + [4099]:  # 4099: several packs per thread of a 256-thread block, and a tail
        xhat, inv, gamma = factor_case(rng, B, n, dtype, centered)
        J = dense_factor(xhat, inv, gamma, centered)
        a = rng.standard_normal((B, n)).astype(dtype)
        args = [to_device(t) for t in (xhat, gamma, inv)]
        for transpose in (False, True):
            got = norm_kernels.project(to_device(a), args[0], args[1], args[2], centered, transpose)
            want = np.einsum("bij,bj->bi", J.transpose(0, 2, 1) if transpose else J, a.astype(np.float64))
            what = f"{'vjp' if transpose else 'jvp'} n={n} {dtype.__name__}"
            assert_close(got, want, product_tol(dtype, xhat, inv, gamma, a), what)
    names = {e.split("::")[1].split("<")[0] for e, _, _ in fake.launches}
    assert names == {"norm_product"}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stacks_per_sample_and_shared(device, rng, dtype, monkeypatch):
    """(B, r, n) stacks, one (r, n) stack read by every sample, and a shared factor on any rows;
    with fewer blocks than rows (the row loop crosses samples)."""
    _, to_device = device
    monkeypatch.setattr(norm_kernels, "_MAX_GRID", 5)
    B, r = 4, 3
    for n in (1, 2, 8, 33):
        xhat, inv, gamma = factor_case(rng, B, n, dtype, True)
        J = dense_factor(xhat, inv, gamma, True)
        dev = [to_device(t) for t in (xhat, gamma, inv)]
        for a in (rng.standard_normal((B, r, n)), rng.standard_normal((r, n))):
            a = a.astype(dtype)
            for transpose in (False, True):
                M = J.transpose(0, 2, 1) if transpose else J
                want = np.einsum("bij,brj->bri", M, np.broadcast_to(a, (B, r, n)).astype(np.float64))
                got = norm_kernels.project(to_device(a), *dev, True, transpose, stack=True)
                assert_close(got, want, product_tol(dtype, xhat, inv, gamma, a), f"stack {a.shape} n={n}")
        sx, sinv, sgamma = factor_case(rng, 1, n, dtype, False, shared=True)
        Js = dense_factor(sx, sinv, sgamma, False)[0]
        a = rng.standard_normal((2, r, n)).astype(dtype)
        got = norm_kernels.project(to_device(a), to_device(sx), to_device(sgamma), to_device(sinv), False, True,
                                   stack=True)
        assert_close(got, a.astype(np.float64) @ Js, product_tol(dtype, sx, sinv, sgamma, a), f"shared stack n={n}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("centered", [True, False])
def test_backward_row_and_column_kernels(device, rng, dtype, centered, monkeypatch):
    fake, to_device = device
    monkeypatch.setattr(norm_kernels, "_MAX_GRID", 3)  # fewer blocks than rows: the kernels' row loop
    for B, n in ((1, 1), (2, 2), (40, 5), (70, 64), (33, 1027)):
        xhat, inv, gamma = factor_case(rng, B, n, dtype, centered)
        g = rng.standard_normal((B, n)).astype(dtype)
        sq0 = rng.uniform(size=B).astype(dtype)
        sq = to_device(sq0.copy())
        dgamma, dbeta = to_device(np.full(n, np.nan, dtype)), to_device(np.full(n, np.nan, dtype))
        dx = norm_kernels.backward(to_device(g), to_device(xhat), to_device(inv), to_device(gamma), centered, dgamma,
                                   dbeta if centered else None, sq, True)
        g64, x64 = g.astype(np.float64), xhat.astype(np.float64)
        J = dense_factor(xhat, inv, gamma, centered)
        tol = product_tol(dtype, xhat, inv, gamma, g)
        assert_close(dx, np.einsum("bji,bj->bi", J, g64), tol, f"dx B={B} n={n}")
        col_tol = 64 * EPS[dtype] * B * np.abs(g64).max() * max(1.0, np.abs(x64).max())
        assert_close(dgamma, (g64 * x64).sum(axis=0), col_tol, f"dgamma B={B} n={n}")
        if centered:
            assert_close(dbeta, g64.sum(axis=0), col_tol, f"dbeta B={B} n={n}")
        want_sq = sq0 + ((g64 * x64) ** 2).sum(axis=1) + ((g64 ** 2).sum(axis=1) if centered else 0.0)
        assert_close(sq, want_sq, 64 * EPS[dtype] * want_sq.max(), f"sq B={B} n={n}")
        assert norm_kernels.backward(to_device(g), to_device(xhat), to_device(inv), to_device(gamma), centered,
                                     dgamma, None, None, False) is None
        assert_close(dgamma, (g64 * x64).sum(axis=0), col_tol, f"dgamma without dx B={B} n={n}")
    # every width fits the registers: one kernel, the column sums fused (no norm_param_grads launch)
    launched = [(e.split("::")[1].split("<")[0], grid) for e, grid, _ in fake.launches]
    assert {k for k, _ in launched} == {"norm_backward"}
    assert max(grid[0] for _, grid in launched) == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_longer_than_the_registers_stream(device, rng, dtype, monkeypatch):
    """With 32 threads per row (MAX_THREADS patched), a row of more than 4 · 32 packs does not fit
    the registers (norm_kernels.row_fits): the kernels' streamed passes and the column kernel, against
    float64 NumPy; a row that fits takes the one-read path in the same launch configuration."""
    fake, to_device = device
    monkeypatch.setattr(norm_kernels, "MAX_THREADS", 32)
    V, P = 16 // np.dtype(dtype).itemsize, norm_kernels._CACHE_PACKS
    for n, fits in ((P * 32 * V, True), (P * 32 * V + 1, False), (P * 32 * V + 2 * V, False), (3000, False)):
        assert norm_kernels.row_fits(n, np.dtype(dtype).itemsize) is fits
        del fake.launches[:]
        B = 5
        x = rng.standard_normal((B, n)).astype(dtype) * 2 + 1
        gamma, beta = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
        y, xhat, inv = norm_kernels.forward(to_device(x), to_device(gamma), to_device(beta), 1e-5, True)
        ry, rxhat, rinv = ref_forward(x, gamma, beta, 1e-5, True)
        scale = 1.0 + np.abs(x.astype(np.float64)).max(axis=1) * rinv
        assert_close(y, ry, (64 * EPS[dtype] * scale * (1 + np.abs(gamma).max() + np.abs(beta).max()))[:, None],
                     f"y n={n}")
        xh, iv = host_of(xhat), host_of(inv)
        J = dense_factor(xh, iv, gamma, True)
        g = rng.standard_normal((B, n)).astype(dtype)
        tol = product_tol(dtype, xh, iv, gamma, g)
        assert_close(norm_kernels.project(to_device(g), xhat, to_device(gamma), inv, True, False),
                     np.einsum("bij,bj->bi", J, g.astype(np.float64)), tol, f"jvp n={n}")
        sq = to_device(np.zeros(B, dtype))
        dgamma, dbeta = to_device(np.full(n, np.nan, dtype)), to_device(np.full(n, np.nan, dtype))
        dx = norm_kernels.backward(to_device(g), xhat, inv, to_device(gamma), True, dgamma, dbeta, sq)
        assert_close(dx, np.einsum("bji,bj->bi", J, g.astype(np.float64)), tol, f"dx n={n}")
        g64, x64 = g.astype(np.float64), xh.astype(np.float64)
        col_tol = 64 * EPS[dtype] * B * np.abs(g64).max() * max(1.0, np.abs(x64).max())
        assert_close(dgamma, (g64 * x64).sum(axis=0), col_tol, f"dgamma n={n}")
        assert_close(dbeta, g64.sum(axis=0), col_tol, f"dbeta n={n}")
        want_sq = ((g64 * x64) ** 2).sum(axis=1) + (g64 ** 2).sum(axis=1)
        assert_close(sq, want_sq, 64 * EPS[dtype] * want_sq.max(), f"sq n={n}")
        names = [e.split("::")[1].split("<")[0] for e, _, _ in fake.launches]
        assert ("norm_param_grads" in names) is (not fits), (n, names)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_device_code_loads_16_bytes_and_has_no_64_bit_modulo(tmp_path):
    """In norm.cu's PTX for sm_90: every row kernel has 16-byte loads (float4 / double2) and no
    ``rem`` inside a loop; the only 64-bit divisions are one per row (a stacked row's sample)."""
    from test_kernels_elementwise_host import _rem_in_loops

    row_kernels = ["norm_forward", "norm_product", "norm_backward"]
    exprs = [kernels.name_expression(k, dt) for dt in ("float32", "float64") for k in row_kernels]
    body = ",\n".join(f"    (void*)&{e}" for e in exprs)
    (tmp_path / "unit.cu").write_text(f'#include "norm.cu"\nextern void* const jg[];\nvoid* const jg[] = {{\n{body}\n}};\n')
    subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", f"-I{kernels.source_dir()}", "unit.cu", "-o", "unit.ptx"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    entries = re.split(r"\.visible \.entry ", (tmp_path / "unit.ptx").read_text())[1:]
    assert len(entries) == len(exprs)
    for entry in entries:
        name = entry.split("(", 1)[0]
        wide = "ld.global.nc.v4.f32" if "IfE" in name else "ld.global.nc.v2.f64"
        assert wide in entry or wide.replace(".nc", "") in entry, f"{name}: no 16-byte load"
        assert not _rem_in_loops(entry), f"{name}: a % inside a loop: {_rem_in_loops(entry)}"
        # one per row (a stacked row's sample) in each row loop: (a block or a lane group per row) x
        # (streamed, one-read packed, one-read single; x2 with the backward's fused column sums)
        assert len(re.findall(r"\bdiv\.[su]64", entry)) <= 10, f"{name}: 64-bit divisions"


# --- the same kernels on a real GPU (marker gpu: skipped here) ------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("centered", [True, False])
def test_gpu_norm_kernels_match_float64(rng, dtype, centered):
    import cupy as cp

    tol = {np.float32: 1e-5, np.float64: 1e-12}[dtype]
    for B, n in ((3, 1), (5, 2), (7, 33), (64, 1024), (9, 1027)):
        x = (rng.standard_normal((B, n)) * 3 + 1).astype(dtype)
        gamma, beta = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
        b = beta if centered else None
        y, xhat, inv = (cp.asnumpy(t) for t in norm_kernels.forward(cp.asarray(x), cp.asarray(gamma),
                                                                    None if b is None else cp.asarray(b), 1e-5, centered))
        ry, rxhat, rinv = ref_forward(x, gamma, b, 1e-5, centered)
        np.testing.assert_allclose(y, ry, rtol=tol, atol=tol)
        np.testing.assert_allclose(xhat, rxhat, rtol=tol, atol=tol)
        np.testing.assert_allclose(inv, rinv, rtol=tol)
        J = dense_factor(xhat, inv, gamma, centered)
        a = rng.standard_normal((B, n)).astype(dtype)
        dev = [cp.asarray(t) for t in (a, xhat, gamma, inv)]
        scale = tol * max(1.0, np.abs(J).max() * n)
        np.testing.assert_allclose(cp.asnumpy(norm_kernels.project(*dev, centered, False)),
                                   np.einsum("bij,bj->bi", J, a.astype(np.float64)), rtol=tol, atol=scale)
        np.testing.assert_allclose(cp.asnumpy(norm_kernels.project(*dev, centered, True)),
                                   np.einsum("bji,bj->bi", J, a.astype(np.float64)), rtol=tol, atol=scale)
        dgamma, dbeta, sq = cp.empty(n, dtype), cp.empty(n, dtype), cp.zeros(B, dtype)
        dx = norm_kernels.backward(dev[0], dev[1], dev[3], dev[2], centered, dgamma, dbeta if centered else None, sq)
        g64, x64 = a.astype(np.float64), xhat.astype(np.float64)
        np.testing.assert_allclose(cp.asnumpy(dx), np.einsum("bji,bj->bi", J, g64), rtol=tol, atol=scale)
        np.testing.assert_allclose(cp.asnumpy(dgamma), (g64 * x64).sum(0), rtol=tol, atol=tol * B)
        if centered:
            np.testing.assert_allclose(cp.asnumpy(dbeta), g64.sum(0), rtol=tol, atol=tol * B)
        want_sq = ((g64 * x64) ** 2).sum(1) + ((g64 ** 2).sum(1) if centered else 0.0)
        np.testing.assert_allclose(cp.asnumpy(sq), want_sq, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_short_rows_share_blocks_and_loop(device, rng, dtype, monkeypatch):
    """Rows of fewer than 32 packs go to groups of 1..16 lanes, several rows per block; with the
    grid capped at 2 blocks each group loops over many rows (norm::row_group's stride)."""
    fake, to_device = device
    monkeypatch.setattr(norm_kernels, "_MAX_GRID", 2)
    B = 700
    for n in (1, 3, 8, 20, 100):
        x = rng.standard_normal((B, n)).astype(dtype) * 2 + 1
        gamma, beta = rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype)
        y, xhat, inv = norm_kernels.forward(to_device(x), to_device(gamma), to_device(beta), 1e-5, True)
        ry, rxhat, rinv = ref_forward(x, gamma, beta, 1e-5, True)
        scale = 1.0 + np.abs(x.astype(np.float64)).max(axis=1) * rinv
        assert_close(y, ry, (64 * EPS[dtype] * scale * (1 + np.abs(gamma).max() + np.abs(beta).max()))[:, None],
                     f"y n={n}")
        xh, iv = host_of(xhat), host_of(inv)
        J = dense_factor(xh, iv, gamma, True)
        g = rng.standard_normal((B, n)).astype(dtype)
        tol = product_tol(dtype, xh, iv, gamma, g)
        got = norm_kernels.project(to_device(g), xhat, to_device(gamma), inv, True, False)
        assert_close(got, np.einsum("bij,bj->bi", J, g.astype(np.float64)), tol, f"jvp n={n}")
        sq = to_device(np.zeros(B, dtype))
        dx = norm_kernels.backward(to_device(g), xhat, inv, to_device(gamma), True, to_device(np.empty(n, dtype)),
                                   to_device(np.empty(n, dtype)), sq)
        assert_close(dx, np.einsum("bji,bj->bi", J, g.astype(np.float64)), tol, f"dx n={n}")
        g64, x64 = g.astype(np.float64), xh.astype(np.float64)
        want_sq = ((g64 * x64) ** 2).sum(axis=1) + (g64 ** 2).sum(axis=1)
        assert_close(sq, want_sq, 64 * EPS[dtype] * want_sq.max(), f"sq n={n}")
    shapes = {(grid, block) for e, grid, block in fake.launches if "param_grads" not in e}
    assert ((2,), (128,)) in shapes  # short rows: 128-thread blocks, the grid capped

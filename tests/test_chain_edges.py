"""Chain at its edges: zero-width layers, mixed dtypes, and rows() given a single index."""

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.algebra.check import relative_error


def make_chain(rng, widths, B):
    """Factors and their dense per-sample matrices (built here with plain NumPy)."""
    factors, dense = [], []
    for a, b in zip(widths[:-1], widths[1:]):
        W = rng.standard_normal((a, b))
        d = rng.uniform(0.5, 1.5, size=(b,) if B is None else (B, b))
        factors.append(jg.LayerJacobian(d, W))
        dense.append(d[..., :, None] * W.T)
    return jg.Chain(factors), dense


def reference(dense):
    out = dense[0]
    for M in dense[1:]:
        out = M @ out  # matmul broadcasts over a leading batch axis; empty inner axes give zeros
    return out


ZERO_WIDTHS = [[3, 0, 2], [4, 5, 0, 0, 3], [0, 3, 2], [3, 2, 0], [3, 0], [0, 3], [2, 0, 4, 0, 2]]


@pytest.mark.parametrize("widths", ZERO_WIDTHS, ids=lambda w: "-".join(map(str, w)))
@pytest.mark.parametrize("B", [None, 3])
def test_zero_width_layers_give_shaped_zero_or_empty_results(rng, widths, B):
    C, dense = make_chain(rng, widths, B)
    ref = reference(dense)
    n = B if B is not None else 2
    n_in, n_out = widths[0], widths[-1]
    for order in jg.chain.ORDERS:
        J = C.jacobian(order)
        assert J.shape == ref.shape == ((n_out, n_in) if B is None else (B, n_out, n_in))
        assert np.array_equal(J, np.zeros_like(J)) and np.array_equal(ref, np.zeros_like(ref))
    u, v = rng.standard_normal((n, n_in)), rng.standard_normal((n, n_out))
    assert C.jvp(u).shape == (n, n_out) and not C.jvp(u).any()
    assert C.vjp(v).shape == (n, n_in) and not C.vjp(v).any()
    k = min(n_in, n_out)
    assert C.singular_values().shape == ref.shape[:-2] + (k,) and not C.singular_values().any()
    for method in ("exact", "lanczos", "power"):
        s = C.spectral_norm(method=method)
        assert np.shape(s) == ref.shape[:-2] and not np.any(s)
    assert np.shape(C.norm_bound()) == ref.shape[:-2] and not np.any(C.norm_bound())


def test_a_zero_width_interior_layer_matches_the_dense_product_beside_it(rng):
    # the Jacobian of the chain with an empty middle is exactly zero even where the factors
    # around it are not: the chain 3 -> 0 -> 2 maps everything to 0
    C, _ = make_chain(rng, [3, 0, 2], 4)
    assert C.jacobian().shape == (4, 2, 3)
    assert relative_error(C.rows(slice(1, 3)).jacobian(), np.zeros((2, 2, 3))) == 0


def test_mixed_float32_and_float64_factors_are_a_type_error_naming_them(rng):
    f64 = jg.LayerJacobian(np.ones(4), rng.standard_normal((3, 4)))
    f32 = jg.LayerJacobian(np.ones(2, np.float32), rng.standard_normal((4, 2)).astype(np.float32))
    g64 = jg.LayerJacobian(np.ones(2), rng.standard_normal((2, 2)))
    with pytest.raises(TypeError, match=r"mix dtypes \(float64: factor\(s\) 0, 2; float32: factor\(s\) 1\)"):
        jg.Chain([f64, f32, g64])
    assert jg.Chain([f64, jg.LayerJacobian(np.ones(2), rng.standard_normal((4, 2)))]).dtype == np.float64


@pytest.mark.parametrize("sel", [0, np.int64(2), np.array(1)])
def test_rows_with_a_single_index_says_to_keep_the_batch_axis(rng, sel):
    C, _ = make_chain(rng, [5, 3, 2], 4)
    with pytest.raises(TypeError, match=r"rows\(.*\): give a slice or an index array of samples, e\.g\. rows\(\[\d\]\)"):
        C.rows(sel)
    with pytest.raises(TypeError, match="rows"):
        C[0].rows(sel)


@pytest.mark.parametrize("sel", [1.5, "0", [[0, 1]], np.zeros((2, 2), dtype=int)])
def test_rows_rejects_what_is_not_a_1d_index(rng, sel):
    C, _ = make_chain(rng, [5, 3, 2], 4)
    with pytest.raises(TypeError, match="rows: sel must be a slice or a 1-D integer or boolean index array"):
        C.rows(sel)


def test_rows_accepts_slices_lists_and_masks(rng):
    C, dense = make_chain(rng, [5, 3, 2], 4)
    full = C.jacobian()
    assert relative_error(C.rows([1, 3]).jacobian(), full[[1, 3]]) == 0
    assert relative_error(C.rows(np.array([True, False, False, True])).jacobian(), full[[0, 3]]) == 0
    assert C.rows([]).batch == 0 and C.rows([]).jacobian().shape == (0, 2, 5)

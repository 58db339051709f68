"""Datasets on disk: .npy files as Dask arrays read a chunk at a time, and one-line errors for
files that are missing, truncated, or of the wrong shape or dtype."""

import pickle

import numpy as np
import pytest

import jacgrad as jg
import jacgrad.distributed as jd

da = pytest.importorskip("dask.array")


@pytest.fixture
def net():
    return jg.MLP.init([5, 6, 3], seed=0)


@pytest.fixture
def data(tmp_path):
    x = np.random.default_rng(0).standard_normal((57, 5))
    np.save(tmp_path / "X.npy", x)
    return tmp_path / "X.npy", x


def test_open_npy_reads_the_file_a_chunk_at_a_time(data):
    path, x = data
    X = jd.open_npy(path, rows=10)
    assert X.shape == (57, 5) and X.chunks == ((10,) * 5 + (7,), (5,)) and X.dtype == np.float64
    np.testing.assert_array_equal(X.compute(), x)
    np.testing.assert_array_equal(X[13:29].compute(), x[13:29])



def test_the_graph_holds_the_path_not_the_data(tmp_path):
    big = np.random.default_rng(2).standard_normal((2000, 50))  # 800 KB
    np.save(tmp_path / "big.npy", big)
    X = jd.open_npy(tmp_path / "big.npy", rows=500)
    assert len(pickle.dumps(dict(X.__dask_graph__()))) < 20_000
    np.testing.assert_array_equal(X.compute(), big)
    naive = da.from_array(np.load(tmp_path / "big.npy", mmap_mode="r"), chunks=(500, -1))
    assert len(pickle.dumps(dict(naive.__dask_graph__()))) > 800_000  # what open_npy avoids
    block = X.blocks[1].compute(scheduler="sync")
    assert type(block) is np.ndarray and block.flags.c_contiguous  # a copy, not a view of the mapped file


def test_fortran_order_and_float32_files(tmp_path):
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32))
    np.save(tmp_path / "F.npy", x)
    X = jd.open_npy(tmp_path / "F.npy", rows=7)
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X.compute(), x)


def test_big_endian_files_are_read_in_native_order(tmp_path):
    x = np.random.default_rng(3).standard_normal((9, 5))
    np.save(tmp_path / "be.npy", x.astype(">f8"))
    np.save(tmp_path / "lab.npy", np.arange(9).astype(">i4"))
    X, labels = jd.open_npy(tmp_path / "be.npy", rows=4), jd.open_npy(tmp_path / "lab.npy", rows=4, labels=True)
    assert X.dtype == np.float64 and X.dtype.isnative and labels.dtype == np.int32
    got = X.compute()
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, x)
    np.testing.assert_array_equal(labels.compute(), np.arange(9))


def test_read_dataset_checks_against_the_network_and_sizes_chunks(data, net, tmp_path):
    path, x = data
    labels = np.arange(57) % 3
    np.save(tmp_path / "labels.npy", labels)
    per = jd.budget.backward_bytes(net)
    X, T = jd.read_dataset(path, tmp_path / "labels.npy", net, max_memory=20 * per)
    assert max(X.chunks[0]) == 20 and T.chunks[0] == X.chunks[0]
    np.testing.assert_array_equal(T.compute(), labels)
    np.testing.assert_allclose(net(X).compute(), net(x), rtol=1e-13)
    X, T = jd.read_dataset(path, None, net)
    assert T is None and X.shape == (57, 5)


def _write(path, shape, dtype):
    np.save(path, np.zeros(shape, dtype=dtype))
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "missing.npy", r"missing.npy: no such file"),
    (lambda p: p, r": is a directory, not a .npy file"),
    (lambda p: (p / "t.txt").write_text("hello") and p / "t.txt", r"t.txt: not a readable .npy file"),
    (lambda p: _write(p / "i.npy", (4, 5), np.int64), r"i.npy: dtype int64, but it must be float32 or float64"),
    (lambda p: _write(p / "c.npy", (4, 5), np.complex128), r"c.npy: dtype complex128, but it must be float32"),
    (lambda p: _write(p / "o.npy", (4, 5), object), r"o.npy: holds Python objects"),
    (lambda p: _write(p / "v.npy", (20,), np.float64), r"v.npy: shape \(20,\), but it must be 2-D \(N, features\)"),
    (lambda p: _write(p / "w.npy", (4, 7), np.float64), r"w.npy: shape \(4, 7\), but the network takes 5 features: expected \(N, 5\)"),
    (lambda p: _write(p / "e.npy", (0, 5), np.float64), r"e.npy: holds no samples"),
])
def test_bad_data_files_get_one_line(tmp_path, net, make, message):
    path = make(tmp_path)
    with pytest.raises(jd.DatasetError, match=message) as info:
        jd.read_dataset(path, None, net)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_truncated_file_is_named_with_its_sizes(data, net):
    path, x = data
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])
    with pytest.raises(jd.DatasetError, match=r"X.npy: truncated: its header says shape \(57, 5\) of float64 "
                                              r"\(2280 bytes of data\) but it holds 2180"):
        jd.read_dataset(path, None, net)
    path.write_bytes(raw[:5])  # not even a header
    with pytest.raises(jd.DatasetError, match="not a readable .npy file"):
        jd.open_npy(path)


def test_bad_target_files_get_one_line(data, net, tmp_path):
    path, x = data
    for name, shape, dtype, message in [
        ("n.npy", (50, 3), np.float64, r"n.npy: 50 targets but .*X.npy has 57 samples"),
        ("w.npy", (57, 4), np.float64, r"w.npy: shape \(57, 4\), but the network has 3 outputs"),
        ("b.npy", (57,), np.bool_, r"b.npy: dtype bool, but it must be float32 or float64 \(or integer class labels"),
        ("f.npy", (57, 3, 1), np.float64, r"f.npy: shape \(57, 3, 1\), but it must be 2-D"),
    ]:
        _write(tmp_path / name, shape, dtype)
        with pytest.raises(jd.DatasetError, match=message):
            jd.read_dataset(path, tmp_path / name, net)

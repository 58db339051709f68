"""Network files are data (issue 20, round 3): a failed save keeps the old file; one suffix rule for
saving and loading; duplicate spellings of one key refused; a .pt tensor may not claim more memory
than its storage holds; .npz members are checked (names, declared sizes) before anything is
inflated; only regular files are opened (a FIFO never blocks); and every malformed file is one
ValueError naming the file, through both MLP.load and Sequential.load."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.io import netfile

L = jg.layers
LOADERS = [pytest.param(lambda p, **kw: jg.MLP.load(p, **kw), id="MLP.load"),
           pytest.param(lambda p, **kw: jg.Sequential.load(p, **kw), id="Sequential.load")]
rng = np.random.default_rng(0)


def mlp(seed=0):
    net = jg.MLP.init([4, 5, 3], activation="tanh", seed=seed, bias_std=0.3)
    return jg.MLP(net.weights, net.biases, ["tanh", "identity"])


def blocks():
    return jg.Sequential([L.Dense(rng.standard_normal((3, 4)), rng.standard_normal(4), "tanh"),
                          L.Residual([L.RMSNorm(rng.random(4) + 0.5), L.Dense(rng.standard_normal((4, 4)))], 0.5),
                          L.LayerNorm(rng.random(4), rng.random(4), eps=1e-4)])


def npy(a, header_shape=None) -> bytes:
    """``a`` as .npy bytes; ``header_shape`` replaces the shape the header declares (a lie)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    if header_shape is None:
        return buf.getvalue()
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(a.dtype), "fortran_order": False,
                                                "shape": header_shape})
    return head.getvalue() + a.tobytes()


def zip_of(path, members: dict, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def zip_bomb(path, name, shape, dtype=np.float64, others=None):
    """A deflated member ``name`` whose .npy header declares ``shape`` and whose data are zeros:
    a few hundred KiB on disk, ``prod(shape) * itemsize`` bytes inflated."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                "fortran_order": False, "shape": shape})
    left, zeros = int(np.prod(shape)) * np.dtype(dtype).itemsize, bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(name, "w") as m:
            m.write(head.getvalue())
            while left:
                m.write(zeros[:min(left, len(zeros))])
                left -= min(left, len(zeros))
        for other, data in (others or {}).items():
            z.writestr(other, data)
    return path


def st_raw(header, data=b"") -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


# ---------------------------------------------------------------------- item 3: a failed save keeps the old file
def _full_disk_after_some_bytes(monkeypatch, target, name):
    def fail(f, *args, **kwargs):
        (f if hasattr(f, "write") else open(f, "wb")).write(b"PK\x03\x04 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, name, fail)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("kind", ["MLP", "Sequential"])
def test_a_save_that_fails_partway_keeps_the_previous_file(tmp_path, monkeypatch, suffix, kind):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors")
    old, new = (mlp(0), mlp(1)) if kind == "MLP" else (blocks(), blocks())
    path = tmp_path / f"net{suffix}"
    old.save(path)
    before = path.read_bytes()
    if suffix == ".npz":
        _full_disk_after_some_bytes(monkeypatch, np, "savez")
    else:
        _full_disk_after_some_bytes(monkeypatch, netfile, "_write_safetensors")
    with pytest.raises(OSError, match="No space left"):
        new.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    monkeypatch.undo()
    x = rng.standard_normal((2, old.weights[0].shape[0] if kind == "MLP" else 3))
    np.testing.assert_array_equal(type(old).load(path)(x), old(x))


def test_a_save_replaces_the_file_a_symlink_names_and_keeps_its_mode(tmp_path):
    real = tmp_path / "real.npz"
    mlp(0).save(real)
    os.chmod(real, 0o640)
    (tmp_path / "link.npz").symlink_to(real)
    mlp(1).save(tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink() and (real.stat().st_mode & 0o777) == 0o640
    np.testing.assert_array_equal(jg.MLP.load(real).weights[0], mlp(1).weights[0])


# ---------------------------------------------------------------------- item 4: one suffix rule
@pytest.mark.parametrize("kind", ["MLP", "Sequential"])
@pytest.mark.parametrize("name", ["net.NPZ", "net.Npz", "net.SAFETENSORS", "net.SafeTensors"])
def test_suffixes_in_any_case_are_written_at_exactly_the_path(tmp_path, kind, name):
    if "afe" in name.lower():
        safe_open = pytest.importorskip("safetensors").safe_open
    make = (lambda s: mlp(s)) if kind == "MLP" else (lambda s: jg.Sequential([L.Dense(mlp(s).weights[0], mlp(s).biases[0], "tanh")]))
    first, second = make(0), make(1)
    path = tmp_path / name
    first.save(path)
    second.save(path)  # the second save replaces the first at the same path
    assert os.listdir(tmp_path) == [name]
    back = type(second).load(path)
    x = rng.standard_normal((2, 4))
    np.testing.assert_array_equal(back(x), second(x))
    if name.lower().endswith(".safetensors"):  # really a safetensors file, not an npz called so
        with safe_open(str(path), framework="np") as f:
            assert len(list(f.keys())) == (4 if kind == "MLP" else 2)
    else:
        assert zipfile.is_zipfile(path)


@pytest.mark.parametrize("kind", ["MLP", "Sequential"])
@pytest.mark.parametrize("name", ["net", "net.pt", "net.bin", "net.npz.tmp"])
def test_unknown_suffixes_are_refused_on_save_naming_the_valid_ones(tmp_path, kind, name):
    net = mlp() if kind == "MLP" else blocks()
    with pytest.raises(ValueError, match=r"unknown suffix .*writes \.npz or \.safetensors"):
        net.save(tmp_path / name)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("load", LOADERS)
def test_unknown_suffixes_are_refused_on_load(tmp_path, load):
    mlp().save(tmp_path / "net.npz")
    os.rename(tmp_path / "net.npz", tmp_path / "net.zip")  # an npz under another name: no sniffing
    with pytest.raises(ValueError, match=r"net\.zip.*unknown suffix '\.zip'; jacgrad reads \.npz, \.safetensors, \.pt, \.pth"):
        load(tmp_path / "net.zip")


# ---------------------------------------------------------------------- one loader for both network types
def test_one_loader_reads_every_layout_for_both_network_types(tmp_path):
    torch = pytest.importorskip("torch")
    net = mlp()
    net.save(tmp_path / "mlp.npz")
    x = rng.standard_normal((3, 4))
    seq = jg.Sequential.load(tmp_path / "mlp.npz")  # MLP's layout is the Dense-only case
    np.testing.assert_array_equal(seq(x), net(x))
    jg.Sequential([L.Dense(W, b, a) for W, b, a in zip(net.weights, net.biases, net.activations)]).save(tmp_path / "s.npz")
    np.testing.assert_array_equal(jg.MLP.load(tmp_path / "s.npz")(x), net(x))
    blocks().save(tmp_path / "blocks.npz")
    with pytest.raises(ValueError, match=r"blocks\.npz.*holds layernorm, residual layers.*Sequential\.load"):
        jg.MLP.load(tmp_path / "blocks.npz")
    np.savez(tmp_path / "mixed.npz", spec=np.array('[{"kind": "dense", "activation": "tanh"}]'),
             **{"0.W": np.ones((2, 3), np.float32), "0.b": np.zeros(3)})  # one dtype, as MLP.load casts
    assert jg.Sequential.load(tmp_path / "mixed.npz").dtype == jg.MLP.load(tmp_path / "mixed.npz").dtype == np.float64
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    seq = jg.Sequential.load(tmp_path / "sd.pt", activations=["tanh", "identity"])
    np.testing.assert_allclose(seq(x), model(torch.from_numpy(x)).detach().numpy(), rtol=1e-13)


def test_bfloat16_safetensors_load_with_a_dtype(tmp_path):
    torch = pytest.importorskip("torch")
    save_file = pytest.importorskip("safetensors.torch").save_file
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    save_file(model.state_dict(), str(tmp_path / "bf16.safetensors"))
    with pytest.raises(ValueError, match=r"bf16\.safetensors.*0\.weight is bfloat16.*dtype='float32'"):
        jg.MLP.load(tmp_path / "bf16.safetensors", activations="relu")
    net = jg.MLP.load(tmp_path / "bf16.safetensors", activations="relu", dtype="float32")
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().float().T.numpy())


def test_our_safetensors_writer_is_read_back_by_the_safetensors_library(tmp_path):
    safe_open = pytest.importorskip("safetensors").safe_open
    net = blocks()
    net.save(tmp_path / "b.safetensors")
    with safe_open(str(tmp_path / "b.safetensors"), framework="np") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
        assert json.loads(f.metadata()["spec"]) == [layer.spec() for layer in net.layers]
    np.testing.assert_array_equal(got["1.0.gamma"], net.layers[1].layers[0].gamma)
    np.testing.assert_array_equal(got["0.W"], net.layers[0].W)
    assert sorted(got) == ['0.W', '0.b', '1.0.gamma', '1.1.W', '1.1.b', '2.beta', '2.gamma']


# ---------------------------------------------------------------------- item 10: two spellings of one key
@pytest.mark.parametrize("load", LOADERS)
def test_two_spellings_of_one_key_are_an_error(tmp_path, load):
    W = np.ones((4, 4))
    np.savez(tmp_path / "w.npz", W0=W, W1=W, W01=2 * W, activations=np.array(["tanh"]))
    with pytest.raises(ValueError, match=r"w\.npz.*key 'W01' is not part of jacgrad's layout"):
        load(tmp_path / "w.npz")
    s = blocks()
    s.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz") as z:
        members = {k: z[k] for k in z.files}
    np.savez(tmp_path / "s2.npz", **members, **{"00.W": members["0.W"]})
    with pytest.raises(ValueError, match=r"s2\.npz.*key '00\.W' is not a parameter of any layer"):
        load(tmp_path / "s2.npz")
    torch = pytest.importorskip("torch")
    torch.save({"0.weight": torch.ones(3, 4), "00.weight": torch.zeros(3, 4)}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"t\.pt.*key '00\.weight' is not the weight or bias"):
        load(tmp_path / "t.pt", activations="relu")


# ---------------------------------------------------------------------- item 11: .pt tensors bigger than their storage
@pytest.mark.parametrize("load", LOADERS)
def test_pt_tensors_claiming_more_than_their_storage_are_refused(tmp_path, load):
    torch = pytest.importorskip("torch")
    cases = {"expanded": torch.zeros(1, dtype=torch.float64).expand(3000, 3000),  # stride 0: 72 MB from 8 bytes
             "overlapping": torch.zeros(4000, dtype=torch.float64).as_strided((3000, 1000), (1, 1))}
    for name, t in cases.items():
        torch.save({"0.weight": t}, tmp_path / f"{name}.pt")
        assert (tmp_path / f"{name}.pt").stat().st_size < 40_000
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=rf"{name}\.pt.*'0\.weight' claims shape \(3000, \d+\).*over a storage of"):
                load(tmp_path / f"{name}.pt", activations="relu")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak
    W = torch.randn(5, 3, dtype=torch.float64)  # a transposed (non-contiguous, but dense) weight loads
    torch.save({"0.weight": W.T, "0.bias": torch.zeros(3, dtype=torch.float64)}, tmp_path / "t.pt")
    x = rng.standard_normal((2, 5))
    np.testing.assert_allclose(load(tmp_path / "t.pt", activations="identity")(x), x @ W.numpy(), rtol=1e-13)


# ---------------------------------------------------------------------- item 12: names and sizes before inflating
@pytest.mark.parametrize("load", LOADERS)
def test_npz_members_are_checked_before_they_are_inflated(tmp_path, load):
    ok = {"W0.npy": npy(np.ones((3, 2))), "activations.npy": npy(np.array(["tanh"]))}
    cases = [  # (file, what the error says)
        (zip_bomb(tmp_path / "junk.npz", "junk.npy", (4096, 2048), others=ok), "member 'junk'|key 'junk'"),
        (zip_bomb(tmp_path / "w.npz", "W0.npy", (4096, 2048), others={"activations.npy": ok["activations.npy"]}),
         "member 'W0' inflates .* to 64.00 MiB: out of proportion"),
        (zip_bomb(tmp_path / "s.npz", "0.W.npy", (4096, 2048), others={"spec.npy": npy(np.array('[{"kind": "dense", "activation": "tanh"}]'))}),
         "member '0.W' inflates"),
        (zip_of(tmp_path / "lie.npz", {"W0.npy": npy(np.ones(2), header_shape=(4096, 2048)), **{"activations.npy": ok["activations.npy"]}}),
         r"member 'W0': its .npy header declares shape \(4096, 2048\) float64 \(64.00 MiB\) but the member holds 16 bytes"),
    ]
    for path, match in cases:
        assert path.stat().st_size < 1 << 20
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=rf"{path.name}.*({match})"):
                load(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, f"{path.name}: {peak / 2**20:.1f} MiB allocated for a refused file"


@pytest.mark.parametrize("load", LOADERS)
def test_an_extra_npz_member_is_refused_naming_it(tmp_path, load):
    np.savez(tmp_path / "extra.npz", W0=np.ones((3, 2)), activations=np.array(["tanh"]), notes=np.zeros(3))
    with pytest.raises(ValueError, match=r"extra\.npz.*key 'notes' is not part of jacgrad's layout"):
        load(tmp_path / "extra.npz")


def test_savez_compressed_files_of_real_weights_still_load(tmp_path):
    net = mlp()
    np.savez_compressed(tmp_path / "c.npz", W0=net.weights[0], b0=np.zeros(5), W1=net.weights[1], b1=net.biases[1],
                        activations=np.array(net.activations))
    back = jg.MLP.load(tmp_path / "c.npz")
    np.testing.assert_array_equal(back.weights[1], net.weights[1])
    np.testing.assert_array_equal(back.biases[0], np.zeros(5))


# ---------------------------------------------------------------------- item 13: regular files only
FIFO_SCRIPT = """
import os, sys
import jacgrad as jg
for path in sys.argv[1:]:
    for load in (jg.MLP.load, jg.Sequential.load):
        try:
            load(path, activations="relu")
        except ValueError as exc:
            print(os.path.basename(path), "FIFO" in str(exc) and path in str(exc), flush=True)
"""


def test_a_fifo_or_a_symlink_to_one_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("os.mkfifo is not available on this platform")
    paths = []
    for suffix in (".npz", ".safetensors", ".pt"):
        fifo = tmp_path / f"fifo{suffix}"
        os.mkfifo(fifo)
        link = tmp_path / f"link{suffix}"
        link.symlink_to(fifo)
        paths += [str(fifo), str(link)]
    env = {**os.environ, "PYTHONPATH": str(Path(jg.__file__).resolve().parents[1])}
    try:
        done = subprocess.run([sys.executable, "-c", FIFO_SCRIPT, *paths], capture_output=True, text=True,
                              timeout=120, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a FIFO blocked (the child was killed after 120 s)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [w for p in paths for w in (Path(p).name, "True") * 2]


@pytest.mark.parametrize("load", LOADERS)
def test_a_directory_is_refused(tmp_path, load):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match=r"d\.npz' is a directory"):
        load(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- item 14: every malformed file is one ValueError
def _spec(text):
    return {"spec.npy": npy(np.array(text)), "0.W.npy": npy(np.ones((3, 3))), "0.b.npy": npy(np.zeros(3))}


def _deep(n):
    return "[" * n + "]" * n


def _malformed(tmp_path):
    """(file name, bytes or writer, activations=, a fragment of the expected message)."""
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.npz"
    mlp().save(good)
    data = good.read_bytes()
    junk = np.random.default_rng(1).bytes(512)
    W = npy(np.ones((3, 2)))
    acts = npy(np.array(["tanh"]))
    meta = {"__metadata__": {"format": "jacgrad", "activations": '["tanh"]'},
            "W0": {"dtype": "F64", "shape": [3, 2], "data_offsets": [0, 48]}}

    def pt(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    Sub = globals().setdefault("SubTensor", type("SubTensor", (torch.Tensor,), {}))  # picklable by name

    return [
        ("empty.npz", b"", None, "not an .npz archive"),
        ("empty.safetensors", b"", None, "not a .safetensors file"),
        ("empty.pt", b"", "relu", "weights_only"),
        ("random.npz", junk, None, "not an .npz archive"),
        ("random.safetensors", junk, None, "header length"),
        ("random.pt", junk, "relu", "weights_only"),
        ("truncated.npz", data[: len(data) // 2], None, "not an .npz archive"),
        ("notnpz.npz", lambda p: zip_of(p, {"readme.txt": b"hello"}), None, "member 'readme.txt' is not an .npy array"),
        ("object.npz", lambda p: zip_of(p, {"W0.npy": npy(np.array([None, 1], dtype=object)), "activations.npy": acts}), None,
         "object arrays never load"),
        ("ndim.npz", lambda p: np.savez(p, W0=np.ones((3, 2, 1)), activations=np.array(["tanh"])), None, "must be 2-D"),
        ("shapes.npz", lambda p: np.savez(p, W0=np.ones((3, 2)), W1=np.ones((3, 2)), activations=np.array(["tanh"])), None,
         r"layer 1: W1 has shape \(3, 2\) but layer 0 outputs 2 features"),
        ("names.npz", lambda p: np.savez(p, W0=np.ones((3, 2)), w1=np.ones((2, 2)), activations=np.array(["tanh"])), None,
         "key 'w1' is not part of jacgrad's layout"),
        ("now0.npz", lambda p: np.savez(p, weights=np.ones((3, 2)), activations=np.array(["tanh"])), None,
         r"no array W0 \(found: 'weights'\)"),
        ("dup.npz", lambda p: zip_of(p, {"W0.npy": W, "activations.npy": acts, "X0.npy": W}) and
         p.write_bytes(p.read_bytes().replace(b"X0.npy", b"W0.npy")), None, "member 'W0.npy' twice"),
        ("badlen.safetensors", (10**12).to_bytes(8, "little") + b"{}", None, "header length 1,000,000,000,000"),
        ("notjson.safetensors", st_raw(b"{not json"), None, "header is not JSON"),
        ("list.safetensors", st_raw(b"[1, 2]"), None, "header is a JSON list"),
        ("offsets.safetensors", st_raw({**meta, "W0": {**meta["W0"], "data_offsets": [0, 4800]}}, bytes(48)), None,
         "needs 48 bytes but its data_offsets"),
        ("deep.safetensors", st_raw({**meta, "__metadata__": {"format": "jacgrad", "activations": _deep(100_000)}}, bytes(48)),
         None, "metadata 'activations' is not a JSON list"),
        ("huge.safetensors", st_raw({**meta, "__metadata__": {"format": "jacgrad", "activations": json.dumps(["x" * 5_000_000])}},
                                    bytes(48)), None, "'xxxxx.*… \\(5,000,000 characters\\) is not an activation name"),
        ("deepspec.npz", lambda p: zip_of(p, _spec(_deep(100_000))), None, "'spec' is not a JSON list"),
        ("nested.npz", lambda p: zip_of(p, _spec(json.dumps([{"kind": "dense", "activation": "tanh"}] + [
            json.loads('{"kind": "residual", "scale": 1.0, "layers": [' * 40 + '{"kind": "dense", "activation": "tanh"}'
                       + "]}" * 40)]))), None, "nested more than 32 deep"),
        ("specdict.npz", lambda p: zip_of(p, _spec('{"kind": "dense"}')), None, "not a non-empty JSON list"),
        ("fields.npz", lambda p: zip_of(p, _spec('[{"kind": "dense"}]')), None, r"layer 0 \(dense\): fields 'kind'"),
        ("kind.npz", lambda p: zip_of(p, _spec('[{"kind": "' + "conv" * 1000 + '"}]')), None,
         "unknown layer kind 'convconv.*… \\(4,000 characters\\)"),
        ("eps.npz", lambda p: zip_of(p, {"spec.npy": npy(np.array('[{"kind": "layernorm", "eps": -1}]')),
                                         "0.gamma.npy": npy(np.ones(3)), "0.beta.npy": npy(np.zeros(3))}), None,
         "layer 0: LayerNorm: eps must be finite and > 0|holds layernorm layers; MLP holds dense layers only"),
        ("missing.npz", lambda p: zip_of(p, {k: v for k, v in _spec('[{"kind": "dense", "activation": "tanh"}]').items()
                                             if k != "0.b.npy"}), None, r"layer 0 \(dense\): array '0\.b' is missing"),
        ("nontensor.pt", pt(5), "relu", "holds a int, not a state dict"),
        ("strings.pt", pt({"0.weight": "a string"}), "relu", "holds a str at '0.weight'"),
        ("subclass.pt", pt({"0.weight": torch.ones(2, 2).as_subclass(Sub)}), "relu", "weights_only"),
        ("sparse.pt", pt({"0.weight": torch.eye(3).to_sparse()}), "relu", "weights_only|not a plain strided"),
        ("complex.pt", pt({"0.weight": torch.ones(2, 2, dtype=torch.complex64)}), "relu", "not floating point"),
    ]


def test_malformed_files_are_one_value_error_naming_the_file_in_both_loaders(tmp_path):
    cases = _malformed(tmp_path)
    assert len(cases) >= 20
    for name, content, acts, match in cases:
        path = tmp_path / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)
        for load in (jg.MLP.load, jg.Sequential.load):
            with pytest.raises(ValueError) as info:  # any other exception type fails the test
                load(path, activations=acts)
            msg = str(info.value)
            assert str(path) in msg, (name, load, msg)
            assert re.search(match, msg), (name, load, msg)
            assert len(msg) < 600, (name, load, len(msg))  # what the file says is echoed clipped


def _valid_files(tmp_path):
    torch = pytest.importorskip("torch")
    mlp().save(tmp_path / "m.npz")
    mlp().save(tmp_path / "m.safetensors")
    blocks().save(tmp_path / "s.npz")
    blocks().save(tmp_path / "s.safetensors")
    net = mlp()
    np.savez_compressed(tmp_path / "c.npz", W0=net.weights[0], b0=net.biases[0], W1=net.weights[1], b1=net.biases[1],
                        activations=np.array(net.activations))
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    torch.save(model.state_dict(), tmp_path / "t.pt")
    return ["m.npz", "m.safetensors", "s.npz", "s.safetensors", "c.npz", "t.pt"]


def test_corrupted_files_load_or_raise_value_error_and_nothing_else(tmp_path):
    """Every file above, with bytes overwritten or cut at seeded random places: each load either
    gives a network or raises ValueError naming the file, never another exception."""
    fuzz = np.random.default_rng(20)
    for name in _valid_files(tmp_path):
        data = (tmp_path / name).read_bytes()
        bad = tmp_path / f"bad{Path(name).suffix}"
        for trial in range(60):
            mutated = bytearray(data)
            if trial % 4 == 0:
                mutated = mutated[: int(fuzz.integers(0, len(data)))]
            else:
                for i in fuzz.integers(0, len(data), size=int(fuzz.integers(1, 4))):
                    mutated[i] = int(fuzz.integers(0, 256))
            bad.write_bytes(bytes(mutated))
            for load in (jg.MLP.load, jg.Sequential.load):
                try:
                    load(bad, activations="relu" if name.endswith(".pt") else None)
                except ValueError as exc:
                    assert str(bad) in str(exc) and len(str(exc)) < 600, (name, trial, str(exc))

"""Network files: .npz and .safetensors round trips, torch nn.Sequential state dicts in
.safetensors and .pt (read with weights_only=True: a hostile pickle runs nothing), and one clear
error naming the file and the key for truncated, malformed, incomplete or overfull files."""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.io import netfile

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file as save_torch_tensors  # noqa: E402

nn = torch.nn
ACTS = ["leaky_relu(negative_slope=0.2)", "hard_tanh(min_val=-2.0,max_val=2.0)", "identity"]


def small_net(dtype="float64"):
    net = jg.MLP.init([4, 5, 3, 2], activation="tanh", seed=0, bias_std=0.3, dtype=dtype)
    return jg.MLP(net.weights, net.biases, ACTS)


def torch_model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3, bias=False), nn.Tanh(), nn.Linear(3, 2)).to(dtype)


def assert_same(a, b):
    assert a.activations == b.activations and a.dtype == b.dtype
    for W, W2, c, c2 in zip(a.weights, b.weights, a.biases, b.biases):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(c, c2)


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_round_trip(tmp_path, suffix, dtype):
    net = small_net(dtype)
    path = tmp_path / f"net{suffix}"
    net.save(path)
    assert_same(jg.MLP.load(path), net)
    assert jg.MLP.load(path, dtype="float64").dtype == np.float64


def test_safetensors_layout_is_jacgrads(tmp_path):
    small_net().save(tmp_path / "net.safetensors")
    with safe_open(str(tmp_path / "net.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == ["W0", "W1", "W2", "b0", "b1", "b2"]
        meta = f.metadata()
    assert meta["format"] == "jacgrad" and json.loads(meta["activations"]) == ACTS


def test_torch_state_dicts_in_safetensors_and_pt(tmp_path):
    model = torch_model()  # its middle Linear has no bias: a bias-free Dense (tests/test_load_bias_free.py)
    expected = jg.Sequential.from_torch(model)
    save_torch_tensors(model.state_dict(), str(tmp_path / "sd.safetensors"))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    names = ["relu", "tanh", "identity"]
    for path in (tmp_path / "sd.safetensors", tmp_path / "sd.pt"):
        net = jg.Sequential.load(path, activations=names)
        assert repr(net) == repr(expected)
        assert net.n_params == sum(p.numel() for p in model.parameters())
        for L, E in zip(net.layers, expected.layers):
            assert L.names == E.names and all(np.array_equal(a, b) for a, b in zip(L.params, E.params))
        x = torch.randn(3, 4, dtype=torch.float64)
        np.testing.assert_allclose(net(x), model(x).detach().numpy(), rtol=1e-12)
        with pytest.raises(ValueError, match=f"{path.name}.*carries no activations; pass activations="):
            jg.MLP.load(path)
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 2)).double()
    torch.save(nested.state_dict(), tmp_path / "nested.pth")  # keys 0.0.weight, 1.weight
    assert_same(jg.MLP.load(tmp_path / "nested.pth", activations=["relu", "identity"]), jg.MLP.from_torch(nested))


def test_pt_is_read_with_weights_only_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Hostile:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"0.weight": Hostile()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"evil\.pt.*weights_only=True"):
        jg.MLP.load(tmp_path / "evil.pt", activations="relu")
    assert not marker.exists()
    torch.save(torch_model(), tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"module\.pt.*weights_only=True"):
        jg.MLP.load(tmp_path / "module.pt", activations="relu")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        jg.MLP.load(tmp_path / "list.pt", activations="relu")


def test_half_precision_files_need_a_dtype(tmp_path):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).to(torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "bf16.pt")
    with pytest.raises(ValueError, match=r"bf16\.pt.*0\.weight is bfloat16.*dtype='float32'"):
        jg.MLP.load(tmp_path / "bf16.pt", activations="relu")
    net = jg.MLP.load(tmp_path / "bf16.pt", activations="relu", dtype="float32")
    np.testing.assert_array_equal(net.weights[0], model[0].weight.detach().float().T.numpy())
    np.savez(tmp_path / "f16.npz", W0=np.ones((3, 2), np.float16), b0=np.ones(2, np.float16), activations=np.array(["tanh"]))
    with pytest.raises(ValueError, match="W0 is float16"):
        jg.MLP.load(tmp_path / "f16.npz")
    assert jg.MLP.load(tmp_path / "f16.npz", dtype="float32").dtype == np.float32


def write(path, tensors, metadata=None):
    safetensors_numpy.save_file(tensors, str(path), metadata=metadata)
    return path


W = np.ones((3, 2))


@pytest.mark.parametrize(
    "tensors, metadata, match",
    [
        ({"W0": W, "W2": W}, {"format": "jacgrad", "activations": '["tanh"]'}, "W2 present but W1 is missing"),
        ({"W0": W, "extra": W}, {"format": "jacgrad", "activations": '["tanh"]'}, "key 'extra' is not part of jacgrad's layout"),
        ({"W0": W}, {"format": "jacgrad", "activations": "tanh"}, "not a JSON list"),
        ({"W0": W}, {"format": "jacgrad", "activations": '["swish"]'}, "unknown activation 'swish'"),
        ({"W0": W}, {"format": "jacgrad", "activations": '["tanh", "tanh"]'}, "2 activations for 1 layers"),
        ({"W0": W, "b0": np.ones(3)}, {"format": "jacgrad", "activations": '["tanh"]'}, r"b0 has shape \(3,\) but W0 has 2"),
        ({"0.weight": W.T, "0.bias": np.ones(3), "1.running_mean": np.ones(3)}, None, "key '1.running_mean' is not"),
        ({"0.weight": W.T, "2.bias": np.ones(2)}, None, "key '2.bias' has no matching '2.weight'"),
        ({"fc1.weight": W.T}, None, "key 'fc1.weight' is not the weight or bias of a Linear at a numeric module path"),
        ({"0.weight": np.ones((2, 3, 1))}, None, r"key '0.weight' has shape \(2, 3, 1\)"),
        ({"0.weight": np.ones((2, 3)), "1.weight": np.ones((2, 4))}, None, r"layer 1: 1.weight has shape \(4, 2\)"),
        ({"W0": np.ones((3, 2), np.int32)}, {"format": "jacgrad", "activations": '["tanh"]'}, "W0 has dtype int32"),
    ],
)
def test_malformed_safetensors_name_the_file_and_key(tmp_path, tensors, metadata, match):
    path = write(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*" + match):
        jg.MLP.load(path, activations=None if metadata else "tanh")


def test_truncated_and_garbage_files(tmp_path):
    path = tmp_path / "net.safetensors"
    small_net().save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    for name in ("cut.safetensors", "junk.safetensors"):
        with pytest.raises(ValueError, match=f"{name}.*not a readable .safetensors file"):
            jg.MLP.load(tmp_path / name)
    with pytest.raises(ValueError, match=r"junk\.pt.*weights_only"):
        jg.MLP.load(tmp_path / "junk.pt", activations="relu")
    (tmp_path / "net.h5").write_bytes(b"\x89HDF")
    with pytest.raises(ValueError, match=r"unknown suffix '.h5'; jacgrad reads .npz, .safetensors, .pt, .pth"):
        jg.MLP.load(tmp_path / "net.h5")
    with pytest.raises(ValueError, match="writes .npz or .safetensors"):
        small_net().save(tmp_path / "net.pt")


def test_complex_biases_are_refused_not_truncated(tmp_path):
    np.savez(tmp_path / "c.npz", W0=W, b0=np.array([1 + 2j, 0j]), activations=np.array(["tanh"]))
    with pytest.raises(ValueError, match=r"c\.npz.*b0 has dtype complex128, not floating point"):
        jg.MLP.load(tmp_path / "c.npz")


def test_activations_given_twice_or_for_npz_without_them(tmp_path):
    small_net().save(tmp_path / "net.npz")
    with pytest.raises(ValueError, match="carries its own 'activations'"):
        jg.MLP.load(tmp_path / "net.npz", activations="relu")
    np.savez(tmp_path / "bare.npz", W0=W, b0=np.zeros(W.shape[1]))
    assert jg.MLP.load(tmp_path / "bare.npz", activations="elu(alpha=0.5)").activations == ["elu(alpha=0.5)"]


def test_netfile_does_not_import_the_network_classes():
    tree = ast.parse(Path(netfile.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "mlp" not in imported and not any(m and m.endswith(".mlp") for m in imported)
    from jacgrad.examples import TINY_MLP
    from jacgrad.io.interop import NetSpec

    assert isinstance(netfile.load(TINY_MLP), NetSpec)


def test_npz_members_without_an_npy_header(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "raw.npz", "w") as z:
        z.writestr("W0.npy", b"not an npy array")
        z.writestr("activations.npy", b"nor this")
    with pytest.raises(ValueError, match=r"raw\.npz.*member 'W0' is not a valid .npy array"):
        jg.MLP.load(tmp_path / "raw.npz")

"""`jacgrad report/check --weights` read every format `MLP.load` reads; a state dict carries no
activations, so `--activation` names them, and the report is the one of the network built in
Python from the same module."""

import json

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cli.main import main

torch = pytest.importorskip("torch")


def _sequential_state_dict(path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3)).double()
    if path.suffix == ".safetensors":
        save_file = pytest.importorskip("safetensors.torch").save_file
        save_file(model.state_dict(), str(path))
    else:
        torch.save(model.state_dict(), path)
    return model


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_report_reads_a_state_dict_with_activation_names(capsys, tmp_path, suffix):
    path = tmp_path / f"net{suffix}"
    model = _sequential_state_dict(path)
    out = tmp_path / "r.json"
    assert main(["report", "--weights", str(path), "--activation", "relu,identity", "--json", str(out),
                 "--batch", "8"]) == 0
    rep = json.loads(out.read_text())["reports"][0]
    # the same network imported from the live module: the file held the same numbers
    ref = jg.MLP.from_torch(model)
    assert [layer["weight_spectral_norm"] for layer in rep["layers"]] == pytest.approx(
        [float(np.linalg.norm(W, 2)) for W in ref.weights], rel=1e-12)
    assert rep["activations"] == ["relu", "identity"]


def test_state_dict_without_activation_names_is_one_line(capsys, tmp_path):
    path = tmp_path / "net.pt"
    _sequential_state_dict(path)
    assert main(["report", "--weights", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--weights" in err[0] and "activations" in err[0]


def test_check_reads_a_state_dict(capsys, tmp_path):
    path = tmp_path / "net.safetensors"
    _sequential_state_dict(path)
    assert main(["check", "--weights", str(path), "--activation", "relu,identity", "--device", "cpu"]) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_parameterised_activation_on_the_command_line(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["report", "--sizes", "6,8,8,2", "--activation", "leaky_relu(negative_slope=0.2),elu(alpha=0.5)",
                 "--json", str(out), "--batch", "4"]) == 0
    rep = json.loads(out.read_text())["reports"][0]
    assert rep["activations"] == ["leaky_relu(negative_slope=0.2)", "elu(alpha=0.5)", "identity"]

"""``jacgrad report --residual K [--residual-scale S] [--norm ...]`` and the cure row of the
default report: the block net is checked against an independent rebuild from the same dense
weights (dense float64 per-block Jacobians), and bad options are one line, exit 2."""

import json
import math

import numpy as np
import pytest

import jacgrad as jg
from jacgrad.cli.common import block_net
from jacgrad.cli.main import main

SMALL = ["--depth", "6", "--width", "10", "--batch", "5"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _usage_error(capsys, *argv, match):
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and "error:" in lines[0], err
    assert match in lines[0], lines[0]


def test_residual_report_has_block_rows_over_the_same_dense_weights(capsys):
    code, out, err = run(capsys, "report", *SMALL, "--activation", "tanh", "--residual", "2", "--residual-scale",
                         "0.5", "--norm", "rmsnorm", "--json", "-")
    assert code == 0, err
    (rep,) = json.loads(out)["reports"]
    # 5 hidden 10x10 layers: two blocks of 2, one plain hidden layer left over, the output layer
    kinds = [b["kind"] for b in rep["blocks"]]
    assert kinds == ["residual", "residual", "dense", "dense"]
    assert [b["inner"] for b in rep["blocks"][:2]] == [["rmsnorm", "dense:tanh", "dense:tanh"]] * 2
    assert all(b["scale"] == 0.5 for b in rep["blocks"][:2]) and rep["has_residual"] and rep["norms"] == ["rmsnorm"]
    assert "+ residual every 2 (s=0.5) + rmsnorm" in rep["label"] and "x+0.5·[rmsnorm,tanh×2]" in err
    # the same random MLP (seed 0) and inputs, and a block's χ from its formula: I + s·J2·J1·J_rms
    mlp = jg.MLP.init([10] * 7, activation="tanh", init="xavier_normal", seed=0)
    x = np.random.default_rng([0, 1]).standard_normal((5, 10))
    W, b = mlp.weights, mlp.biases
    r = np.sqrt((x * x).mean(axis=1, keepdims=True) + 1e-6)
    xh = x / r
    J_rms = (1 / r)[:, :, None] * (np.eye(10)[None] - xh[:, :, None] * xh[:, None, :] / 10)
    h1 = xh @ W[0] + b[0]
    h2 = np.tanh(h1) @ W[1] + b[1]
    J1 = (1 - np.tanh(h1) ** 2)[:, :, None] * W[0].T[None]
    J2 = (1 - np.tanh(h2) ** 2)[:, :, None] * W[1].T[None]
    J = np.eye(10)[None] + 0.5 * J2 @ J1 @ J_rms
    assert rep["blocks"][0]["chi"] == pytest.approx(float((J ** 2).sum(axis=(1, 2)).mean() / 10), rel=1e-9)
    assert rep["blocks"][0]["jacobian_norm"] == pytest.approx(float(np.linalg.norm(J, 2, axis=(1, 2)).mean()), rel=1e-8)


def test_block_net_keeps_the_mlp_function():
    mlp = jg.MLP.init([4, 6, 6, 6, 6, 3], activation="sigmoid", seed=2)
    net = block_net(mlp, 3)  # widths 4->6 plain, then 3 of the 6x6 layers in a block, the output plain
    assert [L.kind for L in net.layers] == ["dense", "residual", "dense"]
    x = np.random.default_rng(0).standard_normal((3, 4))
    # the block adds its input to the dense stack's output: z + f(z)
    h = 1 / (1 + np.exp(-(x @ mlp.weights[0] + mlp.biases[0])))
    f = h
    for j in (1, 2, 3):
        f = 1 / (1 + np.exp(-(f @ mlp.weights[j] + mlp.biases[j])))
    np.testing.assert_allclose(net(x), (h + f) @ mlp.weights[4] + mlp.biases[4], rtol=1e-12)


def test_default_report_shows_the_cure_beside_the_disease(capsys):
    code, out, err = run(capsys, "report", "--depth", "8", "--width", "16", "--batch", "8", "--json", "-")
    assert code == 0, err
    reports = json.loads(out)["reports"]
    assert [r["label"] for r in reports] == ["sigmoid, xavier_normal", "tanh, xavier_normal", "relu, he_normal",
                                             "sigmoid, xavier_normal + residual every 2 + layernorm"]
    cure = reports[3]
    assert cure["has_residual"] and cure["norms"] == ["layernorm"]
    # its verdict is the rule applied to its own χ, whatever it shows
    log_gamma = sum(math.log(c) for c in cure["chi"])
    want = "vanishing" if log_gamma < -math.log(100) else "exploding" if log_gamma > math.log(100) else "healthy"
    assert cure["verdict"] == want
    assert err.count("verdict:") == 4 and "+ residual every 2 + layernorm" in err.split("summary")[1]


@pytest.mark.parametrize("argv,match", [
    (["--residual", "0"], "--residual must be at least 1, got 0"),
    (["--residual", "2", "--norm", "batchnorm"], "unknown norm 'batchnorm'; valid names: layernorm, rmsnorm"),
    (["--norm", "layernorm"], "--norm needs --residual"),
    (["--residual-scale", "0.5"], "--residual-scale needs --residual"),
    (["--residual", "2", "--residual-scale", "inf"], "--residual-scale must be a finite number"),
])
def test_bad_block_options_are_one_line_exit_2(capsys, argv, match):
    _usage_error(capsys, "report", *SMALL, *argv, match=match)


def test_residual_with_weights_is_one_line_exit_2(capsys, tmp_path):
    path = tmp_path / "net.npz"
    jg.MLP.init([4, 5, 3], seed=0).save(path)
    _usage_error(capsys, "report", "--weights", str(path), "--residual", "2",
                 match="--residual cannot be combined with --weights")

"""Store today's MLP outputs, bitwise, in ``tests/data/mlp_reference.npz``.

Run once on the code whose results are the reference (``PYTHONPATH=. python
tools/store_mlp_reference.py``); ``tests/test_mlp_bitwise.py`` recomputes every entry with
``compute()`` and asserts ``np.array_equal``. The networks: float32 and float64, plain and
parameterised activations, widths including 1.
"""

from __future__ import annotations

import os
import sys

import numpy as np

PATH = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "mlp_reference.npz")

# (name, sizes, hidden activation(s), output activation, init, dtype)
NETS = [
    ("tanh64", [5, 7, 3], "tanh", "identity", "xavier_normal", "float64"),
    ("leaky32", [4, 6, 1, 3], ["leaky_relu(negative_slope=0.2)", "elu(alpha=0.5)"], "identity", "he_normal", "float32"),
    ("gelu64", [3, 1, 4, 2], ["gelu", "softplus(beta=2.0)"], "sigmoid", "xavier_uniform", "float64"),
    ("relu32", [6, 8, 5, 4], ["relu", "silu"], "identity", "xavier_normal", "float32"),
    ("width1", [1, 1, 1], "sigmoid", "identity", "xavier_normal", "float64"),
]
LOSSES = ["mse", "sigmoid_bce", "softmax_cross_entropy"]
B = 5


def _targets(rng, n_out: int, dtype) -> dict:
    probs = rng.random((B, n_out))
    return {
        "mse": rng.standard_normal((B, n_out)).astype(dtype),
        "sigmoid_bce": (rng.random((B, n_out)) > 0.5).astype(dtype),
        "softmax_cross_entropy": (probs / probs.sum(1, keepdims=True)).astype(dtype),
    }


def _grads(out: dict, key: str, g) -> None:
    for j, (W, b) in enumerate(zip(g.weights, g.biases)):
        out[f"{key}/dW{j}"], out[f"{key}/db{j}"] = np.asarray(W).copy(), np.asarray(b).copy()
    if g.flat is not None:
        out[f"{key}/flat"] = np.asarray(g.flat).copy()
    if g.input is not None:
        out[f"{key}/input"] = np.asarray(g.input).copy()
    for j, d in enumerate(g.deltas or []):
        out[f"{key}/delta{j}"] = np.asarray(d).copy()


def compute() -> dict:
    """Every reference array, by name ``net/quantity``."""
    import jacgrad as jg

    out: dict = {}
    for name, sizes, act, out_act, init, dt in NETS:
        net = jg.MLP.init(sizes, activation=act, output_activation=out_act, init=init, bias_std=0.1, seed=3, dtype=dt)
        rng = np.random.default_rng(11)
        x = rng.standard_normal((B, sizes[0])).astype(dt)
        x2 = rng.standard_normal((3, sizes[0])).astype(dt)
        ts = _targets(rng, sizes[-1], dt)
        k = name
        for j, (W, b) in enumerate(zip(net.weights, net.biases)):
            out[f"{k}/W{j}"], out[f"{k}/b{j}"] = W.copy(), b.copy()
        y, cache = net.forward(x)
        out[f"{k}/forward"] = y.copy()
        gy = rng.standard_normal(y.shape).astype(dt)
        _grads(out, f"{k}/backward", net.backward(cache, gy))
        out[f"{k}/jacobian"] = net.jacobian_chain(cache).jacobian().copy()
        out[f"{k}/ntk"] = np.asarray(jg.ntk(net, x, x2)).copy()
        out[f"{k}/ntk_self"] = np.asarray(jg.ntk(net, x)).copy()
        P = sum(W.size + b.size for W, b in zip(net.weights, net.biases))
        v = rng.standard_normal(P).astype(dt)
        for loss in LOSSES:
            t = ts[loss]
            lk = f"{k}/{loss}"
            L, g = net.loss_and_grads(x, t, loss=loss)
            out[f"{lk}/loss"] = np.asarray(L).copy()
            _grads(out, f"{lk}/lag", g)
            _grads(out, f"{lk}/psg", net.per_sample_grads(x, t, loss=loss))
            out[f"{lk}/psn"] = np.asarray(net.per_sample_grad_norms(x, t, loss=loss)).copy()
            out[f"{lk}/psn_layers"] = np.asarray(net.per_sample_grad_norms(x, t, loss=loss, per_layer=True)).copy()
            out[f"{lk}/ggn_vp"] = np.asarray(net.ggn_vp(x, v, t, loss=loss)).copy()
            _grads(out, f"{lk}/ggn_diag", net.ggn_diagonal(x, t, loss=loss))
            r = net.clipped_grad(x, t, loss=loss, max_norm=0.05, noise_multiplier=0.7, seed=5)
            _grads(out, f"{lk}/clip", r.grads)
            out[f"{lk}/clip_norms"] = np.asarray(r.norms).copy()
            out[f"{lk}/clip_frac"] = np.asarray(r.clipped_fraction).copy()
            step = net.compile(B, loss=loss, input_grad=True)
            for rep in range(2):  # the second call reuses the buffers
                Ls, gs = step(x, t, copy=True)
            out[f"{lk}/step_loss"] = np.asarray(Ls).copy()
            _grads(out, f"{lk}/step", gs)
            pstep = net.compile(B, loss=loss, clip=0.05, noise_multiplier=0.7, seed=5)
            Lp, rp = pstep(x, t, copy=True)
            out[f"{lk}/pstep_loss"] = np.asarray(Lp).copy()
            _grads(out, f"{lk}/pstep", rp.grads)
            out[f"{lk}/pstep_norms"] = np.asarray(rp.norms).copy()
        for order in ("auto", "forward", "reverse"):
            js = net.compile_jacobian(B, order=order)
            out[f"{k}/cjac_{order}"] = np.asarray(js(x, copy=True)).copy()
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    data = compute()
    np.savez_compressed(PATH, **data)
    print(f"{len(data)} arrays, {os.path.getsize(PATH)} bytes -> {os.path.normpath(PATH)}")

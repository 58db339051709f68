"""The shared passes read layers only through the layer protocol (issue 19): the stack passes, the
forward cache and the per-token rows import no layer class, and a lean cache still keeps one array
per Dense layer, its inputs recomputed from the kept pre-activations."""

import ast
import pathlib

import numpy as np

import jacgrad as jg

ROOT = pathlib.Path(jg.__file__).parent
SHARED = ("nn/stack.py", "network/cache.py", "protocol/token_rows.py")
LAYER_MODULES = ("dense", "layers", "residual", "norms", "activation_layer")


def test_shared_passes_import_no_layer_class():
    for rel in SHARED:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                last = (node.module or "").rsplit(".", 1)[-1]
                assert last not in LAYER_MODULES, f"{rel} imports {node.module}"
            if isinstance(node, ast.Name):
                assert node.id not in ("Dense", "Residual", "LayerNorm", "RMSNorm"), f"{rel} names {node.id}"


def test_lean_cache_recomputes_inputs():
    L = jg.layers
    rng = np.random.default_rng(0)
    net = jg.Sequential([L.Dense(rng.standard_normal((3, 5)), rng.standard_normal(5), "gelu"),
                         L.Dense(rng.standard_normal((5, 4)), None, "silu"), L.LayerNorm(np.ones(4)),
                         L.Dense(rng.standard_normal((4, 2)), None, "tanh")])
    x = rng.standard_normal((6, 3))
    _, cache = net.forward(x)
    h0 = x @ net.layers[0].W + net.layers[0].b
    assert cache._states[1][0] is None  # layer 0's output is not kept: only Dense layer 1 reads it
    z0 = jg.activations.get("gelu").f(h0)
    np.testing.assert_allclose(cache.states[1][0], z0, rtol=1e-13, atol=1e-15)
    assert [a is None for a in cache.saved] == [False, False, True, False]

"""``Chain.jacobian`` in all three orders on a tapering and an hourglass net, B = 32.

The gain of ``order="auto"`` (matrix-chain dynamic programming over the widths, the batch
counted) is a measured number here, not a claim: on the tapering net 512-256-128-64-10 "auto"
is the reverse order (n_out is small); on the hourglass 256-256-256-8-256-256-256 it splits at
the bottleneck and beats both one-directional orders by a wide margin.

    pytest benchmarks/test_bench_jacobian_orders.py --benchmark-enable --benchmark-group-by=group

The forward pass is done once outside the timing: only the accumulation of the per-sample
Jacobians ``(B, n_out, n_in)`` is timed. ``extra_info`` records the multiply-adds and the
bracketing of each order.
"""

import numpy as np
import pytest

import jacgrad as jg

NETS = {
    "tapering": [512, 256, 128, 64, 10],
    "hourglass": [256, 256, 256, 8, 256, 256, 256],
}
B = 32


@pytest.fixture(scope="module", params=[(n, d) for n in NETS for d in ("float64", "float32")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def chain(request):
    name, dtype = request.param
    net = jg.MLP.init(NETS[name], activation="tanh", seed=0, dtype=dtype)
    x = np.random.default_rng(1).standard_normal((B, NETS[name][0])).astype(dtype)
    return name, dtype, net.jacobian_chain(net.forward(x)[1])


@pytest.mark.parametrize("order", ["forward", "reverse", "auto"])
def test_chain_jacobian_order(benchmark, chain, order):
    name, dtype, C = chain
    benchmark.group = f"Chain.jacobian {name} {'-'.join(map(str, NETS[name]))} B={B} {dtype}"
    benchmark.extra_info.update(order=order, multiply_adds=int(C.jacobian_cost(order)),
                                bracketing=str(C.bracketing(order)))
    J = benchmark(C.jacobian, order)
    assert J.shape == (B, NETS[name][-1], NETS[name][0])

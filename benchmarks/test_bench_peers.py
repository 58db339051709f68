"""The cases of ``jacgrad bench`` (its default grid, float32, tanh) under pytest-benchmark:
the training step, the VJP chain and per-sample Jacobians, for every backend present —
jacgrad-numpy, jacgrad-cupy, torch-cpu, torch-cuda, jax-cpu, jax-gpu (skipped with the reason
where absent). Each benchmark group is one case, so the table compares backends side by side.

    pytest benchmarks/test_bench_peers.py --benchmark-enable --benchmark-group-by=group
    pytest benchmarks/test_bench_peers.py --benchmark-enable -k "train and 8x1024 and 256"

GPU backends synchronise the device after every call here (pytest-benchmark times single
calls); ``jacgrad bench`` times synchronised loops instead. Per-sample Jacobians of torch and
JAX come as two variants, ``jacrev`` and ``jacfwd``; jacgrad's training step as two, eager and
``compiled`` (``net.compile(B)``: buffers made once, a CUDA graph on the GPU).
"""

import pytest

from jacgrad.bench.backends import names
from jacgrad.bench.cases import make_data
from jacgrad.bench.options import Options
from jacgrad.bench.runner import build_cases

from conftest import backends_started

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func's torch.jit internals

CASES = build_cases(Options())
VARIANTS = {("peer", "jacobian"): ["jacrev", "jacfwd"], ("jacgrad", "train"): ["", "compiled"]}


def _params():
    for case in CASES:
        for backend in names():
            family = "jacgrad" if backend.startswith("jacgrad") else "peer"
            variants = VARIANTS.get((family, case.task), [""])
            for v in variants:
                cid = f"{case.task}-{case.label.replace('×', 'x')}-B{case.batch}-{backend}" + (f"-{v}" if v else "")
                yield pytest.param(case, backend, v, id=cid)


_PREPARED: dict = {}


@pytest.mark.parametrize("case,backend,variant", list(_params()))
def test_bench_case(benchmark, case, backend, variant):
    live, skipped = backends_started()
    if backend not in live:
        pytest.skip(f"{backend}: {skipped.get(backend, 'not available')}")
    key = (case.key(), backend)
    if key not in _PREPARED:
        _PREPARED.clear()  # one case's arrays at a time
        _PREPARED[key] = live[backend].prepare(case, make_data(case))
    prep = _PREPARED[key]
    fn, sync = prep.variants[variant], prep.sync
    benchmark.group = f"{case.task} {case.label} B={case.batch} float32"
    benchmark.extra_info.update(gflop=case.flops / 1e9, compile_ms=prep.compile_ms.get(variant))
    benchmark.pedantic(lambda: sync(fn()), rounds=5, iterations=1, warmup_rounds=1)

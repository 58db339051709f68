"""pytest-benchmark suite of jacgrad (kept out of the test run: ``testpaths = ["tests"]`` and
``--benchmark-disable`` in the project's addopts). Run it with

    pytest benchmarks/ --benchmark-enable
    pytest benchmarks/test_bench_jacobian_orders.py --benchmark-enable --benchmark-group-by=group

CPU threads are set once for the session, as ``jacgrad bench`` sets them (NumPy's BLAS,
torch and XLA's pool all get one thread per CPU), and printed in the header.
"""

import pytest

from jacgrad.bench.runner import start_backends
from jacgrad.bench.timing import cpu_count, thread_report

_STATE: dict = {}


def backends_started():
    """(live backends by name, skipped name → reason), started once per session."""
    if not _STATE:
        from jacgrad.bench.backends import names

        live, skipped, threads = start_backends(names(), cpu_count())
        _STATE.update(live={b.name: b for b in live}, skipped=skipped, threads=threads)
    return _STATE["live"], _STATE["skipped"]


def pytest_report_header(config):
    tr = thread_report()
    blas = tr.get("numpy_blas", {})
    return (f"jacgrad benchmarks: {cpu_count()} CPU threads; NumPy BLAS {blas.get('library')} "
            f"{blas.get('version') or ''} ({blas.get('architecture') or '?'} kernels)")


@pytest.fixture(scope="session")
def live_backends():
    return backends_started()

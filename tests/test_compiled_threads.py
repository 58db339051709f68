"""A compiled step shared by threads: each call's result is its own input's (a lock per step,
held for the whole call including the copy-out). 8 threads × many calls with different inputs,
every result checked against the eager computation of its own input."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

import jacgrad as jg

L = jg.layers
THREADS, CALLS = 8, 25


@pytest.fixture(autouse=True)
def _switch_often():
    """Switch threads every few microseconds so that unserialised calls interleave (Python's default
    5 ms interval lets a small step finish in one slice and hides the race)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _hammer(call, make_input, check):
    """Run ``call(input)`` from THREADS threads, CALLS times each with fresh inputs; ``check(input,
    result)`` returns whether the result is that input's. Returns the number of wrong results."""
    wrong, errors = [], []
    start = threading.Barrier(THREADS)

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(CALLS):
                inp = make_input(rng)
                if not check(inp, call(inp)):
                    wrong.append(seed)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return len(wrong)


def _mlp():
    return jg.MLP.init([6, 9, 7, 4], activation="tanh", bias_std=0.1, seed=3)


def _seq():
    rng = np.random.default_rng(4)
    a = lambda *s: rng.standard_normal(s) / np.sqrt(s[0])  # noqa: E731
    return jg.Sequential([L.Dense(a(6, 8), a(8), "gelu"),
                          L.Residual([L.LayerNorm(1 + 0.2 * rng.standard_normal(8)), L.Dense(a(8, 8), a(8), "tanh")]),
                          L.Dense(a(8, 4), a(4))])


@pytest.mark.parametrize("make", [_mlp, _seq], ids=["mlp", "sequential"])
def test_a_training_step_shared_by_threads_gives_each_call_its_own_result(make):
    net, B = make(), 5
    step = net.compile(B, loss="mse")

    def make_input(rng):
        return rng.standard_normal((B, 6)), rng.standard_normal((B, 4))

    def check(inp, out):
        loss, g = out
        ref_loss, ref = net.loss_and_grads(*inp)
        return float(loss) == float(ref_loss) and np.array_equal(g.flat, ref.flat)

    assert _hammer(lambda inp: step(*inp, copy=True), make_input, check) == 0


@pytest.mark.parametrize("make", [_mlp, _seq], ids=["mlp", "sequential"])
def test_a_jacobian_step_shared_by_threads_gives_each_call_its_own_result(make):
    net, B = make(), 4
    step = net.compile_jacobian(B)

    def check(x, J):
        return np.array_equal(J, net.jacobian_chain(net.forward(x)[1]).jacobian("auto"))

    assert _hammer(lambda x: step(x, copy=True), lambda rng: rng.standard_normal((B, 6)), check) == 0


def test_rebind_waits_for_a_call_in_progress():
    """``rebind`` takes the same lock: it never swaps the factors under a running call."""
    net, B = _mlp(), 3
    step = net.compile(B)
    assert step._lock.acquire(timeout=1)  # a call in progress holds it
    done = threading.Event()
    t = threading.Thread(target=lambda: (step.rebind(), done.set()))
    t.start()
    assert not done.wait(0.2)
    step._lock.release()
    t.join(5)
    assert done.is_set()


def test_on_the_gpu_each_call_waits_on_the_device_for_the_previous_one(monkeypatch):
    """Threads may enqueue on different streams: a call makes its stream wait for the event that
    the previous call recorded at its end (fake CuPy: the order of record and wait_event)."""
    import types

    from fake_cupy_transfers import install

    from jacgrad.steps.compiled_jacobian import JacobianStep

    fake = install(monkeypatch)
    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def record(self):
            log.append(("record", self.name))
            return f"event of {self.name}"

        def wait_event(self, event):
            log.append(("wait", self.name, event))

    streams = iter([Stream("a"), Stream("b")])
    fake.module.cuda = types.SimpleNamespace(get_current_stream=lambda: next(streams))
    host = _mlp()
    net = jg.MLP([fake.asarray(W) for W in host.weights], [fake.asarray(b) for b in host.biases], host.activations)
    step = JacobianStep(net, 2, capture=False)
    x = np.random.default_rng(0).standard_normal((2, 6))
    for _ in range(2):
        J = step(fake.asarray(x), copy=True)
        np.testing.assert_array_equal(np.asarray(J.view(np.ndarray)), host.jacobian_chain(host.forward(x)[1]).jacobian())
    assert log == [("record", "a"), ("wait", "b", "event of a"), ("record", "b")]

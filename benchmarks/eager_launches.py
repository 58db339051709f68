"""Device operations per eager call, counted on the fake CuPy (no GPU needed).

The H100 run found the eager small step (``MLP.loss_and_grads``, B = 64, 32 layers of 256, float32,
softmax cross-entropy) 2× slower than torch eager: its kernels are tiny, so its time is the host's
dispatch of each of them. This counts what is dispatched, on ``tests/fake_cupy_transfers``' fake
CuPy (NumPy arrays that say they are CuPy's): every ufunc call on a device array (arithmetic,
in-place operators, ``@``, reductions — one CuPy elementwise/reduction kernel or cuBLAS call each),
every other ``cupy.*`` function call (``zeros``/``copyto``/``concatenate``…: a kernel or a memset
each; ``empty`` counted apart, it launches nothing), and every call of jacgrad's own CUDA kernels
(``jacgrad.cuda.kernels``, ``norm_kernels``, ``softmax_kernels``: one launch each) — grouped by the jacgrad function that
asked. A count, not a timing: CuPy's dispatch costs ~5–10 µs per launch on the host, so launches × that
is the floor of an eager call's time on a GPU. Runs anywhere:

    PYTHONPATH=. python benchmarks/eager_launches.py [--widths 256x33] [--batch 64] [--top 15]
    PYTHONPATH=. python benchmarks/eager_launches.py --attention 64,64,4 [--batch 4] [--no-mask]

``--attention T,d,heads``: one ``MultiHeadAttention.forward`` (float32, into its buffers) instead,
causal with a key-padding mask (``--no-mask``: neither).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


class Counter:
    """What the fake dispatches, by kind and by the jacgrad function (module.function) that asked."""

    def __init__(self):
        self.by_kind: collections.Counter = collections.Counter()
        self.by_caller: collections.Counter = collections.Counter()
        self.on = False

    def hit(self, kind: str) -> None:
        if not self.on:
            return
        frame = sys._getframe(2)
        while frame is not None and not frame.f_globals.get("__name__", "").startswith("jacgrad"):
            frame = frame.f_back
        while frame is not None and frame.f_globals.get("__name__", "").startswith("jacgrad.cuda"):
            frame = frame.f_back  # the caller of a jacgrad kernel, not its wrapper
        where = "(outside jacgrad)" if frame is None else (
            f"{frame.f_globals['__name__']}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}")
        self.by_kind[kind] += 1
        if kind != "empty (no launch)":
            self.by_caller[where] += 1

    @property
    def launches(self) -> int:
        return sum(n for k, n in self.by_kind.items() if k != "empty (no launch)")


def install(count: Counter):
    """The fake CuPy with counting hooks; returns ``(fake, undo)``."""
    from _pytest.monkeypatch import MonkeyPatch

    import fake_cupy_transfers as fct
    import jacgrad.cuda.kernels as kernels
    import jacgrad.cuda.norm_kernels as norm_kernels
    import jacgrad.cuda.softmax_kernels as softmax_kernels

    mp = MonkeyPatch()
    fake = fct.install(mp)

    def array_ufunc(self, ufunc, method, *inputs, **kwargs):
        count.hit(f"ufunc {ufunc.__name__}{'' if method == '__call__' else '.' + method}")
        plain = [i.view(np.ndarray) if isinstance(i, fct.FakeArray) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, fct.FakeArray) else o for o in kwargs["out"])
        res = getattr(ufunc, method)(*plain, **kwargs)
        return fct._wrap(res) if not isinstance(res, tuple) else tuple(fct._wrap(r) for r in res)

    mp.setattr(fct.FakeArray, "__array_ufunc__", array_ufunc, raising=False)
    orig_setitem = fct.FakeArray.__setitem__

    def setitem(self, key, value):
        count.hit("setitem (copy/fill kernel)")
        orig_setitem(self, key, value)

    mp.setattr(fct.FakeArray, "__setitem__", setitem)
    getattr_ = fake.module.__getattr__

    def counted_getattr(attr):
        value = getattr_(attr)
        if callable(value) and not isinstance(value, type):
            def call(*args, _v=value, _a=attr, **kwargs):
                if not isinstance(_v, np.ufunc):  # a ufunc counts itself in __array_ufunc__
                    count.hit("empty (no launch)" if _a in ("empty", "empty_like") else f"cupy.{_a}")
                return _v(*args, **kwargs)
            return call
        return value

    fake.module.__getattr__ = counted_getattr
    for mod in (kernels, norm_kernels, softmax_kernels):
        for name in ("scale_cotangent", "derivative", "activation_forward", "bias_activation_forward",
                     "forward_with_derivative", "special", "forward", "project", "backward", "softmax_rows",
                     "softmax_jvp"):
            fn = getattr(mod, name, None)
            if callable(fn):
                def kernel(*args, _fn=fn, _name=name, **kwargs):
                    count.hit(f"jacgrad kernel {_name}")
                    was, count.on = count.on, False  # one launch: not what its NumPy stand-in does inside
                    try:
                        return _fn(*args, **kwargs)
                    finally:
                        count.on = was
                for m in [m for n, m in sys.modules.items() if n.startswith("jacgrad") and m is not None]:
                    if getattr(m, name, None) is fn:
                        mp.setattr(m, name, kernel)
    return fake, mp.undo


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="256x33", help="layer widths: 'WxN' (N widths of W) or comma-separated")
    ap.add_argument("--batch", type=int, default=None, help="B (default 64; 4 with --attention)")
    ap.add_argument("--loss", default="softmax_cross_entropy")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--attention", default=None, help="T,d,heads: count one MultiHeadAttention forward instead")
    ap.add_argument("--no-mask", action="store_true", help="--attention without the causal and padding masks")
    a = ap.parse_args(argv)
    if a.attention:
        return _attention_forward(a)
    a.batch = a.batch or 64
    widths = ([int(a.widths.split("x")[0])] * int(a.widths.split("x")[1]) if "x" in a.widths
              else [int(w) for w in a.widths.split(",")])
    count = Counter()
    fake, undo = install(count)
    try:
        import jacgrad as jg

        rng = np.random.default_rng(0)
        to = fake.asarray
        W = [to((rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)) for m, n in zip(widths, widths[1:])]
        b = [to((0.1 * rng.standard_normal(n)).astype(np.float32)) for n in widths[1:]]
        net = jg.MLP(W, b, ["tanh"] * (len(widths) - 2) + ["identity"])
        x = to(rng.standard_normal((a.batch, widths[0])).astype(np.float32))
        t = to(rng.integers(0, widths[-1], a.batch)) if a.loss == "softmax_cross_entropy" else \
            to(rng.standard_normal((a.batch, widths[-1])).astype(np.float32))
        net.loss_and_grads(x, t, loss=a.loss, input_grad=False)  # warm-up
        count.on = True
        net.loss_and_grads(x, t, loss=a.loss, input_grad=False)
        count.on = False
    finally:
        undo()
    L = len(widths) - 1
    print(f"eager MLP.loss_and_grads, {L} layers of {widths[1]}, B={a.batch}, float32, {a.loss}, input_grad=False "
          f"(fake CuPy: dispatched operations, not a timing)")
    print(f"launches: {count.launches}  ({count.launches / L:.1f} per layer); host transfers: {fake.transfers}")
    print("by kind:")
    for k, n in count.by_kind.most_common(a.top):
        print(f"  {n:6d}  {k}")
    print("by jacgrad function:")
    for k, n in count.by_caller.most_common(a.top):
        print(f"  {n:6d}  {k}")


def _attention_forward(a) -> None:
    T, d, heads = (int(k) for k in a.attention.split(","))
    B, masked = a.batch or 4, not a.no_mask
    count = Counter()
    fake, undo = install(count)
    try:
        import jacgrad as jg

        rng = np.random.default_rng(0)
        to = lambda v: fake.asarray(v.astype(np.float32))  # noqa: E731
        W = [to(rng.standard_normal((d, d)) / np.sqrt(d)) for _ in range(4)]
        L = jg.layers.MultiHeadAttention(*W, heads=heads, causal=masked)
        x = to(rng.standard_normal((B, T, d)))
        pad = None
        if masked:
            pad = np.zeros((B, T), bool)
            pad[-1, T // 2:] = True
            pad = fake.asarray(pad)
        bufs = [fake.module.empty(shape, np.float32) for shape in L.forward_shapes((B, T))]
        L.forward(x, out=bufs, key_padding_mask=pad)  # warm-up
        count.on = True
        L.forward(x, out=bufs, key_padding_mask=pad)
        count.on = False
    finally:
        undo()
    print(f"eager MultiHeadAttention.forward, B={B}, T={T}, d={d}, heads={heads}, float32, "
          f"{'causal + key padding' if masked else 'no mask'} (fake CuPy: dispatched operations, not a timing)")
    print(f"launches: {count.launches}; host transfers: {fake.transfers}")
    for title, table in (("by kind:", count.by_kind), ("by jacgrad function:", count.by_caller)):
        print(title)
        for k, n in table.most_common(a.top):
            print(f"  {n:6d}  {k}")


if __name__ == "__main__":
    main()

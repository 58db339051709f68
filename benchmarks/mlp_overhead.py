"""The Python overhead of the shared passes on a small MLP: ``net.loss_and_grads(x, t)`` of a
[32, 64, 64, 10] tanh MLP at B = 64, float64, mse, in two trees — this one and an older one (e.g.
main before the MLP/Sequential merge, ``git archive 871cefe^1 | tar -x -C /tmp/old``) — ALTERNATED:
one persistent worker process per tree, and each round times a block of calls in one worker, then
in the other (CPU time of the worker, ``time.process_time``: a loaded machine's preemption does not
count). Prints each tree's median time per call and the median of the per-round ratios new/old.

    OPENBLAS_NUM_THREADS=1 python benchmarks/mlp_overhead.py --old /tmp/old [--new .] [--rounds 30] [--calls 500]
        [--part loss_and_grads|forward|backward|compiled|grad_norms] [--sizes 512,512,512,512,512 --batch 256]
"""

import argparse
import os
import statistics
import subprocess
import sys

WORKER = r"""
import sys, time
import numpy as np, jacgrad as jg
sizes, B = [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
net = jg.MLP.init(sizes, activation="tanh", seed=0)
rng = np.random.default_rng(0)
x, t = rng.standard_normal((B, sizes[0])), rng.standard_normal((B, sizes[-1]))
y, cache = net._forward(x)
gy = jg.losses.mse(y, t)[1]
step = net.compile(B, input_grad=False) if sys.argv[1] == "compiled" else None
part = {"loss_and_grads": lambda: net.loss_and_grads(x, t), "forward": lambda: net._forward(x),
        "backward": lambda: net.backward(cache, gy), "compiled": lambda: step(x, t),
        "grad_norms": lambda: net.per_sample_grad_norms(x, t)}[sys.argv[1]]
for _ in range(int(sys.argv[4])):
    part()
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    t0 = time.process_time()
    for _ in range(n):
        part()
    print((time.process_time() - t0) / n, flush=True)
"""


def cpu_model() -> str:
    out = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout
    return out.split(":", 1)[-1].strip() or "unknown CPU"


def worker(tree: str, part: str, sizes: str, batch: int, warm: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-c", WORKER, part, sizes, str(batch), str(warm)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env, cwd=os.path.abspath(tree))
    assert p.stdout.readline().strip() == "ready", f"the worker of {tree} did not start"
    return p


def timed(p: subprocess.Popen, calls: int) -> float:
    p.stdin.write(f"{calls}\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the reference tree (its jacgrad/ is imported)")
    ap.add_argument("--new", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--part", default="loss_and_grads",
                    choices=("loss_and_grads", "forward", "backward", "compiled", "grad_norms"),
                    help="the whole call, its forward pass (net._forward) or backward pass alone, the compiled "
                         "step (net.compile(B)) or the per-sample gradient norms")
    ap.add_argument("--sizes", default="32,64,64,10", help="the MLP's widths, e.g. 512,512,512,512,512")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=300, help="calls before timing, in each worker")
    a = ap.parse_args()
    old, new = (worker(tree, a.part, a.sizes, a.batch, a.warmup) for tree in (a.old, a.new))
    t_old, t_new = [], []
    for r in range(a.rounds):
        first, second = (old, new) if r % 2 == 0 else (new, old)  # who goes first alternates too
        ta, tb = timed(first, a.calls), timed(second, a.calls)
        t_old.append(ta if first is old else tb)
        t_new.append(tb if first is old else ta)
    for p in (old, new):
        p.stdin.close()
        p.wait()
    ratios = [n / o for n, o in zip(t_new, t_old)]
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); "
          f"{a.part} of a [{a.sizes.replace(',', ', ')}] tanh MLP, B={a.batch}, float64, mse; {a.rounds} alternated rounds "
          f"of {a.calls} calls, CPU time")
    print(f"old {a.old}: {statistics.median(t_old) * 1e3:.4f} ms per call (best {min(t_old) * 1e3:.4f})")
    print(f"new {a.new}: {statistics.median(t_new) * 1e3:.4f} ms per call (best {min(t_new) * 1e3:.4f})")
    print(f"new/old: median of the rounds' ratios {statistics.median(ratios):.3f} "
          f"(quartiles {statistics.quantiles(ratios, n=4)[0]:.3f}–{statistics.quantiles(ratios, n=4)[2]:.3f}); "
          f"ratio of the best {min(t_new) / min(t_old):.3f}")


if __name__ == "__main__":
    main()

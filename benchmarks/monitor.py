"""What ``jg.Monitor`` costs a training loop: a 784-256-256-10 ReLU MLP (float32) trained with SGD on
batches of 128 (random MNIST-shaped data), with ``monitor.step()`` after every ``optimizer.step()``
(``every=100``, a 64-row probe with its labels, the default subsampled spectra) and without, ALTERNATED
in short runs: each round trains ``--steps`` steps (default: ``every``, so that each monitored run holds
exactly one report) without the monitor, then as many with it (who goes first alternates). torch and
BLAS on one thread each. Both clocks are kept: the process's CPU time (``time.process_time``: a loaded
machine's preemption does not count; the number to quote there) and wall time. Prints the total time
per step each way, their ratio, the median of the rounds' ratios, and the report's own time (median)
as a share of ``every`` steps, with the CPU model; the rounds' ratios as median and quartiles.

    python benchmarks/monitor.py [--rounds 30] [--steps 100] [--every 100] [--probe 64] [--spectra subsample]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import jacgrad as jg  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: every)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--probe", type=int, default=64)
    p.add_argument("--spectra", default="subsample", choices=("subsample", "all", "off"))
    a = p.parse_args()
    steps = a.steps or a.every
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(128, 784, generator=g) for _ in range(8)]
    ys = [torch.randint(0, 10, (128,), generator=g) for _ in range(8)]
    log = os.path.join(tempfile.mkdtemp(), "run.jsonl")
    mon = jg.Monitor(model, xs[0][:a.probe], every=a.every, log=log, target=ys[0][:a.probe].numpy(),
                     loss="softmax_cross_entropy", spectra=a.spectra)

    def train(n: int, monitor) -> tuple[float, float]:
        """(CPU seconds, wall seconds) of n steps."""
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[i % 8]), ys[i % 8]).backward()
            opt.step()
            if monitor is not None:
                monitor.step()
        return time.process_time() - c0, time.perf_counter() - w0

    train(50, None)  # warm up
    mon.record()
    runs = {"without": [], "with": []}
    for r in range(a.rounds):
        for name in (("without", "with") if r % 2 == 0 else ("with", "without")):
            runs[name].append(train(steps, mon if name == "with" else None))
    reports = len(mon.rows) - 1
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); torch "
          f"{torch.__version__}, 1 thread")
    print(f"784-256-256-10 ReLU MLP, float32, SGD, B=128; Monitor every={a.every}, probe {a.probe} rows, "
          f"spectra={a.spectra!r}; {a.rounds} alternated rounds of {steps} steps each way ({reports} reports)")
    for k, clock in enumerate(("CPU time", "wall time")):
        plain = sum(t[k] for t in runs["without"]) / (a.rounds * steps)
        monitored = sum(t[k] for t in runs["with"]) / (a.rounds * steps)
        ratios = [w[k] / o[k] for w, o in zip(runs["with"], runs["without"])]
        q1, q2, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        print(f"{clock:>9}: {plain * 1e3:.3f} ms per step without the monitor, {monitored * 1e3:.3f} ms with it: "
              f"ratio {monitored / plain:.4f} (overhead {100 * (monitored / plain - 1):+.2f}%; the rounds' ratios: "
              f"median {q2:.4f}, quartiles {q1:.4f}-{q3:.4f})")
    report = statistics.median(r["seconds"] for r in mon.rows)
    plain_wall = sum(t[1] for t in runs["without"]) / (a.rounds * steps)
    print(f"one report: {report * 1e3:.2f} ms wall (median of {len(mon.rows)}) = "
          f"{100 * report / (a.every * plain_wall):.2f}% of {a.every} steps' wall time")


if __name__ == "__main__":
    main()

"""What ``jg.Monitor`` costs a training loop: a 784-256-256-10 ReLU MLP (float32) trained with SGD on
batches of 128 (random MNIST-shaped data), N steps with ``monitor.step()`` after every
``optimizer.step()`` (``every=100``, a 64-row probe with its labels, the default subsampled
spectra) and N steps without, the two alternated over several rounds; torch and BLAS on one
thread each. Prints the median time per step of each, their ratio, and the report's own time
over 100 steps (the overhead the ratio should show, less exposed to the machine's load).

    python benchmarks/monitor.py [--steps 1000] [--rounds 3] [--every 100] [--probe 64] [--spectra subsample]
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
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--probe", type=int, default=64)
    p.add_argument("--spectra", default="subsample", choices=("subsample", "all", "off"))
    a = p.parse_args()
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

    def train(steps: int, monitor) -> float:
        t0 = time.perf_counter()
        for i in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xs[i % 8]), ys[i % 8]).backward()
            opt.step()
            if monitor is not None:
                monitor.step()
        return (time.perf_counter() - t0) / steps

    train(50, None)  # warm up
    without, with_monitor = [], []
    for _ in range(a.rounds):
        without.append(train(a.steps, None))
        with_monitor.append(train(a.steps, mon))
    plain, monitored = statistics.median(without), statistics.median(with_monitor)
    report = statistics.median(r["seconds"] for r in mon.rows)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}); torch "
          f"{torch.__version__}, 1 thread")
    print(f"784-256-256-10 ReLU MLP, float32, SGD, B=128; Monitor every={a.every}, probe {a.probe} rows, "
          f"spectra={a.spectra!r}; {a.rounds} rounds of {a.steps} steps each way")
    print(f"step without the monitor: {plain * 1e3:.3f} ms (median of rounds: "
          f"{', '.join(f'{t * 1e3:.3f}' for t in without)})")
    print(f"step with the monitor:    {monitored * 1e3:.3f} ms ({', '.join(f'{t * 1e3:.3f}' for t in with_monitor)})")
    print(f"ratio with/without: {monitored / plain:.4f}  (overhead {100 * (monitored / plain - 1):+.2f}%)")
    print(f"one report: {report * 1e3:.2f} ms (median of {len(mon.rows)}) = "
          f"{100 * report / (a.every * plain):.2f}% of {a.every} steps' time")


if __name__ == "__main__":
    main()

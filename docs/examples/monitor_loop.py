"""jg.Monitor in a plain PyTorch training loop: scikit-learn's ``load_digits`` (8x8 images, 10
classes), a 64-128-128-128-10 ReLU MLP trained with SGD on batches of 128, a gradient-flow report
every 100 steps on a fixed probe of 64 training images with their labels, written to a JSONL file.
The same training is then run without the monitor, and the time per step of both is printed.

    python docs/examples/monitor_loop.py [--steps 1000] [--log run.jsonl]
    jacgrad report --log run.jsonl --out history.png    # the run's history, printed and plotted
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import jacgrad as jg  # noqa: E402


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                               torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train(model, X, y, steps: int, monitor=None) -> float:
    """Seconds per step of ``steps`` SGD steps on batches of 128, ``monitor.step()`` after each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(X), 128))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if monitor is not None:
            monitor.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--log", default="run.jsonl")
    a = p.parse_args()
    torch.set_num_threads(1)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    if os.path.exists(a.log):
        os.remove(a.log)  # the monitor appends: start this run's history afresh

    model = make_model()
    monitor = jg.Monitor(model, X[:64], every=a.every, log=a.log, target=y[:64].numpy(), loss="softmax_cross_entropy")
    with_monitor = train(model, X, y, a.steps, monitor)
    for row in monitor.rows:
        layers = "  ".join(f"{L['module']}: ‖g‖={L['grad_norm']:.3g} χ={L['chi']:.3g} dead={L['dead_fraction']:.0%}"
                           for L in row["layers"])
        print(f"step {row['step']:>5}  {row['verdict']:<9} loss {row['loss']:.3f}  χ̄ {row['chi_bar']:.3f}  {layers}")

    without = train(make_model(), X, y, a.steps)
    report = np.median([r["seconds"] for r in monitor.rows])
    print(f"\nwrote {len(monitor.rows)} rows to {a.log}")
    print(f"time per step: {without * 1e3:.3f} ms without the monitor, {with_monitor * 1e3:.3f} ms with it "
          f"(x{with_monitor / without:.3f}); one report {report * 1e3:.1f} ms = "
          f"{100 * report / (a.every * without):.1f}% of {a.every} steps")


if __name__ == "__main__":
    main()

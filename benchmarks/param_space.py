"""Parameter-space products against their peers: a thin wrapper of ``jacgrad bench``.

The recipes (torch.func ``vmap(grad)`` and its norms, BackPACK BatchGrad / BatchL2Grad /
DiagGGNExact, the two NTK recipes of PyTorch's tutorial, torch.func jvp → loss Hessian → vjp)
live in ``jacgrad.bench.peer_param_space``; this script runs

    jacgrad bench --tasks per_sample,ntk,ggn --activation relu --threads 1 --param-nets 784-512-512-10 [options]

(ReLU nets, one thread per library, the 784-512-512-10 classifier this script always timed; the
NTK on ``jacgrad bench``'s 128-512-512-512-8 with N = 16) and passes every option on, e.g.

    python benchmarks/param_space.py --repeats 5
    python benchmarks/param_space.py --tasks ntk --ntk-nets 128-1024-1024-1024-8
    python benchmarks/param_space.py --param-nets 784-256-256-10 --json out.json

Every row is checked against a float64 reference and jacgrad's rows against their peer's
result in the same run; see ``jacgrad bench --help`` for the options.
"""

from __future__ import annotations

import sys

from jacgrad.bench import main

DEFAULTS = ["--tasks", "per_sample,ntk,ggn", "--activation", "relu", "--threads", "1", "--param-nets", "784-512-512-10"]


def argv(args: list[str]) -> list[str]:
    """``DEFAULTS`` with every option the caller gives taking the place of its default."""
    given = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    out = []
    for flag, value in zip(DEFAULTS[0::2], DEFAULTS[1::2]):
        if flag not in given:
            out += [flag, value]
    return out + list(args)


if __name__ == "__main__":
    sys.exit(main(argv(sys.argv[1:])))

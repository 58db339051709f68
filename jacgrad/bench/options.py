"""The command line of ``jacgrad bench``: parsing and checking, with one-line errors.

Every mistake (an unknown backend, task, dtype or activation; a malformed size list; a
``--json`` path in a folder that does not exist) is a ``UsageError`` whose message is one line
naming the option, what was given and what is valid; ``main`` prints it and exits with 2.

    >>> o = parse(["--backends", "jacgrad-numpy", "--batch", "8", "--quick"])
    >>> o.backends, o.batch, o.repeats
    (['jacgrad-numpy'], [8], 3)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field

from .backends import names as backend_names
from .cases import NAMED_NETS, TASKS, default_tasks, parse_net

__all__ = ["Options", "UsageError", "parse", "parser"]

DEFAULTS = dict(batch="64,256", width="256,1024", depth="4,8", nets="tapering,hourglass", jac_batch="32",
                param_nets="784-256-256-10", param_batch="128", ntk_nets="128-512-512-512-8", ntk_n="16",
                repeats=5, warmup=1, min_time=0.02, model_size="issue")
QUICK = dict(batch="64", width="256", depth="4", nets="tapering,hourglass", jac_batch="8",
             param_nets="196-64-10", param_batch="16", ntk_nets="32-64-64-64-8", ntk_n="4",
             repeats=3, warmup=1, min_time=0.005, model_size="tiny")


class UsageError(ValueError):
    """A bad command line; the message is one line."""


@dataclass
class Options:
    backends: list[str] = field(default_factory=backend_names)
    tasks: list[str] = field(default_factory=default_tasks)
    batch: list[int] = field(default_factory=lambda: [64, 256])
    width: list[int] = field(default_factory=lambda: [256, 1024])
    depth: list[int] = field(default_factory=lambda: [4, 8])
    nets: list[str] = field(default_factory=lambda: ["tapering", "hourglass"])
    jac_batch: list[int] = field(default_factory=lambda: [32])
    param_nets: list[str] = field(default_factory=lambda: ["784-256-256-10"])
    param_batch: list[int] = field(default_factory=lambda: [128])
    ntk_nets: list[str] = field(default_factory=lambda: ["128-512-512-512-8"])
    ntk_n: list[int] = field(default_factory=lambda: [16])
    dtype: str = "float32"
    model_size: str = "issue"  # the sizes of the model tasks (cnn_norms, transformer_norms): models.SIZES
    activation: str = "tanh"
    repeats: int = 5
    warmup: int = 1
    min_time: float = 0.02
    threads: int | None = None
    json: str | None = None
    progress: bool = True
    check: bool = True
    seed: int = 0
    quick: bool = False
    explicit_backends: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit; we want one line
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="jacgrad bench",
        description="Time jacgrad against PyTorch and JAX: training step (forward + backward), the VJP chain "
                    "alone, and per-sample Jacobians, over batch × width × depth; with --tasks also the parameter-space "
                    "products (per_sample, ntk, ggn) against torch.func and BackPACK. Timings are interleaved "
                    "across backends (median and IQR of --repeats samples).",
        epilog=f"backends: {', '.join(backend_names())}. Named nets: "
               + ", ".join(f"{k} ({'-'.join(map(str, v))})" for k, v in NAMED_NETS.items())
               + ". Example: jacgrad bench --backends jacgrad-numpy,torch-cpu --batch 256 --width 1024 --depth 8 --tasks train",
    )
    p.add_argument("--backends", help="comma-separated backends (default: every one; absent ones are skipped with a note)")
    p.add_argument("--tasks", help=f"comma-separated tasks out of {','.join(TASKS)} "
                                   f"(default: {','.join(default_tasks())})")
    p.add_argument("--batch", help=f"batch sizes of the train/vjp grid (default {DEFAULTS['batch']})")
    p.add_argument("--width", help=f"hidden widths of the train/vjp grid (default {DEFAULTS['width']})")
    p.add_argument("--depth", help=f"layer counts of the train/vjp grid (default {DEFAULTS['depth']})")
    p.add_argument("--nets", help=f"nets of the jacobian task: names or widths like 784-256-10 (default {DEFAULTS['nets']})")
    p.add_argument("--jac-batch", help=f"batch sizes of the jacobian task (default {DEFAULTS['jac_batch']})")
    p.add_argument("--param-nets", help="nets of the per_sample and ggn tasks (softmax cross-entropy; "
                                        f"default {DEFAULTS['param_nets']})")
    p.add_argument("--param-batch", help=f"batch sizes of the per_sample and ggn tasks (default {DEFAULTS['param_batch']})")
    p.add_argument("--ntk-nets", help=f"nets of the ntk task (default {DEFAULTS['ntk_nets']})")
    p.add_argument("--ntk-n", help=f"input counts N of the ntk task, a (N, N, O, O) kernel (default {DEFAULTS['ntk_n']})")
    p.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    p.add_argument("--model-size", help="sizes of the cnn_norms and transformer_norms tasks: issue (issue 21's: "
                                        "B = 64 3×32×32 images; B = 16, T = 128, d = 256) or tiny (default issue; "
                                        "--quick: tiny)")
    p.add_argument("--activation", default="tanh", help="hidden activation (default tanh); the last layer is identity")
    p.add_argument("--repeats", type=str, help=f"timed samples per backend (default {DEFAULTS['repeats']})")
    p.add_argument("--warmup", type=str, help=f"untimed calls first (default {DEFAULTS['warmup']})")
    p.add_argument("--min-time", type=str, help=f"seconds a sample lasts at least (a loop of calls; default {DEFAULTS['min_time']})")
    p.add_argument("--threads", type=str, help="CPU threads of every contender: NumPy's BLAS, torch, XLA (default: the count in OPENBLAS_NUM_THREADS, OMP_NUM_THREADS or MKL_NUM_THREADS when set, else every CPU)")
    p.add_argument("--json", metavar="PATH", help="also write every number to PATH as JSON")
    p.add_argument("--quick", action="store_true", help="a small grid and 3 repeats (seconds, for a smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-check", action="store_true", help="skip checking that every backend computes the same numbers")
    p.add_argument("--seed", type=str, default="0", help="seed of the weights and inputs (default 0)")
    return p


def _int_list(option: str, text: str) -> list[int]:
    items = [s.strip() for s in text.split(",")]
    out = []
    for s in items:
        try:
            v = int(s)
        except ValueError:
            v = 0
        if v < 1:
            raise UsageError(f"{option}: {s!r} is not a positive integer (give a comma-separated list like 64,256)")
        out.append(v)
    return out


def _int(option: str, text: str, minimum: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not an integer") from None
    if v < minimum:
        raise UsageError(f"{option}: {v} is below the minimum {minimum}")
    return v


def _names(option: str, text: str, valid: list[str], what: str) -> list[str]:
    got = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in got if s not in valid]
    if bad or not got:
        shown = ", ".join(repr(b) for b in bad) if bad else "nothing"
        raise UsageError(f"{option}: unknown {what} {shown}; valid {what}s: {', '.join(valid)}")
    return list(dict.fromkeys(got))


def _nets(option: str, text: str) -> list[str]:
    nets = [s.strip() for s in text.split(",") if s.strip()]
    for s in nets:
        try:
            parse_net(s)
        except ValueError as exc:
            raise UsageError(f"{option}: {exc}") from None
    if not nets:
        raise UsageError(f"{option}: no net given")
    return nets


def parse(argv: list[str] | None) -> Options:
    """``Options`` from ``argv`` (without the program name); ``UsageError`` on bad input."""
    a = parser().parse_args(argv)
    base = QUICK if a.quick else DEFAULTS
    o = Options(quick=a.quick)
    if a.backends is not None:
        o.backends = _names("--backends", a.backends, backend_names(), "backend")
        o.explicit_backends = True
    if a.tasks is not None:
        o.tasks = _names("--tasks", a.tasks, list(TASKS), "task")
    o.batch = _int_list("--batch", a.batch or base["batch"])
    o.width = _int_list("--width", a.width or base["width"])
    o.depth = _int_list("--depth", a.depth or base["depth"])
    o.jac_batch = _int_list("--jac-batch", a.jac_batch or base["jac_batch"])
    o.param_batch = _int_list("--param-batch", a.param_batch or base["param_batch"])
    o.ntk_n = _int_list("--ntk-n", a.ntk_n or base["ntk_n"])
    o.nets = _nets("--nets", a.nets or base["nets"])
    o.param_nets = _nets("--param-nets", base["param_nets"] if a.param_nets is None else a.param_nets)
    o.ntk_nets = _nets("--ntk-nets", base["ntk_nets"] if a.ntk_nets is None else a.ntk_nets)
    o.model_size = base["model_size"] if a.model_size is None else a.model_size
    if o.model_size not in ("issue", "tiny"):
        raise UsageError(f"--model-size: {a.model_size!r} is not issue or tiny")
    if a.dtype not in ("float32", "float64"):
        raise UsageError(f"--dtype: {a.dtype!r} is not float32 or float64")
    o.dtype = a.dtype
    from ..elementwise.activations import names as activation_names

    acts = _names("--activation", a.activation, activation_names(), "activation")
    if len(acts) != 1:
        raise UsageError(f"--activation: give one name, used on every hidden layer (got {', '.join(acts)})")
    o.activation = acts[0]
    o.repeats = _int("--repeats", a.repeats, 1) if a.repeats is not None else base["repeats"]
    o.warmup = _int("--warmup", a.warmup, 0) if a.warmup is not None else base["warmup"]
    if a.min_time is not None:
        try:
            o.min_time = float(a.min_time)
        except ValueError:
            raise UsageError(f"--min-time: {a.min_time!r} is not a number of seconds") from None
        if not 0 <= o.min_time <= 10:
            raise UsageError(f"--min-time: {o.min_time} is not between 0 and 10 seconds")
    else:
        o.min_time = base["min_time"]
    o.threads = _int("--threads", a.threads, 1) if a.threads is not None else None
    o.seed = _int("--seed", a.seed, 0)
    if a.json is not None:
        folder = os.path.dirname(os.path.abspath(a.json))
        if not os.path.isdir(folder):
            raise UsageError(f"--json: the folder {folder!r} does not exist")
        from ..cli.common import UsageError as CommandError, check_output_path

        try:  # a folder, or a path that cannot be written: refused before the run, as by `jacgrad report`
            check_output_path(a.json, "--json")
        except CommandError as exc:
            raise UsageError(str(exc)) from None
        o.json = a.json
    o.progress = not a.no_progress
    o.check = not a.no_check
    return o

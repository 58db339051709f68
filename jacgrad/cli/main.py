"""The ``jacgrad`` command: ``report``, ``check``, ``info`` and ``bench``.

    jacgrad report                       # 20-layer 256-wide sigmoid, tanh and relu nets compared, and the
                                         # sigmoid net cured (residual blocks of 2 with LayerNorm)
    jacgrad report --activation relu --gain 1.6 --plot flow.png
    jacgrad report --activation relu,tanh,tanh --sizes 8,16x3,2   # one activation per hidden layer
    jacgrad report --activation relu --activation tanh             # two networks compared
    jacgrad report --weights my_net.npz --json flow.json
    jacgrad report --weights run.ckpt --model mypkg.models:make_net   # named keys, your own module
    jacgrad report --log run.jsonl --out history.png   # a jg.Monitor's training history
    jacgrad report --activation sigmoid --residual 2 --norm layernorm   # the cure: residual pre-norm blocks
    jacgrad report --weights my_net.npz --data X.npy --targets T.npy --workers 2   # over a dataset
    jacgrad check                        # GPU against the float64 NumPy reference
    jacgrad info                         # versions, backends, GPU, kernels

Every bad input is one line on stderr naming the problem and exit status 2, never a traceback;
Ctrl-C is one line and exit status 130 (a cluster the command started is closed first).
``main(argv)`` is the console script; tests call it in-process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .common import PROG, UsageError, float_option, int_at_least, parse_sizes
from .words import cli_words

__all__ = ["main", "parse_sizes", "UsageError"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the usage block and exit
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------- the parser
_WEIGHTS_FORMAT = """\
--weights FILE: a network of your own, by suffix: .npz or .safetensors as written by
  jacgrad.MLP.save, or by
  np.savez(FILE, W0=..., b0=..., W1=..., b1=..., activations=np.array(["relu", "identity"]))
  Wj has shape (H_{j-1}, H_j) (h = z @ Wj + bj; from a torch.nn.Linear take weight.T), bj has
  shape (H_j,) and may be left out (zeros), and `activations` holds one name per layer (or one
  name for all). A torch nn.Sequential state dict (.safetensors, or .pt/.pth read with
  weights_only=True) carries no activations: give the hidden layers' with --activation relu (or
  relu,tanh, one per hidden layer, or relu*2) and the last layer's with --output-activation
  (default identity). A training checkpoint holding the state dict under "state_dict" (Lightning's
  .ckpt, whose "model." key prefix is read past) or "model" is read too. Named keys (fc1.weight)
  need the module that names them: --model package.module:factory (factory() builds it).
  An example ships with jacgrad: jacgrad/examples/tiny_mlp.npz
  (python -c "import jacgrad.examples as e; print(e.TINY_MLP)").
"""

_MODEL_HELP = ("your torch module, built by factory() in your own code (imported as python -m would, from the "
               "current directory): --weights keys such as fc1.weight are matched against its names, and its "
               "activation modules name the activations; without --weights, its own weights are reported")

_REPORT_EPILOG = (
    """\
With no options: 20-layer, 256-wide sigmoid (xavier_normal), tanh (xavier_normal) and relu
(he_normal) networks, each with a per-layer table and a verdict. Inputs are N(0, 1); each sample
back-propagates a random unit cotangent, so the report describes the network itself.

Verdict: χ̄ is the geometric mean over layers of ‖J_j‖_F²/H_j (the per-layer factor of the
squared gradient norm); over L layers the gradient's squared norm changes by Γ = χ̄^L. Healthy
while 1/100 ≤ Γ ≤ 100 (the gradient norm changes less than 10x), else vanishing or exploding.
The input-output Jacobian's spectrum is computed exactly for --spectrum-samples samples; with
--data, the per-layer ‖J‖₂ and bound average over a seeded subsample of --norm-samples samples
(2048) and every other column over all N.

"""
    + _WEIGHTS_FORMAT
)


def _build_parser() -> _Parser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Gradient-flow diagnostics of deep networks, from their layer Jacobians.")
    parser.add_argument("--version", action="version", version=f"jacgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,check,info,bench}", parser_class=_Parser)

    rep = sub.add_parser(
        "report",
        help="gradient-flow report of a network (default: sigmoid vs tanh vs relu, 20x256, and sigmoid with residual LayerNorm blocks)",
        description="Per-layer gradient flow, the input-output Jacobian's spectrum and a verdict.",
        epilog=_REPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = rep.add_argument_group("network (a random one, unless --weights)")
    net.add_argument("--depth", type=int_at_least("--depth", 1), default=None, help="number of layers (default 20)")
    net.add_argument("--width", type=int_at_least("--width", 1), default=None, help="width of every layer (default 256)")
    net.add_argument("--sizes", default=None, help="widths n_in,H_1,…,n_out; WIDTHxCOUNT repeats: 784,256x20,10")
    net.add_argument(
        "--activation", action="append", default=None, metavar="NAME[,NAME...]",
        help="the hidden activation, or a comma list with one per hidden layer (relu,tanh,tanh); NAME*K "
             "repeats a name (tanh*9; relu*3,tanh); repeat --activation to compare networks (default: "
             "sigmoid, tanh and relu compared); with --weights, the hidden layers' names for a file that carries none",
    )
    net.add_argument("--output-activation", default=None, metavar="NAME",
                     help="activation of the last layer (default identity; with --weights, for a file that carries none)")
    net.add_argument("--init", default=None,
                     help="weight init (default: he_normal when every hidden activation is ReLU-like, else xavier_normal)")
    net.add_argument("--gain", type=float_option("--gain", 0.0, strict=True), default=None, help="multiplies the init (default 1)")
    net.add_argument("--bias-std", type=float_option("--bias-std", 0.0), default=None, help="biases ~ N(0, s²) (default 0)")
    net.add_argument("--weights", default=None, metavar="FILE", help="a network from a file (.npz, .safetensors, .pt, .pth, .ckpt: format below)")
    net.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY", help=_MODEL_HELP)
    net.add_argument("--residual", type=int_at_least("--residual", 1), default=None, metavar="K",
                     help="a skip z + s·f(z) around every K hidden H -> H dense layers (the report then has a row per block)")
    net.add_argument("--residual-scale", type=float_option("--residual-scale"), default=None, metavar="S",
                     help="with --residual: the branch scale s (default 1)")
    net.add_argument("--norm", default=None, metavar="{layernorm,rmsnorm}",
                     help="with --residual: a normalisation layer first inside each block (pre-norm)")
    data = rep.add_argument_group(
        "dataset (instead of --batch random inputs; .npy files memory-mapped, read a chunk at a time by Dask)")
    data.add_argument("--data", default=None, metavar="X.npy",
                      help="samples (N, n_in), float32 or float64: the report is over all N")
    data.add_argument("--targets", default=None, metavar="T.npy",
                      help="with --data: targets (N, n_out) for the mse loss, or integer labels (N,) for "
                           "softmax_cross_entropy (default: random unit cotangents)")
    data.add_argument("--workers", type=int_at_least("--workers", 1), default=None, metavar="N",
                      help="with --data: a local cluster of N worker processes (default: Dask's local scheduler, "
                           "which already uses every CPU here with threads: on one machine a cluster is slower)")
    data.add_argument("--scheduler", default=None, metavar="ADDRESS",
                      help="with --data: a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    data.add_argument("--norm-samples", type=int_at_least("--norm-samples", 1), default=None, metavar="N",
                      help="the per-layer ‖J‖₂ and bound (the costly columns) averaged over a seeded random "
                           "subsample of N samples, every other column over all (default: 2048 with --data, "
                           "else every sample); the output says how many")
    _common(rep, batch=64)
    rep.add_argument(
        "--spectrum-samples",
        type=int_at_least("--spectrum-samples", 0),
        default=8,
        help="samples whose whole Jacobian is built for its singular values (default 8; 0 skips)",
    )
    rep.add_argument("--json", default=None, metavar="PATH",
                     help="write every number as JSON ('-': stdout carries the JSON alone, the tables go to stderr)")
    rep.add_argument("--plot", default=None, metavar="PATH",
                     help="write the figure, in the format the suffix names: .png, .svg, .pdf, ... (needs jacgrad[plot])")
    rep.add_argument("--dpi", type=float_option("--dpi", 0.0, strict=True), default=None, metavar="N",
                     help="with --plot or --out: dots per inch (default 100)")
    hist = rep.add_argument_group("a training run's history (instead of a network)")
    hist.add_argument("--log", default=None, metavar="RUN.jsonl",
                      help="the JSONL file a jg.Monitor wrote: prints the run's history")
    hist.add_argument("--out", default=None, metavar="PATH",
                      help="with --log: plot the history (every layer's gradient norm, χ, ‖J‖₂, dead fraction "
                           "against the step; needs jacgrad[plot])")

    chk = sub.add_parser(
        "check",
        help="validate the GPU path against the float64 NumPy reference",
        description=(
            "Runs a network on the GPU (float64 and float32) and on float64 NumPy and prints each quantity's "
            "relative error max|a-b|/max|b|; exits 1 when one is above its tolerance. Without a GPU it says so "
            "and validates NumPy float32 against float64."
        ),
        epilog=_WEIGHTS_FORMAT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    chk.add_argument("--depth", type=int_at_least("--depth", 1), default=6, help="layers of the random net (default 6)")
    chk.add_argument("--width", type=int_at_least("--width", 1), default=64, help="width of the random net (default 64)")
    chk.add_argument("--activation", default=None, metavar="NAME[,NAME...]",
                     help="hidden activation of the random net, or one per hidden layer; NAME*K repeats a name "
                          "(default tanh); with --weights, the hidden layers' names for a file that carries none")
    chk.add_argument("--output-activation", default=None, metavar="NAME",
                     help="activation of the last layer (default identity), of the random net or of a --weights "
                          "file that carries none")
    chk.add_argument("--weights", default=None, metavar="FILE", help="check this network instead (formats below)")
    chk.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY", help=_MODEL_HELP)
    chk.add_argument("--batch", type=int_at_least("--batch", 1), default=16, help="samples (default 16)")
    chk.add_argument("--seed", type=int_at_least("--seed", 0), default=0, help="random seed (default 0)")
    chk.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                     help="candidate: gpu, cpu (float32 vs float64 NumPy), auto (default): JACGRAD_BACKEND when set, else gpu when usable")
    chk.add_argument("--tol64", type=float_option("--tol64", 0.0, strict=True), default=1e-10,
                     help="tolerance of float64 candidates (default 1e-10)")
    chk.add_argument("--tol32", type=float_option("--tol32", 0.0, strict=True), default=1e-5,
                     help="tolerance of float32 candidates (default 1e-5; the project standard for float32 vs the float64 reference)")

    sub.add_parser("info", help="versions, backends, the GPU and whether the kernels compile",
                   description="Versions, backends, the GPU's name and CUDA version, and the kernel build status.")
    sub.add_parser("bench", help="benchmarks against PyTorch and JAX (jacgrad bench --help)", add_help=False)
    return parser


def _common(p, batch: int) -> None:
    p.add_argument("--batch", type=int_at_least("--batch", 1), default=batch, help=f"samples (default {batch})")
    p.add_argument("--seed", type=int_at_least("--seed", 0), default=0, help="seed of the network and the inputs (default 0)")
    p.add_argument("--device", default="auto", help="cpu, gpu or auto (default auto: JACGRAD_BACKEND when set, else the GPU when one runs)")
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="(default float64)")


# ---------------------------------------------------------------------------- entry point
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``jacgrad ARGS``; returns the exit status (0 ok, 1 check failed, 2 bad input)."""
    run_as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _reconfigure_streams()
    if argv and argv[0] == "bench":
        from .. import bench

        return int(bench.main(argv[1:]) or 0)
    try:
        parser = _build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if args.command is None:
            raise UsageError(f"{PROG}: choose a command: report, check, info or bench (jacgrad --help)")
        if args.command == "report" and args.log is not None:
            from .history import run_history

            return run_history(args)
        if args.command == "report" and args.out is not None:
            raise UsageError("--out plots a run's history: it needs --log RUN.jsonl (a network's figure is --plot)")
        if args.command == "report":
            from .report import run_report

            return run_report(args)
        if args.command == "check":
            from .check import run_check

            return run_check(args)
        from .check import run_info

        return run_info()
    except UsageError as exc:
        print(_one_line(cli_words(str(exc)), argv), file=sys.stderr)
        return 2
    except MemoryError:
        msg = "out of memory: try a smaller --batch, --width or --depth (or --spectrum-samples 0)"
        print(_one_line(msg, argv), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was started (a cluster) closed on the way out; one line
        command = f" {argv[0]}" if argv and argv[0] in ("report", "check", "info") else ""
        print(f"\n{PROG}{command}: interrupted", file=sys.stderr)
        if run_as_program:
            _exit_now(130)
        return 130


def _one_line(msg: str, argv: list[str]) -> str:
    """``jacgrad report: error: …`` on one line, whether argparse or jacgrad found the problem."""
    msg = " ".join(msg.split())
    if msg.startswith(PROG):  # from argparse: "jacgrad report: argument --batch: ..."
        head, _, rest = msg.partition(": ")
        return f"{head}: error: {rest}"
    command = f" {argv[0]}" if argv and argv[0] in ("report", "check", "info") else ""
    return f"{PROG}{command}: error: {msg}"


def _exit_now(code: int) -> None:
    """Leave at once: the threads of Dask's local scheduler still run their current tasks
    (minutes each, maybe) and the interpreter would join them at exit before the process ends."""
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _reconfigure_streams() -> None:
    # The tables use a few Unicode symbols (χ, ‖, φ); never crash on a console that lacks them.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace")
        except (AttributeError, ValueError):
            pass


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

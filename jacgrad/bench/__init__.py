"""``jacgrad bench``: jacgrad against PyTorch and JAX, side by side, on the CPU and the GPU.

Three tasks over a grid of batch × width × depth (tanh MLPs by default, float32):

- ``train``    — forward, MSE loss, gradients of every W and b (a training step);
- ``vjp``      — the VJP chain alone: the input cotangent of an output cotangent;
- ``jacobian`` — per-sample Jacobians of a tapering and an hourglass net.

And, opt-in with ``--tasks`` (softmax cross-entropy; one row per product, checked against the
float64 reference and jacgrad's rows against their peer's result in the same run):

- ``per_sample`` — ``loss_and_grads`` (the scale), ``per_sample_grad_norms``, ``per_sample_grads``
                   against torch.func ``vmap(grad)`` (+ norms) and BackPACK BatchL2Grad / BatchGrad;
- ``ntk``        — ``jg.ntk`` against the two recipes of PyTorch's NTK tutorial;
- ``ggn``        — ``ggn_vp`` against torch.func jvp → H → vjp, ``ggn_diagonal`` against
                   BackPACK DiagGGNExact;
- ``cnn_norms``, ``transformer_norms`` — issue 21's small CNN (B = 64, 3×32×32, convs of 32-64-128)
                   and 2-block transformer (B = 16, T = 128, d = 256, 4 heads): ``loss_and_grads``,
                   the compiled step, ``per_sample_grad_norms`` (auto, gram, instantiate) against
                   torch's own step and torch.func ``vmap(grad)`` + norm (``jacgrad.bench.models``;
                   ``--model-size tiny`` for a smoke test).

Backends: ``jacgrad-numpy``, ``jacgrad-cupy``, ``torch-cpu``, ``torch-cuda``, ``jax-cpu``,
``jax-gpu`` — each where it is installed and usable (skipped with a note otherwise). Every case
is timed interleaved across backends (warm-up, calibrated loops, ``--repeats`` samples; median
and IQR), with device-side synchronisation for GPU timings. The table gives the median ms,
achieved GFLOP/s, the ratio to the fastest peer and the % of the GEMM floor (the same matrix
products timed alone on that backend); ``--json PATH`` writes every number.

    jacgrad bench            # the default grid: 16 train/vjp cases and 2 jacobian cases, on every backend here
    jacgrad bench --quick    # a smoke test: 15 s of CPU time (50 s of wall time on a busy 2-core EPYC)
    jacgrad bench --backends jacgrad-numpy,torch-cpu --tasks train --batch 256 --width 1024 --depth 8
    jacgrad bench --tasks per_sample,ntk,ggn --activation relu    # the parameter-space products
    jacgrad bench --tasks cnn_norms,transformer_norms --backends jacgrad-numpy,torch-cpu

    >>> main(["--backends", "nope"])  # doctest: +SKIP
    jacgrad bench: error: --backends: unknown backend 'nope'; valid backends: jacgrad-numpy, ...
    2
"""

from __future__ import annotations

import sys

from .options import Options, UsageError, parse
from .report import format_table, write_json

__all__ = ["Options", "UsageError", "main", "parse", "run"]


def run(options: Options | None = None, stream=None) -> dict:
    """Run the benchmark (``Options()`` defaults when None); returns the results dict."""
    from .runner import run as _run

    return _run(options or Options(), stream=stream)


def main(argv: list[str] | None = None) -> int:
    """``jacgrad bench ARGS``: print the table (and write ``--json``); 0, or 2 on bad input."""
    try:
        options = parse(list(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"jacgrad bench: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        result = run(options)
    except UsageError as exc:  # a case too big for memory, or no backend that can run
        print(f"jacgrad bench: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:  # the up-front estimate is a lower bound: a case can still not fit
        print("jacgrad bench: error: out of memory: use a smaller --width, --depth or --batch", file=sys.stderr)
        return 2
    print(format_table(result))
    if options.json:
        try:
            write_json(result, options.json)
        except OSError as exc:  # checked before the run; the file system can still refuse
            print(f"jacgrad bench: error: --json {options.json!r}: cannot write ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {options.json}")
    return 0

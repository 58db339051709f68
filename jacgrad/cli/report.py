"""``jacgrad report``: build (or load) the networks, run ``gradient_flow``, print, write JSON/PNG."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from .common import (
    MAX_LAYERS,
    NORMS,
    UsageError,
    block_net,
    check_init,
    check_network_fits,
    check_scheduler_address,
    check_output_path,
    write_output,
    hidden_activations,
    load_weights,
    output_activation,
    parse_activations,
    parse_sizes,
    random_net,
    resolve_device,
)

__all__ = ["run_report"]

DEFAULT_DEPTH = 20
DEFAULT_WIDTH = 256
DEFAULT_ACTIVATIONS = ("sigmoid", "tanh", "relu")  # three networks compared
CURE = ("sigmoid", 2, 1.0, "layernorm")  # and the first one cured: residual blocks of 2 layers with a norm
_NET_OPTIONS = ("depth", "width", "sizes", "activation", "output_activation", "init", "gain", "bias_std")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _short(acts: list[str]) -> str:
    """``relu,relu,tanh`` → ``relu×2,tanh``; one name when all agree."""
    runs: list[list] = []
    for a in acts:
        if runs and runs[-1][0] == a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1])
    if len(runs) == 1:
        return runs[0][0]
    return ",".join(a if n == 1 else f"{a}×{n}" for a, n in runs)


def _usual_init(hidden: list[str]) -> str:
    from ..flow.diagnostics import usual_init

    schemes = {usual_init(a.split("(")[0].strip()) for a in hidden} or {"xavier_normal"}
    return schemes.pop() if len(schemes) == 1 else "xavier_normal"


def _block_options(args) -> tuple:
    """``(residual, residual_scale, norm, data)`` of ``args`` (None where a caller other than the
    parser built ``args`` without them)."""
    return tuple(getattr(args, name, None) for name in ("residual", "residual_scale", "norm", "data"))


def _check_block_options(args) -> None:
    residual, residual_scale, norm, data = _block_options(args)
    if residual is None:
        given = [o for o, v in (("--residual-scale", residual_scale), ("--norm", norm)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --residual K (the blocks)")
        return
    if args.weights is not None or getattr(args, "model", None) is not None:
        raise UsageError(f"--residual cannot be combined with {'--model' if getattr(args, 'model', None) else '--weights'}: "
                         f"the {'module' if getattr(args, 'model', None) else 'file'} defines the network")
    if norm is not None and norm not in NORMS:
        raise UsageError(f"--norm: unknown norm {norm!r}; valid names: {', '.join(NORMS)}")


def _blocks_label(every: int, scale: float, norm) -> str:
    return f" + residual every {every}" + (f" (s={scale:g})" if scale != 1.0 else "") + (f" + {norm}" if norm else "")


def _networks(args, device: str) -> list[tuple[str, object]]:
    _check_block_options(args)
    residual, residual_scale, norm, data = _block_options(args)
    model = getattr(args, "model", None)
    if model is not None:
        clash = [_option(n) for n in _NET_OPTIONS if getattr(args, n) is not None]
        if clash:
            raise UsageError(f"--model cannot be combined with {', '.join(clash)}: the module defines the network "
                             f"(its activation modules name the activations)")
        from .model import network_of_model

        net = network_of_model(model, args.weights, args.dtype, device)
        return [(os.path.basename(args.weights) if args.weights is not None else model, net)]
    if args.weights is not None:
        clash = [_option(n) for n in _NET_OPTIONS if n not in ("activation", "output_activation")
                 and getattr(args, n) is not None]
        if clash:
            raise UsageError(f"--weights cannot be combined with {', '.join(clash)}: the file defines the network")
        if args.activation is not None and len(args.activation) > 1:
            raise UsageError("--weights takes one --activation: the hidden layers' names for a file that carries "
                             "none (one, or one per hidden layer; the output layer's is --output-activation)")
        net = load_weights(args.weights, args.dtype, device, args.activation[0] if args.activation else None,
                           args.output_activation)
        return [(os.path.basename(args.weights), net)]
    if args.sizes is not None and (args.depth is not None or args.width is not None):
        raise UsageError("--sizes cannot be combined with --depth or --width (it gives every width)")
    if args.sizes is not None:
        sizes = parse_sizes(args.sizes)
    else:
        depth = DEFAULT_DEPTH if args.depth is None else args.depth
        if depth > MAX_LAYERS:
            raise UsageError(f"--depth {depth}: more than {MAX_LAYERS:,} layers")
        width = DEFAULT_WIDTH if args.width is None else args.width
        sizes = [width] * (depth + 1)
    check_network_fits(sizes, args.dtype, "--sizes" if args.sizes is not None else "--depth, --width")
    specs = args.activation or list(DEFAULT_ACTIVATIONS)
    hidden_lists = [hidden_activations(spec, len(sizes) - 2) for spec in specs]
    out_act = output_activation(args.output_activation)
    init = check_init(args.init) if args.init is not None else None
    gain = 1.0 if args.gain is None else args.gain
    bias_std = 0.0 if args.bias_std is None else args.bias_std
    nets = []
    for spec, hidden in zip(specs, hidden_lists):
        name = _short(hidden) if hidden else parse_activations(spec)[0]
        scheme = init or _usual_init(hidden or [name])
        label = f"{name}, {scheme}" + (f" x{gain:g}" if gain != 1.0 else "") + (f", bias std {bias_std:g}" if bias_std else "")
        try:
            net = random_net(sizes, hidden or [name], out_act, init=scheme, gain=gain, bias_std=bias_std,
                             seed=args.seed, dtype=args.dtype, device=device)
        except MemoryError:
            raise UsageError(f"the network {args.sizes or sizes[:3]}… does not fit in memory") from None
        if residual is not None:
            scale = 1.0 if residual_scale is None else residual_scale
            label += _blocks_label(residual, scale, norm)
            net = block_net(net, residual, scale, norm)
        nets.append((label, net))
    if args.activation is None and residual is None:
        # the default report: the cure beside the disease, whatever its verdict turns out to be
        act, every, scale, norm = CURE
        label, net = nets[list(DEFAULT_ACTIVATIONS).index(act)]
        nets.append((label + _blocks_label(every, scale, norm), block_net(net, every, scale, norm)))
    return nets


def _require_matplotlib() -> None:
    from ..flow.report import PLOT_INSTALL_HINT

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"--plot: {PLOT_INSTALL_HINT}") from None


def _check_data_options(args) -> None:
    if args.data is None:
        given = [o for o, v in (("--targets", args.targets), ("--workers", args.workers),
                                ("--scheduler", args.scheduler)) if v is not None]
        if given:
            raise UsageError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --data (the samples file)")
    elif args.workers is not None and args.scheduler is not None:
        raise UsageError("give --workers (a local cluster) or --scheduler (a running one), not both")
    if args.scheduler is not None:
        check_scheduler_address(args.scheduler)


def _dataset_reports(args, nets, text_out) -> list:
    """The report of each network over all samples of ``--data``, computed by Dask: a local
    cluster of ``--workers``, the ``--scheduler``'s, or the local scheduler; the progress bar
    on stderr while it works."""
    from ..flow import diagnostics
    from ..distributed import DatasetError, read_dataset, session

    reports = []
    if args.workers is not None:
        _note_local_cluster(args.workers)
    try:
        with session(workers=args.workers, scheduler=args.scheduler, progress=sys.stderr):
            for label, net in nets:
                X, T = read_dataset(args.data, args.targets, net)
                if np.dtype(X.dtype).itemsize > np.dtype(net.dtype).itemsize:  # never rounded silently
                    raise UsageError(f"--data {args.data!r} is {X.dtype} but the network is {net.dtype}: pass "
                                     f"--dtype {X.dtype}, or save the data as {net.dtype}")
                loss = "mse" if T is None or T.ndim == 2 else "softmax_cross_entropy"
                try:
                    rep = diagnostics.gradient_flow(net, X, T, loss=loss, seed=args.seed,
                                                    spectrum_samples=args.spectrum_samples, label=label,
                                                    norm_samples=getattr(args, "norm_samples", None))
                except ValueError as exc:  # non-finite samples or weights
                    raise UsageError(f"--data {args.data!r}: {exc}") from None
                reports.append(rep)
                print(rep.to_text(), file=text_out)
                print(file=text_out)
    except DatasetError as exc:
        raise UsageError(str(exc)) from None
    except ConnectionError as exc:
        raise UsageError(f"--scheduler: {exc}") from None
    return reports


def _note_local_cluster(workers: int) -> None:
    """Say when ``--workers`` cannot help: its processes share this machine's CPUs, which Dask's
    local scheduler already fills with threads (the work is NumPy/BLAS, which releases the GIL).
    Measured on a 2-CPU machine (50,000 x 64 samples, a 64-256x4-10 tanh net, defaults): 5.5 s
    without a cluster against 9.2 s with --workers 2 (load average 2); 21 s against 47-53 s while
    other jobs loaded it (load 10-26); the cluster costs about twice the CPU time (two more
    interpreters, the network and the chunks sent to them)."""
    from .threads import cpu_count

    print(f"note: --workers {workers} starts {workers} processes on this machine's {cpu_count()} CPUs, which "
          "Dask's local scheduler (no --workers) already uses with threads: expect it to be slower, not faster; "
          "a cluster pays off across machines (--scheduler)", file=sys.stderr)


def run_report(args) -> int:
    from ..flow import diagnostics
    from ..core.backend import to_device
    from ..flow.report import plot_reports

    if args.json is not None:
        check_output_path(args.json, "--json")
    if args.plot is not None:
        check_output_path(args.plot, "--plot")
        _require_matplotlib()
        from ..flow.report_plot import plot_format

        try:
            plot_format(args.plot)
        except ValueError as exc:
            raise UsageError(f"--plot: {exc}") from None
    elif getattr(args, "dpi", None) is not None:
        raise UsageError("--dpi needs --plot (the figure it sets the resolution of)")
    # With --json -, stdout carries the JSON alone (pipe it into a JSON reader); the tables go to stderr.
    text_out = sys.stderr if args.json == "-" else sys.stdout
    _check_data_options(args)
    device = resolve_device("cpu" if args.data is not None and args.device == "auto" else args.device)
    if args.data is not None and device != "cpu":
        raise UsageError("--data runs on the CPU workers of a Dask cluster: leave out --device "
                         "(GPU workers: see the README's dask-cuda setup)")
    nets = _networks(args, device)
    if device == "cpu":
        from . import threads as _cli_threads

        if args.data is not None:  # Dask's threads (or worker processes) already use the cores
            _cli_threads.limit(0, why="one per Dask thread")
        else:
            _cli_threads.limit(max(_cli_threads.gemm_macs(net.sizes, args.batch) for _, net in nets))
    reports = []
    if args.data is not None:
        reports = _dataset_reports(args, nets, text_out)
    else:
        n_in = nets[0][1].sizes[0]
        x = np.random.default_rng([args.seed, 1]).standard_normal((args.batch, n_in)).astype(args.dtype)
        x = to_device(x, device)
    for label, net in nets if args.data is None else ():
        try:
            rep = diagnostics.gradient_flow(net, x, seed=args.seed, spectrum_samples=args.spectrum_samples, label=label,
                                            norm_samples=getattr(args, "norm_samples", None))
        except ValueError as exc:  # non-finite weights in a file, mostly
            where = f"--weights {args.weights!r}" if args.weights is not None else label
            raise UsageError(f"{where}: {exc}") from None
        reports.append(rep)
        print(rep.to_text(), file=text_out)
        print(file=text_out)
    if len(reports) > 1:
        print("summary: χ̄ = per-layer factor of the squared gradient norm, Γ = χ̄^L over the depth", file=text_out)
        width = max(len(r.label) for r in reports)
        for r in reports:
            print(f"  {r.label:<{width}}  {r.verdict:<9}  χ̄ = {r.chi_bar:<8.4g} Γ = {r.backward_gain:.3g}", file=text_out)
    if args.json is not None:
        from .. import __version__

        from ..flow.report import _json_safe

        text = json.dumps(
            _json_safe({"jacgrad": __version__, "reports": [r.to_dict() for r in reports]}),
            indent=2, allow_nan=False, ensure_ascii=False,
        )
        if args.json == "-":
            print(text)
        else:
            write_output("--json", args.json, lambda path: _write_text(path, text + "\n"))
    if args.plot is not None:
        write_output("--plot", args.plot, lambda path: plot_reports(reports, path, dpi=getattr(args, "dpi", None)))
    return 0


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)

"""``jacgrad report --log run.jsonl [--out history.png]``: a training run's history, as a
``jg.Monitor`` wrote it — printed as a summary (``jacgrad.flow.monitor_history``) and, with ``--out``,
plotted (matplotlib: without it, one line saying what to install)."""

from __future__ import annotations

from .common import UsageError, check_output_path, write_output

__all__ = ["run_history"]

_NETWORK = ("depth", "width", "sizes", "activation", "output_activation", "init", "gain", "bias_std", "weights",
            "model", "residual", "residual_scale", "norm", "data", "targets", "workers", "scheduler", "json", "plot")


def run_history(args) -> int:
    from ..flow.monitor_history import history_text, plot_history
    from ..flow.monitor import read_log

    given = [f"--{n.replace('_', '-')}" for n in _NETWORK if getattr(args, n, None) is not None]
    if given:
        raise UsageError(f"--log reads a run's history and takes no network: leave out {', '.join(given)} "
                         f"(--out writes the figure)")
    if args.out is not None:
        check_output_path(args.out, "--out")
        from ..flow.report_plot import plot_format
        from ..flow.report import PLOT_INSTALL_HINT

        try:
            plot_format(args.out)
        except ImportError:
            raise UsageError(f"--out: {PLOT_INSTALL_HINT}") from None
        except ValueError as exc:
            raise UsageError(f"--out: {exc}") from None
    try:
        rows = read_log(args.log)
    except FileNotFoundError:
        raise UsageError(f"--log {args.log!r}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"--log {args.log!r} is a directory, not a Monitor's JSONL file") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--log: {exc}") from None
    if not rows:
        raise UsageError(f"--log {args.log!r} holds no rows yet (a Monitor writes one every `every` steps)")
    print(history_text(rows, args.log))
    if args.out is not None:
        write_output("--out", args.out, lambda path: plot_history(rows, path, dpi=getattr(args, "dpi", None)))
    return 0

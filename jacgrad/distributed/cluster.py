"""Where the graphs run: ``session`` for the command line (a local cluster of N workers, a
scheduler's address, or Dask's local scheduler) and ``compute``, the one call that runs lazy
results there, with Dask's own progress bar on the session's stream.

    with jg.distributed.session(workers=2, progress=sys.stderr):
        (s,) = jg.distributed.compute(jg.distributed.jacobian_spectral_norm(net, X))
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from typing import Any, TextIO

from .budget import active_client

__all__ = ["LineProgress", "compute", "session"]

_PROGRESS: contextvars.ContextVar = contextvars.ContextVar("jacgrad_distributed_progress", default=None)


@contextlib.contextmanager
def session(workers: int | None = None, scheduler: str | None = None, *, progress: TextIO | None = None,
            timeout: float = 30.0):
    """Run ``compute`` calls inside on: a new ``LocalCluster`` of ``workers`` processes (one thread
    each), the scheduler at ``scheduler`` (``"tcp://host:8786"``), or, with neither, Dask's local
    scheduler (or the client already active). ``progress``: a stream for the progress bar (None:
    no bar). Yields the ``distributed.Client`` or None; closes what it started."""
    if workers is not None and scheduler is not None:
        raise ValueError("give workers or a scheduler address, not both")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive number of processes, got {workers!r}")
    with contextlib.ExitStack() as stack:
        client = None
        if workers is not None or scheduler is not None:
            import distributed

            if workers is not None:
                cluster = stack.enter_context(distributed.LocalCluster(
                    n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None))
                client = stack.enter_context(distributed.Client(cluster))
            else:
                try:
                    client = distributed.Client(scheduler, timeout=timeout)
                except (OSError, TimeoutError) as exc:
                    raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
                stack.callback(client.close)
        token = _PROGRESS.set(progress)
        stack.callback(_PROGRESS.reset, token)
        yield client


def compute(*lazy: Any) -> tuple:
    """The values of Dask arrays / delayed objects, computed together (shared tasks once) on the
    active client or the local scheduler; progress on the stream of the enclosing
    ``session(progress=…)``: Dask's bar on a terminal, plain lines elsewhere (``LineProgress``).
    Non-Dask arguments are returned as they are."""
    import dask

    stream = _PROGRESS.get()
    client = active_client()
    if client is None:
        if stream is None:
            return dask.compute(*lazy)
        if _is_tty(stream):
            from dask.diagnostics import ProgressBar

            with ProgressBar(out=stream):
                return dask.compute(*lazy)
        with LineProgress(stream) as lines, _LocalCounter(lines):
            return dask.compute(*lazy)
    futures = client.compute(list(lazy))
    if stream is not None and _is_tty(stream):
        from distributed import progress

        with contextlib.redirect_stdout(stream):  # distributed's text bar writes to stdout
            progress(futures, multi=False)
    elif stream is not None:
        with LineProgress(stream) as lines:
            _follow_futures(client, futures, lines)
    return tuple(client.gather(futures))


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """Progress as plain lines for a stream that is not a terminal (a log file, a pipe, CI): one
    line when the work starts, then one at most every ``every`` seconds (default 30: two a
    minute) while it runs, and one when it ends — never ``\r`` redraws.

        jacgrad: computing 40 tasks
        jacgrad: 12 of 40 tasks done (30%), 30 s elapsed
        jacgrad: 40 of 40 tasks done (100%) in 1 min 12 s
    """

    def __init__(self, stream: TextIO, every: float = 30.0):
        self.stream, self.every = stream, float(every)
        self.done = self.total = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def update(self, done: int, total: int) -> None:
        with self._lock:
            self.done, self.total = int(done), int(total)

    def _line(self, text: str) -> None:
        try:
            self.stream.write(f"jacgrad: {text}\n")
            self.stream.flush()
        except (ValueError, OSError):  # a closed stream: progress is not worth an error
            pass

    def _state(self) -> str:
        with self._lock:
            done, total = self.done, self.total
        share = f" ({100 * done // total}%)" if total else ""
        return f"{done} of {total} tasks done{share}"

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self._line(f"{self._state()}, {_duration(time.monotonic() - self._t0)} elapsed")

    def __enter__(self):
        self._t0 = time.monotonic()
        self._line("computing" + (f" {self.total} tasks" if self.total else ""))
        self._thread = threading.Thread(target=self._beat, name="jacgrad-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, kind, value, tb):
        self._stop.set()
        self._thread.join()
        if kind is None:
            self._line(f"{self._state()} in {_duration(time.monotonic() - self._t0)}")
        return False


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


class _LocalCounter:
    """A ``dask.callbacks.Callback`` that hands the local scheduler's task counts to a ``LineProgress``."""

    def __init__(self, lines: LineProgress):
        from dask.callbacks import Callback

        def start_state(dsk, state):
            lines.update(len(state["finished"]), len(state["finished"]) + sum(
                len(state[k]) for k in ("ready", "waiting", "running")))

        def posttask(key, result, dsk, state, worker_id):
            start_state(dsk, state)

        self._cb = Callback(start_state=start_state, posttask=posttask)

    def __enter__(self):
        self._cb.__enter__()
        return self

    def __exit__(self, *exc):
        return self._cb.__exit__(*exc)


def _follow_futures(client, futures, lines: LineProgress) -> None:
    """Wait for ``futures`` on ``client``; distributed's own progress plugin counts the tasks they
    depend on (the scheduler streams ``remaining`` and ``all``), handed to ``lines``."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class Counter(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            lines.update(all - remaining, all)

        def _draw_stop(self, **kwargs):
            pass

    Counter(futures, scheduler=client.scheduler.address, complete=True)  # returns when they are done

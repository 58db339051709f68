"""Where the graphs run: ``session`` for the command line (a local cluster of N workers, a
scheduler's address, or Dask's local scheduler) and ``compute``, the one call that runs lazy
results there, with Dask's own progress bar on the session's stream.

    with jg.distributed.session(workers=2, progress=sys.stderr):
        (s,) = jg.distributed.compute(jg.distributed.jacobian_spectral_norm(net, X))
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, TextIO

from .budget import active_client

__all__ = ["compute", "session"]

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
    active client or the local scheduler; a progress bar on the stream of the enclosing
    ``session(progress=…)``. Non-Dask arguments are returned as they are."""
    import dask

    stream = _PROGRESS.get()
    client = active_client()
    if client is None:
        if stream is None:
            return dask.compute(*lazy)
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=stream):
            return dask.compute(*lazy)
    futures = client.compute(list(lazy))
    if stream is not None:
        from distributed import progress

        with contextlib.redirect_stdout(stream):  # distributed's text bar writes to stdout
            progress(futures, multi=False)
    return tuple(client.gather(futures))

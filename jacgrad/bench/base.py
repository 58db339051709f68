"""The interface every backend of ``jacgrad bench`` implements, and the GEMM-floor operands.

A backend turns a ``Case`` and its float64 ``NetData`` into a ``Prepared``: one callable per
variant (torch's and JAX's per-sample Jacobians come as ``jacrev`` and ``jacfwd``; the better one
is reported), the device synchronisation, and a function that copies a result to NumPy for the
agreement check. ``gemm_floor`` builds the case's matrix products alone on the same backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .cases import Case, Gemm, NetData

__all__ = ["Backend", "Prepared", "gemm_operands", "host64"]


@dataclass
class Prepared:
    """``variants``: name → zero-argument callable ('' when there is one); ``sync(result)``;
    ``outputs(result)`` → list of NumPy arrays; ``compile_ms``: variant → jit compile time;
    ``notes``: variant → a remark printed in its row (whether a CUDA graph was recorded).

    Variants are alternatives of which the table reports the fastest (``jacrev``/``jacfwd``),
    except those named in ``own_rows``: each gets a row of its own, ``backend[variant]``
    (jacgrad's ``compiled`` training step next to the eager one).

    Tasks whose variants compute different things (``per_sample``: the loss and gradients, the
    per-sample norms, the per-sample gradients) name each variant's result in ``kinds``
    (variant → kind; checked against the reference's result of that kind, compared with the
    peers' rows of that kind) and give its NumPy copy in ``outputs_of`` (variant → function;
    ``outputs`` otherwise). ``skipped``: variant → why it cannot run here (a peer library not
    installed, a recipe too big for memory); it becomes a row of its own saying so.
    """

    variants: dict[str, Callable[[], Any]]
    sync: Callable[[Any], Any] = lambda result: None
    outputs: Callable[[Any], list] = lambda result: []
    compile_ms: dict[str, float] = field(default_factory=dict)
    own_rows: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)  # variant → a remark for its row
    kinds: dict[str, str] = field(default_factory=dict)
    outputs_of: dict[str, Callable[[Any], list]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def kind(self, variant: str) -> str:
        return self.kinds.get(variant, "")

    def outputs_for(self, variant: str, result) -> list:
        return self.outputs_of.get(variant, self.outputs)(result)


class Backend:
    """Base: ``name`` (``family-device``), ``family``, ``device`` (``cpu``/``gpu``)."""

    family = ""
    device = "cpu"

    @property
    def name(self) -> str:
        return f"{self.family}-{self.device_label}"

    @property
    def device_label(self) -> str:
        return self.device

    def unavailable(self) -> str | None:
        """Why this backend cannot run here, or None."""
        return None

    def threads(self) -> str:
        return ""

    def supports(self, task: str) -> bool:
        """Whether this backend has a recipe for ``task`` (else it sits the task's cases out)."""
        return True

    def prepare(self, case: Case, data: NetData) -> Prepared:
        raise NotImplementedError

    def gemm_floor(self, gemms: list[Gemm], dtype: str) -> Prepared:
        raise NotImplementedError


def gemm_operands(gemms: list[Gemm], alloc: Callable[[tuple], Any]):
    """(A, B, C) per product, in its layout; operands of equal shape and layout are shared."""
    cache: dict = {}

    def get(key, shape):
        if key not in cache:
            cache[key] = alloc(shape)
        return cache[key]

    ops = []
    for g in gemms:
        batch = (g.count,) if g.count > 1 else ()
        a = get(("a", g.layout, batch, g.m, g.k), batch + ((g.k, g.m) if g.layout == "tn" else (g.m, g.k)))
        b = get(("b", g.layout, batch, g.k, g.n), batch + ((g.n, g.k) if g.layout == "nt" else (g.k, g.n)))
        c = get(("c", batch, g.m, g.n), batch + (g.m, g.n))
        ops.append((a, b, c, g.layout))
    return ops


def host64(items) -> list:
    from ..core.backend import to_numpy

    return [np.array(to_numpy(a), dtype=np.float64) for a in items]  # copies: results may be reused buffers

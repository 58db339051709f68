"""Whether the rows of a ``jacgrad bench`` case computed the right numbers.

Every row is checked against jacgrad on NumPy in float64 (``reference``: one result per
``kind`` of output, from the same dtype-rounded weights and inputs), or — above a FLOP limit,
where that reference would take longer than the timings — against the first jacgrad row of its
kind. jacgrad's rows are also checked against the first peer row of their kind (torch, JAX,
BackPACK): the float64 reference is jacgrad itself, so it is the peer that catches a jacgrad bug.
A disagreement beyond ``TOL`` is a ``MISMATCH`` in the row's note.
"""

from __future__ import annotations

import numpy as np

from .cases import Case, NetData

__all__ = ["TOL", "check_rows", "reference"]

# Cases above this many FLOPs are checked against the first jacgrad backend's result instead of a
# float64 NumPy reference (which would take longer than the timings themselves).
_REFERENCE_FLOP_LIMIT = 3e10
TOL = {"float32": 2e-3, "float64": 1e-9}


def _compare(got: list, ref: list) -> float:
    """The worst ``max|a − b| / max|b|`` over the outputs (inf when the shapes differ)."""
    if len(got) != len(ref):
        return float("inf")
    worst = 0.0
    for a, b in zip(got, ref):
        if a.shape != b.shape:
            return float("inf")
        scale = float(np.abs(b).max()) if b.size else 0.0
        err = float(np.abs(a - b).max()) if b.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def reference(case: Case, data: NetData) -> dict | None:
    """kind → the float64 outputs of jacgrad's first variant of that kind (None above the FLOP limit)."""
    from .backend_jacgrad import Jacgrad

    if case.flops > _REFERENCE_FLOP_LIMIT:
        return None
    d64 = NetData(data.weights, data.biases, data.activations, data.x, data.target, data.v, "float64")
    ref = Jacgrad("cpu").prepare(case, d64)
    out: dict = {}
    for v, fn in ref.variants.items():
        if ref.kind(v) not in out:
            out[ref.kind(v)] = ref.outputs_for(v, fn())
    return out


def check_rows(rows: list[dict], ref: dict | None, tol: float) -> None:
    """Pop every row's ``check`` (variant → ``(kind, outputs)``) and record ``check_rel_err``,
    ``check_against``, and for jacgrad's rows ``peer_rel_err`` and ``peer_checked_against``."""
    base = ref
    if base is None:
        base = {}
        for r in rows:
            if r.get("check") and r["family"] == "jacgrad":
                for kind, outs in r["check"].values():
                    base.setdefault(kind, outs)
    peers: dict = {}  # kind → (backend, outputs) of the first peer row that gave it
    for r in rows:
        if r.get("check") and r["family"] != "jacgrad":
            for kind, outs in r["check"].values():
                peers.setdefault(kind, (r["backend"], outs))
    for r in rows:
        outs = r.get("check") or {}
        mine = [(peers[kind], got) for kind, got in outs.values() if kind in peers]
        if r["family"] == "jacgrad" and mine:  # jacgrad's own result against its peer's, too
            err = max(_compare(got, peer[1]) for peer, got in mine)
            r["peer_rel_err"], r["peer_checked_against"] = err, mine[0][0][0]
            if not err <= tol:
                r["note"] = (r["note"] + f" MISMATCH with {mine[0][0][0]}: rel. err. {err:.1e} > {tol:.0e}").strip()
    for r in rows:
        outs = r.pop("check", None)
        if outs is not None and not all(kind in base for kind, _ in outs.values()):
            r["note"] = (r["note"] + " not checked: no jacgrad result of its kind").strip()
        elif outs is not None:
            err = max(_compare(got, base[kind]) for kind, got in outs.values())
            r["check_rel_err"] = err
            r["check_against"] = "float64 reference" if ref is not None else "jacgrad"
            if not err <= tol:
                r["note"] = (r["note"] + f" MISMATCH: rel. err. {err:.1e} > {tol:.0e}").strip()

"""What ``jacgrad bench`` shows: a plain-text progress bar on stderr, the results table, JSON.

Columns of the table, one row per (case, backend):

- ``median ms`` and ``IQR ms`` of the interleaved repeats;
- ``GFLOP/s``: the case's useful FLOPs (its GEMM list, see ``cases``) over the median;
- ``×peer``: median over the fastest *peer* (torch, jax — not jacgrad) on the same kind of
  device; for a jacgrad row this is the ratio of the targets (≤ 1.00 means as fast or faster);
- ``%floor``: the GEMM floor (the case's matrix products timed alone on that backend) over the
  median — how much of the time is the unavoidable matrix work;
- ``note``: the variant chosen (``jacrev``/``jacfwd``), JIT compile time, a failure or a
  disagreement with the reference; for the parameter-space tasks the ratio to jacgrad's
  ``loss_and_grads`` in the same run. Their ``task`` cell names the result too
  (``per_sample:norms``): ``×peer`` compares rows of one result only.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_table", "strict_json", "write_json"]


class Progress:
    """``[#######.............]  37%  12/32  train 8×1024 B=256 · torch-cpu`` on stderr.

    On a terminal the line is redrawn in place; elsewhere (a log, a pipe) a line is printed
    at most every 10 % so logs stay short. ``enabled=False`` prints nothing.
    """

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True, width: int = 24):
        self.total, self.done, self.width = max(1, total), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1
        self._t0 = time.perf_counter()
        self.what = ""

    def advance(self, what: str | None = None, steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        if what is not None:
            self.what = what
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(round(frac * self.width))
        line = (f"[{bar:.<{self.width}}] {frac:4.0%} {self.done}/{self.total} "
                f"{time.perf_counter() - self._t0:5.0f}s  {self.what}")
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(line + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 110 + "\r")
            self.stream.flush()


def _num(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _ms(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


def format_table(result: dict) -> str:
    """The results table of ``runner.run``'s dict, with its header lines."""
    env = result["environment"]
    lines = [
        f"jacgrad bench — {result['options']['dtype']}, activation {result['options']['activation']}, "
        f"{result['options']['repeats']} repeats (median, IQR), warm-up {result['options']['warmup']}",
        f"machine: {env.get('cpu', '?')}" + (f"; GPU: {env['gpu']}" if env.get("gpu") else ""),
        f"threads: {env['threads_line']}",
    ]
    if env.get("blas_line"):
        lines.append(f"BLAS: {env['blas_line']}")
    if env.get("blas_warning"):
        lines.append(f"warning: {env['blas_warning']}")
    load = env.get("load_average") or {}
    if load.get("start") is not None:
        busy = max(load["start"], load.get("end") or 0) > 0.5 * env.get("thread_report", {}).get("cpus", 1)
        lines.append(f"load average: {load['start']:.2f} at start, {load.get('end') or 0:.2f} at the end"
                     + (" — other processes were busy: expect noise, compare ratios within this run" if busy else ""))
    for name, reason in result["skipped"].items():
        lines.append(f"skipped {name}: {reason}")
    lines.append("×peer = median / fastest peer (torch, jax) of the same result on the same device kind; "
                 "%floor = the case's GEMMs alone / median")
    head = ("task", "net", "B", "backend", "median ms", "IQR ms", "GFLOP/s", "×peer", "%floor", "note")
    rows = []
    for r in result["rows"]:
        ok = r["status"] == "ok"
        note = r.get("note", "")
        if not ok:
            note = f"{'skipped' if r['status'] == 'skipped' else 'FAILED'}: {r.get('error', '')}"
        kind = r.get("kind") or ""
        rows.append((
            r["task"] + (f":{kind}" if kind and kind != r["task"] else ""), r["net"], str(r["batch"]), r["backend"],
            _ms(r.get("median_ms")) if ok else r["status"],
            _ms(r.get("iqr_ms")) if ok else "",
            _num(r.get("gflops_per_s"), ".1f") if ok else "",
            _num(r.get("ratio_to_fastest_peer"), ".2f") if ok else "",
            (_num(r.get("pct_floor"), ".0f") + "%" if r.get("pct_floor") is not None else "—") if ok else "",
            note,
        ))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    right = {2, 4, 5, 6, 7, 8}

    def fmt(row):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    lines += ["", fmt(head), fmt(tuple("-" * w for w in widths))]
    prev = None
    for raw, row in zip(result["rows"], rows):
        key = (raw["task"], raw["net"], raw["batch"])
        if prev is not None and key != prev:
            lines.append("")
        prev = key
        lines.append(fmt(row))
    lines.append("")
    lines.append(f"total {result['elapsed_s']:.1f} s")
    return "\n".join(lines)


def strict_json(o: Any) -> Any:
    """``o`` with every non-finite float as the string ``"inf"``, ``"-inf"`` or ``"nan"`` (JSON has
    no such numbers), NumPy scalars as Python numbers, tuples as lists."""
    if isinstance(o, dict):
        return {str(k): strict_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [strict_json(v) for v in o]
    if hasattr(o, "item") and getattr(o, "ndim", None) == 0:  # NumPy scalar or 0-d array
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return o


def write_json(result: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(strict_json(result), f, indent=1, default=str, allow_nan=False)
        f.write("\n")

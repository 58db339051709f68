"""Running ``jacgrad bench``: build the cases, prepare every backend, time them side by side.

For each case every available backend is prepared (arrays converted, JAX functions compiled),
run once to check it computes the reference numbers (``agreement``), and then all backends,
their variants and their GEMM floors are timed interleaved (``timing.time_entries``). A backend that fails —
at preparation, at its check run or while timed — becomes a ``failed`` row with its error; the
others go on. The reference is jacgrad on NumPy in float64, from the same (dtype-rounded)
weights and inputs: one result per ``kind`` of output (the parameter-space tasks time several
products per case; each row is checked against the reference of its kind, and compared with
the peers' rows of its kind).
"""

from __future__ import annotations

import importlib.util
import time
import warnings

from . import backends as _backends
from .agreement import TOL, check_rows, reference
from .base import Backend
from .cases import PARAM_SPACE_TASKS, TASKS, Case, make_data, parse_net
from .machine import available_memory, environment, load_average
from .options import Options, UsageError
from .report import Progress
from .timing import Entry, cpu_count, set_threads, short_error, time_entries

__all__ = ["add_ratios", "bench_threads", "build_cases", "check_memory", "run", "run_case", "start_backends"]


def build_cases(o: Options) -> list[Case]:
    """The train/vjp grid (batch × width × depth, rectangular nets), the jacobian nets, and the
    nets of the parameter-space tasks (``--param-nets`` × ``--param-batch``, ``--ntk-nets`` × ``--ntk-n``)."""
    cases = []
    for task in o.tasks:
        grid = TASKS[task].grid
        if grid == "model":
            from .models import SIZES, label

            spec = SIZES[o.model_size][task]
            cases.append(Case(task, [1, 1], spec["batch"], name=label(task, spec), dtype=o.dtype, spec=spec))
        elif grid in ("param", "ntk"):
            nets, batches = (o.param_nets, o.param_batch) if grid == "param" else (o.ntk_nets, o.ntk_n)
            for spec in nets:
                name, widths = parse_net(spec)
                for B in batches:
                    cases.append(Case(task, widths, B, name=name, activation=o.activation, dtype=o.dtype))
        elif grid == "rect":
            for depth in o.depth:
                for width in o.width:
                    for B in o.batch:
                        cases.append(Case(task, [width] * (depth + 1), B, activation=o.activation, dtype=o.dtype))
        else:
            for spec in o.nets:
                name, widths = parse_net(spec)
                for B in o.jac_batch:
                    cases.append(Case(task, widths, B, name=name, activation=o.activation, dtype=o.dtype))
    return cases


def run_case(case: Case, live: list[Backend], o: Options, progress: Progress) -> list[dict]:
    """Rows (one per backend) of one case, timed interleaved."""
    data = make_data(case, seed=o.seed)
    ref = reference(case, data) if o.check else None
    progress.advance(f"{case.key()} · reference")
    rows, entries, groups = [], [], []
    for b in live:
        if not b.supports(case.task):
            continue
        row = _new_row(case, b, b.name)
        rows.append(row)
        try:
            with warnings.catch_warnings():  # torch.func's first use warns about torch.jit internals
                warnings.simplefilter("ignore", DeprecationWarning)
                prep = b.prepare(case, data)
                _check_run(prep, row, o.check)
        except Exception as exc:  # noqa: BLE001 - a peer failing is a result
            row.pop("check", None)
            row.update(status="failed", error=short_error(exc))
            progress.advance(f"{case.key()} · {b.name} failed", steps=_units(case, b, o))
            continue
        floor = None
        try:
            if case.gemms:  # a model task has no GEMM floor
                floor = Entry(f"{b.name}:floor", *_floor(b, case))
                entries.append(floor)
        except Exception as exc:  # noqa: BLE001
            row["floor_error"] = short_error(exc)
        variants = {v: Entry(f"{b.name}[{v}]" if v else b.name, fn, prep.sync) for v, fn in prep.variants.items()}
        entries += list(variants.values())
        progress.total += (len(variants) - _variants_guess(case, b)) * (1 + o.repeats)
        best_of = {v: e for v, e in variants.items() if v not in prep.own_rows}
        if best_of:
            row["kind"] = prep.kind(next(iter(best_of)))
            groups.append((row, best_of, floor, prep.compile_ms))
        else:  # every variant has a row of its own
            rows.remove(row)
        for v in prep.own_rows:
            own = _new_row(case, b, f"{b.name}[{v}]")
            own["variant"], own["kind"] = v, prep.kind(v)
            own["note"] = prep.notes.get(v, "")
            checks = row.get("check", {})
            if v in checks:
                own["check"] = {v: checks.pop(v)}
            rows.append(own)
            groups.append((own, {v: variants[v]}, floor, prep.compile_ms))
        for v, why in prep.skipped.items():  # a peer library absent, a recipe too big for memory
            skip = _new_row(case, b, f"{b.name}[{v}]")
            skip.update(variant=v, kind=prep.kind(v), status="skipped", error=why)
            rows.append(skip)
        progress.advance(f"{case.key()} · {b.name} ready")

    if o.check:
        check_rows(rows, ref, TOL[case.dtype])

    time_entries(entries, o.repeats, o.warmup, o.min_time,
                 tick=lambda label: progress.advance(f"{case.key()} · {label}"))

    for row, variants, floor, compile_ms in groups:
        _fill(row, case, variants, floor, compile_ms)
    order: dict = {}  # rows of one kind side by side, kinds in the order they first appear
    for r in rows:
        order.setdefault(r.get("kind", ""), len(order))
    return sorted(rows, key=lambda r: order[r.get("kind", "")])


def _new_row(case: Case, b: Backend, name: str) -> dict:
    return {"task": case.task, "net": case.label, "widths": case.widths, "batch": case.batch,
            "backend": name, "family": b.family, "device": b.device, "flops": case.flops,
            "status": "ok", "note": ""}


def _check_run(prep, row: dict, check: bool) -> None:
    """Run every variant once (it is also a warm-up); keep ``(kind, outputs)`` in ``row["check"]``."""
    for v, fn in prep.variants.items():
        result = fn()
        prep.sync(result)
        if check:
            row.setdefault("check", {})[v or "default"] = (prep.kind(v), prep.outputs_for(v, result))


def _floor(b: Backend, case: Case):
    prep = b.gemm_floor(case.gemms, case.dtype)
    return prep.variants[""], prep.sync


def _fill(row: dict, case: Case, variants: dict[str, Entry], floor: Entry | None, compile_ms: dict) -> None:
    timed = {v: e for v, e in variants.items() if e.error is None and e.samples}
    if not timed:
        e = next(iter(variants.values()))
        row.update(status="failed", error=e.error or "no samples")
        return
    best = min(timed, key=lambda v: timed[v].stats()["median_ms"])
    s = timed[best].stats()
    row.update({k: s[k] for k in ("median_ms", "iqr_ms", "q1_ms", "q3_ms", "min_ms", "n")})
    row["number"] = timed[best].number
    row["gflops_per_s"] = case.flops / (s["median_ms"] * 1e-3) / 1e9 if s["median_ms"] > 0 and case.flops else None
    notes = []
    if best and len(variants) > 1:
        row["variant"] = best
        others = [f"{v} {timed[v].stats()['median_ms'] / s['median_ms']:.2f}×" for v in timed if v != best]
        failed = [f"{v} failed" for v, e in variants.items() if e.error is not None]
        notes.append(best + (f" ({', '.join(others + failed)})" if others or failed else ""))
        row["variants_ms"] = {v: e.stats().get("median_ms") for v, e in variants.items()}
    compile_ms = {v: ms for v, ms in compile_ms.items() if v in variants}
    if compile_ms:
        row["compile_ms"] = compile_ms
        ms = compile_ms.get(best)
        if ms is not None:
            notes.append(f"{'compile' if row['family'] == 'jacgrad' else 'jit'} {ms:.0f} ms")
    if floor is not None and floor.error is None and floor.samples:
        fs = floor.stats()
        row["floor_ms"] = fs["median_ms"]
        row["pct_floor"] = 100.0 * fs["median_ms"] / s["median_ms"]
    elif floor is not None:
        row["floor_error"] = floor.error
    row["note"] = "; ".join(notes + ([row["note"]] if row["note"] else []))


def add_ratios(rows: list[dict]) -> None:
    """``ratio_to_fastest_peer``: median over the fastest torch/jax row of the same case, device
    kind and result kind. ``ratio_to_loss_and_grads``: median over jacgrad's ``loss_and_grads``
    row of the same case and device (the parameter-space tasks' scale; also in a jacgrad row's note)."""
    groups: dict = {}
    cases: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["net"], r["batch"], r["device"], r.get("kind", "")), []).append(r)
        cases.setdefault((r["task"], r["net"], r["batch"], r["device"]), []).append(r)
    for group in groups.values():
        peers = [r["median_ms"] for r in group if r["family"] != "jacgrad" and r["status"] == "ok"]
        best = min(peers) if peers else None
        for r in group:
            r["fastest_peer_ms"] = best
            r["ratio_to_fastest_peer"] = r["median_ms"] / best if best and r["status"] == "ok" else None
    for group in cases.values():
        scale = next((r for r in group if r["family"] == "jacgrad" and r.get("kind") == "loss_and_grads"
                      and r["status"] == "ok"), None)
        if scale is None:
            continue
        for r in group:
            if r["status"] == "ok" and r is not scale:
                r["ratio_to_loss_and_grads"] = ratio = r["median_ms"] / scale["median_ms"]
                if r["family"] == "jacgrad":
                    r["note"] = "; ".join(filter(None, [f"{ratio:.2f}× loss_and_grads", r["note"]]))


def _variants_guess(case: Case, b: Backend) -> int:
    """How many variants a backend will time (for the progress bar, before it is prepared)."""
    if case.spec is not None:  # a model task: loss_and_grads, compiled, three norms; torch's step and torch.func
        return {"jacgrad": 5, "torch": 2}.get(b.family, 0)
    if case.task in PARAM_SPACE_TASKS:
        per_family = {"jacgrad": {"per_sample": 3, "ntk": 2, "ggn": 3}, "torch": {"per_sample": 5, "ntk": 2, "ggn": 3}}
        return per_family.get(b.family, {}).get(case.task, 0)
    if b.family == "jacgrad":
        return 2 if case.task == "train" else 1
    return 2 if case.task == "jacobian" else 1


def _units(case: Case, b: Backend, o: Options) -> int:
    return 1 + (_variants_guess(case, b) + 1) * (1 + o.repeats)


def start_backends(names: list[str], n_threads: int) -> tuple[list[Backend], dict, dict]:
    """Set the CPU threads (NumPy's BLAS, torch, XLA's pool) to ``n_threads`` and sort the named
    backends into usable ones and skipped ones (name → reason). Returns (live, skipped, threads)."""
    threads = set_threads(n_threads)
    live, skipped = [], {}
    if "jax-cpu" in names and importlib.util.find_spec("jax") is not None:
        from .peer_jax import Jax

        Jax.limit_threads(threads["requested"])  # before anything starts JAX's backends
    for name in names:
        b = _backends.get(name)
        reason = b.unavailable()
        if reason is None:
            live.append(b)
        else:
            skipped[name] = reason
    if any(b.family == "torch" for b in live):
        import torch

        torch.set_num_threads(threads["requested"])
    return live, skipped, threads


def bench_threads(requested: int | None) -> int:
    """The CPU threads of every contender: ``--threads``, else the count the environment names
    (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``: honoured, never
    overridden), else every CPU."""
    from ..cli.threads import user_setting

    if requested is not None:
        return requested
    user = user_setting()
    return user[1] if user is not None else cpu_count()


def _gib(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def check_memory(cases: list[Case], available: int | None = None) -> None:
    """``UsageError`` before anything runs when a case needs more host memory than is available
    (``Case.memory_bytes``, a lower bound, against ``MemAvailable``)."""
    available = available_memory() if available is None else available
    if available is None or not cases:
        return
    worst = max(cases, key=lambda c: c.memory_bytes())
    need = worst.memory_bytes()
    if need > available:
        raise UsageError(
            f"the case {worst.key()} needs at least {_gib(need)} of memory ({worst.parameters:,} parameters in "
            f"float64 and {worst.dtype}), but {_gib(available)} is available: use a smaller --width, --depth or --batch"
        )


def _require_live(live: list[Backend], skipped: dict) -> None:
    if not live:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped.items())
        raise UsageError(f"--backends: none of the backends can run here ({reasons})")


def run(o: Options, stream=None) -> dict:
    """Run the benchmark described by ``o``; returns the dict that the table and JSON show.

    ``UsageError`` before any timing when a case cannot fit in memory or no backend can run."""
    t0 = time.perf_counter()
    load_start = load_average()
    cases = build_cases(o)
    if any(c.spec is not None for c in cases) and importlib.util.find_spec("torch") is None:
        raise UsageError("--tasks cnn_norms/transformer_norms build the models in torch, which is not installed "
                         "(pip install torch)")
    check_memory(cases)
    live, skipped, threads = start_backends(o.backends, bench_threads(o.threads))
    _require_live(live, skipped)
    progress = Progress(sum(1 + sum(_units(c, b, o) for b in live) for c in cases), stream=stream, enabled=o.progress)
    rows = []
    try:
        for case in cases:
            rows += run_case(case, live, o, progress)
    finally:
        progress.close()
    add_ratios(rows)
    env = environment(threads, live)
    env["load_average"] = {"start": load_start, "end": load_average()}
    return {
        "options": o.to_dict(),
        "environment": env,
        "skipped": skipped,
        "rows": rows,
        "elapsed_s": time.perf_counter() - t0,
    }

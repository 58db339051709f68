"""The report of ``gpu_suite.py``: the issue's targets from the measured numbers, and results.md."""

from __future__ import annotations

from jacgrad.bench.report import format_table


def _row(results: dict, case: str, backend: str) -> dict | None:
    peers = results["sections"].get("peers", {}).get("data") or {}
    for r in (peers.get("bench") or {}).get("rows", []):
        if r.get("case") == case and r["backend"] == backend and r["status"] == "ok":
            return r
    return None


def _vs(results: dict, case: str, mine: str, peer: str) -> float | None:
    a, b = _row(results, case, mine), _row(results, case, peer)
    return a["median_ms"] / b["median_ms"] if a and b else None


def targets(results: dict) -> list[dict]:
    """The GPU targets of issue 5, each with its measured value (None: not measured) and verdict."""
    dry = results.get("dry_run_cpu")
    me, torch = ("jacgrad-numpy", "torch-cpu") if dry else ("jacgrad-cupy", "torch-cuda")
    out = []

    def add(name, measured, goal, met, note=""):
        out.append({"target": name, "measured": measured, "goal": goal,
                    "met": None if measured is None or met is None else met, "note": note})

    r = _vs(results, "large_train", me, torch)
    add("large training step (B=4096, 8×4096) vs torch eager", r, "≤ 0.95×", r is not None and r <= 0.95)
    row = _row(results, "large_train", me)
    pct = row.get("pct_floor") if row else None
    add("large training step, % of the GEMM floor", pct, "≥ 85%", pct is not None and pct >= 85)
    r = _vs(results, "large_train", f"{me}[compiled]", torch)
    add("large training step, compiled (net.compile), vs torch eager", r, "≤ 0.95×", r is not None and r <= 0.95)
    r = _vs(results, "small_train", f"{me}[compiled]", torch)
    add("small net (B=64, 32×256) with graph capture (net.compile): speed-up over torch eager",
        None if r is None else 1 / r, "≥ 3×", r is not None and 1 / r >= 3)
    r = _vs(results, "small_train", me, torch)
    add("small net (B=64, 32×256) eager: speed-up over torch eager", None if r is None else 1 / r, "—", None,
        "for reference: no capture")
    fused = results["sections"].get("fused_kernel", {}).get("data") or {}
    rows = fused.get("rows", [])
    for label, pick in (("same shape", lambda x: x.get("shape", "same") == "same"),
                        ("(H,) row broadcast", lambda x: x.get("shape") == "row")):
        main = [x for x in rows if x.get("kernel", "scale_cotangent") == "scale_cotangent" and x["activation"] == "tanh"
                and x["dtype"] == "float32" and x["from_output"] and pick(x)]
        pct = main[0].get("pct_of_copy") if main else None
        add(f"fused backward kernel scale_cotangent (tanh, float32, {label}) % of copy bandwidth", pct, "≥ 85%",
            pct is not None and pct >= 85)
    norm = (results["sections"].get("norm_kernels", {}).get("data") or {}).get("rows", [])
    for step in ("forward", "factor vjp", "backward (dx, dγ, dβ)"):
        main = [x for x in norm if x["norm"] == "layernorm" and x["dtype"] == "float32" and x["step"] == step]
        pct = main[0].get("pct_of_copy") if main else None
        add(f"LayerNorm kernel {step} (float32, {main[0]['B']}×{main[0]['n']}) % of copy bandwidth" if main
            else f"LayerNorm kernel {step} (float32) % of copy bandwidth", pct, "≥ 85%", pct is not None and pct >= 85,
            "validated against float64 NumPy in the same section")
    r = _vs(results, "jac_tapering", me, torch)
    add("per-sample Jacobians, tapering, vs torch.func (better of jacrev/jacfwd)", r, "≤ 1.0×", r is not None and r <= 1.0)
    r = _vs(results, "jac_hourglass", me, torch)
    add("per-sample Jacobians, hourglass, vs torch.func (better of jacrev/jacfwd)", r, "≤ 0.33×", r is not None and r <= 1 / 3)
    jax = "jax-cpu" if dry else "jax-gpu"
    for case, net in (("jac_tapering", "tapering"), ("jac_hourglass", "hourglass")):
        r = _vs(results, case, f"{me}[compiled]", jax)
        row = _row(results, case, f"{me}[compiled]")
        add(f"per-sample Jacobians, {net}, compiled (net.compile_jacobian) vs JAX jit", r, "≤ 1.0×",
            r is not None and r <= 1.0, (row or {}).get("note", ""))
    return out


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _checks(d: dict, tag: str) -> list[str]:
    """The lines of a validation-like section: per-dtype summary, graph recording, failed checks."""
    L = ["| dtype | checks | failed | tolerance | worst check | worst rel. err. |", "|---|---|---|---|---|---|"]
    for dtype, s in d["summary"].items():
        w = s.get("worst") or {}
        L.append(f"| {dtype} | {s['checks']} | {s['failed']} | {s['tol']:.0e} | "
                 f"{w.get('check', '—')} ({w.get(tag) or ''}) | {_fmt(w.get('rel_err'), '.2e')} |")
    steps = [r for r in d["rows"] if r["check"] == "compiled loss" and r.get("call", 0) > 0]
    if steps:
        recorded = sum(bool(r.get("captured")) for r in steps)
        why = sorted({r["capture_error"] for r in steps if r.get("capture_error")})
        L += ["", f"Compiled step replays checked: {len(steps)}, of which {recorded} replayed a recorded CUDA graph"
              + (f"; not recorded because: {why[0]}" if why else "") + "."]
    bad = [r for r in d["rows"] if not r["ok"]]
    if bad:
        L += ["", "Failed checks:", ""]
        L += [f"- {r['dtype']} {r.get('activation', r.get('loss', ''))} {r.get('net', '')} {r['check']}: rel. err. "
              f"{_fmt(r['rel_err'], '.2e')} > {r['tol']:.0e} {r.get('error', '')}" for r in bad[:40]]
    return L


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    dry = results.get("dry_run_cpu")
    cuda = env.get("cuda") or {}
    L = [f"# jacgrad GPU suite — {env.get('device', '?')} — {env.get('date', '?')}", ""]
    if dry:
        L += ["**Dry run on the CPU** (`--dry-run-cpu`): every section ran on NumPy with tiny sizes to "
              "exercise the suite. **None of these numbers is a GPU number.**", ""]
    L.append(f"CUDA runtime {cuda.get('runtime', '—')}, driver {cuda.get('driver', '—')}; jacgrad {env.get('jacgrad')} "
             f"(commit {env.get('commit') or '?'}), numpy {env.get('numpy')}, cupy {env.get('cupy', '—')}, "
             f"torch {env.get('torch', '—')} (CUDA {env.get('torch_cuda') or '—'}), jax {env.get('jax', '—')}; "
             f"suite {results.get('elapsed_s', 0):.0f} s.")
    if env.get("nvidia_smi"):
        L.append(f"nvidia-smi: `{env['nvidia_smi']}`")
    L += ["", "## Targets (issue 5)", ""]
    if results.get("targets_error"):
        L += [f"**The targets could not be computed** ({results['targets_error']}); the sections' numbers below "
              "stand.", ""]
    L += ["| target | measured | goal | met | note |", "|---|---|---|---|---|"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "no", None: "—" if t["measured"] is not None else "not measured"}[t["met"]]
        L.append(f"| {t['target']} | {_fmt(t['measured'])} | {t['goal']} | {met} | {t['note']} |")
    L += ["", "## Sections", "", "| section | status | seconds | note |", "|---|---|---|---|"]
    for name, s in results["sections"].items():
        L.append(f"| {name} | {s['status']} | {_fmt(s.get('seconds'), '.1f')} | {s.get('error') or s.get('note') or ''} |")
    secs = results["sections"]

    d = secs.get("profile", {}).get("data")
    if d and d.get("calls"):
        L += ["", "## Host-side profile of the launch-bound calls (`benchmarks/gpu_profile.py`)", "",
              "Mean wall time per call, unprofiled; cProfile's tables in `profile.txt`.", ""]
        L += [f"- {c}" for c in d["calls"]]
    d = secs.get("pytest_gpu", {}).get("data")
    if d:
        L += ["", "## pytest -m gpu", "", f"`{d['command']}` → exit {d['returncode']}: tests {d.get('tests', '—')}, "
              f"failures {d.get('failures', '—')}, errors {d.get('errors', '—')}, skipped {d.get('skipped', '—')}"
              f"{' (collect only: dry run)' if d.get('collect_only') else ''}. Last line: `{d['summary']}`; "
              "full log in `pytest_gpu.log`."]

    for key, title, tag in (("validation", "Validation against the float64 NumPy reference", "activation"),
                            ("compiled", "Compiled step (`net.compile`) against the float64 NumPy reference", "loss")):
        d = secs.get(key, {}).get("data")
        if d:
            L += ["", f"## {title}", ""] + _checks(d, tag)

    d = secs.get("ceilings", {}).get("data")
    if d:
        c = d["copy"]
        L += ["", "## Ceilings", "", f"- device-to-device copy ({c['bytes'] / 2**20:.0f} MiB): "
              f"**{c['GB_per_s']:.0f} GB/s** (read + write)"
              + (f", {c['pct_of_theoretical']:.0f}% of the {c['theoretical_GB_per_s']:.0f} GB/s of the memory bus"
                 if c.get("theoretical_GB_per_s") else "")]
        for g in d["gemm"]:
            L.append(f"- GEMM {g['n']}³ {g['dtype']}: **{g['TFLOP_per_s']:.2f} TFLOP/s** "
                     f"({g['median_ms']:.3g} ms; CUPY_TF32={g['tf32_env']})")

    d = secs.get("fused_kernel", {}).get("data")
    if d:
        _table_head(L, "Fused elementwise kernels (`scale_cotangent`: v ⊙ φ'(x) → out; `forward_with_derivative`: h → φ(h), φ'(h))",
                    f"Copy bandwidth: {_fmt(d.get('copy_GB_per_s'), '.0f')} GB/s. Bytes counted: inputs read once, outputs written once.",
                    ["kernel", "shape", "activation", "dtype", "φ' from", "elements", "ms", "GB/s", "% of copy",
                     "× faster than unfused"])
        for r in d["rows"]:
            shape = "(B, H) ⊙ (H,)" if r.get("shape") == "row" else "same"
            L.append(_md_row(r.get("kernel", "scale_cotangent"), shape, r["activation"], r["dtype"],
                          "y" if r["from_output"] else "h", r["elements"], f"{r['median_ms']:.3g}", f"{r['GB_per_s']:.0f}",
                          _fmt(r.get("pct_of_copy"), ".0f"), _fmt(r.get("speedup_vs_unfused"), ".2f")))

    d = secs.get("norm_kernels", {}).get("data")
    if d:
        _table_head(L, "Normalisation kernels (`kernels/norm.cu`), validated against float64 NumPy",
                    f"Copy bandwidth: {_fmt(d.get('copy_GB_per_s'), '.0f')} GB/s. Bytes counted: inputs read once, outputs "
                    "written once (backward: g and x̂ read once where the row fits the registers, else also by the column kernel).",
                    ["norm", "step", "dtype", "B × n", "ms", "GB/s", "% of copy", "× faster than unfused", "rel. err.", "ok"])
        for r in d["rows"]:
            L.append(_md_row(r["norm"], r["step"], r["dtype"], f"{r['B']} × {r['n']}", f"{r['median_ms']:.3g}",
                          f"{r['GB_per_s']:.0f}", _fmt(r.get("pct_of_copy"), ".0f"), _fmt(r.get("speedup_vs_unfused"), ".2f"),
                          f"{r['rel_err']:.1e}", _ok(r)))

    d = secs.get("blocks", {}).get("data")
    if d:
        _table_head(L, "Sequential blocks (`jg.Sequential`, residual LayerNorm/RMSNorm) against float64 NumPy",
                    f"Tolerance (relative Frobenius error, worst array of the op): {d['tol']['float32']:.0e} float32, "
                    f"{d['tol']['float64']:.0e} float64. NumPy: the same call on host arrays of the same dtype; torch: "
                    "`net.to_torch()` on the same device.",
                    ["op", "net", "dtype", "ms", "NumPy ms", "× faster than NumPy", "torch ms", "× faster than torch",
                     "rel. err.", "ok", "note"])
        for r in d["rows"]:
            note = r.get("error") or r.get("torch_error") or ""
            if "captured" in r:
                note = (note + " " if note else "") + ("CUDA graph recorded" if r["captured"] else
                                                       f"no graph: {r.get('capture_error') or 'eager'}")
            L.append(_md_row(r["op"], r["net"], r["dtype"], _fmt(r.get("ms")), _fmt(r.get("numpy_ms")),
                          _fmt(r.get("speedup_vs_numpy"), ".2f"), _fmt(r.get("torch_ms")), _fmt(r.get("speedup_vs_torch"), ".2f"),
                          f"{r['rel_err']:.1e}", _ok(r), note))

    d = secs.get("products", {}).get("data")
    if d and d.get("rows"):
        _table_head(L, "Products and layers since the first H100 run (`suite_products.py`) against float64 NumPy",
                    f"Tolerance: relative Frobenius error ≤ {d['tol']['float32']:.0e} float32, ≤ {d['tol']['float64']:.0e} "
                    "float64 (spectra: max |Δσ|/σ_max within the gram path's floor). Peers: ms and × (peer ms / jacgrad ms).",
                    ["op", "net", "dtype", "ms", "peers", "rel. err.", "ok", "note"])
        for r in d["rows"]:
            peers = "; ".join(f"{k}: {v['ms']:.3g} ms ({v['speedup']:.2f}×)" for k, v in (r.get("peers") or {}).items())
            note = r.get("error") or r.get("note") or "; ".join(f"{k}: {v}" for k, v in (r.get("peers_missing") or {}).items())
            if "captured" in r:
                note = ("CUDA graph recorded" if r["captured"] else f"no graph: {r.get('capture_error') or 'eager'}") + (
                    f"; {note}" if note else "")
            L.append(_md_row(r["op"], r["net"], r["dtype"], _fmt(r.get("ms")), peers or "–",
                             f"{r['rel_err']:.1e}", "skipped" if r.get("skipped") else _ok(r), note))
    elif d:
        L += ["", f"Products section: {d.get('note', 'no rows')}"]

    d = secs.get("tf32", {}).get("data")
    if d:
        L += ["", "## TF32 mode (`jacgrad.core.backend.tf32`)", "",
              "| TF32 | GEMM 1024³ rel. err. | net | max rel. err. of grad W (Frobenius) |", "|---|---|---|---|"]
        for r in d["accuracy"]:
            L.append(f"| {'on' if r['tf32'] else 'off'} | {r['gemm_1024_rel_err']:.2e} | {r['net']}, B={r['batch']} | "
                     f"{r['grad_W_rel_err_max']:.2e} |")
        L += ["", "| TF32 | training step | eager ms | compiled ms |", "|---|---|---|---|"]
        for r in d["timing"]:
            L.append(f"| {'on' if r['tf32'] else 'off'} | {r['net']}, B={r['batch']} | {r['eager_ms']:.3g} | "
                     f"{_fmt(r.get('compiled_ms'))} |")

    d = secs.get("peers", {}).get("data")
    if d:
        L += ["", "## jacgrad against the peers (float32)", ""]
        for key, c in d["cases"].items():
            if c["status"] != "ok":
                L.append(f"- {c['label']}: {c['status']} {c.get('error') or c.get('note') or ''}")
        L += ["", "```", format_table(d["bench"]), "```"]

    errs = [(n, s) for n, s in secs.items() if s.get("traceback")]
    peers = (secs.get("peers", {}).get("data") or {}).get("cases", {})
    errs += [(f"peers/{k}", c) for k, c in peers.items() if c.get("traceback")]
    if errs:
        L += ["", "## Errors", ""]
        for name, s in errs:
            L += [f"<details><summary>{name}: {s.get('error', '')}</summary>", "", "```", s["traceback"].rstrip(), "```",
                  "", "</details>"]
    return "\n".join(L) + "\n"


def _table_head(L: list, title: str, intro: str, columns: list) -> None:
    """A results.md section: its ``##`` title, one paragraph, and a table's header for ``columns``."""
    L += ["", f"## {title}", "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _md_row(*cells) -> str:
    """One markdown table row of ``cells``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _ok(r: dict) -> str:
    return "yes" if r["ok"] else "**NO**"

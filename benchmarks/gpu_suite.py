#!/usr/bin/env python3
"""The GPU suite: ONE command for a machine with a GPU.

    python3 benchmarks/gpu_suite.py --out /path/to/results

runs, each section in a child process of its own (a crash, a hang or an error costs that
section only; the results are written after every section), in < 8 minutes on an H100:

1. environment  — device name, CUDA runtime and driver, library versions, commit, date;
2. ceilings     — device-to-device copy bandwidth and the GEMM rate (float32, float64);
3. fused_kernel — ``jacgrad.cuda.kernels``' fused elementwise kernels on big arrays: GB/s and % of copy
                  bandwidth (same-shape and (H,)-broadcast ``scale_cotangent``, ``forward_with_derivative``);
3b. norm_kernels — the LayerNorm/RMSNorm kernels (``kernels/norm.cu``: forward, factor VJP/JVP,
                  backward) validated against float64 NumPy, GB/s and % of copy bandwidth;
4. validation   — every GPU result (forward, loss, W/b/input grads, VJP, JVP, per-sample
                  Jacobians in 3 orders, singular values, the fused kernels) against the float64
                  NumPy reference: rel. err. ≤ 1e-5 (float32), ≤ 1e-12 (float64);
5. compiled     — the compiled step's CUDA-graph capture and replays against float64;
5b. blocks      — ``jg.Sequential`` (residual LayerNorm/RMSNorm blocks): passes, Jacobians, the compiled
                  step, parameter-space products (and an MLP's), ``gradient_flow`` against float64 NumPy,
                  timed against NumPy and torch-CUDA;
5c. products    — every product and layer built since the first H100 run (``suite_products.py``):
                  convolutions, token models (embedding, attention), per-sample gradients and norms,
                  GGN, NTK, the private step, the compiled step and compiled products (where
                  ``net.compile(B, product=...)`` exists), the softmax-Jacobian kernel and the batched
                  spectra, against float64 NumPy; timed against torch.func, Opacus, JAX jit and
                  neural-tangents where importable;
6. tf32         — ``jacgrad.core.backend.tf32``: GEMM and gradient accuracy against float64, and the
                  training step's speed, TF32 off and on;
7. peers        — jacgrad-cupy against torch-CUDA eager and jax-GPU (and jacgrad/torch on the CPU
                  for the small cases), one child process per case;
8. pytest_gpu   — ``pytest -m gpu tests`` (the CuPy tests), counts and log;
9. profile      — ``benchmarks/gpu_profile.py``: the host-side profile of the launch-bound calls
                  (eager small step, tapering Jacobians, per-sample norms, GGN diagonal, block report,
                  the eager step through jacgrad's own cuBLAS calls), into ``profile.txt``;

into ``--out``: ``results.md``, ``results.json``, ``pytest_gpu.log``, ``profile.txt`` and ``suite.log`` (every
child's output, with ``faulthandler``'s stacks of a crash or a hang). ``--budget`` (default 450 s)
is shared among the sections left, in proportion to their weights, so a fast section leaves its
time to the next and none can starve those after it.

``--dry-run-cpu`` runs every section on NumPy with tiny sizes (pytest only collects), so the
suite's logic is exercised on a machine without a GPU; its numbers are not GPU numbers and the
report says so in its first lines. Without ``--out`` a dry run writes into a new temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # this checkout's jacgrad, installed or not
sys.path.insert(0, str(HERE))

import suite_report  # noqa: E402
import suite_sections  # noqa: E402

# (section, weight in the budget, floor in seconds): the order they run in
PLAN = [("environment", 1, 40), ("ceilings", 2, 20), ("fused_kernel", 2, 20), ("norm_kernels", 2, 40),
        ("validation", 4, 30),
        ("compiled", 3, 20), ("blocks", 3, 60), ("products", 4, 60), ("tf32", 3, 20), ("peers", 14, 60), ("pytest_gpu", 8, 30),
        ("profile", 2, 30)]
SECTIONS = tuple(name for name, _, _ in PLAN)
GRACE_S = 15  # after a child's limit: faulthandler prints its stacks, then it is killed
LOG_TAIL = 4000
INJECT = "GPU_SUITE_INJECT"  # "<section>:crash" or "<section>:hang" — the suite's own tests only


def text(x) -> str:
    """Captured output as str: ``TimeoutExpired.stdout`` is bytes even under ``text=True``."""
    if x is None:
        return ""
    return x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x)


def run_process(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | str, str]:
    """(return code, or "timeout"; stdout + stderr as str) of a child process, killed at ``timeout``."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, text(p.stdout) + text(p.stderr)
    except subprocess.TimeoutExpired as exc:
        return "timeout", text(exc.stdout) + text(exc.stderr) + f"\n(stopped after {timeout:.0f} s)"


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run_cpu
        self.t0 = time.perf_counter()
        self.results: dict = {"dry_run_cpu": self.dry, "sections": {}}
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_suite_"))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def limit(self, name: str) -> float:
        """This section's share of the time left, by weight among the sections still to run."""
        todo = [(n, w, f) for n, w, f in PLAN if n not in self.results["sections"] and n not in self.args.skip]
        weight = dict((n, w) for n, w, _ in todo)
        floor = dict((n, f) for n, _, f in todo)
        share = self.left() * weight[name] / sum(weight.values())
        return min(self.left(), max(share, floor[name]))

    # ------------------------------------------------------------------ children
    def child(self, name: str, limit: float, **extra) -> dict:
        """Run section ``name`` (or ``peers:<case>``) in a child process; its record, whatever happened."""
        result = self.scratch / f"{name.replace(':', '_')}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()), "--child", name,
               "--result", str(result), "--child-limit", f"{limit:.0f}"]
        if self.dry:
            cmd.append("--dry-run-cpu")
        if self.args.backends:
            cmd += ["--backends", ",".join(self.args.backends)]
        for key, value in extra.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        rc, log = run_process(cmd, limit + GRACE_S)
        with open(self.args.out / "suite.log", "a", encoding="utf-8") as f:
            f.write(f"===== {name} (rc {rc}, limit {limit:.0f} s) =====\n{log}\n")
        try:
            rec = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            if rc == "timeout":
                rec = {"status": "timeout", "error": f"no result within {limit:.0f} s (+{GRACE_S} s); stacks in suite.log"}
            elif isinstance(rc, int) and rc < 0:
                rec = {"status": "crashed", "error": f"killed by {_signal_name(-rc)}; faulthandler's stacks in suite.log"}
            else:
                rec = {"status": "crashed", "error": f"exited with {rc} before writing its result"}
            rec["log_tail"] = log[-LOG_TAIL:]
            rec["traceback"] = rec["log_tail"]
        return rec

    def section(self, name: str) -> None:
        """Run one section (skipped on ``--skip`` or when the budget is spent); write the results."""
        if name in self.args.skip:
            self.results["sections"][name] = {"status": "skipped", "note": "--skip"}
            return
        limit = self.limit(name)
        if limit < 5:
            self.results["sections"][name] = {"status": "skipped", "note": "the suite's time budget is spent"}
            self.write()
            return
        print(f"[gpu_suite {self.elapsed():5.0f}s] {name} (≤ {limit:.0f} s) …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if name == "pytest_gpu":
            rec = self.pytest_gpu(limit)
        elif name == "peers":
            rec = self.peers(limit)
        elif name == "profile":
            rec = self.profile(limit)
        else:
            copy = self.results.get("copy_GB_per_s") if name in ("fused_kernel", "norm_kernels") else None
            rec = self.child(name, limit, copy_gbps=copy)
        rec["seconds"] = time.perf_counter() - t0
        self.results["sections"][name] = rec
        if name == "environment" and rec.get("data"):
            self.results["environment"] = rec["data"]
        if name == "ceilings" and rec.get("data"):
            self.results["copy_GB_per_s"] = rec["data"]["copy"]["GB_per_s"]
        self.write()

    def pytest_gpu(self, limit: float) -> dict:
        xml = self.scratch / "pytest_gpu.xml"
        # -o addopts=: the ini's --benchmark-disable would be a usage error where pytest-benchmark is not
        # installed, and tests/ has no benchmark fixtures
        cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p",
               "no:cacheprovider", "-o", "addopts=", f"--junitxml={xml}", "tests"]
        if self.dry:
            cmd.append("--collect-only")
        rc, out = run_process(cmd, limit)
        (self.args.out / "pytest_gpu.log").write_text(out, encoding="utf-8")
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        data = {"command": " ".join(cmd[3:]), "returncode": rc, "summary": lines[-1] if lines else "",
                "collect_only": self.dry, **_junit_counts(xml)}
        # pytest exit code 5 = nothing collected: no gpu tests, not a failure of the suite
        ok = rc in (0, 5)
        return {"status": "ok" if ok else ("timeout" if rc == "timeout" else "failed"), "data": data,
                **({} if ok else {"error": f"pytest exit {rc}: {data['summary']}"})}

    def profile(self, limit: float) -> dict:
        """``benchmarks/gpu_profile.py`` in a child: the host-side profile of the launch-bound calls,
        into ``profile.txt`` beside the results; its per-call times in the record."""
        text_path = self.args.out / "profile.txt"
        cmd = [sys.executable, "-X", "faulthandler", str(HERE / "gpu_profile.py"), "--out", str(text_path)]
        if self.dry:
            cmd += ["--device", "cpu"]
        rc, out = run_process(cmd, limit)
        with open(self.args.out / "suite.log", "a", encoding="utf-8") as f:
            f.write(f"===== profile (rc {rc}, limit {limit:.0f} s) =====\n{out}\n")
        calls = [ln.strip() for ln in out.splitlines() if " ms per call unprofiled" in ln or "worst rel. diff" in ln]
        rec = {"status": "ok" if rc == 0 else ("timeout" if rc == "timeout" else "failed"),
               "data": {"calls": calls, "file": "profile.txt"}}
        if rc != 0:
            rec["error"] = f"gpu_profile.py: {'no result within the limit' if rc == 'timeout' else f'exit {rc}'}; see suite.log"
        return rec

    def peers(self, limit: float) -> dict:
        """One child per case, each with its weighted share (``PEER_WEIGHTS``) of what is left of ``limit``."""
        from jacgrad.bench.runner import add_ratios

        start, rows, out_cases = time.perf_counter(), [], {}
        bench = {"options": None, "environment": None, "skipped": {}, "rows": rows, "elapsed_s": 0.0}
        todo = suite_sections.cases(self.dry)
        weight = lambda k: suite_sections.PEER_WEIGHTS.get(k, 1)  # noqa: E731
        for i, (key, label, *_rest) in enumerate(todo):
            left = limit - (time.perf_counter() - start)
            share = left * weight(key) / sum(weight(c[0]) for c in todo[i:])
            if share < 5:
                out_cases[key] = {"label": label, "status": "skipped", "note": "time budget spent"}
                continue
            rec = self.child(f"peers:{key}", share)
            d = rec.pop("data", None) or {}
            if d:
                rows += d["rows"]
                bench["options"] = bench["options"] or d["options"]
                bench["environment"] = bench["environment"] or d["environment"]
                bench["skipped"].update(d["skipped"])
            out_cases[key] = {"label": label, **rec}
        add_ratios(rows)
        bench["elapsed_s"] = sum(c.get("seconds", 0) for c in out_cases.values())
        ok = all(c["status"] in ("ok", "skipped") for c in out_cases.values())
        rec = {"status": "ok" if ok else "failed", "data": {"cases": out_cases, "bench": bench, "skipped": bench["skipped"]}}
        if not ok:
            rec["error"] = "; ".join(f"{k}: {c['status']}" for k, c in out_cases.items() if c["status"] not in ("ok", "skipped"))
        return rec

    # ------------------------------------------------------------------ all
    def main(self) -> int:
        try:
            return self._main()
        finally:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _main(self) -> int:
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / "suite.log").write_text("", encoding="utf-8")
        for name in SECTIONS:
            self.section(name)
            if name == "environment" and not self.dry:
                env = self.results.get("environment") or {}
                reason = env.get("gpu_unavailable_reason") if env else "the environment section did not finish"
                if reason is not None:
                    msg = (f"gpu_suite: no usable GPU here ({reason}); use --dry-run-cpu to exercise the suite "
                           "on the CPU")
                    print(msg, file=sys.stderr)
                    self.results["sections"]["environment"].update(status="failed", error=msg)
                    self.write()
                    return 1
        try:
            self.results["targets"] = suite_report.targets(self.results)
        except Exception as exc:  # noqa: BLE001 - the numbers are written even if the summary breaks
            self.results["targets"] = []
            self.results["targets_error"] = f"{type(exc).__name__}: {exc}"
        self.results["elapsed_s"] = self.elapsed()
        self.write()
        failed = [k for k, v in self.results["sections"].items() if v["status"] not in ("ok", "skipped")]
        print(f"[gpu_suite {self.elapsed():5.0f}s] wrote {self.args.out / 'results.md'}"
              + (f"; sections not ok: {', '.join(failed)}" if failed else "; every section ran")
              + (f"; the targets failed: {self.results['targets_error']}" if "targets_error" in self.results else ""),
              file=sys.stderr)
        return 0 if not failed else 1

    def write(self) -> None:
        """results.json and results.md as they stand (after every section)."""
        from jacgrad.bench.report import strict_json

        self.results["elapsed_s"] = self.elapsed()
        out = self.args.out
        text_ = json.dumps(strict_json(self.results), indent=1, default=_jsonable, allow_nan=False)
        (out / "results.json").write_text(text_ + "\n", encoding="utf-8")
        try:
            md = suite_report.markdown(self.results)
        except Exception as exc:  # noqa: BLE001 - results.json has the numbers whatever happens here
            md = f"# jacgrad GPU suite\n\nThe report could not be written ({type(exc).__name__}: {exc}); see results.json.\n"
        (out / "results.md").write_text(md, encoding="utf-8")


def child_main(args) -> int:
    """One section in this process: its record to ``--result`` (JSON)."""
    faulthandler.enable()
    # a hang shows where it is before the parent kills this process
    faulthandler.dump_traceback_later(max(1.0, args.child_limit), exit=False)
    inject = os.environ.get(INJECT, "")
    if inject in (f"{args.child}:crash", f"{args.child}:hang"):
        if inject.endswith("crash"):
            import ctypes

            ctypes.string_at(0)  # a segfault, as a bad graph replay would give
        time.sleep(10 ** 6)
    rec = suite_sections.Sections(args.dry_run_cpu, args.backends, args.copy_gbps).run(args.child)
    from jacgrad.bench.report import strict_json

    args.result.write_text(json.dumps(strict_json(rec), default=_jsonable, allow_nan=False), encoding="utf-8")
    return 0


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _jsonable(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _junit_counts(path: Path) -> dict:
    try:
        content = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.search(r"<testsuite [^>]*>", content)
    if not m:
        return {}
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    keys = ("tests", "failures", "errors", "skipped", "time")
    return {k: (float(attrs[k]) if k == "time" else int(attrs[k])) for k in keys if k in attrs}


def device_slug() -> str:
    """The first GPU's name as a folder name (``nvidia-h100-80gb-hbm3``), from ``nvidia-smi``; ``gpu``
    where it cannot say (no driver tools here: the environment section still names the device)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    name = re.sub(r"[^a-z0-9]+", "-", out[0].lower()).strip("-") if out and out[0].strip() else ""
    return name or "gpu"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for results.md / results.json / pytest_gpu.log / suite.log "
                   "(default: benchmarks/results/<device>-<date>; a dry run: a new temporary folder)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run every section on NumPy with tiny sizes (no GPU needed; not GPU numbers)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip, out of {','.join(SECTIONS)}")
    p.add_argument("--backends", default="", help="backends of the peers section (default: the GPU ones, "
                   "plus jacgrad-numpy,torch-cpu for the small cases; dry run: the CPU ones)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole suite (default 450: done within 8 minutes on an H100)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-limit", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--copy-gbps", type=float, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.skip = [s.strip() for s in a.skip.split(",") if s.strip()]
    bad = [s for s in a.skip if s not in SECTIONS]
    if bad:
        p.error(f"--skip: unknown section(s) {', '.join(bad)}; sections: {', '.join(SECTIONS)}")
    from jacgrad.bench.backends import names

    a.backends = [s.strip() for s in a.backends.split(",") if s.strip()]
    bad = [s for s in a.backends if s not in names()]
    if bad:
        p.error(f"--backends: unknown backend(s) {', '.join(bad)}; valid: {', '.join(names())}")
    if a.child:
        return a
    if a.out is None:
        if a.dry_run_cpu:
            a.out = Path(tempfile.mkdtemp(prefix="gpu_suite_dry_"))
        else:
            a.out = ROOT / "benchmarks" / "results" / f"{device_slug()}-{datetime.date.today().isoformat()}"
    a.out = a.out.expanduser().resolve()  # before anything runs in another directory
    return a


if __name__ == "__main__":
    faulthandler.enable()
    arguments = parse_args()
    sys.exit(child_main(arguments) if arguments.child else Suite(arguments).main())

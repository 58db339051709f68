#!/usr/bin/env python
"""The GPU suite: ONE command for a machine with a GPU.

    python benchmarks/gpu_suite.py --out benchmarks/results/h100-2026-05-01

runs, each section on its own (a failure is recorded and the suite goes on), in < 8 minutes on
an H100:

1. environment  — device name, CUDA runtime and driver, library versions, commit, date;
2. pytest_gpu   — ``pytest -m gpu tests`` (the CuPy tests), counts and log;
3. validation   — every GPU result (forward, loss, W/b/input grads, VJP, JVP, per-sample
                  Jacobians in 3 orders, singular values, the fused kernels) against the float64
                  NumPy reference: rel. err. ≤ 1e-5 (float32), ≤ 1e-12 (float64);
4. ceilings     — device-to-device copy bandwidth and the GEMM rate (float32, float64);
5. fused_kernel — ``jacgrad.kernels.scale_cotangent`` on a big array: GB/s and % of copy bandwidth;
6. tf32         — ``jacgrad.backend.tf32``: GEMM and gradient accuracy against float64, and the
                  training step's speed, TF32 off and on;
7. peers        — jacgrad-cupy against torch-CUDA eager and jax-GPU (and jacgrad/torch on the
                  CPU for the small cases): large training step B=4096 8×4096, small net B=64
                  32×256, the VJP chain, per-sample Jacobians (tapering, hourglass); float32;

then writes ``results.md`` and ``results.json`` (and ``pytest_gpu.log``) into ``--out``.

``--dry-run-cpu`` runs every section on NumPy with tiny sizes (pytest only collects), so the
suite's logic is exercised on a machine without a GPU; its numbers are not GPU numbers and the
report says so in its first lines.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's jacgrad, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import jacgrad as jg  # noqa: E402
import suite_device  # noqa: E402
import suite_report  # noqa: E402
import suite_validate  # noqa: E402

SECTIONS = ("environment", "pytest_gpu", "validation", "ceilings", "fused_kernel", "tf32", "peers")
TAPERING, HOURGLASS = [512, 256, 128, 64, 10], [256, 256, 256, 8, 256, 256, 256]

# (key, label, task, net name or None, widths, batch, also on the CPU)
GPU_CASES = [
    ("large_train", "training step, B=4096, 8×4096", "train", None, [4096] * 9, 4096, False),
    ("small_train", "training step, small net, B=64, 32×256", "train", None, [256] * 33, 64, True),
    ("large_vjp", "VJP chain, B=4096, 8×4096", "vjp", None, [4096] * 9, 4096, False),
    ("jac_tapering", "per-sample Jacobians, tapering, B=256", "jacobian", "tapering", TAPERING, 256, True),
    ("jac_hourglass", "per-sample Jacobians, hourglass, B=256", "jacobian", "hourglass", HOURGLASS, 256, True),
]
DRY_CASES = [
    ("large_train", "training step (dry: B=16, 2×32)", "train", None, [32] * 3, 16, False),
    ("small_train", "training step, small net (dry: B=4, 4×8)", "train", None, [8] * 5, 4, True),
    ("large_vjp", "VJP chain (dry: B=16, 2×32)", "vjp", None, [32] * 3, 16, False),
    ("jac_tapering", "per-sample Jacobians, tapering (dry: 24-12-6-3, B=4)", "jacobian", "tapering",
     [24, 12, 6, 3], 4, True),
    ("jac_hourglass", "per-sample Jacobians, hourglass (dry: 12-12-2-12-12, B=4)", "jacobian", "hourglass",
     [12, 12, 2, 12, 12], 4, True),
]
SIZES = {"gpu": {"copy_bytes": 1 << 30, "gemm_n": 8192, "fused_n": 1 << 28,
                 "tf32": ([1024] * 9, 512, [4096] * 9, 4096)},
         "cpu": {"copy_bytes": 1 << 22, "gemm_n": 128, "fused_n": 1 << 16,
                 "tf32": ([32] * 4, 8, [32] * 3, 16)}}
GPU_BACKENDS, CPU_BACKENDS = ["jacgrad-cupy", "torch-cuda", "jax-gpu"], ["jacgrad-numpy", "torch-cpu", "jax-cpu"]


class SectionTimeout(BaseException):
    """A section ran past its limit. Not an ``Exception``: the per-case and per-entry handlers
    inside a section must not swallow it."""


def _alarm(signum, frame):
    raise SectionTimeout("section ran past its time limit")


class Suite:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run_cpu
        self.t0 = time.perf_counter()
        self.results: dict = {"dry_run_cpu": self.dry, "sections": {}}
        self.partial: dict = {}  # section -> its results so far, kept if it stops half-way
        self.dev = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def run(self, name: str, fn, limit: float) -> None:
        """Run one section under a time limit; record ok/failed/skipped, seconds, data or error."""
        rec = {"status": "ok"}
        if name in self.args.skip:
            self.results["sections"][name] = {"status": "skipped", "note": "--skip"}
            return
        limit = min(limit, self.left())
        if limit < 5:
            self.results["sections"][name] = {"status": "skipped", "note": "the suite's time budget is spent"}
            return
        print(f"[gpu_suite {self.elapsed():5.0f}s] {name} …", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        use_alarm = hasattr(signal, "SIGALRM")
        if use_alarm:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(int(limit) + 1)
        try:
            rec["data"] = fn()
            if isinstance(rec["data"], dict) and rec["data"].get("ok") is False:
                rec["status"] = "failed"
        except BaseException as exc:  # noqa: BLE001 - every failure is a result; Ctrl-C still stops
            if isinstance(exc, KeyboardInterrupt):
                raise
            rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            if name in self.partial:  # what the section had measured before it stopped
                rec["data"] = self.partial.pop(name)
        finally:
            if use_alarm:
                signal.alarm(0)
        rec["seconds"] = time.perf_counter() - t0
        self.results["sections"][name] = rec
        if self.dev is not None:
            try:
                self.dev.free()
            except Exception:  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ sections
    def environment(self) -> dict:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
               "jacgrad": jg.__version__, "cpu_count": os.cpu_count(), "argv": sys.argv[1:]}
        try:
            env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["commit"] = None
        if self.dry:
            env["device"] = f"CPU dry run ({_cpu_model()})"
            env["cuda"] = None
        else:
            xp = self.dev.xp
            props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
            name = props["name"]
            env["device"] = name.decode() if isinstance(name, bytes) else str(name)
            env["memory_GiB"] = props["totalGlobalMem"] / 2 ** 30
            env["sm_count"] = props["multiProcessorCount"]
            env["compute_capability"] = f"{props['major']}.{props['minor']}"
            env["cuda"] = {"runtime": _cuda_version(xp.cuda.runtime.runtimeGetVersion()),
                           "driver": _cuda_version(xp.cuda.runtime.driverGetVersion())}
            env["cupy"] = xp.__version__
            env["nvidia_smi"] = _nvidia_smi()
        from importlib import metadata

        for dist, key in (("torch", "torch"), ("jax", "jax"), ("jaxlib", "jaxlib")):
            try:
                env[key] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                env[key] = "not installed"
        if not self.dry and env["torch"] != "not installed":
            try:
                import torch

                env["torch_cuda"] = torch.version.cuda
            except Exception as exc:  # noqa: BLE001
                env["torch"] += f" (not importable: {type(exc).__name__})"
        self.results["environment"] = env
        return env

    def pytest_gpu(self) -> dict:
        xml = self.args.out / "pytest_gpu.xml"
        # -o addopts=: the ini's --benchmark-disable would be a usage error where pytest-benchmark is not
        # installed, and tests/ has no benchmark fixtures
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts=",
               f"--junitxml={xml}", "tests"]
        if self.dry:
            cmd.append("--collect-only")
        timeout = max(10.0, min(self.args.pytest_timeout, self.left() - 120))
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, out = "timeout", f"{exc.stdout or ''}{exc.stderr or ''}\n(pytest stopped after {timeout:.0f} s)"
            out = out if isinstance(out, str) else out.decode(errors="replace")
        (self.args.out / "pytest_gpu.log").write_text(out, encoding="utf-8")
        lines = [ln for ln in out.strip().splitlines() if ln.strip()]
        data = {"command": " ".join(cmd[1:]), "returncode": rc, "summary": lines[-1] if lines else "",
                "collect_only": self.dry, **_junit_counts(xml)}
        # pytest exit code 5 = nothing collected: no gpu tests, not a failure of the suite
        data["ok"] = rc in (0, 5)
        return data

    def validation(self) -> dict:
        return suite_validate.validate(self.dev)

    def ceilings(self) -> dict:
        s = SIZES[self.dev.where]
        out = {"copy": suite_device.copy_bandwidth(self.dev, s["copy_bytes"]), "gemm": []}
        for dtype in ("float32", "float64"):
            out["gemm"].append(suite_device.gemm_rate(self.dev, s["gemm_n"], dtype))
        self.results["copy_GB_per_s"] = out["copy"]["GB_per_s"]
        return out

    def fused_kernel(self) -> dict:
        copy = self.results.get("copy_GB_per_s")
        if copy is None:  # the ceilings section failed or was skipped: measure the copy here
            copy = suite_device.copy_bandwidth(self.dev, SIZES[self.dev.where]["copy_bytes"])["GB_per_s"]
        return {"copy_GB_per_s": copy, "rows": suite_device.fused_kernel(self.dev, SIZES[self.dev.where]["fused_n"], copy)}

    def tf32(self) -> dict:
        return suite_device.tf32_mode(self.dev, *SIZES[self.dev.where]["tf32"])

    def peers(self) -> dict:
        from jacgrad.bench.cases import Case
        from jacgrad.bench.options import Options
        from jacgrad.bench.report import Progress
        from jacgrad.bench.machine import environment
        from jacgrad.bench.runner import add_ratios, run_case, start_backends
        from jacgrad.bench.timing import cpu_count

        names = self.args.backends or (CPU_BACKENDS if self.dry else GPU_BACKENDS + CPU_BACKENDS[:2])
        started, skipped, threads = start_backends(names, cpu_count())
        live = {b.name: b for b in started}
        o = Options(dtype="float32", repeats=2 if self.dry else 5, warmup=1 if self.dry else 2,
                    min_time=0.0 if self.dry else 0.05, progress=not self.dry, check=True)
        device_names = [n for n in live if (n in CPU_BACKENDS) == self.dry]
        cpu_names = [n for n in live if n in CPU_BACKENDS and not self.dry]
        rows, cases = [], {}
        bench = {"options": o.to_dict(), "environment": environment(threads, list(live.values())),
                 "skipped": skipped, "rows": rows, "elapsed_s": 0.0}
        self.partial["peers"] = {"cases": cases, "bench": bench, "skipped": skipped}
        for key, label, task, net, widths, batch, with_cpu in (DRY_CASES if self.dry else GPU_CASES):
            if self.left() < (5 if self.dry else 60):
                cases[key] = {"label": label, "status": "skipped", "note": "time budget spent"}
                continue
            use = [live[n] for n in device_names + (cpu_names if with_cpu else [])]
            case = Case(task, widths, batch, name=net)
            t0 = time.perf_counter()
            try:
                progress = Progress(1 + sum(1 + 3 * (1 + o.repeats) for _ in use), enabled=o.progress)
                got = run_case(case, use, o, progress)
                progress.close()
                for r in got:
                    r["case"] = key
                rows += got
                add_ratios(rows)
                cases[key] = {"label": label, "status": "ok", "seconds": time.perf_counter() - t0}
            except Exception as exc:  # noqa: BLE001
                cases[key] = {"label": label, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                              "traceback": traceback.format_exc()}
            if self.dev is not None:
                self.dev.free()
        bench["elapsed_s"] = sum(c.get("seconds", 0) for c in cases.values())
        return self.partial.pop("peers")

    # ------------------------------------------------------------------ all
    def main(self) -> int:
        self.args.out.mkdir(parents=True, exist_ok=True)
        if not self.dry:
            reason = jg.backend.gpu_unavailable_reason()
            if reason is not None:
                msg = f"gpu_suite: no usable GPU here ({reason}); use --dry-run-cpu to exercise the suite on the CPU"
                print(msg, file=sys.stderr)
                self.results["sections"]["environment"] = {"status": "failed", "error": msg}
                self.write()
                return 1
        try:
            self.dev = suite_device.Device("cpu" if self.dry else "gpu")
        except Exception as exc:  # noqa: BLE001
            self.results["sections"]["environment"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                                       "traceback": traceback.format_exc()}
            self.write()
            return 1
        self.run("environment", self.environment, 60)
        self.run("pytest_gpu", self.pytest_gpu, self.args.pytest_timeout + 30)
        self.run("validation", self.validation, 120)
        self.run("ceilings", self.ceilings, 60)
        self.run("fused_kernel", self.fused_kernel, 60)
        self.run("tf32", self.tf32, 60)
        self.run("peers", self.peers, 240)
        try:
            self.results["targets"] = suite_report.targets(self.results)
        except Exception as exc:  # noqa: BLE001 - the numbers are written even if the summary breaks
            self.results["targets"] = []
            self.results["targets_error"] = f"{type(exc).__name__}: {exc}"
        self.results["elapsed_s"] = self.elapsed()
        self.write()
        failed = [k for k, v in self.results["sections"].items() if v["status"] == "failed"]
        print(f"[gpu_suite {self.elapsed():5.0f}s] wrote {self.args.out / 'results.md'}"
              + (f"; failed sections: {', '.join(failed)}" if failed else "; every section ran"), file=sys.stderr)
        return 0 if not failed else 1

    def write(self) -> None:
        out = self.args.out
        from jacgrad.bench.report import strict_json

        text = json.dumps(strict_json(self.results), indent=1, default=_jsonable, allow_nan=False)
        (out / "results.json").write_text(text + "\n", encoding="utf-8")
        (out / "results.md").write_text(suite_report.markdown(self.results), encoding="utf-8")


def _jsonable(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _nvidia_smi() -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return p.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


def _junit_counts(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    m = re.search(r"<testsuite [^>]*>", text)
    if not m:
        return {}
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', m.group(0)))
    keys = ("tests", "failures", "errors", "skipped", "time")
    return {k: (float(attrs[k]) if k == "time" else int(attrs[k])) for k in keys if k in attrs}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for results.md / results.json "
                   "(default: benchmarks/results/<device>-<date>)")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="run every section on NumPy with tiny sizes (no GPU needed; not GPU numbers)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip, out of {','.join(SECTIONS)}")
    p.add_argument("--backends", default="", help="backends of the peers section (default: the GPU ones, "
                   "plus jacgrad-numpy,torch-cpu for the small cases; dry run: the CPU ones)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole suite (default 450)")
    p.add_argument("--pytest-timeout", type=float, default=200.0, help="seconds for pytest -m gpu (default 200)")
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
    if a.out is None:
        if a.dry_run_cpu:
            p.error("--out is required with --dry-run-cpu (dry runs do not belong in benchmarks/results/)")
        device = "gpu"
        try:
            if jg.backend.gpu_available():
                xp = jg.get_xp(jg.to_device(np.zeros(1), "gpu"))
                name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
                device = name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001
            pass
        a.out = ROOT / "benchmarks" / "results" / f"{_slug(device)}-{datetime.date.today().isoformat()}"
    return a


if __name__ == "__main__":
    sys.exit(Suite(parse_args()).main())

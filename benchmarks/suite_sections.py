"""The sections of ``gpu_suite.py``, each run in a child process of its own.

``gpu_suite.py`` starts ``python gpu_suite.py --child NAME ...`` per section (and per case of the
peers section): whatever a section does — a segfault in a captured CUDA graph or the direct cuBLAS
path, a hang, an exception — costs that section only. The child enables ``faulthandler`` (a crash
prints every thread's Python stack to the log the parent keeps) and writes its result as JSON.

Sections: ``environment`` (device, versions, and whether a GPU runs kernels at all),
``ceilings`` (copy bandwidth, GEMM rate), ``fused_kernel`` (the elementwise kernels as % of copy
bandwidth), ``norm_kernels`` (the normalisation kernels, validated, as % of copy bandwidth), ``validation`` (every GPU result against float64 NumPy), ``compiled`` (the compiled
step: graph capture and replays against float64), ``blocks`` (``jg.Sequential`` on the device against
float64 NumPy, timed against NumPy and torch), ``tf32``, and ``peers:<case>``.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

import numpy as np

import jacgrad as jg
import suite_device
import suite_blocks
import suite_products
import suite_norm
import suite_validate

ROOT = Path(__file__).resolve().parents[1]
TAPERING, HOURGLASS = [512, 256, 128, 64, 10], [256, 256, 256, 8, 256, 256, 256]

# (key, label, task, net name or None, widths, batch, also on the CPU)
# small cases first: what they leave of their share goes to the large ones, whose JAX compile
# (XLA's GEMM autotuning) took over 26 s for the large step on the first H100 run
GPU_CASES = [
    ("small_train", "training step, small net, B=64, 32×256", "train", None, [256] * 33, 64, True),
    ("large_vjp", "VJP chain, B=4096, 8×4096", "vjp", None, [4096] * 9, 4096, False),
    ("large_train", "training step, B=4096, 8×4096", "train", None, [4096] * 9, 4096, False),
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
# a case's share of the peers section's time, by weight among the cases still to run (default 1)
PEER_WEIGHTS = {"large_train": 3, "jac_tapering": 2, "jac_hourglass": 2}
SIZES = {"gpu": {"copy_bytes": 1 << 30, "gemm_n": 8192, "fused_n": 1 << 28,
                 "tf32": ([1024] * 9, 512, [4096] * 9, 4096)},
         "cpu": {"copy_bytes": 1 << 22, "gemm_n": 128, "fused_n": 1 << 16,
                 "tf32": ([32] * 4, 8, [32] * 3, 16)}}
GPU_BACKENDS, CPU_BACKENDS = ["jacgrad-cupy", "torch-cuda", "jax-gpu"], ["jacgrad-numpy", "torch-cpu", "jax-cpu"]


def cases(dry: bool) -> list[tuple]:
    return DRY_CASES if dry else GPU_CASES


class Sections:
    """One section's work, in the child. ``copy_gbps``: the ceilings section's copy bandwidth, if measured."""

    def __init__(self, dry: bool, backends: list[str], copy_gbps: float | None = None):
        self.dry = dry
        self.backends = backends
        self.copy_gbps = copy_gbps
        self._dev = None

    @property
    def dev(self) -> suite_device.Device:
        if self._dev is None:
            self._dev = suite_device.Device("cpu" if self.dry else "gpu")
        return self._dev

    def run(self, name: str) -> dict:
        """``{"status", "data" | "error", "traceback", "seconds"}`` of one section (``peers:<case>`` too)."""
        t0 = time.perf_counter()
        rec: dict = {"status": "ok"}
        try:
            if name.startswith("peers:"):
                rec["data"] = self.peers_case(name.split(":", 1)[1])
            else:
                rec["data"] = getattr(self, name)()
            if isinstance(rec["data"], dict) and rec["data"].get("ok") is False:
                rec["status"] = "failed"
        except Exception as exc:  # noqa: BLE001 - a failure is a result; a timeout or Ctrl-C is not swallowed
            rec.update(status="failed", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        rec["seconds"] = time.perf_counter() - t0
        return rec

    # ------------------------------------------------------------------ sections
    def environment(self) -> dict:
        env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "host": platform.node(), "python": platform.python_version(), "numpy": np.__version__,
               "jacgrad": jg.__version__, "cpu_count": os.cpu_count(), "cpu_model": cpu_model()}
        try:
            # --dirty: a tree copied onto a GPU machine may carry a .git older than its files (seen on
            # the first H100 runs: HEAD said 80efb0b for a tree with later commits)
            env["commit"] = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except Exception:  # noqa: BLE001
            env["commit"] = None
        if self.dry:
            env["device"] = f"CPU dry run ({cpu_model()})"
            env["cuda"] = None
        else:
            env["gpu_unavailable_reason"] = jg.backend.gpu_unavailable_reason()
            if env["gpu_unavailable_reason"] is not None:
                return env
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
        return env

    def validation(self) -> dict:
        return suite_validate.validate(self.dev)

    def compiled(self) -> dict:
        return suite_validate.validate_compiled(self.dev)

    def ceilings(self) -> dict:
        s = SIZES[self.dev.where]
        out = {"copy": suite_device.copy_bandwidth(self.dev, s["copy_bytes"]), "gemm": []}
        for dtype in ("float32", "float64"):
            out["gemm"].append(suite_device.gemm_rate(self.dev, s["gemm_n"], dtype))
        return out

    def fused_kernel(self) -> dict:
        copy = self.copy_gbps
        if copy is None:  # the ceilings section failed or was skipped: measure the copy here
            copy = suite_device.copy_bandwidth(self.dev, SIZES[self.dev.where]["copy_bytes"])["GB_per_s"]
        return {"copy_GB_per_s": copy, "rows": suite_device.fused_kernel(self.dev, SIZES[self.dev.where]["fused_n"], copy)}

    def norm_kernels(self) -> dict:
        copy = self.copy_gbps
        if copy is None:
            copy = suite_device.copy_bandwidth(self.dev, SIZES[self.dev.where]["copy_bytes"])["GB_per_s"]
        return suite_norm.norm_kernels(self.dev, copy)

    def blocks(self) -> dict:
        return suite_blocks.blocks(self.dev)

    def products(self) -> dict:
        return suite_products.products(self.dev)

    def tf32(self) -> dict:
        return suite_device.tf32_mode(self.dev, *SIZES[self.dev.where]["tf32"])

    def peers_case(self, key: str) -> dict:
        """One case of the peers table: its rows for every backend, timed interleaved."""
        from jacgrad.bench.cases import Case
        from jacgrad.bench.machine import environment
        from jacgrad.bench.options import Options
        from jacgrad.bench.report import Progress
        from jacgrad.bench.runner import run_case, start_backends
        from jacgrad.bench.timing import cpu_count

        spec = {c[0]: c for c in cases(self.dry)}
        if key not in spec:
            raise KeyError(f"no peers case {key!r}; cases: {', '.join(spec)}")
        _, label, task, net, widths, batch, with_cpu = spec[key]
        names = self.backends or (CPU_BACKENDS if self.dry else GPU_BACKENDS + CPU_BACKENDS[:2])
        started, skipped, threads = start_backends(names, cpu_count())
        live = {b.name: b for b in started}
        o = Options(dtype="float32", repeats=2 if self.dry else 5, warmup=1 if self.dry else 2,
                    min_time=0.0 if self.dry else 0.05, progress=False, check=True)
        device_names = [n for n in live if (n in CPU_BACKENDS) == self.dry]
        cpu_names = [n for n in live if n in CPU_BACKENDS and not self.dry]
        use = [live[n] for n in device_names + (cpu_names if with_cpu else [])]
        rows = run_case(Case(task, widths, batch, name=net), use, o, Progress(1, enabled=False))
        for r in rows:
            r["case"] = key
        return {"label": label, "rows": rows, "skipped": skipped, "options": o.to_dict(),
                "environment": environment(threads, list(live.values()))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _nvidia_smi() -> str | None:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        return p.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None

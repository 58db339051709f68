"""The machine under ``jacgrad bench``: CPU, library versions, BLAS, threads and load — the
header of the table and the ``environment`` of the JSON."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import numpy as np

from .base import Backend
from .timing import thread_report

__all__ = ["available_memory", "environment", "load_average"]


def _versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__}
    from .. import __version__

    out["jacgrad"] = __version__
    for mod in ("torch", "jax", "cupy"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def available_memory() -> int | None:
    """Bytes of host memory available to a new allocation (``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# OpenBLAS kernel families that use no AVX-512
_PRE_AVX512_KERNELS = {"haswell", "zen", "sandybridge", "nehalem", "core2", "prescott", "atom", "bulldozer",
                       "piledriver", "steamroller", "excavator", "barcelona", "opteron"}


def blas_kernel_warning(architecture: str | None, coretype: str | None, cpu_flags: set[str]) -> str | None:
    """A warning when NumPy's OpenBLAS was made to run pre-AVX-512 kernels on a CPU that has AVX-512:
    ``OPENBLAS_CORETYPE`` forces the kernel family, and torch (MKL) and JAX (XLA) are not bound by it,
    so a race between them measures the setting, not the libraries.

        >>> blas_kernel_warning("Haswell", "Haswell", {"avx2", "avx512f"}) is not None
        True
        >>> blas_kernel_warning("SkylakeX", None, {"avx2", "avx512f"}) is None
        True
    """
    if not architecture or "avx512f" not in cpu_flags or architecture.lower() not in _PRE_AVX512_KERNELS:
        return None
    why = f"OPENBLAS_CORETYPE={coretype}" if coretype else "OpenBLAS's own choice"
    return (f"NumPy's OpenBLAS runs {architecture} kernels ({why}) on a CPU with AVX-512, which torch's MKL and "
            "JAX's XLA use (on this project's AMD EPYC the float32 training step took 1.6x as long with Haswell kernels). To race them, run with OPENBLAS_CORETYPE and "
            "OPENBLAS_L2_SIZE unset (env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE jacgrad bench ...)")


def _gpu_name(live: list[Backend]) -> str | None:
    """The CUDA device's name when a GPU backend runs (asked of CuPy, else torch)."""
    if not any(b.device == "gpu" for b in live):
        return None
    try:
        from ..core.backend import get_xp, gpu_available, to_device

        if gpu_available():
            xp = get_xp(to_device(np.zeros(1), "gpu"))
            name = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a name is a nicety, not a reason to fail
        pass
    return None


def environment(threads: dict, live: list[Backend]) -> dict:
    """Machine, library versions, BLAS and thread settings: the header of the table and JSON."""
    tr = thread_report()
    blas = tr.get("numpy_blas", {})
    coretype = os.environ.get("OPENBLAS_CORETYPE", "unset")
    blas_line = (f"NumPy: {blas.get('library')} {blas.get('version') or ''} "
                 f"({blas.get('architecture') or '?'} kernels, OPENBLAS_CORETYPE={coretype})").replace("  ", " ")
    source = f" (from {threads['source']})" if threads.get("source") else ""
    parts = [f"{threads['requested']} of {tr['cpus']} CPUs{source} — NumPy BLAS "
             f"{blas.get('threads') if blas.get('threads') is not None else 'uncontrolled (no threadpoolctl)'}"]
    for b in live:  # every contender's own count, as it stands after start_backends
        if b.device == "cpu":
            parts.append(f"{b.name} {b.threads()}")
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "gpu": _gpu_name(live),
        "platform": platform.platform(),
        "versions": _versions(),
        "threads": threads,
        "thread_report": tr,
        "threads_line": ", ".join(parts),
        "blas_line": blas_line,
        "blas_warning": blas_kernel_warning(blas.get("architecture"), os.environ.get("OPENBLAS_CORETYPE"), _cpu_flags()),
    }


def load_average() -> float | None:
    """The 1-minute load average: other processes' work shows up in the timings."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None

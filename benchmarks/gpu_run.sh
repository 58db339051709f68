#!/usr/bin/env bash
# The one prepared command for a machine with a GPU (run from anywhere; it works in the checkout):
#   bash benchmarks/gpu_run.sh [OUT [gpu_suite options...]]
# Sized for a 10-minute device call: the gpu tests get 180 s, the suite's sections 330 s
# (GPU_RUN_BUDGET); GPU_RUN_TESTS narrows the tests (default: tests). A CPU rehearsal:
#   bash benchmarks/gpu_run.sh /tmp/out --dry-run-cpu
# 1. the versions and the GPU (python3, CuPy, torch, JAX);
# 2. the `gpu` tests (pytest -m gpu: every CuPy test), log in OUT/pytest_gpu_direct.log;
# 3. the GPU suite (benchmarks/gpu_suite.py: every product and layer against float64 NumPy, the
#    kernels' bandwidth, the peers), into OUT (default benchmarks/results/<device>-<date>/).
# Each step runs whatever the previous one did; the exit status is the worst of them.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${1:-}
if [ -z "$OUT" ]; then
  OUT=$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); import gpu_suite, datetime; print(f"benchmarks/results/{gpu_suite.device_slug()}-{datetime.date.today().isoformat()}")')
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/versions.txt"
import platform, sys
print("python", sys.version.split()[0], platform.platform())
for name in ("numpy", "cupy", "torch", "jax", "opacus", "neural_tangents"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001
        print(name, "not importable:", type(exc).__name__, exc)
try:
    import cupy
    print("gpu", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(), "CUDA runtime",
          cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:  # noqa: BLE001
    print("no usable GPU:", type(exc).__name__, exc)
PYEOF
timeout 180 "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider -o addopts= ${GPU_RUN_TESTS:-tests} \
  > "$OUT/pytest_gpu_direct.log" 2>&1
rc=$?; tail -3 "$OUT/pytest_gpu_direct.log"; [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=$rc
"$PY" benchmarks/gpu_suite.py --out "$OUT" --skip pytest_gpu --budget "${GPU_RUN_BUDGET:-330}" "${@:2}"
rc=$?; [ $rc -ne 0 ] && status=$rc
echo "gpu_run.sh: results in $OUT (exit $status)"
exit $status

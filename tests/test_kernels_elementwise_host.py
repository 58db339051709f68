"""The loops of the fused kernels (kernels/elementwise.cuh) run on the host, thread by thread.

A driver built with g++ (and with nvcc as host code) runs EVERY thread of a grid of ``stride``
threads through ``map_broadcast`` / ``map1`` / ``map1to2`` — the bodies of the kernels in
kernels/fused.cu — on sentinel-filled buffers, aligned (the 16-byte pack path) and offset by one
element (the scalar path), and compares the result with a plain loop: every element written
exactly once, with its own column ``i mod period``, bitwise equal to the reference. The device
build of the same code (nvcc for sm_90) is tests/test_kernels_host.py's; that its loads are
16 bytes wide and it has no 64-bit % per element is checked in its PTX here.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from jacgrad.cuda import kernels

DRIVER = r"""
#include <cmath>
#include <cstdio>
#include <vector>
#include "activations.cuh"
#include "elementwise.cuh"

using namespace jacgrad;
static int failures = 0;
constexpr int GUARD = 8;

// n elements (NaN until written) at a 16-byte boundary plus `offset` elements, with GUARD finite
// sentinels on each side: an input read past the end gives a finite result there, a write past it shows.
template <class T> struct Buffer {
  std::vector<T> store;
  T* p;
  long long n;
  Buffer(long long n_, int offset) : store(n_ + 2 * GUARD + 8, T(-7777)), n(n_) {
    p = store.data() + GUARD;
    while (reinterpret_cast<unsigned long long>(p) % 16) ++p;
    p += offset;
    for (long long i = 0; i < n; ++i) p[i] = T(NAN);
  }
  bool guards_intact() const {
    for (int k = 1; k <= GUARD - 1; ++k)
      if (!(p[-k] == T(-7777)) || !(p[n + k - 1] == T(-7777))) return false;
    return true;
  }
};

template <class T> static T value(long long i, int salt) { return T(std::sin(0.37 * i + salt) * 3.0); }

template <class T> static void check(const char* what, long long n, long long period, long long stride, int offset,
                                     const Buffer<T>& got, const std::vector<T>& want) {
  const char* type = sizeof(T) == 4 ? "float" : "double";
  if (!got.guards_intact()) {
    std::printf("FAIL %s %s n=%lld period=%lld stride=%lld offset=%d: wrote outside the array\n", what, type, n,
                period, stride, offset);
    ++failures;
    return;
  }
  for (long long i = 0; i < n; ++i) {
    if (!(got.p[i] == want[i])) {  // a NaN sentinel left means an element nobody wrote
      std::printf("FAIL %s %s n=%lld period=%lld stride=%lld offset=%d i=%lld got=%a want=%a\n", what, type, n, period,
                  stride, offset, i, (double)got.p[i], (double)want[i]);
      ++failures;
      return;
    }
  }
}

template <class T> static void broadcast(long long rows, long long period, long long stride, int offset, bool inplace) {
  const long long n = rows * period;
  Buffer<T> a(n, offset), b(period, offset), o(n, offset);
  for (long long i = 0; i < n; ++i) a.p[i] = value<T>(i, 1);
  for (long long c = 0; c < period; ++c) b.p[c] = value<T>(c, 2);
  std::vector<T> want(n);
  for (long long i = 0; i < n; ++i) want[i] = a.p[i] * derivative<Tanh, false>(b.p[i % period]);
  Buffer<T>& out = inplace ? a : o;
  for (long long tid = 0; tid < stride; ++tid)  // every thread of the grid, one after the other
    ew::map_broadcast(tid, stride, (const T*)a.p, (const T*)b.p, out.p, n, period,
                      [](T x, T y) { return x * derivative<Tanh, false>(y); });
  check(inplace ? "map_broadcast in place" : "map_broadcast", n, period, stride, offset, out, want);
}

template <class T> static void unary(long long n, long long stride, int offset) {
  Buffer<T> h(n, offset), y(n, offset), y2(n, offset), d(n, offset);
  for (long long i = 0; i < n; ++i) h.p[i] = value<T>(i, 3);
  std::vector<T> want_y(n), want_d(n);
  for (long long i = 0; i < n; ++i) {
    want_y[i] = Gelu::f(h.p[i]);
    want_d[i] = Gelu::df(h.p[i]);
  }
  for (long long tid = 0; tid < stride; ++tid) ew::map1(tid, stride, (const T*)h.p, y.p, n, [](T x) { return Gelu::f(x); });
  check("map1", n, n, stride, offset, y, want_y);
  for (long long tid = 0; tid < stride; ++tid)
    ew::map1to2(tid, stride, (const T*)h.p, y2.p, d.p, n, [](T x) { return Gelu::f(x); }, [](T x) { return Gelu::df(x); });
  check("map1to2 y", n, n, stride, offset, y2, want_y);
  check("map1to2 d", n, n, stride, offset, d, want_d);
}

template <class T> static void all() {
  const long long strides[] = {1, 2, 3, 7, 32, 256, 5000};
  const long long periods[] = {1, 2, 3, 4, 8, 10, 16, 33, 64};
  const long long rows[] = {0, 1, 2, 5, 17};
  const long long sizes[] = {0, 1, 3, 4, 5, 64, 1027};
  for (long long s : strides)
    for (int offset = 0; offset < 2; ++offset) {  // 0: the 16-byte pack path; 1: the scalar path
      for (long long p : periods)
        for (long long r : rows) {
          broadcast<T>(r, p, s, offset, false);
          broadcast<T>(r, p, s, offset, true);
        }
      broadcast<T>(1, 1027, s, offset, false);  // same shape (period == n), n not a multiple of the pack
      for (long long n : sizes) unary<T>(n, s, offset);
    }
}

int main() {
  all<float>();
  all<double>();
  std::printf("%s %d\n", failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
"""


@pytest.fixture(scope="module")
def drivers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("elementwise")
    (tmp / "driver.cpp").write_text(DRIVER)
    inc = f"-I{kernels.source_dir()}"
    jobs = {"g++": ["g++", "-std=c++17", "-O2", "-Wall", "-Werror", inc, "driver.cpp", "-o", "g++.bin"],
            "nvcc-host": ["nvcc", "-std=c++17", "-O2", "-x", "cu", inc, "driver.cpp", "-o", "nvcc-host.bin"]}
    running = {job: subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for job, cmd in jobs.items() if shutil.which(cmd[0])}
    out = {}
    for job, proc in running.items():
        log, _ = proc.communicate(timeout=300)
        out[job] = tmp / f"{job}.bin" if proc.returncode == 0 else AssertionError(f"{job} failed:\n{log}")
    return out


@pytest.mark.parametrize("compiler", ["g++", "nvcc-host"])
def test_every_thread_of_the_grid_writes_its_elements_once_and_right(drivers, compiler):
    if compiler not in drivers:
        pytest.skip(f"{compiler.split('-')[0]} is not on PATH")
    if isinstance(drivers[compiler], BaseException):
        raise drivers[compiler]
    run = subprocess.run([str(drivers[compiler])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK 0"), run.stdout[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_device_code_loads_16_bytes_and_has_no_64_bit_modulo_per_element(tmp_path):
    exprs = [kernels.name_expression("scale_cotangent", dt, "jacgrad::Tanh", True) for dt in ("float32", "float64")]
    exprs.append(kernels.name_expression("forward_with_derivative", "float32", "jacgrad::Gelu"))
    body = ",\n".join(f"    (void*)&{e}" for e in exprs)
    (tmp_path / "unit.cu").write_text(f'#include "fused.cu"\nvoid* const jg[] = {{\n{body}\n}};\n')
    subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", f"-I{kernels.source_dir()}", "unit.cu", "-o", "unit.ptx"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    ptx = (tmp_path / "unit.ptx").read_text()
    entries = re.split(r"\.visible \.entry ", ptx)[1:]
    assert len(entries) == 3
    for entry, wide in zip(entries, ("ld.global.nc.v4.f32", "ld.global.nc.v2.f64", "ld.global.nc.v4.f32")):
        name = entry.split("(", 1)[0]
        assert wide in entry, f"{name}: no 16-byte load"
        assert not _rem_in_loops(entry), f"{name}: a % inside a loop: {_rem_in_loops(entry)}"


def _rem_in_loops(ptx: str) -> list[str]:
    """The ``rem`` instructions inside a loop body: between a label and a later branch back to it."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L\w+):", ln.strip()))}
    loops = [(labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L\w+);", ln)) and labels.get(m.group(1), i) < i]
    return [lines[k].strip() for k, ln in enumerate(lines) if re.search(r"\brem\.", ln)
            and any(start < k < end for start, end in loops)]

"""bncore/_half.h, the binary16 loads and stores of the float16-gradient
kernels, compiled on its own and checked against NumPy's float16 conversions:
every one of the 65536 inputs for the load, and for the store every half value,
every tie between neighbours (round half to even), the floats on either side
of each tie, doubles nearer to each tie than any float (rounded once, not
twice), a million random float32 bit patterns and random doubles."""
import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest

HEADER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bncore")
SOURCE = r"""
#include <stddef.h>
#include "_half.h"
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
void load_all(const uint16_t* h, double* out, ptrdiff_t n)
{ for (ptrdiff_t i = 0; i < n; i++) out[i] = bncore_half_load(h + i); }
void store_all(const double* v, uint16_t* out, ptrdiff_t n)
{ for (ptrdiff_t i = 0; i < n; i++) bncore_half_store(out + i, v[i]); }
/* the whole-run conversions, in runs of every length up to 37 in turn (every
 * tail) and, with ftz, with flush-to-zero and denormals-are-zero set */
static unsigned set_ftz(int ftz)
{
#if defined(__SSE__)
    unsigned old = _mm_getcsr();
    if (ftz) _mm_setcsr(old | 0x8040u);
    return old;
#else
    (void)ftz; return 0;
#endif
}
static void restore(unsigned old)
{
#if defined(__SSE__)
    _mm_setcsr(old);
#else
    (void)old;
#endif
}
void load_runs(const uint16_t* h, double* out, ptrdiff_t n, int ftz)
{
    unsigned old = set_ftz(ftz);
    ptrdiff_t i = 0, len = 1;
    while (i < n) {
        ptrdiff_t m = n - i < len ? n - i : len;
        bncore_half_to_double_n(h + i, out + i, m);
        i += m; len = len % 37 + 1;
    }
    restore(old);
}
/* through float32: out[i] = (double) of what bncore_half_to_float_n gave */
void load_runs_f32(const uint16_t* h, double* out, ptrdiff_t n, int ftz)
{
    float buf[37];
    unsigned old = set_ftz(ftz);
    ptrdiff_t i = 0, len = 1, k;
    while (i < n) {
        ptrdiff_t m = n - i < len ? n - i : len;
        bncore_half_to_float_n(h + i, buf, m);
        restore(old);                 /* widened with the caller's settings */
        for (k = 0; k < m; k++) out[i + k] = (double)buf[k];
        set_ftz(ftz);
        i += m; len = len % 37 + 1;
    }
    restore(old);
}
void store_runs(const double* v, uint16_t* out, ptrdiff_t n, int ftz)
{
    unsigned old = set_ftz(ftz);
    ptrdiff_t i = 0, len = 1;
    while (i < n) {
        ptrdiff_t m = n - i < len ? n - i : len;
        bncore_half_from_double_n(v + i, out + i, m);
        i += m; len = len % 37 + 1;
    }
    restore(old);
}
int simd_paths(void) { return 2 * BNCORE_HALF_SIMD_STORE + BNCORE_HALF_SIMD_LOAD; }
"""

# how each build is made, and which hardware conversion paths it must take
# where the machine has them (simd_paths: 1 F16C loads, + 2 AVX2 stores or
# + 4 AVX-512 stores; 0 the element functions only)
BUILDS = {
    "native": ("-O3 -march=native", None),
    "O0": ("-O0", 0),
    "x86-64": ("-O3 -march=x86-64", 0),
    "x86-64-v3": ("-O3 -march=x86-64-v3", 3),
    "x86-64-v4": ("-O3 -march=x86-64-v4", 5),
}
MODES = ["element", "runs", "runs-ftz", "runs-float32", "runs-float32-ftz"]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture(scope="module", params=list(BUILDS))
def half_build(request, tmp_path_factory):
    """The header built as the extensions are (vectorized, -march=native),
    unoptimized, for plain x86-64 (no F16C: the element functions only), for
    x86-64-v3 (F16C loads, AVX2 stores) and x86-64-v4 (AVX-512 stores)."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this machine")
    flags, paths = BUILDS[request.param]
    if request.param.startswith("x86-64"):
        import platform
        if platform.machine() not in ("x86_64", "AMD64"):
            pytest.skip("an x86-64 build")
        if request.param == "x86-64-v3" and not {"avx2", "f16c", "fma", "bmi2"} <= _cpu_flags():
            pytest.skip("this CPU cannot run an x86-64-v3 build")
        if request.param == "x86-64-v4" and not {"avx512f", "avx512vl", "avx512bw", "avx512dq",
                                                 "avx512cd", "f16c"} <= _cpu_flags():
            pytest.skip("this CPU cannot run an x86-64-v4 build")
    d = tmp_path_factory.mktemp("half")
    (d / "half.c").write_text(SOURCE)
    lib = d / "libhalf.so"
    run = subprocess.run(["gcc", *flags.split(), "-fno-math-errno", "-shared", "-fPIC",
                          "-I", HEADER_DIR, str(d / "half.c"), "-o", str(lib)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    so = ctypes.CDLL(str(lib))
    ptr = ctypes.c_void_p
    so.load_all.argtypes = so.store_all.argtypes = [ptr, ptr, ctypes.c_ssize_t]
    so.load_runs.argtypes = so.store_runs.argtypes = so.load_runs_f32.argtypes = [
        ptr, ptr, ctypes.c_ssize_t, ctypes.c_int]
    return request.param, so


@pytest.fixture(params=MODES)
def half_lib(request, half_build):
    """(load, store) through the element functions, through the whole-run
    functions (loads to float64, and to float32), and through those with FTZ
    and DAZ set."""
    _, so = half_build
    mode = request.param

    def load(h):
        h = np.ascontiguousarray(h, np.uint16)
        out = np.empty(h.size, np.float64)
        if mode == "element":
            so.load_all(h.ctypes.data, out.ctypes.data, h.size)
        elif mode.startswith("runs-float32"):
            so.load_runs_f32(h.ctypes.data, out.ctypes.data, h.size, int(mode.endswith("ftz")))
        else:
            so.load_runs(h.ctypes.data, out.ctypes.data, h.size, int(mode.endswith("ftz")))
        return out

    def store(v):
        v = np.ascontiguousarray(v, np.float64)
        out = np.empty(v.size, np.uint16)
        if mode == "element":
            so.store_all(v.ctypes.data, out.ctypes.data, v.size)
        else:
            so.store_runs(v.ctypes.data, out.ctypes.data, v.size, int(mode.endswith("ftz")))
        return out
    return load, store


def test_hardware_paths_are_built_where_the_cpu_has_them(half_build):
    """A build that silently lost the hardware conversions (a changed guard,
    a compiler that stopped defining the macros) fails here, not only in a
    benchmark."""
    name, so = half_build
    flags = _cpu_flags()
    expected = BUILDS[name][1]
    if expected is None:           # native: what this CPU offers
        expected = (1 if {"f16c", "avx"} <= flags else 0) + (
            4 if {"f16c", "avx512f", "avx512vl"} <= flags else
            2 if {"f16c", "avx2"} <= flags else 0)
    assert so.simd_paths() == expected


def test_load_is_exact_on_every_input(half_lib):
    load, _ = half_lib
    bits = np.arange(65536, dtype=np.uint64).astype(np.uint16)
    got = load(bits).view(np.uint64)
    expected = bits.view(np.float16).astype(np.float64).view(np.uint64)
    nan = np.isnan(bits.view(np.float16))
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    # a NaN keeps its sign and payload and comes out quiet, as the hardware
    # conversions (vcvtph2ps, fcvt) give it
    b = bits[nan].astype(np.uint64)
    quiet = ((b & 0x8000) << 48) | (0x7FF << 52) | ((b & 0x3FF) << 42) | (1 << 51)
    np.testing.assert_array_equal(got[nan], quiet)


def _store_inputs():
    finite = np.arange(65536, dtype=np.uint64).astype(np.uint16).view(np.float16)
    finite = np.sort(finite[np.isfinite(finite)].astype(np.float64))
    ties = (finite[1:] + finite[:-1]) / 2           # exact in float64 and float32
    ties32 = ties.astype(np.float32)
    up = np.nextafter(ties32, np.float32(np.inf))
    down = np.nextafter(ties32, np.float32(-np.inf))
    big = np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, -np.inf], np.float32)
    rng = np.random.default_rng(0)
    random = rng.integers(0, 2 ** 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    with np.errstate(invalid="ignore"):
        values = np.concatenate([finite.astype(np.float32), ties32, up, down, big, -big, random])
        values = values.astype(np.float64)
    # doubles a hair off each tie, closer to it than any float is: a store
    # through a plain (float) made them the tie, then rounded it to even
    hair = ties * 2.0 ** -40
    rdouble = rng.standard_normal(200_000) * np.exp2(rng.integers(-30, 18, 200_000))
    return np.concatenate([values, ties + hair, ties - hair, -(ties + hair), rdouble,
                           [1 + 2 ** -11 + 2 ** -40, 65519.99999, 1e300, -1e300, 2 ** -25 + 2 ** -60]])


def test_store_rounds_to_nearest_even_like_numpy(half_lib):
    _, store = half_lib
    v = _store_inputs()
    got = store(v)
    with np.errstate(invalid="ignore", over="ignore"):
        expected = v.astype(np.float16).view(np.uint16)     # NumPy: rounded once from float64
    nan = np.isnan(v)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    g = got[nan]
    assert np.all((g & 0x7C00) == 0x7C00) and np.all(g & 0x0200)          # quiet NaN
    np.testing.assert_array_equal(g & 0x8000, (np.signbit(v[nan]) * 0x8000).astype(np.uint16))


def test_ties_round_to_even(half_lib):
    _, store = half_lib
    # 1 + 2^-11 lies halfway between 1 and 1 + 2^-10: to the even mantissa, 1
    # 1 + 3 * 2^-11 lies halfway between 1 + 2^-10 and 1 + 2^-9: to 1 + 2^-9
    got = store(np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 2 ** -25, 3 * 2 ** -25]))
    np.testing.assert_array_equal(got.view(np.float16).astype(np.float64),
                                  [1.0, 1 + 2 ** -9, 0.0, 2 ** -23])

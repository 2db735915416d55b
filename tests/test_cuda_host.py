"""The cluster kernels' CUDA source, run as host C++ (tests/cuda_host/): one OS
thread per CUDA thread, std::barrier for __syncthreads and the cluster
barrier, per-CTA shared memory filled with garbage, remote reads from the
other CTAs' copies. Checks indexing, slicing of the channel over the cluster,
barrier placement, the reduction and what each CTA reads, against the CPU
engine, on a machine without a GPU. (What it cannot check: the GPU's memory
model, the PTX of the three cluster primitives, speed; scripts/gpu_check.sh
runs the same kernels on an H100.)

The float4 rows kernels of _bn_kernels.cu run the same way: the three-kernel
training path block by block, and the cooperative kernels with every block of
their grid running at once, grid barriers included; the two must agree bit for
bit and match the CPU engine, and ThreadSanitizer must find no race between
blocks across the grid barriers (on the host the barrier's spin is an atomic
load)."""
import os
import shutil
import subprocess

import numpy as np
import pytest

import bncore
from bncore.testing.reference import normwise_relative_error as rel

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) for the host build")

# outer < 8 (CTAs holding nothing), a short last slice, several planes per CTA,
# every CTA full (outer 16 and 8), more than BNC_UNROLL * 256 float4 per CTA
# ((24, 2, 40, 40): 1200)
SHAPES = [(5, 3, 8, 12), (9, 4, 32), (17, 2, 4, 16), (16, 2, 32), (8, 3, 36), (24, 2, 40, 40)]


def _require_cxx20_barrier(tmp):
    """Skip (not fail) where the C++ compiler predates std::barrier (GCC < 11)."""
    probe = tmp / "probe.cpp"
    probe.write_text("#include <barrier>\n"
                     "int main() { std::barrier<> b(1); b.arrive_and_wait(); }\n")
    proc = subprocess.run([CXX, "-std=c++20", "-pthread", "-o", str(tmp / "probe"), str(probe)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"{CXX} has no C++20 <barrier>: {proc.stderr.strip()[-200:]}")


def _build(tmp_path_factory, name, tsan=False):
    """tests/cuda_host/NAME.cpp built with warnings as errors, or for
    ThreadSanitizer (skipped where the toolchain has none); its path."""
    _require_cxx20_barrier(tmp_path_factory.mktemp("probe"))
    exe = tmp_path_factory.mktemp("cuda_host") / (name + "_tsan" * tsan)
    flags = (["-g", "-fsanitize=thread", "-Wno-tsan"] if tsan
             else ["-Wall", "-Werror", "-Wno-unknown-pragmas"])
    proc = subprocess.run([CXX, "-std=c++20", "-O1", "-pthread", *flags,
                           "-o", str(exe), os.path.join(HERE, "cuda_host", f"{name}.cpp")],
                          capture_output=True, text=True, timeout=300)
    if tsan and proc.returncode != 0:
        pytest.skip(f"no ThreadSanitizer build: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return str(exe)


@pytest.fixture(scope="module")
def host_binary(tmp_path_factory):
    return _build(tmp_path_factory, "bn_cluster_host")


def _offset_data(rng, shape):
    C = shape[1]
    bshape = [1, C] + [1] * (len(shape) - 2)
    std = rng.uniform(0.5, 2.0, C)
    return ((std * 1e5).reshape(bshape)
            + std.reshape(bshape) * rng.standard_normal(shape)).astype(np.float32)


NO_THREADS = 77     # EMU_NO_THREADS in cuda_host.h


def _run(exe, d, *args):
    proc = subprocess.run([exe, *map(str, args[:1]), str(d), *map(str, args[1:])],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == NO_THREADS:
        pytest.skip(f"this machine refused the threads of a cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [1, 0])
def test_forward_cluster_source_matches_cpu(host_binary, tmp_path, shape, affine):
    rng = np.random.default_rng(sum(shape) + affine)
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    x = _offset_data(rng, shape)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    rm, rv = np.full(C, 3.0, np.float32), np.full(C, 2.0, np.float32)
    for a, name in ((x, "x"), (w, "w"), (b, "b"), (rm, "rm"), (rv, "rv")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(host_binary, tmp_path, "forward", outer, C, inner, 0.3, 1, affine)
    y = np.fromfile(tmp_path / "y.out", np.float32).reshape(shape)
    got = [y] + [np.fromfile(tmp_path / f"{n}.out") for n in ("mean", "invstd")] \
        + [np.fromfile(tmp_path / f"{n}.out", np.float32) for n in ("rm", "rv")]
    want_rm, want_rv = rm.copy(), rv.copy()
    want = bncore.batch_norm_forward(x, w if affine else None, b if affine else None, want_rm,
                                     want_rv, momentum=0.3)
    for g, e in zip(got, list(want) + [want_rm, want_rv]):
        assert rel(g, e) <= 1e-6
    # exact two-pass statistics: the float64 mean and variance to ~1e-15
    xl = x.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != 1)
    assert rel(got[1], xl.mean(axis=red)) <= 1e-15
    assert rel(1 / got[2] ** 2 - 1e-5, xl.var(axis=red)) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [1, 0])
def test_backward_cluster_source_matches_cpu(host_binary, tmp_path, shape, training):
    rng = np.random.default_rng(sum(shape) + 10 * training)
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    x = _offset_data(rng, shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C)
    _, mean, invstd = bncore.batch_norm_forward(x)
    for a, name in ((x, "x"), (dy, "dy"), (w, "w64"), (mean, "mean"), (invstd, "invstd")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(host_binary, tmp_path, "backward", outer, C, inner, training, 1)
    dx = np.fromfile(tmp_path / "dx.out", np.float32).reshape(shape)
    dw, db = np.fromfile(tmp_path / "dw.out"), np.fromfile(tmp_path / "db.out")
    want = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=bool(training))
    for g, e in zip((dx, dw, db), want):
        assert rel(g, e) <= 1e-6


def test_cluster_inference_dx_does_not_read_an_infinite_x(host_binary, tmp_path):
    """The cluster kernel's inference dx is g dy, whatever x holds (it was NaN
    where x is Inf or NaN, through (x - mean) * 0)."""
    shape = SHAPES[0]
    rng = np.random.default_rng(12)
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    x = _offset_data(rng, shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C)
    _, mean, invstd = bncore.batch_norm_forward(x)
    x.reshape(-1)[::5] = np.inf
    x.reshape(-1)[2::7] = np.nan
    for a, name in ((x, "x"), (dy, "dy"), (w, "w64"), (mean, "mean"), (invstd, "invstd")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(host_binary, tmp_path, "backward", outer, C, inner, 0, 1)
    dx = np.fromfile(tmp_path / "dx.out", np.float32).reshape(shape)
    want = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=False)[0]
    assert np.isfinite(want).all() and dx.tobytes() == want.tobytes()


@pytest.fixture(scope="module")
def tsan_binary(tmp_path_factory):
    return _build(tmp_path_factory, "bn_cluster_host", tsan=True)


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_cluster_source_has_no_data_race(tsan_binary, tmp_path, mode):
    """Under ThreadSanitizer, every shared-memory write the kernels make is
    ordered by a barrier before the reads of other threads and CTAs (a
    missing cluster barrier is reported as a data race here)."""
    rng = np.random.default_rng(3)
    shape = (16, 2, 32)                    # every CTA of the cluster holds planes
    _write_plain_inputs(tmp_path, rng, _offset_data(rng, shape))
    args = [0.1, 1, 1] if mode == "forward" else [1, 1]
    _run_tsan(tsan_binary, mode, tmp_path, 16, 2, 32, *args)


def _write_plain_inputs(d, rng, x):
    """Every input file either mode of a harness reads, for x: unit weights,
    zero bias, zero-mean unit-variance running statistics, a random dy and
    x's own mean and invstd."""
    C = x.shape[1]
    _, mean, invstd = bncore.batch_norm_forward(x)
    files = {"x": x, "w": np.ones(C, np.float32), "b": np.zeros(C, np.float32),
             "rm": np.zeros(C, np.float32), "rv": np.ones(C, np.float32),
             "dy": rng.standard_normal(x.shape).astype(np.float32), "w64": np.ones(C),
             "mean": mean, "invstd": invstd}
    for name, a in files.items():
        a.tofile(d / f"{name}.bin")


def _run_tsan(exe, mode, d, *args):
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    proc = subprocess.run([exe, mode, str(d), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)
    if proc.returncode == NO_THREADS:
        pytest.skip(f"this machine refused the threads of a cluster: {proc.stderr.strip()}")
    assert proc.returncode == 0 and "ThreadSanitizer" not in proc.stderr, proc.stderr[-3000:]


def test_scaled_sum_of_squares_combine_on_the_host(tmp_path):
    """mt_ssq_add (the float64 2-norm's (scale, ssq) combine in
    bncore_gpu/_optim_kernels.cu) compiled as host C++: finite values give
    the norm, and two infinities give Inf (Inf / Inf once made it NaN)."""
    import re
    src = open(os.path.join(os.path.dirname(HERE), "bncore_gpu", "_optim_kernels.cu")).read()
    fn = re.search(r"__device__ __forceinline__ void mt_ssq_add\(.*?\n}\n", src, re.S).group(0)
    fn = fn.replace("__device__ __forceinline__ ", "static inline ")
    prog = tmp_path / "ssq.cpp"
    prog.write_text("#include <cmath>\n#include <cstdio>\n#include <cstdlib>\n" + fn + """
int main(int argc, char** argv) {
    double s = 0.0, q = 0.0;          // one thread's loop, then a pairwise combine
    double s2 = 0.0, q2 = 0.0;
    for (int i = 1; i < argc; ++i) {
        double a = std::fabs(std::strtod(argv[i], nullptr));
        if (i % 2) mt_ssq_add(s, q, a, 1.0); else mt_ssq_add(s2, q2, a, 1.0);
    }
    mt_ssq_add(s, q, s2, q2);
    std::printf("%.17g\\n", s * std::sqrt(q));
}
""")
    exe = tmp_path / "ssq"
    subprocess.run([CXX, "-O2", "-std=c++17", str(prog), "-o", str(exe)], check=True)

    def norm(values):
        out = subprocess.run([str(exe)] + [repr(float(v)) for v in values], check=True,
                             capture_output=True, text=True).stdout
        return float(out)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(101) * 10.0 ** rng.integers(-200, 200, 101)
    assert norm(v) == pytest.approx(bncore.grad_norm([v]), rel=1e-14)
    assert norm([np.inf, np.inf, 1.0]) == np.inf
    assert norm([np.inf, 2.0, np.inf, np.inf]) == np.inf
    assert np.isnan(norm([np.inf, np.nan, 1.0]))
    assert norm([0.0, 0.0]) == 0.0


# ---- the float4 rows kernels of _bn_kernels.cu: three kernels and the cooperative one

@pytest.fixture(scope="module")
def rows_binary(tmp_path_factory):
    return _build(tmp_path_factory, "bn_rows_host")


# (outer, C, inner, TC, nRB, R, blocks, walkR): the tile decomposition batch_norm.py
# would pick or another valid one; cooperative grids with fewer blocks than tiles
# (each block deals itself several), fewer channels than blocks (channels spread
# over the grid) and more; two column tiles, the second partly empty (P4 = 20 in
# tiles of 16: batch_norm.py takes 256 or P4, the kernels any divisor of 256);
# channels of two columns each (inner 2); either walk of the three-kernel pass
ROWS_CASES = [(40, 8, 1, 2, 5, 8, 3, 1), (30, 4, 1, 1, 6, 5, 6, 0), (6, 80, 1, 16, 3, 2, 4, 1),
              (25, 2, 2, 1, 4, 7, 2, 1), (64, 16, 1, 4, 8, 8, 5, 0)]


def _rows_input(rng, outer, C, inner, outlier):
    x = _offset_data(rng, (outer, C, inner))
    if outlier:                        # every channel's pivot (its first value) far out
        x[0] += (60 * x.std(axis=(0, 2))).astype(np.float32)[:, None]
    return x


def _rows_outputs(d, names, tag):
    return [np.fromfile(d / f"{n}{tag}.out", dt) for n, dt in names]


@pytest.mark.parametrize("case", ROWS_CASES)
@pytest.mark.parametrize("outlier", [False, True])
def test_rows_cooperative_forward_source_matches_three_kernels(rows_binary, tmp_path, case,
                                                               outlier):
    """bn_forward_rows_coop, every block a set of threads running at once with
    the grid barriers between its phases, gives bit for bit what the three
    tile kernels give, twice on one barrier word (left with its low bits
    zero), and matches the CPU engine; with outlier pivots the finalize phase
    sums each channel again (where there are rows enough for the first value
    to be an outlier: checked below)."""
    outer, C, inner, TC, nrb, R, blocks, walk = case
    rng = np.random.default_rng(outer + C + outlier)
    x = _rows_input(rng, outer, C, inner, outlier)
    if outlier and outer >= 20:
        # the finalize's condition for the second pass: the pivot more than
        # 3.9 standard deviations (s2 > 16 M2) from the channel's mean
        xd = x.astype(np.float64)
        dev = np.abs(xd[0, :, 0] - xd.mean(axis=(0, 2))) / xd.std(axis=(0, 2))
        assert (dev > 3.9).all()
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    rm, rv = np.full(C, 3.0, np.float32), np.full(C, 2.0, np.float32)
    for a, name in ((x, "x"), (w, "w"), (b, "b"), (rm, "rm"), (rv, "rv")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(rows_binary, tmp_path, "forward", outer, C, inner, TC, nrb, R, blocks, walk)
    names = [("y", np.float32), ("mean", np.float64), ("invstd", np.float64),
             ("rm", np.float32), ("rv", np.float32)]
    three, coop = _rows_outputs(tmp_path, names, "3"), _rows_outputs(tmp_path, names, "c")
    for (n, _), t, c in zip(names, three, coop):
        assert np.array_equal(t, c), n
    want_rm, want_rv = rm.copy(), rv.copy()
    want = bncore.batch_norm_forward(x, w, b, want_rm, want_rv)
    for g, e in zip(coop, [want[0].reshape(-1), want[1], want[2], want_rm, want_rv]):
        assert rel(g, e) <= 1e-6


@pytest.mark.parametrize("case", ROWS_CASES)
@pytest.mark.parametrize("training", [1, 0])
@pytest.mark.parametrize("wdtype", [np.float32, np.float64])
def test_rows_cooperative_backward_source_matches_three_kernels(rows_binary, tmp_path, case,
                                                                training, wdtype):
    """bn_backward_rows_coop<float> and <double> (weight and parameter
    gradients in float32 or float64) against the three tile kernels, bit for
    bit, and the CPU engine."""
    outer, C, inner, TC, nrb, R, blocks, walk = case
    rng = np.random.default_rng(outer + C + 7 * training)
    x = _rows_input(rng, outer, C, inner, False)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(wdtype)
    _, mean, invstd = bncore.batch_norm_forward(x)
    wname = "w32" if wdtype == np.float32 else "w64"
    for a, name in ((x, "x"), (dy, "dy"), (w, wname), (mean, "mean"), (invstd, "invstd")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(rows_binary, tmp_path, "backward", outer, C, inner, TC, nrb, R, blocks, walk, training,
         int(wdtype == np.float32))
    names = [("dx", np.float32), ("dw", wdtype), ("db", wdtype)]
    three, coop = _rows_outputs(tmp_path, names, "3"), _rows_outputs(tmp_path, names, "c")
    for (n, _), t, c in zip(names, three, coop):
        assert np.array_equal(t, c), n
    want = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=bool(training))
    for g, e in zip(coop, [want[0].reshape(-1), want[1], want[2]]):
        assert rel(g, e) <= 1e-6


def test_rows_inference_dx_does_not_read_an_infinite_x(rows_binary, tmp_path):
    """Found in review: inference dx = g dy was formed as g ((dy - 0) - (x -
    mean) 0), NaN where x is Inf or NaN; the CUDA source (both the one-launch
    kernel and the three tile kernels) must give the CPU's g dy."""
    outer, C, inner, TC, nrb, R, blocks, walk = ROWS_CASES[0]
    rng = np.random.default_rng(11)
    x = _rows_input(rng, outer, C, inner, False)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x)
    x.reshape(-1)[::5] = np.inf
    x.reshape(-1)[2::7] = np.nan
    for a, name in ((x, "x"), (dy, "dy"), (w, "w32"), (mean, "mean"), (invstd, "invstd")):
        a.tofile(tmp_path / f"{name}.bin")
    _run(rows_binary, tmp_path, "backward", outer, C, inner, TC, nrb, R, blocks, walk, 0, 1)
    names = [("dx", np.float32), ("dw", np.float32), ("db", np.float32)]
    want = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=False)[0].reshape(-1)
    assert np.isfinite(want).all()
    for outputs in (_rows_outputs(tmp_path, names, "3"), _rows_outputs(tmp_path, names, "c")):
        assert outputs[0].tobytes() == want.tobytes()


@pytest.fixture(scope="module")
def rows_tsan_binary(tmp_path_factory):
    return _build(tmp_path_factory, "bn_rows_host", tsan=True)


@pytest.mark.parametrize("mode", ["forward", "backward"])
def test_rows_cooperative_source_has_no_data_race(rows_tsan_binary, tmp_path, mode):
    """Under ThreadSanitizer, what one block of a cooperative kernel writes in a
    phase (partial sums, per-channel constants) is ordered by the grid barrier
    before other blocks read it (a kernel without its second barrier is
    reported as a data race here), and the three tile kernels' shared-memory
    trees are ordered by their __syncthreads."""
    outer, C, inner, TC, nrb, R, blocks, walk = ROWS_CASES[0]
    rng = np.random.default_rng(5)
    _write_plain_inputs(tmp_path, rng, _rows_input(rng, outer, C, inner, False))
    extra = [1, 0] if mode == "backward" else []
    _run_tsan(rows_tsan_binary, mode, tmp_path, outer, C, inner, TC, nrb, R, blocks, walk, *extra)

"""Experiment: the grid of the rows elementwise kernels (channels-last and 2-D
batch norm: bn_apply_rows_vec4, bn_dx_rows_vec4) and a variant that handles
two rows per loop step (two loads in flight per thread).

The kernels are timed alone (CUDA events around back-to-back launches, median
of 7), for several caps on the number of row blocks, against the device copy
floor; every variant's output must equal the package kernel's bit for bit
(the kernels are elementwise: the grid cannot change a result).

    python scripts/gpu_rows_grid.py
"""
from __future__ import annotations

import sys

import numpy as np

# the same arithmetic as bncore_gpu/_bn_kernels.cu's rows vec4 kernels, two
# rows per loop step
SOURCE = r"""
#define T 256
__device__ __forceinline__ float4 apply4(float4 v, const double* m, const double* s,
                                         const double* h) {
    float4 o;
    o.x = (float)(((double)v.x - m[0]) * s[0] + h[0]);
    o.y = (float)(((double)v.y - m[1]) * s[1] + h[1]);
    o.z = (float)(((double)v.z - m[2]) * s[2] + h[2]);
    o.w = (float)(((double)v.w - m[3]) * s[3] + h[3]);
    return o;
}
__device__ __forceinline__ float4 dx4(float4 d, float4 v, const double* m, const double* g,
                                      const double* a, const double* k) {
    float4 o;
    o.x = (float)(g[0] * (((double)d.x - a[0]) - ((double)v.x - m[0]) * k[0]));
    o.y = (float)(g[1] * (((double)d.y - a[1]) - ((double)v.y - m[1]) * k[1]));
    o.z = (float)(g[2] * (((double)d.z - a[2]) - ((double)v.z - m[2]) * k[2]));
    o.w = (float)(g[3] * (((double)d.w - a[3]) - ((double)v.w - m[3]) * k[3]));
    return o;
}
extern "C" __global__ void apply_x2(const float4* __restrict__ x, float4* __restrict__ y,
        long long outer, long long P4, long long inner, int TC,
        const double* __restrict__ mean, const double* __restrict__ scale,
        const double* __restrict__ shift) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = T / TC;
    long long j4 = (long long)blockIdx.x * TC + col;
    if (j4 >= P4) return;
    double m[4], s[4], h[4];
    for (int e = 0; e < 4; ++e) {
        long long c = (4 * j4 + e) / inner;
        m[e] = mean[c]; s[e] = scale[c]; h[e] = shift[c];
    }
    long long step = (long long)gridDim.y * RPI;
    long long r = (long long)blockIdx.y * RPI + phase;
    for (; r + step < outer; r += 2 * step) {
        float4 v0 = x[r * P4 + j4], v1 = x[(r + step) * P4 + j4];
        y[r * P4 + j4] = apply4(v0, m, s, h);
        y[(r + step) * P4 + j4] = apply4(v1, m, s, h);
    }
    if (r < outer) y[r * P4 + j4] = apply4(x[r * P4 + j4], m, s, h);
}
extern "C" __global__ void dx_x2(const float4* __restrict__ dy, const float4* __restrict__ x,
        float4* __restrict__ dx, long long outer, long long P4, long long inner, int TC,
        const double* __restrict__ mean, const double* __restrict__ g,
        const double* __restrict__ a, const double* __restrict__ k) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = T / TC;
    long long j4 = (long long)blockIdx.x * TC + col;
    if (j4 >= P4) return;
    double m[4], gc[4], ac[4], kc[4];
    for (int e = 0; e < 4; ++e) {
        long long c = (4 * j4 + e) / inner;
        m[e] = mean[c]; gc[e] = g[c]; ac[e] = a[c]; kc[e] = k[c];
    }
    long long step = (long long)gridDim.y * RPI;
    long long r = (long long)blockIdx.y * RPI + phase;
    for (; r + step < outer; r += 2 * step) {
        float4 d0 = dy[r * P4 + j4], v0 = x[r * P4 + j4];
        float4 d1 = dy[(r + step) * P4 + j4], v1 = x[(r + step) * P4 + j4];
        dx[r * P4 + j4] = dx4(d0, v0, m, gc, ac, kc);
        dx[(r + step) * P4 + j4] = dx4(d1, v1, m, gc, ac, kc);
    }
    if (r < outer) dx[r * P4 + j4] = dx4(dy[r * P4 + j4], x[r * P4 + j4], m, gc, ac, kc);
}
"""


def main() -> int:
    import cupy

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_gpu import copy_bandwidth, cuda_time_ms

    from bncore_gpu import _loader
    from bncore_gpu import batch_norm as gbn

    mod = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
    ext = {"apply": mod.get_function("apply_x2"), "dx": mod.get_function("dx_x2")}
    bw = copy_bandwidth()
    sms = _loader.sm_count()
    print(f"copy {bw / 1e9:.2f} TB/s, {sms} SMs")
    print("| shape (rows, P) | kernel | row-block cap | blocks | us | floor us | same bits |")
    print("|---|---|---|---|---|---|---|")
    for outer, P in ((32 * 56 * 56, 64), (128 * 28 * 28, 256), (256, 1024), (8 * 14 * 14, 256)):
        rng = cupy.random.default_rng(0)
        x = rng.standard_normal(outer * P, dtype=cupy.float32)
        dy = rng.standard_normal(outer * P, dtype=cupy.float32)
        y = cupy.empty_like(x)
        ref = cupy.empty_like(x)
        consts = rng.standard_normal((4, P), dtype=cupy.float64)
        P4 = P // 4
        TC = gbn._rows_vec4_tile(P, x)
        ntile = -(-P4 // TC)
        rpi = 256 // TC
        caps = {"former (8192/ntile)": max(1, 8192 // ntile)}
        for per_sm in (4, 8, 16, 32):
            caps[f"{per_sm} x SMs"] = max(1, sms * per_sm // ntile)
        # the statistics pass: row blocks of R rows, nrb = ceil(outer / R) of them
        # (a reduction: more row blocks change the summation tree, by shape only)
        st = gbn._kernel("bn_stats_rows_vec4")
        for target in (gbn.TARGET_BLOCKS, 2 * gbn.TARGET_BLOCKS, 4 * gbn.TARGET_BLOCKS):
            nrb = max(1, min(outer, -(-target // ntile), gbn.MAX_GRID_Y))
            R = -(-outer // nrb)
            nrb = -(-outer // R)
            s1, s2 = cupy.empty((2, P * nrb), np.float64)

            def stats(nrb=nrb, R=R, s1=s1, s2=s2):
                st((ntile, nrb), (256,), (x, np.int64(outer), np.int64(1), np.int64(P4),
                                          np.int32(TC), np.int64(R), np.int32(nrb), s1, s2))
            us = cuda_time_ms(stats) * 1e3
            print(f"| ({outer},{P}) | stats rows vec4 | {target} blocks (R={R}) | "
                  f"{ntile * nrb} | {us:.1f} | {x.nbytes / bw * 1e3:.1f} | - |")
        for kind in ("apply", "dx"):
            pkg = gbn._kernel(f"bn_{kind}_rows_vec4")
            srcs = (x,) if kind == "apply" else (dy, x)
            cs = (consts[0], consts[1], consts[2]) if kind == "apply" else tuple(consts)
            nbytes = (len(srcs) + 1) * x.nbytes
            for variant, fn in (("package", pkg), ("two rows per step", ext[kind])):
                for cap_name, cap in caps.items():
                    rows_y = max(1, min(-(-outer // rpi), gbn.MAX_GRID_Y, cap))
                    args = (*srcs, y, np.int64(outer), np.int64(P4), np.int64(1),
                            np.int32(TC), *cs)

                    def launch(fn=fn, rows_y=rows_y, args=args):
                        fn((ntile, rows_y), (256,), args)
                    if variant == "package" and cap_name.startswith("former"):
                        launch()
                        ref[...] = y
                        same = "ref"
                    else:
                        y.fill(np.nan)
                        launch()
                        same = "yes" if bool((y.view(np.uint32) == ref.view(np.uint32)).all()) \
                            else "NO"
                    us = cuda_time_ms(launch) * 1e3
                    print(f"| ({outer},{P}) | {kind} {variant} | {cap_name} | "
                          f"{ntile * rows_y} | {us:.1f} | {nbytes / bw * 1e3:.1f} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

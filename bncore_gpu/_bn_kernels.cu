// Batch-normalization kernels for CUDA, loaded by bncore_gpu/_loader.py through
// CuPy's RawModule (NVRTC): no host headers, templates instantiated by name.
// The CPU twin is bncore/_bn_kernels.pyx.
//
// Every array is seen as a C-contiguous (outer, C, inner) block, C being the
// channel axis (bncore_gpu/batch_norm.py arranges that view). Storage types:
// float, double, and unsigned short holding IEEE binary16 (half).
//
// Numerics. Statistics accumulate in float64 relative to a per-channel pivot
// K_c = x[0, c, 0] (one sample of the channel; 0 if that is Inf or NaN): s1 = sum (x - K), s2 = sum
// (x - K)^2. The partial sums are combined in a fixed order (a fixed tree in
// shared memory, then the partials in index order), never with atomics, so a
// result is identical from run to run. With the pivot a sample of the
// channel, s2 - s1^2 / N cancels by a factor s2 / M2 = 1 + (mean - K)^2 / var,
// order 1 when K is a typical value, so float64 keeps ~15 digits even when
// |mean| is 1e5 times the standard deviation. When K is an outlier (s2 > 16 M2,
// K more than 3.9 std from the mean) bn_finalize_train sums the channel again
// against the first pass's mean, where nothing cancels (as the CPU twin does
// per work item). x - mean is formed in float64 before scaling.
//
// These kernels' reductions decompose the work by the shape only (never by the
// GPU model), so their results do too; the elementwise passes' grids may use
// the SM count (they cannot change a result). Which path a call takes (these
// kernels, the one-launch rows kernels or _bn_cluster_kernels.cu) depends on
// the device (SM count, shared memory), so results may differ in their last
// bits between GPU models, as the README says:
//   planes (inner >= 32, e.g. NCHW): block (g, c) sums rows o = g, g+G, ... of
//     channel c; G = ceil(TARGET_BLOCKS / C), at most outer.
//   rows (inner < 32, e.g. channels-last): the block is a (rows x 32 columns)
//     tile of the (outer, C*inner) matrix; one partial per (column, row block).
// Partials of channel c are contiguous: [c * M, (c + 1) * M).

#include "_common.cuh"

#define BN_THREADS 256

// The partials of the scalar rows kernels (block (32, 8): threadIdx.x picks
// the column j, threadIdx.y the row phase): a fixed tree over the 8 row phases
// of each column, then column j's partial of row block rb, column-major
// ([j * nRB + rb]: channel c owns [c * inner * nRB, (c + 1) * inner * nRB)).
__device__ __forceinline__ void bn_rows_partials(double a, double b, bool valid, long long j,
                                                 int nRB, int rb, double* sa, double* sb,
                                                 double* __restrict__ part_a,
                                                 double* __restrict__ part_b) {
    int t = threadIdx.x + 32 * threadIdx.y;
    sa[t] = a;
    sb[t] = b;
    __syncthreads();
    for (int w = 4; w > 0; w >>= 1) {
        if ((int)threadIdx.y < w) {
            sa[t] += sa[t + 32 * w];
            sb[t] += sb[t + 32 * w];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0 && valid) {
        part_a[j * nRB + rb] = sa[threadIdx.x];
        part_b[j * nRB + rb] = sb[threadIdx.x];
    }
}

// ---------------------------------------------------------------- planes elements
//
// One storage element of the planes kernels: a value (float, double, binary16),
// or a float4 of four consecutive float values where a plane's length is a
// multiple of 4 and its rows 16-byte aligned (one 16-byte load per lane). The
// planes kernels are written once over these and instantiated for both; a
// float4's four values are combined as ((x + y) + (z + w)).

template <typename T>
__device__ __forceinline__ double bn_value0(const T* p) { return dev_ld(p); }
__device__ __forceinline__ double bn_value0(const float4* p) { return f2d(p->x); }
// A pivot taken from the data, or 0 when that value is Inf or NaN (as the CPU
// twin's _pivot_of): x - Inf would make the mean NaN where IEEE's is +-Inf.
__device__ __forceinline__ double bn_pivot(double v) { return v - v == 0.0 ? v : 0.0; }

template <typename T>
__device__ __forceinline__ void bn_stat_acc(const T* p, double K, double& s1, double& s2) {
    double d = dev_ld(p) - K;
    s1 += d;
    s2 += d * d;
}
__device__ __forceinline__ void bn_stat_acc(const float4* p, double K, double& s1, double& s2) {
    float4 v = *p;
    double d0 = f2d(v.x) - K, d1 = f2d(v.y) - K, d2 = f2d(v.z) - K,
           d3 = f2d(v.w) - K;
    s1 += (d0 + d1) + (d2 + d3);
    s2 += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
}

template <typename T>
__device__ __forceinline__ void bn_dy_acc(const T* dy, const T* x, double mu, double& a,
                                          double& b) {
    double gv = dev_ld(dy);
    a += gv;
    b += gv * (dev_ld(x) - mu);
}
__device__ __forceinline__ void bn_dy_acc(const float4* dy, const float4* x, double mu,
                                          double& a, double& b) {
    float4 d = *dy, v = *x;
    a += (f2d(d.x) + f2d(d.y)) + (f2d(d.z) + f2d(d.w));
    b += (f2d(d.x) * (f2d(v.x) - mu) + f2d(d.y) * (f2d(v.y) - mu))
         + (f2d(d.z) * (f2d(v.z) - mu) + f2d(d.w) * (f2d(v.w) - mu));
}

__device__ __forceinline__ float4 bn_affine4(float4 v, double m, double s, double h) {
    float4 r;
    r.x = d2f((f2d(v.x) - m) * s + h);
    r.y = d2f((f2d(v.y) - m) * s + h);
    r.z = d2f((f2d(v.z) - m) * s + h);
    r.w = d2f((f2d(v.w) - m) * s + h);
    return r;
}

template <typename T>
__device__ __forceinline__ void bn_apply_at(const T* x, T* y, double m, double s, double h) {
    dev_st(y, (dev_ld(x) - m) * s + h);
}
__device__ __forceinline__ void bn_apply_at(const float4* x, float4* y, double m, double s,
                                            double h) {
    *y = bn_affine4(*x, m, s, h);
}

__device__ __forceinline__ float4 bn_dx4(float4 d, float4 v, double m, double g, double a,
                                         double k) {
    float4 r;
    r.x = d2f(g * ((f2d(d.x) - a) - (f2d(v.x) - m) * k));
    r.y = d2f(g * ((f2d(d.y) - a) - (f2d(v.y) - m) * k));
    r.z = d2f(g * ((f2d(d.z) - a) - (f2d(v.z) - m) * k));
    r.w = d2f(g * ((f2d(d.w) - a) - (f2d(v.w) - m) * k));
    return r;
}

template <typename T>
__device__ __forceinline__ void bn_dx_at(const T* dy, const T* x, T* dx, double m, double g,
                                         double a, double k) {
    dev_st(dx, g * ((dev_ld(dy) - a) - (dev_ld(x) - m) * k));
}
__device__ __forceinline__ void bn_dx_at(const float4* dy, const float4* x, float4* dx,
                                         double m, double g, double a, double k) {
    *dx = bn_dx4(*dy, *x, m, g, a, k);
}

// ---------------------------------------------------------------- statistics

template <typename T>
__global__ void bn_stats_planes(const T* __restrict__ x, long long outer, int C,
                                long long inner, int G, double* __restrict__ part_s1,
                                double* __restrict__ part_s2) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    int c = blockIdx.x;     // channels on x: up to 2^31 - 1 of them (y stops at 65535)
    int g = blockIdx.y;
    double K = bn_pivot(bn_value0(x + (long long)c * inner));
    double s1 = 0.0, s2 = 0.0;
    for (long long o = g; o < outer; o += G) {
        const T* row = x + (o * C + c) * inner;
        for (long long i = threadIdx.x; i < inner; i += BN_THREADS) bn_stat_acc(row + i, K, s1, s2);
    }
    dev_block_sum2(s1, s2, sa, sb);
    if (threadIdx.x == 0) {
        part_s1[(long long)c * G + g] = s1;
        part_s2[(long long)c * G + g] = s2;
    }
}

// block (32, 8): threadIdx.x picks the column, threadIdx.y the row phase
template <typename T>
__global__ void bn_stats_rows(const T* __restrict__ x, long long outer, int C, long long inner,
                              long long R, int nRB, double* __restrict__ part_s1,
                              double* __restrict__ part_s2) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    long long P = (long long)C * inner;
    long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    int rb = blockIdx.y;
    long long r0 = (long long)rb * R;
    long long r1 = r0 + R < outer ? r0 + R : outer;
    double s1 = 0.0, s2 = 0.0;
    if (j < P) {
        long long c = j / inner;
        double K = bn_pivot(dev_ld(x + c * inner));
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            double d = dev_ld(x + r * P + j) - K;
            s1 += d;
            s2 += d * d;
        }
    }
    bn_rows_partials(s1, s2, j < P, j, nRB, rb, sa, sb, part_s1, part_s2);
}

// One channel's statistics, by the whole block: sum the channel's M partials
// (thread-strided, then a fixed tree), then mean, invstd, the running
// statistics and the constants of the normalizing pass. PT: dtype of weight,
// bias and the running statistics. The partials are read through L2
// (ld.global.cg): in bn_forward_rows_coop other blocks of the same launch
// wrote them. A second call in the same block needs a __syncthreads() first.
template <typename T, typename PT>
__device__ void bn_finalize_train_channel(int c, const T* __restrict__ x, int C, long long inner,
                                          long long outer, int M, const double* part_s1,
                                          const double* part_s2, double N, double eps,
                                          const PT* __restrict__ weight,
                                          const PT* __restrict__ bias, PT* running_mean,
                                          PT* running_var, double momentum, int unbiased,
                                          double* mean, double* invstd, double* scale,
                                          double* shift, double* sa, double* sb) {
    double s1 = 0.0, s2 = 0.0;
    for (int m = threadIdx.x; m < M; m += BN_THREADS) {
        s1 += __ldcg(part_s1 + (long long)c * M + m);
        s2 += __ldcg(part_s2 + (long long)c * M + m);
    }
    dev_block_sum2(s1, s2, sa, sb);              // every thread holds the totals
    double K = bn_pivot(dev_ld(x + (long long)c * inner));
    double d = s1 / N;                          // mean - K
    double m2 = s2 - s1 * d;                    // sum (x - mean)^2
    // (not when K + d is Inf or NaN: the data hold one, and x - (K + d) would
    // turn an infinite mean into NaN). Written !(s2 <= ...): float64 data whose
    // squares overflow make s2 Inf and m2 = Inf - Inf NaN, and those need the
    // second pass too (it gives M2 = Inf: variance Inf, invstd 0, as the CPU;
    // the mean, taken again here, can differ from the CPU's, which keeps a
    // channel pivot within the spread: README, Numerics guarantees)
    if (!(s2 <= 16.0 * m2) && (K + d) - (K + d) == 0.0) {
        // K is far from the mean (also when rounding left m2 <= 0 with s2 > 0):
        // the channel's sums again, against K + d. The condition is the same
        // in every thread of the block, so the barriers below are uniform.
        double P = K + d, t1 = 0.0, t2 = 0.0;
        if (inner == 1) {                       // channels-last: one value per row
            for (long long o = threadIdx.x; o < outer; o += BN_THREADS) {
                double v = dev_ld(x + o * C + c) - P;
                t1 += v;
                t2 += v * v;
            }
        } else {                                // planes of `inner` values
            for (long long o = 0; o < outer; ++o) {
                const T* row = x + (o * C + c) * inner;
                for (long long i = threadIdx.x; i < inner; i += BN_THREADS) {
                    double v = dev_ld(row + i) - P;
                    t1 += v;
                    t2 += v * v;
                }
            }
        }
        __syncthreads();                        // every thread has read sa[0], sb[0]
        dev_block_sum2(t1, t2, sa, sb);
        K = P;
        d = t1 / N;
        m2 = t2 - t1 * d;
        s2 = t2;
    }
    // squares past float64's range around a finite mean: Inf - Inf left NaN where
    // M2 is Inf (NaN data keep their NaN: their sum of squares is NaN, not Inf)
    if (m2 != m2 && s2 > 0.0 && s2 - s2 != 0.0 && (K + d) - (K + d) == 0.0) m2 = s2;
    if (threadIdx.x == 0) {
        if (m2 < 0.0) m2 = 0.0;                 // rounding of an exactly constant channel
        double mu = K + d;
        double var = m2 / N;
        double inv = 1.0 / sqrt(var + eps);
        mean[c] = mu;
        invstd[c] = inv;
        scale[c] = inv * (weight ? dev_ld(weight + c) : 1.0);
        shift[c] = bias ? dev_ld(bias + c) : 0.0;
        if (running_mean) {
            double vr = unbiased ? m2 / (N - 1.0) : var;
            double rm = dev_ld(running_mean + c), rv = dev_ld(running_var + c);
            dev_st(running_mean + c, (1.0 - momentum) * rm + momentum * mu);
            dev_st(running_var + c, (1.0 - momentum) * rv + momentum * vr);
        }
    }
}

// One block per channel (bn_finalize_train_channel).
template <typename T, typename PT>
__global__ void bn_finalize_train(const T* __restrict__ x, int C, long long inner,
                                  long long outer, int M,
                                  const double* __restrict__ part_s1,
                                  const double* __restrict__ part_s2, double N, double eps,
                                  const PT* __restrict__ weight, const PT* __restrict__ bias,
                                  PT* running_mean, PT* running_var, double momentum,
                                  int unbiased, double* __restrict__ mean,
                                  double* __restrict__ invstd, double* __restrict__ scale,
                                  double* __restrict__ shift) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    bn_finalize_train_channel<T, PT>(blockIdx.x, x, C, inner, outer, M, part_s1, part_s2, N, eps,
                                     weight, bias, running_mean, running_var, momentum, unbiased,
                                     mean, invstd, scale, shift, sa, sb);
}

// Inference: the statistics are the running ones.
template <typename PT>
__global__ void bn_prepare_eval(int C, const PT* __restrict__ running_mean,
                                const PT* __restrict__ running_var, double eps,
                                const PT* __restrict__ weight, const PT* __restrict__ bias,
                                double* __restrict__ mean, double* __restrict__ invstd,
                                double* __restrict__ scale, double* __restrict__ shift) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double inv = 1.0 / sqrt(dev_ld(running_var + c) + eps);
    mean[c] = dev_ld(running_mean + c);
    invstd[c] = inv;
    scale[c] = inv * (weight ? dev_ld(weight + c) : 1.0);
    shift[c] = bias ? dev_ld(bias + c) : 0.0;
}

// ---------------------------------------------------------------- elementwise
//
// y = (x - mean[c]) * scale[c] + shift[c], in float64. No per-element integer
// division: the planes form gives each warp whole (o, c) planes (one channel
// per plane); the rows form gives each thread one column of the (outer, C*inner)
// matrix (one channel per column) and walks down the rows.

template <typename T>
__global__ void bn_apply_planes(const T* __restrict__ x, T* __restrict__ y, long long nplanes,
                                int C, long long inner, const double* __restrict__ mean,
                                const double* __restrict__ scale,
                                const double* __restrict__ shift) {
    int lane = threadIdx.x & 31;
    long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nw = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long p = w; p < nplanes; p += nw) {
        int c = (int)(p % C);
        double m = mean[c], s = scale[c], h = shift[c];
        const T* xr = x + p * inner;
        T* yr = y + p * inner;
        for (long long i = lane; i < inner; i += 32) bn_apply_at(xr + i, yr + i, m, s, h);
    }
}



// block (32, 8); grid (ceil(P / 32), row blocks), rows grid-strided
template <typename T>
__global__ void bn_apply_rows(const T* __restrict__ x, T* __restrict__ y, long long outer,
                              long long P, long long inner, const double* __restrict__ mean,
                              const double* __restrict__ scale, const double* __restrict__ shift) {
    long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    if (j >= P) return;
    long long c = j / inner;
    double m = mean[c], s = scale[c], h = shift[c];
    for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < outer; r += (long long)gridDim.y * 8)
        dev_st(y + r * P + j, (dev_ld(x + r * P + j) - m) * s + h);
}

// ---------------------------------------------------------------- backward

template <typename T>
__global__ void bn_dy_sums_planes(const T* __restrict__ dy, const T* __restrict__ x,
                                  long long outer, int C, long long inner, int G,
                                  const double* __restrict__ mean,
                                  double* __restrict__ part_a, double* __restrict__ part_b) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    int c = blockIdx.x;     // channels on x: up to 2^31 - 1 of them (y stops at 65535)
    int g = blockIdx.y;
    double mu = mean[c];
    double a = 0.0, b = 0.0;
    for (long long o = g; o < outer; o += G) {
        long long base = (o * C + c) * inner;
        for (long long i = threadIdx.x; i < inner; i += BN_THREADS)
            bn_dy_acc(dy + base + i, x + base + i, mu, a, b);
    }
    dev_block_sum2(a, b, sa, sb);
    if (threadIdx.x == 0) {
        part_a[(long long)c * G + g] = a;
        part_b[(long long)c * G + g] = b;
    }
}

template <typename T>
__global__ void bn_dy_sums_rows(const T* __restrict__ dy, const T* __restrict__ x,
                                long long outer, int C, long long inner, long long R, int nRB,
                                const double* __restrict__ mean, double* __restrict__ part_a,
                                double* __restrict__ part_b) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    long long P = (long long)C * inner;
    long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    int rb = blockIdx.y;
    long long r0 = (long long)rb * R;
    long long r1 = r0 + R < outer ? r0 + R : outer;
    double a = 0.0, b = 0.0;
    if (j < P) {
        double mu = mean[j / inner];
        for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
            double gv = dev_ld(dy + r * P + j);
            a += gv;
            b += gv * (dev_ld(x + r * P + j) - mu);
        }
    }
    bn_rows_partials(a, b, j < P, j, nRB, rb, sa, sb, part_a, part_b);
}

// One channel, by the whole block: sum(dy), sum(dy (x - mean)), the parameter
// gradients (stored in PT: weight's dtype) and the constants of
// dx = g ((dy - a) - (x - mean) k). Partials read through L2, as in
// bn_finalize_train_channel; a second call needs a __syncthreads() first.
template <typename PT>
__device__ void bn_finalize_backward_channel(int c, int M, const double* part_a,
                                             const double* part_b, double N, int training,
                                             const double* __restrict__ invstd,
                                             const PT* __restrict__ weight, PT* dweight,
                                             PT* dbias, double* g, double* a, double* k,
                                             double* sa, double* sb) {
    double s1 = 0.0, s2 = 0.0;
    for (int m = threadIdx.x; m < M; m += BN_THREADS) {
        s1 += __ldcg(part_a + (long long)c * M + m);
        s2 += __ldcg(part_b + (long long)c * M + m);
    }
    dev_block_sum2(s1, s2, sa, sb);
    if (threadIdx.x == 0) {
        double inv = invstd[c];
        dev_st(dweight + c, s2 * inv);
        dev_st(dbias + c, s1);
        g[c] = inv * (weight ? dev_ld(weight + c) : 1.0);
        a[c] = training ? s1 / N : 0.0;
        k[c] = training ? inv * inv * s2 / N : 0.0;
    }
}

// One block per channel (bn_finalize_backward_channel).
template <typename PT>
__global__ void bn_finalize_backward(int C, int M, const double* __restrict__ part_a,
                                     const double* __restrict__ part_b, double N, int training,
                                     const double* __restrict__ invstd,
                                     const PT* __restrict__ weight, PT* __restrict__ dweight,
                                     PT* __restrict__ dbias, double* __restrict__ g,
                                     double* __restrict__ a, double* __restrict__ k) {
    BNC_SHARED(double, sa, BN_THREADS);
    BNC_SHARED(double, sb, BN_THREADS);
    bn_finalize_backward_channel<PT>(blockIdx.x, M, part_a, part_b, N, training, invstd, weight,
                                     dweight, dbias, g, a, k, sa, sb);
}


// dx = g[c] ((dy - a[c]) - (x - mean[c]) k[c]), in float64
template <typename T>
__global__ void bn_dx_planes(const T* __restrict__ dy, const T* __restrict__ x,
                             T* __restrict__ dx, long long nplanes, int C, long long inner,
                             const double* __restrict__ mean, const double* __restrict__ g,
                             const double* __restrict__ a, const double* __restrict__ k) {
    int lane = threadIdx.x & 31;
    long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    long long nw = ((long long)gridDim.x * blockDim.x) >> 5;
    for (long long p = w; p < nplanes; p += nw) {
        int c = (int)(p % C);
        double m = mean[c], gc = g[c], ac = a[c], kc = k[c];
        long long base = p * inner;
        for (long long i = lane; i < inner; i += 32)
            bn_dx_at(dy + base + i, x + base + i, dx + base + i, m, gc, ac, kc);
    }
}


template <typename T>
__global__ void bn_dx_rows(const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,
                           long long outer, long long P, long long inner,
                           const double* __restrict__ mean, const double* __restrict__ g,
                           const double* __restrict__ a, const double* __restrict__ k) {
    long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    if (j >= P) return;
    long long c = j / inner;
    double m = mean[c], gc = g[c], ac = a[c], kc = k[c];
    for (long long r = (long long)blockIdx.y * 8 + threadIdx.y; r < outer; r += (long long)gridDim.y * 8) {
        long long e = r * P + j;
        dev_st(dx + e, gc * ((dev_ld(dy + e) - ac) - (dev_ld(x + e) - m) * kc));
    }
}

// float planes statistics with float4 loads (inner % 4 == 0)


// ---------------------------------------------------------------- rows, float4
//
// The rows kernels for float32 with C * inner a multiple of 4 (channels-last
// with C % 4 == 0): each thread owns one float4 column (4 consecutive
// elements of a row) and walks down the rows, so a warp moves 512 bytes per
// row step. A block of 256 threads covers TC float4 columns (TC = 256, or
// P4 = C * inner / 4 when that divides 256) and RPI = 256 / TC rows per step.
// Partials have the scalar rows layout: column j = 4 * j4 + e, [j * nRB + rb].

__device__ __forceinline__ float bn_f4(const float4& v, int e) {
    return e == 0 ? v.x : (e == 1 ? v.y : (e == 2 ? v.z : v.w));
}

// The partials of the float4 rows kernels: a fixed tree over the RPI row
// phases of each float4 column, then the scalar-layout partials of its 4
// columns for row block rb.
__device__ __forceinline__ void bn_rows4_partials(const double* a, const double* b, bool valid,
                                                  long long j4, int TC, int phase, int RPI,
                                                  int nRB, int rb, double (*sm)[BN_THREADS],
                                                  double* __restrict__ part_a,
                                                  double* __restrict__ part_b) {
    for (int e = 0; e < 4; ++e) {
        sm[e][threadIdx.x] = a[e];
        sm[4 + e][threadIdx.x] = b[e];
    }
    __syncthreads();
    for (int w = RPI / 2; w > 0; w >>= 1) {
        if (phase < w)
            for (int q = 0; q < 8; ++q) sm[q][threadIdx.x] += sm[q][threadIdx.x + w * TC];
        __syncthreads();
    }
    if (phase == 0 && valid)
        for (int e = 0; e < 4; ++e) {
            part_a[(4 * j4 + e) * nRB + rb] = sm[e][threadIdx.x];
            part_b[(4 * j4 + e) * nRB + rb] = sm[4 + e][threadIdx.x];
        }
}

// One (TC float4 columns x R rows) tile's partial sums: tile column tx, row
// block rb. Shared by the tile kernels below and the cooperative kernels.
__device__ __forceinline__ void bn_stats_tile4(const float4* __restrict__ x, long long outer,
                                               long long inner, long long P4, int TC,
                                               long long R, int nRB, int tx, int rb,
                                               double* part_s1, double* part_s2,
                                               double (*sm)[BN_THREADS]) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    long long j4 = (long long)tx * TC + col;
    long long r0 = (long long)rb * R;
    long long r1 = r0 + R < outer ? r0 + R : outer;
    double a[4] = {0.0, 0.0, 0.0, 0.0}, b[4] = {0.0, 0.0, 0.0, 0.0};
    if (j4 < P4) {
        const float* xf = (const float*)x;
        double K[4];
        for (int e = 0; e < 4; ++e) K[e] = bn_pivot(f2d(xf[((4 * j4 + e) / inner) * inner]));
        for (long long r = r0 + phase; r < r1; r += RPI) {
            float4 v = x[r * P4 + j4];
            for (int e = 0; e < 4; ++e) {
                double d = f2d(bn_f4(v, e)) - K[e];
                a[e] += d;
                b[e] += d * d;
            }
        }
    }
    bn_rows4_partials(a, b, j4 < P4, j4, TC, phase, RPI, nRB, rb, sm, part_s1, part_s2);
}

__device__ __forceinline__ void bn_dy_tile4(const float4* __restrict__ dy,
                                            const float4* __restrict__ x, long long outer,
                                            long long inner, long long P4, int TC, long long R,
                                            int nRB, int tx, int rb,
                                            const double* __restrict__ mean, double* part_a,
                                            double* part_b, double (*sm)[BN_THREADS]) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    long long j4 = (long long)tx * TC + col;
    long long r0 = (long long)rb * R;
    long long r1 = r0 + R < outer ? r0 + R : outer;
    double a[4] = {0.0, 0.0, 0.0, 0.0}, b[4] = {0.0, 0.0, 0.0, 0.0};
    if (j4 < P4) {
        double mu[4];
        for (int e = 0; e < 4; ++e) mu[e] = mean[(4 * j4 + e) / inner];
        for (long long r = r0 + phase; r < r1; r += RPI) {
            float4 g = dy[r * P4 + j4], v = x[r * P4 + j4];
            for (int e = 0; e < 4; ++e) {
                double gv = f2d(bn_f4(g, e));
                a[e] += gv;
                b[e] += gv * (f2d(bn_f4(v, e)) - mu[e]);
            }
        }
    }
    bn_rows4_partials(a, b, j4 < P4, j4, TC, phase, RPI, nRB, rb, sm, part_a, part_b);
}

__global__ void bn_stats_rows_vec4(const float4* __restrict__ x, long long outer,
                                   long long inner, long long P4, int TC, long long R, int nRB,
                                   double* __restrict__ part_s1, double* __restrict__ part_s2) {
    BNC_SHARED(double, sm_, 8 * BN_THREADS);
    double (*sm)[BN_THREADS] = (double (*)[BN_THREADS])sm_;
    bn_stats_tile4(x, outer, inner, P4, TC, R, nRB, blockIdx.x, blockIdx.y, part_s1, part_s2, sm);
}

__global__ void bn_dy_sums_rows_vec4(const float4* __restrict__ dy, const float4* __restrict__ x,
                                     long long outer, long long inner, long long P4, int TC,
                                     long long R, int nRB, const double* __restrict__ mean,
                                     double* __restrict__ part_a, double* __restrict__ part_b) {
    BNC_SHARED(double, sm_, 8 * BN_THREADS);
    double (*sm)[BN_THREADS] = (double (*)[BN_THREADS])sm_;
    bn_dy_tile4(dy, x, outer, inner, P4, TC, R, nRB, blockIdx.x, blockIdx.y, mean, part_a, part_b,
                sm);
}

// The row order of the float4 elementwise passes, a template argument so that
// each loop is compiled for one order (a run-time choice inside the loop made
// the forward pass 40% slower on an H100). Forward (BACK false): one resident
// wave of row blocks grid-strides over the rows, first to last. Backwards
// (BACK true, after a reduction over the same tiles of R rows): a tile is
// walked from its last row to its first, so that the pass starts on the rows
// the reduction read last, which are still in L2 (an H100 holds 50 MB: a
// third to all of a (128,256,28,28) or smaller tensor); its loads are the
// data's last use and its stores are not read back here, so both are marked
// evict-first (ld/st.global.cs) to leave L2 to the rest.
template <bool BACK>
__device__ __forceinline__ float4 bn_walk_ld(const float4* p) {
    if (BACK) return __ldcs(p);
    return *p;
}
template <bool BACK>
__device__ __forceinline__ void bn_walk_st(float4* p, float4 v) {
    if (BACK) __stcs(p, v);
    else *p = v;
}

// The rows one thread visits: from `first` by `step` while before `stop`
// (above it when walking backwards).
struct BnRows {
    long long first, stop, step;
};
// tile rows [rb R, (rb + 1) R) from the last, in steps of the RPI row phases
__device__ __forceinline__ BnRows bn_tile_rows(long long outer, long long R, int rb, int phase,
                                               int RPI) {
    long long lo = (long long)rb * R;
    long long hi = lo + R < outer ? lo + R : outer;
    return BnRows{hi - 1 - phase, lo - 1, -(long long)RPI};
}
// all rows, first to last, shared by the gridDim.y row blocks of one wave
__device__ __forceinline__ BnRows bn_wave_rows(long long outer, int phase, int RPI) {
    return BnRows{(long long)blockIdx.y * RPI + phase, outer, (long long)gridDim.y * RPI};
}

// y = (x - mean) scale + shift over rows `w` of float4 column j4; the
// constants are read through L2 (the cooperative kernel wrote them).
template <bool BACK>
__device__ __forceinline__ void bn_apply_walk4(const float4* __restrict__ x,
                                               float4* __restrict__ y, long long P4,
                                               long long inner, long long j4, BnRows w,
                                               const double* mean, const double* scale,
                                               const double* shift) {
    double m[4], s[4], h[4];
    for (int e = 0; e < 4; ++e) {
        long long c = (4 * j4 + e) / inner;
        m[e] = __ldcg(mean + c);
        s[e] = __ldcg(scale + c);
        h[e] = __ldcg(shift + c);
    }
    for (long long r = w.first; BACK ? r > w.stop : r < w.stop; r += w.step) {
        float4 v = bn_walk_ld<BACK>(x + r * P4 + j4), o;
        o.x = d2f((f2d(v.x) - m[0]) * s[0] + h[0]);
        o.y = d2f((f2d(v.y) - m[1]) * s[1] + h[1]);
        o.z = d2f((f2d(v.z) - m[2]) * s[2] + h[2]);
        o.w = d2f((f2d(v.w) - m[3]) * s[3] + h[3]);
        bn_walk_st<BACK>(y + r * P4 + j4, o);
    }
}

// dx = g ((dy - a) - (x - mean) k) over rows `w` of float4 column j4; in
// inference (training 0) dx = g dy, x not read (an Inf or NaN x must not make
// it NaN through (x - mean) 0; the CPU's inference dx is g dy too)
template <bool BACK>
__device__ __forceinline__ void bn_dx_walk4(const float4* __restrict__ dy,
                                            const float4* __restrict__ x,
                                            float4* __restrict__ dx, long long P4,
                                            long long inner, long long j4, BnRows w,
                                            const double* mean, const double* g,
                                            const double* a, const double* k, int training) {
    double m[4], gc[4], ac[4], kc[4];
    for (int e = 0; e < 4; ++e) {
        long long c = (4 * j4 + e) / inner;
        m[e] = __ldcg(mean + c);
        gc[e] = __ldcg(g + c);
        ac[e] = __ldcg(a + c);
        kc[e] = __ldcg(k + c);
    }
    for (long long r = w.first; BACK ? r > w.stop : r < w.stop; r += w.step) {
        long long e = r * P4 + j4;
        float4 d = bn_walk_ld<BACK>(dy + e), o;
        if (training) {
            float4 v = bn_walk_ld<BACK>(x + e);
            o.x = d2f(gc[0] * ((f2d(d.x) - ac[0]) - (f2d(v.x) - m[0]) * kc[0]));
            o.y = d2f(gc[1] * ((f2d(d.y) - ac[1]) - (f2d(v.y) - m[1]) * kc[1]));
            o.z = d2f(gc[2] * ((f2d(d.z) - ac[2]) - (f2d(v.z) - m[2]) * kc[2]));
            o.w = d2f(gc[3] * ((f2d(d.w) - ac[3]) - (f2d(v.w) - m[3]) * kc[3]));
        } else {
            o.x = d2f(gc[0] * f2d(d.x));
            o.y = d2f(gc[1] * f2d(d.y));
            o.z = d2f(gc[2] * f2d(d.z));
            o.w = d2f(gc[3] * f2d(d.w));
        }
        bn_walk_st<BACK>(dx + e, o);
    }
}

// R == 0: grid-stride walk; R > 0: block (tx, rb) walks tile (tx, rb) backwards
__global__ void bn_apply_rows_vec4(const float4* __restrict__ x, float4* __restrict__ y,
                                   long long outer, long long P4, long long inner, int TC,
                                   long long R, const double* __restrict__ mean,
                                   const double* __restrict__ scale,
                                   const double* __restrict__ shift) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    long long j4 = (long long)blockIdx.x * TC + col;
    if (j4 >= P4) return;
    if (R > 0)
        bn_apply_walk4<true>(x, y, P4, inner, j4, bn_tile_rows(outer, R, blockIdx.y, phase, RPI),
                             mean, scale, shift);
    else
        bn_apply_walk4<false>(x, y, P4, inner, j4, bn_wave_rows(outer, phase, RPI), mean,
                              scale, shift);
}

__global__ void bn_dx_rows_vec4(const float4* __restrict__ dy, const float4* __restrict__ x,
                                float4* __restrict__ dx, long long outer, long long P4,
                                long long inner, int TC, long long R,
                                const double* __restrict__ mean, const double* __restrict__ g,
                                const double* __restrict__ a, const double* __restrict__ k) {
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    long long j4 = (long long)blockIdx.x * TC + col;
    if (j4 >= P4) return;
    // (training only: the host sends an inference dx to bn_apply_rows_vec4)
    if (R > 0)
        bn_dx_walk4<true>(dy, x, dx, P4, inner, j4, bn_tile_rows(outer, R, blockIdx.y, phase, RPI),
                          mean, g, a, k, 1);
    else
        bn_dx_walk4<false>(dy, x, dx, P4, inner, j4, bn_wave_rows(outer, phase, RPI), mean,
                           g, a, k, 1);
}

// ---------------------------------------------------------------- rows, one cooperative kernel
//
// The training forward (and backward) of the float4 rows layout in one launch
// instead of three: (1) the partial sums of every (TC x R) tile, exactly as
// bn_stats_rows_vec4 (bn_dy_sums_rows_vec4) computes them, the tiles dealt to
// the blocks round robin; a grid barrier; (2) each channel's statistics as
// bn_finalize_train (bn_finalize_backward) computes them, channels dealt
// round robin; a barrier; (3) the elementwise pass over each block's tiles in
// reverse order, each tile backwards (bn_tile_rows), so that it starts on
// what is still in L2. Same tiles, same sums, same order: the results are
// bitwise those of the three-kernel path. Launched with
// cuLaunchCooperativeKernel, which refuses a grid larger than what can be
// resident at once, so the barrier cannot deadlock.
//
// The barrier word `bar` (one per device and stream, zero when made) holds
// arrivals in its low 31 bits, zero between barriers, and a phase in its top
// bit: block 0 adds 2^31 - (n - 1), the others 1, so that the n-th arrival
// makes the word gain exactly 2^31: the top bit flips, the low bits are zero
// again, and every block waits for the flip relative to the value it found.
__device__ __forceinline__ void bn_grid_sync(unsigned int* bar) {
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int add = blockIdx.x == 0 ? 0x80000000u - (gridDim.x - 1) : 1u;
        __threadfence();                 // this block's writes, before it arrives
        unsigned int old = atomicAdd(bar, add);
        while (((old ^ dev_ld_volatile(bar)) & 0x80000000u) == 0) {
#if __CUDA_ARCH__ >= 700
            __nanosleep(64);
#endif
        }
        __threadfence();                 // the others' writes, before this block reads
    }
    __syncthreads();
}

// This block's first channel of the finalize phase, C (none) if it has none.
// Fewer channels than blocks: channel c goes to block floor(c G / C), spread
// over the whole grid and hence over the SMs (blocks 0..C-1 can share a few
// SMs: an H100 ran a channels-last forward with outlier pivots, whose finalize
// reads the channel again, 2.4x slower that way); else round robin.
__device__ __forceinline__ int bn_first_channel(int C) {
    long long G = gridDim.x, b = blockIdx.x;
    if (C >= G) return (int)b;
    long long c = (b * C + G - 1) / G;          // the least c with c G / C >= b
    return c < C && c * G < (b + 1) * C ? (int)c : C;
}

// the last tile t = blockIdx.x + i gridDim.x below ntiles, or -1
__device__ __forceinline__ long long bn_last_tile(long long ntiles) {
    if ((long long)blockIdx.x >= ntiles) return -1;
    return blockIdx.x + (ntiles - 1 - blockIdx.x) / gridDim.x * gridDim.x;
}

template <typename PT>
__global__ void __launch_bounds__(BN_THREADS, 4) bn_forward_rows_coop(const float4* __restrict__ x, float4* __restrict__ y,
                                     long long outer, long long inner, long long P4, int TC,
                                     long long R, int nRB, int C, double N, double eps,
                                     const PT* __restrict__ weight, const PT* __restrict__ bias,
                                     PT* running_mean, PT* running_var, double momentum,
                                     int unbiased, double* mean, double* invstd, double* work,
                                     unsigned int* bar) {
    BNC_SHARED(double, sm_, 8 * BN_THREADS);
    double (*sm)[BN_THREADS] = (double (*)[BN_THREADS])sm_;
    int ntile = (int)((P4 + TC - 1) / TC);
    long long ntiles = (long long)ntile * nRB, npart = 4 * P4 * nRB;
    // work: the two partial-sum arrays, then scale and shift
    double *part_s1 = work, *part_s2 = work + npart, *scale = work + 2 * npart,
           *shift = scale + C;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x)
        bn_stats_tile4(x, outer, inner, P4, TC, R, nRB, (int)(t % ntile), (int)(t / ntile),
                       part_s1, part_s2, sm);
    bn_grid_sync(bar);
    for (int c = bn_first_channel(C); c < C; c += gridDim.x) {
        __syncthreads();
        bn_finalize_train_channel<float, PT>(c, (const float*)x, C, inner, outer,
                                             (int)(inner * nRB), part_s1, part_s2, N, eps,
                                             weight, bias, running_mean, running_var, momentum,
                                             unbiased, mean, invstd, scale, shift, sm[0], sm[1]);
    }
    bn_grid_sync(bar);
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    for (long long t = bn_last_tile(ntiles); t >= 0; t -= gridDim.x) {
        long long j4 = (t % ntile) * TC + col;
        if (j4 < P4)
            bn_apply_walk4<true>(x, y, P4, inner, j4,
                                 bn_tile_rows(outer, R, (int)(t / ntile), phase, RPI), mean,
                                 scale, shift);
    }
}

template <typename PT>
__global__ void __launch_bounds__(BN_THREADS, 4) bn_backward_rows_coop(const float4* __restrict__ dy, const float4* __restrict__ x,
                                      float4* __restrict__ dx, long long outer, long long inner,
                                      long long P4, int TC, long long R, int nRB, int C,
                                      double N, int training, const double* __restrict__ mean,
                                      const double* __restrict__ invstd,
                                      const PT* __restrict__ weight, PT* dweight, PT* dbias,
                                      double* work, unsigned int* bar) {
    BNC_SHARED(double, sm_, 8 * BN_THREADS);
    double (*sm)[BN_THREADS] = (double (*)[BN_THREADS])sm_;
    int ntile = (int)((P4 + TC - 1) / TC);
    long long ntiles = (long long)ntile * nRB, npart = 4 * P4 * nRB;
    // work: the two partial-sum arrays, then g, a and k
    double *part_a = work, *part_b = work + npart, *g = work + 2 * npart, *a = g + C,
           *k = a + C;
    for (long long t = blockIdx.x; t < ntiles; t += gridDim.x)
        bn_dy_tile4(dy, x, outer, inner, P4, TC, R, nRB, (int)(t % ntile), (int)(t / ntile),
                    mean, part_a, part_b, sm);
    bn_grid_sync(bar);
    for (int c = bn_first_channel(C); c < C; c += gridDim.x) {
        __syncthreads();
        bn_finalize_backward_channel<PT>(c, (int)(inner * nRB), part_a, part_b, N, training,
                                         invstd, weight, dweight, dbias, g, a, k, sm[0], sm[1]);
    }
    bn_grid_sync(bar);
    int col = threadIdx.x % TC, phase = threadIdx.x / TC, RPI = BN_THREADS / TC;
    for (long long t = bn_last_tile(ntiles); t >= 0; t -= gridDim.x) {
        long long j4 = (t % ntile) * TC + col;
        if (j4 < P4)
            bn_dx_walk4<true>(dy, x, dx, P4, inner, j4,
                              bn_tile_rows(outer, R, (int)(t / ntile), phase, RPI), mean, g,
                              a, k, training);
    }
}

// float64 values stored in a storage type, each rounded once (dev_st): the
// float16 running statistics and parameter gradients, which the kernels above
// compute in float64 (CuPy's own float64 -> float16 cast goes through float32,
// rounding twice). Grid-stride over n contiguous elements.
template <typename T>
__global__ void bn_store_rounded(const double* __restrict__ src, T* __restrict__ dst,
                                 long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dev_st(dst + i, src[i]);
}

#ifndef BNC_HOST_EMULATION     // (tests/cuda_host instantiates what it runs)
// explicit instantiations, so nvcc --ptx checks every template this file offers
template __global__ void bn_stats_planes<float4>(const float4*, long long, int, long long, int, double*, double*);
template __global__ void bn_dy_sums_planes<float4>(const float4*, const float4*, long long, int, long long, int, const double*, double*, double*);
template __global__ void bn_apply_planes<float4>(const float4*, float4*, long long, int, long long, const double*, const double*, const double*);
template __global__ void bn_dx_planes<float4>(const float4*, const float4*, float4*, long long, int, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_stats_planes<float>(const float*, long long, int, long long, int, double*, double*);
template __global__ void bn_stats_planes<double>(const double*, long long, int, long long, int, double*, double*);
template __global__ void bn_stats_planes<unsigned short>(const unsigned short*, long long, int, long long, int, double*, double*);
template __global__ void bn_stats_rows<float>(const float*, long long, int, long long, long long, int, double*, double*);
template __global__ void bn_stats_rows<double>(const double*, long long, int, long long, long long, int, double*, double*);
template __global__ void bn_stats_rows<unsigned short>(const unsigned short*, long long, int, long long, long long, int, double*, double*);
template __global__ void bn_dy_sums_planes<float>(const float*, const float*, long long, int, long long, int, const double*, double*, double*);
template __global__ void bn_dy_sums_planes<double>(const double*, const double*, long long, int, long long, int, const double*, double*, double*);
template __global__ void bn_dy_sums_planes<unsigned short>(const unsigned short*, const unsigned short*, long long, int, long long, int, const double*, double*, double*);
template __global__ void bn_dy_sums_rows<float>(const float*, const float*, long long, int, long long, long long, int, const double*, double*, double*);
template __global__ void bn_dy_sums_rows<double>(const double*, const double*, long long, int, long long, long long, int, const double*, double*, double*);
template __global__ void bn_dy_sums_rows<unsigned short>(const unsigned short*, const unsigned short*, long long, int, long long, long long, int, const double*, double*, double*);
template __global__ void bn_apply_planes<float>(const float*, float*, long long, int, long long, const double*, const double*, const double*);
template __global__ void bn_apply_planes<double>(const double*, double*, long long, int, long long, const double*, const double*, const double*);
template __global__ void bn_apply_planes<unsigned short>(const unsigned short*, unsigned short*, long long, int, long long, const double*, const double*, const double*);
template __global__ void bn_apply_rows<float>(const float*, float*, long long, long long, long long, const double*, const double*, const double*);
template __global__ void bn_apply_rows<double>(const double*, double*, long long, long long, long long, const double*, const double*, const double*);
template __global__ void bn_apply_rows<unsigned short>(const unsigned short*, unsigned short*, long long, long long, long long, const double*, const double*, const double*);
template __global__ void bn_dx_planes<float>(const float*, const float*, float*, long long, int, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_dx_planes<double>(const double*, const double*, double*, long long, int, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_dx_planes<unsigned short>(const unsigned short*, const unsigned short*, unsigned short*, long long, int, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_dx_rows<float>(const float*, const float*, float*, long long, long long, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_dx_rows<double>(const double*, const double*, double*, long long, long long, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_dx_rows<unsigned short>(const unsigned short*, const unsigned short*, unsigned short*, long long, long long, long long, const double*, const double*, const double*, const double*);
template __global__ void bn_finalize_train<float, float>(const float*, int, long long, long long, int, const double*, const double*, double, double, const float*, const float*, float*, float*, double, int, double*, double*, double*, double*);
template __global__ void bn_finalize_train<float, double>(const float*, int, long long, long long, int, const double*, const double*, double, double, const double*, const double*, double*, double*, double, int, double*, double*, double*, double*);
template __global__ void bn_finalize_train<double, float>(const double*, int, long long, long long, int, const double*, const double*, double, double, const float*, const float*, float*, float*, double, int, double*, double*, double*, double*);
template __global__ void bn_finalize_train<double, double>(const double*, int, long long, long long, int, const double*, const double*, double, double, const double*, const double*, double*, double*, double, int, double*, double*, double*, double*);
template __global__ void bn_finalize_train<unsigned short, float>(const unsigned short*, int, long long, long long, int, const double*, const double*, double, double, const float*, const float*, float*, float*, double, int, double*, double*, double*, double*);
template __global__ void bn_finalize_train<unsigned short, double>(const unsigned short*, int, long long, long long, int, const double*, const double*, double, double, const double*, const double*, double*, double*, double, int, double*, double*, double*, double*);
template __global__ void bn_forward_rows_coop<float>(const float4*, float4*, long long, long long, long long, int, long long, int, int, double, double, const float*, const float*, float*, float*, double, int, double*, double*, double*, unsigned int*);
template __global__ void bn_forward_rows_coop<double>(const float4*, float4*, long long, long long, long long, int, long long, int, int, double, double, const double*, const double*, double*, double*, double, int, double*, double*, double*, unsigned int*);
template __global__ void bn_backward_rows_coop<float>(const float4*, const float4*, float4*, long long, long long, long long, int, long long, int, int, double, int, const double*, const double*, const float*, float*, float*, double*, unsigned int*);
template __global__ void bn_backward_rows_coop<double>(const float4*, const float4*, float4*, long long, long long, long long, int, long long, int, int, double, int, const double*, const double*, const double*, double*, double*, double*, unsigned int*);
template __global__ void bn_prepare_eval<float>(int, const float*, const float*, double, const float*, const float*, double*, double*, double*, double*);
template __global__ void bn_finalize_backward<float>(int, int, const double*, const double*, double, int, const double*, const float*, float*, float*, double*, double*, double*);
template __global__ void bn_prepare_eval<double>(int, const double*, const double*, double, const double*, const double*, double*, double*, double*, double*);
template __global__ void bn_finalize_backward<double>(int, int, const double*, const double*, double, int, const double*, const double*, double*, double*, double*, double*, double*);
template __global__ void bn_store_rounded<unsigned short>(const double*, unsigned short*, long long);
#endif  // BNC_HOST_EMULATION

// Single-read training forward and backward for float32 planes (NCHW-like
// layouts with inner % 4 == 0), for GPUs with thread-block clusters (compute
// capability 9.0+). Loaded by bncore_gpu/batch_norm.py for the calls they
// take while the cluster path is on (the default; BNCORE_GPU_CLUSTER=0 at
// import or bncore_gpu.batch_norm.CLUSTER_KERNELS = False switches it off), and
// kept apart from _bn_kernels.cu so that a toolchain without cluster support
// can never break the three-kernel path. No
// system headers: cluster rank, barrier and distributed shared memory are
// reached through PTX; the shared helpers come from _common.cuh.
// The CPU twin of the computation is bncore/_bn_kernels.pyx.
//
// Why: the three-kernel training forward reads x twice (statistics, then the
// normalizing pass) and writes y once; on an H100 that is 0.136-0.143 ms for
// (128,256,28,28) float32 against 0.069 ms for one read and one write (here:
// 0.081 ms against 0.112 for the three-kernel path on an H200). Here a
// cluster of BNC_CLUSTER CTAs owns one channel; CTA r keeps planes
// o in [r*Q, min((r+1)*Q, outer)) (Q = ceil(outer / BNC_CLUSTER)) in shared
// memory, so x is read from global memory once. The backward holds dy and x
// the same way: dy and x read once, dx written once (3 x 103 MB instead of 5).
//
// Numerics: exact two-pass statistics over the shared-memory copy, in float64:
// mean = sum(x) / N, then M2 = sum((x - mean)^2) (nothing cancels, whatever
// |mean| / std). Each CTA reduces its planes with a fixed tree; the CTA totals
// are added in rank order through distributed shared memory, identically in
// every CTA. No atomics: results are identical from run to run. They differ
// from the three-kernel path's in the last bits (another summation tree), within
// the parity tolerance. y = (x - mean) * scale + shift in float64, as there.

#include "_common.cuh"

#define BNC_THREADS 256
#define BNC_CLUSTER 8
#define BNC_UNROLL 4      // global loads each thread has in flight (per array)

// Shared memory is declared through BNC_SHARED / BNC_DYNAMIC_SHARED
// (_common.cuh), and the three cluster primitives below are PTX, so that
// tests/cuda_host/ can compile this very file as host C++ (one thread per CUDA
// thread, std::barrier for the barriers) and check it on a machine without a GPU.
#ifndef BNC_HOST_EMULATION

__device__ __forceinline__ unsigned bnc_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// All threads of all CTAs of the cluster. arrive has release and wait acquire
// semantics by default (spelled out, .release / .acquire would need PTX ISA
// 8.0, CUDA 12.0; the defaults date from 7.8, the first with sm_90), so
// shared-memory writes before the barrier are visible to every CTA's reads
// after it.
__device__ __forceinline__ void bnc_cluster_arrive() {
    asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
}
__device__ __forceinline__ void bnc_cluster_wait() {
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
}
__device__ __forceinline__ void bnc_cluster_sync() {
    bnc_cluster_arrive();
    bnc_cluster_wait();
}

// The double at the same shared-memory offset as `p`, in CTA `rank` of the cluster.
__device__ __forceinline__ double bnc_remote(const double* p, unsigned rank) {
    unsigned local, remote;
    double v;
    asm volatile("{\n\t.reg .u64 t;\n\tcvta.to.shared.u64 t, %1;\n\tcvt.u32.u64 %0, t;\n\t}"
                 : "=r"(local) : "l"(p));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
    asm volatile("ld.shared::cluster.f64 %0, [%1];" : "=d"(v) : "r"(remote) : "memory");
    return v;
}

#endif  // BNC_HOST_EMULATION

// This CTA's share of the cluster's channel c: planes o0, o0 + 1, ... (ceil(outer
// / BNC_CLUSTER) of them, fewer or none at the end), n4 float4 of i4 per plane;
// r is the CTA's rank in the cluster.
__device__ __forceinline__ void bnc_slice(long long outer, long long inner4, unsigned& r,
                                          int& c, long long& o0, int& i4, int& n4) {
    r = bnc_cluster_rank();
    c = blockIdx.x / BNC_CLUSTER;
    long long Q = (outer + BNC_CLUSTER - 1) / BNC_CLUSTER;
    o0 = (long long)r * Q;
    long long o1 = o0 + Q < outer ? o0 + Q : outer;
    i4 = (int)inner4;
    n4 = o1 > o0 ? (int)((o1 - o0) * inner4) : 0;
}

// (pl, i): plane and float4 of this thread's first slab element, threadIdx.x
__device__ __forceinline__ void bnc_first(int& pl, int& i, int i4) {
    pl = (int)threadIdx.x / i4;
    i = (int)threadIdx.x - pl * i4;
}

// (pl, i) -> plane and float4 of slab element k + BNC_THREADS, given those of
// k and BNC_THREADS = sq * i4 + sr (no loop, whatever the plane size)
__device__ __forceinline__ void bnc_step(int& pl, int& i, int sq, int sr, int i4) {
    pl += sq;
    i += sr;
    if (i >= i4) {
        i -= i4;
        ++pl;
    }
}

// Fixed-order tree over the block; every thread returns the total. A second
// call needs a barrier first (no thread may still be reading s[0]).
__device__ __forceinline__ double bnc_block_sum(double a, double* s) {
    int t = threadIdx.x;
    s[t] = a;
    __syncthreads();
    for (int w = BNC_THREADS / 2; w > 0; w >>= 1) {
        if (t < w) s[t] += s[t + w];
        __syncthreads();
    }
    return s[0];
}

// The cluster total of one double per CTA (part[slot] in each), in rank order.
__device__ __forceinline__ double bnc_cluster_total(const double* part) {
    double t = 0.0;
    for (unsigned q = 0; q < BNC_CLUSTER; ++q) t += bnc_remote(part, q);
    return t;
}

// grid (BNC_CLUSTER * C), block (BNC_THREADS), dynamic shared memory
// Q * inner4 * 16 bytes. PT: dtype of weight, bias and the running statistics.
// Writes y, mean[c], invstd[c] and updates the running statistics as
// bn_finalize_train does.
template <typename PT>
__global__ void __cluster_dims__(BNC_CLUSTER, 1, 1)
bn_forward_cluster(const float4* __restrict__ x, float4* __restrict__ y, long long outer,
                   int C, long long inner4, double N, double eps,
                   const PT* __restrict__ weight, const PT* __restrict__ bias,
                   PT* running_mean, PT* running_var, double momentum, int unbiased,
                   double* __restrict__ mean, double* __restrict__ invstd) {
    BNC_DYNAMIC_SHARED(float4, slab);
    BNC_SHARED(double, red, BNC_THREADS);
    BNC_SHARED(double, part, 2);
    unsigned r;
    int c, i4, n4;
    long long o0;
    bnc_slice(outer, inner4, r, c, o0, i4, n4);

    // x -> shared memory, summing as it arrives. (pl, i): plane and float4 of
    // slab element k, stepped along with k (no division per element). BNC_UNROLL
    // loads are issued before the first is used: one load in flight per warp
    // would leave an H100 far from its bandwidth.
    double s = 0.0;
    int pl, i;
    const int sq = BNC_THREADS / i4, sr = BNC_THREADS - sq * i4;
    bnc_first(pl, i, i4);
    for (int k0 = threadIdx.x; k0 < n4; k0 += BNC_UNROLL * BNC_THREADS) {
        float4 v[BNC_UNROLL];
#pragma unroll
        for (int u = 0; u < BNC_UNROLL; ++u) {
            if (k0 + u * BNC_THREADS < n4) v[u] = x[((o0 + pl) * C + c) * inner4 + i];
            bnc_step(pl, i, sq, sr, i4);
        }
#pragma unroll
        for (int u = 0; u < BNC_UNROLL; ++u) {
            int k = k0 + u * BNC_THREADS;
            if (k < n4) {
                slab[k] = v[u];
                s += (f2d(v[u].x) + f2d(v[u].y)) + (f2d(v[u].z) + f2d(v[u].w));
            }
        }
    }
    s = bnc_block_sum(s, red);
    if (threadIdx.x == 0) part[0] = s;
    bnc_cluster_sync();
    double mu = bnc_cluster_total(&part[0]) / N;

    double q = 0.0;
    for (int k = threadIdx.x; k < n4; k += BNC_THREADS) {
        float4 v = slab[k];
        double a = f2d(v.x) - mu, b = f2d(v.y) - mu;
        double e = f2d(v.z) - mu, f = f2d(v.w) - mu;
        q += (a * a + b * b) + (e * e + f * f);
    }
    __syncthreads();                     // every thread has read red[0]
    q = bnc_block_sum(q, red);
    if (threadIdx.x == 0) part[1] = q;
    bnc_cluster_sync();
    double m2 = bnc_cluster_total(&part[1]);
    // this CTA's last read of another's shared memory: arrive now, wait before
    // leaving (so the release fence does not wait for the stores of y below)
    bnc_cluster_arrive();

    double var = m2 / N;
    double inv = 1.0 / sqrt(var + eps);
    double sc = inv * (weight ? dev_ld(weight + c) : 1.0);
    double sh = bias ? dev_ld(bias + c) : 0.0;
    if (r == 0 && threadIdx.x == 0) {
        mean[c] = mu;
        invstd[c] = inv;
        if (running_mean) {
            double vr = unbiased ? m2 / (N - 1.0) : var;
            double rm = dev_ld(running_mean + c), rv = dev_ld(running_var + c);
            dev_st(running_mean + c, (1.0 - momentum) * rm + momentum * mu);
            dev_st(running_var + c, (1.0 - momentum) * rv + momentum * vr);
        }
    }
    bnc_first(pl, i, i4);
    for (int k = threadIdx.x; k < n4; k += BNC_THREADS) {
        float4 v = slab[k];
        float4 o;
        o.x = d2f((f2d(v.x) - mu) * sc + sh);
        o.y = d2f((f2d(v.y) - mu) * sc + sh);
        o.z = d2f((f2d(v.z) - mu) * sc + sh);
        o.w = d2f((f2d(v.w) - mu) * sc + sh);
        y[((o0 + pl) * C + c) * inner4 + i] = o;
        bnc_step(pl, i, sq, sr, i4);
    }
    // no CTA may leave while another can still read its `part`
    bnc_cluster_wait();
}

// grid (BNC_CLUSTER * C), block (BNC_THREADS), dynamic shared memory
// 2 * Q * inner4 * 16 bytes (dy, then x). The backward of the training forward
// (training = 1) or of the inference one (0) for one channel per cluster, as
// bn_dy_sums_planes + bn_finalize_backward + bn_dx_planes compute it:
// sum(dy), sum(dy * (x - mean)) in float64 (CTA trees, then rank order), then
// dweight = sum(dy (x - mean)) * invstd, dbias = sum(dy) (PT: weight's dtype)
// and dx = g ((dy - a) - (x - mean) k) with g = invstd * weight,
// a = sum(dy) / N, k = invstd^2 sum(dy (x - mean)) / N (a = k = 0 in inference).
template <typename PT>
__global__ void __cluster_dims__(BNC_CLUSTER, 1, 1)
bn_backward_cluster(const float4* __restrict__ dy, const float4* __restrict__ x,
                    float4* __restrict__ dx, long long outer, int C, long long inner4,
                    double N, int training, const double* __restrict__ mean,
                    const double* __restrict__ invstd, const PT* __restrict__ weight,
                    PT* __restrict__ dweight, PT* __restrict__ dbias) {
    BNC_DYNAMIC_SHARED(float4, slab);
    BNC_SHARED(double, red_a, BNC_THREADS);
    BNC_SHARED(double, red_b, BNC_THREADS);
    BNC_SHARED(double, part, 2);
    unsigned r;
    int c, i4, n4;
    long long o0;
    bnc_slice(outer, inner4, r, c, o0, i4, n4);
    float4* sdy = slab;
    float4* sx = slab + n4;
    double m = mean[c];

    // dy and x -> shared memory, summing as they arrive (loads issued ahead as
    // in the forward)
    double sa = 0.0, sb = 0.0;
    int pl, i;
    const int sq = BNC_THREADS / i4, sr = BNC_THREADS - sq * i4;
    bnc_first(pl, i, i4);
    for (int k0 = threadIdx.x; k0 < n4; k0 += BNC_UNROLL * BNC_THREADS) {
        float4 d[BNC_UNROLL], v[BNC_UNROLL];
#pragma unroll
        for (int u = 0; u < BNC_UNROLL; ++u) {
            if (k0 + u * BNC_THREADS < n4) {
                long long at = ((o0 + pl) * C + c) * inner4 + i;
                d[u] = dy[at];
                v[u] = x[at];
            }
            bnc_step(pl, i, sq, sr, i4);
        }
#pragma unroll
        for (int u = 0; u < BNC_UNROLL; ++u) {
            int k = k0 + u * BNC_THREADS;
            if (k < n4) {
                float4 e = d[u], w = v[u];
                sdy[k] = e;
                sx[k] = w;
                sa += (f2d(e.x) + f2d(e.y)) + (f2d(e.z) + f2d(e.w));
                sb += (f2d(e.x) * (f2d(w.x) - m) + f2d(e.y) * (f2d(w.y) - m))
                    + (f2d(e.z) * (f2d(w.z) - m) + f2d(e.w) * (f2d(w.w) - m));
            }
        }
    }
    dev_block_sum2(sa, sb, red_a, red_b);
    if (threadIdx.x == 0) {
        part[0] = sa;
        part[1] = sb;
    }
    bnc_cluster_sync();
    double s1 = bnc_cluster_total(&part[0]);
    double s2 = bnc_cluster_total(&part[1]);
    bnc_cluster_arrive();                // last remote read done (see the forward)

    double inv = invstd[c];
    double g = inv * (weight ? dev_ld(weight + c) : 1.0);
    double a = training ? s1 / N : 0.0;
    double kk = training ? inv * inv * s2 / N : 0.0;
    if (r == 0 && threadIdx.x == 0) {
        dev_st(dweight + c, s2 * inv);
        dev_st(dbias + c, s1);
    }
    bnc_first(pl, i, i4);
    for (int k = threadIdx.x; k < n4; k += BNC_THREADS) {
        float4 d = sdy[k], v = sx[k];
        float4 o;
        if (training) {
            o.x = d2f(g * ((f2d(d.x) - a) - (f2d(v.x) - m) * kk));
            o.y = d2f(g * ((f2d(d.y) - a) - (f2d(v.y) - m) * kk));
            o.z = d2f(g * ((f2d(d.z) - a) - (f2d(v.z) - m) * kk));
            o.w = d2f(g * ((f2d(d.w) - a) - (f2d(v.w) - m) * kk));
        } else {    // inference: dx = g dy, x not read (as bn_dx_walk4)
            o.x = d2f(g * f2d(d.x));
            o.y = d2f(g * f2d(d.y));
            o.z = d2f(g * f2d(d.z));
            o.w = d2f(g * f2d(d.w));
        }
        dx[((o0 + pl) * C + c) * inner4 + i] = o;
        bnc_step(pl, i, sq, sr, i4);
    }
    // no CTA may leave while another can still read its `part`
    bnc_cluster_wait();
}

// explicit instantiations, so nvcc --ptx checks every template this file offers
template __global__ void bn_forward_cluster<float>(const float4*, float4*, long long, int, long long, double, double, const float*, const float*, float*, float*, double, int, double*, double*);
template __global__ void bn_forward_cluster<double>(const float4*, float4*, long long, int, long long, double, double, const double*, const double*, double*, double*, double, int, double*, double*);
template __global__ void bn_backward_cluster<float>(const float4*, const float4*, float4*, long long, int, long long, double, int, const double*, const double*, const float*, float*, float*);
template __global__ void bn_backward_cluster<double>(const float4*, const float4*, float4*, long long, int, long long, double, int, const double*, const double*, const double*, double*, double*);

// Multi-tensor optimizer and clipping kernels for CUDA (CPU twin:
// bncore/_optim_kernels.pyx), loaded by bncore_gpu/_loader.py through RawModule.
//
// One launch updates a whole list of tensors. The host uploads a table of
// long longs (cached, so a training loop re-uploads nothing):
//     [ ptr[op][t] for op < nops, t < n ]     (device addresses, 0 = absent)
//     [ size[t]    for t < n ]
//     [ chunk_tensor[c], chunk_offset[c] for c < nchunks ]
// and the grid strides over chunks of at most CHUNK elements: 200 small
// tensors cost one launch. Updates are elementwise and computed in float64
// with one rounding per stored value, so they match the CPU engine to
// rounding; reductions (norms) keep one partial per chunk and combine them in
// chunk order with a fixed tree, never with atomics.
//
// AMP without host synchronization: grad_scale and found_inf may be device
// scalars (double*), read inside the kernels; with found_inf != 0 every thread
// returns before touching memory. The step count may be a device scalar too
// (double*, already incremented by mt_step_increment, which skips on found_inf).
//
// Storage: parameters and state float or double; gradients the parameters'
// type or IEEE binary16 (unsigned short) with float parameters.

#include "_common.cuh"

#define MT_THREADS 256

struct MtTable {
    const long long* t;
    int nops, n;
    long long nchunks;
    __device__ __forceinline__ void* ptr(int op, long long ti) const {
        return (void*)(t[(long long)op * n + ti]);
    }
    __device__ __forceinline__ long long tensor(long long c) const {
        return t[(long long)nops * n + n + 2 * c];
    }
    __device__ __forceinline__ long long offset(long long c) const {
        return t[(long long)nops * n + n + 2 * c + 1];
    }
    __device__ __forceinline__ long long size(long long ti) const {
        return t[(long long)nops * n + ti];
    }
};

// CHUNK must equal bncore_gpu/_tables.py's CHUNK
#define MT_CHUNK 16384LL

__device__ __forceinline__ long long mt_len(const MtTable& tb, long long c) {
    long long rest = tb.size(tb.tensor(c)) - tb.offset(c);
    return rest < MT_CHUNK ? rest : MT_CHUNK;
}

__device__ __forceinline__ bool mt_skip(const double* found_inf) {
    return found_inf != nullptr && *found_inf != 0.0;
}

__device__ __forceinline__ double mt_inv_scale(const double* grad_scale, double inv_scale) {
    return grad_scale != nullptr ? 1.0 / *grad_scale : inv_scale;
}

// the step count: a device scalar when given, else the host value
__device__ __forceinline__ double mt_step(const double* step, double step_host) {
    return step != nullptr ? *step : step_host;
}

// the gradient with its L2 term, where weight decay is on: 0 * x would turn
// an infinite parameter's step into NaN (inf - lr g stays inf, as IEEE says)
__device__ __forceinline__ double mt_grad(double g, double wd, double x) {
    return wd != 0.0 ? g + wd * x : g;
}

// ---------------------------------------------------------------- SGD
// style 0 torch: v = mu v + (1 - d) g, first step v = g (buffer not read);
//                p -= lr (g + mu v | v)
// style 1 keras: v = mu v + lr g (first step from 0);  p -= (mu v + lr g | v)
// style 2 onnx:  v = mu v + (first ? 1 : 1 - d) g;      p -= lr (g + mu v | v)
template <typename P, typename G>
__global__ void mt_sgd(const long long* table, int nops, int n, long long nchunks, double lr,
                       double momentum, double dampening, int nesterov, int style,
                       double weight_decay, int decoupled, double sign, double inv_scale,
                       const double* grad_scale, const double* found_inf,
                       const double* step, int first_host) {
    if (mt_skip(found_inf)) return;
    MtTable tb{table, nops, n, nchunks};
    double inv = mt_inv_scale(grad_scale, inv_scale) * sign;
    bool first = step != nullptr ? (*step <= 1.0) : (first_host != 0);
    bool read_buf = style == 2 ? true : !first;
    double B = style == 1 ? lr : (first ? 1.0 : 1.0 - dampening);
    double L = style == 1 ? 1.0 : lr;
    double B0 = (style == 2 && !nesterov) ? B : 1.0;   // no buffer: lr (Na g + Nb B g)
    double Na = nesterov ? (style == 1 ? lr : 1.0) : 0.0;
    double Nb = nesterov ? momentum : 1.0;
    double wd = decoupled ? 0.0 : weight_decay;
    double decay = decoupled ? 1.0 - lr * weight_decay : 1.0;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        P* __restrict__ p = (P*)tb.ptr(0, ti) + off;
        const G* __restrict__ g = (const G*)tb.ptr(1, ti) + off;
        P* __restrict__ b = tb.ptr(2, ti) ? (P*)tb.ptr(2, ti) + off : nullptr;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) {
            double x = dev_ld(p + i);
            double gr = mt_grad(dev_ld(g + i) * inv, wd, x);
            if (b != nullptr) {
                // (-0.0: v = B g exactly, a zero's sign included, as the CPU)
                double v = read_buf ? dev_ld(b + i) : -0.0;
                v = momentum * v + B * gr;
                dev_st(b + i, v);
                // without g's term unless Nesterov: 0 * g is NaN for an infinite g
                dev_st(p + i, x * decay - L * (nesterov ? Na * gr + Nb * v : v));
            } else {   // no buffer: p -= lr g (onnx: lr (B g), V at alpha = 0, not kept)
                dev_st(p + i, x * decay - lr * (B0 * gr));
            }
        }
    }
}

// ---------------------------------------------------------------- Adam

struct AdamConst {
    double beta1, beta2, eps, eps_root, c_in, c_out, step_size, wd, decay, post, inv;
};

// one float32 element of the vectorized path (no AMSGrad): the same float64
// arithmetic as the scalar loop, one rounding per stored value
__device__ __forceinline__ void adam_elem(const AdamConst& k, float& p, float g, float& m,
                                          float& v) {
    double x = f2d(p);
    double gr = mt_grad(f2d(g) * k.inv, k.wd, x);
    double mm = k.beta1 * f2d(m) + (1.0 - k.beta1) * gr;
    double vv = k.beta2 * f2d(v) + (1.0 - k.beta2) * gr * gr;
    m = d2f(mm);
    v = d2f(vv);
    double den = sqrt(vv * k.c_in * k.c_out + k.eps_root) + k.eps;
    p = d2f((x * k.decay - k.step_size * mm / den) * k.post);
}
// eps_mode 0 (torch, optax): p -= lr/bc1 * m / (sqrt(vm * c_out + eps_root) + eps)
// eps_mode 2 (Keras, ONNX):  p -= lr sqrt(bc2)/bc1 * m / (sqrt(vm) + eps)
// AMSGrad: vm = max(vmax, v * c_in): c_in = 1 (torch, Keras) or 1/bc2 (optax).
// t = step + bias_offset (ONNX: -1); t <= 0: no bias correction.
template <typename P, typename G>
__global__ void mt_adam(const long long* table, int nops, int n, long long nchunks, double lr,
                        double beta1, double beta2, double eps, double eps_root,
                        double weight_decay, int decoupled, double post, int amsgrad,
                        int amsgrad_corrected, int eps_mode, double sign, double inv_scale,
                        const double* grad_scale, const double* found_inf, const double* step,
                        double step_host, double bias_offset, int vec4) {
    if (mt_skip(found_inf)) return;
    MtTable tb{table, nops, n, nchunks};
    double inv = mt_inv_scale(grad_scale, inv_scale) * sign;
    double t = mt_step(step, step_host) + bias_offset;
    double bc1 = t > 0.0 ? 1.0 - pow(beta1, t) : 1.0;
    double bc2 = t > 0.0 ? 1.0 - pow(beta2, t) : 1.0;
    double step_size, c_in, c_out;
    if (eps_mode == 2) {
        step_size = lr * sqrt(bc2) / bc1;
        c_in = 1.0;
        c_out = 1.0;
    } else if (amsgrad && amsgrad_corrected) {
        step_size = lr / bc1;
        c_in = 1.0 / bc2;
        c_out = 1.0;
    } else {
        step_size = lr / bc1;
        c_in = 1.0;
        c_out = 1.0 / bc2;
    }
    double wd = decoupled ? 0.0 : weight_decay;
    double decay = decoupled ? 1.0 - lr * weight_decay : 1.0;
    AdamConst k{beta1, beta2, eps, eps_root, c_in, c_out, step_size, wd, decay, post, inv};
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        P* __restrict__ p = (P*)tb.ptr(0, ti) + off;
        const G* __restrict__ g = (const G*)tb.ptr(1, ti) + off;
        P* __restrict__ m = (P*)tb.ptr(2, ti) + off;
        P* __restrict__ v = (P*)tb.ptr(3, ti) + off;
        P* __restrict__ vmax = amsgrad ? (P*)tb.ptr(4, ti) + off : nullptr;
        long long i0 = 0;
        if constexpr (sizeof(P) == 4 && sizeof(G) == 4) {
            // float32: 16-byte loads and stores when every tensor starts 16-byte
            // aligned (the host checks; chunk starts are 64 KiB apart), the tail
            // one by one
            if (vmax == nullptr && vec4) {
                long long len4 = len / 4;
                for (long long q = threadIdx.x; q < len4; q += MT_THREADS) {
                    float4 x4 = ((float4*)p)[q], g4 = ((const float4*)g)[q];
                    float4 m4 = ((float4*)m)[q], v4 = ((float4*)v)[q];
                    adam_elem(k, x4.x, g4.x, m4.x, v4.x);
                    adam_elem(k, x4.y, g4.y, m4.y, v4.y);
                    adam_elem(k, x4.z, g4.z, m4.z, v4.z);
                    adam_elem(k, x4.w, g4.w, m4.w, v4.w);
                    ((float4*)p)[q] = x4;
                    ((float4*)m)[q] = m4;
                    ((float4*)v)[q] = v4;
                }
                i0 = len4 * 4;
            }
        }
        for (long long i = i0 + threadIdx.x; i < len; i += MT_THREADS) {
            double x = dev_ld(p + i);
            double gr = mt_grad(dev_ld(g + i) * inv, wd, x);
            double mm = beta1 * dev_ld(m + i) + (1.0 - beta1) * gr;
            double vv = beta2 * dev_ld(v + i) + (1.0 - beta2) * gr * gr;
            dev_st(m + i, mm);
            dev_st(v + i, vv);
            double vm = vv * c_in;
            if (vmax != nullptr) {
                double a = dev_ld(vmax + i);
                vm = (vm > a || vm != vm) ? vm : a;   // NaN-propagating, as torch.maximum
                dev_st(vmax + i, vm);
            }
            double den = sqrt(vm * c_out + eps_root) + eps;
            dev_st(p + i, (x * decay - step_size * mm / den) * post);
        }
    }
}

// ---------------------------------------------------------------- RMSprop
// s = a s + (1 - a) g^2; centered: ga = a ga + (1 - a) g, d = max(s - ga^2, 0)
// (rounding can make it negative: bncore/_optim_kernels.pyx, _rms_centered);
// den = sqrt(d + e_in) + e_out; momentum: b = mu b + k g/den, p -= L b (torch:
// k = 1, L = lr; Keras: k = lr, L = 1); else p -= lr g/den
template <typename P, typename G>
__global__ void mt_rmsprop(const long long* table, int nops, int n, long long nchunks, double lr,
                           double alpha, double e_in, double e_out, double weight_decay,
                           int decoupled, double momentum, int keras_style, double sign,
                           double inv_scale, const double* grad_scale, const double* found_inf) {
    if (mt_skip(found_inf)) return;
    MtTable tb{table, nops, n, nchunks};
    double inv = mt_inv_scale(grad_scale, inv_scale) * sign;
    double wd = decoupled ? 0.0 : weight_decay;
    double decay = decoupled ? 1.0 - lr * weight_decay : 1.0;
    double k = keras_style ? lr : 1.0, L = keras_style ? 1.0 : lr;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        P* __restrict__ p = (P*)tb.ptr(0, ti) + off;
        const G* __restrict__ g = (const G*)tb.ptr(1, ti) + off;
        P* __restrict__ sq = (P*)tb.ptr(2, ti) + off;
        P* __restrict__ ga = tb.ptr(3, ti) ? (P*)tb.ptr(3, ti) + off : nullptr;
        P* __restrict__ buf = tb.ptr(4, ti) ? (P*)tb.ptr(4, ti) + off : nullptr;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) {
            double x = dev_ld(p + i);
            double gr = mt_grad(dev_ld(g + i) * inv, wd, x);
            double s = alpha * dev_ld(sq + i) + (1.0 - alpha) * gr * gr;
            dev_st(sq + i, s);
            if (ga != nullptr) {
                double a = alpha * dev_ld(ga + i) + (1.0 - alpha) * gr;
                dev_st(ga + i, a);
                s = s - a * a;
                s = s < 0.0 ? 0.0 : s;          // a NaN stays NaN
            }
            double u = gr / (sqrt(s + e_in) + e_out);
            if (buf != nullptr) {
                double b = momentum * dev_ld(buf + i) + k * u;
                dev_st(buf + i, b);
                dev_st(p + i, x * decay - L * b);
            } else {
                dev_st(p + i, x * decay - lr * u);
            }
        }
    }
}

// ---------------------------------------------------------------- Adagrad
// clr = lr / (1 + (t - 1) lr_decay); h += g^2; p -= clr g / (sqrt(h + e_in) + e_out)
template <typename P, typename G>
__global__ void mt_adagrad(const long long* table, int nops, int n, long long nchunks, double lr,
                           double lr_decay, double e_in, double e_out, double weight_decay,
                           int decoupled, double sign, double inv_scale, const double* grad_scale,
                           const double* found_inf, const double* step, double step_host) {
    if (mt_skip(found_inf)) return;
    MtTable tb{table, nops, n, nchunks};
    double inv = mt_inv_scale(grad_scale, inv_scale) * sign;
    double clr = lr / (1.0 + (mt_step(step, step_host) - 1.0) * lr_decay);
    double wd = decoupled ? 0.0 : weight_decay;
    double decay = decoupled ? 1.0 - clr * weight_decay : 1.0;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        P* __restrict__ p = (P*)tb.ptr(0, ti) + off;
        const G* __restrict__ g = (const G*)tb.ptr(1, ti) + off;
        P* __restrict__ h = (P*)tb.ptr(2, ti) + off;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) {
            double x = dev_ld(p + i);
            double gr = mt_grad(dev_ld(g + i) * inv, wd, x);
            double s = dev_ld(h + i) + gr * gr;
            dev_st(h + i, s);
            dev_st(p + i, x * decay - clr * gr / (sqrt(s + e_in) + e_out));
        }
    }
}

// the device step counter: +1 unless found_inf
__global__ void mt_step_increment(double* step, const double* found_inf) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && !mt_skip(found_inf)) *step += 1.0;
}

// ---------------------------------------------------------------- norms and clipping
// kind 1: sum |g|, 2: sum g^2, 3: max |g| (NaN wins), 4: sum |g|^p.
// Float64 gradients use the scaled sum of squares (scale, ssq) for kind 2, so
// no finite input overflows; float32 and float16 squares cannot overflow a double.

__device__ __forceinline__ double mt_nanmax(double acc, double a) {
    return (a > acc || a != a) ? a : acc;
}

// (s, q) represents s^2 q; combine two such pairs exactly enough (dnrm2-style)
__device__ __forceinline__ void mt_ssq_add(double& s, double& q, double s2, double q2) {
    if (s2 > s) {
        double r = s / s2;
        q = q2 + q * r * r;
        s = s2;
    } else if (s2 == s) {
        q += q2;                    // r = 1; also s = s2 = Inf, where s2 / s is NaN
    } else if (s2 > 0.0) {
        double r = s2 / s;
        q += q2 * r * r;
    } else if (s2 != s2) {
        s = s2;
        q = s2;
    }
}

// gate (or nullptr): a device flag; at 0 the pass does nothing (the rescue
// passes of a p-norm, launched every time, needed only now and then: no wait
// on the host to decide). scale (or nullptr: 1): kind 4 sums |g / scale|^p.
template <typename G>
__global__ void mt_norm_partials(const long long* table, int nops, int n, long long nchunks,
                                 int kind, double p, double* part_s, double* part_q,
                                 const double* gate, const double* scale) {
    __shared__ double ss[MT_THREADS];
    __shared__ double sq[MT_THREADS];
    if (gate != nullptr && *gate == 0.0) return;
    MtTable tb{table, nops, n, nchunks};
    bool scaled = kind == 2 && sizeof(G) == 8;
    double sc = scale != nullptr ? *scale : 1.0;
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        const G* __restrict__ g = (const G*)tb.ptr(0, ti) + off;
        double s = 0.0, q = scaled ? 0.0 : 0.0;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) {
            double a = fabs(dev_ld(g + i));
            if (kind == 2) {
                if (scaled) mt_ssq_add(s, q, a, 1.0);
                else s += a * a;
            } else if (kind == 1) {
                s += a;
            } else if (kind == 3) {
                s = mt_nanmax(s, a);
            } else {
                s += pow(a / sc, p);
            }
        }
        ss[threadIdx.x] = s;
        sq[threadIdx.x] = q;
        __syncthreads();
        for (int w = MT_THREADS / 2; w > 0; w >>= 1) {
            if (threadIdx.x < w) {
                if (kind == 3) {
                    ss[threadIdx.x] = mt_nanmax(ss[threadIdx.x], ss[threadIdx.x + w]);
                } else if (scaled) {
                    mt_ssq_add(ss[threadIdx.x], sq[threadIdx.x], ss[threadIdx.x + w],
                               sq[threadIdx.x + w]);
                } else {
                    ss[threadIdx.x] += ss[threadIdx.x + w];
                }
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            part_s[c] = ss[0];
            part_q[c] = sq[0];
        }
        __syncthreads();
    }
}

// One block: combine the chunk partials in a fixed order into the total norm
// and the clip coefficient coef = max_norm / (total + eps) (>= 1: no clipping).
// gate as mt_norm_partials' (the block then leaves total and coef as they are).
__global__ void mt_norm_finalize(long long nchunks, int kind, double p, int scaled,
                                 const double* part_s, const double* part_q, double max_norm,
                                 double eps, double* total, double* coef, const double* gate) {
    __shared__ double ss[MT_THREADS];
    __shared__ double sq[MT_THREADS];
    if (gate != nullptr && *gate == 0.0) return;
    double s = 0.0, q = 0.0;
    for (long long c = threadIdx.x; c < nchunks; c += MT_THREADS) {
        if (kind == 3) s = mt_nanmax(s, part_s[c]);
        else if (scaled) mt_ssq_add(s, q, part_s[c], part_q[c]);
        else s += part_s[c];
    }
    ss[threadIdx.x] = s;
    sq[threadIdx.x] = q;
    __syncthreads();
    for (int w = MT_THREADS / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) {
            if (kind == 3) ss[threadIdx.x] = mt_nanmax(ss[threadIdx.x], ss[threadIdx.x + w]);
            else if (scaled) mt_ssq_add(ss[threadIdx.x], sq[threadIdx.x], ss[threadIdx.x + w],
                                        sq[threadIdx.x + w]);
            else ss[threadIdx.x] += ss[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        double t;
        if (kind == 3 || kind == 1) t = ss[0];
        else if (scaled) t = ss[0] * sqrt(sq[0]);
        else if (kind == 2) t = sqrt(ss[0]);
        else t = pow(ss[0], 1.0 / p);
        *total = t;
        double d = t + eps;
        *coef = d != 0.0 ? max_norm / d : __longlong_as_double(0x7ff0000000000000LL);
    }
}

// The p-norm's rescue (kind 4), as bncore.clipping._power_sum's: a sum
// below 2^-1000 (its powers underflowed) or infinite on finite data is taken
// again relative to max |g|, on the device, so nothing waits for the host.
// stage 0, after the plain pass: *gate = 1 where the sum calls for it, read
// off its root (total < 2^(-1000/p) for a sum below 2^-1000, up to the root's
// rounding at that edge; total infinite for an infinite sum);
// stage 1, after the max pass into *top: the rescue goes on only for a
// finite, nonzero max (all zeros keep the plain pass's 0; an Inf or NaN in the
// data its inf or NaN, as on the CPU);
// stage 2, after the relative pass's root *rel: total = top * rel, coef again.
__global__ void mt_norm_rescue(int stage, double p, double max_norm, double eps,
                               double* total, double* coef, double* gate, const double* top,
                               const double* rel) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (stage == 0) {
        double t = *total;
        *gate = (t != t) ? 0.0 : ((t < exp2(-1000.0 / p) || isinf(t)) ? 1.0 : 0.0);
    } else if (stage == 1) {
        double m = *top;
        *gate = (*gate != 0.0 && m > 0.0 && !isinf(m)) ? 1.0 : 0.0;   // (NaN > 0 is false)
    } else if (*gate != 0.0) {
        double t = *top * *rel;
        *total = t;
        double d = t + eps;
        *coef = d != 0.0 ? max_norm / d : __longlong_as_double(0x7ff0000000000000LL);
    }
}

// g *= coef when coef < 1 (a NaN coefficient goes through, as IEEE says)
template <typename G>
__global__ void mt_scale(const long long* table, int nops, int n, long long nchunks,
                         const double* coef) {
    double s = *coef;
    if (s >= 1.0) return;
    MtTable tb{table, nops, n, nchunks};
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        G* __restrict__ g = (G*)tb.ptr(0, ti) + off;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) dev_st(g + i, dev_ld(g + i) * s);
    }
}

template <typename G>
__global__ void mt_clamp(const long long* table, int nops, int n, long long nchunks, double lo,
                         double hi) {
    MtTable tb{table, nops, n, nchunks};
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        G* __restrict__ g = (G*)tb.ptr(0, ti) + off;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) {
            double a = dev_ld(g + i);
            if (a < lo) dev_st(g + i, lo);
            else if (a > hi) dev_st(g + i, hi);
        }
    }
}

// found = 1 when any gradient is NaN or Inf (x * 0 is 0 for finite x)
template <typename G>
__global__ void mt_nonfinite_partials(const long long* table, int nops, int n, long long nchunks,
                                      double* part) {
    __shared__ int flag;
    MtTable tb{table, nops, n, nchunks};
    for (long long c = blockIdx.x; c < nchunks; c += gridDim.x) {
        if (threadIdx.x == 0) flag = 0;
        __syncthreads();
        long long ti = tb.tensor(c), off = tb.offset(c), len = mt_len(tb, c);
        const G* __restrict__ g = (const G*)tb.ptr(0, ti) + off;
        int bad = 0;
        for (long long i = threadIdx.x; i < len; i += MT_THREADS) bad |= (dev_ld(g + i) * 0.0 != 0.0);
        if (bad) flag = 1;                       // any writer: the same value
        __syncthreads();
        if (threadIdx.x == 0) part[c] = (double)flag;
        __syncthreads();
    }
}

__global__ void mt_any(long long nchunks, const double* part, double* found) {
    __shared__ int flag;
    if (threadIdx.x == 0) flag = 0;
    __syncthreads();
    int bad = 0;
    for (long long c = threadIdx.x; c < nchunks; c += MT_THREADS) bad |= part[c] != 0.0;
    if (bad) flag = 1;
    __syncthreads();
    if (threadIdx.x == 0) *found = (double)flag;
}

template __global__ void mt_sgd<float, float>(const long long*, int, int, long long, double, double, double, int, int, double, int, double, double, const double*, const double*, const double*, int);
template __global__ void mt_sgd<double, double>(const long long*, int, int, long long, double, double, double, int, int, double, int, double, double, const double*, const double*, const double*, int);
template __global__ void mt_sgd<float, unsigned short>(const long long*, int, int, long long, double, double, double, int, int, double, int, double, double, const double*, const double*, const double*, int);
template __global__ void mt_adam<float, float>(const long long*, int, int, long long, double, double, double, double, double, double, int, double, int, int, int, double, double, const double*, const double*, const double*, double, double, int);
template __global__ void mt_adam<double, double>(const long long*, int, int, long long, double, double, double, double, double, double, int, double, int, int, int, double, double, const double*, const double*, const double*, double, double, int);
template __global__ void mt_adam<float, unsigned short>(const long long*, int, int, long long, double, double, double, double, double, double, int, double, int, int, int, double, double, const double*, const double*, const double*, double, double, int);
template __global__ void mt_rmsprop<float, float>(const long long*, int, int, long long, double, double, double, double, double, int, double, int, double, double, const double*, const double*);
template __global__ void mt_rmsprop<double, double>(const long long*, int, int, long long, double, double, double, double, double, int, double, int, double, double, const double*, const double*);
template __global__ void mt_rmsprop<float, unsigned short>(const long long*, int, int, long long, double, double, double, double, double, int, double, int, double, double, const double*, const double*);
template __global__ void mt_adagrad<float, float>(const long long*, int, int, long long, double, double, double, double, double, int, double, double, const double*, const double*, const double*, double);
template __global__ void mt_adagrad<double, double>(const long long*, int, int, long long, double, double, double, double, double, int, double, double, const double*, const double*, const double*, double);
template __global__ void mt_adagrad<float, unsigned short>(const long long*, int, int, long long, double, double, double, double, double, int, double, double, const double*, const double*, const double*, double);
template __global__ void mt_norm_partials<float>(const long long*, int, int, long long, int, double, double*, double*, const double*, const double*);
template __global__ void mt_norm_partials<double>(const long long*, int, int, long long, int, double, double*, double*, const double*, const double*);
template __global__ void mt_norm_partials<unsigned short>(const long long*, int, int, long long, int, double, double*, double*, const double*, const double*);
template __global__ void mt_scale<float>(const long long*, int, int, long long, const double*);
template __global__ void mt_scale<double>(const long long*, int, int, long long, const double*);
template __global__ void mt_scale<unsigned short>(const long long*, int, int, long long, const double*);
template __global__ void mt_clamp<float>(const long long*, int, int, long long, double, double);
template __global__ void mt_clamp<double>(const long long*, int, int, long long, double, double);
template __global__ void mt_clamp<unsigned short>(const long long*, int, int, long long, double, double);
template __global__ void mt_nonfinite_partials<float>(const long long*, int, int, long long, double*);
template __global__ void mt_nonfinite_partials<double>(const long long*, int, int, long long, double*);
template __global__ void mt_nonfinite_partials<unsigned short>(const long long*, int, int, long long, double*);

/* Where Adam's time goes on this CPU: the arithmetic of one float32 Adam step
 * in five precisions, timed in cache (pure compute, ns per element per thread)
 * and over 10M parameters in huge-page memory (compute or memory, whichever
 * binds), beside an in-place a += b moving the same 28 bytes per parameter.
 *
 *   gcc -O3 -march=native -fno-math-errno -fopenmp scripts/probe_adam_arith.c -o /tmp/adam_probe -lm
 *   /tmp/adam_probe 2
 *
 * Variants (torch's Adam with bias correction, no weight decay):
 *   f64        bncore's _adam_chunk: every operation in float64, one rounding
 *              per stored value
 *   f64-nodiv  the same without the sqrt and the division (not Adam: shows
 *              what the sqrt/divide unit costs)
 *   hybrid     m and v in float64 (one rounding each); the denominator
 *              sqrt(v)+eps from the stored float32 v, the step and p in float32
 *   f32        everything in float32, as torch's fused CPU kernel
 *   comp32     float32 arithmetic with the blend weights (beta, 1 - beta) as
 *              hi + lo float32 pairs (m and v then within about 1 ulp of their
 *              float64 values): what a float32 path that keeps m and v accurate
 *              would cost. Not Adam's one rounding for p: where p - step
 *              cancels (p near the step), p's error is the float32 step's
 *              (BENCHMARKS.md, 2026-11-28 fifth session)
 *   rsqrt2     f64 with sqrt replaced by vrsqrt14pd and two Goldschmidt steps
 *              (float64-accurate, divider left for the division only)
 *   rsqrt-rcp  the same and the division by vrcp14pd, a Newton step and a
 *              residual correction: no divider at all
 *   rsqrt1     one Goldschmidt step only (about 2^-27: not float64-accurate)
 *   (the last three need AVX-512; BENCHMARKS.md, 2026-11-28 tenth session)
 *   f32step    m and v as f64 (one rounding each); the step q in float32
 *              (RN32(lr m) / (sqrtf(RN32(v c)) + eps)), p = fma(x, 1, -q) rounded
 *              once, and a flag per element where |p| < 16 |q| (there the
 *              package would take the float64 formula: p faithfully rounded
 *              everywhere; the fallback loop's scan of the flags is here, its
 *              float64 work is not: its elements are rare in training data,
 *              not in this probe's, whose p cross 0 over the repetitions)
 *   f32step-pkg the same with the package's other per-element work: gradient
 *              scale, the L2 term (its loop for L2 off), decoupled decay as dh + dl
 *   (BENCHMARKS.md, 2026-11-28 twelfth session: both slower than f64 once the
 *   flags are kept live; an earlier version let GCC delete the test)
 */
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

typedef struct { double beta1, beta2, lr, eps, c_out; } Hyper;
typedef void (*Kernel)(float *restrict, const float *restrict, float *restrict,
                       float *restrict, ptrdiff_t, const Hyper *);

static void f64(float *restrict p, const float *restrict g, float *restrict m,
                float *restrict v, ptrdiff_t n, const Hyper *h) {
    for (ptrdiff_t i = 0; i < n; i++) {
        double gr = g[i], mm = h->beta1 * m[i] + (1 - h->beta1) * gr;
        double vv = h->beta2 * v[i] + (1 - h->beta2) * gr * gr;
        m[i] = (float)mm; v[i] = (float)vv;
        p[i] = (float)(p[i] - h->lr * mm / (sqrt(vv * h->c_out) + h->eps));
    }
}

static void f64_nodiv(float *restrict p, const float *restrict g, float *restrict m,
                      float *restrict v, ptrdiff_t n, const Hyper *h) {
    for (ptrdiff_t i = 0; i < n; i++) {
        double gr = g[i], mm = h->beta1 * m[i] + (1 - h->beta1) * gr;
        double vv = h->beta2 * v[i] + (1 - h->beta2) * gr * gr;
        m[i] = (float)mm; v[i] = (float)vv;
        p[i] = (float)(p[i] - h->lr * mm * (vv * h->c_out + h->eps));
    }
}

static void hybrid(float *restrict p, const float *restrict g, float *restrict m,
                   float *restrict v, ptrdiff_t n, const Hyper *h) {
    float kc = (float)sqrt(h->c_out), eps = (float)h->eps, lr = (float)h->lr;
    for (ptrdiff_t i = 0; i < n; i++) {
        double gr = g[i], mm = h->beta1 * m[i] + (1 - h->beta1) * gr;
        double vv = h->beta2 * v[i] + (1 - h->beta2) * gr * gr;
        float m32 = (float)mm, v32 = (float)vv;
        m[i] = m32; v[i] = v32;
        p[i] = p[i] - (lr * m32) / fmaf(sqrtf(v32), kc, eps);
    }
}

static void f32(float *restrict p, const float *restrict g, float *restrict m,
                float *restrict v, ptrdiff_t n, const Hyper *h) {
    float b1 = (float)h->beta1, b2 = (float)h->beta2, lr = (float)h->lr;
    float eps = (float)h->eps, c = (float)h->c_out;
    for (ptrdiff_t i = 0; i < n; i++) {
        float gr = g[i], mm = b1 * m[i] + (1 - b1) * gr, vv = b2 * v[i] + (1 - b2) * gr * gr;
        m[i] = mm; v[i] = vv;
        p[i] = p[i] - lr * mm / (sqrtf(vv * c) + eps);
    }
}

static void comp32(float *restrict p, const float *restrict g, float *restrict m,
                   float *restrict v, ptrdiff_t n, const Hyper *h) {
    float b1h = (float)h->beta1, b1l = (float)(h->beta1 - b1h);
    float c1h = (float)(1 - h->beta1), c1l = (float)((1 - h->beta1) - c1h);
    float b2h = (float)h->beta2, b2l = (float)(h->beta2 - b2h);
    float c2h = (float)(1 - h->beta2), c2l = (float)((1 - h->beta2) - c2h);
    float kc = (float)sqrt(h->c_out), eps = (float)h->eps, lr = (float)h->lr;
    for (ptrdiff_t i = 0; i < n; i++) {
        float gr = g[i], mi = m[i], vi = v[i], gg = gr * gr;
        float mm = fmaf(b1h, mi, fmaf(c1h, gr, fmaf(b1l, mi, c1l * gr)));
        float vv = fmaf(b2h, vi, fmaf(c2h, gg, fmaf(b2l, vi, c2l * gg)));
        m[i] = mm; v[i] = vv;
        p[i] = p[i] - (lr * mm) / fmaf(sqrtf(vv), kc, eps);
    }
}


#ifdef __AVX512F__
#include <immintrin.h>
/* f64's loop with the square root (and division) done as `how` says:
 * 1 = rsqrt2, 2 = rsqrt-rcp, 3 = rsqrt1 */
static inline void newton(float *restrict p, const float *restrict g, float *restrict m,
                          float *restrict v, ptrdiff_t n, const Hyper *h, int how) {
    const __m512d b1 = _mm512_set1_pd(h->beta1), b2 = _mm512_set1_pd(h->beta2);
    const __m512d c1 = _mm512_set1_pd(1 - h->beta1), c2 = _mm512_set1_pd(1 - h->beta2);
    const __m512d lr = _mm512_set1_pd(h->lr), eps = _mm512_set1_pd(h->eps);
    const __m512d c_out = _mm512_set1_pd(h->c_out), half = _mm512_set1_pd(0.5), one = _mm512_set1_pd(1);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d x = _mm512_cvtps_pd(_mm256_loadu_ps(p + i)), gr = _mm512_cvtps_pd(_mm256_loadu_ps(g + i));
        __m512d mm = _mm512_fmadd_pd(b1, _mm512_cvtps_pd(_mm256_loadu_ps(m + i)), _mm512_mul_pd(c1, gr));
        __m512d vv = _mm512_fmadd_pd(b2, _mm512_cvtps_pd(_mm256_loadu_ps(v + i)),
                                     _mm512_mul_pd(_mm512_mul_pd(c2, gr), gr));
        _mm256_storeu_ps(m + i, _mm512_cvtpd_ps(mm));
        _mm256_storeu_ps(v + i, _mm512_cvtpd_ps(vv));
        __m512d sd = _mm512_mul_pd(vv, c_out), y0 = _mm512_rsqrt14_pd(sd);
        __m512d s = _mm512_mul_pd(sd, y0), hh = _mm512_mul_pd(half, y0);
        __m512d r = _mm512_fnmadd_pd(s, hh, half);
        s = _mm512_fmadd_pd(s, r, s);
        if (how != 3) {
            hh = _mm512_fmadd_pd(hh, r, hh);
            s = _mm512_fmadd_pd(s, _mm512_fnmadd_pd(s, hh, half), s);
        }
        __m512d den = _mm512_add_pd(s, eps), nd = _mm512_mul_pd(lr, mm), q;
        if (how == 2) {
            __m512d z = _mm512_rcp14_pd(den);
            z = _mm512_fmadd_pd(z, _mm512_fnmadd_pd(den, z, one), z);
            __m512d q0 = _mm512_mul_pd(nd, z);
            q = _mm512_fmadd_pd(z, _mm512_fnmadd_pd(den, q0, nd), q0);
        } else {
            q = _mm512_div_pd(nd, den);
        }
        _mm256_storeu_ps(p + i, _mm512_cvtpd_ps(_mm512_sub_pd(x, q)));
    }
    f64(p + i, g + i, m + i, v + i, n - i, h);
}
static void rsqrt2(float *restrict p, const float *restrict g, float *restrict m,
                   float *restrict v, ptrdiff_t n, const Hyper *h) { newton(p, g, m, v, n, h, 1); }
static void rsqrt_rcp(float *restrict p, const float *restrict g, float *restrict m,
                      float *restrict v, ptrdiff_t n, const Hyper *h) { newton(p, g, m, v, n, h, 2); }
static void rsqrt1(float *restrict p, const float *restrict g, float *restrict m,
                   float *restrict v, ptrdiff_t n, const Hyper *h) { newton(p, g, m, v, n, h, 3); }
#define NEWTON_NAMES , "rsqrt2", "rsqrt-rcp", "rsqrt1"
#define NEWTON_KERNELS , rsqrt2, rsqrt_rcp, rsqrt1
#else
#define NEWTON_NAMES
#define NEWTON_KERNELS
#endif

/* f32step / f32step-pkg (header): the float32 step, its flags, the piece's
 * inputs saved for the float64 fallbacks */
#define F32PIECE 256
/* run-time values, as the package's (constants would fold away) */
static volatile double f32s_inv = 1.0, f32s_wd = 0.0;
static volatile float f32s_dh = 1.0f, f32s_dl = 0.0f;
/* where the flagged elements' saved inputs go: keeps the flags, the test and
 * the copies live (the compiler deleted all three from an `any == 2` test) */
static volatile float f32s_sink;
static inline void f32step_any(float *restrict p, const float *restrict g, float *restrict m,
                               float *restrict v, ptrdiff_t n, const Hyper *h, int pkg) {
    const float eps32 = (float)h->eps, dh = f32s_dh, dl = f32s_dl;
    const double inv = f32s_inv, wd = f32s_wd;
    float X[F32PIECE], M0[F32PIECE], V0[F32PIECE];
    int bad[F32PIECE];
    for (ptrdiff_t i0 = 0; i0 < n; i0 += F32PIECE) {
        ptrdiff_t k = n - i0 < F32PIECE ? n - i0 : F32PIECE;
        int any = 0;
        for (ptrdiff_t j = 0; j < k; j++) {
            X[j] = p[i0 + j]; M0[j] = m[i0 + j]; V0[j] = v[i0 + j];
            /* (pkg: the L2 term of the loop for l2 off; a select on l2 inside
             * the loop kept GCC from vectorizing it, so the package's header
             * had one loop per setting) */
            double gr = pkg ? (double)g[i0 + j] * inv + wd * 0.0 : (double)g[i0 + j];
            double mm = h->beta1 * M0[j] + (1 - h->beta1) * gr;
            double vv = h->beta2 * V0[j] + (1 - h->beta2) * gr * gr;
            m[i0 + j] = (float)mm; v[i0 + j] = (float)vv;
            float a32 = (float)(vv * h->c_out);
            float q = (float)(h->lr * mm) / (sqrtf(a32) + eps32);
            float p32 = pkg ? __builtin_fmaf(X[j], dh, __builtin_fmaf(X[j], dl, -q)) : X[j] - q;
            p[i0 + j] = p32;
            float ap = fabsf(p32);
            int b = !((ap >= 16.0f * fabsf(q)) & (ap >= 8.67e-19f) & (ap <= 3.4e38f)
                      & (a32 <= 3.4e38f));
            bad[j] = b;
            any |= b;
        }
        /* the fallback loop's scan, its float64 work left out (above) */
        if (any)
            for (ptrdiff_t j = 0; j < k; j++)
                if (bad[j])
                    f32s_sink = X[j] + M0[j] + V0[j];
    }
}
static void f32step(float *restrict p, const float *restrict g, float *restrict m,
                    float *restrict v, ptrdiff_t n, const Hyper *h) { f32step_any(p, g, m, v, n, h, 0); }
static void f32step_pkg(float *restrict p, const float *restrict g, float *restrict m,
                        float *restrict v, ptrdiff_t n, const Hyper *h) { f32step_any(p, g, m, v, n, h, 1); }

static void add(float *restrict a, const float *restrict b, float *restrict unused1,
                float *restrict unused2, ptrdiff_t n, const Hyper *h) {
    (void)unused1; (void)unused2; (void)h;
    for (ptrdiff_t i = 0; i < n; i++) a[i] += b[i];
}

static float *huge(ptrdiff_t n) {
    size_t bytes = (((size_t)n * 4 >> 21) + 1) << 21;
    float *a = aligned_alloc(1 << 21, bytes);
    madvise(a, bytes, MADV_HUGEPAGE);   /* as numpy does for large arrays */
    for (ptrdiff_t i = 0; i < n; i++) a[i] = (float)((i % 97) * 0.01);
    return a;
}

/* best seconds per call over `reps` calls, each split over nt threads */
static double timed(Kernel k, float **a, ptrdiff_t n, int nt, int reps, const Hyper *h) {
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = omp_get_wtime();
#pragma omp parallel num_threads(nt)
        {
            int id = omp_get_thread_num();
            ptrdiff_t lo = n * id / nt, hi = n * (id + 1) / nt;
            k(a[0] + lo, a[1] + lo, a[2] + lo, a[3] + lo, hi - lo, h);
        }
        t = omp_get_wtime() - t;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    int nt = argc > 1 ? atoi(argv[1]) : 2;
    const Hyper h = {0.9, 0.999, 1e-3, 1e-8, 1.0 / (1 - pow(0.999, 10))};
    const char *names[] = {"f64", "f64-nodiv", "hybrid", "f32", "comp32", "f32step", "f32step-pkg" NEWTON_NAMES};
    Kernel kernels[] = {f64, f64_nodiv, hybrid, f32, comp32, f32step, f32step_pkg NEWTON_KERNELS};
    ptrdiff_t small = 16384, big = 10000000, nadd = big * 28 / 12;
    float *a[4], *b[4], *c[2];
    for (int j = 0; j < 4; j++) { a[j] = huge(small); b[j] = huge(big); }
    c[0] = huge(nadd); c[1] = huge(nadd);
    float *cc[4] = {c[0], c[1], NULL, NULL};
    printf("%-10s %16s %22s\n", "variant", "in cache ns/elem", "10M params, ms");
    for (int j = 0; j < (int)(sizeof kernels / sizeof *kernels); j++) {
        double t1 = 1e30, t2 = 1e30;
        for (int round = 0; round < 3; round++) {   /* interleave with the others */
            double s = timed(kernels[j], a, small, 1, 2000, &h);
            double l = timed(kernels[j], b, big, nt, 15, &h);
            t1 = s < t1 ? s : t1;
            t2 = l < t2 ? l : t2;
        }
        printf("%-10s %16.3f %22.3f\n", names[j], t1 * 1e9 / small, t2 * 1e3);
    }
    printf("%-10s %16s %22.3f   (a += b over the same bytes, %d threads)\n", "floor", "-",
           timed(add, cc, nadd, nt, 15, &h) * 1e3, nt);
    return 0;
}

/* float32 batch-norm loops written with AVX-512 intrinsics, with the float64
 * arithmetic of the Cython loops they stand in for (_bn_kernels.pyx: _affine_at
 * and _dx_at over rows of per-column constants (channel tiles, blocks, narrow
 * super-rows) or segments of one channel (rows schedule), and the sums of the
 * channel tiles, the narrow schedule and the rows schedule's 32 lanes), so that each
 * group of eight elements converts straight from and to memory (vcvtps2pd zmm,
 * m256 / vcvtpd2ps m256, zmm).
 *
 * Why: GCC vectorizes the Cython loops sixteen floats at a time, then splits
 * each zmm of floats into two halves of doubles and joins the results again (a
 * vextractf32x8 per load, a vinsertf64x4 per store). On Zen 4 those shuffles
 * cost about a fifth of an in-cache affine pass (a C loop over L2-resident
 * (64, 1024), one thread: 0.163 ns per element with GCC's code, 0.133 here) and
 * a tenth of the tiles' sums (0.121 -> 0.108). Side by side in the package
 * (scripts/bench_switch.py float_rows): BENCHMARKS.md, 2026-11-28 eighth session.
 *
 * The same bits: each element takes the same IEEE float64 operations on the
 * same operands, in the same order, as the Cython loop compiled with FMA
 * contraction (-ffp-contract=fast: GCC's default in its GNU dialects, which
 * -std=c99/c11 or -ffp-contract=off turn off, so setup.py passes it
 * explicitly; every AVX-512 target has FMA):
 *     y  = (float)fma(x - mean, scale, shift)
 *     dx = (float)(g * fma(-(x - mean), k, dy - a))
 *     s += x - pivot; q = fma(x - pivot, x - pivot, q)      (each channel, rows in order)
 *     sa += dy;       sb = fma(dy, x - mean, sb)
 * tests/test_batch_norm.py (test_float_rows_give_the_cython_loops_bits)
 * compares the two paths bit for bit, bncore._bn_kernels.float_rows(False)
 * turning this one off. (A product rounded apart from its add would rarely show
 * there: with float32 data x - pivot is exact and its square too, and y, dx
 * round a float64 value to float32. What that test catches is a different
 * operand, order or formula; test_float_rows_and_the_cython_loops_both_fuse_
 * the_multiply_add catches a build that does not fuse.)
 *
 * Whole rows go column chunk by column chunk (bncore_affine_rows_f32,
 * bncore_dx_rows_f32): with a chunk's constants in L1 the dx pass over float32
 * (256, 1024) took 70 us on one thread instead of 117. The four-row loops read
 * the four rows before storing any: with rows of 4 KiB and y at x's offset in
 * a page, a store and then a load one row on would alias in the store
 * buffer's address check.
 *
 * The narrow schedule (64-element super-rows) calls the one-row functions a
 * super-row at a time, in memory order: its four-row chunks (four super-rows'
 * stores interleaved within 1 KiB) made the 26 MB channels-last
 * (32,64,56,56) forward 0.75-0.81x of GCC's loop, where one at a time gains.
 *
 * The elementwise functions do elements [0, n - n % 8) (of each row) and return
 * that count; the caller does the rest with the Cython loop. Without AVX-512
 * and FMA every function does nothing (the elementwise ones return 0): a caller
 * that does not finish from the returned count (the sums, the row drivers, the
 * narrow loops) tests BNCORE_FLOAT_ROWS first (tests/test_build.py builds
 * such a copy and runs the batch-norm tests on it). */
#ifndef BNCORE_FLOAT_ROWS_H
#define BNCORE_FLOAT_ROWS_H
#include <stddef.h>

#if defined(__AVX512F__) && defined(__FMA__)
#include <immintrin.h>
#define BNCORE_FLOAT_ROWS 1

/* columns [c0, c1) (multiples of 8) of four rows `stride` apart */
static inline void bncore_affine4_cols(const float* x, float* y, ptrdiff_t stride,
                                       ptrdiff_t c0, ptrdiff_t c1, const double* mean,
                                       const double* scale, const double* shift)
{
    ptrdiff_t j, r;
    for (j = c0; j < c1; j += 8) {
        __m512d m = _mm512_loadu_pd(mean + j), s = _mm512_loadu_pd(scale + j);
        __m512d b = _mm512_loadu_pd(shift + j), v[4];
        for (r = 0; r < 4; r++)
            v[r] = _mm512_cvtps_pd(_mm256_loadu_ps(x + r * stride + j));
        for (r = 0; r < 4; r++)
            _mm256_storeu_ps(y + r * stride + j,
                             _mm512_cvtpd_ps(_mm512_fmadd_pd(_mm512_sub_pd(v[r], m), s, b)));
    }
}

static inline void bncore_dx4_cols(const float* dy, const float* x, float* dx, ptrdiff_t stride,
                                   ptrdiff_t c0, ptrdiff_t c1, const double* mean,
                                   const double* g, const double* a, const double* k)
{
    ptrdiff_t j, r;
    for (j = c0; j < c1; j += 8) {
        __m512d m = _mm512_loadu_pd(mean + j), gg = _mm512_loadu_pd(g + j);
        __m512d aa = _mm512_loadu_pd(a + j), kk = _mm512_loadu_pd(k + j), t[4], d[4];
        for (r = 0; r < 4; r++) {
            t[r] = _mm512_cvtps_pd(_mm256_loadu_ps(dy + r * stride + j));
            d[r] = _mm512_cvtps_pd(_mm256_loadu_ps(x + r * stride + j));
        }
        for (r = 0; r < 4; r++) {
            __m512d t3 = _mm512_fnmadd_pd(_mm512_sub_pd(d[r], m), kk, _mm512_sub_pd(t[r], aa));
            _mm256_storeu_ps(dx + r * stride + j, _mm512_cvtpd_ps(_mm512_mul_pd(gg, t3)));
        }
    }
}

/* one row of n elements (the channel strips' rows, a block's last rows, the
 * narrow schedule's 64-element super-rows), in two forms from one body: normal
 * stores, and non-temporal ones (_nt: y 32-byte aligned; outputs past the
 * caches, whose normal stores would first read each line they write; the
 * caller fences) */
#define BNCORE_STORE_PLAIN(p, v) _mm256_storeu_ps(p, v)
#define BNCORE_STORE_NT(p, v) _mm256_stream_ps(p, v)
#define BNCORE_AFFINE1(NAME, STORE)                                                         \
static inline ptrdiff_t NAME(const float* x, float* y, ptrdiff_t n, const double* mean,    \
                             const double* scale, const double* shift)                      \
{                                                                                           \
    ptrdiff_t j, end = n - n % 8;                                                           \
    for (j = 0; j < end; j += 8) {                                                          \
        __m512d v = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)),                 \
                                  _mm512_loadu_pd(mean + j));                               \
        v = _mm512_fmadd_pd(v, _mm512_loadu_pd(scale + j), _mm512_loadu_pd(shift + j));    \
        STORE(y + j, _mm512_cvtpd_ps(v));                                                   \
    }                                                                                       \
    return end;                                                                             \
}
BNCORE_AFFINE1(bncore_affine1_f32, BNCORE_STORE_PLAIN)
BNCORE_AFFINE1(bncore_affine1_nt_f32, BNCORE_STORE_NT)

static inline ptrdiff_t bncore_dx1_f32(const float* dy, const float* x, float* dx,
                                       ptrdiff_t n, const double* mean, const double* g,
                                       const double* a, const double* k)
{
    ptrdiff_t j, end = n - n % 8;
    for (j = 0; j < end; j += 8) {
        __m512d t = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(dy + j)),
                                  _mm512_loadu_pd(a + j));
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)),
                                  _mm512_loadu_pd(mean + j));
        t = _mm512_fnmadd_pd(d, _mm512_loadu_pd(k + j), t);
        _mm256_storeu_ps(dx + j, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_loadu_pd(g + j), t)));
    }
    return end;
}

/* one segment of n elements with scalar constants (the rows schedule: NCHW) */
static inline ptrdiff_t bncore_affine_seg_f32(const float* x, float* y, ptrdiff_t n,
                                              double mean, double scale, double shift)
{
    __m512d m = _mm512_set1_pd(mean), s = _mm512_set1_pd(scale), b = _mm512_set1_pd(shift);
    ptrdiff_t j, end = n - n % 8;
    for (j = 0; j < end; j += 8) {
        __m512d v = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), m);
        _mm256_storeu_ps(y + j, _mm512_cvtpd_ps(_mm512_fmadd_pd(v, s, b)));
    }
    return end;
}

static inline ptrdiff_t bncore_dx_seg_f32(const float* dy, const float* x, float* dx,
                                          ptrdiff_t n, double mean, double g, double a,
                                          double k)
{
    __m512d m = _mm512_set1_pd(mean), gg = _mm512_set1_pd(g);
    __m512d aa = _mm512_set1_pd(a), kk = _mm512_set1_pd(k);
    ptrdiff_t j, end = n - n % 8;
    for (j = 0; j < end; j += 8) {
        __m512d t = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(dy + j)), aa);
        __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + j)), m);
        t = _mm512_fnmadd_pd(d, kk, t);
        _mm256_storeu_ps(dx + j, _mm512_cvtpd_ps(_mm512_mul_pd(gg, t)));
    }
    return end;
}

/* `rows` whole rows of W elements: elements [0, W - W % 8) of each row,
 * column chunk by column chunk (`chunk` columns, a multiple of 8, of every
 * row, four rows at a time, before the next chunk), so that a chunk's
 * constants (24 or 32 bytes per column) stay in L1 across the rows: a whole
 * row's constants (32 KiB for dx at W = 1024) would fill it. The caller passes
 * chunk >= W out of cache, where runs of a whole row stream better (32 MiB
 * (8192, 1024): 256-column chunks 0.89-0.94x of GCC's loop, whole rows
 * 1.01-1.04x). Returns W - W % 8. */

static inline ptrdiff_t bncore_affine_rows_f32(const float* x, float* y, ptrdiff_t rows,
                                               ptrdiff_t W, ptrdiff_t chunk, const double* mean,
                                               const double* scale, const double* shift)
{
    ptrdiff_t c0, c1, r, end = W - W % 8;
    for (c0 = 0; c0 < end; c0 = c1) {
        c1 = end - c0 <= chunk ? end : c0 + chunk;
        for (r = 0; r + 4 <= rows; r += 4)
            bncore_affine4_cols(x + r * W, y + r * W, W, c0, c1, mean, scale, shift);
        for (; r < rows; r++)
            bncore_affine1_f32(x + r * W + c0, y + r * W + c0, c1 - c0, mean + c0, scale + c0,
                               shift + c0);
    }
    return end;
}

static inline ptrdiff_t bncore_dx_rows_f32(const float* dy, const float* x, float* dx,
                                           ptrdiff_t rows, ptrdiff_t W, ptrdiff_t chunk,
                                           const double* mean, const double* g,
                                           const double* a, const double* k)
{
    ptrdiff_t c0, c1, r, end = W - W % 8;
    for (c0 = 0; c0 < end; c0 = c1) {
        c1 = end - c0 <= chunk ? end : c0 + chunk;
        for (r = 0; r + 4 <= rows; r += 4)
            bncore_dx4_cols(dy + r * W, x + r * W, dx + r * W, W, c0, c1, mean, g, a, k);
        for (; r < rows; r++)
            bncore_dx1_f32(dy + r * W + c0, x + r * W + c0, dx + r * W + c0, c1 - c0,
                           mean + c0, g + c0, a + c0, k + c0);
    }
    return end;
}

/* Per-column running sums over `rows` rows `stride` floats apart, ncols (32 or
 * 64) columns each into its own sums, rows in order: the channel tiles (32
 * channels), the narrow schedule's super-rows (64) and the rows schedule's 32
 * summation lanes (each block of 32 a "row"):
 *     s += x - pivot; q = fma(x - pivot, x - pivot, q)
 *     sa += dy;       sb = fma(dy, x - mean, sb)
 * into s, q (sa, sb): with add, added to what they hold, else from 0. Each
 * call site passes a constant ncols, so the accumulators live in registers. */
static inline void bncore_col_sums_f32(const float* x, ptrdiff_t rows, ptrdiff_t stride,
                                       int ncols, const double* pivot, double* s, double* q,
                                       int add)
{
    __m512d S[8], Q[8], P[8];
    ptrdiff_t r;
    int k, nv = ncols / 8;
    for (k = 0; k < nv; k++) {
        S[k] = add ? _mm512_loadu_pd(s + 8 * k) : _mm512_setzero_pd();
        Q[k] = add ? _mm512_loadu_pd(q + 8 * k) : _mm512_setzero_pd();
        P[k] = _mm512_loadu_pd(pivot + 8 * k);
    }
    for (r = 0; r < rows; r++) {
        const float* a = x + r * stride;
        for (k = 0; k < nv; k++) {
            __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + 8 * k)), P[k]);
            S[k] = _mm512_add_pd(S[k], d);
            Q[k] = _mm512_fmadd_pd(d, d, Q[k]);
        }
    }
    for (k = 0; k < nv; k++) {
        _mm512_storeu_pd(s + 8 * k, S[k]);
        _mm512_storeu_pd(q + 8 * k, Q[k]);
    }
}

static inline void bncore_col_dy_sums_f32(const float* dy, const float* x, ptrdiff_t rows,
                                          ptrdiff_t stride, int ncols, const double* mean,
                                          double* sa, double* sb, int add)
{
    __m512d A[8], B[8], M[8];
    ptrdiff_t r;
    int k, nv = ncols / 8;
    for (k = 0; k < nv; k++) {
        A[k] = add ? _mm512_loadu_pd(sa + 8 * k) : _mm512_setzero_pd();
        B[k] = add ? _mm512_loadu_pd(sb + 8 * k) : _mm512_setzero_pd();
        M[k] = _mm512_loadu_pd(mean + 8 * k);
    }
    for (r = 0; r < rows; r++) {
        const float* g = dy + r * stride;
        const float* a = x + r * stride;
        for (k = 0; k < nv; k++) {
            __m512d gg = _mm512_cvtps_pd(_mm256_loadu_ps(g + 8 * k));
            __m512d d = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + 8 * k)), M[k]);
            A[k] = _mm512_add_pd(A[k], gg);
            B[k] = _mm512_fmadd_pd(gg, d, B[k]);
        }
    }
    for (k = 0; k < nv; k++) {
        _mm512_storeu_pd(sa + 8 * k, A[k]);
        _mm512_storeu_pd(sb + 8 * k, B[k]);
    }
}

#else
#define BNCORE_FLOAT_ROWS 0

static inline ptrdiff_t bncore_affine1_nt_f32(const float* x, float* y, ptrdiff_t n,
                                              const double* mean, const double* scale,
                                              const double* shift)
{
    (void)x; (void)y; (void)n; (void)mean; (void)scale; (void)shift;
    return 0;
}
static inline ptrdiff_t bncore_affine1_f32(const float* x, float* y, ptrdiff_t n,
                                           const double* mean, const double* scale,
                                           const double* shift)
{
    (void)x; (void)y; (void)n; (void)mean; (void)scale; (void)shift;
    return 0;
}

static inline ptrdiff_t bncore_dx1_f32(const float* dy, const float* x, float* dx,
                                       ptrdiff_t n, const double* mean, const double* g,
                                       const double* a, const double* k)
{
    (void)dy; (void)x; (void)dx; (void)n; (void)mean; (void)g; (void)a; (void)k;
    return 0;
}

static inline ptrdiff_t bncore_affine_rows_f32(const float* x, float* y, ptrdiff_t rows,
                                               ptrdiff_t W, ptrdiff_t chunk, const double* mean,
                                               const double* scale, const double* shift)
{
    (void)x; (void)y; (void)rows; (void)W; (void)chunk; (void)mean; (void)scale; (void)shift;
    return 0;
}

static inline ptrdiff_t bncore_dx_rows_f32(const float* dy, const float* x, float* dx,
                                           ptrdiff_t rows, ptrdiff_t W, ptrdiff_t chunk,
                                           const double* mean, const double* g,
                                           const double* a, const double* k)
{
    (void)dy; (void)x; (void)dx; (void)rows; (void)W; (void)chunk; (void)mean; (void)g;
    (void)a; (void)k;
    return 0;
}
static inline ptrdiff_t bncore_affine_seg_f32(const float* x, float* y, ptrdiff_t n,
                                              double mean, double scale, double shift)
{
    (void)x; (void)y; (void)n; (void)mean; (void)scale; (void)shift;
    return 0;
}

static inline ptrdiff_t bncore_dx_seg_f32(const float* dy, const float* x, float* dx,
                                          ptrdiff_t n, double mean, double g, double a,
                                          double k)
{
    (void)dy; (void)x; (void)dx; (void)n; (void)mean; (void)g; (void)a; (void)k;
    return 0;
}
static inline void bncore_col_sums_f32(const float* x, ptrdiff_t rows, ptrdiff_t stride,
                                       int ncols, const double* pivot, double* s, double* q,
                                       int add)
{
    (void)x; (void)rows; (void)stride; (void)ncols; (void)pivot; (void)s; (void)q; (void)add;
}

static inline void bncore_col_dy_sums_f32(const float* dy, const float* x, ptrdiff_t rows,
                                          ptrdiff_t stride, int ncols, const double* mean,
                                          double* sa, double* sb, int add)
{
    (void)dy; (void)x; (void)rows; (void)stride; (void)ncols; (void)mean; (void)sa; (void)sb;
    (void)add;
}
#endif
#endif

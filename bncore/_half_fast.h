/* float16 batch-norm elementwise passes through float32 arithmetic, where that
 * provably gives the float64 path's bits.
 *
 * The float64 path computes y = (x - mean) * scale + shift (dx = g * ((dy - a)
 * - (x - mean) * k)) in float64 and rounds the result y64 once to binary16
 * (bncore/_bn_kernels.pyx, _half.h). Here sixteen elements at a time are
 * computed in float32 (p), with a bound E on |p - y64| from the operations'
 * rounding errors (below). Where |p| is a normal binary16 magnitude and E is
 * less than the distance from p to the nearest binary16 rounding boundary,
 * y64 lies in p's rounding interval, so it rounds to what p rounds to, which
 * is stored. A chunk where some lane is not so decided (p near a boundary, a
 * cancellation that makes E large, a binary16 subnormal, overflow, NaN) is
 * reported, and the caller computes the chunk the float64 way, overwriting
 * it: every element is then the float64 path's, bit for bit, by construction
 * (tests/test_half_fast.py checks it too).
 *
 * The bound. With u = 2^-24 and float32 copies m, s, b of mean, scale, shift
 * (each within u of the float64 value, relative), d = fl(x - m) is within
 * u (|mean| + |d|) (1 + 2u) of x - mean, and p = fl(fma(d, s, b)) within
 * u |p| (1 + u) of d s + b, so
 *     |p - y| <= u (1 + 2u) (|p| + 2 |s| |d| + |s| |mean| + |b|),
 * y the exact value; y64 is within a few 2^-53 of the same terms. The code
 * takes E = 2^-22 (|p| + |s| (|d| + |m|) + |b|) + 2^-100: 4u, at least twice
 * the largest coefficient above (2u), which also covers computing E itself
 * in float32. The 2^-100 covers flush-to-zero of results below 2^-126 (FTZ);
 * a constant whose float32 copy is subnormal (which DAZ would read as 0) or
 * not finite sends the whole run to the caller. (d cannot be subnormal: x is
 * a multiple of 2^-24 and m is 0 or normal; a subnormal p is undecided.)
 * For dx, with t1 = fl(dy - a), t3 = fl(fma(-d, k, t1)), p = fl(t3 g):
 *     |t3 - T| <= u (|t3| + |t1| + |a| + |k| (2 |d| + |m|)),
 * T = (dy - a) - (x - mean) k exact, and |p - y| <= u |p| + u |g| (2 |t3| +
 * |t1| + |a| + |k| (2 |d| + |m|)) to first order, so again 4u times the
 * terms with coefficient 1, E = 2^-22 (|p| + |g| (|t3| + |t1| + |a| + |k|
 * (|d| + |m|))) + 2^-100 + |g| 2^-148, is at least twice it. The last term
 * is t3's error where t3 is a float32 subnormal (absolute, up to 2^-150, not
 * u |t3|), which g (up to 2^128) can scale into the float16 range; without
 * it, k near 2^-126 and g near 2^126 gave decided chunks 1 float16 ulp off
 * (found in review; tests/test_half_fast.py keeps the case).
 *
 * Only where the build targets AVX-512 (F, VL, BW) and F16C; elsewhere
 * BNCORE_HALF_FAST is 0 and the caller stages every chunk through float64. */
#ifndef BNCORE_HALF_FAST_H
#define BNCORE_HALF_FAST_H
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__F16C__)
#include <immintrin.h>
#define BNCORE_HALF_FAST 1

/* v's float32 copy: 0 for 0, else normal and finite (not subnormal: DAZ) */
static inline int bncore_half_fast_const(double v) {
    float f = __builtin_fabsf((float)v);
    return f == 0.0f ? v == 0.0 : (f >= 0x1p-126f && f <= 0x1.fffffep127f);
}

/* 1 where every real within e of p rounds to binary16 as p does: |p| in the
 * normal binary16 range [2^-14, 65504], and e below both the distance from
 * |p| to the one rounding boundary inside its binary16 interval (the
 * midpoint m of the interval [v0, v0 + 2^13 float32 ulps] that truncating
 * |p| to binary16 precision gives: |p| - m is exact) and |p| 2^-13 (under
 * 2^11 ulps, nearer than the boundaries of the neighbouring intervals,
 * 2^11 ulps below v0 where v0 starts a binade). */
static inline __mmask16 bncore_half_decided(__m512 p, __m512 e) {
    const __m512i trunc = _mm512_set1_epi32(~0x1fff), half = _mm512_set1_epi32(0x1000);
    __m512 ap = _mm512_abs_ps(p);
    __m512 mid = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_and_si512(_mm512_castps_si512(ap), trunc), half));
    __m512 dist = _mm512_abs_ps(_mm512_sub_ps(ap, mid));
    return _mm512_cmp_ps_mask(e, dist, _CMP_LT_OQ)
         & _mm512_cmp_ps_mask(e, _mm512_mul_ps(ap, _mm512_set1_ps(0x1p-13f)), _CMP_LT_OQ)
         & _mm512_cmp_ps_mask(ap, _mm512_set1_ps(0x1p-14f), _CMP_GE_OQ)
         & _mm512_cmp_ps_mask(ap, _mm512_set1_ps(65504.0f), _CMP_LE_OQ);
}

/* The lanes of a chunk of 16 from element i of n: all but in the last. */
static inline __mmask16 bncore_half_lanes(ptrdiff_t i, ptrdiff_t n) {
    return n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
}

/* 16 halves from p as floats: a plain load for a whole chunk (masked loads
 * and stores cost more), a masked one for a short last chunk */
static inline __m512 bncore_half_load16(const uint16_t* p, __mmask16 lanes) {
    return _mm512_cvtph_ps(lanes == 0xffff ? _mm256_loadu_si256((const __m256i*)p)
                                           : _mm256_maskz_loadu_epi16(lanes, p));
}

static inline void bncore_half_store16(uint16_t* p, __mmask16 lanes, __m512 v) {
    __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    if (lanes == 0xffff)
        _mm256_storeu_si256((__m256i*)p, h);
    else
        _mm256_mask_storeu_epi16(p, lanes, h);
}

/* y = (x - mean) * scale + shift rounded to binary16, for the first n <= 512
 * elements in chunks of 16 (the last may be short: masked loads and stores,
 * nothing read or written past n); returns a bit per chunk (bit i: elements
 * 16 i ... 16 i + 15), set where the chunk is not decided
 * (y there holds a value the caller must overwrite), all set where a
 * constant cannot take this path. y must not overlap x: the caller's
 * fallback reads x again after these stores (the Python layer refuses
 * overlapping outputs). */
static inline uint32_t bncore_half_affine_run(const uint16_t* x, uint16_t* y, ptrdiff_t n,
                                              double mean, double scale, double shift) {
    if (!(bncore_half_fast_const(mean) && bncore_half_fast_const(scale)
          && bncore_half_fast_const(shift)))
        return 0xffffffffu;
    float m = (float)mean, s = (float)scale, b = (float)shift;
    const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
    const __m512 as = _mm512_set1_ps(__builtin_fabsf(s));
    const __m512 rest = _mm512_set1_ps(__builtin_fabsf(s) * __builtin_fabsf(m)
                                       + __builtin_fabsf(b));
    const __m512 c = _mm512_set1_ps(0x1p-22f), tiny = _mm512_set1_ps(0x1p-100f);
    uint32_t undecided = 0;
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 lanes = bncore_half_lanes(i, n);
        __m512 xv = bncore_half_load16(x + i, lanes);
        __m512 d = _mm512_sub_ps(xv, vm);
        __m512 p = _mm512_fmadd_ps(d, vs, vb);
        __m512 t = _mm512_fmadd_ps(_mm512_abs_ps(d), as, rest);    /* |s||d| + |s||m| + |b| */
        __m512 e = _mm512_fmadd_ps(_mm512_add_ps(_mm512_abs_ps(p), t), c, tiny);
        bncore_half_store16(y + i, lanes, p);
        undecided |= (uint32_t)((bncore_half_decided(p, e) | (__mmask16)~lanes) != 0xffff)
                     << (i / 16);
    }
    return undecided;
}

/* dx = g * ((dy - a) - (x - mean) * k) rounded to binary16, chunk by chunk
 * as bncore_half_affine_run. */
static inline uint32_t bncore_half_dx_run(const uint16_t* dy, const uint16_t* x, uint16_t* dx,
                                          ptrdiff_t n, double mean, double g, double a,
                                          double k) {
    if (!(bncore_half_fast_const(mean) && bncore_half_fast_const(g)
          && bncore_half_fast_const(a) && bncore_half_fast_const(k)))
        return 0xffffffffu;
    float m = (float)mean, gf = (float)g, af = (float)a, kf = (float)k;
    const __m512 vm = _mm512_set1_ps(m), vg = _mm512_set1_ps(gf), va = _mm512_set1_ps(af);
    const __m512 vk = _mm512_set1_ps(kf);
    const __m512 ag = _mm512_set1_ps(__builtin_fabsf(gf)), ak = _mm512_set1_ps(__builtin_fabsf(kf));
    const __m512 am = _mm512_set1_ps(__builtin_fabsf(m)), aa = _mm512_set1_ps(__builtin_fabsf(af));
    const __m512 c = _mm512_set1_ps(0x1p-22f);
    /* in double: |g| 2^-148 alone would be a float32 subnormal (or flushed) */
    const __m512 tiny = _mm512_set1_ps((float)(0x1p-100 + __builtin_fabs((double)gf) * 0x1p-148));
    uint32_t undecided = 0;
    for (ptrdiff_t i = 0; i < n; i += 16) {
        __mmask16 lanes = bncore_half_lanes(i, n);
        __m512 dv = bncore_half_load16(dy + i, lanes);
        __m512 xv = bncore_half_load16(x + i, lanes);
        __m512 t1 = _mm512_sub_ps(dv, va);
        __m512 d = _mm512_sub_ps(xv, vm);
        __m512 t3 = _mm512_fnmadd_ps(d, vk, t1);
        __m512 p = _mm512_mul_ps(t3, vg);
        /* |g| (|t3| + |t1| + |a| + |k| (|d| + |m|)) */
        __m512 t = _mm512_fmadd_ps(ak, _mm512_add_ps(_mm512_abs_ps(d), am),
                                   _mm512_add_ps(_mm512_add_ps(_mm512_abs_ps(t3),
                                                               _mm512_abs_ps(t1)), aa));
        __m512 e = _mm512_fmadd_ps(_mm512_fmadd_ps(t, ag, _mm512_abs_ps(p)), c, tiny);
        bncore_half_store16(dx + i, lanes, p);
        undecided |= (uint32_t)((bncore_half_decided(p, e) | (__mmask16)~lanes) != 0xffff)
                     << (i / 16);
    }
    return undecided;
}

#else
#define BNCORE_HALF_FAST 0
/* never called (the caller tests BNCORE_HALF_FAST): every chunk undecided */
static inline uint32_t bncore_half_affine_run(const uint16_t* x, uint16_t* y, ptrdiff_t n,
                                              double mean, double scale, double shift) {
    (void)x; (void)y; (void)n; (void)mean; (void)scale; (void)shift;
    return 0xffffffffu;
}
static inline uint32_t bncore_half_dx_run(const uint16_t* dy, const uint16_t* x, uint16_t* dx,
                                          ptrdiff_t n, double mean, double g, double a,
                                          double k) {
    (void)dy; (void)x; (void)dx; (void)n; (void)mean; (void)g; (void)a; (void)k;
    return 0xffffffffu;
}
#endif
#endif

/* IEEE binary16 loads and stores for the optimizer and batch-norm kernels.
 *
 * Element by element, both directions are branch-free bit-level code, the
 * same on every compiler and machine, written so that loops over them
 * vectorize; whole runs (the _n functions at the end) use the hardware's
 * conversions where the build targets them. Every path gives the same bits. */
#ifndef BNCORE_HALF_H
#define BNCORE_HALF_H
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* binary16 -> double, exact, branch-free so loops over it vectorize (32-bit
 * lanes): normal numbers, Inf and NaN get float bits directly (exponent
 * rebiased by 127 - 15, or all ones), zero and subnormals are m * 2^-24 (a
 * normal float: no subnormal float arises, so DAZ/FTZ settings cannot
 * matter); then float -> double, which also quiets a signaling NaN as a
 * hardware half conversion does.
 * Checked against the compiler's own (double)(_Float16) on all 65536 inputs,
 * bit for bit. Not a cast: GCC 12 compiles (double)(_Float16) (and
 * (double)(float)(_Float16), which it folds into it) to a call of libgcc's
 * soft-float __extendhfdf2 per element, about 10-20x slower than this. */
static inline double bncore_half_to_double(uint16_t value) {
    /* selections by masks, not ?: so that loops with other work in them
     * (the batch-norm sums) vectorize too, not only the plain optimizer loops */
    uint32_t h = value;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu, sign = (h & 0x8000u) << 16;
    uint32_t inf = 0u - (uint32_t)(e == 0x1fu), zero = 0u - (uint32_t)(e == 0u);
    uint32_t bits = sign | ((((e + 112u) & ~inf) | (0xffu & inf)) << 23) | (m << 13);
    float sub = (float)m * 0x1p-24f, f;
    uint32_t sbits;
    memcpy(&sbits, &sub, 4);
    sbits |= sign;                    /* m * 2^-24 >= 0: the sign is one bit */
    bits = (bits & ~zero) | (sbits & zero);
    memcpy(&f, &bits, 4);
    return (double)f;
}

static inline double bncore_half_load(const uint16_t* p) {
    return bncore_half_to_double(*p);
}

/* double -> binary16, rounded once to nearest even, branch-free so loops
 * over it vectorize (a _Float16 cast does not: without AVX512-FP16 GCC has no
 * vector type for it). First double -> float rounded to odd (truncated, the
 * last bit set when inexact): with 13 more bits than binary16, the float then
 * rounds to binary16 as the double itself would (round-to-odd is exact for a
 * later rounding to 2+ fewer bits). A plain (float) first could round twice:
 * 1 + 2^-11 + 2^-40 became the tie 1 + 2^-11, then 1 instead of 1 + 2^-10.
 * Then float -> half: NaN quiet with its top 9 payload bits, overflow to Inf,
 * subnormal halves rounded by a float add at 2^-24; checked against the
 * compiler's (_Float16)(float) on all 2^32 floats, bit for bit, and the whole
 * against NumPy's float64 -> float16 (tests/test_half.py). */
static inline uint16_t bncore_half_from_double(double v) {
    float f = (float)v, mag, sum;
    double back = (double)f, av = fabs(v), ab = fabs(back);
    uint32_t x, sb;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    /* to odd: one float ulp toward zero where (float) rounded away, then the
     * sticky bit where it was inexact (a NaN gains it too, below its payload's
     * top 9 bits: still the same NaN) */
    ax -= (uint32_t)(ab > av);
    ax |= (uint32_t)(ab != av);
    uint32_t nan = 0x7e00u | ((ax >> 13) & 0x1ffu);
    memcpy(&mag, &ax, 4);
    sum = mag + 0.5f;
    memcpy(&sb, &sum, 4);
    uint32_t sub = sb - 0x3f000000u;
    uint32_t nrm = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
    /* NaN, overflow to Inf, subnormal half, normal half: selected by masks
     * (not ?:), so that loops with other work in them vectorize too */
    uint32_t is_nan = 0u - (uint32_t)(ax > 0x7f800000u);
    uint32_t is_big = 0u - (uint32_t)(ax >= 0x47800000u);
    uint32_t is_sub = 0u - (uint32_t)(ax < 0x38800000u);
    uint32_t h = (sub & is_sub) | (nrm & ~is_sub);
    h = (0x7c00u & is_big) | (h & ~is_big);
    h = (nan & is_nan) | (h & ~is_nan);
    return (uint16_t)(h | sign);
}

static inline void bncore_half_store(uint16_t* p, double v) {
    *p = bncore_half_from_double(v);
}

/* Whole runs: n halves to doubles (or floats), n doubles to halves, the same
 * bits as the element functions above. GCC (12) vectorizes no _Float16 conversion without
 * AVX512-FP16, and the bit-level code above costs about 0.5 ns per element
 * each way; these use the hardware's conversions where the build targets
 * them (-march=native): F16C's vcvtph2ps for the loads (exact; an sNaN is
 * quieted as above), and for the stores AVX-512's float64 -> float32
 * conversion with embedded round-toward-zero, the sticky bit set where it was
 * inexact (round to odd, as above; with AVX2 only, the element function's
 * steps on four lanes), then vcvtps2ph rounding to nearest even (the
 * immediate, not MXCSR, picks the mode). No subnormal float arises
 * except from doubles far below binary16's range, which round to +-0 with or
 * without FTZ/DAZ. Other targets, and the tails, take the element functions.
 * The batch-norm kernels stage float16 work items through these
 * (bncore/_bn_kernels.pyx). */
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define BNCORE_HALF_SIMD_LOAD 1
#else
#define BNCORE_HALF_SIMD_LOAD 0
#endif
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__F16C__)
#define BNCORE_HALF_SIMD_STORE 2
#elif defined(__AVX2__) && defined(__F16C__)
#define BNCORE_HALF_SIMD_STORE 1
#else
#define BNCORE_HALF_SIMD_STORE 0
#endif

#if BNCORE_HALF_SIMD_STORE == 1
/* Four doubles to floats rounded to odd, as bncore_half_from_double does it
 * element by element: (float) (nearest), one float ulp toward zero where that
 * rounded away, the sticky bit where it was inexact. The comparisons give
 * 64-bit masks; their low halves are packed to 32-bit lanes. */
static inline __m128i bncore_odd4(__m256d v) {
    const __m256d mag = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
    __m128 f = _mm256_cvtpd_ps(v);
    __m256d back = _mm256_cvtps_pd(f);
    __m256 away = _mm256_castpd_ps(_mm256_cmp_pd(_mm256_and_pd(back, mag),
                                                 _mm256_and_pd(v, mag), _CMP_GT_OQ));
    __m256 inexact = _mm256_castpd_ps(_mm256_cmp_pd(back, v, _CMP_NEQ_UQ));
    __m128i a = _mm_castps_si128(_mm_shuffle_ps(_mm256_castps256_ps128(away),
                                                _mm256_extractf128_ps(away, 1),
                                                _MM_SHUFFLE(2, 0, 2, 0)));
    __m128i s = _mm_castps_si128(_mm_shuffle_ps(_mm256_castps256_ps128(inexact),
                                                _mm256_extractf128_ps(inexact, 1),
                                                _MM_SHUFFLE(2, 0, 2, 0)));
    __m128i b = _mm_add_epi32(_mm_castps_si128(f), a);          /* a is 0 or -1 */
    return _mm_or_si128(b, _mm_srli_epi32(s, 31));
}
#endif

static inline void bncore_half_to_double_n(const uint16_t* src, double* dst, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if BNCORE_HALF_SIMD_LOAD
    for (; i + 8 <= n; i += 8) {
        __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i)));
        _mm256_storeu_pd(dst + i, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
        _mm256_storeu_pd(dst + i + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
#endif
    for (; i < n; i++)
        dst[i] = bncore_half_to_double(src[i]);
}

static inline void bncore_half_to_float_n(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if BNCORE_HALF_SIMD_LOAD
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
#endif
    for (; i < n; i++)
        dst[i] = (float)bncore_half_to_double(src[i]);   /* exact: a half is a float */
}

static inline void bncore_half_from_double_n(const double* src, uint16_t* dst, ptrdiff_t n) {
    ptrdiff_t i = 0;
#if BNCORE_HALF_SIMD_STORE == 1
    for (; i + 8 <= n; i += 8) {
        __m256i b = _mm256_set_m128i(bncore_odd4(_mm256_loadu_pd(src + i + 4)),
                                     bncore_odd4(_mm256_loadu_pd(src + i)));
        _mm_storeu_si128((__m128i*)(dst + i),
                         _mm256_cvtps_ph(_mm256_castsi256_ps(b), _MM_FROUND_TO_NEAREST_INT));
    }
#elif BNCORE_HALF_SIMD_STORE == 2
    const __m256i one = _mm256_set1_epi32(1);
    for (; i + 8 <= n; i += 8) {
        __m512d v = _mm512_loadu_pd(src + i);
        __m256 f = _mm512_cvt_roundpd_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        __mmask8 inexact = _mm512_cmp_pd_mask(_mm512_cvtps_pd(f), v, _CMP_NEQ_UQ);
        __m256i b = _mm256_castps_si256(f);
        b = _mm256_mask_or_epi32(b, inexact, b, one);
        _mm_storeu_si128((__m128i*)(dst + i),
                         _mm256_cvtps_ph(_mm256_castsi256_ps(b), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; i++)
        dst[i] = bncore_half_from_double(src[i]);
}
#endif

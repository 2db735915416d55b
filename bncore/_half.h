/* IEEE binary16 loads and stores for the multi-tensor kernels.
 *
 * Both directions are branch-free bit-level code, the same on every compiler
 * and machine, written so that loops over them vectorize. */
#ifndef BNCORE_HALF_H
#define BNCORE_HALF_H
#include <math.h>
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
#endif

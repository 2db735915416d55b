/* IEEE binary16 loads and stores for the multi-tensor kernels.
 *
 * Where the compiler has a native _Float16 (GCC >= 12 and clang >= 15 on
 * x86-64 and aarch64), conversions are plain casts, which vectorize to
 * vcvtph2ps / vcvtps2ph with F16C. Otherwise a portable bit-level version
 * (round to nearest even, NaN and Inf preserved) is used. */
#ifndef BNCORE_HALF_H
#define BNCORE_HALF_H
#include <stdint.h>
#include <string.h>

#if defined(__FLT16_MANT_DIG__) && (defined(__x86_64__) || defined(__aarch64__))
#define BNCORE_NATIVE_HALF 1
static inline double bncore_half_load(const uint16_t* p) {
    return (double)(*(const _Float16*)p);
}
static inline void bncore_half_store(uint16_t* p, double v) {
    /* via float: float -> half rounding is correct, and double -> float
     * first can only double-round at exact half-way cases of binary16,
     * which a double reaching here from float32-level arithmetic is not */
    *(_Float16*)p = (_Float16)(float)v;
}
#else
#define BNCORE_NATIVE_HALF 0
static inline double bncore_half_load(const uint16_t* p) {
    uint16_t h = *p;
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    float f;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, 4);
    return (double)f;
}
static inline void bncore_half_store(uint16_t* p, double v) {
    float f = (float)v;
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7fffffffu;
    uint16_t h;
    if (ax >= 0x7f800000u) {                       /* Inf or NaN */
        h = (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    } else if (ax >= 0x477ff000u) {                /* rounds to >= 65520: overflow */
        h = (uint16_t)(sign | 0x7c00u);
    } else if (ax < 0x38800000u) {                 /* subnormal half or zero */
        if (ax < 0x33000000u) {
            h = (uint16_t)sign;
        } else {
            uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
            uint32_t shift = 126 - e, r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
            if (rem > half || (rem == half && (r & 1u))) r++;
            h = (uint16_t)(sign | r);
        }
    } else {
        uint32_t r = ((ax >> 13) - (112u << 10)), rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
        h = (uint16_t)(sign | r);
    }
    *p = h;
}
#endif
#endif

/* The fixed pairwise tree over the 32 summation lanes of the rows schedule
 * (_bn_kernels.pyx, _lane_total):
 *     acc[k] += acc[k + 16] (k < 16); acc[k] += acc[k + 8] (k < 8);
 *     acc[k] += acc[k + 4] (k < 4); total = (acc[0] + acc[2]) + (acc[1] + acc[3])
 * written with GCC vector adds, so the lanes stay in registers. Each add is
 * the same IEEE float64 addition of the same two operands as the scalar
 * tree (the fallback below), so the value is the same bit for bit. */
#ifndef BNCORE_LANES_H
#define BNCORE_LANES_H
#include <string.h>
#if defined(__GNUC__)
typedef double bncore_v8d __attribute__((vector_size(64)));
typedef double bncore_v4d __attribute__((vector_size(32)));
typedef double bncore_v2d __attribute__((vector_size(16)));
static inline double bncore_lane_total32(const double* acc)
{
    bncore_v8d a0, a1, a2, a3, b0, b1, c;
    bncore_v4d lo, hi, d;
    bncore_v2d e0, e1, f;
    memcpy(&a0, acc, 64); memcpy(&a1, acc + 8, 64);
    memcpy(&a2, acc + 16, 64); memcpy(&a3, acc + 24, 64);
    b0 = a0 + a2;                 /* acc[k] + acc[k + 16], k < 8  */
    b1 = a1 + a3;                 /*                       8 <= k < 16 */
    c = b0 + b1;                  /* acc[k] + acc[k + 8], k < 8 */
#if (defined(__GNUC__) && __GNUC__ >= 12) || defined(__clang__)
    /* halves by register shuffles (a memcpy went through the stack) */
    lo = __builtin_shufflevector(c, c, 0, 1, 2, 3);
    hi = __builtin_shufflevector(c, c, 4, 5, 6, 7);
    d = lo + hi;                  /* acc[k] + acc[k + 4], k < 4 */
    e0 = __builtin_shufflevector(d, d, 0, 1);
    e1 = __builtin_shufflevector(d, d, 2, 3);
#else
    memcpy(&lo, &c, 32); memcpy(&hi, (const char*)&c + 32, 32);
    d = lo + hi;                  /* acc[k] + acc[k + 4], k < 4 */
    e0 = (bncore_v2d){d[0], d[1]};
    e1 = (bncore_v2d){d[2], d[3]};
#endif
    f = e0 + e1;                  /* (acc0 + acc2), (acc1 + acc3) */
    return f[0] + f[1];
}
#else
static inline double bncore_lane_total32(const double* acc0)
{
    double acc[32];
    int k;
    memcpy(acc, acc0, sizeof acc);
    for (k = 0; k < 16; k++) acc[k] = acc[k] + acc[k + 16];
    for (k = 0; k < 8; k++) acc[k] = acc[k] + acc[k + 8];
    for (k = 0; k < 4; k++) acc[k] = acc[k] + acc[k + 4];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}
#endif
#endif

/* Non-temporal ("streaming") stores for batch-norm outputs larger than the
 * caches. A normal store first reads the destination line into the cache
 * (read for ownership); an output that will not fit in the caches anyway
 * gains nothing from that read, which is a third of an elementwise pass's
 * memory traffic. Only where the stores go changes, never a value. Used
 * for dx in the backward pass (see STREAM_MIN_BYTES in _bn_kernels.pyx).
 * x86 with SSE2 streams 16 bytes at a time (any 16-byte-aligned address,
 * which NumPy's allocations are); other targets store normally. */
#ifndef BNCORE_STREAM_H
#define BNCORE_STREAM_H
#include <stddef.h>
#include <stdint.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#define BNCORE_HAVE_STREAM 1
#else
#define BNCORE_HAVE_STREAM 0
#endif

static inline void bncore_stream_f32(float* dst, const float* src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if BNCORE_HAVE_STREAM
    for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)
        dst[i] = src[i];
    for (; i + 4 <= n; i += 4)
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
#endif
    for (; i < n; i++)
        dst[i] = src[i];
}

static inline void bncore_stream_f64(double* dst, const double* src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if BNCORE_HAVE_STREAM
    for (; i < n && ((uintptr_t)(dst + i) & 15) != 0; i++)
        dst[i] = src[i];
    for (; i + 2 <= n; i += 2)
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
#endif
    for (; i < n; i++)
        dst[i] = src[i];
}

/* Streaming stores are weakly ordered: each thread fences its own before
 * the parallel region ends. */
static inline void bncore_stream_fence(void)
{
#if BNCORE_HAVE_STREAM
    _mm_sfence();
#endif
}
#endif

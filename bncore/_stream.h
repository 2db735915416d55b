/* Non-temporal ("streaming") stores for batch-norm outputs larger than the
 * caches. A normal store first reads the destination line into the cache
 * (read for ownership); an output that will not fit in the caches anyway
 * gains nothing from that read, which is a third of an elementwise pass's
 * memory traffic. Only where the stores go changes, never a value. Used
 * for dx in the backward pass (see STREAM_MIN_BYTES in _bn_kernels.pyx).
 * Built where the compiler defines __SSE2__ (GCC and Clang on x86-64); other
 * targets, and MSVC, which does not define it, store normally: same values. */
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

/* Only whole 64-byte lines are streamed; the partial lines at either end are
 * stored normally, so no cache line ever receives both kinds of store (a
 * neighbouring work item may write the rest of an edge line). */
#define BNCORE_LINE 64

static inline void bncore_stream_f32(float* dst, const float* src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if BNCORE_HAVE_STREAM
    for (; i < n && ((uintptr_t)(dst + i) % BNCORE_LINE) != 0; i++)
        dst[i] = src[i];
    for (; i + 16 <= n; i += 16) {
        _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
        _mm_stream_ps(dst + i + 4, _mm_loadu_ps(src + i + 4));
        _mm_stream_ps(dst + i + 8, _mm_loadu_ps(src + i + 8));
        _mm_stream_ps(dst + i + 12, _mm_loadu_ps(src + i + 12));
    }
#endif
    for (; i < n; i++)
        dst[i] = src[i];
}

static inline void bncore_stream_f64(double* dst, const double* src, ptrdiff_t n)
{
    ptrdiff_t i = 0;
#if BNCORE_HAVE_STREAM
    for (; i < n && ((uintptr_t)(dst + i) % BNCORE_LINE) != 0; i++)
        dst[i] = src[i];
    for (; i + 8 <= n; i += 8) {
        _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
        _mm_stream_pd(dst + i + 2, _mm_loadu_pd(src + i + 2));
        _mm_stream_pd(dst + i + 4, _mm_loadu_pd(src + i + 4));
        _mm_stream_pd(dst + i + 6, _mm_loadu_pd(src + i + 6));
    }
#endif
    for (; i < n; i++)
        dst[i] = src[i];
}

/* Streaming stores are weakly ordered: each thread fences its own once,
 * before the parallel region ends. */
static inline void bncore_stream_fence(void)
{
#if BNCORE_HAVE_STREAM
    _mm_sfence();
#endif
}
#endif

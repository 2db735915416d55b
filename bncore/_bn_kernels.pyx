# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Batch-normalization kernels for the CPU (float16, float32 and float64 storage,
one source; float16 read and written through _half.h, arithmetic in float64).

Every array is seen as a C-contiguous (outer, C, inner) block, C being the
channel axis; bncore/batch_norm.py arranges that view (and any copy it needs).
Two schedules cover all shapes:

* *rows* (inner >= ROWS_MIN_INNER, e.g. NCHW): a work item is a contiguous
  segment of one channel's row: (o, c, k), the k-th chunk of at most SEG_LEN
  elements of row (o, c). Channel constants are scalars in the inner loop.
* *blocks* (short inner, e.g. channels-last where inner == 1): a work item is
  a block of whole outer rows. Rows are grouped into "super-rows" of R0 rows,
  W = R0 * C * inner elements long (W >= SUPER_MIN), and every inner loop runs
  flat over a super-row against per-element copies of the channel constants
  ("expanded" arrays of length W). Without that, a loop per outer row of 64
  channels spends more time on loop set-up than on data.

Reductions write one partial per (work item, channel) into a buffer indexed
by the item and combine them per channel in item order; which thread ran an
item never matters, so results are bitwise identical for every thread count.
Small channels-last inputs may run forward-train or backward in *channel
strips* instead (one parallel region; see "channel strips" below): the same
partials combined in the same order, so the same bits (a NaN's sign and
payload aside, which no path promises: README, Numerics).
Per-item statistics are one pass in float64 over sums shifted by a pivot
taken from the item's own data (S1 = sum(x - P), S2 = sum((x - P)^2), then
M2 = S2 - S1^2 / n). Since S2 = M2 + n (P - mean)^2, the subtraction costs
a factor S2 / M2 on the rounding errors of the sums; a partial is kept only
when S2 <= 16 M2 (P within 3.9 std of the item's mean, as a sample of the
item's own data nearly always is), so its error is at most 16 times that of
the sums, and otherwise (an outlier as pivot) the item's sums are taken
again against the mean the first pass found, where S2 ~ M2. Partials are combined with the exact two-level
formula, all in float64: a channel whose mean is 1e5 times its standard
deviation loses nothing to cancellation.

The kernels check no argument: the Python layer (bncore/batch_norm.py,
bncore/_bn_args.py) has validated shapes, dtypes, contiguity and aliasing.
The one exception is the fast paths at the end of this file, which accept
only plain calls (a subset of what _bn_args.py accepts unchanged; their rules
mirror it, and tests/test_batch_norm_fast_path.py holds the two together).
"""
cimport numpy as cnp
from cpython.ref cimport Py_INCREF
import numpy as np
from cython.parallel cimport parallel, prange
from libc.float cimport DBL_MIN, FLT_MAX, FLT_MIN
from libc.math cimport INFINITY, fabs, sqrt
from libc.stdint cimport uint16_t, uint32_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy
from bncore._openmp_helpers cimport omp_get_thread_num


cdef extern from "_lanes.h" nogil:
    double bncore_lane_total32(const double* acc)

cdef extern from "_half.h" nogil:
    double bncore_half_to_double(uint16_t value)
    uint16_t bncore_half_from_double(double v)
    void bncore_half_to_double_n(const uint16_t* src, double* dst, Py_ssize_t n)
    void bncore_half_from_double_n(const double* src, uint16_t* dst, Py_ssize_t n)

cdef extern from "_half_fast.h" nogil:
    enum: BNCORE_HALF_FAST
    uint32_t bncore_half_affine_run(const uint16_t* x, uint16_t* y, Py_ssize_t n,
                                    double mean, double scale, double shift)
    uint32_t bncore_half_dx_run(const uint16_t* dy, const uint16_t* x, uint16_t* dx,
                                Py_ssize_t n, double mean, double g, double a, double k)

cdef extern from "_float_rows.h" nogil:
    enum: BNCORE_FLOAT_ROWS
    Py_ssize_t bncore_affine1_f32(const float* x, float* y, Py_ssize_t n, const double* mean,
                                  const double* scale, const double* shift)
    Py_ssize_t bncore_affine1_nt_f32(const float* x, float* y, Py_ssize_t n,
                                     const double* mean, const double* scale,
                                     const double* shift)
    Py_ssize_t bncore_dx1_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                              const double* mean, const double* g, const double* a,
                              const double* k)
    Py_ssize_t bncore_affine_rows_f32(const float* x, float* y, Py_ssize_t rows, Py_ssize_t W,
                                      Py_ssize_t chunk, const double* mean, const double* scale,
                                      const double* shift)
    Py_ssize_t bncore_dx_rows_f32(const float* dy, const float* x, float* dx, Py_ssize_t rows,
                                  Py_ssize_t W, Py_ssize_t chunk, const double* mean,
                                  const double* g, const double* a, const double* k)
    Py_ssize_t bncore_affine_seg_f32(const float* x, float* y, Py_ssize_t n, double mean,
                                     double scale, double shift)
    Py_ssize_t bncore_dx_seg_f32(const float* dy, const float* x, float* dx, Py_ssize_t n,
                                 double mean, double g, double a, double k)
    void bncore_col_sums_f32(const float* x, Py_ssize_t rows, Py_ssize_t stride, int ncols,
                             const double* pivot, double* s, double* q, int add)
    void bncore_col_dy_sums_f32(const float* dy, const float* x, Py_ssize_t rows,
                                Py_ssize_t stride, int ncols, const double* mean, double* sa,
                                double* sb, int add)

cdef extern from "_stream.h" nogil:
    void bncore_stream_f32(float* dst, const float* src, Py_ssize_t n)
    void bncore_stream_f64(double* dst, const double* src, Py_ssize_t n)
    void bncore_stream_fence()

cnp.import_array()

ctypedef fused real:
    float
    double
    uint16_t          # IEEE binary16 (float16) storage: read and written through _d / _r

ctypedef fused wide:  # the storage types that no path stages (channel strips)
    float
    double


cdef inline double _d(real v) noexcept nogil:
    # a stored value as float64 (exact for every storage type)
    if real is uint16_t:
        return bncore_half_to_double(v)
    else:
        return <double>v


cdef inline real _r(double v, real* like) noexcept nogil:
    # a float64 result in the storage type, rounded once (`like` picks the type)
    if real is uint16_t:
        return bncore_half_from_double(v)
    else:
        return <real>v

cdef enum:
    LANES = 32            # explicit summation lanes: the order of a sum is part of
                          # the algorithm, so SSE, AVX2 and AVX-512 builds agree bit
                          # for bit, and 32 lanes give the vector unit 4-8 chains
    SEG_LEN = 8192        # longest contiguous segment per work item (rows schedule)
    ROWS_MIN_INNER = 32   # below this inner size the blocks schedule is used
    SUPER_MIN = 256       # shortest flat loop in the blocks schedule (elements)
    NARROW = 64           # super-row length whose constants stay in registers
    BLOCK_ELEMS = 16384   # elements per block (blocks schedule): 64 KiB of float32
    TILE_BLOCK_ELEMS = 65536  # the same for channel tiles: they read a block once,
                              # so a larger block only means fewer partials
    STREAM_MIN_BYTES = 16777216  # dx from 16 MiB on is written with streaming stores
                                 # (_stream.h): with dy and x that is 48 MiB, past
                                 # common L3 sizes, so dx leaves the caches anyway
                                 # (at 8 MiB, (704000,3) got 25% slower). Measured
                                 # side by side on (32,64,56,56) float32, backward
                                 # gained 5-15%. The forward's y streams only in the
                                 # narrow schedule, straight from the registers
                                 # (channels-last (32,64,56,56): eval 1.22-1.33x,
                                 # forward-train 1.11-1.12x); through a buffer, and
                                 # in the rows schedule (NCHW: eval 0.86-0.90x), it
                                 # lost, so those store normally
    STREAM_MIN_RUN = 1024       # ... and only where each work item writes runs of
                                # at least this many elements: short runs are
                                # mostly partial lines, and streaming them made
                                # (1000,64,33) 27x slower
    PIECE = 256           # elements computed into a local buffer, then streamed
    MIN_ITEMS = 8         # blocks schedule: fewest work items when rows allow
    FLAT_ROWS = 32        # flat schedule: super-rows per reduction block, up to (fewer
    FLAT_MAX_ELEMS = 262144   # where that exceeds this many elements, or MIN_ITEMS
                              # would not be met)
    NARROW_WIDE_ITEMS = 32  # narrow inputs of at least this many TILE_BLOCK_ELEMS
                            # take blocks of that size (make_plan)


# --------------------------------------------------------------------------
# Work decomposition: a pure function of the shape, never of the thread count

cdef struct Plan:
    Py_ssize_t outer, C, inner
    bint rows               # rows schedule (else blocks)
    Py_ssize_t nseg         # rows: segments per (o, c) row
    Py_ssize_t seg_len      # rows: elements per full segment
    Py_ssize_t P            # blocks: elements per outer row (C * inner)
    Py_ssize_t R0           # blocks: outer rows per super-row
    Py_ssize_t W            # blocks: elements per super-row (R0 * P)
    bint narrow             # blocks with W == NARROW: constants held in registers
    Py_ssize_t block_rows   # blocks: outer rows per block (multiple of R0)
    Py_ssize_t elem_rows    # blocks: outer rows per work item of the elementwise
                            # passes (block_rows but in the flat schedule)
    Py_ssize_t nitems       # parallel work items
    Py_ssize_t nparts       # partials per channel
    bint stream             # the dx pass writes with streaming stores


cdef Plan make_plan(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner) noexcept nogil:
    cdef Plan p
    cdef Py_ssize_t per_block, cap, rows
    p.outer = outer
    p.C = C
    p.inner = inner
    p.rows = inner >= ROWS_MIN_INNER
    p.nseg = 1
    p.seg_len = inner
    p.P = C * inner
    p.R0 = 1
    p.W = p.P
    p.block_rows = 1
    p.elem_rows = 1
    p.narrow = False
    p.stream = False
    if p.rows:
        p.nseg = (inner + SEG_LEN - 1) // SEG_LEN
        # equal-length segments: same cost per item, same count per partial
        p.seg_len = (inner + p.nseg - 1) // p.nseg
        p.nitems = outer * C * p.nseg
        p.nparts = outer * p.nseg
    else:
        if p.P > 0 and NARROW % p.P == 0:
            # rows of 1, 2, 4, ... 64 elements: super-rows of exactly NARROW
            # elements, whose per-element constants fit in vector registers
            p.R0 = NARROW // p.P
            p.narrow = True
        elif p.P > 0 and p.P < SUPER_MIN:
            p.R0 = (SUPER_MIN + p.P - 1) // p.P
        p.W = p.R0 * p.P
        per_block = TILE_BLOCK_ELEMS if inner == 1 and not p.narrow else BLOCK_ELEMS
        if p.narrow and outer * p.P >= NARROW_WIDE_ITEMS * TILE_BLOCK_ELEMS:
            # large narrow inputs in blocks of TILE_BLOCK_ELEMS: the statistics
            # of 16384-element blocks spent a fifth of their time between
            # blocks (channels-last (32,64,56,56) float32, one or two threads:
            # 1.17-1.22x faster in 65536-element blocks, forward-train 1.1-1.25x,
            # backward 1.05-1.1x); with fewer blocks than NARROW_WIDE_ITEMS the
            # threads' shares grow uneven ((16,64,28,28): 13 blocks, 5-7% slower)
            per_block = TILE_BLOCK_ELEMS
        p.elem_rows = p.R0 * (per_block // p.W if p.W > 0 and p.W < per_block else 1)
        p.block_rows = p.elem_rows
        if not p.narrow and inner > 1 and p.W > 0:
            # the flat schedule's reductions in blocks of FLAT_ROWS super-rows
            # (fewer where that passes FLAT_MAX_ELEMS elements or leaves fewer
            # than MIN_ITEMS blocks, as before: on more than MIN_ITEMS threads
            # the reductions of (256,512,4,4) now use MIN_ITEMS, their 8
            # blocks, where 128 smaller ones could use more): each block zeroes,
            # expands and folds W-long sums, which with 2-7 rows a block
            # ((256,512,4,4), (256,256,3,3) NCHW) cost 2-4x the sums
            # themselves (statistics 0.39-0.87 ns an element on one thread,
            # 0.19-0.22 in larger blocks; backward sums 0.46-1.28, 0.23-0.38).
            # The elementwise passes keep the smaller items: through whole
            # rows of larger blocks, y came 1.6-2x slower ((1024,256,4,4)).
            rows = FLAT_ROWS if FLAT_ROWS * p.W <= FLAT_MAX_ELEMS else FLAT_MAX_ELEMS // p.W
            if rows * p.R0 > p.block_rows:
                p.block_rows = rows * p.R0
        # at least MIN_ITEMS blocks (and work items) when there are rows enough,
        # so that up to that many threads find work on mid-sized inputs
        cap = p.R0 * (outer // (MIN_ITEMS * p.R0))
        if cap >= p.R0:
            p.block_rows = min(p.block_rows, cap)
            p.elem_rows = min(p.elem_rows, cap)
        p.nitems = (outer + p.block_rows - 1) // p.block_rows
        p.nparts = p.nitems
    return p


cdef inline Plan _elementwise_plan(const Plan* p) noexcept nogil:
    """The plan of the elementwise passes (y, dx): the reductions' but with
    work items of elem_rows outer rows (the results are per element, so the
    items' size changes no bit)."""
    cdef Plan q = p[0]
    if not q.rows:
        q.block_rows = q.elem_rows
        q.nitems = (q.outer + q.block_rows - 1) // q.block_rows
        q.nparts = q.nitems
    return q


cdef inline Plan _streaming(const Plan* p, Py_ssize_t itemsize) noexcept nogil:
    """The plan for the dx pass, whose output has `itemsize`-byte elements."""
    cdef Plan q = p[0]
    cdef Py_ssize_t run = p.seg_len if p.rows else p.block_rows * p.P
    q.stream = (p.outer * p.C * p.inner * itemsize >= STREAM_MIN_BYTES
                and run >= STREAM_MIN_RUN and itemsize > 2)     # (float16: never)
    return q


cdef inline void _stream(real* dst, const real* src, Py_ssize_t n) noexcept nogil:
    if real is float:
        bncore_stream_f32(dst, src, n)
    elif real is double:
        bncore_stream_f64(dst, src, n)
    else:                     # float16: a plain copy (its plan never streams: _streaming)
        memcpy(dst, src, n * sizeof(uint16_t))


cdef inline double _part_count(const Plan* p, Py_ssize_t j) noexcept nogil:
    """Number of elements behind partial j of one channel."""
    cdef Py_ssize_t k, n
    if p.rows:
        k = j % p.nseg
        n = p.inner - k * p.seg_len
        return <double>(p.seg_len if n > p.seg_len else n)
    n = p.outer - j * p.block_rows
    if n > p.block_rows:
        n = p.block_rows
    return <double>(n * p.inner)


cdef inline void _rows_item(const Plan* p, Py_ssize_t t, Py_ssize_t* off, Py_ssize_t* n,
                            Py_ssize_t* c, Py_ssize_t* part) noexcept nogil:
    """Offset, length, channel and partial index of rows-schedule item t."""
    if p.nseg == 1:
        # one segment per row (inner <= SEG_LEN, the common case): one
        # division per item instead of three, which rows of a few hundred
        # elements notice ((32,128,7,7) backward 15% faster)
        c[0] = t % p.C
        off[0] = t * p.inner
        n[0] = p.inner
        part[0] = t
        return
    cdef Py_ssize_t cs = p.C * p.nseg
    cdef Py_ssize_t o = t // cs
    cdef Py_ssize_t rem = t - o * cs
    cdef Py_ssize_t k = rem % p.nseg
    cdef Py_ssize_t start = k * p.seg_len
    cdef Py_ssize_t m = p.inner - start
    c[0] = rem // p.nseg
    off[0] = (o * p.C + c[0]) * p.inner + start
    n[0] = p.seg_len if m > p.seg_len else m
    part[0] = (o * p.nseg + k) * p.C + c[0]


cdef inline Py_ssize_t _block_rows(const Plan* p, Py_ssize_t t) noexcept nogil:
    """Number of outer rows in blocks-schedule item t."""
    cdef Py_ssize_t n = p.outer - t * p.block_rows
    return p.block_rows if n > p.block_rows else n


# float16 work items are staged through per-thread buffers by _half.h's
# whole-run conversions (the hardware's, where the build targets them), which
# GCC's vectorizer cannot emit inside the loops (there, as bit-level code, they
# cost about 1 ns per element more than float32 does). Every pass runs the
# float64 kernels themselves on float64 copies (exact): the float64 path's
# code on the float64 path's values, so even where the compiler fuses a
# multiply-add in one specialization and not in another (it did, in the
# float32 tail of the backward sums: float16 staged as float32 came out 1 ulp
# from the float64 path), the float16 results are the float64 path's. The
# reductions of the rows schedule's segments, the narrow super-rows and the
# channel tiles convert runs themselves (their sums take the same elements in
# the same order); the flat blocks schedule stages the item's whole span. The elementwise passes convert pieces of the span (whole
# super-rows, so each element meets its own channel's constants) to float64,
# run the float64 kernels into a float64 buffer and round that to float16 in
# one run: once, as the float64 path's results rounded to float16. Plans, and
# with them every summation order, are the storage type's as before.

cdef inline void _span(const Plan* p, Py_ssize_t t, Py_ssize_t* off, Py_ssize_t* n,
                       Py_ssize_t* c) noexcept nogil:
    """Offset and length of the contiguous span work item t covers, and its
    channel (rows schedule; 0 for blocks, which span every channel)."""
    cdef Py_ssize_t part
    if p.rows:
        _rows_item(p, t, off, n, c, &part)
    else:
        off[0] = t * p.block_rows * p.P
        n[0] = _block_rows(p, t) * p.P
        c[0] = 0


cdef enum:
    STAGE_PIECE = 512     # elements per staged piece in the elementwise passes:
                          # the three float64 buffers of dx (12 KiB) and the
                          # source lines stay within L1. Side by side (float16
                          # (32,64,56,56), 1 thread): backward 6.2 ms at 512,
                          # 8.6 at 1024 (buffers spilling to L2), 7.3 at 128


cdef inline Py_ssize_t _piece_len(const Plan* p) noexcept nogil:
    """Elements per staged piece of an elementwise pass, at least one: whole
    super-rows in the blocks schedule where they fit in STAGE_PIECE, else
    STAGE_PIECE elements starting anywhere in a super-row (_wide_pieces)."""
    if p.rows:
        return STAGE_PIECE if p.seg_len > STAGE_PIECE else p.seg_len
    if p.W <= 0:                # no elements (inner == 0): nothing is staged
        return 1
    if _wide_pieces(p):
        return STAGE_PIECE
    return p.W * (STAGE_PIECE // p.W)


cdef inline bint _wide_pieces(const Plan* p) noexcept nogil:
    """Blocks-schedule super-rows longer than a piece: pieces then start at a
    column of a super-row and meet the constants from that column on (staging
    whole super-rows would take 3 W doubles per thread, 96 MB at W = 4e6)."""
    return not p.rows and p.W > STAGE_PIECE


cdef inline bint _converts_runs(const Plan* p) noexcept nogil:
    """The reductions of this plan convert float16 in runs themselves (rows
    segments, narrow super-rows, channel tiles); the flat schedule's items are
    staged whole, as float64: up to FLAT_MAX_ELEMS doubles an array per thread
    (4 MiB for the backward sums' two), past L2 for the largest blocks, for
    float16's rare flat inputs."""
    return p.rows or p.narrow or _use_tiles(p)


cdef inline Py_ssize_t _staged(const real* like, const Plan* p, int arrays,
                               bint whole) noexcept nogil:
    """Doubles of staging one thread needs for `arrays` arrays: whole spans or
    pieces, as float64; none unless the storage is float16 (`like` picks the
    type)."""
    if real is uint16_t:
        if whole:
            return 0 if _converts_runs(p) else arrays * p.block_rows * p.P
        return arrays * _piece_len(p)
    else:
        return 0


cdef void _expand(const Plan* p, const double* v, double* out) noexcept nogil:
    """out[j] = v[channel of element j of a super-row], j < W."""
    cdef Py_ssize_t r, c, i, j = 0
    for r in range(p.R0):
        for c in range(p.C):
            for i in range(p.inner):
                out[j] = v[c]
                j += 1


cdef void _fold(const Plan* p, const double* acc, Py_ssize_t n, double* out) noexcept nogil:
    """out[c] = sum of acc[j] over the elements j < n of channel c, j ascending."""
    cdef Py_ssize_t j = 0, c, i
    for c in range(p.C):
        out[c] = 0.0
    while j < n:
        for c in range(p.C):
            for i in range(p.inner):
                out[c] += acc[j + i]
            j += p.inner
    


# --------------------------------------------------------------------------
# Lane-blocked sums over a contiguous segment (rows schedule)

cdef inline double _lane_total(double* acc) noexcept nogil:
    # pairwise tree over the 32 lanes in a fixed order, written with vector
    # adds in _lanes.h: as a Cython loop GCC spilled the lanes to the stack and
    # added them back with ~60 scalar adds (a quarter to a third of the time
    # of 7 x 7 rows). Same adds, same operands: the same bits.
    return bncore_lane_total32(acc)


cdef inline void _zero(double* acc, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(n):
        acc[k] = 0.0


cdef inline void _shifted_partial(double s1, double s2, double cnt, double shift,
                                  double* mean_out, double* m2_out) noexcept nogil:
    """Partial mean (less the channel pivot) and M2 from the sums of d = x - P:
    mean = (P - K) + S1 / n, M2 = S2 - S1 (S1 / n), clamped at 0 against rounding."""
    cdef double m2 = s2 - s1 * (s1 / cnt)
    mean_out[0] = shift + s1 / cnt
    m2_out[0] = m2 if m2 > 0.0 else 0.0


cdef enum:
    PIVOT_SPREAD = 16     # a one-pass partial is kept only when S2 <= 16 M2 (the
                          # pivot within sqrt(15) std of the item's mean); else
                          # the item's sums are taken again, against its mean


cdef inline double _pivot_of(double v) noexcept nogil:
    """A pivot taken from the data: the value itself, or 0 when it is Inf or NaN
    (x - Inf would make every other value's difference infinite or NaN, and
    the mean NaN where IEEE's is +-Inf). Finite data are unaffected."""
    return v if v - v == 0.0 else 0.0


cdef inline bint _pivot_too_far(double s2, double m2, double new_pivot) noexcept nogil:
    """S2 = M2 + n (P - mean)^2 beyond PIVOT_SPREAD M2: then S2 - S1^2/n has lost
    too much to cancellation (also when rounding left M2 at 0 with S2 > 0).
    Never when the new pivot (the first pass's mean) is infinite or NaN: the
    data hold an Inf or a NaN, and x - mean would turn an infinite mean (IEEE's,
    numpy's and torch's for data with +Inf) into NaN."""
    return s2 > PIVOT_SPREAD * m2 and new_pivot - new_pivot == 0.0


# float32 loops through AVX-512 intrinsics (_float_rows.h: the elementwise
# passes and the channels-last and rows sums), where the build has them and
# float_rows(True) (default); the same bits as the Cython loops below.

cdef bint _float_rows_on = True


def float_rows(bint on):
    """Turn the AVX-512 float32 loops (_float_rows.h) on or off (for
    tests and side-by-side benchmarks: the bits are the Cython loops' either
    way); returns the former setting, and whether this build has them. Not for
    use while kernels run on other threads."""
    global _float_rows_on
    cdef bint was = _float_rows_on
    _float_rows_on = on
    return was, bool(BNCORE_FLOAT_ROWS)


cdef enum:
    ROWS_CHUNK = 256                    # columns per chunk of _float_rows.h's row loops
    ROWS_CHUNK_MAX_BYTES = 16777216     # ... on inputs up to this; whole rows past it


cdef inline Py_ssize_t _rows_chunk(const Plan* p, Py_ssize_t itemsize) noexcept nogil:
    if p.outer * p.C * p.inner * itemsize <= ROWS_CHUNK_MAX_BYTES:
        return ROWS_CHUNK
    return p.W


cdef enum:
    LANES_SIMD_MIN = 128  # _float_rows.h's lanes from this many elements on:
                          # below, GCC's inlined loop keeps the lanes in
                          # registers and won ((64,128,7,7), 32 of 49 per row:
                          # forward-train 0.77x with the intrinsics)


cdef enum:
    HALF_RUN = 512        # float16 elements converted at a time by the rows and
                          # narrow reductions (a multiple of LANES and NARROW):
                          # 4 KiB of float64 per array, where staging whole
                          # segments (up to 8192) spilled L1 and ran at half
                          # the speed


cdef inline void _lanes_sums(const real* x, Py_ssize_t nb, double P, double* a,
                             double* q) noexcept nogil:
    """Adds x[0:nb] - P and its square into the 32 lanes (nb a multiple of 32)."""
    cdef Py_ssize_t i
    cdef int k
    cdef double d
    cdef double Pv[LANES]
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on and nb >= LANES_SIMD_MIN:
            for k in range(LANES):
                Pv[k] = P
            bncore_col_sums_f32(x, nb // LANES, LANES, LANES, Pv, a, q, 1)
            return
    for i in range(0, nb, 32):  # 32 == LANES (Cython needs a literal step)
        for k in range(LANES):
            d = _d(x[i + k]) - P
            a[k] += d
            q[k] += d * d


cdef inline void _tail_sums(const real* x, Py_ssize_t m, double P, double* s1,
                            double* s2) noexcept nogil:
    """sum(x - P), sum((x - P)^2) over the tail x[0:m], m < 32, in two chains."""
    cdef Py_ssize_t k
    cdef double d, e, t1 = 0.0, t2 = 0.0, u1 = 0.0, u2 = 0.0
    for k in range(0, m - 1, 2):
        d = _d(x[k]) - P
        e = _d(x[k + 1]) - P
        t1 += d
        t2 += d * d
        u1 += e
        u2 += e * e
    if m % 2:
        d = _d(x[m - 1]) - P
        t1 += d
        t2 += d * d
    s1[0] = t1 + u1
    s2[0] = t2 + u2


cdef inline void _segment_sums(const real* x, Py_ssize_t n, double P, double* s1,
                               double* s2) noexcept nogil:
    """sum(x - P) and sum((x - P)^2) over x[0:n], 32 lanes each."""
    cdef double a[LANES]
    cdef double q[LANES]
    cdef double buf[HALF_RUN]
    cdef Py_ssize_t nb = n - n % LANES, j, m
    cdef double t1, t2
    _zero(a, LANES)
    _zero(q, LANES)
    if real is uint16_t:
        # runs of HALF_RUN converted to float64 (exact), then the float64 code:
        # the lanes take the same elements in the same order
        j = 0
        while j < nb:
            m = nb - j if nb - j < HALF_RUN else HALF_RUN
            bncore_half_to_double_n(x + j, buf, m)
            _lanes_sums(<const double*>buf, m, P, a, q)
            j += m
        bncore_half_to_double_n(x + nb, buf, n - nb)
        _tail_sums(<const double*>buf, n - nb, P, &t1, &t2)
    else:
        _lanes_sums(x, nb, P, a, q)
        # the tail (n % 32 elements) into its own running sums, added after the
        # lane totals: the lanes then never take scalar stores, which the vector
        # loads of _lane_total would have to wait for (rows of 7 x 7 = 49 are
        # short enough for that to be a third of the row's time)
        _tail_sums(x + nb, n - nb, P, &t1, &t2)
    s1[0] = _lane_total(a) + t1
    s2[0] = _lane_total(q) + t2


cdef inline void _segment_mean_m2(const real* x, Py_ssize_t n, double K,
                                  double* mean_out, double* m2_out) noexcept nogil:
    """Mean of x[0:n] - K and centred sum of squares: one pass over the sums of
    x - x[0] (the segment's own pivot); when x[0] is far from the segment's
    mean, a second pass against that mean (then S2 ~ M2: nothing to cancel)."""
    cdef double s1, s2, P = _pivot_of(_d(x[0]))
    _segment_sums(x, n, P, &s1, &s2)
    _shifted_partial(s1, s2, <double>n, P - K, mean_out, m2_out)
    if _pivot_too_far(s2, m2_out[0], P + s1 / <double>n):
        P = P + s1 / <double>n
        _segment_sums(x, n, P, &s1, &s2)
        _shifted_partial(s1, s2, <double>n, P - K, mean_out, m2_out)


cdef inline void _lanes_dy_sums(const real* dy, const real* x, Py_ssize_t nb, double mu,
                                double* a, double* b) noexcept nogil:
    """Adds dy and dy * (x - mu) over [0, nb) into the 32 lanes (nb a multiple of 32)."""
    cdef Py_ssize_t i
    cdef int k
    cdef double g
    cdef double Mv[LANES]
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on and nb >= LANES_SIMD_MIN:
            for k in range(LANES):
                Mv[k] = mu
            bncore_col_dy_sums_f32(dy, x, nb // LANES, LANES, LANES, Mv, a, b, 1)
            return
    for i in range(0, nb, 32):
        for k in range(LANES):
            g = _d(dy[i + k])
            a[k] += g
            b[k] += g * (_d(x[i + k]) - mu)


cdef inline void _tail_dy_sums(const real* dy, const real* x, Py_ssize_t m, double mu,
                               double* s1, double* s2) noexcept nogil:
    """The tail (m < 32 elements) as in _tail_sums."""
    cdef Py_ssize_t k
    cdef double g, h, t1 = 0.0, t2 = 0.0, u1 = 0.0, u2 = 0.0
    for k in range(0, m - 1, 2):
        g = _d(dy[k])
        h = _d(dy[k + 1])
        t1 += g
        t2 += g * (_d(x[k]) - mu)
        u1 += h
        u2 += h * (_d(x[k + 1]) - mu)
    if m % 2:
        g = _d(dy[m - 1])
        t1 += g
        t2 += g * (_d(x[m - 1]) - mu)
    s1[0] = t1 + u1
    s2[0] = t2 + u2


cdef inline void _segment_dy_sums(const real* dy, const real* x, Py_ssize_t n, double mu,
                                  double* sum_dy, double* sum_dy_xmu) noexcept nogil:
    """sum(dy) and sum(dy * (x - mu)) over a contiguous segment, 32 lanes."""
    cdef double a[LANES]
    cdef double b[LANES]
    cdef double gbuf[HALF_RUN]
    cdef double xbuf[HALF_RUN]
    cdef Py_ssize_t nb = n - n % LANES, j, m
    cdef double t1, t2
    _zero(a, LANES)
    _zero(b, LANES)
    if real is uint16_t:
        j = 0                   # runs converted to float64, as in _segment_sums
        while j < nb:
            m = nb - j if nb - j < HALF_RUN else HALF_RUN
            bncore_half_to_double_n(dy + j, gbuf, m)
            bncore_half_to_double_n(x + j, xbuf, m)
            _lanes_dy_sums(<const double*>gbuf, <const double*>xbuf, m, mu, a, b)
            j += m
        bncore_half_to_double_n(dy + nb, gbuf, n - nb)
        bncore_half_to_double_n(x + nb, xbuf, n - nb)
        _tail_dy_sums(<const double*>gbuf, <const double*>xbuf, n - nb, mu, &t1, &t2)
    else:
        _lanes_dy_sums(dy, x, nb, mu, a, b)
        _tail_dy_sums(dy + nb, x + nb, n - nb, mu, &t1, &t2)
    sum_dy[0] = _lane_total(a) + t1
    sum_dy_xmu[0] = _lane_total(b) + t2


# --------------------------------------------------------------------------
# The two elementwise formulas, in float64 with x - mean formed first: where x
# equals the mean, y is exactly the shift (folding the mean into the constants,
# x * scale + (shift - mean * scale), would leave a rounding residue there).
# Each loop below calls these, so the formulas are written once.

cdef inline real _affine_at(real x, double mean, double scale, double shift) noexcept nogil:
    return _r((_d(x) - mean) * scale + shift, &x)


cdef inline real _dx_at(real dy, real x, double mean, double g, double a,
                        double k) noexcept nogil:
    return _r(g * ((_d(dy) - a) - (_d(x) - mean) * k), &x)


# --------------------------------------------------------------------------
# Flat loops over one super-row (blocks schedule); e_* are expanded constants

cdef inline void _flat_add(const real* x, Py_ssize_t n, const double* e_pivot,
                           double* acc1, double* acc2) noexcept nogil:
    cdef Py_ssize_t j
    cdef double d
    for j in range(n):
        d = _d(x[j]) - e_pivot[j]
        acc1[j] += d
        acc2[j] += d * d


# Four rows at once for wide rows (W >= QUAD_MIN elements, so the four
# streams sit in different pages): the running sums and constants are loaded
# once per four elements. The grouping ((r0 + r1) + (r2 + r3)) is fixed by the
# shape like every summation order here.

cdef enum:
    QUAD_MIN = 1024


cdef inline void _flat_add4(const real* x, Py_ssize_t W, const double* e_pivot,
                            double* acc1, double* acc2) noexcept nogil:
    cdef Py_ssize_t j
    cdef double K, d0, d1, d2, d3
    for j in range(W):
        K = e_pivot[j]
        d0 = _d(x[j]) - K
        d1 = _d(x[W + j]) - K
        d2 = _d(x[2 * W + j]) - K
        d3 = _d(x[3 * W + j]) - K
        acc1[j] += (d0 + d1) + (d2 + d3)
        acc2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)


cdef inline void _flat_dy_sums4(const real* dy, const real* x, Py_ssize_t W,
                                const double* e_mean, double* acc_a,
                                double* acc_b) noexcept nogil:
    cdef Py_ssize_t j
    cdef double m, g0, g1, g2, g3
    for j in range(W):
        m = e_mean[j]
        g0 = _d(dy[j])
        g1 = _d(dy[W + j])
        g2 = _d(dy[2 * W + j])
        g3 = _d(dy[3 * W + j])
        acc_a[j] += (g0 + g1) + (g2 + g3)
        acc_b[j] += ((g0 * (_d(x[j]) - m) + g1 * (_d(x[W + j]) - m))
                     + (g2 * (_d(x[2 * W + j]) - m) + g3 * (_d(x[3 * W + j]) - m)))


cdef inline void _flat_dy_sums(const real* dy, const real* x, Py_ssize_t n,
                               const double* e_mean, double* acc_a,
                               double* acc_b) noexcept nogil:
    cdef Py_ssize_t j
    cdef double g
    for j in range(n):
        g = _d(dy[j])
        acc_a[j] += g
        acc_b[j] += g * (_d(x[j]) - e_mean[j])


cdef inline void _flat_affine(const real* x, real* y, Py_ssize_t n, const double* e_mean,
                              const double* e_scale, const double* e_shift) noexcept nogil:
    cdef Py_ssize_t j, j0 = 0
    if real is float:
        if _float_rows_on:
            j0 = bncore_affine1_f32(x, y, n, e_mean, e_scale, e_shift)
    for j in range(j0, n):
        y[j] = _affine_at(x[j], e_mean[j], e_scale[j], e_shift[j])


cdef inline void _flat_dx(const real* dy, const real* x, real* dx, Py_ssize_t n,
                          const double* e_mean, const double* e_g, const double* e_a,
                          const double* e_k) noexcept nogil:
    cdef Py_ssize_t j, j0 = 0
    if real is float:
        if _float_rows_on:
            j0 = bncore_dx1_f32(dy, x, dx, n, e_mean, e_g, e_a, e_k)
    for j in range(j0, n):
        dx[j] = _dx_at(dy[j], x[j], e_mean[j], e_g[j], e_a[j], e_k[j])


# Four super-rows at once (elementwise): each expanded constant is loaded once
# per four elements instead of once per element. With three or four float64
# constants per element the loads, not the arithmetic, set the pace of the
# one-row loops ((256,1024): 10 zmm loads per 16 elements). Every element's
# formula is the one above, so the results are the same bit for bit.

cdef inline void _flat_affine4(const real* x, real* y, Py_ssize_t W, const double* e_mean,
                               const double* e_scale, const double* e_shift) noexcept nogil:
    cdef Py_ssize_t j
    cdef double m, sc, sh
    cdef real x0, x1, x2, x3
    for j in range(W):
        m = e_mean[j]
        sc = e_scale[j]
        sh = e_shift[j]
        x0 = x[j]
        x1 = x[W + j]
        x2 = x[2 * W + j]
        x3 = x[3 * W + j]
        y[j] = _affine_at(x0, m, sc, sh)
        y[W + j] = _affine_at(x1, m, sc, sh)
        y[2 * W + j] = _affine_at(x2, m, sc, sh)
        y[3 * W + j] = _affine_at(x3, m, sc, sh)


cdef inline void _flat_dx4(const real* dy, const real* x, real* dx, Py_ssize_t W,
                           const double* e_mean, const double* e_g, const double* e_a,
                           const double* e_k) noexcept nogil:
    cdef Py_ssize_t j
    cdef double m, g, a, k
    cdef real d0, d1, d2, d3, x0, x1, x2, x3
    for j in range(W):
        m = e_mean[j]
        g = e_g[j]
        a = e_a[j]
        k = e_k[j]
        d0 = dy[j]
        d1 = dy[W + j]
        d2 = dy[2 * W + j]
        d3 = dy[3 * W + j]
        x0 = x[j]
        x1 = x[W + j]
        x2 = x[2 * W + j]
        x3 = x[3 * W + j]
        dx[j] = _dx_at(d0, x0, m, g, a, k)
        dx[W + j] = _dx_at(d1, x1, m, g, a, k)
        dx[2 * W + j] = _dx_at(d2, x2, m, g, a, k)
        dx[3 * W + j] = _dx_at(d3, x3, m, g, a, k)


# Channel tiles (inner == 1): TILE consecutive channels of every row of a
# block, with their running sums held in registers across the rows. Channel
# c's sum runs over the rows in order, whatever the tile it falls in.

cdef enum:
    TILE = 32


cdef inline bint _use_tiles(const Plan* p) noexcept nogil:
    # Channel tiles for every channels-last row that is not narrow: one pass
    # reads each cache line once, so striding a row apart costs nothing even
    # when a power-of-two row length maps a tile's rows onto one L1 set.
    return p.inner == 1 and not p.narrow


# Narrow super-rows (W == NARROW == 64 elements): every per-element constant
# and running sum lives in a local array of 64 doubles that GCC keeps in
# vector registers across the whole block, so the inner loop loads only the
# data. The order of every sum is the same as in the flat loops.

cdef inline void _n64_sums(const real* x, Py_ssize_t nsr, const double* e_pivot,
                           double* acc1, double* acc2) noexcept nogil:
    """Adds the nsr super-rows' x - pivot and its square into acc1, acc2
    (accumulating, so float16 can come in converted runs: each sum takes the
    same elements in the same order)."""
    cdef double a[NARROW]
    cdef double q[NARROW]
    cdef double K[NARROW]
    cdef Py_ssize_t s
    cdef int j
    cdef double d
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:
            bncore_col_sums_f32(x, nsr, NARROW, NARROW, e_pivot, acc1, acc2, 1)
            return
    for j in range(NARROW):
        a[j] = acc1[j]
        q[j] = acc2[j]
        K[j] = e_pivot[j]
    for s in range(nsr):
        for j in range(NARROW):
            d = _d(x[s * NARROW + j]) - K[j]
            a[j] += d
            q[j] += d * d
    for j in range(NARROW):
        acc1[j] = a[j]
        acc2[j] = q[j]


cdef inline void _n64_dy_sums(const real* dy, const real* x, Py_ssize_t nsr,
                              const double* e_mean, double* acc_a,
                              double* acc_b) noexcept nogil:
    """Adds dy and dy * (x - mean) over nsr super-rows into acc_a, acc_b
    (accumulating, as _n64_sums)."""
    cdef double a[NARROW]
    cdef double b[NARROW]
    cdef double m[NARROW]
    cdef Py_ssize_t s
    cdef int j
    cdef double g
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:
            bncore_col_dy_sums_f32(dy, x, nsr, NARROW, NARROW, e_mean, acc_a, acc_b, 1)
            return
    for j in range(NARROW):
        a[j] = acc_a[j]
        b[j] = acc_b[j]
        m[j] = e_mean[j]
    for s in range(nsr):
        for j in range(NARROW):
            g = _d(dy[s * NARROW + j])
            a[j] += g
            b[j] += g * (_d(x[s * NARROW + j]) - m[j])
    for j in range(NARROW):
        acc_a[j] = a[j]
        acc_b[j] = b[j]


cdef inline void _n64_sums_runs(const uint16_t* x, Py_ssize_t n, Py_ssize_t total,
                                const double* e_pivot, double* acc1,
                                double* acc2) noexcept nogil:
    """_n64_sums over the n float16 elements of whole super-rows, then _flat_add
    over the part super-row up to total, all converted to float64 in runs of
    HALF_RUN (a multiple of NARROW): the float64 path's code on its values."""
    cdef double buf[HALF_RUN]
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = n - j if n - j < HALF_RUN else HALF_RUN
        bncore_half_to_double_n(x + j, buf, m)
        _n64_sums(<const double*>buf, m // NARROW, e_pivot, acc1, acc2)
        j += m
    if total > n:
        bncore_half_to_double_n(x + n, buf, total - n)
        _flat_add(<const double*>buf, total - n, e_pivot, acc1, acc2)


cdef inline void _n64_dy_sums_runs(const uint16_t* dy, const uint16_t* x, Py_ssize_t n,
                                   Py_ssize_t total, const double* e_mean, double* acc_a,
                                   double* acc_b) noexcept nogil:
    """_n64_dy_sums and the part super-row's _flat_dy_sums, as _n64_sums_runs."""
    cdef double gbuf[HALF_RUN]
    cdef double xbuf[HALF_RUN]
    cdef Py_ssize_t j = 0, m
    while j < n:
        m = n - j if n - j < HALF_RUN else HALF_RUN
        bncore_half_to_double_n(dy + j, gbuf, m)
        bncore_half_to_double_n(x + j, xbuf, m)
        _n64_dy_sums(<const double*>gbuf, <const double*>xbuf, m // NARROW, e_mean, acc_a, acc_b)
        j += m
    if total > n:
        bncore_half_to_double_n(dy + n, gbuf, total - n)
        bncore_half_to_double_n(x + n, xbuf, total - n)
        _flat_dy_sums(<const double*>gbuf, <const double*>xbuf, total - n, e_mean, acc_a, acc_b)


cdef bint _affine_stream_on = True


def affine_stream(bint on):
    """Turn the narrow schedule's non-temporal y stores on or off (side-by-side
    benchmarks and tests; the same bits either way); returns the former setting."""
    global _affine_stream_on
    cdef bint was = _affine_stream_on
    _affine_stream_on = on
    return was


cdef inline void _n64_affine(const real* x, real* y, Py_ssize_t nsr, const double* e_mean,
                             const double* e_scale, const double* e_shift,
                             bint stream=False) noexcept nogil:
    cdef double m[NARROW]
    cdef double sc[NARROW]
    cdef double sh[NARROW]
    cdef Py_ssize_t s
    cdef int j
    for j in range(NARROW):
        m[j] = e_mean[j]
        sc[j] = e_scale[j]
        sh[j] = e_shift[j]
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:    # a super-row at a time, in order
            if stream and _affine_stream_on and (<size_t>y) % 32 == 0:
                for s in range(nsr):
                    bncore_affine1_nt_f32(x + s * NARROW, y + s * NARROW, NARROW, m, sc, sh)
                return
            for s in range(nsr):
                bncore_affine1_f32(x + s * NARROW, y + s * NARROW, NARROW, m, sc, sh)
            return
    for s in range(nsr):
        for j in range(NARROW):
            y[s * NARROW + j] = _affine_at(x[s * NARROW + j], m[j], sc[j], sh[j])


cdef inline void _n64_dx(const real* dy, const real* x, real* dx, Py_ssize_t nsr,
                         const double* e_mean, const double* e_g, const double* e_a,
                         const double* e_k, bint stream) noexcept nogil:
    cdef double m[NARROW]
    cdef double g[NARROW]
    cdef double a[NARROW]
    cdef double k[NARROW]
    cdef real out[NARROW]
    cdef Py_ssize_t s
    cdef int j
    for j in range(NARROW):
        m[j] = e_mean[j]
        g[j] = e_g[j]
        a[j] = e_a[j]
        k[j] = e_k[j]
    if stream:
        for s in range(nsr):
            if real is float and BNCORE_FLOAT_ROWS and _float_rows_on:
                bncore_dx1_f32(dy + s * NARROW, x + s * NARROW, out, NARROW, m, g, a, k)
            else:
                for j in range(NARROW):
                    out[j] = _dx_at(dy[s * NARROW + j], x[s * NARROW + j], m[j], g[j], a[j],
                                    k[j])
            _stream(dx + s * NARROW, out, NARROW)
        return
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:
            for s in range(nsr):
                bncore_dx1_f32(dy + s * NARROW, x + s * NARROW, dx + s * NARROW, NARROW, m, g,
                               a, k)
            return
    for s in range(nsr):
        for j in range(NARROW):
            dx[s * NARROW + j] = _dx_at(dy[s * NARROW + j], x[s * NARROW + j], m[j], g[j], a[j],
                                        k[j])


cdef inline void _tile_sums(const real* x, Py_ssize_t rows, Py_ssize_t stride,
                            const double* pivot, double* ps1, double* ps2,
                            bint add) noexcept nogil:
    """Sums of d = x - pivot and d^2 over `rows` rows (row stride `stride`) of
    TILE channels into ps1, ps2; with add, added to what they hold (float16
    comes in runs of rows, each channel's sum taking the rows in order)."""
    cdef double s[TILE]
    cdef double q[TILE]
    cdef double K[TILE]
    cdef Py_ssize_t r
    cdef int k
    cdef const real* a
    cdef double d
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:
            bncore_col_sums_f32(x, rows, stride, TILE, pivot, ps1, ps2, add)
            return
    for k in range(TILE):
        s[k] = ps1[k] if add else 0.0
        q[k] = ps2[k] if add else 0.0
        K[k] = pivot[k]
    for r in range(rows):
        a = x + r * stride
        for k in range(TILE):
            d = _d(a[k]) - K[k]
            s[k] += d
            q[k] += d * d
    for k in range(TILE):
        ps1[k] = s[k]
        ps2[k] = q[k]


cdef inline void _tile_dy_sums(const real* dy, const real* x, Py_ssize_t rows,
                               Py_ssize_t stride, const double* mean, double* pa,
                               double* pb, bint add) noexcept nogil:
    """Sums of dy and dy * (x - mean) into pa, pb (add: as _tile_sums)."""
    cdef double sa[TILE]
    cdef double sb[TILE]
    cdef double m[TILE]
    cdef Py_ssize_t r
    cdef int k
    cdef double g
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:
            bncore_col_dy_sums_f32(dy, x, rows, stride, TILE, mean, pa, pb, add)
            return
    for k in range(TILE):
        sa[k] = pa[k] if add else 0.0
        sb[k] = pb[k] if add else 0.0
        m[k] = mean[k]
    for r in range(rows):
        for k in range(TILE):
            g = _d(dy[r * stride + k])
            sa[k] += g
            sb[k] += g * (_d(x[r * stride + k]) - m[k])
    for k in range(TILE):
        pa[k] = sa[k]
        pb[k] = sb[k]


cdef inline void _cols_sums(const real* x, Py_ssize_t rows, Py_ssize_t stride,
                            Py_ssize_t ncols, const double* pivot, double* ps1,
                            double* ps2, bint add) noexcept nogil:
    """_tile_sums for ncols < TILE channels (same order of operations)."""
    cdef Py_ssize_t r, k
    cdef double s, q, d, K
    for k in range(ncols):
        K = pivot[k]
        s = ps1[k] if add else 0.0
        q = ps2[k] if add else 0.0
        for r in range(rows):
            d = _d(x[r * stride + k]) - K
            s += d
            q += d * d
        ps1[k] = s
        ps2[k] = q


cdef inline void _cols_dy_sums(const real* dy, const real* x, Py_ssize_t rows,
                               Py_ssize_t stride, Py_ssize_t ncols, const double* mean,
                               double* pa, double* pb, bint add) noexcept nogil:
    cdef Py_ssize_t r, k
    cdef double sa, sb, g
    for k in range(ncols):
        sa = pa[k] if add else 0.0
        sb = pb[k] if add else 0.0
        for r in range(rows):
            g = _d(dy[r * stride + k])
            sa += g
            sb += g * (_d(x[r * stride + k]) - mean[k])
        pa[k] = sa
        pb[k] = sb


# Out of cache, a tile's walk down its rows (one or two lines per row, each
# row a page apart at C = 1024) defeats the prefetchers: (8192, 1024)'s
# reductions read 10 GB/s. So on inputs past TILE_GROUP_MIN_BYTES the rows of
# a block go in groups, every tile through the group before the next group:
# the group's rows stream in order at once, TILE_GROUP_STREAMS of them in all
# (16 rows of x for the statistics, 8 of dy and 8 of x for the backward sums:
# side by side, 16 rows of each made the backward sums 1.1-1.4x faster
# instead of 1.6-2.2x, and 8 of x the statistics 1.3-1.5x instead of
# 1.6-1.8x, on (8192, 1024)). A tile's running
# sums pass between groups through the partials (stored and loaded exactly),
# so each channel's sum still takes the block's rows in order, from 0: the
# same bits. (In cache, where the walk costs nothing, the groups' extra
# loads and stores cost (256, 1024) and (512, 1024) 13-14% of the
# statistics, hence the size rule.)

cdef enum:
    TILE_GROUP_STREAMS = 16
    TILE_GROUP_MIN_BYTES = 4194304
    TILE_GROUP_MIN_ROW_BYTES = 2048   # rows of a few lines are walked in order anyway:
                                      # (65536, 128) lost 6-10% to the groups


cdef bint _tile_groups_on = True      # tile_groups(False): whole blocks (tests)


def tile_groups(bint on):
    """Turn the channel tiles' row groups on or off (for tests and side-by-side
    benchmarks: the bits are the same either way); returns the former
    setting. Not for use while kernels run on other threads."""
    global _tile_groups_on
    cdef bint was = _tile_groups_on
    _tile_groups_on = on
    return was


cdef inline Py_ssize_t _tile_group(const Plan* p, Py_ssize_t itemsize,
                                   int arrays) noexcept nogil:
    """Rows per group of the channel tiles' reductions over `arrays` arrays
    (a whole block in cache)."""
    if (_tile_groups_on and p.outer * p.C * p.inner * itemsize > TILE_GROUP_MIN_BYTES
            and p.P * itemsize >= TILE_GROUP_MIN_ROW_BYTES):
        return TILE_GROUP_STREAMS // arrays
    return p.block_rows


cdef inline void _tiles_sums(const real* x, Py_ssize_t rows, Py_ssize_t C, Py_ssize_t c0,
                             Py_ssize_t c1, const double* kb, double* ps1, double* ps2,
                             Py_ssize_t group) noexcept nogil:
    """Channels c0..c1-1 (c0 a multiple of TILE) of `rows` rows: sums of
    x - kb[c] and its square into ps1, ps2, the whole tiles' rows in groups
    of `group`.
    The last columns (under a tile) take all rows in one call, as before
    the groups: split there, GCC 12 compiled the columns' loop so that some
    sums came out an ulp apart from the float16 path's staged copy of the
    same loop (tests/test_batch_norm.py's float16 sums test), which must give
    the same bits; they are under a tile's width, so their walk costs little."""
    cdef Py_ssize_t r0 = 0, rr, c, cend = c0 + (c1 - c0) // TILE * TILE
    while True:                 # (at least once: no rows still writes the zeros)
        rr = rows - r0 if rows - r0 < group else group
        c = c0
        while c < cend:
            _tile_sums(x + r0 * C + c, rr, C, kb + c, ps1 + c, ps2 + c, r0 > 0)
            c += TILE
        r0 += rr
        if r0 >= rows:
            break
    if cend < c1:
        _cols_sums(x + cend, rows, C, c1 - cend, kb + cend, ps1 + cend, ps2 + cend, False)


cdef inline void _tiles_dy_sums(const real* dy, const real* x, Py_ssize_t rows, Py_ssize_t C,
                                Py_ssize_t c0, Py_ssize_t c1, const double* mean, double* pa,
                                double* pb, Py_ssize_t group) noexcept nogil:
    """The backward sums of channels c0..c1-1, as _tiles_sums."""
    cdef Py_ssize_t r0 = 0, rr, c, cend = c0 + (c1 - c0) // TILE * TILE
    while True:
        rr = rows - r0 if rows - r0 < group else group
        c = c0
        while c < cend:
            _tile_dy_sums(dy + r0 * C + c, x + r0 * C + c, rr, C, mean + c, pa + c, pb + c,
                          r0 > 0)
            c += TILE
        r0 += rr
        if r0 >= rows:
            break
    if cend < c1:
        _cols_dy_sums(dy + cend, x + cend, rows, C, c1 - cend, mean + cend, pa + cend,
                      pb + cend, False)


cdef enum:
    TILE_RUN_ROWS = 32    # float16 tiles: rows gathered and converted at a time
                          # (8 KiB of float64 per array)


cdef inline void _tiles_sums_runs(const uint16_t* x, Py_ssize_t rows, Py_ssize_t C,
                                  const double* pivot, double* ps1, double* ps2) noexcept nogil:
    """The tiles' sums over float16 rows (stride C): each tile's (or the last
    columns') values gathered TILE_RUN_ROWS rows at a time into a float64
    buffer (exact) and added by the float64 code, rows in order."""
    cdef double buf[TILE_RUN_ROWS * TILE]
    cdef Py_ssize_t c = 0, w, r0, rr, r
    while c < C:
        w = C - c if C - c < TILE else TILE
        r0 = 0
        while r0 < rows:
            rr = rows - r0 if rows - r0 < TILE_RUN_ROWS else TILE_RUN_ROWS
            for r in range(rr):
                bncore_half_to_double_n(x + (r0 + r) * C + c, buf + r * w, w)
            if w == TILE:
                _tile_sums(<const double*>buf, rr, TILE, pivot + c, ps1 + c, ps2 + c, r0 > 0)
            else:
                _cols_sums(<const double*>buf, rr, w, w, pivot + c, ps1 + c, ps2 + c, r0 > 0)
            r0 += rr
        c += w


cdef inline void _tiles_dy_sums_runs(const uint16_t* dy, const uint16_t* x, Py_ssize_t rows,
                                     Py_ssize_t C, const double* mean, double* pa,
                                     double* pb) noexcept nogil:
    """The tiles' backward sums over float16 rows, gathered as _tiles_sums_runs."""
    cdef double gbuf[TILE_RUN_ROWS * TILE]
    cdef double xbuf[TILE_RUN_ROWS * TILE]
    cdef Py_ssize_t c = 0, w, r0, rr, r
    while c < C:
        w = C - c if C - c < TILE else TILE
        r0 = 0
        while r0 < rows:
            rr = rows - r0 if rows - r0 < TILE_RUN_ROWS else TILE_RUN_ROWS
            for r in range(rr):
                bncore_half_to_double_n(dy + (r0 + r) * C + c, gbuf + r * w, w)
                bncore_half_to_double_n(x + (r0 + r) * C + c, xbuf + r * w, w)
            if w == TILE:
                _tile_dy_sums(<const double*>gbuf, <const double*>xbuf, rr, TILE, mean + c,
                              pa + c, pb + c, r0 > 0)
            else:
                _cols_dy_sums(<const double*>gbuf, <const double*>xbuf, rr, w, w, mean + c,
                              pa + c, pb + c, r0 > 0)
            r0 += rr
        c += w


# With streaming stores (dx only), each piece of PIECE elements is computed into
# a local buffer by the same loop, then streamed out: the arithmetic is unchanged.

cdef inline void _affine_block(const real* x, real* y, Py_ssize_t total, Py_ssize_t W,
                               const double* e_mean, const double* e_scale,
                               const double* e_shift, Py_ssize_t chunk) noexcept nogil:
    cdef Py_ssize_t s = 0, j0, r
    if real is float:
        if BNCORE_FLOAT_ROWS and _float_rows_on:   # whole rows in column chunks
            s = total // W * W                          # (_float_rows.h), then the rest
            j0 = bncore_affine_rows_f32(x, y, total // W, W, chunk, e_mean, e_scale, e_shift)
            r = 0
            while j0 < W and r < s:
                _flat_affine(x + r + j0, y + r + j0, W - j0, e_mean + j0, e_scale + j0,
                             e_shift + j0)
                r += W
    while s + 4 * W <= total:
        _flat_affine4(x + s, y + s, W, e_mean, e_scale, e_shift)
        s += 4 * W
    while s < total:
        _flat_affine(x + s, y + s, total - s if total - s < W else W, e_mean, e_scale, e_shift)
        s += W


cdef inline void _dx_block(const real* dy, const real* x, real* dx, Py_ssize_t total,
                           Py_ssize_t W, const double* e_mean, const double* e_g,
                           const double* e_a, const double* e_k, bint stream,
                           Py_ssize_t chunk) noexcept nogil:
    cdef real out[PIECE]
    cdef Py_ssize_t s = 0, m, j0, r
    if not stream:
        if real is float:
            if BNCORE_FLOAT_ROWS and _float_rows_on:   # whole rows in column chunks
                s = total // W * W                          # (_float_rows.h), then the rest
                j0 = bncore_dx_rows_f32(dy, x, dx, total // W, W, chunk, e_mean, e_g, e_a, e_k)
                r = 0
                while j0 < W and r < s:
                    _flat_dx(dy + r + j0, x + r + j0, dx + r + j0, W - j0, e_mean + j0,
                             e_g + j0, e_a + j0, e_k + j0)
                    r += W
        while s + 4 * W <= total:
            _flat_dx4(dy + s, x + s, dx + s, W, e_mean, e_g, e_a, e_k)
            s += 4 * W
        while s < total:
            _flat_dx(dy + s, x + s, dx + s, total - s if total - s < W else W,
                     e_mean, e_g, e_a, e_k)
            s += W
        return
    # pieces of the block's contiguous output, line-aligned after the first;
    # a piece may straddle super-rows, whose constants restart at column 0
    m = PIECE - (<Py_ssize_t>(<size_t>dx % 64) // sizeof(real))
    while s < total:
        if m > total - s:
            m = total - s
        _dx_cols(dy + s, x + s, out, m, s % W, W, e_mean, e_g, e_a, e_k)
        _stream(dx + s, out, m)
        s += m
        m = PIECE


cdef inline void _segment_affine(const real* x, real* y, Py_ssize_t n, double mu,
                                 double sc, double sh) noexcept nogil:
    cdef Py_ssize_t i, i0 = 0
    if real is float:
        if _float_rows_on:
            i0 = bncore_affine_seg_f32(x, y, n, mu, sc, sh)
    for i in range(i0, n):
        y[i] = _affine_at(x[i], mu, sc, sh)


cdef inline void _segment_dx_to(const real* dy, const real* x, real* dx, Py_ssize_t n,
                                double mu, double g, double a, double k) noexcept nogil:
    cdef Py_ssize_t i, i0 = 0
    if real is float:
        if _float_rows_on:
            i0 = bncore_dx_seg_f32(dy, x, dx, n, mu, g, a, k)
    for i in range(i0, n):
        dx[i] = _dx_at(dy[i], x[i], mu, g, a, k)


cdef inline void _segment_dx(const real* dy, const real* x, real* dx, Py_ssize_t n,
                             double mu, double g, double a, double k, bint stream) noexcept nogil:
    cdef real out[PIECE]
    cdef Py_ssize_t j = 0, m
    if not stream:
        _segment_dx_to(dy, x, dx, n, mu, g, a, k)
        return
    # line-aligned pieces after the first, as in _dx_block
    m = PIECE - (<Py_ssize_t>(<size_t>dx % 64) // sizeof(real))
    while j < n:
        if m > n - j:
            m = n - j
        _segment_dx_to(dy + j, x + j, out, m, mu, g, a, k)
        _stream(dx + j, out, m)
        j += m
        m = PIECE


# float16 rows segments through float32 where that provably gives the float64
# path's bits (_half_fast.h: AVX-512 builds), 16 elements at a time (a
# segment's last chunk may be short); a chunk float32 does not decide goes the
# float64 way (staged in `stage`, 48 doubles), as every float16 chunk does
# without AVX-512 or with half_fast(False). The output must not overlap the inputs (the fallback reads
# them after a run's stores): bncore/_bn_args.py refuses overlapping outputs,
# and the raw kernel entry points are not for in-place use.

cdef bint _half_fast_on = True


def half_fast(bint on):
    """Turn the float32 fast path of the float16 elementwise passes on or off
    (for tests and side-by-side benchmarks: the bits are the float64 path's
    either way); returns the former setting, and whether this build has the
    path at all. Not for use while kernels run on other threads."""
    global _half_fast_on
    cdef bint was = _half_fast_on
    _half_fast_on = on
    return was, bool(BNCORE_HALF_FAST)


def half_fast_probe(cnp.ndarray x, double mean, double scale, double shift,
                    cnp.ndarray dy=None, double a=0.0, double k=0.0):
    """The float32 fast path alone on a C-contiguous float16 array (tests):
    (y, decided), y from bncore_half_affine_run (or, with dy, dx from
    bncore_half_dx_run with g = scale) and decided a bool per chunk of 16
    elements (the last may be short). Undecided chunks hold whatever float32
    gave (or nothing: np.empty)."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x), i, m
    if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT16 or not cnp.PyArray_IS_C_CONTIGUOUS(x):
        raise ValueError("half_fast_probe: a C-contiguous float16 array")
    if dy is not None and (cnp.PyArray_SIZE(dy) != n or cnp.PyArray_TYPE(dy) != cnp.NPY_FLOAT16
                           or not cnp.PyArray_IS_C_CONTIGUOUS(dy)):
        raise ValueError("half_fast_probe: dy like x")
    y = np.empty(n, np.float16)
    decided = np.empty((n + 15) // 16, np.bool_)
    cdef const uint16_t* px = <const uint16_t*>cnp.PyArray_DATA(x)
    cdef const uint16_t* pdy = NULL if dy is None else <const uint16_t*>cnp.PyArray_DATA(dy)
    cdef uint16_t* py = <uint16_t*>cnp.PyArray_DATA(<cnp.ndarray>y)
    cdef cnp.npy_bool* pd = <cnp.npy_bool*>cnp.PyArray_DATA(<cnp.ndarray>decided)
    cdef uint32_t undecided
    cdef Py_ssize_t j
    for i in range(0, n, FAST_RUN):
        m = n - i if n - i < FAST_RUN else FAST_RUN
        if pdy == NULL:
            undecided = bncore_half_affine_run(px + i, py + i, m, mean, scale, shift)
        else:
            undecided = bncore_half_dx_run(pdy + i, px + i, py + i, m, mean, scale, a, k)
        for j in range((m + 15) // 16):
            pd[i // 16 + j] = not ((undecided >> j) & 1)
    return y, decided


cdef inline bint _half_fast(const Plan* p) noexcept nogil:
    return BNCORE_HALF_FAST and _half_fast_on and p.rows


cdef enum:
    FAST_RUN = 512        # elements per call of the float32 run functions (32 chunks)


cdef inline void _segment_affine_half(const uint16_t* x, uint16_t* y, Py_ssize_t n, double mu,
                                      double sc, double sh, double* stage) noexcept nogil:
    cdef Py_ssize_t i = 0, j, r, m
    cdef uint32_t undecided
    while i < n:
        r = n - i if n - i < FAST_RUN else FAST_RUN
        undecided = bncore_half_affine_run(x + i, y + i, r, mu, sc, sh)
        j = 0
        while j < r:
            m = r - j if r - j < 16 else 16
            if (undecided >> (j // 16)) & 1:
                bncore_half_to_double_n(x + i + j, stage, m)
                _segment_affine(<const double*>stage, stage + 16, m, mu, sc, sh)
                bncore_half_from_double_n(stage + 16, y + i + j, m)
            j += m
        i += r


cdef inline void _segment_dx_half(const uint16_t* dy, const uint16_t* x, uint16_t* dx,
                                  Py_ssize_t n, double mu, double g, double a, double k,
                                  double* stage) noexcept nogil:
    cdef Py_ssize_t i = 0, j, r, m
    cdef uint32_t undecided
    while i < n:
        r = n - i if n - i < FAST_RUN else FAST_RUN
        undecided = bncore_half_dx_run(dy + i, x + i, dx + i, r, mu, g, a, k)
        j = 0
        while j < r:
            m = r - j if r - j < 16 else 16
            if (undecided >> (j // 16)) & 1:
                bncore_half_to_double_n(dy + i + j, stage, m)
                bncore_half_to_double_n(x + i + j, stage + 16, m)
                _segment_dx_to(<const double*>stage, <const double*>(stage + 16), stage + 32,
                               m, mu, g, a, k)
                bncore_half_from_double_n(stage + 32, dx + i + j, m)
            j += m
        i += r


# --------------------------------------------------------------------------
# Forward statistics

cdef void _block_sums(const Plan* p, const real* x, Py_ssize_t rows, const double* kb,
                      double* scratch, double* ps1, double* ps2, Py_ssize_t c0,
                      Py_ssize_t c1) noexcept nogil:
    """Per-channel sum(x - kb[c]) and sum((x - kb[c])^2) over a block of `rows`
    outer rows; scratch as for _block_mean_m2. Channel tiles take channels c0
    to c1 - 1 (c0 a multiple of TILE; float16 all of them), the other
    schedules all channels (c0 = 0, c1 = C)."""
    cdef Py_ssize_t s, n, c, W = p.W, total = rows * p.P
    cdef double* acc1 = scratch
    cdef double* acc2 = scratch + W
    cdef double* e_kb = scratch + 2 * W
    if _use_tiles(p):
        # running sums in registers, written straight as the channel sums
        if real is uint16_t:
            _tiles_sums_runs(x, rows, p.C, kb, ps1, ps2)
        else:
            _tiles_sums(x, rows, p.C, c0, c1, kb, ps1, ps2, _tile_group(p, sizeof(real), 1))
        return
    _expand(p, kb, e_kb)
    s = 0
    if p.narrow:
        s = total - total % NARROW
        _zero(acc1, NARROW)
        _zero(acc2, NARROW)
        if real is uint16_t:
            _n64_sums_runs(x, s, total, e_kb, acc1, acc2)
            s = total
        else:
            _n64_sums(x, s // NARROW, e_kb, acc1, acc2)
    else:
        _zero(acc1, W)
        _zero(acc2, W)
        if W >= QUAD_MIN:
            while s + 4 * W <= total:
                _flat_add4(x + s, W, e_kb, acc1, acc2)
                s += 4 * W
    while s < total:
        n = total - s if total - s < W else W
        _flat_add(x + s, n, e_kb, acc1, acc2)
        s += W
    _fold(p, acc1, W if total > W else total, ps1)
    _fold(p, acc2, W if total > W else total, ps2)


cdef void _block_mean_m2(const Plan* p, const real* x, Py_ssize_t rows, const double* pivot,
                         double* scratch, double* pm, double* pq, Py_ssize_t c0,
                         Py_ssize_t c1) noexcept nogil:
    """Per-channel mean (less the channel pivot) and M2 of a block of `rows`
    outer rows: one pass against pivots from the block's first row; when some
    channel's pivot is far from its mean, the block's sums are taken again
    with that channel pivoted on the first pass's mean (the others keep theirs,
    so their sums come out the same: every channel's result is its own
    alone, whichever channels c0..c1-1 a call takes, as in _block_sums).

    scratch (_stats_scratch_len doubles) holds the two per-element sums, the
    expanded block pivots and the block pivots; with tiles only the last.
    """
    cdef Py_ssize_t c
    cdef double* kb = scratch if _use_tiles(p) else scratch + 3 * p.W
    cdef double cnt = <double>(rows * p.inner), s1, s2
    cdef bint again = False
    for c in range(c0, c1):
        kb[c] = _pivot_of(_d(x[c * p.inner]))
    _block_sums(p, x, rows, kb, scratch, pm, pq, c0, c1)
    for c in range(c0, c1):
        s1 = pm[c]
        s2 = pq[c]
        _shifted_partial(s1, s2, cnt, kb[c] - pivot[c], &pm[c], &pq[c])
        if _pivot_too_far(s2, pq[c], kb[c] + s1 / cnt):
            kb[c] = kb[c] + s1 / cnt
            again = True
    if not again:
        return
    _block_sums(p, x, rows, kb, scratch, pm, pq, c0, c1)
    for c in range(c0, c1):
        _shifted_partial(pm[c], pq[c], cnt, kb[c] - pivot[c], &pm[c], &pq[c])


cdef inline void _stats_span(const real* xs, const Plan* p, const double* pivot,
                             double* pmean, double* pm2, double* scratch,
                             Py_ssize_t t) noexcept nogil:
    """Item t's partials; xs is the item's first element."""
    cdef Py_ssize_t off, n, c, part
    if p.rows:
        _rows_item(p, t, &off, &n, &c, &part)
        _segment_mean_m2(xs, n, pivot[c], &pmean[part], &pm2[part])
    else:
        _block_mean_m2(p, xs, _block_rows(p, t), pivot, scratch, pmean + t * p.C,
                       pm2 + t * p.C, 0, p.C)


cdef inline void _stats_item(const real* x, const Plan* p, const double* pivot,
                             double* pmean, double* pm2, double* scratch, double* stage,
                             Py_ssize_t t) noexcept nogil:
    cdef Py_ssize_t off, n, c
    _span(p, t, &off, &n, &c)
    if real is uint16_t and not _converts_runs(p):
        bncore_half_to_double_n(x + off, stage, n)
        _stats_span(<const double*>stage, p, pivot, pmean, pm2, scratch, t)
    else:
        _stats_span(x + off, p, pivot, pmean, pm2, scratch, t)


# Every parallel loop below has a serial twin for nthreads == 1: an OpenMP
# region costs microseconds even with one thread, which small inputs notice.
# Per-thread scratch slots (blocks schedule) are cleared per item, so which
# slot an item used never shows in its result.

cdef inline Py_ssize_t _stats_scratch_len(const Plan* p) noexcept nogil:
    """Doubles of per-thread scratch for _block_mean_m2: none for rows, the
    block pivots for tiles, the sums and expanded pivots too otherwise."""
    return 0 if p.rows else p.C if _use_tiles(p) else 3 * p.W + p.C


cdef void _stats_partials(const real* x, const Plan* p, const double* pivot,
                          double* pmean, double* pm2, double* scratch, double* stage,
                          int nthreads) noexcept nogil:
    # stage: one staging buffer per thread (float16 only; else unused)
    cdef Py_ssize_t t
    cdef double* mine
    cdef double* my_stage
    if nthreads == 1:
        for t in range(p.nitems):
            _stats_item(x, p, pivot, pmean, pm2, scratch, stage, t)
        return
    with parallel(num_threads=nthreads):
        mine = scratch + omp_get_thread_num() * _stats_scratch_len(p)
        my_stage = stage + omp_get_thread_num() * _staged(x, p, 1, True)
        for t in prange(p.nitems, schedule='static'):
            _stats_item(x, p, pivot, pmean, pm2, mine, my_stage, t)


cdef enum:
    COMBINE_CHUNK = 64        # channels per work item when combining partials
    COMBINE_SERIAL = 65536    # below this many partials, combine on one thread


cdef inline int _combine_threads(const Plan* p, int nthreads) noexcept nogil:
    return 1 if p.nparts * p.C < COMBINE_SERIAL else nthreads


cdef inline void _combine_chunk_mean_m2(const Plan* p, const double* counts, double total,
                                        Py_ssize_t c0, Py_ssize_t c1, const double* pivot,
                                        const double* pmean, const double* pm2,
                                        double* mean, double* m2) noexcept nogil:
    cdef Py_ssize_t j, c, C = p.C
    cdef double nj, d
    for c in range(c0, c1):
        mean[c] = 0.0
        m2[c] = 0.0
    for j in range(p.nparts):
        nj = counts[j]
        for c in range(c0, c1):
            mean[c] += nj * pmean[j * C + c]
    for c in range(c0, c1):
        mean[c] = mean[c] / total
    for j in range(p.nparts):
        nj = counts[j]
        for c in range(c0, c1):
            d = pmean[j * C + c] - mean[c]
            m2[c] += pm2[j * C + c] + nj * d * d
    if pivot != NULL:
        for c in range(c0, c1):
            mean[c] = pivot[c] + mean[c]


cdef void _combine_mean_m2(const Plan* p, const double* counts, const double* pivot,
                           const double* pmean, const double* pm2, double* mean, double* m2,
                           int nthreads) noexcept nogil:
    """Exact two-level combination, partials in index order:
    mean = K + sum n_j m_j / N,  M2 = sum (M2_j + n_j (m_j - (mean - K))^2),
    the partial means m_j being of x - K for the channel's pivot K (pivot
    NULL: mean receives mean - K, not rounded to |mean|'s precision)."""
    cdef Py_ssize_t t, c0, c1, nchunks = (p.C + COMBINE_CHUNK - 1) // COMBINE_CHUNK
    cdef double total = <double>(p.outer * p.inner)
    if _combine_threads(p, nthreads) == 1:
        _combine_chunk_mean_m2(p, counts, total, 0, p.C, pivot, pmean, pm2, mean, m2)
        return
    for t in prange(nchunks, schedule='static', num_threads=nthreads):
        c0 = t * COMBINE_CHUNK
        c1 = c0 + COMBINE_CHUNK
        if c1 > p.C:
            c1 = p.C
        _combine_chunk_mean_m2(p, counts, total, c0, c1, pivot, pmean, pm2, mean, m2)


cdef void _part_counts(const Plan* p, double* counts) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(p.nparts):
        counts[j] = _part_count(p, j)


# --------------------------------------------------------------------------
# Forward elementwise: y = (x - mean) * scale + shift, in float64

cdef inline void _affine_run(const real* xs, real* ys, Py_ssize_t n, Py_ssize_t c,
                             const Plan* p, const double* mean, const double* scale,
                             const double* shift, const double* e_mean, const double* e_scale,
                             const double* e_shift) noexcept nogil:
    """n elements from xs to ys: part of channel c's row (rows schedule), or
    whole super-rows (blocks; the last may be short)."""
    cdef Py_ssize_t off
    if p.rows:
        _segment_affine(xs, ys, n, mean[c], scale[c], shift[c])
    else:
        if p.narrow:
            off = n - n % NARROW
            _n64_affine(xs, ys, off // NARROW, e_mean, e_scale, e_shift, p.stream)
            _flat_affine(xs + off, ys + off, n - off, e_mean, e_scale, e_shift)
        else:
            _affine_block(xs, ys, n, p.W, e_mean, e_scale, e_shift,
                          _rows_chunk(p, sizeof(real)))


cdef inline void _affine_cols(const real* xs, real* ys, Py_ssize_t m, Py_ssize_t col,
                              Py_ssize_t W, const double* e_mean, const double* e_scale,
                              const double* e_shift) noexcept nogil:
    """m elements from column col of a super-row of W on (wrapping to column 0)."""
    cdef Py_ssize_t j = 0, run
    while j < m:
        run = W - col if W - col < m - j else m - j
        _flat_affine(xs + j, ys + j, run, e_mean + col, e_scale + col, e_shift + col)
        j += run
        col = 0


cdef inline void _affine_item(const real* x, real* y, const Plan* p, const double* mean,
                              const double* scale, const double* shift, const double* e_mean,
                              const double* e_scale, const double* e_shift, double* stage,
                              Py_ssize_t t) noexcept nogil:
    cdef Py_ssize_t off, n, c, j, m, piece
    _span(p, t, &off, &n, &c)
    if real is uint16_t:
        if _half_fast(p):
            _segment_affine_half(x + off, y + off, n, mean[c], scale[c], shift[c], stage)
            return
        piece = _piece_len(p)
        j = 0
        while j < n:
            m = n - j if n - j < piece else piece
            bncore_half_to_double_n(x + off + j, stage, m)
            if _wide_pieces(p):     # (a span starts a super-row: element j is at column j % W)
                _affine_cols(<const double*>stage, stage + piece, m, j % p.W, p.W, e_mean,
                             e_scale, e_shift)
            else:
                _affine_run(<const double*>stage, stage + piece, m, c, p, mean, scale, shift,
                            e_mean, e_scale, e_shift)
            bncore_half_from_double_n(stage + piece, y + off + j, m)
            j += m
    else:
        _affine_run(x + off, y + off, n, c, p, mean, scale, shift, e_mean, e_scale, e_shift)


cdef void _affine(const real* x, real* y, const Plan* p, const double* mean,
                  const double* scale, const double* shift, const double* e_mean,
                  const double* e_scale, const double* e_shift, double* stage,
                  int nthreads) noexcept nogil:
    # stage: two staging buffers per thread (float16 only; else unused)
    cdef Py_ssize_t t
    cdef double* my_stage
    if nthreads == 1:
        for t in range(p.nitems):
            _affine_item(x, y, p, mean, scale, shift, e_mean, e_scale, e_shift, stage, t)
        if p.stream:
            bncore_stream_fence()
        return
    with parallel(num_threads=nthreads):
        my_stage = stage + omp_get_thread_num() * _staged(x, p, 2, False)
        for t in prange(p.nitems, schedule='static'):
            _affine_item(x, y, p, mean, scale, shift, e_mean, e_scale, e_shift, my_stage, t)
        if p.stream:
            bncore_stream_fence()      # once per thread, for its own stores


# --------------------------------------------------------------------------
# Backward: per-channel sum(dy) and sum(dy * (x - mean))

cdef void _block_dy_sums(const Plan* p, const real* dy, const real* x, Py_ssize_t rows,
                         const double* e_mean, double* scratch, double* pa,
                         double* pb) noexcept nogil:
    cdef Py_ssize_t s, n, W = p.W, total = rows * p.P
    cdef double* acc_a = scratch
    cdef double* acc_b = scratch + W
    cdef Py_ssize_t c
    if p.narrow:
        s = total - total % NARROW
        _zero(acc_a, NARROW)
        _zero(acc_b, NARROW)
        if real is uint16_t:
            _n64_dy_sums_runs(dy, x, s, total, e_mean, acc_a, acc_b)
            s = total
        else:
            _n64_dy_sums(dy, x, s // NARROW, e_mean, acc_a, acc_b)
        if s < total:
            _flat_dy_sums(dy + s, x + s, total - s, e_mean, acc_a, acc_b)
        _fold(p, acc_a, W if total > W else total, pa)
        _fold(p, acc_b, W if total > W else total, pb)
        return
    if _use_tiles(p):
        if real is uint16_t:
            _tiles_dy_sums_runs(dy, x, rows, p.C, e_mean, pa, pb)
        else:
            _tiles_dy_sums(dy, x, rows, p.C, 0, p.C, e_mean, pa, pb,
                           _tile_group(p, sizeof(real), 2))
        return
    _zero(acc_a, W)
    _zero(acc_b, W)
    s = 0
    if W >= QUAD_MIN:
        while s + 4 * W <= total:
            _flat_dy_sums4(dy + s, x + s, W, e_mean, acc_a, acc_b)
            s += 4 * W
    while s < total:
        n = total - s if total - s < W else W
        _flat_dy_sums(dy + s, x + s, n, e_mean, acc_a, acc_b)
        s += W
    _fold(p, acc_a, W if total > W else total, pa)
    _fold(p, acc_b, W if total > W else total, pb)


cdef inline void _dy_span(const real* dys, const real* xs, const Plan* p, const double* mean,
                          const double* e_mean, double* psum, double* psumx, double* scratch,
                          Py_ssize_t t) noexcept nogil:
    """Item t's partials; dys and xs are its first elements."""
    cdef Py_ssize_t off, n, c, part
    if p.rows:
        _rows_item(p, t, &off, &n, &c, &part)
        _segment_dy_sums(dys, xs, n, mean[c], &psum[part], &psumx[part])
    else:
        _block_dy_sums(p, dys, xs, _block_rows(p, t), e_mean, scratch, psum + t * p.C,
                       psumx + t * p.C)


cdef inline void _dy_item(const real* dy, const real* x, const Plan* p, const double* mean,
                          const double* e_mean, double* psum, double* psumx, double* scratch,
                          double* stage, Py_ssize_t t) noexcept nogil:
    cdef Py_ssize_t off, n, c
    _span(p, t, &off, &n, &c)
    if real is uint16_t and not _converts_runs(p):
        bncore_half_to_double_n(dy + off, stage, n)
        bncore_half_to_double_n(x + off, stage + n, n)
        _dy_span(<const double*>stage, <const double*>(stage + n), p, mean, e_mean, psum,
                 psumx, scratch, t)
    else:
        _dy_span(dy + off, x + off, p, mean, e_mean, psum, psumx, scratch, t)


cdef void _dy_partials(const real* dy, const real* x, const Plan* p, const double* mean,
                       const double* e_mean, double* psum, double* psumx, double* scratch,
                       double* stage, int nthreads) noexcept nogil:
    # stage: two staging buffers per thread (float16 only; else unused)
    cdef Py_ssize_t t
    cdef double* mine
    cdef double* my_stage
    if nthreads == 1:
        for t in range(p.nitems):
            _dy_item(dy, x, p, mean, e_mean, psum, psumx, scratch, stage, t)
        return
    with parallel(num_threads=nthreads):
        mine = scratch if p.rows else scratch + omp_get_thread_num() * 2 * p.W
        my_stage = stage + omp_get_thread_num() * _staged(x, p, 2, True)
        for t in prange(p.nitems, schedule='static'):
            _dy_item(dy, x, p, mean, e_mean, psum, psumx, mine, my_stage, t)


cdef inline void _combine_chunk_sums(const Plan* p, Py_ssize_t c0, Py_ssize_t c1,
                                     const double* pa, const double* pb, double* sa,
                                     double* sb) noexcept nogil:
    cdef Py_ssize_t j, c, C = p.C
    for c in range(c0, c1):
        sa[c] = 0.0
        sb[c] = 0.0
    for j in range(p.nparts):
        for c in range(c0, c1):
            sa[c] += pa[j * C + c]
            sb[c] += pb[j * C + c]


cdef void _combine_sums(const Plan* p, const double* pa, const double* pb,
                        double* sa, double* sb, int nthreads) noexcept nogil:
    """Per-channel sums of the partials, in partial index order."""
    cdef Py_ssize_t t, c0, c1, nchunks = (p.C + COMBINE_CHUNK - 1) // COMBINE_CHUNK
    if _combine_threads(p, nthreads) == 1:
        _combine_chunk_sums(p, 0, p.C, pa, pb, sa, sb)
        return
    for t in prange(nchunks, schedule='static', num_threads=nthreads):
        c0 = t * COMBINE_CHUNK
        c1 = c0 + COMBINE_CHUNK
        if c1 > p.C:
            c1 = p.C
        _combine_chunk_sums(p, c0, c1, pa, pb, sa, sb)


# --------------------------------------------------------------------------
# Backward elementwise: dx = g * ((dy - a) - (x - mean) * k), in float64.
# Training: g = w*invstd, a = sum(dy)/N, k = invstd^2 * sum(dy*(x-mean))/N.
# Inference (dx = g * dy) takes the affine pass over dy instead, which never
# reads x (_input_grad).

cdef inline void _dx_run(const real* dys, const real* xs, real* dxs, Py_ssize_t n,
                         Py_ssize_t c, const Plan* p, const double* mean, const double* g,
                         const double* a, const double* k, const double* e_mean,
                         const double* e_g, const double* e_a, const double* e_k) noexcept nogil:
    """n elements, as _affine_run."""
    cdef Py_ssize_t off
    if p.rows:
        _segment_dx(dys, xs, dxs, n, mean[c], g[c], a[c], k[c], p.stream)
    else:
        if p.narrow:
            off = n - n % NARROW
            _n64_dx(dys, xs, dxs, off // NARROW, e_mean, e_g, e_a, e_k, p.stream)
            _flat_dx(dys + off, xs + off, dxs + off, n - off, e_mean, e_g, e_a, e_k)
        else:
            _dx_block(dys, xs, dxs, n, p.W, e_mean, e_g, e_a, e_k, p.stream,
                      _rows_chunk(p, sizeof(real)))


cdef inline void _dx_cols(const real* dys, const real* xs, real* dxs, Py_ssize_t m,
                          Py_ssize_t col, Py_ssize_t W, const double* e_mean, const double* e_g,
                          const double* e_a, const double* e_k) noexcept nogil:
    """dx for m elements from column col on, as _affine_cols (also the streamed
    pieces of _dx_block, which may straddle super-rows)."""
    cdef Py_ssize_t j = 0, run
    while j < m:
        run = W - col if W - col < m - j else m - j
        _flat_dx(dys + j, xs + j, dxs + j, run, e_mean + col, e_g + col, e_a + col, e_k + col)
        j += run
        col = 0


cdef inline void _dx_item(const real* dy, const real* x, real* dx, const Plan* p,
                          const double* mean, const double* g, const double* a,
                          const double* k, const double* e_mean, const double* e_g,
                          const double* e_a, const double* e_k, double* stage,
                          Py_ssize_t t) noexcept nogil:
    cdef Py_ssize_t off, n, c, j, m, piece
    _span(p, t, &off, &n, &c)
    if real is uint16_t:
        # (a float16 plan never streams: _streaming)
        if _half_fast(p):
            _segment_dx_half(dy + off, x + off, dx + off, n, mean[c], g[c], a[c], k[c], stage)
            return
        piece = _piece_len(p)
        j = 0
        while j < n:
            m = n - j if n - j < piece else piece
            bncore_half_to_double_n(dy + off + j, stage, m)
            bncore_half_to_double_n(x + off + j, stage + piece, m)
            if _wide_pieces(p):
                _dx_cols(<const double*>stage, <const double*>(stage + piece), stage + 2 * piece,
                         m, j % p.W, p.W, e_mean, e_g, e_a, e_k)
            else:
                _dx_run(<const double*>stage, <const double*>(stage + piece), stage + 2 * piece,
                        m, c, p, mean, g, a, k, e_mean, e_g, e_a, e_k)
            bncore_half_from_double_n(stage + 2 * piece, dx + off + j, m)
            j += m
    else:
        _dx_run(dy + off, x + off, dx + off, n, c, p, mean, g, a, k, e_mean, e_g, e_a, e_k)


cdef void _dx(const real* dy, const real* x, real* dx, const Plan* p, const double* mean,
              const double* g, const double* a, const double* k, const double* e_mean,
              const double* e_g, const double* e_a, const double* e_k, double* stage,
              int nthreads) noexcept nogil:
    # stage: three staging buffers per thread (float16 only; else unused)
    cdef Py_ssize_t t
    cdef double* my_stage
    if nthreads == 1:
        for t in range(p.nitems):
            _dx_item(dy, x, dx, p, mean, g, a, k, e_mean, e_g, e_a, e_k, stage, t)
        if p.stream:
            bncore_stream_fence()
        return
    with parallel(num_threads=nthreads):
        my_stage = stage + omp_get_thread_num() * _staged(x, p, 3, False)
        for t in prange(p.nitems, schedule='static'):
            _dx_item(dy, x, dx, p, mean, g, a, k, e_mean, e_g, e_a, e_k, my_stage, t)
        if p.stream:
            bncore_stream_fence()      # once per thread, for its own stores


# --------------------------------------------------------------------------
# Forward-train and backward in channel strips (channels-last inputs that fit
# in cache, e.g. (256, 1024)): a work item is a strip of STRIP channels over
# every row. It takes the strip's partials block by block (the channel tiles'
# very partials), combines them in block order (as _combine_mean_m2 and
# _combine_sums do), and then writes the strip's y or dx: while the strip's
# x (and dy) are still in L2, where the two-pass schedule reads them back
# from L3 or memory. The same operations on the same values in the same
# order as the two passes (stats() then normalize(); dy_sums() then
# input_grad()), so the same bits (tests/test_batch_norm.py holds them
# together; where several operands of one element are NaN, GCC's operand
# order in the strip's dx loop and in the two passes' may pass on a
# different NaN, so a NaN's sign and payload can differ, as the README
# allows); one parallel region instead of two or three.

cdef enum:
    STRIP = 64                 # channels per strip (a multiple of TILE, so strips
                               # cut the channels where the tiles do)
    STRIP_MAX_BYTES = 65536    # the arrays read twice (x; x and dy), one strip,
                               # all rows: at most this (with _float_rows.h's
                               # column-chunked two passes, 128 KiB strips lost:
                               # float32 (256,1024) 0.95x, (256,512) 0.88x,
                               # (200,1000) 0.90x, float64 (128,1024) 0.93x)
    STRIP_FWD_ROWS = 32        # forward-train: strips only below this block height


cdef bint _strips_on = True        # channel_strips(False): the two passes (tests)


def channel_strips(bint on):
    """Turn the channel-strips schedule on or off (for tests and side-by-side
    benchmarks; results are the same bits either way, a NaN's sign and
    payload aside); returns the former
    setting. Not for use while kernels run on other threads."""
    global _strips_on
    cdef bint was = _strips_on
    _strips_on = on
    return was


cdef inline bint _use_strips(const Plan* p, Py_ssize_t itemsize, int arrays,
                             int nthreads) noexcept nogil:
    """Whether a pass reading `arrays` arrays twice (forward-train 1, backward
    2) runs in channel strips (speed only: the bits are the two-pass
    schedule's either way). float16 keeps the two passes (its staging is
    theirs)."""
    return (_strips_on and _use_tiles(p) and itemsize > 2 and p.outer * p.inner > 0
            and p.outer * STRIP * itemsize * arrays <= STRIP_MAX_BYTES
            # (never binding for backward, whose size cap already keeps the
            # thread count _threads_for gives at or below the strips)
            and _strip_count(p) >= nthreads)


cdef inline bint _forward_strips(const Plan* p, Py_ssize_t itemsize, int nthreads) noexcept nogil:
    # Forward-train reads x twice, not two arrays, and its elementwise half is
    # cheaper than dx: strips won (side by side, 2 threads: (32,2048) 1.35-1.5x,
    # (64,4096) 1.13x, (128,512) 1.06x) only where the two passes had short
    # row blocks (per-block, per-channel pivot and combination work) and more
    # than one thread; on (256,1024) and (512,256) they lost 7-12%, and on one
    # thread 5-16%
    return nthreads > 1 and p.block_rows < STRIP_FWD_ROWS and _use_strips(p, itemsize, 1,
                                                                           nthreads)


cdef inline Py_ssize_t _strip_count(const Plan* p) noexcept nogil:
    return (p.C + STRIP - 1) // STRIP


cdef inline Py_ssize_t _strip_end(const Plan* p, Py_ssize_t t) noexcept nogil:
    """One past strip t's last channel (its first: t * STRIP)."""
    return (t + 1) * STRIP if (t + 1) * STRIP < p.C else p.C


cdef inline double _invstd_of(double m2, double n, double eps) noexcept nogil:
    return 1.0 / sqrt(m2 / n + eps)


cdef void _strip_forward(const wide* x, wide* y, const Plan* p, Py_ssize_t c0, Py_ssize_t c1,
                         double eps, const double* pivot, const double* counts, double* kb,
                         double* pmean, double* pm2, double* mean, double* m2, double* invstd,
                         double* scale, const double* shift) noexcept nogil:
    """Channels c0..c1-1: their partials, mean, M2, invstd, scale and y
    (scale holds the widened weight on entry)."""
    cdef Py_ssize_t t, r, c, C = p.C
    cdef double n = <double>(p.outer * p.inner)
    for t in range(p.nitems):
        _block_mean_m2(p, x + t * p.block_rows * C, _block_rows(p, t), pivot, kb,
                       pmean + t * C, pm2 + t * C, c0, c1)
    # (no _repivot here: strips hold at most STRIP_MAX_BYTES / (STRIP * 4) = 256
    # values per channel, and no value of n lies sqrt(n - 1) std or more from
    # their mean, under the 16 std that would move K)
    _combine_chunk_mean_m2(p, counts, n, c0, c1, pivot, pmean, pm2, mean, m2)
    for c in range(c0, c1):
        invstd[c] = _invstd_of(m2[c], n, eps)
        scale[c] = invstd[c] * scale[c]             # as _gains, once invstd is known
    r = p.outer
    while r > 0:
        r -= 1
        _flat_affine(x + r * C + c0, y + r * C + c0, c1 - c0, mean + c0, scale + c0,
                     shift + c0)


cdef int _strips_forward(const wide* x, wide* y, const Plan* p, Vec weight, Vec bias,
                         double eps, double* mean, double* invstd, double* m2,
                         int nt) noexcept nogil:
    """Forward-train's mean, M2, invstd and y in channel strips."""
    cdef Py_ssize_t C = p.C, t, nstrips = _strip_count(p)
    cdef double* buf = <double*>malloc(sizeof(double) * (2 * p.nparts * C + 4 * C + p.nparts
                                                         + 1))
    if buf == NULL:
        return -1
    cdef double* pmean = buf
    cdef double* pm2 = pmean + p.nparts * C
    cdef double* pivot = pm2 + p.nparts * C
    cdef double* kb = pivot + C
    cdef double* scale = kb + C
    cdef double* shift = scale + C
    cdef double* counts = shift + C
    _channel_pivots(x, p, pivot)
    _part_counts(p, counts)
    _widen(weight, C, 1.0, scale)
    _widen(bias, C, 0.0, shift)
    if nt == 1:
        for t in range(nstrips):
            _strip_forward(x, y, p, t * STRIP, _strip_end(p, t), eps, pivot, counts, kb, pmean,
                           pm2, mean, m2, invstd, scale, shift)
    else:
        for t in prange(nstrips, schedule='static', num_threads=nt):
            _strip_forward(x, y, p, t * STRIP, _strip_end(p, t), eps, pivot, counts, kb, pmean,
                           pm2, mean, m2, invstd, scale, shift)
    free(buf)
    return 0


cdef void _strip(const wide* dy, const wide* x, wide* dx, const Plan* p, Py_ssize_t c0,
                 Py_ssize_t c1, bint training, double n, const double* mean,
                 const double* invstd, const double* g, double* pa, double* pb, double* a,
                 double* k, double* sum_dy, double* sum_dyx) noexcept nogil:
    """Channels c0..c1-1: their partials, sums, a, k and dx."""
    cdef Py_ssize_t t, r, r0, c, C = p.C
    for t in range(p.nitems):
        r0 = t * p.block_rows * C
        _tiles_dy_sums(dy + r0, x + r0, _block_rows(p, t), C, c0, c1, mean, pa + t * C,
                       pb + t * C, _tile_group(p, sizeof(wide), 2))
    _combine_chunk_sums(p, c0, c1, pa, pb, sum_dy, sum_dyx)
    if not training:
        # inference: dx = g * dy, x not read (see _input_grad): the affine pass
        # over dy with mean +0 and shift -0 (a and k hold them here)
        for c in range(c0, c1):
            a[c] = 0.0
            k[c] = -0.0
        r = p.outer
        while r > 0:
            r -= 1
            _flat_affine(dy + r * C + c0, dx + r * C + c0, c1 - c0, a + c0, g + c0, k + c0)
        return
    for c in range(c0, c1):
        _dx_consts(n, invstd[c], sum_dy[c], sum_dyx[c], &a[c], &k[c])
    r = p.outer
    while r > 0:
        r -= 1
        _flat_dx(dy + r * C + c0, x + r * C + c0, dx + r * C + c0, c1 - c0, mean + c0,
                 g + c0, a + c0, k + c0)


cdef int _strips_backward(const wide* dy, const wide* x, wide* dx, const Plan* p,
                          bint training, double n, const double* mean, const double* invstd,
                          Vec weight, double* sum_dy, double* sum_dyx, int nt) noexcept nogil:
    """backward() in channel strips: sum_dy, sum_dyx and dx."""
    cdef Py_ssize_t C = p.C, t, nstrips = _strip_count(p)
    cdef double* buf = <double*>malloc(sizeof(double) * (2 * p.nparts * C + 3 * C + 1))
    if buf == NULL:
        return -1
    cdef double* pa = buf
    cdef double* pb = pa + p.nparts * C
    cdef double* g = pb + p.nparts * C
    cdef double* a = g + C
    cdef double* k = a + C
    _gains(weight, invstd, C, g)
    if nt == 1:
        for t in range(nstrips):
            _strip(dy, x, dx, p, t * STRIP, _strip_end(p, t), training, n, mean, invstd, g, pa,
                   pb, a, k, sum_dy, sum_dyx)
    else:
        for t in prange(nstrips, schedule='static', num_threads=nt):
            _strip(dy, x, dx, p, t * STRIP, _strip_end(p, t), training, n, mean, invstd, g, pa,
                   pb, a, k, sum_dy, sum_dyx)
    free(buf)
    return 0


# --------------------------------------------------------------------------
# Entry points. The Python layer (bncore/batch_norm.py) has checked every
# argument and passes C-contiguous arrays: x / y / dy / dx in the kernel dtype,
# per-channel vectors as float64 (or None). Scratch is one malloc per call.

cdef enum:
    SMALL_WORK = 32768   # elements below which one thread beats waking a team


cdef inline int _threads_for(Py_ssize_t n, int nthreads) noexcept nogil:
    # The thread count never changes a result, so small inputs run on one, and
    # none gets more than one thread per SMALL_WORK / 2 elements (an absurd
    # num_threads would only create idle threads, each with its own scratch)
    if n < SMALL_WORK:
        return 1
    if n // (SMALL_WORK // 2) < nthreads:
        return <int>(n // (SMALL_WORK // 2))
    return nthreads


cdef struct Vec:
    void* data      # NULL: absent
    bint f32        # float32 elements (else float64)


cdef inline Vec _vec(object v):
    """A per-channel vector argument: a C-contiguous float32/float64 array or None."""
    cdef Vec r
    r.data = NULL
    r.f32 = False
    if v is not None:
        r.data = cnp.PyArray_DATA(<cnp.ndarray>v)
        r.f32 = cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.NPY_FLOAT32
    return r


# Per-channel loops widen a vector argument into a float64 array first (one
# loop per storage type) and then compute on plain arrays: with a per-element
# dtype test inside, the loops stayed scalar, and a channel's 1/sqrt(var + eps)
# then cost a serialized scalar sqrt and division.

cdef inline void _widen(Vec v, Py_ssize_t n, double absent, double* out) noexcept nogil:
    cdef Py_ssize_t c
    cdef const float* f
    cdef const double* d
    if v.data == NULL:
        for c in range(n):
            out[c] = absent
    elif v.f32:
        f = <const float*>v.data
        for c in range(n):
            out[c] = <double>f[c]
    else:
        d = <const double*>v.data
        for c in range(n):
            out[c] = d[c]


cdef inline void _narrow(Vec v, Py_ssize_t n, const double* src) noexcept nogil:
    cdef Py_ssize_t c
    cdef float* f
    cdef double* d
    if v.f32:
        f = <float*>v.data
        for c in range(n):
            f[c] = <float>src[c]
    else:
        d = <double*>v.data
        for c in range(n):
            d[c] = src[c]


cdef inline cnp.ndarray _new_vec(Py_ssize_t n):
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_EMPTY(1, dims, cnp.NPY_FLOAT64, 0)


cdef inline const double* _expand_into(const Plan* p, const double* v,
                                       double* buf) noexcept nogil:
    """v expanded to one super-row in buf (blocks schedule), or v when equal."""
    if p.rows or (p.R0 == 1 and p.inner == 1):
        return v
    _expand(p, v, buf)
    return buf


cdef inline Py_ssize_t _expand_len(const Plan* p) noexcept nogil:
    return 0 if p.rows or (p.R0 == 1 and p.inner == 1) else p.W


cdef inline void _channel_pivots(const real* x, const Plan* p, double* pivot) noexcept nogil:
    """Each channel's pivot K_c: its first element (0 if that is Inf or NaN)."""
    cdef Py_ssize_t c
    for c in range(p.C):
        pivot[c] = _pivot_of(_d(x[c * p.inner]))


cdef enum:
    CHANNEL_SPREAD2 = 256  # a channel pivot K is kept only within 16 std of the
                           # channel's mean (N (mean - K)^2 <= 256 M2); else the
                           # statistics are taken again against the mean


cdef inline bint _repivot(const Plan* p, double* pivot, const double* rel,
                          const double* m2) noexcept nogil:
    """Move each channel pivot K_c that lies beyond 16 std of the channel's
    mean (an outlier as the channel's first element) to that mean, K_c +
    rel_c (rel: mean - K); True if any moved. The partial means are stated
    relative to K, so each was rounded to u |mean - K|: 7e-12 std of error in
    the mean for an 8e5 std outlier as K, against 1e-18 elsewhere. Never for
    an Inf or NaN mean (the data hold one: the statistics are already IEEE's)."""
    cdef Py_ssize_t c
    cdef double n = <double>(p.outer * p.inner), m
    cdef bint moved = False
    for c in range(p.C):
        m = pivot[c] + rel[c]
        if n * rel[c] * rel[c] > CHANNEL_SPREAD2 * m2[c] and m - m == 0.0:
            pivot[c] = m
            moved = True
    return moved


cdef int _mean_m2(const real* x, const Plan* p, double* mean, double* m2,
                  int nthreads, double* pivot_out=NULL) noexcept nogil:
    """Per-channel mean and M2 = sum (x - mean)^2 (needs outer * inner >= 1).

    Each work item sums x - P against its own pivot P (one of its elements);
    its partial mean is then stated relative to the channel pivot K_c, the
    channel's first element, as (P - K_c) + S1 / n: partial means are of the
    size of the spread rather than of |mean|, so rounding them costs u * std
    instead of u * |mean|, and the between-partials term of M2 stays exact for
    nearly constant channels. With pivot_out, the pivots K_c are stored there
    and mean receives mean - K_c (not rounded to |mean|'s precision: what the
    distributed combination needs).
    Returns -1 when out of memory.
    """
    cdef Py_ssize_t C = p.C, c
    cdef Py_ssize_t nscr = _stats_scratch_len(p) * nthreads
    cdef Py_ssize_t nstage = _staged(x, p, 1, True) * nthreads
    cdef double* buf = <double*>malloc(sizeof(double) * (2 * p.nparts * C + nscr + C
                                                         + p.nparts + nstage + 1))
    if buf == NULL:
        return -1
    cdef double* pmean = buf
    cdef double* pm2 = pmean + p.nparts * C
    cdef double* scratch = pm2 + p.nparts * C
    cdef double* pivot = scratch + nscr
    cdef double* counts = pivot + C
    cdef double* stage = counts + p.nparts
    _channel_pivots(x, p, pivot)
    _part_counts(p, counts)
    _stats_partials(x, p, pivot, pmean, pm2, scratch, stage, nthreads)
    _combine_mean_m2(p, counts, NULL, pmean, pm2, mean, m2, nthreads)   # mean - K
    if _repivot(p, pivot, mean, m2):
        # a channel's first element was an outlier: its sums again, against its mean
        _stats_partials(x, p, pivot, pmean, pm2, scratch, stage, nthreads)
        _combine_mean_m2(p, counts, NULL, pmean, pm2, mean, m2, nthreads)
    for c in range(C):
        if pivot_out != NULL:
            pivot_out[c] = pivot[c]
        else:
            mean[c] = pivot[c] + mean[c]
    free(buf)
    return 0


cdef int _forward(const real* x, real* y, const Plan* p, bint training, Vec running_mean,
                  Vec running_var, Vec weight, Vec bias, double eps, double momentum,
                  bint unbiased, double* mean, double* invstd, double* m2,
                  int nt) noexcept nogil:
    cdef Py_ssize_t c, C = p.C
    cdef double n = <double>(p.outer * p.inner), nvar = n - 1.0 if unbiased else n
    cdef double* r
    cdef bint strips = False
    if training:
        if real is not uint16_t:
            strips = _forward_strips(p, sizeof(real), nt)
            if strips and _strips_forward(x, y, p, weight, bias, eps, mean, invstd, m2,
                                          nt) != 0:
                return -1
        if not strips:
            if _mean_m2(x, p, mean, m2, nt) != 0:
                return -1
            for c in range(C):
                invstd[c] = _invstd_of(m2[c], n, eps)
        if running_mean.data != NULL:
            # r = (1 - momentum) r + momentum * stat, in float64, stored once
            r = <double*>malloc(sizeof(double) * (C + 1))
            if r == NULL:
                return -1
            _widen(running_mean, C, 0.0, r)
            for c in range(C):
                r[c] = (1.0 - momentum) * r[c] + momentum * mean[c]
            _narrow(running_mean, C, r)
            _widen(running_var, C, 0.0, r)
            for c in range(C):
                r[c] = (1.0 - momentum) * r[c] + momentum * (m2[c] / nvar)
            _narrow(running_var, C, r)
            free(r)
        if strips:
            return 0                    # y is written
    else:
        _widen(running_mean, C, 0.0, mean)
        _widen(running_var, C, 1.0, invstd)
        for c in range(C):
            invstd[c] = 1.0 / sqrt(invstd[c] + eps)
            m2[c] = 0.0
    return _normalize(x, y, p, mean, invstd, weight, bias, nt)


cdef inline void _gains(Vec weight, const double* invstd, Py_ssize_t C,
                        double* g) noexcept nogil:
    """g = invstd * weight (weight None: invstd): the scale of y and the gain
    of dx."""
    cdef Py_ssize_t c
    _widen(weight, C, 1.0, g)
    for c in range(C):
        g[c] = invstd[c] * g[c]


cdef int _normalize(const real* x, real* y, const Plan* p, const double* mean,
                    const double* invstd, Vec weight, Vec bias, int nt,
                    double no_bias=0.0, bint dx_stores=False) noexcept nogil:
    """y = (x - mean) * (invstd * weight) + bias, in float64 (bias absent:
    no_bias; dx_stores: streaming stores where the dx pass takes them, as
    inference dx = g * dy does). Returns -1 when out of memory."""
    cdef Py_ssize_t c, C = p.C, E = _expand_len(p)
    cdef Py_ssize_t nstage = _staged(x, p, 2, False) * nt
    cdef double* buf = <double*>malloc(sizeof(double) * (2 * C + 3 * E + nstage + 1))
    if buf == NULL:
        return -1
    cdef double* scale = buf
    cdef double* shift = scale + C
    cdef double* stage = shift + C + 3 * E
    _gains(weight, invstd, C, scale)
    _widen(bias, C, no_bias, shift)
    cdef const double* e_mean = _expand_into(p, mean, shift + C)
    cdef const double* e_scale = _expand_into(p, scale, shift + C + E)
    cdef const double* e_shift = _expand_into(p, shift, shift + C + 2 * E)
    cdef Plan q, e
    if p.outer * p.inner > 0:
        # the narrow schedule streams y past the caches (_n64_affine)
        e = _elementwise_plan(p)
        q = _streaming(&e, sizeof(real))
        q.stream = q.stream and (p.narrow or dx_stores)
        _affine(x, y, &q, mean, scale, shift, e_mean, e_scale, e_shift, stage, nt)
    free(buf)
    return 0


def forward(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
            bint training, running_mean, running_var, weight, bias, double eps,
            double momentum, bint unbiased, int nthreads):
    """Batch-norm forward on x viewed as (outer, C, inner); writes y.

    training: normalize with the batch mean and biased variance and, when
    given, update running_mean / running_var in place; else normalize with
    them. weight / bias may be None (1 / 0). Per-channel vectors are
    C-contiguous float32 or float64. Returns float64 (mean, invstd, m2),
    m2 = sum (x - mean)^2 (zeros in inference).
    """
    if training and C > 0 and outer * inner == 0:
        # (batch_norm_forward refuses this before; the statistics would read
        # a pivot from an empty array)
        raise ValueError("training needs at least one value per channel")
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef cnp.ndarray mean = _new_vec(C), invstd = _new_vec(C), m2 = _new_vec(C)
    cdef Vec rm = _vec(running_mean)
    cdef Vec rv = _vec(running_var)
    cdef Vec w = _vec(weight)
    cdef Vec b = _vec(bias)
    cdef double* pmean = <double*>cnp.PyArray_DATA(mean)
    cdef double* pinv = <double*>cnp.PyArray_DATA(invstd)
    cdef double* pm2 = <double*>cnp.PyArray_DATA(m2)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    if C > 0:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            with nogil:
                rc = _forward(<const float*>px, <float*>py, &p, training, rm, rv, w, b, eps,
                              momentum, unbiased, pmean, pinv, pm2, nt)
        elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16:
            with nogil:
                rc = _forward(<const uint16_t*>px, <uint16_t*>py, &p, training, rm, rv, w, b, eps,
                              momentum, unbiased, pmean, pinv, pm2, nt)
        else:
            with nogil:
                rc = _forward(<const double*>px, <double*>py, &p, training, rm, rv, w, b, eps,
                              momentum, unbiased, pmean, pinv, pm2, nt)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")
    return mean, invstd, m2


cdef int _sums(const real* dy, const real* x, const Plan* p, const double* mean,
               double* sum_dy, double* sum_dyx, int nt) noexcept nogil:
    """Per-channel sum(dy) and sum(dy * (x - mean)) (needs outer * inner >= 1)."""
    cdef Py_ssize_t C = p.C, E = _expand_len(p)
    cdef Py_ssize_t nscr = 0 if p.rows else 2 * p.W * nt
    cdef Py_ssize_t nstage = _staged(x, p, 2, True) * nt
    cdef double* buf = <double*>malloc(sizeof(double) * (2 * p.nparts * C + nscr + E + nstage
                                                         + 1))
    if buf == NULL:
        return -1
    cdef double* pa = buf
    cdef double* pb = pa + p.nparts * C
    cdef double* scratch = pb + p.nparts * C
    cdef double* stage = scratch + nscr + E
    cdef const double* e_mean = _expand_into(p, mean, scratch + nscr)
    _dy_partials(dy, x, p, mean, e_mean, pa, pb, scratch, stage, nt)
    _combine_sums(p, pa, pb, sum_dy, sum_dyx, nt)
    free(buf)
    return 0


cdef inline void _dx_consts(double n, double s, double sdy, double sdyx,
                            double* a, double* k) noexcept nogil:
    """One channel's a and k of a training dx (invstd s, sums over n values per
    channel). (Inference dx, g * dy, does not go through them: see _input_grad.)"""
    a[0] = sdy / n
    k[0] = s * s * sdyx / n


cdef int _input_grad(const real* dy, const real* x, real* dx, const Plan* p, bint training,
                     double n, const double* mean, const double* invstd, Vec weight,
                     const double* sum_dy, const double* sum_dyx, int nt) noexcept nogil:
    """dx = g * ((dy - a) - (x - mean) * k): g = weight * invstd and, in training,
    a = sum_dy / n, k = invstd^2 * sum_dyx / n (n: values per channel behind the sums)."""
    cdef Py_ssize_t C = p.C, c, E = _expand_len(p)
    cdef Py_ssize_t nstage = _staged(x, p, 3, False) * nt
    cdef Plan q, e
    cdef Vec no_vec
    cdef double* zero
    cdef int rc
    if not training:
        # inference: dx = g * dy, which never reads x (through (x - mean) * 0 an
        # infinite or NaN x, or an x - mean past float64, made dx NaN): the
        # forward's normalization of dy with mean +0 and shift -0, so that
        # (dy - 0) * g + (-0) is g * dy rounded once, the sign of a zero included
        zero = <double*>calloc(C + 1, sizeof(double))
        if zero == NULL:
            return -1
        no_vec.data = NULL
        no_vec.f32 = False
        rc = _normalize(dy, dx, p, zero, invstd, weight, no_vec, nt, -0.0, True)
        free(zero)
        return rc
    cdef double* buf = <double*>malloc(sizeof(double) * (3 * C + 4 * E + nstage + 1))
    if buf == NULL:
        return -1
    cdef double* g = buf
    cdef double* a = g + C
    cdef double* k = a + C
    cdef double* e_buf = k + C
    cdef double* stage = e_buf + 4 * E
    _gains(weight, invstd, C, g)
    for c in range(C):
        _dx_consts(n, invstd[c], sum_dy[c], sum_dyx[c], &a[c], &k[c])
    cdef const double* e_mean = _expand_into(p, mean, e_buf)
    cdef const double* e_g = _expand_into(p, g, e_buf + E)
    cdef const double* e_a = _expand_into(p, a, e_buf + 2 * E)
    cdef const double* e_k = _expand_into(p, k, e_buf + 3 * E)
    if p.outer * p.inner > 0:
        e = _elementwise_plan(p)
        q = _streaming(&e, sizeof(real))
        _dx(dy, x, dx, &q, mean, g, a, k, e_mean, e_g, e_a, e_k, stage, nt)
    free(buf)
    return 0


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer, Py_ssize_t C,
             Py_ssize_t inner, bint training, cnp.ndarray mean, cnp.ndarray invstd, weight,
             int nthreads):
    """Batch-norm backward; writes dx, returns float64 (sum(dy), sum(dy * (x - mean))).

    dx = g * ((dy - a) - (x - mean) * k) with g = weight * invstd and, in
    training, a = sum(dy) / N, k = invstd^2 * sum(dy * (x - mean)) / N
    (inference: dx = g * dy, x not read). The reduction half then the elementwise half,
    the two entry points below, or both at once in channel strips where
    those fit in cache (_use_strips), with the same bits (NaN sign and
    payload aside).
    """
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef double n = <double>(outer * inner)
    cdef cnp.ndarray sum_dy, sum_dyx
    if not _use_strips(&p, cnp.PyArray_ITEMSIZE(x), 2, nt):
        sum_dy, sum_dyx = dy_sums(dy, x, outer, C, inner, mean, nthreads)
        input_grad(dy, x, dx, outer, C, inner, training, n, mean, invstd, weight, sum_dy,
                   sum_dyx, nthreads)
        return sum_dy, sum_dyx
    sum_dy, sum_dyx = _new_vec(C), _new_vec(C)
    cdef double* psd = <double*>cnp.PyArray_DATA(sum_dy)
    cdef double* psx = <double*>cnp.PyArray_DATA(sum_dyx)
    cdef double* m = <double*>cnp.PyArray_DATA(mean)
    cdef double* s = <double*>cnp.PyArray_DATA(invstd)
    cdef Vec w = _vec(weight)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        with nogil:
            rc = _strips_backward(<const float*>pdy, <const float*>px, <float*>pdx, &p, training,
                                  n, m, s, w, psd, psx, nt)
    else:
        with nogil:
            rc = _strips_backward(<const double*>pdy, <const double*>px, <double*>pdx, &p,
                                  training, n, m, s, w, psd, psx, nt)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")
    return sum_dy, sum_dyx


# --------------------------------------------------------------------------
# Split entry points for synchronized batch norm (bncore/distributed.py):
# the statistics and the backward sums are reduced across processes between
# the kernel calls, so each step of forward() and backward() is exposed on
# its own. They run the same nogil kernels, so a rank's partial results are
# bitwise what the single-process drivers compute internally (the channel
# strips included, but for a NaN's sign and payload in dx).

def plan_info(Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, Py_ssize_t itemsize,
              int nthreads=1):
    """The work decomposition of an (outer, C, inner) array, for tests and
    benchmarks: schedule ("rows", "narrow", "tiles" or "flat"), work items,
    elements per rows segment, outer rows per block (of the reductions; and
    per work item of the elementwise passes), rows per super-row (R0),
    super-row length (W), whether dx is written with streaming stores,
    whether forward-train and backward with `nthreads` threads run in
    channel strips, the rows per group of the channel tiles' statistics
    (their backward sums take half as many), and the threads the kernels run
    on when asked for `nthreads` (fewer on small inputs: _threads_for)."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef Plan e = _elementwise_plan(&p)
    cdef Plan q = _streaming(&e, itemsize)
    schedule = ("rows" if p.rows else "narrow" if p.narrow
                else "tiles" if _use_tiles(&p) else "flat")
    cdef int nt = _threads_for(outer * C * inner, nthreads)
    return dict(schedule=schedule, nitems=p.nitems, seg_len=p.seg_len,
                block_rows=p.block_rows, elementwise_rows=e.block_rows, R0=p.R0, W=p.W,
                stream_dx=bool(q.stream),
                forward_strips=bool(_forward_strips(&p, itemsize, nt)),
                backward_strips=bool(_use_strips(&p, itemsize, 2, nt)),
                tile_group_rows=_tile_group(&p, itemsize, 1), threads=nt)


def stats(cnp.ndarray x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner, int nthreads):
    """Per-channel float64 (pivot, mean - pivot, m2) of x viewed as (outer, C,
    inner), without normalizing: the pivot K is the channel's first element (0
    if that is Inf or NaN), mean - K is not rounded to |mean|'s precision, and
    m2 = sum (x - mean)^2. Zeros when outer * inner == 0."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef cnp.ndarray pivot = _new_vec(C), delta = _new_vec(C), m2 = _new_vec(C)
    cdef double* pk = <double*>cnp.PyArray_DATA(pivot)
    cdef double* pd = <double*>cnp.PyArray_DATA(delta)
    cdef double* pm2 = <double*>cnp.PyArray_DATA(m2)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef Py_ssize_t c
    if C > 0 and outer * inner == 0:
        for c in range(C):
            pk[c] = 0.0
            pd[c] = 0.0
            pm2[c] = 0.0
    elif C > 0:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            with nogil:
                rc = _mean_m2(<const float*>px, &p, pd, pm2, nt, pk)
        elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16:
            with nogil:
                rc = _mean_m2(<const uint16_t*>px, &p, pd, pm2, nt, pk)
        else:
            with nogil:
                rc = _mean_m2(<const double*>px, &p, pd, pm2, nt, pk)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")
    return pivot, delta, m2


def normalize(cnp.ndarray x, cnp.ndarray y, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
              cnp.ndarray mean, cnp.ndarray invstd, weight, bias, int nthreads):
    """y = (x - mean) * invstd * weight + bias with given float64 mean / invstd
    (the elementwise half of forward); weight / bias may be None (1 / 0)."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef double* m = <double*>cnp.PyArray_DATA(mean)
    cdef double* s = <double*>cnp.PyArray_DATA(invstd)
    cdef Vec w = _vec(weight)
    cdef Vec b = _vec(bias)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* py = cnp.PyArray_DATA(y)
    if C > 0:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            with nogil:
                rc = _normalize(<const float*>px, <float*>py, &p, m, s, w, b, nt)
        elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16:
            with nogil:
                rc = _normalize(<const uint16_t*>px, <uint16_t*>py, &p, m, s, w, b, nt)
        else:
            with nogil:
                rc = _normalize(<const double*>px, <double*>py, &p, m, s, w, b, nt)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")


def dy_sums(cnp.ndarray dy, cnp.ndarray x, Py_ssize_t outer, Py_ssize_t C, Py_ssize_t inner,
            cnp.ndarray mean, int nthreads):
    """Per-channel float64 (sum(dy), sum(dy * (x - mean))): the reduction half of
    backward. Zeros when outer * inner == 0."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef cnp.ndarray sum_dy = _new_vec(C), sum_dyx = _new_vec(C)
    cdef double* psd = <double*>cnp.PyArray_DATA(sum_dy)
    cdef double* psx = <double*>cnp.PyArray_DATA(sum_dyx)
    cdef double* m = <double*>cnp.PyArray_DATA(mean)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef Py_ssize_t c
    if C > 0 and outer * inner == 0:
        for c in range(C):
            psd[c] = 0.0
            psx[c] = 0.0
    elif C > 0:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            with nogil:
                rc = _sums(<const float*>pdy, <const float*>px, &p, m, psd, psx, nt)
        elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16:
            with nogil:
                rc = _sums(<const uint16_t*>pdy, <const uint16_t*>px, &p, m, psd, psx, nt)
        else:
            with nogil:
                rc = _sums(<const double*>pdy, <const double*>px, &p, m, psd, psx, nt)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")
    return sum_dy, sum_dyx


def input_grad(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, Py_ssize_t outer, Py_ssize_t C,
               Py_ssize_t inner, bint training, double n, cnp.ndarray mean,
               cnp.ndarray invstd, weight, cnp.ndarray sum_dy, cnp.ndarray sum_dyx,
               int nthreads):
    """Writes dx = g * ((dy - a) - (x - mean) * k) (the elementwise half of
    backward) from given float64 sums over n values per channel: g = weight *
    invstd and, in training, a = sum_dy / n, k = invstd^2 * sum_dyx / n."""
    cdef Plan p = make_plan(outer, C, inner)
    cdef int nt = _threads_for(outer * C * inner, nthreads), rc = 0
    cdef double* m = <double*>cnp.PyArray_DATA(mean)
    cdef double* s = <double*>cnp.PyArray_DATA(invstd)
    cdef double* psd = <double*>cnp.PyArray_DATA(sum_dy)
    cdef double* psx = <double*>cnp.PyArray_DATA(sum_dyx)
    cdef Vec w = _vec(weight)
    cdef void* pdy = cnp.PyArray_DATA(dy)
    cdef void* px = cnp.PyArray_DATA(x)
    cdef void* pdx = cnp.PyArray_DATA(dx)
    if C > 0:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            with nogil:
                rc = _input_grad(<const float*>pdy, <const float*>px, <float*>pdx, &p,
                                 training, n, m, s, w, psd, psx, nt)
        elif cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT16:
            with nogil:
                rc = _input_grad(<const uint16_t*>pdy, <const uint16_t*>px, <uint16_t*>pdx, &p,
                                 training, n, m, s, w, psd, psx, nt)
        else:
            with nogil:
                rc = _input_grad(<const double*>pdy, <const double*>px, <double*>pdx, &p,
                                 training, n, m, s, w, psd, psx, nt)
    if rc != 0:
        raise MemoryError("bncore: out of memory for batch-norm scratch")


# --------------------------------------------------------------------------
# Fast paths for the usual call (bncore/batch_norm.py tries them first): every
# argument a plain NumPy array in a layout the kernels take as it is, or None,
# and every scalar already of its checked type and range. They accept only
# calls that the checked path would accept unchanged, never raise for a bad
# argument (they return None and the checked path raises), and run the same
# kernels, so their results are the checked path's bits. In Python these
# checks cost 4-13 us a call (more after a kernel has evicted the caches);
# here well under one.

cdef enum:
    _PLAIN_FLAGS = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED

cdef extern from "numpy/arrayobject.h":
    # a new C-ordered array with `prototype`'s shape and dtype object (metadata
    # included), as np.empty(x.shape, x.dtype) gives on the checked path
    object PyArray_NewLikeArray(cnp.ndarray prototype, cnp.NPY_ORDER order, void* descr,
                                int subok)
    # steals a reference to descr
    object PyArray_NewFromDescr(void* subtype, void* descr, int nd, cnp.npy_intp* dims,
                                cnp.npy_intp* strides, void* data, int flags, void* obj)
    # steals a reference to base
    int PyArray_SetBaseObject(cnp.ndarray arr, void* base) except -1


cdef inline int _plain_type(object a) noexcept:
    """The NumPy type number of an exact ndarray of native float32/float64 that
    is C-contiguous and aligned, else -1."""
    cdef cnp.ndarray arr
    cdef int t
    if type(a) is not cnp.ndarray:
        return -1
    arr = <cnp.ndarray>a
    t = cnp.PyArray_TYPE(arr)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        return -1
    if (cnp.PyArray_FLAGS(arr) & _PLAIN_FLAGS) != _PLAIN_FLAGS or not cnp.PyArray_ISNOTSWAPPED(arr):
        return -1
    return t


cdef inline bint _plain_vector(object v, Py_ssize_t C, bint written) noexcept:
    """None, or a plain (C,) vector (writeable when written)."""
    if v is None:
        return True
    if _plain_type(v) < 0 or cnp.PyArray_NDIM(<cnp.ndarray>v) != 1:
        return False
    if cnp.PyArray_DIMS(<cnp.ndarray>v)[0] != C:
        return False
    return not written or cnp.PyArray_ISWRITEABLE(<cnp.ndarray>v)


cdef inline bint _plain_like(object a, cnp.ndarray x, int t, bint written) noexcept:
    """A plain array of x's type number t and shape (writeable when written)."""
    cdef int d, nd = cnp.PyArray_NDIM(x)
    if _plain_type(a) != t or cnp.PyArray_NDIM(<cnp.ndarray>a) != nd:
        return False
    for d in range(nd):
        if cnp.PyArray_DIMS(<cnp.ndarray>a)[d] != cnp.PyArray_DIMS(x)[d]:
            return False
    return not written or cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a)


cdef inline bint _apart(object a, object b) noexcept:
    """Two plain arrays (or None) share no byte. Contiguous arrays cover their
    whole extent, so this is exactly np.shares_memory's answer."""
    cdef char* pa
    cdef char* pb
    if a is None or b is None:
        return True
    pa = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    return (pa + cnp.PyArray_NBYTES(<cnp.ndarray>a) <= pb
            or pb + cnp.PyArray_NBYTES(<cnp.ndarray>b) <= pa)


cdef enum:
    PAGE = 4096
    PLACED_MIN_BYTES = 65536    # outputs from this size on are placed (below)


cdef inline Py_ssize_t _page_gap(Py_ssize_t a, Py_ssize_t b) noexcept:
    # circular distance of two addresses within a 4 KiB page
    cdef Py_ssize_t d = (a - b) % PAGE
    if d < 0:
        d += PAGE
    return d if d <= PAGE - d else PAGE - d


cdef Py_ssize_t _place_offset(Py_ssize_t xa, Py_ssize_t oa) noexcept:
    """The page offset for a new output beside inputs at addresses xa and oa:
    of the eighths of a page from xa's, cut to a cache line, the one farthest
    from both offsets."""
    cdef Py_ssize_t best = 0, best_score = -1, cand, score, k
    for k in range(1, 8):
        cand = (xa + k * (PAGE // 8)) % PAGE
        cand -= cand % 64        # on a cache line, whatever x's alignment
        score = min(_page_gap(cand, xa % PAGE), _page_gap(cand, oa % PAGE))
        if score > best_score:
            best, best_score = cand, score
    return best


cdef object _placed_array(int nd, cnp.npy_intp* dims, object descr, Py_ssize_t nbytes,
                          Py_ssize_t offset):
    """A new C-ordered array (dims, descr) starting at `offset` within a page:
    a view of a uint8 buffer one page longer (its base)."""
    cdef cnp.npy_intp n = nbytes + PAGE
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &n, cnp.NPY_UINT8, 0)
    cdef cnp.ndarray out
    cdef char* start = <char*>cnp.PyArray_DATA(buf)
    start += (offset - <Py_ssize_t>start % PAGE + PAGE) % PAGE
    Py_INCREF(descr)              # PyArray_NewFromDescr steals a reference
    out = <cnp.ndarray>PyArray_NewFromDescr(<void*>cnp.ndarray, <void*>descr, nd, dims, NULL,
                                            <void*>start, cnp.NPY_ARRAY_CARRAY, NULL)
    Py_INCREF(buf)                # PyArray_SetBaseObject steals a reference
    PyArray_SetBaseObject(out, <void*>buf)
    return out


cdef object _placed_like(cnp.ndarray x, cnp.ndarray other):
    """A new C-ordered array like x (its dtype object, metadata included) whose
    page offset lies half a page from x's (and as far as it can from
    `other`'s): the elementwise passes load x[i] (and dy[i]) and store out[i]
    in the same loop, and where out sits a few bytes after an input within a
    page, each store collides with a later load in the store buffer's 4 KiB
    address check (4K aliasing). A fresh output of 64 KiB or more came from
    the heap 16 bytes into a page or from mmap at the page start, by the
    allocation history: float32 (256,1024) backward took 96-101 us with dx 16-64
    bytes after x and dy, 73-76 with it 256-3072 bytes away (2 threads). Only
    the address changes, never a value."""
    cdef Py_ssize_t nbytes = cnp.PyArray_NBYTES(x)
    cdef Py_ssize_t xa = <Py_ssize_t>cnp.PyArray_DATA(x)
    if nbytes < PLACED_MIN_BYTES:
        return PyArray_NewLikeArray(x, cnp.NPY_CORDER, NULL, 0)
    return _placed_array(cnp.PyArray_NDIM(x), cnp.PyArray_DIMS(x), x.dtype, nbytes,
                         _place_offset(xa, <Py_ssize_t>cnp.PyArray_DATA(other)
                                       if other is not None else xa))


def placed_empty(shape, dtype, near=()):
    """np.empty(shape, dtype), C-ordered, placed as _placed_like places the fast
    paths' outputs, away from the arrays in `near` (at most the first two):
    the checked path's outputs (bncore._layout). Below 64 KiB, or with
    nothing near: np.empty."""
    dtype = np.dtype(dtype)
    cdef tuple dims_t = tuple(int(d) for d in shape)
    cdef int nd = len(dims_t), k
    cdef cnp.npy_intp dims[64]                # NPY_MAXDIMS
    cdef Py_ssize_t nbytes = dtype.itemsize
    addrs = [a.__array_interface__["data"][0] for a in near if isinstance(a, np.ndarray)]
    if not addrs or nd > 64:
        return np.empty(dims_t, dtype)
    for k in range(nd):
        dims[k] = dims_t[k]
        nbytes *= dims_t[k]
    if nbytes < PLACED_MIN_BYTES:
        return np.empty(dims_t, dtype)
    return _placed_array(nd, dims, dtype, nbytes,
                         _place_offset(addrs[0], addrs[1] if len(addrs) > 1 else addrs[0]))


cdef object _output(object out, cnp.ndarray x, tuple others, cnp.ndarray other=None):
    """The array a fast path writes: a new one like x, placed away from x's
    (and `other`'s) page offset (_placed_like), when out is None; else out
    itself when it shares no byte with any of `others`; None when it does (the
    checked path decides)."""
    if out is None:
        return _placed_like(x, other)
    for r in others:
        if not _apart(out, r):
            return None
    return out


cdef inline bint _split_shape(cnp.ndarray x, object axis, Py_ssize_t* outer, Py_ssize_t* C,
                              Py_ssize_t* inner) noexcept:
    """(outer, C, inner) of x around an int axis in range, all > 0."""
    cdef int nd = cnp.PyArray_NDIM(x), ax, i
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    if nd < 2 or type(axis) is not int or not -nd <= axis < nd:
        return False
    ax = <int>axis
    if ax < 0:
        ax += nd
    outer[0] = 1
    inner[0] = 1
    for i in range(ax):
        outer[0] *= dims[i]
    for i in range(ax + 1, nd):
        inner[0] *= dims[i]
    C[0] = dims[ax]
    return C[0] > 0 and outer[0] * inner[0] > 0


cdef inline bint _f32_quiet(double v) noexcept nogil:
    """Casting v to float32 raises no floating-point flag (0, or a magnitude
    in float32's normal range)."""
    return v == 0.0 or FLT_MIN <= fabs(v) <= FLT_MAX


cdef inline int _exact_bool(object b) noexcept:
    """1 / 0 for True / False, -1 for anything else (the checked path decides)."""
    return 1 if b is True else 0 if b is False else -1


def forward_fast(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                 unbiased, out, int nthreads):
    """batch_norm_forward for plain arguments (out None or a plain array like
    x): (y, mean, invstd), or None when any argument needs the checked path."""
    cdef Py_ssize_t outer, C, inner
    cdef int t = _plain_type(x), train = _exact_bool(training), unb = _exact_bool(unbiased)
    if t < 0 or train < 0 or unb < 0:
        return None
    if not _split_shape(<cnp.ndarray>x, axis, &outer, &C, &inner):
        return None
    if out is not None and not _plain_like(out, <cnp.ndarray>x, t, True):
        return None
    if (type(eps) is not float or not 0.0 < <double>eps < INFINITY
            or type(momentum) is not float or not 0.0 <= <double>momentum <= 1.0):
        return None
    if not _plain_vector(weight, C, False) or not _plain_vector(bias, C, False):
        return None
    if (running_mean is None) != (running_var is None):
        return None
    if not train:
        if (running_mean is None or not _plain_vector(running_mean, C, False)
                or not _plain_vector(running_var, C, False)):
            return None
    elif outer * inner < 2:
        return None
    elif running_mean is not None:
        # written in place: writeable, apart from each other and from every input
        if (not _plain_vector(running_mean, C, True) or not _plain_vector(running_var, C, True)
                or not _apart(running_mean, running_var)):
            return None
        for r in (x, weight, bias):
            if not _apart(running_mean, r) or not _apart(running_var, r):
                return None
    # out apart from the running statistics too: inference reads them, training writes them
    y = _output(out, <cnp.ndarray>x, (x, weight, bias, running_mean, running_var))
    if y is None:
        return None
    mean, invstd, _ = forward(<cnp.ndarray>x, <cnp.ndarray>y, outer, C, inner, train,
                              running_mean, running_var, weight, bias, <double>eps,
                              <double>momentum, unb, nthreads)
    return y, mean, invstd


def backward_fast(dy, x, mean, invstd, weight, training, axis, out, int nthreads):
    """batch_norm_backward for plain arguments (mean and invstd float64, as
    forward returns them; out None or a plain array like x, for dx): None when
    any argument needs the checked path, else (dx, sum(dy), sum(dy (x - mean)),
    dweight, dbias), the last two None where NumPy must form them (see below)."""
    cdef Py_ssize_t outer, C, inner, c
    cdef int t = _plain_type(x), train = _exact_bool(training), pt
    cdef cnp.ndarray sd, sx, dw, db
    cdef double* psd
    cdef double* psx
    cdef double* pinv
    cdef double p
    if t < 0 or train < 0 or not _plain_like(dy, <cnp.ndarray>x, t, False):
        return None
    if out is not None and not _plain_like(out, <cnp.ndarray>x, t, True):
        return None
    if not _split_shape(<cnp.ndarray>x, axis, &outer, &C, &inner):
        return None
    if train and outer * inner < 2:
        return None
    if (_plain_type(mean) != cnp.NPY_FLOAT64 or _plain_type(invstd) != cnp.NPY_FLOAT64
            or not _plain_vector(mean, C, False) or not _plain_vector(invstd, C, False)
            or not _plain_vector(weight, C, False)):
        return None
    dx = _output(out, <cnp.ndarray>x, (dy, x, mean, invstd, weight), <cnp.ndarray>dy)
    if dx is None:
        return None
    sd, sx = backward(<cnp.ndarray>dy, <cnp.ndarray>x, <cnp.ndarray>dx, outer, C, inner, train,
                      <cnp.ndarray>mean, <cnp.ndarray>invstd, weight, nthreads)
    # dweight = sum(dy (x - mean)) * invstd and dbias = sum(dy), in float64,
    # then rounded once to weight's dtype (x's when weight is None)
    pt = t if weight is None else cnp.PyArray_TYPE(<cnp.ndarray>weight)
    dw = cnp.PyArray_EMPTY(1, cnp.PyArray_DIMS(sd), pt, 0)
    db = cnp.PyArray_EMPTY(1, cnp.PyArray_DIMS(sd), pt, 0)
    psd = <double*>cnp.PyArray_DATA(sd)
    psx = <double*>cnp.PyArray_DATA(sx)
    pinv = <double*>cnp.PyArray_DATA(<cnp.ndarray>invstd)
    # The checked path forms these with NumPy (a float64 multiply, then astype
    # to float32 where weight is float32), which reports overflow, underflow
    # and invalid results as np.errstate says (a warning, or FloatingPointError).
    # Where any value here is non-finite or near the edge of its range (where
    # such a flag may arise) they are left to the caller's NumPy epilogue
    # (batch_norm._parameter_grads), which then warns or raises (or not)
    # exactly as the checked path does; dx and the sums stand.
    if pt == cnp.NPY_FLOAT32:
        for c in range(C):
            p = psx[c] * pinv[c]
            if not (_f32_quiet(p) and _f32_quiet(psd[c])
                    and (p != 0.0 or psx[c] == 0.0 or pinv[c] == 0.0)):
                return dx, sd, sx, None, None
            (<float*>cnp.PyArray_DATA(dw))[c] = <float>p
            (<float*>cnp.PyArray_DATA(db))[c] = <float>psd[c]
    else:
        for c in range(C):
            p = psx[c] * pinv[c]
            if not ((p == 0.0 and (psx[c] == 0.0 or pinv[c] == 0.0))
                    or 2.0 * DBL_MIN <= fabs(p) < INFINITY):
                return dx, sd, sx, None, None
            (<double*>cnp.PyArray_DATA(dw))[c] = p
            (<double*>cnp.PyArray_DATA(db))[c] = psd[c]
    return dx, sd, sx, dw, db

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Whole-array float16 <-> float64 conversions, in parallel, for the float16
batch-norm path (which computes through float64 copies). NumPy's casts take
about 1.5-2 ns per element on one thread; these use bncore/_half.h's
vectorizable conversions: exact from float16, rounded once (to nearest even)
to float16, so the results are NumPy's ``astype`` bit for bit (but for NaN
payloads: a signaling NaN comes back quiet, as hardware conversions give it).

Both arrays must hold their elements densely in the same order (the caller
checks: C-, Fortran- or permuted-contiguous with matching strides); the
conversion runs over the raw buffers.
"""
from cython.parallel cimport prange
from libc.stdint cimport uint16_t

cimport numpy as cnp

cnp.import_array()

cdef extern from "_half.h" nogil:
    double bncore_half_load(const uint16_t* p)
    void bncore_half_store(uint16_t* p, double v)

cdef enum:
    BLOCK = 65536        # elements per work item
    SMALL = 131072       # below this many elements, one thread


cdef inline int _threads(Py_ssize_t n, Py_ssize_t nblocks, int nthreads) noexcept nogil:
    if n < SMALL:
        return 1
    return <int>nblocks if nblocks < nthreads else nthreads


def to_float64(cnp.ndarray src, cnp.ndarray dst, int nthreads) -> None:
    """dst = src, float16 -> float64 (exact), over the dense buffers."""
    cdef const uint16_t* s = <const uint16_t*>cnp.PyArray_DATA(src)
    cdef double* d = <double*>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src), nb = (n + BLOCK - 1) // BLOCK, b, i, lo, hi
    cdef int nt = _threads(n, nb, nthreads)
    with nogil:
        for b in prange(nb, schedule='static', num_threads=nt):
            lo = b * BLOCK
            hi = lo + BLOCK if lo + BLOCK < n else n
            for i in range(lo, hi):
                d[i] = bncore_half_load(&s[i])


def to_float16(cnp.ndarray src, cnp.ndarray dst, int nthreads) -> None:
    """dst = src, float64 -> float16 rounded once to nearest even, over the dense buffers."""
    cdef const double* s = <const double*>cnp.PyArray_DATA(src)
    cdef uint16_t* d = <uint16_t*>cnp.PyArray_DATA(dst)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(src), nb = (n + BLOCK - 1) // BLOCK, b, i, lo, hi
    cdef int nt = _threads(n, nb, nthreads)
    with nogil:
        for b in prange(nb, schedule='static', num_threads=nt):
            lo = b * BLOCK
            hi = lo + BLOCK if lo + BLOCK < n else n
            for i in range(lo, hi):
                bncore_half_store(&d[i], s[i])

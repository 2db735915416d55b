# cython: language_level=3
"""Runtime facts about the OpenMP this extension was built with."""
from cython.parallel cimport parallel
from bncore._openmp_helpers cimport (
    omp_get_max_threads, omp_get_num_threads, omp_get_thread_num, omp_get_thread_limit,
    BNCORE_HAVE_OPENMP, BNCORE_OPENMP_REQUESTED, BNCORE_BUILD_FLAGS,
    BNCORE_OPENMP_NOTE)


def openmp_enabled() -> bool:
    """True when this binary was compiled with OpenMP (``_OPENMP`` defined)."""
    return bool(BNCORE_HAVE_OPENMP)


def openmp_requested() -> bool:
    """False only when the build was told to go serial (BNCORE_NO_OPENMP=1)."""
    return bool(BNCORE_OPENMP_REQUESTED)


def openmp_note() -> str:
    """Why the build went serial, if it did (empty otherwise)."""
    return BNCORE_OPENMP_NOTE.decode()


def build_flags() -> str:
    """The compiler and linker flags setup.py added to every extension."""
    return BNCORE_BUILD_FLAGS.decode()


def max_threads() -> int:
    """omp_get_max_threads(): honours OMP_NUM_THREADS and threadpoolctl."""
    return omp_get_max_threads()


def thread_limit() -> int:
    """omp_get_thread_limit(): the most threads OpenMP runs at once (OMP_THREAD_LIMIT)."""
    return omp_get_thread_limit()


def threads_in_parallel_region(int n) -> int:
    """Number of threads a parallel region asking for ``n`` really ran with.

    Used by the tests to prove the kernels are parallel, not merely compiled
    with pragmas that were silently ignored.
    """
    # Written through a pointer: names assigned inside a parallel block are
    # thread-private in Cython, memory behind a pointer is shared.
    cdef int seen[1]
    cdef int* out = seen
    seen[0] = 1
    with nogil, parallel(num_threads=n):
        if omp_get_thread_num() == 0:
            out[0] = omp_get_num_threads()
    return seen[0]

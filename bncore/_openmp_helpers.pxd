# Declarations of the OpenMP shim (see _openmp_shim.h); cimport this instead
# of Cython's `openmp` so a build without OpenMP still compiles.
cdef extern from "_openmp_shim.h" nogil:
    int omp_get_max_threads()
    int omp_get_num_threads()
    int omp_get_thread_num()
    int omp_get_num_procs()
    void omp_set_num_threads(int n)
    int omp_get_thread_limit()
    int BNCORE_HAVE_OPENMP
    int BNCORE_OPENMP_REQUESTED
    const char* BNCORE_BUILD_FLAGS
    const char* BNCORE_OPENMP_NOTE

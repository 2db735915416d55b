/* OpenMP shim: the same Cython sources build with or without OpenMP.
 * Without _OPENMP the runtime queries answer as a one-thread runtime would,
 * so kernels keep one code path and the build stays serial but correct. */
#ifndef BNCORE_OPENMP_SHIM_H
#define BNCORE_OPENMP_SHIM_H
#ifdef _OPENMP
#include <omp.h>
#define BNCORE_HAVE_OPENMP 1
#else
static inline int omp_get_max_threads(void) { return 1; }
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_procs(void) { return 1; }
static inline void omp_set_num_threads(int n) { (void)n; }
static inline int omp_get_thread_limit(void) { return 1; }
#define BNCORE_HAVE_OPENMP 0
#endif

/* Build description baked in by setup.py (so show_config reports what this
 * binary was really compiled with, not what the source tree says). */
#ifndef BNCORE_BUILD_FLAGS
#define BNCORE_BUILD_FLAGS "unknown"
#endif
#ifndef BNCORE_OPENMP_REQUESTED
#define BNCORE_OPENMP_REQUESTED 1
#endif
#ifndef BNCORE_OPENMP_NOTE
#define BNCORE_OPENMP_NOTE ""
#endif
#endif

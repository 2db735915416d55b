// Device helpers shared by the kernel files of bncore_gpu. Each .cu file
// includes this one; bncore_gpu/_loader.py pastes it in place of the
// #include line before CuPy compiles the file, so that CuPy's kernel cache,
// keyed by the source text, sees a change here too. No host headers (NVRTC).
#ifndef BNCORE_COMMON_CUH
#define BNCORE_COMMON_CUH

// Shared memory is declared through these macros so that tests/cuda_host can
// compile the kernel files as host C++ (one OS thread per CUDA thread, each
// block's shared arrays its own): there cuda_host.h defines them.
#ifndef BNC_HOST_EMULATION
#define BNC_SHARED(type, name, n) __shared__ type name[n]
#define BNC_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// A load that always goes to memory (a grid barrier's spin); tests/cuda_host
// makes it an atomic load, which is what ThreadSanitizer can reason about.
#ifndef BNC_HOST_EMULATION
__device__ __forceinline__ unsigned int dev_ld_volatile(const unsigned int* p) {
    return *(const volatile unsigned int*)p;
}
#endif

// float32 <-> float64 without flushing subnormals. CuPy compiles every
// RawModule with -ftz=true (appended after the caller's options, so it cannot
// be overridden), which makes a plain cast a cvt.ftz: a subnormal float32
// read as 0, a result below 2^-126 stored as 0, on the GPU only. These are
// the IEEE conversions, written in PTX; every float32 load and store of the
// kernels goes through them (tests/test_cuda_compile.py checks the PTX).
#ifndef BNC_HOST_EMULATION
__device__ __forceinline__ double f2d(float f) {
    double d;
    asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(f));
    return d;
}
__device__ __forceinline__ float d2f(double d) {
    float f;
    asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(d));
    return f;
}
#else
__device__ __forceinline__ double f2d(float f) { return (double)f; }
__device__ __forceinline__ float d2f(double d) { return (float)d; }
#endif

// Storage types: float, double, and unsigned short holding IEEE binary16;
// arithmetic in float64.
__device__ __forceinline__ double dev_ld(const float* p) { return f2d(*p); }
__device__ __forceinline__ double dev_ld(const double* p) { return *p; }
__device__ __forceinline__ void dev_st(float* p, double v) { *p = d2f(v); }
__device__ __forceinline__ void dev_st(double* p, double v) { *p = v; }
#ifndef BNC_HOST_EMULATION      // PTX: left out where tests/cuda_host compiles for the CPU
__device__ __forceinline__ double dev_ld(const unsigned short* p) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(*p));
    return f2d(f);
}
__device__ __forceinline__ void dev_st(unsigned short* p, double v) {
    // straight from float64, rounded once to nearest-even: through float32
    // a value just above a binary16 halfway point could round twice, down
    unsigned short h;
    asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(v));
    *p = h;
}
#endif

// Fixed-order tree reduction of two doubles over the block (any power-of-two
// size); every thread returns the totals (read after the last barrier). A
// second call in the same block needs a __syncthreads() first, so that no
// thread is still reading sa[0] / sb[0] when they are overwritten.
__device__ __forceinline__ void dev_block_sum2(double& a, double& b, double* sa, double* sb) {
    int t = threadIdx.x + threadIdx.y * blockDim.x;
    int n = blockDim.x * blockDim.y;
    sa[t] = a;
    sb[t] = b;
    __syncthreads();
    for (int w = n / 2; w > 0; w >>= 1) {
        if (t < w) {
            sa[t] += sa[t + w];
            sb[t] += sb[t + w];
        }
        __syncthreads();
    }
    a = sa[0];
    b = sb[0];
}

#endif  // BNCORE_COMMON_CUH

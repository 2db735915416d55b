// Just enough of CUDA to run a kernel file as host C++ (tests/cuda_host/):
// every CUDA thread of a cluster is an OS thread; __syncthreads() and the
// cluster barrier are std::barriers; __shared__ storage (BNC_SHARED) is
// allocated per CTA; bnc_remote reads another CTA's copy. Memory-model
// details of the GPU are not emulated (barriers here are sequentially
// consistent), but indexing, barrier placement, reduction order and what
// each CTA reads from which are the kernel's own. A CTA's shared memory is
// poisoned when its last thread returns.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#define BNC_HOST_EMULATION 1
#define EMU_NO_THREADS 77     // exit status: the machine refused the threads
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __cluster_dims__(...)
#define __launch_bounds__(...)

struct float4 { float x, y, z, w; };

// Cache-hinted loads and stores, fences and atomics: the hints change nothing
// on the host; fences are sequentially consistent, atomics are the compiler's.
template <typename T> inline T __ldcg(const T *p) { return *p; }
template <typename T> inline T __ldcs(const T *p) { return *p; }
template <typename T> inline void __stcs(T *p, T v) { *p = v; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned atomicAdd(unsigned *p, unsigned v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline unsigned dev_ld_volatile(const unsigned *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
struct dim3_ { unsigned x, y, z; };

struct EmuCTA {                              // one CTA's shared memory and barrier
    std::mutex lock;
    std::map<int, std::vector<char>> slots;  // static __shared__ arrays, by declaration
    std::vector<char> dynamic;               // extern __shared__
    std::barrier<> *block_barrier;
    std::atomic<unsigned> exited{0};         // threads that have returned
};

struct EmuCluster {
    std::vector<EmuCTA> ctas;
    std::barrier<> *cluster_barrier;
};

inline thread_local dim3_ threadIdx, blockIdx, blockDim, gridDim;
inline thread_local unsigned emu_rank;
inline thread_local EmuCluster *emu_cluster;

inline void __syncthreads() { emu_cluster->ctas[emu_rank].block_barrier->arrive_and_wait(); }

inline void *emu_shared(int slot, size_t bytes) {
    EmuCTA &cta = emu_cluster->ctas[emu_rank];
    std::lock_guard<std::mutex> g(cta.lock);
    auto it = cta.slots.find(slot);
    if (it == cta.slots.end()) {
        std::vector<char> mem(bytes);
        std::memset(mem.data(), 0x7f, bytes);      // garbage, as on a GPU
        it = cta.slots.emplace(slot, std::move(mem)).first;
    }
    return it->second.data();
}

#define BNC_SHARED(type, name, n) type *name = (type *)emu_shared(__COUNTER__, sizeof(type) * (n))
#define BNC_DYNAMIC_SHARED(type, name) type *name = (type *)emu_cluster->ctas[emu_rank].dynamic.data()

inline thread_local std::optional<std::barrier<>::arrival_token> emu_token;

inline unsigned bnc_cluster_rank() { return emu_rank; }
inline void bnc_cluster_arrive() { emu_token.emplace(emu_cluster->cluster_barrier->arrive()); }
inline void bnc_cluster_wait() {
    emu_cluster->cluster_barrier->wait(std::move(*emu_token));
    emu_token.reset();
}
inline void bnc_cluster_sync() {
    bnc_cluster_arrive();
    bnc_cluster_wait();
}

// The same slot and offset in CTA `rank`. Called only after a cluster barrier,
// by which every CTA has declared (allocated) all of its shared arrays, so the
// slot maps are no longer written and need no lock.
inline double bnc_remote(const double *p, unsigned rank) {
    EmuCTA &own = emu_cluster->ctas[emu_rank];
    EmuCTA &other = emu_cluster->ctas[rank];
    for (auto &kv : own.slots) {
        const char *base = kv.second.data();
        const char *q = (const char *)p;
        if (q >= base && q < base + kv.second.size()) {
            auto it = other.slots.find(kv.first);
            if (it == other.slots.end()) throw "bnc_remote: slot not declared in that CTA";
            double v;
            std::memcpy(&v, it->second.data() + (q - base), sizeof v);
            return v;
        }
    }
    throw "bnc_remote: not a shared-memory address";
}

// Runs kernel(args...) on grid (nclusters * S) x block (T), S CTAs per cluster,
// one cluster at a time, every CTA of the cluster with `dyn` bytes of dynamic
// shared memory.
template <typename F>
void emu_launch(unsigned grid, unsigned T, unsigned S, size_t dyn, F kernel) {
    for (unsigned cl = 0; cl < grid / S; ++cl) {
        EmuCluster cluster;
        cluster.ctas = std::vector<EmuCTA>(S);
        std::barrier<> cbar(S * T);
        std::vector<std::barrier<> *> bbars;
        for (auto &cta : cluster.ctas) {
            cta.dynamic.assign(dyn, (char)0x7f);
            bbars.push_back(new std::barrier<>(T));
            cta.block_barrier = bbars.back();
        }
        cluster.cluster_barrier = &cbar;
        std::vector<std::thread> threads;
        for (unsigned r = 0; r < S; ++r)
            for (unsigned t = 0; t < T; ++t)
                try {
                threads.emplace_back([&, r, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {cl * S + r, 0, 0};
                    blockDim = {T, 1, 1};
                    gridDim = {grid, 1, 1};
                    emu_rank = r;
                    emu_cluster = &cluster;
                    kernel();
                    // the CTA's last thread out: its shared memory is gone
                    // (poisoned), as when the SM hands it to the next CTA; a
                    // remote read not ordered before this by a cluster barrier
                    // is a data race under ThreadSanitizer and reads garbage
                    EmuCTA &cta = cluster.ctas[r];
                    if (cta.exited.fetch_add(1, std::memory_order_acq_rel) + 1 == T) {
                        for (auto &kv : cta.slots)
                            std::memset(kv.second.data(), 0xff, kv.second.size());
                        std::memset(cta.dynamic.data(), 0xff, cta.dynamic.size());
                    }
                });
                } catch (const std::system_error &e) {
                    // the barriers need every thread of the cluster alive at once
                    std::fprintf(stderr, "cannot start %u threads: %s\n", S * T, e.what());
                    std::_Exit(EMU_NO_THREADS);
                }
        for (auto &th : threads) th.join();
        for (auto *b : bbars) delete b;
    }
}

// Runs kernel() on a 2-D grid (gx, gy) of T-thread blocks, one block at a
// time (for kernels without grid-wide synchronization).
template <typename F>
void emu_launch_2d(unsigned gx, unsigned gy, unsigned T, F kernel) {
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
            EmuCluster cluster;
            cluster.ctas = std::vector<EmuCTA>(1);
            std::barrier<> cbar(T), bbar(T);
            cluster.ctas[0].block_barrier = &bbar;
            cluster.cluster_barrier = &cbar;
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < T; ++t)
                try {
                    threads.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {bx, by, 0};
                        blockDim = {T, 1, 1};
                        gridDim = {gx, gy, 1};
                        emu_rank = 0;
                        emu_cluster = &cluster;
                        kernel();
                    });
                } catch (const std::system_error &e) {
                    std::fprintf(stderr, "cannot start %u threads: %s\n", T, e.what());
                    std::_Exit(EMU_NO_THREADS);
                }
            for (auto &th : threads) th.join();
        }
}

// Raw binary files of the host harnesses' inputs and outputs.
template <typename T>
std::vector<T> emu_load(const std::string &path, size_t n) {
    std::vector<T> v(n);
    FILE *f = std::fopen(path.c_str(), "rb");
    if (!f || std::fread(v.data(), sizeof(T), n, f) != n) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    std::fclose(f);
    return v;
}

template <typename T>
void emu_save(const std::string &path, const std::vector<T> &v) {
    FILE *f = std::fopen(path.c_str(), "wb");
    std::fwrite(v.data(), sizeof(T), v.size(), f);
    std::fclose(f);
}

// Runs bncore_gpu/_bn_cluster_kernels.cu on the host (see cuda_host.h), for
// tests/test_cuda_host.py: inputs and outputs are raw files in a directory.
//   bn_cluster_host forward  DIR outer C inner momentum unbiased affine
//   bn_cluster_host backward DIR outer C inner training affine
#include "cuda_host.h"
#include "../../bncore_gpu/_bn_cluster_kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <string>


int main(int argc, char **argv) {
    if (argc < 8) return 2;
    std::string mode = argv[1], dir = std::string(argv[2]) + "/";
    long long outer = std::atoll(argv[3]);
    int C = std::atoi(argv[4]);
    long long inner = std::atoll(argv[5]);
    size_t n = (size_t)(outer * C * inner);
    double N = (double)(outer * inner);
    long long Q = (outer + BNC_CLUSTER - 1) / BNC_CLUSTER;
    auto x = emu_load<float>(dir + "x.bin", n);
    if (mode == "forward") {
        double momentum = std::atof(argv[6]);
        int unbiased = std::atoi(argv[7]);
        int affine = std::atoi(argv[8]);
        auto w = emu_load<float>(dir + "w.bin", C), b = emu_load<float>(dir + "b.bin", C);
        auto rm = emu_load<float>(dir + "rm.bin", C), rv = emu_load<float>(dir + "rv.bin", C);
        std::vector<float> y(n);
        std::vector<double> mean(C), invstd(C);
        emu_launch(BNC_CLUSTER * C, BNC_THREADS, BNC_CLUSTER, (size_t)(Q * inner * 4), [&] {
            bn_forward_cluster<float>((const float4 *)x.data(), (float4 *)y.data(), outer, C,
                                      inner / 4, N, 1e-5, affine ? w.data() : nullptr,
                                      affine ? b.data() : nullptr, rm.data(), rv.data(),
                                      momentum, unbiased, mean.data(), invstd.data());
        });
        emu_save(dir + "y.out", y);
        emu_save(dir + "mean.out", mean);
        emu_save(dir + "invstd.out", invstd);
        emu_save(dir + "rm.out", rm);
        emu_save(dir + "rv.out", rv);
    } else {
        int training = std::atoi(argv[6]);
        int affine = std::atoi(argv[7]);
        auto dy = emu_load<float>(dir + "dy.bin", n);
        auto w = emu_load<double>(dir + "w64.bin", C);
        auto mean = emu_load<double>(dir + "mean.bin", C), invstd = emu_load<double>(dir + "invstd.bin", C);
        std::vector<float> dx(n);
        std::vector<double> dw(C), db(C);
        emu_launch(BNC_CLUSTER * C, BNC_THREADS, BNC_CLUSTER, (size_t)(2 * Q * inner * 4), [&] {
            bn_backward_cluster<double>((const float4 *)dy.data(), (const float4 *)x.data(),
                                        (float4 *)dx.data(), outer, C, inner / 4, N, training,
                                        mean.data(), invstd.data(), affine ? w.data() : nullptr,
                                        dw.data(), db.data());
        });
        emu_save(dir + "dx.out", dx);
        emu_save(dir + "dw.out", dw);
        emu_save(dir + "db.out", db);
    }
    return 0;
}

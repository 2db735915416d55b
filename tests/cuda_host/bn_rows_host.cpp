// Runs the float4 rows kernels of bncore_gpu/_bn_kernels.cu on the host (see
// cuda_host.h), for tests/test_cuda_host.py: the three-kernel training path
// (tile reduction, per-channel finalize, elementwise pass) and the cooperative
// kernel that runs the same three as phases of one grid, with every block of
// that grid an OS-thread block running at the same time (grid barriers and
// all). Inputs and outputs are raw files in a directory; outputs of the three
// kernels end in 3.out, of the cooperative kernel in c.out.
//   bn_rows_host forward  DIR outer C inner TC nRB R blocks walkR
//   bn_rows_host backward DIR outer C inner TC nRB R blocks walkR training wf32
// (walkR: the three-kernel elementwise pass walks the tiles backwards (1) or
// grid-strides over the rows with 3 row blocks (0); wf32: weight and the
// parameter gradients in float32 (1, w32.bin) or float64 (0, w64.bin).)
#include "cuda_host.h"
#include "../../bncore_gpu/_bn_kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <string>


// The backward both ways, weight and parameter gradients in PT.
template <typename PT>
static void backward(const std::string &dir, const std::vector<PT> &w,
                     const std::vector<float> &dy, const std::vector<float> &x,
                     const std::vector<double> &mean, const std::vector<double> &invstd,
                     long long outer, int C, long long inner, int TC, int nRB, long long R,
                     unsigned blocks, long long R3, unsigned rows_y, int training,
                     unsigned &bar) {
    long long P4 = (long long)C * inner / 4;
    unsigned ntile = (unsigned)((P4 + TC - 1) / TC);
    size_t n = (size_t)(outer * C * inner), npart = (size_t)(4 * P4 * nRB);
    int M = (int)(inner * nRB);
    double N = (double)(outer * inner);
    const float4 *x4 = (const float4 *)x.data(), *dy4 = (const float4 *)dy.data();
    std::vector<float> dx(n);
    std::vector<double> pa(npart), pb(npart), g(C), a(C), k(C);
    std::vector<PT> dw(C), db(C);
    emu_launch_2d(ntile, nRB, BN_THREADS, [&] {
        bn_dy_sums_rows_vec4(dy4, x4, outer, inner, P4, TC, R, nRB, mean.data(), pa.data(),
                             pb.data());
    });
    emu_launch_2d(C, 1, BN_THREADS, [&] {
        bn_finalize_backward<PT>(C, M, pa.data(), pb.data(), N, training, invstd.data(),
                                 w.data(), dw.data(), db.data(), g.data(), a.data(), k.data());
    });
    if (training) {
        emu_launch_2d(ntile, rows_y, BN_THREADS, [&] {
            bn_dx_rows_vec4(dy4, x4, (float4 *)dx.data(), outer, P4, inner, TC, R3, mean.data(),
                            g.data(), a.data(), k.data());
        });
    } else {   // inference dx = g dy, as bncore_gpu sends it: the apply pass over dy
        std::vector<double> zero(C, 0.0), negzero(C, -0.0);
        emu_launch_2d(ntile, rows_y, BN_THREADS, [&] {
            bn_apply_rows_vec4(dy4, (float4 *)dx.data(), outer, P4, inner, TC, R3, zero.data(),
                               g.data(), negzero.data());
        });
    }
    emu_save(dir + "dx3.out", dx), emu_save(dir + "dw3.out", dw), emu_save(dir + "db3.out", db);
    for (int launch = 0; launch < 2; ++launch) {
        std::vector<float> dxc(n, -1.0f);
        std::vector<PT> dwc(C, (PT)1e30), dbc(C, (PT)1e30);
        std::vector<double> work(2 * npart + 3 * C, 1e300);
        emu_launch(blocks, BN_THREADS, blocks, 0, [&] {
            bn_backward_rows_coop<PT>(dy4, x4, (float4 *)dxc.data(), outer, inner, P4, TC, R, nRB,
                                      C, N, training, mean.data(), invstd.data(), w.data(),
                                      dwc.data(), dbc.data(), work.data(), &bar);
        });
        emu_save(dir + "dxc.out", dxc), emu_save(dir + "dwc.out", dwc);
        emu_save(dir + "dbc.out", dbc);
    }
}

int main(int argc, char **argv) {
    if (argc < 11) return 2;
    if (std::string(argv[1]) == "backward" && argc < 13) return 2;
    std::string mode = argv[1], dir = std::string(argv[2]) + "/";
    long long outer = std::atoll(argv[3]);
    int C = std::atoi(argv[4]);
    long long inner = std::atoll(argv[5]);
    int TC = std::atoi(argv[6]), nRB = std::atoi(argv[7]);
    long long R = std::atoll(argv[8]);
    unsigned blocks = (unsigned)std::atoi(argv[9]);
    int walkR = std::atoi(argv[10]);
    long long P4 = (long long)C * inner / 4;
    unsigned ntile = (unsigned)((P4 + TC - 1) / TC);
    size_t n = (size_t)(outer * C * inner), npart = (size_t)(4 * P4 * nRB);
    int M = (int)(inner * nRB);
    double N = (double)(outer * inner);
    long long R3 = walkR ? R : 0;
    unsigned rows_y = walkR ? (unsigned)nRB : 3u;
    unsigned bar = 0;
    auto x = emu_load<float>(dir + "x.bin", n);
    const float4 *x4 = (const float4 *)x.data();
    if (mode == "forward") {
        auto w = emu_load<float>(dir + "w.bin", C), b = emu_load<float>(dir + "b.bin", C);
        auto rm0 = emu_load<float>(dir + "rm.bin", C), rv0 = emu_load<float>(dir + "rv.bin", C);
        // three kernels
        std::vector<float> y(n), rm = rm0, rv = rv0;
        std::vector<double> s1(npart), s2(npart), mean(C), invstd(C), scale(C), shift(C);
        emu_launch_2d(ntile, nRB, BN_THREADS, [&] {
            bn_stats_rows_vec4(x4, outer, inner, P4, TC, R, nRB, s1.data(), s2.data());
        });
        emu_launch_2d(C, 1, BN_THREADS, [&] {
            bn_finalize_train<float, float>(x.data(), C, inner, outer, M, s1.data(), s2.data(),
                                            N, 1e-5, w.data(), b.data(), rm.data(), rv.data(),
                                            0.1, 1, mean.data(), invstd.data(), scale.data(),
                                            shift.data());
        });
        emu_launch_2d(ntile, rows_y, BN_THREADS, [&] {
            bn_apply_rows_vec4(x4, (float4 *)y.data(), outer, P4, inner, TC, R3, mean.data(),
                               scale.data(), shift.data());
        });
        emu_save(dir + "y3.out", y), emu_save(dir + "mean3.out", mean), emu_save(dir + "invstd3.out", invstd);
        emu_save(dir + "rm3.out", rm), emu_save(dir + "rv3.out", rv);
        // the cooperative kernel, twice on one barrier word (the second from fresh copies)
        for (int launch = 0; launch < 2; ++launch) {
            std::vector<float> yc(n, -1.0f), rmc = rm0, rvc = rv0;
            std::vector<double> meanc(C), invc(C), work(2 * npart + 2 * C, 1e300);
            emu_launch(blocks, BN_THREADS, blocks, 0, [&] {
                bn_forward_rows_coop<float>(x4, (float4 *)yc.data(), outer, inner, P4, TC, R, nRB,
                                            C, N, 1e-5, w.data(), b.data(), rmc.data(),
                                            rvc.data(), 0.1, 1, meanc.data(), invc.data(),
                                            work.data(), &bar);
            });
            if (bar & 0x7FFFFFFFu) {
                std::fprintf(stderr, "barrier word left at %#x\n", bar);
                return 3;
            }
            emu_save(dir + "yc.out", yc), emu_save(dir + "meanc.out", meanc), emu_save(dir + "invstdc.out", invc);
            emu_save(dir + "rmc.out", rmc), emu_save(dir + "rvc.out", rvc);
        }
    } else {
        int training = std::atoi(argv[11]);
        int wf32 = std::atoi(argv[12]);
        auto dy = emu_load<float>(dir + "dy.bin", n);
        auto mean = emu_load<double>(dir + "mean.bin", C), invstd = emu_load<double>(dir + "invstd.bin", C);
        if (wf32)
            backward<float>(dir, emu_load<float>(dir + "w32.bin", C), dy, x, mean, invstd, outer,
                            C, inner, TC, nRB, R, blocks, R3, rows_y, training, bar);
        else
            backward<double>(dir, emu_load<double>(dir + "w64.bin", C), dy, x, mean, invstd,
                             outer, C, inner, TC, nRB, R, blocks, R3, rows_y, training, bar);
        if (bar & 0x7FFFFFFFu) {
            std::fprintf(stderr, "barrier word left at %#x\n", bar);
            return 3;
        }
    }
    return 0;
}

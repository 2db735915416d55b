"""Host time and GPU time of one batch-norm call, apart: which of the two bounds
each case of the GPU benchmark (scripts/bench_gpu.py times back-to-back
calls, so max(host, GPU) per call).

cupyx.profiler.benchmark synchronizes after every call and reports the host
time of the call and the GPU time between events recorded before and after it
(kernels, and the gaps between a call's kernels). Median of N calls, in
microseconds, for bncore_gpu and for torch (cuDNN) on the same arrays.

    python scripts/gpu_split_times.py [--calls N]
    ncu --metrics gpu__time_duration.sum -k regex:bn_ --csv \
        python scripts/gpu_split_times.py --once       # each kernel's GPU time
"""
from __future__ import annotations

import argparse

import numpy as np

from bench_gpu import bn_arrays


def split_us(fn, calls: int):
    from cupyx.profiler import benchmark
    r = benchmark(fn, n_repeat=calls, n_warmup=20)
    return float(np.median(r.cpu_times)) * 1e6, float(np.median(r.gpu_times[0])) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--once", action="store_true",
                    help="call bncore_gpu's forward and backward once per case, nothing else "
                         "(for a kernel profiler)")
    args = ap.parse_args()

    import cupy
    import torch

    import bncore_gpu
    F = torch.nn.functional
    cases = [("(16,64,8,8) NCHW", (16, 64, 8, 8), False),
             ("(256,1024)", (256, 1024), False),
             ("(32,64,56,56) NCHW", (32, 64, 56, 56), False),
             ("(32,64,56,56) channels-last", (32, 64, 56, 56), True),
             ("(128,256,28,28) channels-last", (128, 256, 28, 28), True)]
    if not args.once:
        print("| case | op | bncore host us | bncore GPU us | torch host us | torch GPU us |")
        print("|---|---|---|---|---|---|")
    for label, shape, cl in cases:
        x, dy = bn_arrays(shape, cl)
        C = shape[1]
        w, b = cupy.ones(C, cupy.float32), cupy.zeros(C, cupy.float32)
        rm, rv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
        _, mean, invstd = bncore_gpu.batch_norm_forward(x, w, b, rm, rv)
        if args.once:
            bncore_gpu.batch_norm_backward(dy, x, mean, invstd, w)
            cupy.cuda.Device().synchronize()
            continue
        tx, tdy = torch.as_tensor(x, device="cuda"), torch.as_tensor(dy, device="cuda")
        tw, tb = torch.as_tensor(w, device="cuda"), torch.as_tensor(b, device="cuda")
        trm, trv = torch.as_tensor(rm, device="cuda"), torch.as_tensor(rv, device="cuda")
        _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        fwd = split_us(lambda: bncore_gpu.batch_norm_forward(x, w, b, rm, rv), args.calls)
        tfwd = split_us(lambda: F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5),
                        args.calls)
        bwd = split_us(lambda: bncore_gpu.batch_norm_backward(dy, x, mean, invstd, w),
                       args.calls)
        tbwd = split_us(lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tw, trm, trv, sm, si, True, 1e-5, [True, True, True]), args.calls)
        for op, (bh, bg), (th, tg) in (("forward-train", fwd, tfwd), ("backward", bwd, tbwd)):
            print(f"| {label} | {op} | {bh:.1f} | {bg:.1f} | {th:.1f} | {tg:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

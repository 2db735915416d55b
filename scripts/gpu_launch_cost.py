"""What one kernel launch costs the host, by way of launching it: CuPy's
RawKernel call with NumPy scalars (how bncore_gpu launches), the same with
Python scalars, CuPy's Function object directly, and the CUDA driver's
cuLaunchKernel through cupy.cuda.driver.launchKernel with the arguments packed
into one buffer (per call, and prebuilt: the floor from Python); beside them,
torch's cost per launch of a tiny op and the parts of packing.

Microseconds per launch, best of 5 loops of N launches, the GPU synchronized
after each loop; the kernel is bn_prepare_eval<float> (10 parameters) over 64
channels, so the GPU work is well under a microsecond.

    python scripts/gpu_launch_cost.py [--calls N]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from bench_gpu import per_call_us  # scripts/ is on sys.path


# bn_prepare_eval<float>(int C, const float* rm, const float* rv, double eps,
#   const float* w, const float* b, double* mean, double* invstd, double* scale,
#   double* shift): one 8-byte slot per parameter
PACKED = np.dtype([("C", "<i4"), ("_pad", "<i4"), ("rm", "<u8"), ("rv", "<u8"),
                   ("eps", "<f8"), ("w", "<u8"), ("b", "<u8"), ("mean", "<u8"),
                   ("invstd", "<u8"), ("scale", "<u8"), ("shift", "<u8")])
SLOTS = [PACKED.fields[n][1] for n in PACKED.names if n != "_pad"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=4000)
    args = ap.parse_args()
    calls = args.calls

    import cupy

    from bncore_gpu import batch_norm as gbn

    C = 64
    rm, rv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
    w, b = cupy.ones(C, cupy.float32), cupy.zeros(C, cupy.float32)
    out = cupy.empty((4, C), np.float64)
    mean, invstd, scale, shift = out[0], out[1], out[2], out[3]
    rk = gbn._kernel("bn_prepare_eval<float>")
    grid, block = (1,), (256,)
    rows = []

    def add(name, fn):
        try:
            rows.append((name, per_call_us(fn, calls)))
        except Exception as exc:       # noqa: BLE001 - report and go on
            rows.append((name, float("nan")))
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)

    add("RawKernel, NumPy scalars (bncore_gpu today)", lambda: rk(grid, block, (
        np.int32(C), rm, rv, np.float64(1e-5), w, b, mean, invstd, scale, shift)))
    s_c, s_eps = np.int32(C), np.float64(1e-5)
    add("RawKernel, NumPy scalars made beforehand", lambda: rk(grid, block, (
        s_c, rm, rv, s_eps, w, b, mean, invstd, scale, shift)))
    ptrs = [a.data.ptr for a in (rm, rv, w, b, mean, invstd, scale, shift)]
    add("RawKernel, raw pointers as NumPy uint64", lambda: rk(grid, block, (
        s_c, np.uint64(ptrs[0]), np.uint64(ptrs[1]), s_eps, np.uint64(ptrs[2]),
        np.uint64(ptrs[3]), np.uint64(ptrs[4]), np.uint64(ptrs[5]), np.uint64(ptrs[6]),
        np.uint64(ptrs[7]))))
    try:
        fn = rk.kernel                 # cupy.cuda.function.Function
        add("Function object, NumPy scalars", lambda: fn(grid, block, (
            s_c, rm, rv, s_eps, w, b, mean, invstd, scale, shift)))
    except Exception as exc:           # noqa: BLE001
        print(f"RawKernel.kernel: {type(exc).__name__}: {exc}", file=sys.stderr)
        fn = None

    drv = getattr(cupy.cuda, "driver", None)
    if fn is not None and drv is not None:
        stream_ptr = cupy.cuda.get_current_stream().ptr
        f = fn.ptr
        buf = np.zeros(1, PACKED)
        base = buf.ctypes.data
        params = np.array([base + off for off in SLOTS], np.uint64)
        pp = params.ctypes.data
        buf[0] = (C, 0, *ptrs[:2], 1e-5, *ptrs[2:])
        mean.fill(np.nan)              # what the packed launches must overwrite
        invstd.fill(np.nan)
        add("cuLaunchKernel, arguments packed beforehand (floor)", lambda: drv.launchKernel(
            f, 1, 1, 1, 256, 1, 1, 0, stream_ptr, pp, 0))

        def packed():
            buf[0] = (C, 0, rm.data.ptr, rv.data.ptr, 1e-5, w.data.ptr, b.data.ptr,
                      mean.data.ptr, invstd.data.ptr, scale.data.ptr, shift.data.ptr)
            drv.launchKernel(f, 1, 1, 1, 256, 1, 1, 0, cupy.cuda.get_current_stream().ptr,
                             pp, 0)
        add("cuLaunchKernel, packing each call (structured NumPy row)", packed)
        # the launch must have written what the kernel computes: mean = rm, invstd = 1/sqrt(rv + eps)
        cupy.cuda.Device().synchronize()
        ok = bool(cupy.allclose(invstd, 1 / np.sqrt(1 + 1e-5)) and cupy.all(mean == 0))
        print(f"packed launch wrote the expected invstd and mean: {ok}")

    add("np.int32(C) + np.float64(eps) (making two scalars)",
        lambda: (np.int32(C), np.float64(1e-5)))
    add("eight .data.ptr reads", lambda: [a.data.ptr for a in (rm, rv, w, b, mean, invstd,
                                                              scale, shift)])
    add("cupy.cuda.get_current_stream().ptr", lambda: cupy.cuda.get_current_stream().ptr)
    try:
        import torch
        if torch.cuda.is_available():
            t = torch.zeros(C, device="cuda")
            u = torch.empty(C, device="cuda")
            add("torch.neg(t, out=u) (one launch through torch)",
                lambda: torch.neg(t, out=u))
    except ImportError:
        pass

    print(f"\nhost cost per launch, us (best of 5 loops of {calls})")
    print("| way | us/launch |")
    print("|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

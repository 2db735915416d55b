"""Where a bncore_gpu batch-norm call spends its host time: the whole call and
its parts (argument checks, layout view, allocations, one kernel launch), each
timed alone in a loop, then cProfile's top entries for the whole call.

On shapes whose GPU work is a few microseconds the time per call is the
host's (scripts/bench_gpu.py's "host-bound" rows); this says which part of it
to cut. Part of `scripts/gpu_check.sh`; the numbers are microseconds per call,
best of 5 loops of N calls, the GPU synchronized after each loop.

    python scripts/gpu_host_profile.py [--calls N] [--top K] [--channels-last]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import numpy as np

from bench_gpu import bn_arrays, gpu_only_us, per_call_us  # scripts/ is on sys.path


def _three_kernels(gbn, fn):
    """fn on the three-kernel path: neither the cluster kernels (planes) nor
    the cooperative rows kernels (channels-last, 2-D), one launch each."""
    def run():
        saved = gbn.CLUSTER_KERNELS, gbn.ROWS_COOP
        gbn.CLUSTER_KERNELS = gbn.ROWS_COOP = False
        try:
            return fn()
        finally:
            gbn.CLUSTER_KERNELS, gbn.ROWS_COOP = saved
    return run


def _row_block_sweep(label, parts, gbn, view, x):
    """GPU-only time of the default (one-launch, cooperative) rows forward and
    backward with fewer row blocks than TARGET_BLOCKS gives: on (256,1024) that
    is 256 blocks of one row each, whose float64 partials (4 MB) outweigh the
    data (1 MB) and whose finalize combines 256 partials per channel, a lead
    for its GPU time (27 us against torch's 11.5, 2026-11-28). Each setting's
    summation order is the shape's and the setting's (deterministic); this
    only times them, for choosing a rule (e.g. a least number of rows per
    block). Rows say "TARGET_BLOCKS N" with the value tried; a value that
    gives the default's row blocks (_row_blocks) is not tried again."""
    out = []
    saved = gbn.TARGET_BLOCKS
    P4 = view.channels * view.inner // 4
    ntile = -(-P4 // max(gbn._rows_vec4_tile(4 * P4, x), 1))
    tried = {gbn._row_blocks(view.outer, ntile)}
    try:
        for cap in (saved // 4, saved // 16, saved // 64):
            if cap < 1:
                continue
            gbn.TARGET_BLOCKS = cap
            blocks = gbn._row_blocks(view.outer, ntile)
            if blocks in tried:
                continue
            tried.add(blocks)
            for kind in ("forward", "backward"):
                us, hidden = gpu_only_us(parts[f"{kind} (default path)"])
                name = f"GPU only: {kind} (default path), TARGET_BLOCKS {cap}"
                out.append((label, name if hidden else name + " (host NOT hidden)", us))
    except Exception as exc:       # noqa: BLE001 - an experiment: the other rows still print
        print(f"row-block sweep on {label}: {type(exc).__name__}: {exc}")
    finally:
        gbn.TARGET_BLOCKS = saved
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--channels-last", action="store_true",
                    help="also (32,64,56,56) channels-last (GPU work of tens of us per call)")
    args = ap.parse_args()

    import cupy

    import bncore_gpu
    from bncore._bn_args import backward_args, forward_args
    from bncore._layout import channel_view
    from bncore_gpu import _checks as chk
    from bncore_gpu import batch_norm as gbn
    try:
        import torch
        F = torch.nn.functional
        if not torch.cuda.is_available():
            torch = None
    except ImportError:                   # the torch rows are left out
        torch = None

    rows = []
    ap_cases = [((16, 64, 8, 8), False), ((256, 1024), False)]
    if args.channels_last:
        ap_cases.append(((32, 64, 56, 56), True))
    for shape, cl in ap_cases:
        x, dy = bn_arrays(shape, cl)
        C = shape[1]
        w, b = cupy.ones(C, cupy.float32), cupy.zeros(C, cupy.float32)
        rm, rv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
        _, mean, invstd = bncore_gpu.batch_norm_forward(x, w, b, rm, rv)
        view = channel_view(x, 1)
        scratch = cupy.empty((4, C), np.float64)
        parts = {
            "forward (default path)": lambda: bncore_gpu.batch_norm_forward(x, w, b, rm, rv),
            "backward (default path)": lambda: bncore_gpu.batch_norm_backward(
                dy, x, mean, invstd, w),
            "  forward_args (checks)": lambda: forward_args(
                chk, x, w, b, rm, rv, True, 0.1, 1e-5, 1, None, None),
            "  backward_args (checks)": lambda: backward_args(
                chk, dy, x, mean, invstd, w, True, 1, None, None),
            "  channel_view + arrange + flat": lambda: view.flat(
                channel_view(x, 1).arrange(x, cupy)),
            "  cupy.empty((4, C), float64)": lambda: cupy.empty((4, C), np.float64),
            "  cupy.empty((4, C)) and its 4 row views (the old way)": lambda: tuple(
                cupy.empty((4, C), np.float64)),
            "  4 x cupy.empty(C) (the way now)": lambda: [cupy.empty(C, np.float64)
                                                      for _ in range(4)],
            "  output like x (view.empty)": lambda: view.empty(x.dtype, cupy),
            "  one launch (bn_prepare_eval, 10 args)": lambda: gbn._kernel(
                "bn_prepare_eval<float>")((-(-C // 256),), (256,), (
                    np.int32(C), rm, rv, np.float64(1e-5), w, b, *scratch)),
            "  cupy.cuda.runtime.getDevice()": cupy.cuda.runtime.getDevice,
        }
        for kind in ("forward", "backward"):
            parts[f"{kind} (3-kernel path)"] = _three_kernels(gbn, parts[f"{kind} (default path)"])
        label = str(shape).replace(" ", "") + (" CL" if cl else "")
        for name, fn in parts.items():
            rows.append((label, name, per_call_us(fn, args.calls)))
        if torch is not None:
            tx = torch.as_tensor(x, device="cuda")
            tw, tb = torch.as_tensor(w, device="cuda"), torch.as_tensor(b, device="cuda")
            trm, trv = torch.as_tensor(rm, device="cuda"), torch.as_tensor(rv, device="cuda")

            def torch_forward():
                return F.batch_norm(tx, trm, trv, tw, tb, True, 0.1, 1e-5)
            rows.append((label, "torch F.batch_norm (training)",
                         per_call_us(torch_forward, args.calls)))

        # GPU time per call with the host out of the way: whether a row above is
        # the host's time or the GPU's
        # (and of the three-kernel path, and torch's backward kernel, beside them)
        gpu_parts = [(f"GPU only: {k}", parts[k]) for k in (
            "forward (default path)", "backward (default path)", "forward (3-kernel path)",
            "backward (3-kernel path)")]
        if torch is not None:
            gpu_parts.append(("GPU only: torch F.batch_norm (training)", torch_forward))
            try:
                tdy = torch.as_tensor(dy, device="cuda")
                _, smean, sinvstd = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv,
                                                                     True, 0.1, 1e-5)
                gpu_parts.append(("GPU only: torch native_batch_norm_backward",
                                  lambda: torch.ops.aten.native_batch_norm_backward(
                                      tdy, tx, tw, trm, trv, smean, sinvstd, True, 1e-5,
                                      [True, True, True])))
            except Exception as exc:       # noqa: BLE001 - the row is left out, said why
                print(f"torch native_batch_norm_backward: {type(exc).__name__}: {exc}")
        for name, fn in gpu_parts:
            us, hidden = gpu_only_us(fn)
            rows.append((label, name if hidden else name + " (host NOT hidden)", us))
        if view.inner < gbn.ROWS_MIN_INNER:
            rows += _row_block_sweep(label, parts, gbn, view, x)

        for name, fn in (("forward", parts["forward (default path)"]),
                         ("backward", parts["backward (default path)"])):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            cupy.cuda.Device().synchronize()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
            body = s.getvalue()
            print(f"---- cProfile, {args.calls} calls of {name} {label}, by own time")
            print(body[body.find("   ncalls"):].rstrip())
            print()

    print(f"host time per call, us (best of 5 loops of {args.calls} calls)")
    print("| shape | part | us/call |")
    print("|---|---|---|")
    for label, name, us in rows:
        print(f"| {label} | {name} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The float32 fast path of the float16 batch norm (bncore/_half_fast.h) side
by side with the float64 staging it skips, in one process
(bncore._bn_kernels.half_fast toggles it between repetitions), on NCHW
float16 shapes; and beside torch's float16 CPU kernel where torch is
installed. Results are the same bits either way (tests/test_half_fast.py);
this measures only speed.

    python scripts/bench_half_fast.py [--threads 2] [--reps 7]
"""
import argparse

import numpy as np

import bncore
from bench import time_loop     # (bench puts this checkout first on sys.path)
from bncore import _bn_kernels as kernels

SHAPES = [(32, 64, 56, 56), (8, 256, 14, 14)]


MIN_TIME = 0.03       # seconds per timing, each path in turn


def per_call_ms(fn) -> float:
    return time_loop(fn, MIN_TIME, batches=3) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    _, available = kernels.half_fast(True)
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    nt = args.threads
    rng = np.random.default_rng(0)
    print(f"{nt} threads, best of {args.reps}; ms per call; fast path in this build: "
          f"{'yes' if available else 'no (no AVX-512: both columns are the float64 way)'}")
    print("| case | float64 staging | float32 fast path | gain | torch | torch / fast |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        C = shape[1]
        x = rng.standard_normal(shape).astype(np.float16)
        dy = rng.standard_normal(shape).astype(np.float16)
        w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        _, mean, invstd = bncore.batch_norm_forward(x, w, b)
        cases = {
            "forward-train": lambda: bncore.batch_norm_forward(x, w, b, rm, rv, num_threads=nt),
            "forward-eval": lambda: bncore.batch_norm_forward(x, w, b, rm, rv, training=False,
                                                              num_threads=nt),
            "backward": lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w,
                                                           num_threads=nt),
        }
        theirs = {}
        if torch is not None:
            tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
            tw, tb = torch.from_numpy(w), torch.from_numpy(b)
            trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
            _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
            F = torch.nn.functional
            theirs = {
                "forward-train": lambda: F.batch_norm(tx, trm, trv, tw, tb, True),
                "forward-eval": lambda: F.batch_norm(tx, trm, trv, tw, tb, False),
                "backward": lambda: torch.ops.aten.native_batch_norm_backward(
                    tdy, tx, tw, trm, trv, sm, si, True, 1e-5, [True, True, True]),
            }
        for name, fn in cases.items():
            off = on = tt = float("inf")
            for _ in range(args.reps):          # interleaved: slow phases hit all alike
                kernels.half_fast(False)
                off = min(off, per_call_ms(fn))
                kernels.half_fast(True)
                on = min(on, per_call_ms(fn))
                if name in theirs:
                    tt = min(tt, per_call_ms(theirs[name]))
            t = f"{tt:.3f} | {tt / on:.2f}" if name in theirs else "- | -"
            print(f"| {name} {shape} float16 | {off:.3f} | {on:.3f} | {off / on:.2f}x | {t} |")


if __name__ == "__main__":
    main()

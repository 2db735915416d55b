"""The float32 fast path of the float16 batch norm (bncore/_half_fast.h) side
by side with the float64 staging it skips, in one process
(bncore._bn_kernels.half_fast toggles it between repetitions), on NCHW
float16 shapes; and beside torch's float16 CPU kernel where torch is
installed. Results are the same bits either way (tests/test_half_fast.py);
this measures only speed. (scripts/bench_switch.py half_fast --dtype float16
times any shape, without torch.)

    python scripts/bench_half_fast.py [--threads 2] [--reps 7]
"""
import argparse

import numpy as np

from bench_switch import CALLS, calls, load_torch, off_on
from bncore import _bn_kernels as kernels

SHAPES = [(32, 64, 56, 56), (8, 256, 14, 14)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    _, available = kernels.half_fast(True)
    torch = load_torch(args.threads)
    print(f"{args.threads} threads, best of {args.reps}; ms per call; fast path in this build: "
          f"{'yes' if available else 'no (no AVX-512: both columns are the float64 way)'}")
    print("| case | float64 staging | float32 fast path | gain | torch | torch / fast |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        ours, theirs = calls(shape, False, np.float16, args.threads, torch)
        for name in CALLS:
            off, on, tt = (t / 1e3 for t in off_on(ours[name], "half_fast", args.reps,
                                                   theirs.get(name)))
            t = f"{tt:.3f} | {tt / on:.2f}" if name in theirs else "- | -"
            print(f"| {name} {shape} float16 | {off:.3f} | {on:.3f} | {off / on:.2f}x | {t} |")


if __name__ == "__main__":
    main()

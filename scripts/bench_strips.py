"""The channel-strips schedule of the CPU batch norm, side by side with the two
passes it replaces, in one process (bncore._bn_kernels.channel_strips toggles
it between repetitions), on small channels-last (N, C) inputs; and beside
torch where it is installed. Results are the same bits either way (tests hold
them together); this measures only speed.

    python scripts/bench_strips.py [--threads 2] [--reps 9]

Prints, per shape: forward-train and backward in microseconds with strips off
and on (best of the repetitions, the two interleaved), whether this thread
count takes strips, and torch's time for the same call.
"""
import argparse

import numpy as np

import bncore
from bench import time_loop     # (bench puts this checkout first on sys.path)
from bncore import _bn_kernels as kernels

SHAPES = [(256, 1024), (128, 512), (512, 256), (64, 4096), (32, 2048), (256, 100),
          (16, 1000), (1024, 128)]


MIN_TIME = 0.02       # seconds per timing, each schedule in turn


def per_call_us(fn) -> float:
    return time_loop(fn, MIN_TIME, batches=3) * 1e6


def with_strips(fn, strips: bool) -> float:
    kernels.channel_strips(strips)
    try:
        return per_call_us(fn)
    finally:
        kernels.channel_strips(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    nt = args.threads
    rng = np.random.default_rng(0)
    print(f"{nt} threads, best of {args.reps}; microseconds per call")
    print("| shape | forward off | forward on | on/off gain | strips | backward off | "
          "backward on | on/off gain | strips | torch forward | torch backward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for N, C in SHAPES:
        x = rng.standard_normal((N, C)).astype(np.float32)
        dy = rng.standard_normal((N, C)).astype(np.float32)
        w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
        _, mean, invstd = bncore.batch_norm_forward(x, w, b, num_threads=nt)
        fwd = lambda: bncore.batch_norm_forward(x, w, b, num_threads=nt)  # noqa: E731
        bwd = lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w,  # noqa: E731
                                                 num_threads=nt)
        row = [f"({N},{C})"]
        info = kernels.plan_info(N, C, 1, 4, nt)
        for fn, key in ((fwd, "forward_strips"), (bwd, "backward_strips")):
            off = on = float("inf")
            for _ in range(args.reps):           # interleaved: slow phases hit both
                off = min(off, with_strips(fn, False))
                on = min(on, with_strips(fn, True))
            row += [f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x", "yes" if info[key] else "no"]
        if torch is not None:
            tx, tw, tb = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
            tm = torch.from_numpy(mean.astype(np.float32))
            ti = torch.from_numpy(invstd.astype(np.float32))
            tdy = torch.from_numpy(dy)
            tf = min(per_call_us(lambda: torch.nn.functional.batch_norm(
                tx, None, None, tw, tb, True)) for _ in range(args.reps))
            tbw = min(per_call_us(lambda: torch.ops.aten.native_batch_norm_backward(
                tdy, tx, tw, None, None, tm, ti, True, 1e-5, [True, True, True]))
                for _ in range(args.reps))
            row += [f"{tf:.1f}", f"{tbw:.1f}"]
        else:
            row += ["-", "-"]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

"""The channel-strips schedule of the CPU batch norm, side by side with the two
passes it replaces, in one process (bncore._bn_kernels.channel_strips toggles
it between repetitions), on small channels-last (N, C) inputs; and beside
torch where it is installed. Results are the same bits either way (tests hold
them together); this measures only speed. (scripts/bench_switch.py
channel_strips times any shape, forward-eval too, without torch.)

    python scripts/bench_strips.py [--threads 2] [--reps 9]

Prints, per shape: forward-train and backward in microseconds with strips off
and on (best of the repetitions, the two interleaved), whether this thread
count takes strips, and torch's time for the same call.
"""
import argparse

import numpy as np

from bench_switch import calls, load_torch, off_on
from bncore import _bn_kernels as kernels

SHAPES = [(256, 1024), (128, 512), (512, 256), (64, 4096), (32, 2048), (256, 100),
          (16, 1000), (1024, 128)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    torch = load_torch(args.threads)
    nt = args.threads
    print(f"{nt} threads, best of {args.reps}; microseconds per call")
    print("| shape | forward off | forward on | on/off gain | strips | backward off | "
          "backward on | on/off gain | strips | torch forward | torch backward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for N, C in SHAPES:
        ours, theirs = calls((N, C), False, np.float32, nt, torch)
        info = kernels.plan_info(N, C, 1, 4, nt)
        row, torch_cells = [f"({N},{C})"], []
        for name, key in (("forward-train", "forward_strips"), ("backward", "backward_strips")):
            off, on, tt = off_on(ours[name], "channel_strips", args.reps, theirs.get(name))
            row += [f"{off:.1f}", f"{on:.1f}", f"{off / on:.2f}x", "yes" if info[key] else "no"]
            torch_cells.append(f"{tt:.1f}" if name in theirs else "-")
        print("| " + " | ".join(row + torch_cells) + " |")


if __name__ == "__main__":
    main()

"""One of the CPU batch norm's in-process switches off and on, side by side in
one process: bncore._bn_kernels.<switch>(on) toggles between repetitions, so
a slow phase of a shared machine hits both columns alike. Every switch keeps
the bits (the tests hold each pair of paths together); this measures speed.

    python scripts/bench_switch.py float_rows [--shapes 256x1024,32x64x56x56:cl]
                                   [--dtype float32] [--threads 2] [--reps 8]

Switches: float_rows (AVX-512 float32 loops, _float_rows.h), channel_strips,
tile_groups, half_fast (float16 only), affine_stream (the narrow schedule's non-temporal y
stores). A shape ending in ":cl" is channels-last
memory seen with the NCHW shape (torch's channels_last). Prints a table of
forward-train, forward-eval and backward in microseconds, off and on (best of
the repetitions), and on's gain.
"""
import argparse
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import bncore
from bench import time_loop     # (bench puts this checkout first on sys.path)
from bncore import _bn_kernels as kernels

SWITCHES = ("float_rows", "channel_strips", "tile_groups", "half_fast", "affine_stream")
DEFAULT_SHAPES = "256x1024,128x512,512x256,32x2048,1000x100,8192x1024,32x64x56x56:cl"
MIN_TIME = 0.02       # seconds per timing, each setting in turn
CALLS = ("forward-train", "forward-eval", "backward")


def parse_shapes(text: str) -> List[Tuple[Tuple[int, ...], bool]]:
    out = []
    for item in text.split(","):
        dims, _, layout = item.partition(":")
        out.append((tuple(int(d) for d in dims.split("x")), layout == "cl"))
    return out


def set_switch(name: str, on: bool) -> bool:
    """Sets the switch; returns its former setting."""
    was = getattr(kernels, name)(on)
    return was[0] if isinstance(was, tuple) else was


def load_torch(threads: int):
    """torch with the benchmark's thread count, or None where it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def calls(shape, channels_last: bool, dtype, nt: int,
          torch=None) -> Tuple[Dict[str, Callable], Dict[str, Callable]]:
    """bncore's forward-train, forward-eval and backward on one input, and
    torch's same calls on the same memory (empty without torch, or where this
    torch does not take the dtype)."""
    rng = np.random.default_rng(0)
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
        dy = np.ascontiguousarray(np.moveaxis(dy, 1, -1))
        x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
    w = (rng.random(C) + 0.5).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x, w, b, num_threads=nt)
    ours = {"forward-train": lambda: bncore.batch_norm_forward(x, w, b, rm, rv, num_threads=nt),
            "forward-eval": lambda: bncore.batch_norm_forward(
                x, w, b, rm, rv, training=False, num_threads=nt),
            "backward": lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w,
                                                           num_threads=nt)}
    theirs: Dict[str, Callable] = {}
    if torch is not None:
        F = torch.nn.functional
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        try:
            _, sm, si = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        except RuntimeError:             # a dtype this torch does not take on the CPU
            return ours, theirs
        theirs = {"forward-train": lambda: F.batch_norm(tx, trm, trv, tw, tb, True),
                  "forward-eval": lambda: F.batch_norm(tx, trm, trv, tw, tb, False),
                  "backward": lambda: torch.ops.aten.native_batch_norm_backward(
                      tdy, tx, tw, trm, trv, sm, si, True, 1e-5, [True, True, True])}
    return ours, theirs


def off_on(fn: Callable, switch: str, reps: int,
           other: Optional[Callable] = None) -> Tuple[float, float, float]:
    """Microseconds per call of fn with the switch off and on, and of `other`
    (inf without it), each the best of `reps` repetitions, interleaved so that
    a slow phase of the machine hits all alike; the switch is left as it was."""
    best = {False: float("inf"), True: float("inf")}
    theirs = float("inf")
    for _ in range(reps):
        for on in (False, True):
            prev = set_switch(switch, on)
            try:
                best[on] = min(best[on], time_loop(fn, MIN_TIME, batches=3) * 1e6)
            finally:
                set_switch(switch, prev)
        if other is not None:
            theirs = min(theirs, time_loop(other, MIN_TIME, batches=3) * 1e6)
    return best[False], best[True], theirs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("switch", choices=SWITCHES)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--dtype", default="float32", choices=("float16", "float32", "float64"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args()
    was = getattr(kernels, args.switch)(True)
    available = was[1] if isinstance(was, tuple) else True
    print(f"{args.switch} off/on, {args.dtype}, {args.threads} threads, best of {args.reps} "
          f"interleaved; microseconds per call; in this build: "
          f"{'yes' if available else 'no (both columns are the same path)'}")
    print("| shape | call | off | on | gain |")
    print("|---|---|---|---|---|")
    for shape, cl in parse_shapes(args.shapes):
        label = "(" + ",".join(map(str, shape)) + ")" + (" channels-last" if cl else "")
        ours, _ = calls(shape, cl, np.dtype(args.dtype), args.threads)
        for name in CALLS:
            off, on, _ = off_on(ours[name], args.switch, args.reps)
            print(f"| {label} | {name} | {off:.1f} | {on:.1f} | {off / on:.2f}x |", flush=True)


if __name__ == "__main__":
    main()

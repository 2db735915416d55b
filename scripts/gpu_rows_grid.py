"""Experiment: the grids of the rows kernels (channels-last and 2-D batch norm).

The rows vec4 elementwise passes (bn_apply_rows_vec4, bn_dx_rows_vec4) are run
through bncore_gpu's own launch code (batch_norm._elementwise) with several
values of ROWS_BLOCKS_PER_SM, the former cap of 8192 row blocks among them;
every grid's output must equal the former one's bit for bit (an elementwise
pass: the grid cannot change a result). The statistics pass
(batch_norm._partial_sums) is run with 1, 2 and 4 times TARGET_BLOCKS (a
reduction: its grid changes the summation order, by shape only). Times are
CUDA events around back-to-back calls, median of 7, beside the device copy
floor; the smallest shapes are host-bound (a call's Python time).

(The 2026-11-28 run of this script, in BENCHMARKS.md, also timed a variant
kernel handling two rows per loop step; it gained nothing and was dropped
from the script: see it at commit 2e1c67e.)

    python scripts/gpu_rows_grid.py
"""
from __future__ import annotations

import sys

import numpy as np


def main() -> int:
    import cupy

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_gpu import copy_bandwidth, cuda_time_ms

    from bncore_gpu import _loader
    from bncore_gpu import batch_norm as gbn

    bw = copy_bandwidth()
    sms = _loader.sm_count()
    saved = gbn.ROWS_BLOCKS_PER_SM, gbn.TARGET_BLOCKS
    print(f"copy {bw / 1e9:.2f} TB/s, {sms} SMs")
    print("| shape (rows, P) | pass | setting | us | floor us | same bits |")
    print("|---|---|---|---|---|---|")
    try:
        for outer, P in ((32 * 56 * 56, 64), (128 * 28 * 28, 256), (256, 1024),
                         (8 * 14 * 14, 256)):
            rng = cupy.random.default_rng(0)
            x = rng.standard_normal(outer * P, dtype=cupy.float32)
            dy = rng.standard_normal(outer * P, dtype=cupy.float32)
            y = cupy.empty_like(x)
            consts = rng.standard_normal((4, P), dtype=cupy.float64)
            for mult in (1, 2, 4):
                gbn.TARGET_BLOCKS = mult * saved[1]
                us = cuda_time_ms(lambda: gbn._partial_sums("stats", x, None, outer, P, 1)) * 1e3
                print(f"| ({outer},{P}) | statistics | TARGET_BLOCKS {gbn.TARGET_BLOCKS} | "
                      f"{us:.1f} | {x.nbytes / bw * 1e3:.1f} | - |")
            gbn.TARGET_BLOCKS = saved[1]
            for kind, srcs, cs in (("apply", (x,), tuple(consts[:3])),
                                   ("dx", (dy, x), tuple(consts))):
                nbytes = (len(srcs) + 1) * x.nbytes
                ref = None
                for per_sm in (max(1, 8192 // sms), 4, 8, 16, 32):
                    gbn.ROWS_BLOCKS_PER_SM = per_sm

                    def run():
                        gbn._elementwise(kind, srcs, y, outer, P, 1, cs)
                    y.fill(np.nan)
                    run()
                    if ref is None:
                        ref, same = y.copy(), "ref (former cap)"
                    else:
                        same = "yes" if bool((y.view(np.uint32) == ref.view(np.uint32)).all()) \
                            else "NO"
                    us = cuda_time_ms(run) * 1e3
                    print(f"| ({outer},{P}) | {kind} | ROWS_BLOCKS_PER_SM {per_sm} | {us:.1f} | "
                          f"{nbytes / bw * 1e3:.1f} | {same} |")
    finally:
        gbn.ROWS_BLOCKS_PER_SM, gbn.TARGET_BLOCKS = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

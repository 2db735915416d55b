#!/usr/bin/env python
"""Per-element cost of bncore's optimizer and gradient-scan kernels with the
data in cache: 65536 float32 elements, one thread, the fixed cost of a call
(measured on 16 elements) subtracted. This is the arithmetic (and, where a
loop does not vectorize, the scalar code) without memory bandwidth, the
number to compare when changing a kernel; `scripts/bench.py` gives the
out-of-cache times beside torch.

    python scripts/probe_incache.py
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bncore  # noqa: E402

N = 65536


def best(fn, calls: int = 300, reps: int = 9) -> float:
    t_best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t_best = min(t_best, (time.perf_counter() - t0) / calls)
    return t_best


def main() -> None:
    rng = np.random.default_rng(0)
    p = rng.standard_normal(N).astype(np.float32)
    g = (rng.standard_normal(N) * 1e-3).astype(np.float32)
    m, v, sq, ga, buf = (np.zeros_like(p) for _ in range(5))
    clipped = g.copy()
    step = [0]

    def adam():
        step[0] += 1
        bncore.adam_step([p], [g], [m], [v], step=step[0], lr=1e-5, num_threads=1)

    def clip_value():            # about a third of the values out of range
        clipped[:] = g
        bncore.clip_grad_value([clipped], 1e-3, num_threads=1)

    fixed = best(lambda: bncore.found_inf([g[:16]], num_threads=1))
    refill = best(lambda: clipped.__setitem__(slice(None), g))
    cases = {
        "adam_step": adam,
        "sgd_step (momentum)": lambda: bncore.sgd_step([p], [g], [buf], lr=1e-5, momentum=0.9,
                                                       num_threads=1),
        "rmsprop_step": lambda: bncore.rmsprop_step([p], [g], [sq], lr=1e-5, num_threads=1),
        "rmsprop_step (centered, momentum)": lambda: bncore.rmsprop_step(
            [p], [g], [sq], lr=1e-5, centered=True, momentum=0.9, grad_avgs=[ga],
            momentum_buffers=[buf], num_threads=1),
        "found_inf": lambda: bncore.found_inf([g], num_threads=1),
        "grad_norm (2)": lambda: bncore.grad_norm([g], num_threads=1),
        "grad_norm (inf)": lambda: bncore.grad_norm([g], float("inf"), num_threads=1),
        "clip_grad_value (nothing out of range)": lambda: bncore.clip_grad_value(
            [g], 1.0, num_threads=1),
        "clip_grad_value (a third clipped)": clip_value,
    }
    print(f"{'kernel':42s} ns per element (in cache, 1 thread)")
    for name, fn in cases.items():
        extra = refill if fn is clip_value else 0.0
        print(f"{name:42s} {(best(fn) - fixed - extra) * 1e9 / N:8.3f}")


if __name__ == "__main__":
    main()

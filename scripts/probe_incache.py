#!/usr/bin/env python
"""Per-element cost of bncore's batch-norm, optimizer and gradient-scan
kernels with the data in cache: 65536 elements (float32, and float16 where
named), one thread, minus the same call on 16 elements (each kernel's own
fixed cost; batch norm: 128, two rows of 64 channels). This is the arithmetic (and, where a
loop does not vectorize, the scalar code) without memory bandwidth, the
number to compare when changing a kernel; `scripts/bench.py` gives the
out-of-cache times beside torch.

    python scripts/probe_incache.py
    PYTHONPATH=/path/to/other/build python scripts/probe_incache.py   # another build
"""
import os
import sys

import numpy as np

try:
    import bncore
except ImportError:             # run from a checkout without an install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import bncore
from bench import time_loop   # after bncore: bench puts this checkout first on sys.path

N = 65536
SMALL = 16


def best(fn) -> float:
    """Seconds per call: bench.py's timing loop (best of 9 batches)."""
    return time_loop(fn, min_time=0.05, batches=9)


def kernels():
    """name -> make(n): a call on fresh arrays of n elements (repeatable)."""
    def arrays(n):
        rng = np.random.default_rng(0)
        p = rng.standard_normal(n).astype(np.float32)
        g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
        return p, g, [np.zeros_like(p) for _ in range(4)]

    def adam(grad_dtype):
        def make(n):
            p, g, (m, v, _, _) = arrays(n)
            g = g.astype(grad_dtype)
            step = [0]

            def run():
                step[0] += 1
                bncore.adam_step([p], [g], [m], [v], step=step[0], lr=1e-5, num_threads=1)
            return run
        return make

    def sgd(n):
        p, g, (b, _, _, _) = arrays(n)
        return lambda: bncore.sgd_step([p], [g], [b], lr=1e-5, momentum=0.9, num_threads=1)

    def rms(n):
        p, g, (sq, _, _, _) = arrays(n)
        return lambda: bncore.rmsprop_step([p], [g], [sq], lr=1e-5, num_threads=1)

    def rms_full(n):
        p, g, (sq, ga, b, _) = arrays(n)
        return lambda: bncore.rmsprop_step([p], [g], [sq], lr=1e-5, centered=True, momentum=0.9,
                                           grad_avgs=[ga], momentum_buffers=[b], num_threads=1)

    def scan(fn, dtype=np.float32):
        def make(n):
            _, g, _ = arrays(n)
            g = g.astype(dtype)
            return lambda: fn(g)
        return make

    def clip_third(n):           # about a third of the values out of range, every call
        _, g, (c, _, _, _) = arrays(n)

        def run():
            c[:] = g
            bncore.clip_grad_value([c], 1e-3, num_threads=1)
        return run

    def refill(n):               # what clip_third spends outside the kernel
        _, g, (c, _, _, _) = arrays(n)
        return lambda: c.__setitem__(slice(None), g)

    def bn(dtype, what):
        # (rows, 64 channels): the narrow blocks schedule; the small call has
        # 2 rows (a training batch needs two values per channel)
        def make(n):
            rng = np.random.default_rng(0)
            shape = (max(n // 64, 2), 64)
            x = rng.standard_normal(shape).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            w = np.ones(64, np.float32)
            rm, rv = np.zeros(64, np.float32), np.ones(64, np.float32)
            out = np.empty_like(x)
            _, mean, invstd = bncore.batch_norm_forward(x, w)
            if what == "forward":
                return lambda: bncore.batch_norm_forward(x, w, None, rm, rv, out=out,
                                                         num_threads=1)
            if what == "eval":
                return lambda: bncore.batch_norm_forward(x, w, None, rm, rv, training=False,
                                                         out=out, num_threads=1)
            return lambda: bncore.batch_norm_backward(dy, x, mean, invstd, w, out=out,
                                                      num_threads=1)
        return make

    return {
        "batch_norm_forward (64 channels)": bn(np.float32, "forward"),
        "batch_norm_forward (64 channels, float16)": bn(np.float16, "forward"),
        "batch_norm_forward eval (64 channels)": bn(np.float32, "eval"),
        "batch_norm_forward eval (64 channels, float16)": bn(np.float16, "eval"),
        "batch_norm_backward (64 channels)": bn(np.float32, "backward"),
        "batch_norm_backward (64 channels, float16)": bn(np.float16, "backward"),
        "adam_step": adam(np.float32),
        "adam_step (float16 gradients)": adam(np.float16),
        "sgd_step (momentum)": sgd,
        "rmsprop_step": rms,
        "rmsprop_step (centered, momentum)": rms_full,
        "found_inf": scan(lambda g: bncore.found_inf([g], num_threads=1)),
        "grad_norm (2)": scan(lambda g: bncore.grad_norm([g], num_threads=1)),
        "grad_norm (inf)": scan(lambda g: bncore.grad_norm([g], float("inf"), num_threads=1)),
        "grad_norm (2, float16)": scan(lambda g: bncore.grad_norm([g], num_threads=1),
                                       np.float16),
        "clip_grad_value (nothing out of range)": scan(
            lambda g: bncore.clip_grad_value([g], 1.0, num_threads=1)),
        "clip_grad_value (a third clipped)": (clip_third, refill),
    }


def main() -> None:
    print(f"bncore from {os.path.dirname(bncore.__file__)}")
    print(f"{'kernel':48s} ns per element (in cache, 1 thread)")
    for name, make in kernels().items():
        extra = None
        if isinstance(make, tuple):
            make, extra = make
        t = (best(make(N)) - best(make(SMALL)))
        if extra is not None:
            t -= best(extra(N)) - best(extra(SMALL))
        print(f"{name:48s} {t * 1e9 / (N - SMALL):8.3f}")


if __name__ == "__main__":
    main()

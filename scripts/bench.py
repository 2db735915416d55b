#!/usr/bin/env python
"""Benchmarks: bncore beside PyTorch and a memory-bandwidth floor, in one run.

Every case is timed for bncore, for torch (same thread count; ``torch alt`` is
a second torch implementation where one exists: Adam foreach, SGD fused) and
for two floors, all interleaved inside each repetition so that machine noise
hits them alike: ``floor`` is the issues' single-threaded one (a same-size
``np.copyto`` of x for every batch-norm case, ``np.add`` in place over the
bytes an optimizer moves), and ``floor Nt`` moves the bytes the case moves
(batch-norm backward: c = a + b over three arrays) with the benchmark's thread
count (torch's ``copy_`` / ``add`` on the same numpy memory when torch is
installed, else numpy over N Python threads).
One thread does not saturate this machine's memory, so only ``floor Nt`` is a
bound: a ``bncore/floor`` below 1 means faster than one thread's copy, not
faster than memory. Each repetition times a loop of calls and divides; the best
of the repetitions is reported. ``torch/bncore`` > 1 means bncore is faster.

    python scripts/bench.py                       # all CPU cases, 2 threads
    python scripts/bench.py --threads 2 --reps 9 --json bench.json
    python scripts/bench.py --only bn             # case names containing "bn"
    python scripts/bench.py --gpu                 # CUDA cases (bncore_gpu vs torch/cuDNN)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@dataclass
class Case:
    name: str
    group: str
    bytes_moved: int                       # bytes bncore must read + write, at least
    impls: Dict[str, Callable[[], object]]  # "bncore", "torch", "floor", ...
    note: str = ""
    results: Dict[str, float] = field(default_factory=dict)   # seconds per call


def time_loop(fn: Callable[[], object], min_time: float, batches: int = 5) -> float:
    """Seconds per call of fn: the best of `batches` timed batches, after a
    warm-up of half the budget (threads woken, caches and pages warm)."""
    fn()
    n = 1
    t_end = time.perf_counter() + min_time / 2
    while time.perf_counter() < t_end:     # warm-up, and size the batches
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 < min_time / batches / 4:
            n *= 2
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def shrinking_bound(fn: Callable[[float], object], start: float, rate: float = 1e-5
                    ) -> Callable[[], object]:
    """A call of fn(bound) whose bound shrinks by `rate` each call, for the
    clipping cases: after a clip every value sits within the last bound, so a
    fixed bound would clip once and leave later calls nothing to do (bncore's
    kernels then skip the writes, torch's do not). 1e5 calls shrink the bound
    by e^-1: nowhere near subnormal numbers."""
    bound = [start]

    def run():
        bound[0] *= 1.0 - rate
        return fn(bound[0])
    return run


def threaded(op: Callable[..., object], out: np.ndarray, *inputs: np.ndarray, threads: int
             ) -> Callable[[], object]:
    """`out` = op(*inputs) (np.copyto: out = inputs[0]; np.add: out = a + b, in
    place when out is a) with `threads` threads: torch's own kernels on the same
    memory when torch is installed, else numpy over contiguous slices in Python
    threads (numpy releases the GIL for large arrays)."""
    flat_out = out.reshape(-1)
    flat_in = [a.reshape(-1) for a in inputs]
    try:
        import torch
        tout = torch.from_numpy(flat_out)
        tin = [torch.from_numpy(a) for a in flat_in]
        if op is np.copyto:
            return lambda: tout.copy_(tin[0])
        return lambda: torch.add(tin[0], tin[1], out=tout)
    except ImportError:
        pass
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(max(threads - 1, 1))
    n = flat_out.size
    cuts = [n * k // threads for k in range(threads + 1)]
    parts = [(flat_out[cuts[k]:cuts[k + 1]], [a[cuts[k]:cuts[k + 1]] for a in flat_in])
             for k in range(threads)]
    if op is np.copyto:
        work = [lambda o=o, i=i: np.copyto(o, i[0]) for o, i in parts]
    else:
        work = [lambda o=o, i=i: op(*i, out=o) for o, i in parts]

    def run():
        futures = [pool.submit(w) for w in work[1:]]
        work[0]()
        for f in futures:
            f.result()
    return run


def best_interleaved(impls: Dict[object, Callable[[], object]], reps: int,
                     min_time: float) -> Dict[object, float]:
    """Each implementation's best seconds per call over `reps` repetitions, the
    implementations interleaved within each repetition, so slow phases of a
    shared machine hit them alike."""
    best: Dict[object, float] = {}
    for _ in range(reps):
        for name, fn in impls.items():
            best[name] = min(best.get(name, float("inf")), time_loop(fn, min_time))
    return best


def run_cases(cases: List[Case], reps: int, min_time: float) -> None:
    for case in cases:
        case.results = best_interleaved(case.impls, reps, min_time)
        print(f"  timed {case.name}", file=sys.stderr)


# --------------------------------------------------------------------------
# CPU batch-norm cases

BN_SHAPES = [
    ("(32,64,56,56) NCHW", (32, 64, 56, 56), "nchw", np.float32),
    ("(32,64,56,56) channels-last", (32, 64, 56, 56), "nhwc", np.float32),
    ("(256,1024)", (256, 1024), "nchw", np.float32),
    ("(8,256,14,14) NCHW", (8, 256, 14, 14), "nchw", np.float32),
    # a large 2-D input (BatchNorm1d on a big batch), out of cache: channel tiles
    ("(8192,1024)", (8192, 1024), "nchw", np.float32),
    # float16 data, float32 parameters (torch's mixed-precision batch norm)
    ("(32,64,56,56) NCHW float16", (32, 64, 56, 56), "nchw", np.float16),
]


#: inputs this large rotate over copies that together exceed twice the L3 of
#: common CPUs (64 MiB): a training step's activations are not in cache when
#: batch norm reads them, and a loop over one x let the implementation whose
#: stores bypass the cache (bncore's streaming y and dx) find x in L3 on the
#: next call, torch's not (review: 15-40% of the torch/bncore ratio on forward)
ROTATE_MIN_BYTES = 8 << 20
ROTATE_SPAN_BYTES = 64 << 20


def _rotation(nbytes: int, cache: str) -> int:
    """How many copies of an input the cases cycle through: cache "cold" (the
    default) rotates large inputs as above; "warm" calls one input again and
    again (what this script measured before 2026-11-29)."""
    if cache == "warm" or nbytes < ROTATE_MIN_BYTES:
        return 1             # in cache, as a small layer's activations can be
    return -(-ROTATE_SPAN_BYTES // nbytes) + 1


def _cycled(calls: List[Callable[[], object]]) -> Callable[[], object]:
    """One call of each in turn (a single call as it is)."""
    if len(calls) == 1:
        return calls[0]
    state = [0]

    def run():
        state[0] = (state[0] + 1) % len(calls)
        return calls[state[0]]()
    return run


def _bn_shape_cases(bncore, torch, threads, label, shape, layout, rng,
                    dtype=np.float32, cache: str = "cold") -> List[Case]:
    """forward-train, forward-eval and backward cases for one shape and layout."""
    C = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "nhwc":
        # NHWC memory seen with an NCHW shape: what torch's channels_last is
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = np.ones(C, np.float32)
    b = np.zeros(C, np.float32)
    rm = np.zeros(C, np.float32)
    rv = np.ones(C, np.float32)
    nbytes = x.nbytes
    k = _rotation(nbytes, cache)
    # identical copies (the statistics stay valid for every one), each in x's layout
    xs = [x] + [x.copy(order="K") for _ in range(k - 1)]
    dys = [dy] + [dy.copy(order="K") for _ in range(k - 1)]
    # the floors move the same memory: x (and dy) as they lie, flat (views)
    srcs = [a.ravel(order="K") for a in xs]
    dy_flat = [d.ravel(order="K") for d in dys]
    dst = np.empty_like(srcs[0])
    _, mean_b, invstd_b = bncore.batch_norm_forward(x, w, b, rm, rv)

    floor = _cycled([lambda s=s: np.copyto(dst, s) for s in srcs])
    floor_nt = _cycled([threaded(np.copyto, dst, s, threads=threads) for s in srcs])
    # backward moves three arrays (reads dy and x, writes dx): c = a + b
    fc = np.ones_like(srcs[0])
    floor_nt_bwd = _cycled([threaded(np.add, fc, a, d, threads=threads)
                            for a, d in zip(srcs, dy_flat)])

    impl_fwd = {"bncore": _cycled([lambda a=a: bncore.batch_norm_forward(
        a, w, b, rm, rv, num_threads=threads) for a in xs])}
    impl_eval = {"bncore": _cycled([lambda a=a: bncore.batch_norm_forward(
        a, w, b, rm, rv, training=False, num_threads=threads) for a in xs])}
    impl_bwd = {"bncore": _cycled([lambda a=a, d=d: bncore.batch_norm_backward(
        d, a, mean_b, invstd_b, w, num_threads=threads) for a, d in zip(xs, dys)])}
    if torch is not None:
        F = torch.nn.functional
        txs = [torch.from_numpy(a) for a in xs]   # shares memory: the same layout for both
        tdys = [torch.from_numpy(d) for d in dys]
        tx = txs[0]
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        _, smean, sinvstd = torch.ops.aten.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        impl_fwd["torch"] = _cycled([lambda t=t: F.batch_norm(t, trm, trv, tw, tb, True, 0.1, 1e-5)
                                     for t in txs])
        impl_eval["torch"] = _cycled([lambda t=t: F.batch_norm(t, trm, trv, tw, tb, False, 0.1,
                                                               1e-5) for t in txs])
        # the kernel autograd calls, without autograd's bookkeeping
        impl_bwd["torch"] = _cycled([lambda t=t, d=d: torch.ops.aten.native_batch_norm_backward(
            d, t, tw, trm, trv, smean, sinvstd, True, 1e-5, [True, True, True])
            for t, d in zip(txs, tdys)])
        for d in (impl_fwd, impl_eval, impl_bwd):
            try:
                d["torch"]()
            except RuntimeError:         # a dtype this torch does not take on the CPU
                del d["torch"]
    for d in (impl_fwd, impl_eval, impl_bwd):
        d["floor"] = floor
        d["floor Nt"] = floor_nt if d is not impl_bwd else floor_nt_bwd
    return [Case(f"bn forward-train {label}", "bn", 2 * nbytes, impl_fwd),
            Case(f"bn forward-eval {label}", "bn", 2 * nbytes, impl_eval),
            Case(f"bn backward {label}", "bn", 3 * nbytes, impl_bwd)]


def bn_cases(threads: int, cache: str = "cold") -> List[Case]:
    import bncore

    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    cases = []
    for label, shape, layout, dtype in BN_SHAPES:
        cases += _bn_shape_cases(bncore, torch, threads, label, shape, layout, rng, dtype,
                                 cache)
    # per-call overhead: a tiny input, where the time is all fixed cost
    xs = rng.standard_normal((4, 8)).astype(np.float32)
    tiny = {"bncore": lambda: bncore.batch_norm_forward(xs, num_threads=threads)}
    if torch is not None:
        txs = torch.from_numpy(xs)
        tiny["torch"] = lambda: torch.nn.functional.batch_norm(txs, None, None, training=True)
    cases.append(Case("bn per-call overhead (4,8)", "overhead", 0, tiny,
                      note="fixed cost of a call"))
    return cases


# --------------------------------------------------------------------------
# Reporting

def ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}"


def ms(t: Optional[float]) -> str:
    return "-" if t is None else (f"{t * 1e3:.3f}" if t >= 1e-4 else f"{t * 1e6:.1f}us")


def report(cases: List[Case], header: str) -> str:
    lines = [header, "",
             "| case | bncore ms | torch ms | torch alt ms | floor ms | floor Nt ms "
             "| torch/bncore | torch alt/bncore | bncore/floor | bncore/floor Nt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        r = c.results
        lines.append(f"| {c.name} | {ms(r.get('bncore'))} | {ms(r.get('torch'))} | "
                     f"{ms(r.get('torch alt'))} | "
                     f"{ms(r.get('floor'))} | {ms(r.get('floor Nt'))} | "
                     f"{ratio(r.get('torch'), r.get('bncore'))} | "
                     f"{ratio(r.get('torch alt'), r.get('bncore'))} | "
                     f"{ratio(r.get('bncore'), r.get('floor'))} | "
                     f"{ratio(r.get('bncore'), r.get('floor Nt'))} |")
    return "\n".join(lines)


def environment(threads: int) -> Dict[str, object]:
    import bncore

    env = {"bncore": bncore.__version__, "numpy": np.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "threads": threads, "cpu_count": os.cpu_count(),
           "openmp": bncore.build_info()["openmp"], "flags": bncore.build_info()["compile_flags"]}
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


def core_check(threads: int, min_time: float) -> Optional[float]:
    """How much faster an in-cache, compute-bound bncore call ran on `threads`
    threads than on one, just now: near `threads` when the run had every core
    it asked for, near 1 when the host took cores away. This shared 2-core
    machine has phases (minutes long) in which two threads run at one thread's
    speed, for bncore and torch alike, moving in-cache ratios by up to 1.9x
    (BENCHMARKS.md, 2026-11-28 twelfth session); the check says which phase a
    run met. None with one thread."""
    if threads < 2:
        return None
    import bncore
    rng = np.random.default_rng(1)
    x = rng.standard_normal((256, 1024)).astype(np.float32)
    y = np.empty_like(x)
    rm, rv = np.zeros(1024, np.float32), np.ones(1024, np.float32)
    best = best_interleaved({n: (lambda n=n: bncore.batch_norm_forward(
        x, running_mean=rm, running_var=rv, training=False, out=y, num_threads=n))
        for n in (1, threads)}, 5, min_time)
    return best[1] / best[threads]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="threads for bncore and torch (default 2)")
    ap.add_argument("--reps", type=int, default=7, help="repetitions; the best is reported (>= 5)")
    ap.add_argument("--min-time", type=float, default=0.05,
                    help="seconds each timing loop runs at least (default 0.05)")
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--gpu", action="store_true", help="CUDA cases instead of CPU cases")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold (default): batch-norm inputs of 8 MiB and more rotate over "
                         "copies spanning 64 MiB, so none is in cache from the call before; "
                         "warm: one input, called again and again")
    args = ap.parse_args(argv)
    if args.reps < 5:
        ap.error("--reps must be at least 5")

    if args.gpu:
        from bench_gpu import main as gpu_main   # noqa: E402 (scripts/ on sys.path)
        return gpu_main(args.json)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))   # before OpenMP loads
    import bncore
    import bench_targets                  # noqa: E402
    from bench_optim import optim_cases   # noqa: E402

    bncore.set_num_threads(args.threads)
    cases = [c for c in bn_cases(args.threads, args.cache) + optim_cases(args.threads)
             if args.only in c.name]
    scaling = [core_check(args.threads, args.min_time)]
    run_cases(cases, args.reps, args.min_time)
    scaling.append(core_check(args.threads, args.min_time))
    env = environment(args.threads)
    env["core_check"] = scaling
    header = (f"CPU benchmark: {args.threads} threads, best of {args.reps} repetitions; "
              f"torch {env['torch']}, numpy {env['numpy']}; floor = the issues' one-thread "
              f"floor (batch norm: np.copyto of x, all three cases; optimizers: in-place "
              f"np.add over the bytes the update moves); floor Nt = the bytes each case "
              f"moves, with {args.threads} threads (batch-norm backward: c = a + b, three "
              f"arrays); torch alt = Adam(foreach=True), SGD(fused=True); " + (
                  f"cache cold: batch-norm inputs of {ROTATE_MIN_BYTES >> 20} MiB and more "
                  f"rotate over copies spanning {ROTATE_SPAN_BYTES >> 20} MiB and more, for "
                  f"every side, so no call finds its input in cache from the one before"
                  if args.cache == "cold" else
                  "cache warm: each case calls on one input again and again"))
    if scaling[0] is not None:
        header += (f"\ncore check (before, after the cases): an in-cache bncore call ran "
                   f"{scaling[0]:.2f}x, {scaling[1]:.2f}x faster on {args.threads} threads "
                   f"than on 1 (near {args.threads}: the run had its cores; near 1: the "
                   f"host took some, and in-cache ratios are not this machine's best)")
    rows = bench_targets.verdicts({c.name: c.results for c in cases})
    text = report(cases, header) + bench_targets.report(rows, args.threads)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"env": env, "cases": [
                {"name": c.name, "group": c.group, "bytes": c.bytes_moved, "note": c.note,
                 "seconds": c.results} for c in cases], "targets": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmark cases for ``scripts/bench.py --gpu`` (CuPy + torch on CUDA).

Every case is timed for bncore_gpu and torch (cuDNN batch norm; fused and
foreach optimizers; foreach clipping) in the same process with CUDA events on
the legacy default stream, which both libraries use: a timed loop of calls
between two events, the median over repetitions. Calls are back to back, so a
time is max(GPU work, host launch cost) per call, for both libraries alike.
The floor is the bytes a case must move (each input read once, each output
written once) at the bandwidth of a large device-to-device copy measured in
the same run (bytes read plus bytes written).
"""
from __future__ import annotations

import functools
import gc
import statistics
from typing import Callable, Dict, List

TARGETS_MS = {   # issue 4 and issue 5 targets (H100, float32), for the default path
    "bn forward-train (128,256,28,28) NCHW": 0.10,
    "bn backward (128,256,28,28) NCHW": 0.17,
    "bn forward-train (32,64,56,56) NCHW": 0.07,
    "bn backward (32,64,56,56) NCHW": 0.15,
    "adam 100M as 1 tensor": 1.05,
    "adam 100M as 200 tensors": 1.15,
    "clip_grad_norm 100M as 200 tensors": 0.60,
}


def cuda_time_ms(fn: Callable[[], object], reps: int = 7, min_ms: float = 20.0) -> float:
    """Median milliseconds per call of fn, from loops of calls between CUDA events."""
    import cupy

    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    fn()
    cupy.cuda.Device().synchronize()
    iters = 1
    while True:                                     # size the loop to >= min_ms
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        ms = cupy.cuda.get_elapsed_time(start, end)
        if ms >= min_ms or iters >= 4096:
            break
        iters = max(iters * 2, int(iters * min_ms / max(ms, 1e-3)))
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / iters)
    return statistics.median(times)


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Host microseconds per call of fn: best of 5 loops of `calls` calls, the
    GPU synchronized after each loop (so max(host, GPU) per call)."""
    import time

    import cupy
    fn()
    cupy.cuda.Device().synchronize()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        cupy.cuda.Device().synchronize()
        best = min(best, (time.perf_counter() - t) / calls * 1e6)
    return best


_SPIN = r"""
extern "C" __global__ void bench_spin(long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < (unsigned long long)ns);
}
"""


def gpu_only_us(fn: Callable[[], object], calls: int = 100, spin_ms: float = 40.0):
    """(GPU microseconds per call with the host out of the way, whether the host
    was out of the way): a kernel that spins for spin_ms is queued first and
    the calls are queued behind it, so the events around them time the GPU's
    work and its gaps between kernels alone; if the spin ended before the host
    had queued every call (a call that waits on the GPU, or a host slower than
    spin_ms / calls per call) the figure includes host time, and says so."""
    import cupy
    import numpy as np

    spin = _spin_kernel()
    fn()
    cupy.cuda.Device().synchronize()
    times = {True: [], False: []}          # by whether the host was out of the way
    for _ in range(3):
        start, end, spun = cupy.cuda.Event(), cupy.cuda.Event(), cupy.cuda.Event()
        spin((1,), (1,), (np.int64(spin_ms * 1e6),))
        spun.record()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        queued_in_time = not spun.done
        end.synchronize()
        times[queued_in_time].append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls)
    # the best repetition that hid the host; only if none did, the best of all
    hidden = bool(times[True])
    return min(times[hidden]), hidden


@functools.lru_cache(maxsize=None)
def _spin_kernel():
    import cupy
    return cupy.RawKernel(_SPIN, "bench_spin")


def bn_arrays(shape, channels_last: bool = False, seed: int = 0):
    """x and dy, float32 on the device: C order, or (channels_last, 4-D) NHWC
    memory seen with the NCHW shape, as torch's channels_last."""
    import cupy
    rng = cupy.random.default_rng(seed)
    if not channels_last:
        return (rng.standard_normal(shape, dtype=cupy.float32),
                rng.standard_normal(shape, dtype=cupy.float32))
    N, C, H, W = shape
    return tuple(rng.standard_normal((N, H, W, C), dtype=cupy.float32).transpose(0, 3, 1, 2)
                 for _ in range(2))


def copy_bandwidth() -> float:
    """Bytes per ms of a 1 GiB device-to-device copy (read plus written)."""
    import cupy

    src = cupy.ones(1 << 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    ms = cuda_time_ms(lambda: dst.__setitem__(Ellipsis, src), reps=5)
    bw = 2 * src.nbytes / ms
    del src, dst
    return bw


def _free():
    import cupy
    import torch

    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def bn_cases(bw: float) -> List[dict]:
    import cupy
    import torch

    import bncore_gpu
    F = torch.nn.functional
    rows = []
    shapes = [("(128,256,28,28)", (128, 256, 28, 28)), ("(32,64,56,56)", (32, 64, 56, 56))]
    for label, shape in shapes:
        for layout in ("NCHW", "channels-last"):
            x, dy = bn_arrays(shape, layout == "channels-last")
            rows += _bn_rows(f"{label} {layout}", x, dy, bw, bncore_gpu, torch, F)
            del x, dy
            _free()
    # a shape whose GPU work is a few microseconds: the time per call is the
    # host's (argument checks, allocations, one launch per kernel), and the
    # 3-kernel rows show what one launch instead of three saves
    rng = cupy.random.default_rng(3)
    x = rng.standard_normal((16, 64, 8, 8), dtype=cupy.float32)
    dy = rng.standard_normal((16, 64, 8, 8), dtype=cupy.float32)
    rows += _bn_rows("(16,64,8,8) NCHW, host-bound", x, dy, bw, bncore_gpu, torch, F)
    rng = cupy.random.default_rng(1)
    x = rng.standard_normal((256, 1024), dtype=cupy.float32)
    dy = rng.standard_normal((256, 1024), dtype=cupy.float32)
    rows += _bn_rows("(256,1024)", x, dy, bw, bncore_gpu, torch, F)
    # float16 channels-last (models run in half): the scalar rows kernels, three
    # launches (the cooperative and float4 kernels take float32 only), beside
    # cuDNN's half NHWC batch norm
    x, dy = bn_arrays((32, 64, 56, 56), True)
    x, dy = x.astype(cupy.float16), dy.astype(cupy.float16)     # (astype keeps NHWC)
    rows += _bn_rows("(32,64,56,56) channels-last float16", x, dy, bw, bncore_gpu, torch, F)
    del x, dy
    _free()
    # the statistics' second pass: every channel's pivot (its first value) an
    # outlier, so bn_finalize_train sums each channel again (forward only)
    for layout in ("NCHW", "channels-last"):
        rng = cupy.random.default_rng(2)
        if layout == "NCHW":
            x = rng.standard_normal((32, 64, 56, 56), dtype=cupy.float32)
        else:
            x = rng.standard_normal((32, 56, 56, 64), dtype=cupy.float32).transpose(0, 3, 1, 2)
        x[0, :, 0, 0] += 1e4
        rows += _bn_rows(f"(32,64,56,56) {layout}, outlier pivots", x, x, bw, bncore_gpu,
                         torch, F, backward=False)
        del x
        _free()
    return rows


def _bn_rows(label, *args, **kw) -> List[dict]:
    """_bn_case_rows, with a case that raises shown as one FAILED row (its
    traceback on stderr) instead of losing the whole table."""
    import sys
    import traceback
    try:
        return _bn_case_rows(label, *args, **kw)
    except Exception as exc:  # noqa: BLE001 - reported, and the other cases still run
        traceback.print_exc(file=sys.stderr)
        nan = float("nan")
        return [dict(case=f"bn {label}: FAILED ({type(exc).__name__}: {exc})"[:200],
                     bncore=nan, torch=nan, floor=nan, cluster=False)]


def _bn_case_rows(label, x, dy, bw, bncore_gpu, torch, F, backward: bool = True) -> List[dict]:
    import cupy

    C = x.shape[1]
    w = cupy.ones(C, cupy.float32)
    b = cupy.zeros(C, cupy.float32)
    rm = cupy.zeros(C, cupy.float32)
    rv = cupy.ones(C, cupy.float32)
    y, mean, invstd = bncore_gpu.batch_norm_forward(x, w, b, rm, rv)
    tx = torch.as_tensor(x, device="cuda")          # zero-copy: the same memory and strides
    tdy = torch.as_tensor(dy, device="cuda")
    tw = torch.ones(C, device="cuda", requires_grad=True)
    tb = torch.zeros(C, device="cuda", requires_grad=True)
    trm = torch.zeros(C, device="cuda")
    trv = torch.ones(C, device="cuda")
    txg = tx.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    ty = F.batch_norm(txg, None, None, tw, tb, True, 0.1, 1e-5)
    twd, tbd = tw.detach(), tb.detach()              # outside the timed calls
    nbytes = x.nbytes
    fwd = {
        "bncore": cuda_time_ms(lambda: bncore_gpu.batch_norm_forward(x, w, b, rm, rv)),
        "torch": cuda_time_ms(lambda: F.batch_norm(tx, trm, trv, twd, tbd, True, 0.1, 1e-5)),
        "floor": 2 * nbytes / bw,
    }
    fwd["cluster"] = _ran_cluster(x, 1)
    coop = _ran_coop(lambda: bncore_gpu.batch_norm_forward(x, w, b, rm, rv))
    rows = [dict(case=f"bn forward-train {label}{', cluster' * fwd['cluster']}"
                      f"{', one launch' * coop}", **fwd)]
    # y, mean and invstd of a training forward do not depend on the running
    # statistics, so the variants' checked and timed calls update rm and rv in
    # place as the default row's calls do (no copies inside the timed call)
    cases = [("forward-train", rows[0], lambda: bncore_gpu.batch_norm_forward(x, w, b, rm, rv))]
    if backward:
        bwd = {
            "bncore": cuda_time_ms(lambda: bncore_gpu.batch_norm_backward(dy, x, mean, invstd,
                                                                          w)),
            "torch": _torch_backward_ms(torch, ty, txg, tw, tb, tx, tdy, twd, tbd),
            "floor": 3 * nbytes / bw,
        }
        bwd["cluster"] = _ran_cluster(x, 2)
        coop = _ran_coop(lambda: bncore_gpu.batch_norm_backward(dy, x, mean, invstd, w))
        rows.append(dict(case=f"bn backward {label}{', cluster' * bwd['cluster']}"
                              f"{', one launch' * coop}", **bwd))
        cases.append(("backward", rows[1],
                      lambda: bncore_gpu.batch_norm_backward(dy, x, mean, invstd, w)))
    if x.dtype == cupy.float32 and ("channels-last" in label or x.ndim == 2):
        # the three kernels instead of the one cooperative launch (the same
        # tiles and sums: bitwise the same), with their elementwise pass
        # walking the rows first to last in one wave (the default), and
        # walking the reduction's tiles backwards (from what is still in L2)
        rows += _variant_rows(label, "3 kernels", {"ROWS_COOP": False}, cases, _identical)
        rows += _variant_rows(label, "3 kernels, tiles backwards",
                              {"ROWS_COOP": False, "ROWS_L2_REUSE": True}, cases, _identical)
    # where the cluster kernels ran: the three-kernel path (another summation
    # order, so within the parity tolerance)
    rows += _variant_rows(label, "3-kernel path", {"CLUSTER_KERNELS": False},
                          [c for c in cases if c[1]["cluster"]], _close)
    return rows


def _identical(got, ref) -> bool:
    return all(bool((g == r).all()) for g, r in zip(got, ref))


def _close(got, ref) -> bool:
    import cupy
    return all(float(cupy.abs(g - r).max() / max(float(cupy.abs(r).max()), 1e-30)) <= 1e-6
               for g, r in zip(got, ref))


def _variant_rows(label, variant, settings, cases, same) -> List[dict]:
    """Each case again with bncore_gpu.batch_norm's module settings `settings`
    ({name: value}) in force, in the same run, after checking that the default
    path's outputs and the variant's agree (`same`); where they do not, both
    rows say so and the default's time is dropped; a variant that fails shows
    as FAILED, not as a time."""
    import sys

    from bncore_gpu import batch_norm as gbn
    saved = {k: getattr(gbn, k) for k in settings}

    def use(values):
        for k, v in values.items():
            setattr(gbn, k, v)

    rows = []
    try:
        for kind, base, fn in cases:
            name = f"bn {kind} {label}, {variant}"
            try:
                use(saved)
                got = fn()
                use(settings)
                if not same(got, fn()):
                    print(f"{variant} {kind} {label}: outputs differ from the default path's",
                          file=sys.stderr)
                    name += " (outputs DIFFER from the default path)"
                    base["case"] += " (outputs DIFFER from the " + variant + ")"
                    base["bncore"] = float("nan")
                t = cuda_time_ms(fn)
            except Exception as exc:     # report it, keep the other rows
                print(f"{variant} {kind} {label}: {type(exc).__name__}: {exc}", file=sys.stderr)
                name += " FAILED"
                t = float("nan")
            rows.append(dict(case=name, bncore=t, torch=base["torch"], floor=base["floor"]))
    finally:
        use(saved)
    return rows


def _torch_backward_ms(torch, ty, txg, tw, tb, tx, tdy, twd, tbd) -> float:
    """torch's faster backward: autograd through F.batch_norm (cuDNN where torch
    picks it, plus the autograd engine's host time) or the native kernel called
    directly (no engine), as the CPU benchmark calls it."""
    import math
    import sys

    times = [cuda_time_ms(lambda: torch.autograd.grad(ty, (txg, tw, tb), tdy,
                                                      retain_graph=True))]
    try:
        C = tx.shape[1]
        trm = torch.zeros(C, device="cuda")
        trv = torch.ones(C, device="cuda")
        _, smean, sinvstd = torch.ops.aten.native_batch_norm(tx, twd, tbd, trm, trv, True,
                                                             0.1, 1e-5)
        times.append(cuda_time_ms(lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, twd, trm, trv, smean, sinvstd, True, 1e-5, [True, True, True])))
    except Exception as exc:       # noqa: BLE001 - report, keep the autograd time
        print(f"torch native_batch_norm_backward: {type(exc).__name__}: {exc}",
              file=sys.stderr)
    return min(t for t in times if not math.isnan(t))


def _takes_cluster(x, held: int) -> bool:
    """Whether bncore_gpu's default path sends this float32 NCHW-like case to
    the cluster kernels (checked after timing: a refused launch falls back)."""
    from bncore_gpu import batch_norm as gbn
    if not x.flags.c_contiguous:                   # channels-last: no planes
        return False
    inner = x.size // (x.shape[0] * x.shape[1])
    f = x.reshape(-1)
    return bool(gbn.cluster_smem(x.shape[0], x.shape[1], inner, held, *([f] * (held + 1))))


def _ran_coop(call) -> bool:
    """Whether `call` (one more call of the timed one) took the cooperative
    one-launch path: a refused launch, a graph capture or a setting falls back
    to the three kernels, and the row should say which it timed."""
    from bncore_gpu import batch_norm as gbn
    launched = []
    real = gbn._launch_coop

    def spy(name, blocks, args):
        ok = real(name, blocks, args)
        launched.append(ok)
        return ok
    gbn._launch_coop = spy
    try:
        call()
    finally:
        gbn._launch_coop = real
    return any(launched)


def _ran_cluster(x, held: int) -> bool:
    """Whether the default path ran this case on the cluster kernels: it
    qualifies, and the device did not refuse them (a refusal falls back)."""
    from bncore_gpu import batch_norm as gbn
    return _takes_cluster(x, held) and bool(gbn._cluster_cap())


def optim_cases(bw: float) -> List[dict]:
    import cupy
    import torch

    from bench import shrinking_bound

    import bncore_gpu
    rows = []
    N = 100_000_000
    for ntens in (1, 200):
        sizes = [N // ntens] * ntens
        label = f"100M as {ntens} tensor{'s' if ntens > 1 else ''}"
        rng = cupy.random.default_rng(2)
        params = [rng.standard_normal(s, dtype=cupy.float32) for s in sizes]
        grads = [rng.standard_normal(s, dtype=cupy.float32) * 1e-3 for s in sizes]

        def torch_params():
            ps = [torch.as_tensor(p, device="cuda").clone() for p in params]
            for t, g in zip(ps, grads):
                t.grad = torch.as_tensor(g, device="cuda")
            return ps

        opt = bncore_gpu.optim.Adam([p.copy() for p in params], lr=1e-3)
        row = {"case": f"adam {label}",
               "bncore": cuda_time_ms(lambda: opt.step(grads)),
               "torch": cuda_time_ms(torch.optim.Adam(torch_params(), lr=1e-3, fused=True).step),
               "floor": 28 * N / bw}
        _free()
        row["torch foreach"] = cuda_time_ms(
            torch.optim.Adam(torch_params(), lr=1e-3, foreach=True).step)
        rows.append(row)
        del opt
        _free()
        if ntens == 200:
            sgd = bncore_gpu.optim.SGD([p.copy() for p in params], lr=1e-3, momentum=0.9)
            rows.append({"case": f"sgd momentum {label}",
                         "bncore": cuda_time_ms(lambda: sgd.step(grads)),
                         "torch": cuda_time_ms(torch.optim.SGD(torch_params(), lr=1e-3,
                                                               momentum=0.9, foreach=True).step),
                         "floor": 20 * N / bw})
            del sgd
            _free()
            cg = [g.copy() for g in grads]
            start = 0.5 * float(bncore_gpu.grad_norm(cg))
            tp = torch_params()
            # every call scales (see bench.shrinking_bound)
            rows.append({"case": f"clip_grad_norm {label}",
                         "bncore": cuda_time_ms(shrinking_bound(
                             lambda m: bncore_gpu.clip_grad_norm(cg, m), start)),
                         "torch": cuda_time_ms(shrinking_bound(
                             lambda m: torch.nn.utils.clip_grad_norm_(tp, m, foreach=True),
                             start)),
                         "floor": 12 * N / bw})
            del cg, tp
        del params, grads
        _free()
    return rows


def run_all() -> Dict[str, object]:
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bw = copy_bandwidth()
    rows = bn_cases(bw)
    try:
        rows += optim_cases(bw)
    except Exception as exc:  # noqa: BLE001 - the batch-norm rows still print
        import sys
        import traceback
        traceback.print_exc(file=sys.stderr)
        nan = float("nan")
        rows.append(dict(case=f"optimizer cases: FAILED ({type(exc).__name__})", bncore=nan,
                         torch=nan, floor=nan))
    for r in rows:
        r["target"] = TARGETS_MS.get(r["case"].removesuffix(", one launch")
                                     .removesuffix(", cluster"))
    return {"device": name, "copy_TBps": bw / 1e9, "rows": rows}


def report(res: Dict[str, object]) -> str:
    lines = [f"GPU benchmark on {res['device']}: float32 unless a row says float16, CUDA "
             f"events, median; copy floor {res['copy_TBps']:.2f} TB/s (read + written); "
             f"targets are issue 4's, set on an H100", "",
             "| case | bncore_gpu ms | torch ms | torch foreach ms | floor ms | target ms | "
             "torch/bncore | bncore/floor | target met |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        tgt = r.get("target")
        met = "-" if tgt is None else ("yes" if r["bncore"] <= tgt else "NO")
        tf = r.get("torch foreach")
        lines.append(f"| {r['case']} | {r['bncore']:.3f} | {r['torch']:.3f} | "
                     f"{'-' if tf is None else f'{tf:.3f}'} | {r['floor']:.3f} | "
                     f"{'-' if tgt is None else f'{tgt:.2f}'} | {r['torch'] / r['bncore']:.2f} | "
                     f"{r['bncore'] / r['floor']:.2f} | {met} |")
    return "\n".join(lines)


def main(json_path: str = None) -> int:
    import json

    res = run_all()
    text = report(res)
    print(text)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))


"""Optimizer and clipping benchmark cases for scripts/bench.py (CPU).

10M float32 parameters as one tensor and as 200 tensors, bncore beside
torch.optim (fused=True / foreach=True) and the floors: an in-place
``np.add(a, b, out=a)`` over arrays holding the bytes the update must move
(Adam: read p, g, m, v and write p, m, v = 28 bytes per parameter; SGD with
momentum: 20; clip_grad_norm: read g for the norm, then read and write g = 12).
For 200 tensors also RMSprop (20 bytes), clip_grad_value (8), clip_grad_norm
of float16 gradients (6) and the AMP non-finite check (4), which have no issue
targets.
"""
from typing import List

import numpy as np

N = 10_000_000


def _split(n_tensors: int) -> List[int]:
    base = N // n_tensors
    sizes = [base] * n_tensors
    sizes[-1] += N - base * n_tensors
    return sizes


def _floors(nbytes: int, threads: int):
    """The single-threaded floor and the same with `threads` threads: a += b
    moves 12 bytes per float32 element (read a, read b, write a). Small byte
    counts would leave a and b in the 32 MiB L3 cache between calls, which the
    case's own data (one pass over 40 MB or more) never is: the calls then
    rotate over enough (a, b) pairs to hold at least 96 MiB."""
    from bench import threaded

    n = nbytes // 12
    npairs = max(1, -(-(96 << 20) // (8 * n)))
    pairs = [(np.ones(n, np.float32), np.ones(n, np.float32)) for _ in range(npairs)]
    one = [lambda a=a, b=b: np.add(a, b, out=a) for a, b in pairs]
    many = [threaded(np.add, a, a, b, threads=threads) for a, b in pairs]

    def rotating(calls):
        k = [0]

        def run():
            k[0] = (k[0] + 1) % len(calls)
            return calls[k[0]]()
        return run
    return {"floor": rotating(one), "floor Nt": rotating(many)}


def optim_cases(threads: int) -> List:
    import bncore
    from bench import Case, shrinking_bound

    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    rng = np.random.default_rng(1)
    cases = []
    for n_tensors in (1, 200):
        sizes = _split(n_tensors)
        label = f"10M as {n_tensors} tensor{'s' if n_tensors > 1 else ''}"
        params = [rng.standard_normal(s).astype(np.float32) for s in sizes]
        grads = [(rng.standard_normal(s) * 1e-3).astype(np.float32) for s in sizes]
        m = [np.zeros_like(p) for p in params]
        v = [np.zeros_like(p) for p in params]
        bufs = [np.zeros_like(p) for p in params]
        step = [0]

        def adam(params=params, grads=grads, m=m, v=v, step=step):
            step[0] += 1
            bncore.adam_step(params, grads, m, v, step=step[0], lr=1e-3, num_threads=threads)

        def sgd(params=params, grads=grads, bufs=bufs):
            bncore.sgd_step(params, grads, bufs, lr=1e-3, momentum=0.9, num_threads=threads)

        # clip_grad_norm: every call scales (max_norm shrinks below the norm).
        # The lambdas bind this iteration's lists as defaults: a bare name would
        # be looked up when the case runs, after the loop, and the 1-tensor row
        # would then clip the 200 tensors (and leave them below the 200-tensor
        # row's bound, which then timed the norm pass alone)
        cgrads = [g.copy() for g in grads]
        start = 0.5 * bncore.grad_norm(cgrads)
        clip = shrinking_bound(
            lambda m, cgrads=cgrads: bncore.clip_grad_norm(cgrads, m, num_threads=threads),
            start)

        adam_impls = {"bncore": adam}
        sgd_impls = {"bncore": sgd}
        clip_impls = {"bncore": clip}
        if torch is not None:
            def make_params():
                ps = [torch.from_numpy(p.copy()) for p in params]
                for t, g in zip(ps, grads):
                    t.grad = torch.from_numpy(g)
                return ps
            adam_impls["torch"] = torch.optim.Adam(make_params(), lr=1e-3, fused=True).step
            adam_impls["torch alt"] = torch.optim.Adam(make_params(), lr=1e-3,
                                                       foreach=True).step
            sgd_impls["torch"] = torch.optim.SGD(make_params(), lr=1e-3, momentum=0.9,
                                                 foreach=True).step
            sgd_impls["torch alt"] = torch.optim.SGD(make_params(), lr=1e-3, momentum=0.9,
                                                     fused=True).step
            tp = [torch.zeros(g.shape) for g in cgrads]
            for t, g in zip(tp, cgrads):
                t.grad = torch.from_numpy(g.copy())
            clip_impls["torch"] = shrinking_bound(
                lambda m, tp=tp: torch.nn.utils.clip_grad_norm_(tp, m, foreach=True), start)
        adam_impls.update(_floors(28 * N, threads))
        sgd_impls.update(_floors(20 * N, threads))
        clip_impls.update(_floors(12 * N, threads))
        cases.append(Case(f"adam {label}", "optim", 28 * N, adam_impls,
                          note="torch = Adam(fused=True); torch alt = Adam(foreach=True)"))
        cases.append(Case(f"sgd momentum {label}", "optim", 20 * N, sgd_impls,
                          note="torch = SGD(foreach=True), the issue's; torch alt = SGD(fused=True)"))
        cases.append(Case(f"clip_grad_norm {label}", "optim", 12 * N, clip_impls,
                          note="torch = clip_grad_norm_(foreach=True); every call clips"))
        if n_tensors == 200:
            cases += _more_cases(bncore, torch, threads, label, params, grads, start)
    return cases


def _more_cases(bncore, torch, threads, label, params, grads, start) -> List:
    """RMSprop, clip_grad_value, float16 clip_grad_norm and the AMP non-finite
    check (no issue targets)."""
    from bench import Case, shrinking_bound

    rparams = [p.copy() for p in params]
    sq = [np.zeros_like(p) for p in params]
    rms = {"bncore": lambda: bncore.rmsprop_step(rparams, grads, sq, lr=1e-5,
                                                 num_threads=threads)}
    # clip_grad_value: the values the last call clipped are out of range again
    # with the shrinking bound, so every call writes
    vgrads = [g.copy() for g in grads]
    bound = 0.5 * float(np.abs(grads[0]).std())
    value = {"bncore": shrinking_bound(
        lambda c: bncore.clip_grad_value(vgrads, c, num_threads=threads), bound)}
    check = {"bncore": lambda: bncore.found_inf(grads, num_threads=threads)}
    if torch is not None:
        tps = [torch.from_numpy(p.copy()) for p in params]
        for t, g in zip(tps, grads):
            t.grad = torch.from_numpy(g)
        rms["torch"] = torch.optim.RMSprop(tps, lr=1e-5, foreach=True).step
        vps = [torch.zeros(g.shape) for g in grads]
        for t, g in zip(vps, grads):
            t.grad = torch.from_numpy(g.copy())
        value["torch"] = shrinking_bound(
            lambda c: torch.nn.utils.clip_grad_value_(vps, c, foreach=True), bound)
        tgrads = [torch.from_numpy(g.copy()) for g in grads]
        flag, one = torch.zeros(1), torch.ones(1)
        check["torch"] = lambda: torch._amp_foreach_non_finite_check_and_unscale_(
            tgrads, flag, one)
    # clip_grad_norm of float16 gradients (AMP's dtype): the norm reads them
    # through whole-run conversions, the scaling writes them rounded once
    hgrads = [g.astype(np.float16) * np.float16(1000) for g in grads]
    hstart = 0.5 * bncore.grad_norm(hgrads)
    half = {"bncore": shrinking_bound(
        lambda m: bncore.clip_grad_norm(hgrads, m, num_threads=threads), hstart)}
    if torch is not None:
        hps = [torch.zeros(g.shape, dtype=torch.float16) for g in hgrads]
        for t, g in zip(hps, hgrads):
            t.grad = torch.from_numpy(g.copy())
        half["torch"] = shrinking_bound(
            lambda m: torch.nn.utils.clip_grad_norm_(hps, m, foreach=True), hstart)
    half.update(_floors(6 * N, threads))
    rms.update(_floors(20 * N, threads))
    value.update(_floors(8 * N, threads))
    check.update(_floors(4 * N, threads))
    return [Case(f"rmsprop {label}", "optim", 20 * N, rms, note="torch = RMSprop(foreach=True)"),
            Case(f"clip_grad_value {label}", "optim", 8 * N, value,
                 note="torch = clip_grad_value_(foreach=True); every call clips"),
            Case(f"clip_grad_norm {label} float16", "optim", 6 * N, half,
                 note="torch = clip_grad_norm_(foreach=True) on float16 gradients; every call clips"),
            Case(f"found_inf {label}", "optim", 4 * N, check,
                 note="torch = _amp_foreach_non_finite_check_and_unscale_ (also multiplies "
                      "the gradients by 1/scale: it reads and writes them)")]

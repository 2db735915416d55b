"""Gradient norms and clipping on the GPU (see bncore.clipping for the rules).

Everything stays on the device: the norm is reduced in two fixed-order stages
(one partial per chunk, then one block combining them), the clip coefficient
is computed next to it, and the scaling kernel reads it from device memory.
``grad_norm`` and ``clip_grad_norm`` return the total norm as a 0-d float64
CuPy array and ``found_inf`` a 0-d float64 flag (1.0 or 0.0), so a training
step never waits on the host; only ``error_if_nonfinite=True`` reads the
norm back (it must, to raise before any gradient is touched).
"""
from __future__ import annotations

import math
from typing import Optional

import cupy
import numpy as np

from bncore import _checks as hchk
from bncore import optimizers as _cpu
from bncore._threads import resolve_num_threads
from bncore.clipping import NonFiniteError, _norm_type, tables_by_dtype
from bncore_gpu import _checks as chk
from bncore._torch_interop import bump_versions
from bncore_gpu._tables import CTYPES, gather
from bncore_gpu.optimizers import NULL, kernel

__all__ = ["grad_norm", "clip_grad_norm", "clip_grad_value", "found_inf", "NonFiniteError"]

_F64 = np.dtype(np.float64)


def _table(grads, write: bool):
    """One gather table (one dtype: the distributed forms' rank-local list)."""
    return chk.without_none("grads", _cpu.as_list("grads", grads, required=True),
                            lambda lst: gather([lst], ("grads",), (write,), -1,
                                               half_first=True))


def _tables(grads, write: bool) -> list:
    """One gather table, or one per dtype when the list mixes dtypes
    (bncore.clipping.tables_by_dtype, on device arrays)."""
    return tables_by_dtype(
        _cpu.as_list("grads", grads, required=True), write,
        lambda lst: gather([lst], ("grads",), (write,), -1, half_first=True),
        chk.as_array, lambda a: a.data.ptr)


def _combined_total(tables, p: float):
    """The norm of every table's gradients together, a 0-d device array: each
    table's norm, then those combined relative to the largest (NaN wins, as
    in the kernels), on the device."""
    norms = [_norm(t, p, 0.0, 0.0)[0] for t in tables]
    R = norms[0]
    for n in norms[1:]:
        R = cupy.maximum(R, n)                 # NaN-propagating
    if math.isinf(p) or len(norms) == 1:
        return R
    ok = (R > 0) & cupy.isfinite(R)
    safe = cupy.where(ok, R, 1.0)
    s = sum((n / safe) ** p for n in norms)
    return cupy.where(ok, safe * s ** (1.0 / p), R)



def _norm_pass(t, kind: int, p: float, max_norm: float, eps: float, total, coef,
               gate=NULL, scale=NULL) -> None:
    """One reduction of the table into total and coef (device scalars): the
    chunk partials, then their fixed-order combination; nothing where the
    device flag `gate` is 0."""
    part_s = cupy.empty(t.nchunks, _F64)
    part_q = cupy.empty(t.nchunks, _F64)
    kernel(f"mt_norm_partials<{CTYPES[t.pdtype]}>")(
        (t.nchunks,), (256,), (*t.args(), np.int32(kind), np.float64(p), part_s, part_q, gate,
                               scale))
    scaled = kind == 2 and t.pdtype == _F64
    kernel("mt_norm_finalize")((1,), (256,),
                               (np.int64(t.nchunks), np.int32(kind), np.float64(p),
                                np.int32(scaled), part_s, part_q, np.float64(max_norm),
                                np.float64(eps), total, coef, gate))


def _norm(t, p: float, max_norm: float, eps: float):
    """(total, coef) as 0-d device arrays. A p-norm other than 1, 2 and inf
    whose sum of powers underflowed (below 2^-1000: small gradients at a large
    p, where the norm came out 0 and nothing was clipped) or overflowed on
    finite data is taken again relative to max |g|, as on the CPU: two more
    passes, launched every time and doing nothing unless needed, so the host
    never waits on the device."""
    kind = 3 if math.isinf(p) else (2 if p == 2.0 else (1 if p == 1.0 else 4))
    total = cupy.zeros((), _F64)
    coef = cupy.full((), math.inf, _F64)
    if t.nchunks == 0:
        return total, coef
    _norm_pass(t, kind, p, max_norm, eps, total, coef)
    if kind == 4:
        gate, top, rel, unused = (cupy.empty((), _F64) for _ in range(4))
        rescue = kernel("mt_norm_rescue")
        args = (np.float64(p), np.float64(max_norm), np.float64(eps), total, coef, gate, top, rel)
        rescue((1,), (32,), (np.int32(0), *args))
        _norm_pass(t, 3, p, 0.0, 0.0, top, unused, gate)
        rescue((1,), (32,), (np.int32(1), *args))
        _norm_pass(t, 4, p, 0.0, 0.0, rel, unused, gate, top)
        rescue((1,), (32,), (np.int32(2), *args))
    return total, coef


def grad_norm(grads, norm_type: float = 2.0, *, comm=None, num_threads: Optional[int] = None):
    """The p-norm of all gradients together (see bncore.grad_norm); a 0-d device array.
    A p-norm whose float64 sum of powers underflows or overflows on finite data
    is taken again relative to the largest magnitude, as on the CPU (_norm).
    With ``comm`` (an mpi4py communicator), of every rank's gradients together
    (bncore_gpu.distributed.grad_norm)."""
    grads = _cpu.read_once(grads)
    if comm is not None:
        from bncore_gpu import distributed
        return distributed.grad_norm(grads, norm_type, comm=comm, num_threads=num_threads)
    p = _norm_type(norm_type)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    tables = _tables(grads, False)
    if len(tables) == 1:
        return _norm(tables[0], p, 0.0, 0.0)[0]
    return _combined_total(tables, p)


def clip_grad_norm(grads, max_norm: float, *, norm_type: float = 2.0, eps: float = 1e-6,
                   error_if_nonfinite: bool = False, comm=None,
                   num_threads: Optional[int] = None):
    """Scale all gradients so their total norm is at most max_norm (see
    bncore.clip_grad_norm); returns the norm before clipping, a 0-d device array.
    With ``comm`` (an mpi4py communicator) the norm is that of every rank's
    gradients together (bncore_gpu.distributed.clip_grad_norm)."""
    grads = _cpu.read_once(grads)
    if comm is not None:
        from bncore_gpu import distributed
        return distributed.clip_grad_norm(grads, max_norm, comm=comm, norm_type=norm_type,
                                          eps=eps, error_if_nonfinite=error_if_nonfinite,
                                          num_threads=num_threads)
    max_norm = hchk.clip_bound("max_norm", max_norm)
    eps = hchk.non_negative("eps", eps)
    error_if_nonfinite = hchk.flag("error_if_nonfinite", error_if_nonfinite)
    p = _norm_type(norm_type)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    tables = _tables(grads, True)
    if len(tables) == 1:
        total, coef = _norm(tables[0], p, max_norm, eps)
    else:
        # coef = max_norm / (total + eps), Inf (no clipping) where that is 0, as
        # mt_norm_finalize computes it for one table
        total = _combined_total(tables, p)
        d = total + eps
        coef = cupy.where(d != 0, max_norm / cupy.where(d != 0, d, 1.0), math.inf)
    if error_if_nonfinite and not bool(cupy.isfinite(total)):
        raise NonFiniteError.of(f"the total {p}-norm of the gradients", float(total))
    for t in tables:
        if t.nchunks:
            kernel(f"mt_scale<{CTYPES[t.pdtype]}>")((t.nchunks,), (256,), (*t.args(), coef))
        bump_versions(t.written())
    return total


def clip_grad_value(grads, clip_value: float, *, num_threads: Optional[int] = None) -> None:
    """Clamp every gradient element to [-clip_value, clip_value]; NaN stays NaN."""
    grads = _cpu.read_once(grads)
    c = hchk.clip_bound("clip_value", clip_value)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    for t in _tables(grads, True):
        if t.nchunks:
            kernel(f"mt_clamp<{CTYPES[t.pdtype]}>")((t.nchunks,), (256,),
                                                    (*t.args(), np.float64(-c), np.float64(c)))
        bump_versions(t.written())


def found_inf(grads, *, num_threads: Optional[int] = None):
    """1.0 (0-d float64 device array) when any gradient holds an Inf or a NaN, else 0.0;
    pass it straight to a step function's ``found_inf``."""
    grads = _cpu.read_once(grads)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    flags = []
    for t in _tables(grads, False):
        found = cupy.zeros((), _F64)
        if t.nchunks:
            part = cupy.empty(t.nchunks, _F64)
            kernel(f"mt_nonfinite_partials<{CTYPES[t.pdtype]}>")((t.nchunks,), (256,),
                                                                 (*t.args(), part))
            kernel("mt_any")((1,), (256,), (np.int64(t.nchunks), part, found))
        flags.append(found)
    found = flags[0]
    for f in flags[1:]:
        found = cupy.maximum(found, f)
    return found

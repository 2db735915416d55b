"""Gradient norms and clipping over lists of arrays, in one parallel pass.

Norms accumulate in float64 with a fixed summation order (bitwise identical
for every thread count); a 2-norm whose float64 sum would overflow is
recomputed on gradients scaled by their largest magnitude, so it is finite
whenever the answer is representable.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import numpy as np

from bncore import _checks as chk
from bncore import _optim_kernels as _k
from bncore._threads import resolve_num_threads
from bncore.optimizers import ArrayList, as_list, read_once

__all__ = ["grad_norm", "clip_grad_norm", "clip_grad_value", "found_inf", "NonFiniteError"]

_NORM_1, _NORM_2, _NORM_INF, _NORM_P = 1, 2, 3, 4


class NonFiniteError(RuntimeError, ValueError):
    """The gradient norm is NaN or infinite (``clip_grad_norm(error_if_nonfinite=True)``)."""

    @classmethod
    def of(cls, what: str, total: float) -> "NonFiniteError":
        return cls(f"{what} is {total}; no gradient was modified "
                   f"(set error_if_nonfinite=False to clip anyway)")


def clip_coefficient(total: float, max_norm: float, eps: float) -> Optional[float]:
    """The factor clip_grad_norm scales the gradients by, max_norm / (total + eps),
    or None when it leaves them as they are (factor >= 1). A NaN total gives
    NaN, which is applied, as IEEE and torch say."""
    coef = max_norm / (total + eps) if (total + eps) != 0.0 else math.inf
    return None if coef >= 1.0 else coef


def _grads_table(grads, write: bool):
    gl = as_list("grads", grads, required=True)
    return chk.without_none("grads", gl, lambda lst: _k.gather(
        [lst], ("grads",), (write,), -1, chk.as_array, half_first=True))


def _grads_tables(grads, write: bool) -> list:
    """The gradients as kernel tables: one, or one per dtype (tables_by_dtype)."""
    def in_place(name, g):
        if type(g) is not np.ndarray and not chk.viewable_in_place(g):
            # np.asarray would clip a temporary copy and lose the update
            raise TypeError(f"{name} is updated in place, so it must be an array (or a "
                            f"tensor shared through DLPack or the buffer protocol), got "
                            f"{type(g).__name__}")
        return chk.as_array(name, g)

    return tables_by_dtype(
        as_list("grads", grads, required=True), write,
        lambda lst: _k.gather([lst], ("grads",), (write,), -1, chk.as_array, half_first=True),
        in_place if write else chk.as_array,
        lambda a: a.__array_interface__["data"][0])


def tables_by_dtype(gl: list, write: bool, gather_one, as_array, address) -> list:
    """`gather_one(gl)` (the table of a gradient list), or, when the list mixes
    dtypes (torch's clipping allows that: a mixed-precision model), one table
    per dtype in the order of their first appearance: a kernel call takes one
    dtype. Every table is checked before any is used, the messages' indices
    over the whole list; written gradients must not overlap across tables
    either. Shared with bncore_gpu.clipping (as_array and address per backend).
    None entries are left out, as torch's clipping leaves out parameters whose
    .grad is None."""
    if chk.any_none(gl):
        return chk.without_none("grads", gl, lambda lst: tables_by_dtype(
            lst, write, gather_one, as_array, address))
    try:
        return [gather_one(gl)]
    except TypeError as exc:
        try:
            arrays = [as_array(f"grads[{i}]", g) for i, g in enumerate(gl)]
        except (TypeError, ValueError) as refused:
            # an entry that cannot be written in place says so; else the first error
            if "updated in place" in str(refused):
                raise refused from None
            raise exc from None
        groups: dict = {}
        for i, a in enumerate(arrays):
            groups.setdefault(a.dtype, []).append(i)
        if len(groups) < 2:
            raise
    tables = []
    for idx in groups.values():
        try:
            tables.append(gather_one([arrays[i] for i in idx]))
        except (TypeError, ValueError) as e:
            raise chk.renumbered(e, "grads", idx) from None
    if write:
        # each table's gather refused overlaps within it; across tables here
        starts = [address(a) for a in arrays]
        chk.refuse_overlap([f"grads[{i}]" for i in range(len(arrays))], starts,
                           [s + a.nbytes for s, a in zip(starts, arrays)], [True] * len(arrays))
    return tables


def _norm_type(norm_type) -> float:
    if isinstance(norm_type, str) and norm_type.strip().lower() == "inf":
        return math.inf                  # torch accepts the string too
    p = chk.real_scalar("norm_type", norm_type)
    if not (p > 0):
        raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type!r}")
    return p


def _rescue_scale(big: float) -> float:
    """The power of two at or above `big` (the largest |g|): the scale of the
    overflow and underflow rescues, g / scale <= 1, exact as a multiply by
    1 / scale. Above 2^1023 (float64's largest power of two) it is 2^1023 and
    g / scale < 2; it is at least 2^-1021, so that 1 / scale is finite."""
    return math.ldexp(1.0, max(-1021, min(math.frexp(big)[1], 1023)))


# A sum of powers below this may hold powers that underflowed (squares of
# |g| < 2^-511 lose bits as subnormals, or vanish): then the sum is taken again
# on gradients scaled by their largest magnitude, as an overflowing one is.
_UNDERFLOW_SUM = 2.0 ** -1000


def _kind(p: float) -> int:
    """The kernels' sum for a finite p: squares, magnitudes or |g|^p."""
    return _NORM_2 if p == 2.0 else (_NORM_1 if p == 1.0 else _NORM_P)


def _root(s: float, kind: int, p: float) -> float:
    """The norm from its sum of powers; Inf where the root overflows float64
    (a p < 1 norm of huge values), not Python's OverflowError."""
    if kind == _NORM_2:
        return math.sqrt(s)
    if kind == _NORM_1:
        return s
    try:
        return s ** (1.0 / p)
    except OverflowError:
        return math.inf


def _power_sum(table, p: float, nthreads: int) -> Tuple[float, float, float]:
    """(s, scale, nonfinite): sum |g / scale|^p = s (max |g| for p = inf), and
    whether the gradients hold an Inf or NaN. scale is 1 unless the float64 sum
    overflowed on finite data or its powers underflowed (a sum below
    _UNDERFLOW_SUM): then the sum is taken again relative to max |g| (for
    p = 1 and 2, to the power of two at or above it). One process's norm (_norm_of) and each rank's part of
    a distributed one (bncore.distributed) both come from here."""
    if math.isinf(p):
        return _k.norm_sum(table, _NORM_INF, p, 1.0, nthreads), 1.0, 0.0
    kind = _kind(p)
    s = _k.norm_sum(table, kind, p, 1.0, nthreads)
    if math.isfinite(s) and (kind == _NORM_1 or s >= _UNDERFLOW_SUM):
        return s, 1.0, 0.0
    if not math.isfinite(s) and _k.nonfinite(table, nthreads):
        return s, 1.0, 1.0
    top = _k.norm_sum(table, _NORM_INF, p, 1.0, nthreads)
    if top == 0.0:
        return 0.0, 1.0, 0.0
    # squares and magnitudes: relative to a power of two (an exact multiply);
    # any other p: relative to max |g| itself, whose term is then exactly 1.
    # (A power of two S >= max |g| leaves that term as small as 0.5^p, which
    # vanishes for p > 1074: the norm came out 0 and nothing was clipped.)
    big = top if kind == _NORM_P else _rescue_scale(top)
    return _k.norm_sum(table, kind, p, big, nthreads), big, 0.0


def _norm_of(table, p: float, nthreads: int) -> float:
    s, scale, _ = _power_sum(table, p, nthreads)
    if math.isinf(p):
        return s
    return scale * _root(s, _kind(p), p)


def combine_norms(sums, scales, nonfinite, p: float) -> float:
    """The p-norm of several parts from each part's _power_sum (s, scale,
    nonfinite), parts in order: the tables of one call's dtypes, or the ranks
    of a distributed one."""
    P = len(sums)
    if math.isinf(p):
        total = 0.0
        for r in range(P):
            a = float(sums[r])
            if a > total or a != a:     # NaN wins and stays, as the kernel's _nanmax
                total = a
        return total
    kind = _kind(p)
    scales, nonfinite = np.asarray(scales, dtype=np.float64), np.asarray(nonfinite)
    if np.all(scales == 1.0) or np.any(nonfinite != 0.0):
        s = 0.0
        for r in range(P):
            s += float(sums[r])
        if math.isfinite(s) or np.any(nonfinite != 0.0):
            return _root(s, kind, p)
    # a part's sum or the total overflowed on finite data: combine the parts'
    # norms relative to the largest, norm = R * (sum_r (n_r / R)^p)^(1/p)
    norms = [float(scales[r]) * _root(float(sums[r]), kind, p) for r in range(P)]
    R = max(norms)
    if R == 0.0 or math.isinf(R):
        return R
    s = 0.0
    for n_r in norms:
        s += (n_r / R) ** p
    return R * _root(s, kind, p)


def _norm_of_tables(tables, p: float, nthreads: int) -> float:
    if len(tables) == 1:
        return _norm_of(tables[0], p, nthreads)
    parts = [_power_sum(t, p, nthreads) for t in tables]
    return combine_norms(*zip(*parts), p)


def grad_norm(grads: ArrayList, norm_type: float = 2.0, *, comm: Any = None,
              num_threads: Optional[int] = None) -> float:
    """The p-norm of all gradients together, ``(sum_i |g_i|^p)^(1/p)`` (max |g| for inf).

    Equal to PyTorch's norm of per-tensor norms (``clip_grad_norm_``'s total)
    and to optax's ``global_norm`` for p = 2. NaN or Inf in a gradient gives a
    NaN or Inf norm. None entries are left out (torch's ``.grad`` of None:
    ``clip_grad_norm_`` skips such parameters). The list may mix float16, float32 and float64 gradients
    (one kernel pass per dtype, the parts combined in float64); with ``comm``
    each rank's list has one dtype. With ``comm`` (an mpi4py communicator) the gradients are
    this rank's shard and the norm is over every rank's: a collective, see
    :func:`bncore.distributed.grad_norm`.
    """
    grads = read_once(grads)
    if comm is not None:
        from bncore import distributed

        return distributed.grad_norm(grads, norm_type, comm=comm, num_threads=num_threads)
    p = _norm_type(norm_type)
    nthreads = resolve_num_threads(num_threads)
    return _norm_of_tables(_grads_tables(grads, False), p, nthreads)


def clip_grad_norm(grads: ArrayList, max_norm: float, *, norm_type: float = 2.0,
                   eps: float = 1e-6, error_if_nonfinite: bool = False, comm: Any = None,
                   num_threads: Optional[int] = None) -> float:
    """Scale all gradients in place so their total norm is at most ``max_norm``.

    ``coef = max_norm / (total + eps)``; when ``coef < 1`` every gradient is
    multiplied by it (one pass). eps=1e-6 is PyTorch's ``clip_grad_norm_``
    (whose result is slightly below max_norm); eps=0 is the exact global-norm
    clip of Keras (``global_clipnorm``) and optax (``clip_by_global_norm``),
    ``g * max_norm / max(total, max_norm)``. None entries are left out, as
    PyTorch leaves out parameters whose ``.grad`` is None. A NaN total multiplies every
    gradient by NaN, as in PyTorch, unless ``error_if_nonfinite=True``, which
    raises :class:`NonFiniteError` before any gradient is touched. An infinite
    total gives coef = 0 (finite entries become 0, infinite ones NaN), as in
    PyTorch and optax; Keras' ``global_clipnorm`` differs there only: it makes
    every gradient NaN (``scale + (norm - norm)`` in its ``clip_by_global_norm``).

    With ``comm`` (an mpi4py communicator) the gradients are this rank's
    shard, the total is over every rank's and every rank scales its own by the
    same coefficient: a collective, see :func:`bncore.distributed.clip_grad_norm`.

    Returns the total norm before clipping (a Python float).
    """
    grads = read_once(grads)
    if comm is not None:
        from bncore import distributed

        return distributed.clip_grad_norm(grads, max_norm, comm=comm, norm_type=norm_type,
                                          eps=eps, error_if_nonfinite=error_if_nonfinite,
                                          num_threads=num_threads)
    max_norm = chk.clip_bound("max_norm", max_norm)
    eps = chk.non_negative("eps", eps)
    error_if_nonfinite = chk.flag("error_if_nonfinite", error_if_nonfinite)
    p = _norm_type(norm_type)
    nthreads = resolve_num_threads(num_threads)
    tables = _grads_tables(grads, True)
    total = _norm_of_tables(tables, p, nthreads)
    if error_if_nonfinite and not math.isfinite(total):
        raise NonFiniteError.of(f"the total {p}-norm of the gradients", total)
    coef = clip_coefficient(total, max_norm, eps)
    if coef is not None:
        for table in tables:
            _k.scale(table, coef, nthreads)
        chk.bump_versions(as_list("grads", grads, required=True))
    return total


def clip_grad_value(grads: ArrayList, clip_value: float, *,
                    num_threads: Optional[int] = None) -> None:
    """Clamp every gradient element to ``[-clip_value, clip_value]`` in place
    (PyTorch ``clip_grad_value_``, Keras ``clipvalue``, optax ``clip``); NaN stays NaN."""
    grads = read_once(grads)
    c = chk.clip_bound("clip_value", clip_value)
    nthreads = resolve_num_threads(num_threads)
    for table in _grads_tables(grads, True):
        _k.clamp(table, -c, c, nthreads)
    chk.bump_versions(as_list("grads", grads, required=True))


def found_inf(grads: ArrayList, *, num_threads: Optional[int] = None) -> bool:
    """True when any gradient holds an Inf or a NaN (one parallel pass).

    The AMP pattern: ``skip = bncore.found_inf(grads)`` then
    ``bncore.adam_step(..., grad_scale=scale, found_inf=skip)``.
    """
    grads = read_once(grads)
    nthreads = resolve_num_threads(num_threads)
    return any(bool(_k.nonfinite(t, nthreads)) for t in _grads_tables(grads, False))

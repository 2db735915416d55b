"""Thread count, resolved in one place for every kernel.

``num_threads=None`` (the default on every call) means "what OpenMP would use
now": ``omp_get_max_threads()``, which follows ``OMP_NUM_THREADS`` and
threadpoolctl's ``threadpool_limits`` (bncore's kernels run on the same OpenMP
runtime that threadpoolctl controls). :func:`set_num_threads` overrides it for
bncore alone. The thread count never changes a result: every reduction's
order is fixed by the data's shape.
"""
from __future__ import annotations

import operator
from typing import Optional

from bncore import _openmp

_default: Optional[int] = None

#: the most threads a call may ask for: more than any machine's cores, and few
#: enough for OpenMP to create (libgomp failed, or crashed, at 32768 here)
MAX_THREADS = 4096


def get_num_threads() -> int:
    """Threads a call with ``num_threads=None`` will use."""
    if _default is not None:
        return _default
    return max(1, _openmp.max_threads())


def set_num_threads(n: Optional[int]) -> None:
    """Set bncore's default thread count (``None`` restores OpenMP's default)."""
    global _default
    _default = None if n is None else resolve_num_threads(n)


def resolve_num_threads(num_threads: Optional[int]) -> int:
    """Validate a ``num_threads=`` argument and return the count to use."""
    if num_threads is None:
        return get_num_threads()
    if isinstance(num_threads, bool):
        raise TypeError("num_threads must be an int or None, got bool")
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise TypeError(
            f"num_threads must be an int or None, got {type(num_threads).__name__}") from None
    if not 1 <= n <= MAX_THREADS:
        raise ValueError(f"num_threads must be between 1 and {MAX_THREADS}, got {n}")
    return n

"""Thread count, resolved in one place for every kernel.

``num_threads=None`` (the default on every call) means "what OpenMP would use
now": ``omp_get_max_threads()``, which follows ``OMP_NUM_THREADS`` and
threadpoolctl's ``threadpool_limits`` in the calling thread (bncore's kernels
run on the same OpenMP runtime that threadpoolctl controls), capped by
``OMP_THREAD_LIMIT``. :func:`set_num_threads` overrides it for bncore alone,
in every thread. The thread count never changes a result: every reduction's
order is fixed by the data's shape.

In a child made by ``os.fork`` (multiprocessing's default start method on
Linux) every call runs on one thread: GNU OpenMP's thread pool does not
survive fork, and a parallel region in the child of a process that had run
one waits forever for the parent's threads. Use the "spawn" or "forkserver"
start method for parallel workers; ``set_num_threads(n)`` in the child lifts
the cap (safe only where the parent never ran an OpenMP parallel region).
"""
from __future__ import annotations

import operator
import os
from typing import Optional

from bncore import _openmp

_default: Optional[int] = None
_forked_child = False         # set in a child of os.fork, cleared by set_num_threads


def _after_fork_in_child() -> None:
    global _forked_child
    _forked_child = _openmp.openmp_enabled()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: the most threads a call may ask for: more than any machine's cores, and few
#: enough for OpenMP to create (libgomp failed, or crashed, at 32768 here)
MAX_THREADS = 4096


def get_num_threads() -> int:
    """Threads a call with ``num_threads=None`` will use."""
    if _default is not None:
        return _default
    if _forked_child:
        return 1
    return max(1, min(_openmp.max_threads(), _openmp.thread_limit()))


def set_num_threads(n: Optional[int]) -> None:
    """Set bncore's default thread count (``None`` restores OpenMP's default).

    In a child of ``os.fork`` this also lifts the one-thread cap (module
    docstring): call it there only if the parent never ran a parallel region."""
    global _default, _forked_child
    n = None if n is None else _checked(n)
    _default = n
    _forked_child = False


def resolve_num_threads(num_threads: Optional[int]) -> int:
    """Validate a ``num_threads=`` argument and return the count to use."""
    if num_threads is None:
        return get_num_threads()
    n = _checked(num_threads)
    return 1 if _forked_child else n


def _checked(num_threads) -> int:
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

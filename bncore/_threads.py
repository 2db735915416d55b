"""Thread count, resolved in one place for every kernel.

``num_threads=None`` (the default on every call) means "what OpenMP would use
now": ``omp_get_max_threads()``, which follows ``OMP_NUM_THREADS`` and
threadpoolctl's ``threadpool_limits`` in the calling thread (bncore's kernels
run on the same OpenMP runtime that threadpoolctl controls), capped by
``OMP_THREAD_LIMIT``. :func:`set_num_threads` overrides it for bncore alone,
in every thread. The thread count never changes a result: every reduction's
order is fixed by the data's shape.

In a child made by ``os.fork`` (multiprocessing's default start method on
Linux) of a process that had run bncore on several threads, every call runs
on one thread: GNU OpenMP's thread pool does not survive fork, and a parallel
region in such a child waits forever for the parent's threads. Use the
"spawn" or "forkserver" start method for parallel workers;
``set_num_threads(n)`` with a number in the child lifts the cap (safe only
where the parent never ran an OpenMP parallel region, bncore's or another
library's on the same runtime).
"""
from __future__ import annotations

import operator
import os
from typing import Optional

from bncore import _openmp

_default: Optional[int] = None
_forked_child = False         # set in a child of os.fork (see above); set_num_threads(n) clears it
_ran_parallel = False         # this process asked OpenMP for more than one thread


def _after_fork_in_child() -> None:
    global _forked_child
    # (a forkserver, which never ran a parallel region, forks uncapped workers)
    _forked_child = _forked_child or (_ran_parallel and _openmp.openmp_enabled())


def note_parallel(n: int) -> int:
    """Record that a call is about to ask OpenMP for n threads; returns n."""
    global _ran_parallel
    if n > 1:
        _ran_parallel = True
    return n


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

#: the most threads a call may ask for: more than any machine's cores, and few
#: enough for OpenMP to create (libgomp failed, or crashed, at 32768 here)
MAX_THREADS = 4096


def get_num_threads() -> int:
    """Threads a call with ``num_threads=None`` will use."""
    if _forked_child:
        return 1
    if _default is not None:
        return _default
    return max(1, min(_openmp.max_threads(), _openmp.thread_limit()))


def set_num_threads(n: Optional[int]) -> None:
    """Set bncore's default thread count (``None`` restores OpenMP's default).

    In a child of ``os.fork`` a number also lifts the one-thread cap (module
    docstring): give one there only if the parent never ran a parallel region.
    ``None`` leaves the cap."""
    global _default, _forked_child
    if n is None:
        _default = None
        return
    _default = _checked(n)
    _forked_child = False


def resolve_num_threads(num_threads: Optional[int]) -> int:
    """Validate a ``num_threads=`` argument and return the count to use."""
    if num_threads is None:
        return note_parallel(get_num_threads())
    n = _checked(num_threads)
    return 1 if _forked_child else note_parallel(n)


def fast_num_threads(num_threads) -> int:
    """resolve_num_threads for the compiled fast paths, which take only a plain
    int in range or None: the count, or 0 for an argument the checked path
    must judge (and whose message it gives)."""
    if num_threads is None:
        return note_parallel(get_num_threads())
    if type(num_threads) is int and 1 <= num_threads <= MAX_THREADS:
        return 1 if _forked_child else note_parallel(num_threads)
    return 0


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

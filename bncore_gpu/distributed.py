"""Synchronized batch norm and distributed gradient clipping for CuPy arrays.

The GPU twin of :mod:`bncore.distributed`: the same functions, arguments,
validation protocol, errors and combination rules (read that module's
docstring), with the local work done on the device by bncore_gpu's kernels:

* forward: this rank's per-channel (mean, M2) from the statistics kernels,
  exchanged, combined on every rank in rank order (Chan's formula, host
  float64), then normalized on the device;
* backward: this rank's (sum dy, sum dy * (x - mean)), exchanged, summed in
  rank order, then dx on the device;
* norms: this rank's norm on the device, exchanged as a 64-byte header,
  combined in rank order; the clip coefficient goes back to the device.

Transport: the exchanged vectors are 24 C (forward) and 16 C (backward) bytes per
rank and step (a few KB
for real networks), so they are staged through host memory and sent with
plain mpi4py ``Allgather``; any MPI works, CUDA-aware or not, and several
ranks may share one GPU. Each exchange costs a device-to-host copy of those
bytes (a stream synchronization) besides the MPI latency. NCCL would avoid
the host round trip but not the rank-order combination, which is what makes
the results bitwise identical on every rank; it is not used.

Results: ``mean`` and ``invstd`` are float64 device arrays, bitwise identical
on every rank (they are computed on the host from the same gathered table);
``grad_norm`` / ``clip_grad_norm`` return the global norm as a 0-d float64
device array, like their single-GPU versions.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Tuple

import cupy
import numpy as np

from bncore import distributed as _host
from bncore._collective import CollectiveError, reset_traffic, traffic
from bncore._layout import channel_view
from bncore.distributed import combine_statistics
from bncore_gpu import _checks as chk
from bncore_gpu import batch_norm as _bn
from bncore_gpu import clipping as _clip

__all__ = ["sync_batch_norm_forward", "sync_batch_norm_backward", "SyncBatchNorm",
           "grad_norm", "clip_grad_norm", "combine_statistics", "traffic", "reset_traffic",
           "CollectiveError"]

_F64 = np.dtype(np.float64)


def _channel_sums(part_a, part_b, C: int, M: int):
    """Per-channel totals of partials laid out channel by channel (C, M)."""
    return part_a.reshape(C, M).sum(axis=1), part_b.reshape(C, M).sum(axis=1)


def _host64(v, C: int, absent: float) -> np.ndarray:
    """A per-channel device vector as host float64 (`absent` everywhere for None)."""
    return np.full(C, absent) if v is None else cupy.asnumpy(v).astype(_F64)


class DeviceEngine:
    """Local work of the collectives on CuPy arrays with bncore_gpu's kernels;
    exchanged and combined quantities are host float64 vectors."""

    chk = chk
    forward = staticmethod(_bn.batch_norm_forward)
    backward = staticmethod(_bn.batch_norm_backward)
    f64 = staticmethod(_bn._vec64)

    @staticmethod
    def host(a) -> np.ndarray:
        return cupy.asnumpy(a)

    @staticmethod
    def store(dst, values: np.ndarray) -> None:
        dst[...] = cupy.asarray(values.astype(dst.dtype))

    @staticmethod
    def stats(x, ax: int, nthreads: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's per-channel (K, d, M2) in float64 (zeros for an empty shard),
        from the pivoted sums of the statistics kernels: with K the channel's
        first element, d = sum(x - K) / n (the mean is K + d, not rounded here:
        see bncore.distributed.combine_statistics), M2 = sum (x - K)^2 - d sum(x - K)."""
        view = channel_view(x, ax)
        C = x.shape[ax]
        n = view.outer * view.inner
        if n == 0 or C == 0:
            return np.zeros(C), np.zeros(C), np.zeros(C)
        xf = view.flat(view.arrange(x, cupy))
        s1, s2, M = _bn._partial_sums("stats", xf, None, view.outer, C, view.inner)
        s1, s2 = _channel_sums(s1, s2, C, M)
        x3 = xf.reshape(view.outer, C, view.inner)
        K = x3[0, :, 0].astype(_F64)
        K = cupy.where(cupy.isfinite(K), K, 0.0)     # the kernels' pivot (bn_pivot)
        d = s1 / n
        m2 = s2 - s1 * d
        # a pivot far from its channel's mean (s2 > 16 M2): those channels'
        # sums again against K + d, as bn_finalize_train does in one process
        # (not where K + d is Inf or NaN: the data hold one)
        # (also where s2 overflowed: m2 = Inf - Inf is NaN, and !(s2 <= ...) holds)
        far = cupy.flatnonzero(~(s2 <= 16.0 * m2) & cupy.isfinite(K + d))
        if far.size:
            K[far] = K[far] + d[far]
            v = x3[:, far, :].astype(_F64) - K[far][None, :, None]
            t1, t2 = v.sum(axis=(0, 2)), (v * v).sum(axis=(0, 2))
            d[far], m2[far], s2[far] = t1 / n, t2 - t1 * (t1 / n), t2
        # squares past float64's range around a finite mean: M2 is Inf, not NaN
        m2 = cupy.where((m2 != m2) & (s2 == np.inf) & cupy.isfinite(K + d), np.inf, m2)
        m2 = cupy.maximum(m2, 0.0)               # rounding of an exactly constant channel
        return cupy.asnumpy(K), cupy.asnumpy(d), cupy.asnumpy(m2)

    @staticmethod
    def normalize(x, ax: int, mean: np.ndarray, invstd: np.ndarray, weight, bias, out,
                  nthreads: int):
        """(y, mean, invstd) with y = (x - mean) * (invstd * w) + b on the device;
        mean and invstd come back as float64 device arrays."""
        view = channel_view(x, ax)
        C = x.shape[ax]
        w, b = _host64(weight, C, 1.0), _host64(bias, C, 0.0)
        consts = cupy.asarray(np.stack([mean, invstd, invstd * w, b]))   # one upload
        d_mean, d_invstd, scale, shift = consts[0], consts[1], consts[2], consts[3]
        target = _bn._output_target(view, out, x.dtype)
        if x.size:
            _bn._elementwise("apply", (view.flat(view.arrange(x, cupy)),), view.flat(target),
                             view.outer, C, view.inner, (d_mean, scale, shift))
        return _bn._finish_output(target, out), d_mean, d_invstd

    @staticmethod
    def dy_sums(dy, x, ax: int, mean, nthreads: int) -> Tuple[np.ndarray, np.ndarray]:
        view = channel_view(x, ax)
        C = x.shape[ax]
        if x.size == 0 or C == 0:
            return np.zeros(C), np.zeros(C)
        a, b, M = _bn._partial_sums("dy", view.flat(view.arrange(dy, cupy)),
                                    view.flat(view.arrange(x, cupy)), view.outer, C,
                                    view.inner, mean)
        a, b = _channel_sums(a, b, C, M)
        return cupy.asnumpy(a), cupy.asnumpy(b)

    @staticmethod
    def input_grad(dy, x, ax: int, training: bool, N: float, mean, invstd, weight,
                   g_dy: np.ndarray, g_dyx: np.ndarray, out, nthreads: int):
        """dx = g ((dy - a) - (x - mean) k): g = w invstd, a = S/N, k = invstd^2 T/N
        (a = k = 0 in inference), the constants computed on the host in float64."""
        view = channel_view(x, ax)
        C = x.shape[ax]
        inv = cupy.asnumpy(invstd)
        w = _host64(weight, C, 1.0)
        if training:
            a, k = g_dy / N, inv * inv * g_dyx / N
        else:
            a, k = np.zeros(C), np.zeros(C)
        consts = cupy.asarray(np.stack([inv * w, a, k]))
        target = _bn._output_target(view, out, x.dtype)
        if x.size:
            _bn._elementwise("dx", (view.flat(view.arrange(dy, cupy)),
                                    view.flat(view.arrange(x, cupy))), view.flat(target),
                             view.outer, C, view.inner, (mean, consts[0], consts[1], consts[2]))
        return _bn._finish_output(target, out)

    @staticmethod
    def from_host(values: np.ndarray):
        return cupy.asarray(values)

    @staticmethod
    def norm_table(grads, write: bool):
        return _clip._table(grads, write)

    @staticmethod
    def local_norm(table, p: float, nthreads: int) -> Tuple[float, float, float]:
        """(s, scale, nonfinite) with this rank's norm = scale * s^(1/p) (s itself for
        p = inf), as bncore.distributed combines them; the norm comes from the
        device (float64, overflow-safe for float64 gradients)."""
        norm = float(_clip._norm(table, p, 0.0, 0.0)[0])
        if not math.isfinite(norm):
            return norm, 1.0, 1.0
        if math.isinf(p) or p == 1.0:
            return norm, 1.0, 0.0
        try:
            s = norm ** p
        except OverflowError:
            s = math.inf
        if math.isfinite(s) and (s >= sys.float_info.min or norm == 0.0):
            return s, 1.0, 0.0
        # norm^p overflows, underflows or is subnormal (a few significant bits
        # left): pass the norm as the scale
        return 1.0, norm, 0.0

    @staticmethod
    def scale(table, coef: float, nthreads: int) -> None:
        if table.nchunks:
            _clip.kernel(f"mt_scale<{_clip.CTYPES[table.pdtype]}>")(
                (table.nchunks,), (256,), (*table.args(), cupy.full((), coef, _F64)))

    @staticmethod
    def norm_result(total: float):
        return cupy.full((), total, _F64)


def sync_batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                            comm=None, training: bool = True, momentum: float = 0.1,
                            eps: float = 1e-5, axis: int = 1, unbiased_running_var: bool = True,
                            out=None, num_threads: Optional[int] = None):
    """bncore.distributed.sync_batch_norm_forward on CuPy arrays: ``(y, mean, invstd)``,
    mean and invstd float64 device arrays, bitwise identical on every rank."""
    return _host.sync_forward(DeviceEngine, x, weight, bias, running_mean, running_var, comm,
                              training, momentum, eps, axis, unbiased_running_var, out,
                              num_threads)


def sync_batch_norm_backward(dy, x, mean, invstd, weight=None, *, comm=None,
                             training: bool = True, axis: int = 1, weight_grads: str = "global",
                             out=None, num_threads: Optional[int] = None):
    """bncore.distributed.sync_batch_norm_backward on CuPy arrays: ``(dx, dweight, dbias)``."""
    return _host.sync_backward(DeviceEngine, dy, x, mean, invstd, weight, comm, training, axis,
                               weight_grads, out, num_threads)


def grad_norm(grads, norm_type: float = 2.0, *, comm=None, num_threads: Optional[int] = None):
    """bncore.distributed.grad_norm on CuPy arrays; the global norm as a 0-d device array."""
    return _host.grad_norm_on(DeviceEngine, grads, norm_type, comm, num_threads)


def clip_grad_norm(grads, max_norm: float, *, comm=None, norm_type: float = 2.0,
                   eps: float = 1e-6, error_if_nonfinite: bool = False,
                   num_threads: Optional[int] = None):
    """bncore.distributed.clip_grad_norm on CuPy arrays; returns the global norm before
    clipping as a 0-d device array."""
    return _host.clip_grad_norm_on(DeviceEngine, grads, max_norm, comm, norm_type, eps,
                                   error_if_nonfinite, num_threads)


class SyncBatchNorm(_host.SyncBatchNorm):
    __doc__ = _host.SyncBatchNorm.__doc__
    _xp = cupy
    _sync_forward = staticmethod(sync_batch_norm_forward)
    _sync_backward = staticmethod(sync_batch_norm_backward)
    _local_forward = staticmethod(_bn.batch_norm_forward)
    _local_backward = staticmethod(_bn.batch_norm_backward)

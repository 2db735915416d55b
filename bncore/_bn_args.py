"""Argument checking for batch_norm_forward / batch_norm_backward, shared by
the CPU (bncore) and GPU (bncore_gpu) packages.

`chk` is the package's checks module (bncore._checks or bncore_gpu._checks):
it knows how to turn an argument into an array of that package (NumPy or
CuPy) and how to test writability and overlap; everything else here is the
same rules on both. Every check runs before any array is touched.
"""
from __future__ import annotations

import math

from bncore._threads import resolve_num_threads

# An empty training batch is refused where PyTorch returns an empty y (and leaves
# the running statistics alone): the batch mean and invstd would be undefined
_EMPTY_NOTE = (": an empty batch; PyTorch returns an empty y there, with uninitialized "
               "statistics, and bncore refuses it")


def _reduced_count(shape, axis: int) -> int:
    n = 1
    for i, s in enumerate(shape):
        if i != axis:
            n *= s
    return n


def _check_out(chk, name: str, out, x):
    if out is None:
        return None
    out = chk.output_array(name, out)
    if out.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {out.dtype}, expected {x.dtype} (as x)")
    chk.same_shape(name, out, x.shape, "x")
    return out


def _axis(chk, axis, ndim: int) -> int:
    if type(axis) is int and -ndim <= axis < ndim:
        return axis % ndim
    return chk.normalize_axis(axis, ndim)


def _check_dx_out(chk, out, x, C: int):
    """Split `out` (None, dx, or a (dx, dweight, dbias) tuple) and check each."""
    if out is None:
        return None, None, None
    if isinstance(out, (tuple, list)):
        if len(out) != 3:
            raise ValueError("out must be dx or a (dx, dweight, dbias) tuple")
        dx, dw, db = out
    else:
        dx, dw, db = out, None, None
    dx = _check_out(chk, "out[0] (dx)", dx, x)
    dw = chk.channel_vector("out[1] (dweight)", dw, C, out=True)
    db = chk.channel_vector("out[2] (dbias)", db, C, out=True)
    return dx, dw, db


def forward_args(chk, x, weight, bias, running_mean, running_var, training, momentum, eps,
                 axis, out, num_threads, count_rule: bool = True):
    """Validated forward arguments:
    (x, weight, bias, running_mean, running_var, training, momentum, eps, axis, C, n, out,
    nthreads), n being the number of values per channel. ``count_rule=False``
    leaves out "training needs 2 values per channel", which the distributed
    functions apply to the whole batch over all ranks instead."""
    training = chk.flag("training", training)
    x = chk.float_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channel), got shape {x.shape}")
    ax = _axis(chk, axis, x.ndim)
    C = x.shape[ax]
    n = _reduced_count(x.shape, ax)
    if weight is not None:
        weight = chk.channel_vector("weight", weight, C)
    if bias is not None:
        bias = chk.channel_vector("bias", bias, C)
    if running_mean is not None or running_var is not None:
        if running_mean is None or running_var is None:
            raise ValueError("pass both running_mean and running_var, or neither")
        # written in training mode only: inference may read read-only arrays
        running_mean = chk.channel_vector("running_mean", running_mean, C, out=bool(training))
        running_var = chk.channel_vector("running_var", running_var, C, out=bool(training))
    if type(eps) is not float or not 0.0 < eps < math.inf:
        eps = chk.positive("eps", eps)
    if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
        momentum = chk.in_unit_interval("momentum", momentum)
    nthreads = resolve_num_threads(num_threads)
    training = bool(training)
    if training:
        if count_rule and n < 2:
            raise ValueError(
                f"training-mode batch norm needs more than 1 value per channel, got {n} "
                f"(x of shape {x.shape}, channel axis {ax}){_EMPTY_NOTE if n == 0 else ''}")
    elif running_mean is None:
        raise ValueError("inference mode (training=False) needs running_mean and running_var")
    out = _check_out(chk, "out", out, x)
    if training and running_mean is not None:
        chk.no_overlap_among(
            [("out", out), ("running_mean", running_mean), ("running_var", running_var)],
            [("x", x), ("weight", weight), ("bias", bias)])
    elif out is not None:
        # inference writes only out: the running statistics are inputs then
        chk.no_overlap_among(
            [("out", out)],
            [("x", x), ("weight", weight), ("bias", bias), ("running_mean", running_mean),
             ("running_var", running_var)])

    return (x, weight, bias, running_mean, running_var, training, momentum, eps, ax, C, n, out,
            nthreads)


def backward_args(chk, dy, x, mean, invstd, weight, training, axis, out, num_threads,
                  count_rule: bool = True):
    """Validated backward arguments:
    (dy, x, mean, invstd, weight, training, axis, C, n, dx_out, dweight_out, dbias_out,
    nthreads); ``count_rule`` as in forward_args."""
    training = chk.flag("training", training)
    x = chk.float_array("x", x)
    dy = chk.float_array("dy", dy)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 dimensions (batch and channel), got shape {x.shape}")
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype}, expected {x.dtype} (as x)")
    if dy.shape != x.shape:
        chk.same_shape("dy", dy, x.shape, "x")
    ax = _axis(chk, axis, x.ndim)
    C = x.shape[ax]
    n = _reduced_count(x.shape, ax)
    if mean is None or invstd is None:
        raise TypeError("mean and invstd are required (the statistics batch_norm_forward returned)")
    mean = chk.channel_vector("mean", mean, C)
    invstd = chk.channel_vector("invstd", invstd, C)
    if weight is not None:
        weight = chk.channel_vector("weight", weight, C)
    nthreads = resolve_num_threads(num_threads)
    training = bool(training)
    if count_rule and training and n < 2:
        raise ValueError(
            f"training-mode batch norm needs more than 1 value per channel, got {n}"
            f"{_EMPTY_NOTE if n == 0 else ''}")
    dx_out, dw_out, db_out = _check_dx_out(chk, out, x, C)
    if out is not None:
        chk.no_overlap_among(
            [("out[0] (dx)", dx_out), ("out[1] (dweight)", dw_out), ("out[2] (dbias)", db_out)],
            [("x", x), ("dy", dy), ("mean", mean), ("invstd", invstd), ("weight", weight)])

    return (dy, x, mean, invstd, weight, training, ax, C, n, dx_out, dw_out, db_out, nthreads)

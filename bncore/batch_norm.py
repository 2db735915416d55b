"""Batch normalization on the CPU: forward (training and inference) and backward.

Formulas (per channel c, over the N = outer * inner values of that channel)::

    mean    = sum(x) / N
    var     = sum((x - mean)^2) / N                      (biased: used to normalize)
    invstd  = 1 / sqrt(var + eps)
    y       = (x - mean) * invstd * weight + bias
    running = (1 - momentum) * running + momentum * stat  (var unbiased: * N/(N-1))

    dbias   = sum(dy)
    dweight = sum(dy * (x - mean)) * invstd
    dx      = weight * invstd * (dy - dbias/N - (x - mean) * invstd^2 * sum(dy*(x - mean))/N)
                                                          (training: mean, invstd from the batch)
    dx      = weight * invstd * dy                        (inference: running statistics)

Conventions are PyTorch's (``torch.nn.functional.batch_norm``); ``momentum``
is the *rate* of the running average (Keras and flax call 0.99 the decay that
is a rate of 0.01; :class:`bncore.BatchNorm` converts).

Numerics: every statistic accumulates in float64, ``x - mean`` is formed in
float64 before it is scaled, and summation orders are fixed by the shape, so
results are bitwise identical for every ``num_threads``. float16 data is read
and written by the kernels themselves (bncore/_half.h): exact to float64, and
each result rounded once, from float64 to float16.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np

from bncore import _bn_kernels as _k
from bncore import _checks as chk
from bncore._bn_args import backward_args, forward_args
from bncore._layout import channel_view
from bncore._threads import fast_num_threads

__all__ = ["batch_norm_forward", "batch_norm_backward"]

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _vec(v: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """A per-channel vector as the kernels take it: C-contiguous float32 or float64."""
    if v is None or ((v.dtype == _F32 or v.dtype == _F64) and v.flags.c_contiguous
                     and v.flags.aligned):
        return v
    return np.ascontiguousarray(v, dtype=_F64)


def _f64(v: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """A C-contiguous float64 copy (or v itself when it already is one)."""
    if v is None or (v.dtype == _F64 and v.flags.c_contiguous and v.flags.aligned):
        return v
    return np.ascontiguousarray(v, dtype=_F64)


def _flat(view, a: np.ndarray) -> np.ndarray:
    """1-D C-contiguous view of `a` in the view's layout (the kernels' input)."""
    f = view.flat(a)
    assert f.flags.c_contiguous
    return f


def _output_target(view, out: Optional[np.ndarray], dtype, near=()) -> np.ndarray:
    """Where the kernel writes: `out` itself when it has the layout and x's
    dtype, else a new array (placed away from the inputs in `near`: see
    _layout.placed_empty) that the caller copies into `out`."""
    if out is not None and out.dtype == dtype and view.has_layout(out):
        return out
    return view.empty(dtype, near=near)


def _finish_output(target: np.ndarray, out: Optional[np.ndarray]) -> np.ndarray:
    if out is None:
        return target
    if target is not out:
        np.copyto(out, target, casting="same_kind")
    return out


def batch_norm_forward(
    x,
    weight=None,
    bias=None,
    running_mean=None,
    running_var=None,
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    unbiased_running_var: bool = True,
    out: Optional[np.ndarray] = None,
    num_threads: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch-normalize `x` over every axis but `axis`.

    Parameters
    ----------
    x : array, ndim >= 2, float16/float32/float64
        Any layout; `axis` is the channel axis (1 for NC, NCL, NCHW, NCDHW;
        -1 for channels-last). Non-contiguous inputs are accepted (copied
        once unless they are a permutation of a contiguous array). Objects
        with ``__dlpack__`` (torch CPU tensors, JAX CPU arrays) are viewed
        zero-copy.
    weight, bias : (C,) arrays or None (1 and 0); any floating dtype.
    running_mean, running_var : (C,) arrays or None
        Training: updated in place as ``r = (1 - momentum) * r + momentum * stat``
        with the variance unbiased (N/(N-1)) unless ``unbiased_running_var=False``.
        Inference: used to normalize; both required.
    training : normalize with the batch statistics (True) or the running ones.
    momentum : rate of the running average, in [0, 1].
    eps : added to the variance, > 0.
    out : optional array like `x` (same shape and dtype) to write y into;
        written in place (no temporary) when it has x's memory layout.
    num_threads : OpenMP threads (None: bncore.get_num_threads()); never
        changes the result (inputs under 32768 elements run on one thread).

    Returns
    -------
    y : array like x (same dtype; same memory layout where x's is a permutation of a
        contiguous one, e.g. channels-last; C-contiguous for a sliced or reversed x)
    mean, invstd : (C,) float64
        The statistics used: batch mean and 1/sqrt(biased var + eps) in
        training, running ones in inference. Pass them to
        :func:`batch_norm_backward`.
    """
    nt = fast_num_threads(num_threads)
    if nt:
        fast = _k.forward_fast(x, weight, bias, running_mean, running_var, training, momentum,
                               eps, axis, unbiased_running_var, out, nt)
        if fast is not None:
            return fast
    given = (running_mean, running_var, out)    # the caller's objects (torch tensors?)
    (x, weight, bias, running_mean, running_var, training, momentum, eps, ax, C, n, out,
     nthreads) = forward_args(chk, x, weight, bias, running_mean, running_var, training,
                              momentum, eps, axis, out, num_threads)
    unbiased_running_var = chk.flag("unbiased_running_var", unbiased_running_var)

    # ---- all checks done: from here on arrays are written
    view = channel_view(x, ax)
    xk = view.arrange(x)
    target = _output_target(view, out, x.dtype, (xk,))
    # running statistics are updated by the kernel in place; a float16 or
    # strided one goes through a float64 copy that is written back
    rm, rv = _vec(running_mean), _vec(running_var)
    mean, invstd, _ = _k.forward(
        _flat(view, xk), _flat(view, target), view.outer, C, view.inner, training, rm, rv,
        _vec(weight), _vec(bias), eps, momentum, bool(unbiased_running_var), nthreads)
    # narrowed as the kernel narrows float32 / float64 statistics: an overflow
    # is Inf, with no warning and no FloatingPointError under np.errstate (one
    # would come after y and the other statistic had been written)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if training and rm is not running_mean:
            running_mean[...] = rm
        if training and rv is not running_var:
            running_var[...] = rv
    y = _finish_output(target, out)
    chk.bump_versions(*(given if training else given[2:]))
    return y, mean, invstd


def batch_norm_backward(
    dy,
    x,
    mean,
    invstd,
    weight=None,
    *,
    training: bool = True,
    axis: int = 1,
    out: Union[None, np.ndarray, Tuple[Optional[np.ndarray], ...]] = None,
    num_threads: Optional[int] = None,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of :func:`batch_norm_forward` with respect to x, weight and bias.

    `mean` and `invstd` are the (C,) statistics the forward pass returned.
    ``training=True`` differentiates through the batch statistics,
    ``training=False`` treats them as constants (inference / frozen BN).

    Returns ``(dx, dweight, dbias)``: dx like x; dweight and dbias of shape
    (C,) in weight's dtype (x's dtype when weight is None), always returned.
    ``out`` may be dx alone or a ``(dx, dweight, dbias)`` tuple (any None).
    """
    nt = fast_num_threads(num_threads)
    if nt:
        fast = _k.backward_fast(dy, x, mean, invstd, weight, training, axis, out, nt)
        if fast is not None:
            dx, sum_dy, sum_dy_xmu, dweight, dbias = fast
            if dweight is None:
                dweight, dbias = _parameter_grads(sum_dy, sum_dy_xmu, invstd,
                                                  (weight if weight is not None else x).dtype)
            return dx, dweight, dbias
    given = out                                  # the caller's objects (torch tensors?)
    (dy, x, mean, invstd, weight, training, ax, C, n, dx_out, dw_out, db_out,
     nthreads) = backward_args(chk, dy, x, mean, invstd, weight, training, axis, out,
                               num_threads)

    # ---- all checks done
    view = channel_view(x, ax)
    xk = view.arrange(x)
    dyk = view.arrange(dy)
    target = _output_target(view, dx_out, x.dtype, (xk, dyk))
    sum_dy, sum_dy_xmu = _k.backward(
        _flat(view, dyk), _flat(view, xk), _flat(view, target), view.outer, C, view.inner,
        training, _f64(mean), _f64(invstd), _vec(weight), nthreads)
    dx = _finish_output(target, dx_out)

    dweight, dbias = _parameter_grads(sum_dy, sum_dy_xmu, _f64(invstd),
                                      (weight if weight is not None else x).dtype,
                                      dw_out, db_out)
    chk.bump_versions(given)
    return dx, dweight, dbias


def _parameter_grads(sum_dy: np.ndarray, sum_dy_xmu: np.ndarray, invstd: np.ndarray,
                     dtype, dw_out=None, db_out=None) -> Tuple[np.ndarray, np.ndarray]:
    """dweight = sum(dy (x - mean)) * invstd and dbias = sum(dy), formed in float64
    and rounded once to `dtype`, or written into the given outputs; NumPy
    reports overflow and underflow as np.errstate says (the fast path hands it
    the cases where that can happen)."""
    grads = []
    for v, o in ((sum_dy_xmu * invstd, dw_out), (sum_dy, db_out)):
        if o is None:
            grads.append(v.astype(dtype, copy=False))
        else:
            o[...] = v
            grads.append(o)
    return grads[0], grads[1]

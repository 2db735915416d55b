"""The usual batch-norm call's arguments, checked in a few attribute reads.

``bncore._bn_args.forward_args`` / ``backward_args`` check every argument
through the generic array rules, a few Python calls per array and per pair of
arrays: on the GPU that host time is longer than the kernel on small shapes
(scripts/gpu_host_profile.py). Here the common case is recognised positively
and answered with exactly the tuple those functions return for it:

- CuPy arrays (not subclasses, not foreign objects) of float16/32/64, starting
  on and stepping by whole elements;
- per-channel vectors that are 1-D, contiguous, of shape (C,);
- running statistics that training writes in CuPy allocations of their own,
  apart from x, weight, bias and each other (so no bounds test is needed:
  ``_checks.own_allocation``);
- training and unbiased flags that are Python bools, momentum and eps Python
  floats in range, no ``out=``, no ``num_threads=``.

Anything else returns None and goes through the general functions, so every
error message and every unusual argument (torch tensors, views of one buffer,
integer flags, NumPy scalars) is theirs.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import cupy
import numpy as np

from bncore._bn_args import _reduced_count
from bncore._threads import resolve_num_threads
from bncore_gpu._checks import own_allocation

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NDARRAY = cupy.ndarray


def _plain(a: Any) -> bool:
    """a is a CuPy array of a float dtype whose address and strides are whole
    elements (stricter than _checks._aligned: every stride, extent 1 too)."""
    if type(a) is not _NDARRAY or a.dtype not in _FLOATS:
        return False
    size = a.itemsize
    return not (a.data.ptr % size or any(map(size.__rmod__, a.strides)))


def _vector(v: Any, C: int) -> bool:
    """v is a contiguous 1-D CuPy float array of C aligned elements."""
    return (type(v) is _NDARRAY and v.dtype in _FLOATS and v.shape == (C,)
            and v.strides[0] == v.itemsize and not v.data.ptr % v.itemsize)


def _channel_axis(x: Any, axis: Any) -> Optional[Tuple[int, int, int]]:
    """(axis, channels, values per channel) for an int axis of x (x.ndim >= 2)."""
    ndim = x.ndim
    if ndim < 2 or type(axis) is not int or not -ndim <= axis < ndim:
        return None
    ax = axis % ndim
    return ax, x.shape[ax], _reduced_count(x.shape, ax)


def forward_args(x, weight, bias, running_mean, running_var, training, momentum, eps, axis,
                 out, num_threads) -> Optional[Tuple]:
    """bncore._bn_args.forward_args(chk, ...)'s result for the usual call, else None."""
    if (out is not None or num_threads is not None or type(training) is not bool
            or type(momentum) is not float or type(eps) is not float
            or not (0.0 <= momentum <= 1.0 and 0.0 < eps < math.inf) or not _plain(x)):
        return None
    where = _channel_axis(x, axis)
    if where is None:
        return None
    ax, C, n = where
    if (weight is not None and not _vector(weight, C)) or (
            bias is not None and not _vector(bias, C)):
        return None
    if running_mean is None and running_var is None:
        if not training:
            return None                   # inference needs them: the general error
    elif not (_vector(running_mean, C) and _vector(running_var, C)):
        return None
    if training:
        if n < 2:
            return None
        if running_mean is not None:
            rm, rv = own_allocation(running_mean), own_allocation(running_var)
            if rm is None or rv is None or rm is rv:
                return None
            for a in (x, weight, bias):
                if a is not None:
                    m = own_allocation(a)
                    if m is None or m is rm or m is rv:
                        return None
    return (x, weight, bias, running_mean, running_var, training, momentum, eps, ax, C, n,
            None, resolve_num_threads(None))


def backward_args(dy, x, mean, invstd, weight, training, axis, out,
                  num_threads) -> Optional[Tuple]:
    """bncore._bn_args.backward_args(chk, ...)'s result for the usual call, else None."""
    if (out is not None or num_threads is not None or type(training) is not bool
            or not _plain(x) or not _plain(dy) or dy.dtype != x.dtype or dy.shape != x.shape):
        return None
    where = _channel_axis(x, axis)
    if where is None:
        return None
    ax, C, n = where
    if mean is None or invstd is None or not (_vector(mean, C) and _vector(invstd, C)):
        return None
    if weight is not None and not _vector(weight, C):
        return None
    if training and n < 2:
        return None
    return (dy, x, mean, invstd, weight, training, ax, C, n, None, None, None,
            resolve_num_threads(None))

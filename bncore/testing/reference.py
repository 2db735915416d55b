"""Float64 NumPy oracle, written straight from the formulas.

Nothing here calls bncore's kernels: these functions are the independent
reference the kernels are tested against. They favour clarity over speed:
every input is first converted to float64 (exact for float16/32), statistics
use two passes in extended precision (np.longdouble, 64-bit significand on
x86) so the oracle's own rounding stays below the kernels', and each formula
reads as in the docstrings of bncore.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _bcast(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def _reduce_axes(ndim: int, axis: int) -> Tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, axis=1,
                       unbiased_running_var=True):
    """Returns y, mean, invstd, new_running_mean, new_running_var (all float64)."""
    x = _f64(x)
    axis = axis % x.ndim
    red = _reduce_axes(x.ndim, axis)
    C = x.shape[axis]
    n = x.size // C if C else 0
    w = np.ones(C) if weight is None else _f64(weight)
    b = np.zeros(C) if bias is None else _f64(bias)
    new_rm = _f64(running_mean)
    new_rv = _f64(running_var)
    xl = x.astype(np.longdouble)
    if training:
        mean_l = xl.mean(axis=red)
        centered = xl - _bcast(mean_l, x.ndim, axis)
        var_l = (centered * centered).mean(axis=red)      # biased, two-pass
        mean = mean_l.astype(np.float64)
        var = var_l.astype(np.float64)
        if running_mean is not None:
            var_run = var * n / (n - 1) if unbiased_running_var else var
            new_rm = (1 - momentum) * new_rm + momentum * mean
            new_rv = (1 - momentum) * new_rv + momentum * var_run
    else:
        mean = _f64(running_mean)
        var = _f64(running_var)
        mean_l = mean.astype(np.longdouble)
        var_l = var.astype(np.longdouble)
        centered = xl - _bcast(mean_l, x.ndim, axis)
    invstd_l = 1 / np.sqrt(var_l + eps)
    y = (centered * _bcast(invstd_l * w, x.ndim, axis) + _bcast(b, x.ndim, axis)).astype(np.float64)
    return y, mean, invstd_l.astype(np.float64), new_rm, new_rv


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, axis=1):
    """Returns dx, dweight, dbias (float64) for y = (x - mean) * invstd * w + b.

    training: mean and invstd are functions of x (batch statistics), so
        dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), xhat = (x - mean) * invstd;
    inference: they are constants, so dx = w * invstd * dy.
    """
    dy = _f64(dy)
    x = _f64(x)
    axis = axis % x.ndim
    red = _reduce_axes(x.ndim, axis)
    C = x.shape[axis]
    mean = _f64(mean)
    invstd = _f64(invstd)
    w = np.ones(C) if weight is None else _f64(weight)
    xhat = (x - _bcast(mean, x.ndim, axis)) * _bcast(invstd, x.ndim, axis)
    dbias = dy.sum(axis=red)
    dweight = (dy * xhat).sum(axis=red)
    if training:
        m_dy = dy.mean(axis=red)
        m_dy_xhat = (dy * xhat).mean(axis=red)
        dx = _bcast(w * invstd, x.ndim, axis) * (
            dy - _bcast(m_dy, x.ndim, axis) - xhat * _bcast(m_dy_xhat, x.ndim, axis))
    else:
        dx = dy * _bcast(w * invstd, x.ndim, axis)
    return dx, dweight, dbias


def normwise_relative_error(actual, expected, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor), in float64; inf on NaN mismatch."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {e.shape}")
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if not np.array_equal(nan_a, nan_e):
        return float("inf")
    ok = ~nan_e
    inf_e = np.isinf(e) & ok
    if not np.array_equal(a[inf_e], e[inf_e]):
        return float("inf")
    ok &= ~inf_e
    diff = np.linalg.norm((a - e)[ok])
    scale = max(float(np.linalg.norm(e[ok])), floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / scale)

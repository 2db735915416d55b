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
    # inf-inf at the matched infinities is masked out below; subtract only the rest
    diff = np.linalg.norm(a[ok] - e[ok])
    scale = max(float(np.linalg.norm(e[ok])), floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(diff / scale)


# --------------------------------------------------------------------------
# Optimizers, written from each framework's published formulas, per tensor,
# in float64 (state is returned as new arrays; nothing is updated in place).

def _pre(p, g, inv_scale=1.0, maximize=False):
    g = _f64(g) * inv_scale
    return _f64(p), (-g if maximize else g)


def sgd(p, g, buf, *, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
        maximize=False, first_step=False, style="torch", decoupled_weight_decay=False,
        inv_scale=1.0):
    """Returns (new_p, new_buf). Formulas: see bncore.sgd_step."""
    p, g = _pre(p, g, inv_scale, maximize)
    if decoupled_weight_decay:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    if momentum == 0.0 and style != "onnx":
        return p - lr * g, buf
    # (ONNX Momentum keeps its formula at alpha = 0: V = beta' G; V kept where given)
    b = None if buf is None else _f64(buf)
    if style == "keras":
        v = (np.zeros_like(g) if first_step else b) * momentum + lr * g
        step = momentum * v + lr * g if nesterov else v
        return p - step, v
    if style == "onnx":
        beta = 1.0 if first_step else 1.0 - dampening
        v = (0.0 if b is None else momentum * b) + beta * g
    else:
        v = g.copy() if first_step else momentum * b + (1.0 - dampening) * g
    d = g + momentum * v if nesterov else v
    return p - lr * d, (v if buf is not None else None)


def adam(p, g, m, v, vmax, *, step, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
         weight_decay=0.0, decoupled_weight_decay=False, amsgrad=False, maximize=False,
         eps_style="torch", eps_root=0.0, bias_correction_step=None, weight_decay_post=0.0,
         inv_scale=1.0):
    """Returns (new_p, new_m, new_v, new_vmax). Formulas: see bncore.adam_step."""
    p, g = _pre(p, g, inv_scale, maximize)
    t = step if bias_correction_step is None else bias_correction_step
    if decoupled_weight_decay:
        p_dec = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
        p_dec = p
    m = beta1 * _f64(m) + (1.0 - beta1) * g
    v = beta2 * _f64(v) + (1.0 - beta2) * g * g
    bc1 = 1.0 - beta1 ** t if t > 0 else 1.0
    bc2 = 1.0 - beta2 ** t if t > 0 else 1.0
    new_vmax = None if vmax is None else _f64(vmax)
    if eps_style == "hat":
        vv = v
        if amsgrad:
            new_vmax = np.maximum(new_vmax, v)
            vv = new_vmax
        alpha = lr * np.sqrt(bc2) / bc1
        upd = alpha * m / (np.sqrt(vv) + eps)
    else:
        v_hat = v / bc2
        if amsgrad and eps_style == "optax":
            new_vmax = np.maximum(new_vmax, v_hat)
            v_hat = new_vmax
        elif amsgrad:
            new_vmax = np.maximum(new_vmax, v)
            v_hat = new_vmax / bc2
        upd = (lr / bc1) * m / (np.sqrt(v_hat + eps_root) + eps)
    return (p_dec - upd) * (1.0 - weight_decay_post), m, v, new_vmax


def rmsprop(p, g, sq, ga, buf, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
            momentum=0.0, centered=False, maximize=False, eps_inside_sqrt=False,
            style="torch", decoupled_weight_decay=False, inv_scale=1.0):
    """Returns (new_p, new_sq, new_ga, new_buf). Formulas: see bncore.rmsprop_step."""
    p, g = _pre(p, g, inv_scale, maximize)
    if decoupled_weight_decay:
        p_dec = p * (1.0 - lr * weight_decay)
    else:
        g = g + weight_decay * p
        p_dec = p
    sq = alpha * _f64(sq) + (1.0 - alpha) * g * g
    d = sq
    new_ga = None if ga is None else _f64(ga)
    if centered:
        new_ga = alpha * new_ga + (1.0 - alpha) * g
        d = sq - new_ga * new_ga
        d = np.where(d < 0, 0.0, d)     # rounding only: exactly, sq >= ga^2
    den = np.sqrt(d + eps) if eps_inside_sqrt else np.sqrt(d) + eps
    u = g / den
    if momentum == 0.0:
        return p_dec - lr * u, sq, new_ga, buf
    if style == "keras":
        b = momentum * _f64(buf) + lr * u
        return p_dec - b, sq, new_ga, b
    b = momentum * _f64(buf) + u
    return p_dec - lr * b, sq, new_ga, b


def adagrad(p, g, h, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
            maximize=False, eps_inside_sqrt=False, decoupled_weight_decay=False, inv_scale=1.0):
    """Returns (new_p, new_h). Formulas: see bncore.adagrad_step."""
    p, g = _pre(p, g, inv_scale, maximize)
    clr = lr / (1.0 + (step - 1) * lr_decay)
    if decoupled_weight_decay:
        p_dec = p * (1.0 - clr * weight_decay)
    else:
        g = g + weight_decay * p
        p_dec = p
    h = _f64(h) + g * g
    den = np.sqrt(h + eps) if eps_inside_sqrt else np.sqrt(h) + eps
    return p_dec - clr * g / den, h


def global_norm(grads, norm_type=2.0):
    """(sum |g|^p)^(1/p) over every element of every gradient (max |g| for inf), in float64."""
    flat = np.concatenate([_f64(g).reshape(-1) for g in grads]) if grads else np.zeros(0)
    if np.isinf(norm_type):
        return float(np.max(np.abs(flat))) if flat.size else 0.0
    if norm_type == 2.0:
        return float(np.sqrt(np.sum(flat.astype(np.longdouble) ** 2)))
    return float(np.sum(np.abs(flat.astype(np.longdouble)) ** norm_type) ** (1.0 / norm_type))


def clip_by_norm(grads, max_norm, norm_type=2.0, eps=1e-6):
    """Returns (clipped grads, total): g * max_norm / (total + eps) when that is < 1."""
    total = global_norm(grads, norm_type)
    coef = max_norm / (total + eps) if total + eps > 0 else np.inf
    if coef < 1.0:
        # a non-finite total gives coef 0 and inf * 0 = NaN, as torch does: expected
        with np.errstate(invalid="ignore"):
            return [_f64(g) * coef for g in grads], total
    return [_f64(g) for g in grads], total

"""Optimizer updates on lists of arrays, in place, in one parallel pass.

Every function takes ``params``, ``grads`` and the optimizer's state as lists
of arrays (a single array is allowed for each), validates all of them before
touching any, then updates every tensor in one OpenMP-parallel pass (the
multi-tensor kernels in ``bncore/_optim_kernels.pyx``). Arithmetic is float64
with one rounding per stored value. Defaults and formulas are PyTorch's
(``torch.optim``); the flags reach the other frameworks' forms, each
documented with its source. In every formula ``g`` is the gradient after
``grad_scale`` (divided out) and ``maximize`` (negated).

AMP (as PyTorch's fused Adam): ``grad_scale`` divides the gradients inside
the kernel, and a true ``found_inf`` makes the call change nothing at all.
Both may be Python numbers, NumPy scalars or 0-d arrays (also through DLPack).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, KeysView, ValuesView
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from bncore import _checks as chk
from bncore import _optim_kernels as _k
from bncore._threads import resolve_num_threads

__all__ = ["sgd_step", "adam_step", "rmsprop_step", "adagrad_step"]

ArrayList = Union[np.ndarray, Sequence[np.ndarray]]

_SGD_STYLES = {"torch": 0, "keras": 1, "onnx": 2}
_RMSPROP_STYLES = {"torch": 0, "keras": 1}
_EPS_STYLES = ("torch", "hat", "optax")


# what a list of arrays may also come as: ((p.grad for p in model.parameters()),
# as torch's clip_grad_norm_ takes), read once
_READ_ONCE = (Iterator, KeysView, ValuesView)


def read_once(v: Any) -> Any:
    """A generator, iterator or dict view as a list (functions that look at
    their gradients more than once: the second look found it exhausted);
    anything else as it is, refused or not by as_list later."""
    return list(v) if isinstance(v, _READ_ONCE) else v


def as_list(name: str, v: Optional[ArrayList], *, required: bool = False) -> Optional[list]:
    """A list of arrays from a list, a tuple or a single array (None stays None,
    unless the list is `required`: params, grads and the state every step reads)."""
    if v is None:
        if required:
            raise TypeError(f"{name} must be an array or a list of arrays, got None")
        return None
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, np.ndarray) or hasattr(v, "__dlpack__"):
        return [v]
    if isinstance(v, _READ_ONCE):
        return list(v)
    raise TypeError(f"{name} must be an array or a list of arrays, got {type(v).__name__}")


def scalar_value(name: str, v: Any) -> float:
    """A Python float from a number, a NumPy scalar or a 0-d / size-1 array."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return chk.to_float(v)
    if v is None or isinstance(v, (str, bytes)):
        raise TypeError(f"{name} must be a number or a one-element array, "
                        f"got {type(v).__name__}")
    arr = chk.as_array(name, v)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a number or a one-element array, "
                        f"got an array of dtype {arr.dtype}")
    if arr.size != 1:
        raise ValueError(f"{name} must be a scalar or a one-element array, got shape {arr.shape}")
    return float(arr.reshape(()))


def amp_args(grad_scale, found_inf):
    """(skip, inv_scale) from the AMP arguments."""
    skip = found_inf is not None and found_inf_flag(found_inf)
    inv = 1.0 if grad_scale is None else 1.0 / grad_scale_value(grad_scale)
    return skip, inv


def found_inf_flag(found_inf) -> bool:
    """A host found_inf as a flag: 0 or False steps, anything else skips; NaN is refused."""
    f = scalar_value("found_inf", found_inf)
    if math.isnan(f):
        raise ValueError("found_inf must be a flag (0 or False: step; anything else: skip), "
                         "got nan")
    return f != 0.0


def grad_scale_value(grad_scale) -> float:
    """A host loss scale: a finite number > 0 (a bool is refused)."""
    dtype = getattr(grad_scale, "dtype", None)
    if isinstance(grad_scale, (bool, np.bool_)) or dtype == bool or str(dtype) == "torch.bool":
        raise TypeError("grad_scale must be a number (the loss scale), got a bool")
    s = scalar_value("grad_scale", grad_scale)
    if not (math.isfinite(s) and s > 0.0):
        raise ValueError(f"grad_scale must be a finite number > 0 (the loss scale), got {s}")
    return s


def _lr(lr) -> float:
    f = chk.real_scalar("lr", lr)
    if not (f >= 0.0 and math.isfinite(f)):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    return f


def _beta(name: str, v) -> float:
    return chk.in_unit_interval(name, v, closed_right=False)


def _step(name: str, step, minimum: int) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        if isinstance(step, (np.ndarray,)) or hasattr(step, "__dlpack__"):
            step = scalar_value(name, step)
        elif isinstance(step, bool) or not isinstance(step, numbers.Real):
            raise TypeError(f"{name} must be an int, got {type(step).__name__}")
        # an integral float (2.0, np.float64(2)) counts, as a 0-d array's value does
        if not math.isfinite(step) or step != int(step):
            raise ValueError(f"{name} must be an integer, got {step}")
        step = int(step)
    step = int(step)
    if not minimum <= step <= chk.COUNT_MAX:
        raise ValueError(f"{name} must be >= {minimum} (and below 2**63), got {step}")
    return step


def _style(name: str, value, allowed) -> Any:
    if not isinstance(value, str):
        # (an array here made `in` raise NumPy's "truth value ... ambiguous")
        raise TypeError(f"{name} must be one of {', '.join(map(repr, allowed))}; got "
                        f"{type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
    return value


# Hyper-parameter rules of each step function, shared with bncore_gpu.optimizers.

def on_off(**flags: Any) -> Tuple[bool, ...]:
    """The step function's on/off arguments, in the order given, each checked by
    bncore._checks.flag: a string or None is a TypeError naming it, not a truth
    value (``nesterov="False"`` switched Nesterov on)."""
    return tuple(chk.flag(name, v) for name, v in flags.items())


def sgd_hyper(lr, momentum, dampening, nesterov, weight_decay, style, bufs):
    """Validated (lr, momentum, dampening, weight_decay, style code) of sgd_step."""
    lr = _lr(lr)
    momentum = chk.in_unit_interval("momentum", momentum)    # DESIGN.md; as Keras
    dampening = chk.in_unit_interval("dampening", dampening)
    weight_decay = chk.non_negative("weight_decay", weight_decay)
    s = _SGD_STYLES[_style("style", style, tuple(_SGD_STYLES))]
    if nesterov and s == 0 and (momentum == 0.0 or dampening != 0.0):
        raise ValueError("nesterov requires momentum > 0 and dampening = 0 in the torch style "
                         "(as torch.optim.SGD)")
    if dampening != 0.0 and s == 1:
        raise ValueError("dampening is torch's; the keras style has none (it would be ignored)")
    if momentum != 0.0 and bufs is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    return lr, momentum, dampening, weight_decay, s


def sgd_uses_buffers(momentum: float, style_code: int, bufs) -> bool:
    """Whether sgd_step reads and writes momentum_buffers: with momentum, and in
    the ONNX style whenever they are given (ONNX's Momentum writes V = beta g
    at alpha = 0 too)."""
    return momentum != 0.0 or (style_code == _SGD_STYLES["onnx"] and bufs is not None)


def adam_hyper(lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post, eps_style,
               amsgrad, vmax):
    """Validated (lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post) of adam_step."""
    lr = _lr(lr)
    beta1 = _beta("beta1", beta1)
    beta2 = _beta("beta2", beta2)
    eps = chk.non_negative("eps", eps)
    eps_root = chk.non_negative("eps_root", eps_root)
    if eps == 0.0 and eps_root == 0.0:
        raise ValueError("eps must be > 0 (or eps_root > 0): with both 0 a zero gradient "
                         "makes the update 0 / 0")
    weight_decay = chk.non_negative("weight_decay", weight_decay)
    weight_decay_post = chk.in_unit_interval("weight_decay_post", weight_decay_post)
    _style("eps_style", eps_style, _EPS_STYLES)
    if amsgrad and vmax is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    if eps_style == "hat" and eps_root != 0.0:
        raise ValueError("eps_root is optax's and applies to eps_style 'torch' or 'optax', not 'hat'")
    return lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post


def rmsprop_hyper(lr, alpha, eps, weight_decay, momentum, style, centered, ga, mb):
    """Validated (lr, alpha, eps, weight_decay, momentum, style code) of rmsprop_step."""
    lr = _lr(lr)
    alpha = chk.in_unit_interval("alpha", alpha)
    eps = chk.positive("eps", eps)      # 0 would make a zero gradient's update 0 / 0
    weight_decay = chk.non_negative("weight_decay", weight_decay)
    momentum = chk.in_unit_interval("momentum", momentum)    # DESIGN.md; as Keras
    s = _RMSPROP_STYLES[_style("style", style, tuple(_RMSPROP_STYLES))]
    if centered and ga is None:
        raise ValueError("centered=True needs grad_avgs")
    if momentum != 0.0 and mb is None:
        raise ValueError("momentum > 0 needs momentum_buffers")
    return lr, alpha, eps, weight_decay, momentum, s


def adagrad_hyper(lr, lr_decay, weight_decay, eps):
    """Validated (lr, lr_decay, weight_decay, eps) of adagrad_step."""
    return (_lr(lr), chk.non_negative("lr_decay", lr_decay),
            chk.non_negative("weight_decay", weight_decay), chk.positive("eps", eps))


def sgd_step(params: ArrayList, grads: ArrayList, momentum_buffers: Optional[ArrayList] = None, *,
             lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
             weight_decay: float = 0.0, maximize: bool = False, first_step: bool = False,
             style: str = "torch", decoupled_weight_decay: bool = False,
             grad_scale=None, found_inf=None, step: Optional[int] = None,
             num_threads: Optional[int] = None) -> None:
    """One step of SGD with momentum, in place.

    style="torch" (PyTorch ``torch.optim.SGD``; also optax ``sgd``, whose
    ``trace`` is this with dampening 0)::

        g = g + weight_decay * p
        b = g                                  (first_step: the buffer is not read)
        b = momentum * b + (1 - dampening) * g (later steps)
        p = p - lr * (g + momentum * b if nesterov else b)

    style="keras" (Keras 3 ``SGD``, and the tutorial formulation
    ``v = beta * v + lr * g; W -= v``; the buffer is minus Keras' ``m``)::

        v = lr * g                             (first_step: the buffer is not read,
                                                as Keras' m starts at zero)
        v = momentum * v + lr * g              (later steps)
        p = p - (momentum * v + lr * g if nesterov else v)

    style="onnx" (ONNX ``Momentum``: alpha = momentum, beta = 1 - dampening,
    norm_coefficient = weight_decay; first_step means T == 0)::

        V = alpha * V + (1 if T == 0 else beta) * g
        p = p - lr * (g + alpha * V if nesterov else V)

    ``decoupled_weight_decay=True`` replaces the L2 term by Keras' decoupled
    decay, ``p = p - lr * weight_decay * p``, applied before the update.
    Without momentum no buffer is needed: ``p = p - lr * g``; in the onnx style
    the formula above still holds at alpha = 0 (``V = beta' g``, ``p = p - lr
    * V``, beta' = 1 at T == 0), with V written where buffers are given.
    Weight decay 0 adds no L2 term (so an infinite parameter stays infinite).
    ``step`` (the 1-based step count), when given, decides ``first_step``
    (``step == 1``), as the optimizer classes pass it.
    """
    params = as_list("params", params, required=True)
    grads = as_list("grads", grads, required=True)
    bufs = as_list("momentum_buffers", momentum_buffers)
    nesterov, maximize, first_step, decoupled_weight_decay = on_off(
        nesterov=nesterov, maximize=maximize, first_step=first_step,
        decoupled_weight_decay=decoupled_weight_decay)
    lr, momentum, dampening, weight_decay, s = sgd_hyper(lr, momentum, dampening, nesterov,
                                                         weight_decay, style, bufs)
    if step is not None:
        first_step = _step("step", step, 1) == 1
    skip, inv = amp_args(grad_scale, found_inf)
    nthreads = resolve_num_threads(num_threads)
    use_bufs = sgd_uses_buffers(momentum, s, bufs)
    lists = [params, grads, bufs if use_bufs else None]
    t = _k.gather(lists, ("params", "grads", "momentum_buffers"), (True, False, True), 1,
                  chk.as_array)
    if skip:
        return
    _k.sgd(t, lr, momentum, dampening, bool(nesterov), weight_decay, bool(decoupled_weight_decay),
           bool(maximize), bool(first_step), s, inv, nthreads, use_bufs)
    if t.foreign:               # only lists holding other arrays (torch?) are scanned
        chk.bump_versions(*(lists[k] for k in (0, 2)))


def adam_step(params: ArrayList, grads: ArrayList, exp_avgs: ArrayList, exp_avg_sqs: ArrayList, *,
              step: int, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
              amsgrad: bool = False, max_exp_avg_sqs: Optional[ArrayList] = None,
              maximize: bool = False, eps_style: str = "torch", eps_root: float = 0.0,
              grad_scale=None, found_inf=None, bias_correction_step: Optional[int] = None,
              weight_decay_post: float = 0.0, num_threads: Optional[int] = None) -> None:
    """One Adam / AdamW / AMSGrad step, in place. ``step`` counts from 1.

    Moments (all styles)::

        g = g + weight_decay * p                  (L2; decoupled: p = p * (1 - lr * weight_decay) first)
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g^2
        bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t     (t = bias_correction_step, default step; t = 0: none)

    eps_style="torch" (PyTorch ``Adam``/``AdamW``)::

        vmax = max(vmax, v)                        (amsgrad: the max of the raw v)
        p = p - lr / bc1 * m / (sqrt((vmax if amsgrad else v) / bc2 + eps_root) + eps)

    eps_style="optax" (optax ``adam``/``amsgrad``): as torch, but AMSGrad keeps
    the max of the bias-corrected ``v / bc2``; ``eps_root`` is optax's.

    eps_style="hat" (Keras 3 ``Adam``, ONNX ``Adam``: "epsilon hat")::

        vmax = max(vmax, v)                        (amsgrad; exp_avg_sqs keeps v)
        p = p - lr * sqrt(bc2) / bc1 * m / (sqrt(vmax if amsgrad else v) + eps)

    ONNX's operator: ``eps_style="hat"``, ``bias_correction_step=T`` (its
    update count, 0 at the first step: no correction),
    ``weight_decay=norm_coefficient`` and ``weight_decay_post=norm_coefficient_post``
    (``p = (1 - weight_decay_post) * p`` after the update).
    """
    params = as_list("params", params, required=True)
    grads = as_list("grads", grads, required=True)
    m = as_list("exp_avgs", exp_avgs, required=True)
    v = as_list("exp_avg_sqs", exp_avg_sqs, required=True)
    vmax = as_list("max_exp_avg_sqs", max_exp_avg_sqs)
    decoupled_weight_decay, amsgrad, maximize = on_off(
        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize)
    step = _step("step", step, 1 if bias_correction_step is None else 0)
    t_bias = step if bias_correction_step is None else _step("bias_correction_step",
                                                             bias_correction_step, 0)
    lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post = adam_hyper(
        lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post, eps_style, amsgrad, vmax)
    skip, inv = amp_args(grad_scale, found_inf)
    nthreads = resolve_num_threads(num_threads)
    t = _k.gather([params, grads, m, v, vmax if amsgrad else None],
                  ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
                  (True, False, True, True, True), 1, chk.as_array)
    if skip:
        return
    _k.adam(t, t_bias, lr, beta1, beta2, eps, weight_decay, bool(decoupled_weight_decay),
            bool(amsgrad), bool(maximize), 2 if eps_style == "hat" else 0,
            eps_style == "optax", eps_root, weight_decay_post, inv, nthreads)
    if t.foreign:               # only lists holding other arrays (torch?) are scanned
        chk.bump_versions(params, m, v, vmax if amsgrad else None)


def rmsprop_step(params: ArrayList, grads: ArrayList, square_avgs: ArrayList, *,
                 lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 grad_avgs: Optional[ArrayList] = None,
                 momentum_buffers: Optional[ArrayList] = None, maximize: bool = False,
                 eps_inside_sqrt: bool = False, style: str = "torch",
                 decoupled_weight_decay: bool = False, grad_scale=None, found_inf=None,
                 num_threads: Optional[int] = None) -> None:
    """One RMSprop step, in place::

        g = g + weight_decay * p                 (L2, PyTorch; decoupled_weight_decay
                                                  instead: p = p - lr * weight_decay * p
                                                  first, Keras' form)
        s = alpha * s + (1 - alpha) * g^2
        a = alpha * a + (1 - alpha) * g          (centered)
        d = max(s - a^2, 0) if centered else s
        den = sqrt(d) + eps                      (PyTorch ``RMSprop``)
        den = sqrt(d + eps)                      (eps_inside_sqrt: Keras, optax)
        p = p - lr * g / den                     (no momentum)

    Momentum, style="torch": ``b = momentum * b + g / den; p = p - lr * b``;
    style="keras" (also optax, whose ``rmsprop`` scales by the learning rate
    before ``trace``): ``b = momentum * b + lr * g / den; p = p - b``.

    Centered, ``d`` is clamped at 0: exactly, ``s >= a^2``, but s and a are
    rounded: a stored float32 s loses its bits to underflow for |g| below about
    1e-18 while a does not, and at alpha = 0 the fused ``s - a*a`` is g^2
    rounded minus g^2 exact, negative for half of all g. Without the clamp,
    sqrt of a negative d made p NaN for good. PyTorch,
    Keras and optax do not clamp: where their d rounds negative they return
    NaN (PyTorch's float32 ``a*a`` underflows along with s, so it rarely does).
    """
    params = as_list("params", params, required=True)
    grads = as_list("grads", grads, required=True)
    sq = as_list("square_avgs", square_avgs, required=True)
    ga = as_list("grad_avgs", grad_avgs)
    mb = as_list("momentum_buffers", momentum_buffers)
    centered, maximize, eps_inside_sqrt, decoupled_weight_decay = on_off(
        centered=centered, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
        decoupled_weight_decay=decoupled_weight_decay)
    lr, alpha, eps, weight_decay, momentum, s = rmsprop_hyper(
        lr, alpha, eps, weight_decay, momentum, style, centered, ga, mb)
    skip, inv = amp_args(grad_scale, found_inf)
    nthreads = resolve_num_threads(num_threads)
    t = _k.gather([params, grads, sq, ga if centered else None, mb if momentum != 0.0 else None],
                  ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"),
                  (True, False, True, True, True), 1, chk.as_array)
    if skip:
        return
    _k.rmsprop(t, lr, alpha, eps, weight_decay, bool(decoupled_weight_decay), momentum,
               bool(centered), bool(maximize), bool(eps_inside_sqrt), s, inv, nthreads)
    if t.foreign:               # only lists holding other arrays (torch?) are scanned
        chk.bump_versions(params, sq, ga if centered else None, mb if momentum != 0.0 else None)


def adagrad_step(params: ArrayList, grads: ArrayList, state_sums: ArrayList, *, step: int,
                 lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 eps: float = 1e-10, maximize: bool = False, eps_inside_sqrt: bool = False,
                 decoupled_weight_decay: bool = False, grad_scale=None, found_inf=None,
                 num_threads: Optional[int] = None) -> None:
    """One Adagrad step, in place (``step`` counts from 1)::

        clr = lr / (1 + (step - 1) * lr_decay)
        g = g + weight_decay * p                 (L2, PyTorch; decoupled_weight_decay
                                                  instead: p = p * (1 - clr * weight_decay)
                                                  first, Keras' form)
        h = h + g^2
        p = p - clr * g / (sqrt(h) + eps)        (PyTorch ``Adagrad``; ONNX ``Adagrad``
                                                  with T = step - 1, decay_factor = lr_decay)
        p = p - clr * g / sqrt(h + eps)          (eps_inside_sqrt: Keras, optax)

    The initial accumulator (PyTorch 0, Keras and optax 0.1) is the caller's
    choice of ``state_sums`` at the first step.
    """
    params = as_list("params", params, required=True)
    grads = as_list("grads", grads, required=True)
    hs = as_list("state_sums", state_sums, required=True)
    maximize, eps_inside_sqrt, decoupled_weight_decay = on_off(
        maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
        decoupled_weight_decay=decoupled_weight_decay)
    step = _step("step", step, 1)
    lr, lr_decay, weight_decay, eps = adagrad_hyper(lr, lr_decay, weight_decay, eps)
    skip, inv = amp_args(grad_scale, found_inf)
    nthreads = resolve_num_threads(num_threads)
    t = _k.gather([params, grads, hs], ("params", "grads", "state_sums"), (True, False, True), 1,
                  chk.as_array)
    if skip:
        return
    clr = lr / (1.0 + (step - 1) * lr_decay)
    _k.adagrad(t, clr, weight_decay, bool(decoupled_weight_decay), bool(maximize), eps,
               bool(eps_inside_sqrt), inv, nthreads)
    if t.foreign:               # only lists holding other arrays (torch?) are scanned
        chk.bump_versions(params, hs)

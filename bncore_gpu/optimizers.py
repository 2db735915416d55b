"""Optimizer updates on lists of CuPy arrays: bncore.optimizers on the GPU.

The signatures, formulas and conventions are those of the CPU functions (see
their docstrings); one kernel launch updates every tensor of a call. On the
GPU, ``grad_scale``, ``found_inf`` and ``step`` may also be device scalars
(0-d or one-element CuPy arrays): they are read inside the kernel, so a step
never waits on the host. A host ``found_inf`` that is true skips the launch;
a device one makes every thread return before touching memory. Values held
on the device are not checked (that would mean waiting for them): a device
``grad_scale`` of 0 gives Inf updates and a device ``step`` below 1 turns the
bias correction off, where the same host values raise ValueError.
"""
from __future__ import annotations

from typing import Optional

import cupy
import numpy as np

from bncore import optimizers as _cpu
from bncore._torch_interop import bump_versions
from bncore._threads import resolve_num_threads
from bncore_gpu import _checks as chk
from bncore_gpu import _loader
from bncore_gpu._tables import CTYPES, gather

__all__ = ["sgd_step", "adam_step", "rmsprop_step", "adagrad_step"]

FILE = "_optim_kernels.cu"
NULL = np.uint64(0)
_F64 = np.dtype(np.float64)
_PAIRS = (("float", "float"), ("double", "double"), ("float", "unsigned short"))


def _names():
    names = ["mt_step_increment", "mt_norm_finalize", "mt_norm_rescue", "mt_any"]
    for p, g in _PAIRS:
        for k in ("mt_sgd", "mt_adam", "mt_rmsprop", "mt_adagrad"):
            names.append(f"{k}<{p}, {g}>")
    for g in ("float", "double", "unsigned short"):
        for k in ("mt_norm_partials", "mt_scale", "mt_clamp", "mt_nonfinite_partials"):
            names.append(f"{k}<{g}>")
    return tuple(names)


NAMES = _names()


def kernel(name: str):
    return _loader.kernel(FILE, NAMES, name)


is_device = chk.is_device


def device_scalar(name: str, v, flag: bool = True) -> "cupy.ndarray":
    """A one-element device array as a float64 0-d array (a kernel's double*);
    a bool one only where it is a flag (found_inf), not a number (grad_scale)."""
    a = chk.as_array(name, v)
    if a.dtype.kind == "b" and not flag:
        # as _cpu.grad_scale_value: the dtype is known on the host (a bool
        # loss scale was taken as 1.0)
        raise TypeError(f"{name} must be a number (the loss scale), got a bool")
    if a.dtype.kind not in "biuf":
        # as the CPU's scalar_value: a complex flag or scale would lose its
        # imaginary part in the cast below
        raise TypeError(f"{name} must be a number or a one-element array, "
                        f"got an array of dtype {a.dtype}")
    if a.size != 1:
        raise ValueError(f"{name} must be a scalar or a one-element array, got shape {a.shape}")
    a = a.reshape(())
    return a if a.dtype == _F64 else a.astype(_F64)


def amp_args(grad_scale, found_inf):
    """(skip, inv_scale, grad_scale pointer, found_inf pointer)."""
    skip, inv = False, 1.0
    scale_ptr = found_ptr = NULL
    if found_inf is not None:
        if is_device(found_inf):
            found_ptr = device_scalar("found_inf", found_inf)
        else:
            skip = _cpu.found_inf_flag(found_inf)
    if grad_scale is not None:
        if is_device(grad_scale):
            scale_ptr = device_scalar("grad_scale", grad_scale, flag=False)
        else:
            inv = 1.0 / _cpu.grad_scale_value(grad_scale)
    return skip, inv, scale_ptr, found_ptr


def step_arg(name: str, step, minimum: int):
    """(host value, device pointer) of a step count given as an int or a device scalar."""
    if is_device(step):
        return 0.0, device_scalar(name, step)
    return float(_cpu._step(name, step, minimum)), NULL


def _launch(name: str, t, *args) -> None:
    if t.nchunks:
        kernel(name)((t.nchunks,), (256,), (*t.args(), *args))
    bump_versions(t.written())     # torch tensors written: tell autograd (bncore._torch_interop)


def _pair(t) -> str:
    return f"{CTYPES[t.pdtype]}, {CTYPES[t.gdtype]}"


def sgd_step(params, grads, momentum_buffers=None, *, lr: float, momentum: float = 0.0,
             dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
             maximize: bool = False, first_step: bool = False, style: str = "torch",
             decoupled_weight_decay: bool = False, grad_scale=None, found_inf=None, step=None,
             num_threads: Optional[int] = None) -> None:
    """One step of SGD with momentum, in place (see bncore.sgd_step).

    ``step`` may be a device scalar (the step count after this step): the
    kernel then decides ``first_step`` itself (``step <= 1``)."""
    params = _cpu.as_list("params", params, required=True)
    grads = _cpu.as_list("grads", grads, required=True)
    bufs = _cpu.as_list("momentum_buffers", momentum_buffers)
    nesterov, maximize, first_step, decoupled_weight_decay = _cpu.on_off(
        nesterov=nesterov, maximize=maximize, first_step=first_step,
        decoupled_weight_decay=decoupled_weight_decay)
    lr, momentum, dampening, weight_decay, s = _cpu.sgd_hyper(lr, momentum, dampening, nesterov,
                                                              weight_decay, style, bufs)
    step_ptr = NULL
    if step is not None:
        host_step, step_ptr = step_arg("step", step, 1)
        if step_ptr is NULL:
            first_step = host_step == 1
    skip, inv, scale_ptr, found_ptr = amp_args(grad_scale, found_inf)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    t = gather([params, grads, bufs if _cpu.sgd_uses_buffers(momentum, s, bufs) else None],
               ("params", "grads", "momentum_buffers"), (True, False, True), 1)
    if skip:
        return
    _launch(f"mt_sgd<{_pair(t)}>", t, np.float64(lr), np.float64(momentum),
            np.float64(dampening), np.int32(bool(nesterov)), np.int32(s),
            np.float64(weight_decay), np.int32(bool(decoupled_weight_decay)),
            np.float64(-1.0 if maximize else 1.0), np.float64(inv), scale_ptr, found_ptr,
            step_ptr, np.int32(bool(first_step)))


def adam_step(params, grads, exp_avgs, exp_avg_sqs, *, step, lr: float = 1e-3,
              beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
              amsgrad: bool = False, max_exp_avg_sqs=None, maximize: bool = False,
              eps_style: str = "torch", eps_root: float = 0.0, grad_scale=None, found_inf=None,
              bias_correction_step=None, weight_decay_post: float = 0.0,
              num_threads: Optional[int] = None) -> None:
    """One Adam / AdamW / AMSGrad step, in place (see bncore.adam_step).

    ``step`` and ``bias_correction_step`` may be device scalars."""
    params = _cpu.as_list("params", params, required=True)
    grads = _cpu.as_list("grads", grads, required=True)
    m = _cpu.as_list("exp_avgs", exp_avgs, required=True)
    v = _cpu.as_list("exp_avg_sqs", exp_avg_sqs, required=True)
    vmax = _cpu.as_list("max_exp_avg_sqs", max_exp_avg_sqs)
    decoupled_weight_decay, amsgrad, maximize = _cpu.on_off(
        decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad, maximize=maximize)
    if bias_correction_step is None:
        host_t, t_ptr = step_arg("step", step, 1)
    else:
        step_arg("step", step, 0)
        host_t, t_ptr = step_arg("bias_correction_step", bias_correction_step, 0)
    lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post = _cpu.adam_hyper(
        lr, beta1, beta2, eps, eps_root, weight_decay, weight_decay_post, eps_style, amsgrad, vmax)
    skip, inv, scale_ptr, found_ptr = amp_args(grad_scale, found_inf)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    t = gather([params, grads, m, v, vmax if amsgrad else None],
               ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
               (True, False, True, True, True), 1)
    if skip:
        return
    _launch(f"mt_adam<{_pair(t)}>", t, np.float64(lr), np.float64(beta1), np.float64(beta2),
            np.float64(eps), np.float64(eps_root), np.float64(weight_decay),
            np.int32(bool(decoupled_weight_decay)), np.float64(1.0 - weight_decay_post),
            np.int32(bool(amsgrad)), np.int32(eps_style == "optax"),
            np.int32(2 if eps_style == "hat" else 0), np.float64(-1.0 if maximize else 1.0),
            np.float64(inv), scale_ptr, found_ptr, t_ptr, np.float64(host_t), np.float64(0.0),
            np.int32(t.aligned16(4)))


def rmsprop_step(params, grads, square_avgs, *, lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, grad_avgs=None, momentum_buffers=None,
                 maximize: bool = False, eps_inside_sqrt: bool = False, style: str = "torch",
                 decoupled_weight_decay: bool = False, grad_scale=None, found_inf=None,
                 num_threads: Optional[int] = None) -> None:
    """One RMSprop step, in place (see bncore.rmsprop_step)."""
    params = _cpu.as_list("params", params, required=True)
    grads = _cpu.as_list("grads", grads, required=True)
    sq = _cpu.as_list("square_avgs", square_avgs, required=True)
    ga = _cpu.as_list("grad_avgs", grad_avgs)
    mb = _cpu.as_list("momentum_buffers", momentum_buffers)
    centered, maximize, eps_inside_sqrt, decoupled_weight_decay = _cpu.on_off(
        centered=centered, maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
        decoupled_weight_decay=decoupled_weight_decay)
    lr, alpha, eps, weight_decay, momentum, s = _cpu.rmsprop_hyper(
        lr, alpha, eps, weight_decay, momentum, style, centered, ga, mb)
    skip, inv, scale_ptr, found_ptr = amp_args(grad_scale, found_inf)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    t = gather([params, grads, sq, ga if centered else None, mb if momentum != 0.0 else None],
               ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers"),
               (True, False, True, True, True), 1)
    if skip:
        return
    _launch(f"mt_rmsprop<{_pair(t)}>", t, np.float64(lr), np.float64(alpha),
            np.float64(eps if eps_inside_sqrt else 0.0),
            np.float64(0.0 if eps_inside_sqrt else eps), np.float64(weight_decay),
            np.int32(bool(decoupled_weight_decay)), np.float64(momentum), np.int32(s),
            np.float64(-1.0 if maximize else 1.0), np.float64(inv), scale_ptr, found_ptr)


def adagrad_step(params, grads, state_sums, *, step, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, eps: float = 1e-10, maximize: bool = False,
                 eps_inside_sqrt: bool = False, decoupled_weight_decay: bool = False,
                 grad_scale=None, found_inf=None, num_threads: Optional[int] = None) -> None:
    """One Adagrad step, in place (see bncore.adagrad_step); ``step`` may be a device scalar."""
    params = _cpu.as_list("params", params, required=True)
    grads = _cpu.as_list("grads", grads, required=True)
    hs = _cpu.as_list("state_sums", state_sums, required=True)
    maximize, eps_inside_sqrt, decoupled_weight_decay = _cpu.on_off(
        maximize=maximize, eps_inside_sqrt=eps_inside_sqrt,
        decoupled_weight_decay=decoupled_weight_decay)
    host_t, t_ptr = step_arg("step", step, 1)
    lr, lr_decay, weight_decay, eps = _cpu.adagrad_hyper(lr, lr_decay, weight_decay, eps)
    skip, inv, scale_ptr, found_ptr = amp_args(grad_scale, found_inf)
    resolve_num_threads(num_threads)   # unused on the GPU, checked where the CPU checks it
    t = gather([params, grads, hs], ("params", "grads", "state_sums"), (True, False, True), 1)
    if skip:
        return
    _launch(f"mt_adagrad<{_pair(t)}>", t, np.float64(lr), np.float64(lr_decay),
            np.float64(eps if eps_inside_sqrt else 0.0),
            np.float64(0.0 if eps_inside_sqrt else eps), np.float64(weight_decay),
            np.int32(bool(decoupled_weight_decay)), np.float64(-1.0 if maximize else 1.0),
            np.float64(inv), scale_ptr, found_ptr, t_ptr, np.float64(host_t))


def step_increment(step: "cupy.ndarray", found_inf=None) -> None:
    """step += 1 on the device, unless the device found_inf is set."""
    found_ptr = device_scalar("found_inf", found_inf) if found_inf is not None else NULL
    kernel("mt_step_increment")((1,), (1,), (step, found_ptr))

"""PyTorch against bncore (convention "torch", bncore's default).

bncore is called on the torch tensors themselves (DLPack, zero-copy): the
running statistics and the optimizer parameters it updates are the torch
tensors' own memory.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

import bncore
from bncore.validate.data import (bn_data, bn_label, cast, clip_grads, concat, lr_schedule,
                                  optim_data, other_variance)
from bncore.conventions import BATCH_NORM
from bncore.validate.report import Check, Report

# bncore's side of every batch-norm row takes the preset (so that a wrong preset
# shows); torch's side takes torch's own defaults
PRESET = BATCH_NORM["torch"]

REQUIRES = ("torch",)
STEPS = 5


def versions() -> Dict[str, str]:
    import torch

    return {"torch": torch.__version__.split("+")[0], "bncore": bncore.__version__}


def _t(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a).copy())


# --------------------------------------------------------------------------
# batch norm

def _bn_forward(shape, layout: str, training: bool, offset=None, seed=0) -> Check:
    import torch
    import torch.nn.functional as F

    def run(dtype, centered=False, unbiased=PRESET.unbiased_running_var):
        x, e = bn_data(shape, 1, offset, centered, seed)
        tx = _t(cast(x, dtype))
        if layout == "channels_last":
            tx = tx.contiguous(memory_format=torch.channels_last)
        w, b = _t(cast(e["weight"], dtype)), _t(cast(e["bias"], dtype))
        rm0, rv0 = cast(e["running_mean"], dtype), cast(e["running_var"], dtype)
        trm, trv = _t(rm0), _t(rv0)
        ty = F.batch_norm(tx, trm, trv, w, b, training=training)
        fw = {"y": ty.numpy(), "running_mean": trm.numpy(), "running_var": trv.numpy()}
        brm, brv = _t(rm0), _t(rv0)        # bncore updates these torch tensors in place
        y, _, _ = bncore.batch_norm_forward(tx, w, b, brm, brv, training=training,
                                            momentum=PRESET.momentum, eps=PRESET.eps,
                                            axis=PRESET.axis, unbiased_running_var=unbiased)
        bn = {"y": y, "running_mean": brm.numpy(), "running_var": brv.numpy()}
        if not training:
            for d in (fw, bn):
                del d["running_mean"], d["running_var"]
        return fw, bn

    cond, cfg = bn_label("train" if training else "eval", shape, layout, 1, offset, seed)
    alts = other_variance(PRESET, lambda dt, u: run(dt, unbiased=u)[1]) if training else {}
    return Check("F.batch_norm", cfg, run, centered=bool(offset), condition=cond,
                 alternatives=alts, show_alternatives=training and not offset,
                 alt_keys=("running_var",) if training else None,
                 note="running_var: torch folds in the unbiased batch variance, n/(n-1) times "
                      "the one it normalizes with." if training and not offset else "")


def _bn_backward(shape, layout: str, seed=1) -> Check:
    import torch
    import torch.nn.functional as F

    def run(dtype, centered=False):
        x, e = bn_data(shape, 1, None, centered, seed)
        tx = _t(cast(x, dtype))
        tdy = _t(cast(e["dy"], dtype))
        if layout == "channels_last":
            tx = tx.contiguous(memory_format=torch.channels_last)
            tdy = tdy.contiguous(memory_format=torch.channels_last)
        tx.requires_grad_(True)
        w = _t(cast(e["weight"], dtype)).requires_grad_(True)
        b = _t(cast(e["bias"], dtype)).requires_grad_(True)
        ty = F.batch_norm(tx, None, None, w, b, training=True)
        dx, dw, db = torch.autograd.grad(ty, (tx, w, b), tdy)
        fw = {"dx": dx.numpy(), "dweight": dw.numpy(), "dbias": db.numpy()}
        xd, wd = tx.detach(), w.detach()          # DLPack needs tensors without grad
        _, mean, invstd = bncore.batch_norm_forward(xd, wd, b.detach(), eps=PRESET.eps)
        bdx, bdw, bdb = bncore.batch_norm_backward(tdy, xd, mean, invstd, wd)
        return fw, {"dx": bdx, "dweight": bdw, "dbias": bdb}

    return Check("autograd(F.batch_norm)", f"backward {'x'.join(map(str, shape))} {layout}", run)


def _bn_module_cumulative(seed=2) -> Check:
    import torch

    def run(dtype, centered=False):
        tdt = torch.float64 if dtype == "float64" else torch.float32
        layer = torch.nn.BatchNorm2d(5, momentum=None, dtype=tdt)
        ours = bncore.BatchNorm(5, momentum=None, dtype=np.float64 if dtype == "float64" else np.float32)
        for k in range(3):
            x, e = bn_data((6, 5, 4, 4), 1, None, False, seed + k)
            tx = _t(cast(x * (1 + k) + k, dtype))
            ty = layer(tx)
            y = ours.forward(tx)
        layer.eval()
        ours.eval()
        x, _ = bn_data((6, 5, 4, 4), 1, None, False, seed + 9)
        tx = _t(cast(x, dtype))
        fw = {"y_train": ty.detach().numpy(), "running_mean": layer.running_mean.numpy(),
              "running_var": layer.running_var.numpy(),
              "y_eval": layer(tx).detach().numpy(),
              "num_batches_tracked": np.array(int(layer.num_batches_tracked))}
        bn = {"y_train": y, "running_mean": ours.running_mean, "running_var": ours.running_var,
              "y_eval": ours.forward(tx), "num_batches_tracked": np.array(ours.num_batches_tracked)}
        return fw, bn

    return Check("nn.BatchNorm2d", "momentum=None, 3 steps + eval", run)


def _bn_module_1d(seed=3) -> Check:
    import torch

    def run(dtype, centered=False):
        tdt = torch.float64 if dtype == "float64" else torch.float32
        layer = torch.nn.BatchNorm1d(6, dtype=tdt)
        ours = bncore.BatchNorm(6, dtype=np.float64 if dtype == "float64" else np.float32)
        x, e = bn_data((32, 6), 1, None, False, seed)
        tx = _t(cast(x, dtype)).requires_grad_(True)
        ty = layer(tx)
        (dx,) = torch.autograd.grad(ty, tx, _t(cast(e["dy"], dtype)))
        y = ours.forward(tx.detach())
        bdx = ours.backward(_t(cast(e["dy"], dtype)))
        fw = {"y": ty.detach().numpy(), "dx": dx.numpy(),
              "running_mean": layer.running_mean.numpy(), "running_var": layer.running_var.numpy()}
        bn = {"y": y, "dx": bdx, "running_mean": ours.running_mean,
              "running_var": ours.running_var}
        return fw, bn

    return Check("nn.BatchNorm1d", "train 32x6, fwd + bwd", run)


# --------------------------------------------------------------------------
# optimizers

def _optimizer(name: str, kw: dict, impl: dict = None, lr0: float = 0.01, seed=4) -> Check:
    import torch

    impl = impl or {}

    def run(dtype, centered=False):
        params, grads = optim_data(STEPS, seed)
        lrs = lr_schedule(lr0, STEPS)
        tp = [_t(cast(p, dtype)) for p in params]
        try:
            opt = getattr(torch.optim, name)(tp, lr=lrs[0], **kw, **impl)
        except (RuntimeError, ValueError, TypeError):
            if dtype == "float64":
                return None, _bncore_run(params, grads, lrs, dtype)
            raise
        for k in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = lrs[k]
            for p, g in zip(tp, grads[k]):
                p.grad = _t(cast(g, dtype))
            opt.step()
        return {"params": concat(tp)}, _bncore_run(params, grads, lrs, dtype)

    def _bncore_run(params, grads, lrs, dtype):
        bp = [_t(cast(p, dtype)) for p in params]       # torch tensors, updated in place
        opt = getattr(bncore.optim, name)(bp, lr=lrs[0], **kw)
        for k in range(STEPS):
            bncore.optim.set_lr(opt, lrs[k])
            opt.step([_t(cast(g, dtype)) for g in grads[k]])
        return {"params": concat(bp)}

    flags = ", ".join(f"{k}={v}" for k, v in {**kw, **impl}.items())
    return Check(f"torch.optim.{name}", flags or "defaults", run)


# --------------------------------------------------------------------------
# clipping

def _clip_norm(norm_type, scale: float, ratio: float = 0.5, seed=5) -> Check:
    import torch

    def grads_for(dtype):
        return clip_grads(seed, scale, dtype)

    def max_norm_for(dtype):
        g = grads_for("float64")
        return ratio * bncore.grad_norm(g, norm_type)

    def ours(dtype, eps):
        g = [_t(a) for a in grads_for(dtype)]
        total = bncore.clip_grad_norm(g, max_norm_for(dtype), norm_type=norm_type, eps=eps)
        return {"grads": concat(g), "total": np.array(total)}

    def run(dtype, centered=False):
        ps = []
        for a in grads_for(dtype):
            p = torch.nn.Parameter(torch.zeros(a.shape, dtype=_t(a).dtype))
            p.grad = _t(a)
            ps.append(p)
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm_for(dtype), norm_type=norm_type)
        fw = {"grads": concat([p.grad for p in ps]), "total": np.array(float(total))}
        return fw, ours(dtype, 1e-6)

    nt = "inf" if norm_type == float("inf") else f"{norm_type:g}"
    total = bncore.grad_norm(grads_for("float64"), norm_type)
    return Check("clip_grad_norm_", f"norm_type={nt}, norm {total:.1e}, max_norm=norm*{ratio:g}",
                 run, alternatives={"eps=0 (the exact clip)": lambda dt: ours(dt, 0.0)},
                 show_alternatives=True, alt_keys=("grads",),
                 note="torch scales by max_norm / (norm + 1e-6), not max_norm / norm: a "
                      "non-exact clip, visible when the norm is not large against 1e-6.")


def _clip_value(seed=6) -> Check:
    import torch

    def run(dtype, centered=False):
        rng = np.random.default_rng(seed)
        gs = [cast(rng.standard_normal(s).astype(np.float32), dtype) for s in ((10,), (300,))]
        ps = []
        for a in gs:
            p = torch.nn.Parameter(torch.zeros(a.shape, dtype=_t(a).dtype))
            p.grad = _t(a)
            ps.append(p)
        torch.nn.utils.clip_grad_value_(ps, 0.5)
        bg = [_t(a) for a in gs]
        bncore.clip_grad_value(bg, 0.5)
        return {"grads": concat([p.grad for p in ps])}, {"grads": concat(bg)}

    return Check("clip_grad_value_", "clip_value=0.5", run)


def checks(report: Report, quick: bool = False) -> None:
    report.add(_bn_forward((8, 4, 6, 6), "NCHW", True))
    report.add(_bn_forward((8, 4, 6, 6), "channels_last", True))
    report.add(_bn_forward((8, 4, 6, 6), "NCHW", False))
    if not quick:
        report.add(_bn_forward((4, 3, 5, 4, 4), "NCDHW", True))
        report.add(_bn_forward((8, 4, 6, 6), "channels_last", False))
    report.add(_bn_forward((8, 4, 6, 6), "NCHW", True, offset=1e4))
    report.add(_bn_forward((8, 4, 6, 6), "channels_last", True, offset=1e4))
    report.add(_bn_backward((8, 4, 6, 6), "NCHW"))
    if not quick:
        report.add(_bn_backward((8, 4, 6, 6), "channels_last"))
        report.add(_bn_module_cumulative())
        report.add(_bn_module_1d())
    report.add(_optimizer("SGD", dict(momentum=0.9), lr0=0.05))
    report.add(_optimizer("Adam", {}))
    if not quick:
        report.add(_optimizer("SGD", dict(momentum=0.9, nesterov=True), lr0=0.05))
        report.add(_optimizer("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.01,
                                          maximize=True), lr0=0.05))
        report.add(_optimizer("SGD", dict(momentum=0.9), impl=dict(fused=True), lr0=0.05))
        report.add(_optimizer("Adam", dict(amsgrad=True, weight_decay=0.01)))
        report.add(_optimizer("Adam", {}, impl=dict(fused=True)))
        report.add(_optimizer("AdamW", dict(weight_decay=0.01)))
        report.add(_optimizer("AdamW", dict(weight_decay=0.01, amsgrad=True), impl=dict(fused=True)))
        report.add(_optimizer("RMSprop", {}))
        report.add(_optimizer("RMSprop", dict(centered=True, momentum=0.5, weight_decay=0.01)))
        report.add(_optimizer("Adagrad", dict(lr_decay=0.01, initial_accumulator_value=0.1,
                                              weight_decay=0.01), lr0=0.05))
        report.add(_optimizer("Adagrad", {}, impl=dict(fused=True), lr0=0.05))
    report.add(_clip_norm(2.0, 1.0))
    report.add(_clip_norm(2.0, 3e-6))
    if not quick:
        report.add(_clip_norm(float("inf"), 1.0))
        report.add(_clip_norm(1.0, 1.0))
    report.add(_clip_value())

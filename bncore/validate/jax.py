"""JAX against bncore: flax.linen.BatchNorm (convention "flax") and optax
(convention "optax").

JAX's 64-bit mode is switched on for the float64 reruns; the float32 runs
pass float32 arrays (and float32 learning rates) explicitly. Gradients of
flax's BatchNorm come from ``jax.grad``; bncore reads the JAX arrays through
DLPack (zero-copy; JAX arrays are read-only, so bncore's in-place outputs are
NumPy arrays).
"""
from __future__ import annotations

from typing import Dict

import numpy as np

import bncore
from bncore.validate.data import (NHWC_NAMES, bn_data, bn_label, cast, clip_grads, concat,
                                  lr_schedule, optim_data, other_variance)
from bncore.conventions import BATCH_NORM
from bncore.validate.report import Check, Report

# bncore's side of the batch-norm rows takes the preset (so that a wrong preset
# shows); the framework's side takes its own defaults
FLAX = BATCH_NORM["flax"]

REQUIRES = ("jax", "optax", "flax")
STEPS = 5


def prepare() -> None:
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass


def versions() -> Dict[str, str]:
    import flax
    import jax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "bncore": bncore.__version__}


def _jdt(dtype):
    import jax.numpy as jnp

    return jnp.float64 if dtype == "float64" else jnp.float32


# --------------------------------------------------------------------------
# flax.linen.BatchNorm (channels-last; momentum 0.99 is a decay)

def _flax_bn(shape, training: bool, offset=None, seed=20) -> Check:
    import flax.linen as nn
    import jax.numpy as jnp

    def flax_run(dtype, centered=False, fast=True):
        x, e = bn_data(shape, -1, offset, centered, seed)
        layer = nn.BatchNorm(use_running_average=not training,   # flax's momentum, epsilon
                             dtype=_jdt(dtype), param_dtype=_jdt(dtype), use_fast_variance=fast)
        variables = {"params": {"scale": jnp.asarray(cast(e["weight"], dtype)),
                                "bias": jnp.asarray(cast(e["bias"], dtype))},
                     "batch_stats": {"mean": jnp.asarray(cast(e["running_mean"], dtype)),
                                     "var": jnp.asarray(cast(e["running_var"], dtype))}}
        xj = jnp.asarray(cast(x, dtype))
        if training:
            y, upd = layer.apply(variables, xj, mutable=["batch_stats"])
            return {"y": np.asarray(y), "running_mean": np.asarray(upd["batch_stats"]["mean"]),
                    "running_var": np.asarray(upd["batch_stats"]["var"])}, xj, e
        return {"y": np.asarray(layer.apply(variables, xj))}, xj, e

    def ours(dtype, xj, e, unbiased=FLAX.unbiased_running_var):
        rm, rv = cast(e["running_mean"], dtype), cast(e["running_var"], dtype)
        y, _, _ = bncore.batch_norm_forward(xj, cast(e["weight"], dtype), cast(e["bias"], dtype),
                                            rm, rv, training=training, momentum=FLAX.momentum,
                                            eps=FLAX.eps, axis=FLAX.axis,
                                            unbiased_running_var=unbiased)
        return {"y": y, "running_mean": rm, "running_var": rv} if training else {"y": y}

    def run(dtype, centered=False):
        fw, xj, e = flax_run(dtype, centered)
        return fw, ours(dtype, xj, e)

    def with_rule(dtype, unbiased):
        _, xj, e = flax_run(dtype)
        return ours(dtype, xj, e, unbiased=unbiased)

    def emulate(dtype):
        """flax/linen/normalization.py _compute_stats with use_fast_variance:
        var = max(0, mean(x^2) - mean(x)^2) in float32; then (x - mean) * rsqrt(var + eps)."""
        x, e = bn_data(shape, -1, offset, False, seed)
        red = tuple(range(len(shape) - 1))
        f = np.float32
        n = np.prod([shape[i] for i in red])
        flat = x.reshape(-1, shape[-1])
        # float32 running sums of x and x^2 (a sequential float32 reduction)
        mu = np.cumsum(flat, axis=0, dtype=f)[-1] / f(n)
        mu2 = np.cumsum(flat * flat, axis=0, dtype=f)[-1] / f(n)
        var = np.maximum(f(0), mu2 - mu * mu)
        return {"y": (x - mu) * (f(1) / np.sqrt(var + f(1e-5))) * e["weight"] + e["bias"]}

    cond, cfg = bn_label("train" if training else "eval", shape, NHWC_NAMES[len(shape)], -1,
                         offset, seed)
    show = training and not offset
    return Check("flax.linen.BatchNorm", cfg, run, centered=bool(offset), condition=cond,
                 alternatives=other_variance(FLAX, with_rule) if show else {},
                 show_alternatives=show, alt_keys=("running_var",) if show else None,
                 fw_variants={"use_fast_variance=False": lambda dt: flax_run(dt, fast=False)[0]}
                 if offset else {},
                 emulations={"flax's one-pass variance E[x^2] - E[x]^2": emulate}
                 if offset else {},
                 note="ra_var: flax folds in the biased batch variance (momentum 0.99 is a decay: "
                      "bncore rate 0.01)." if show else "")


def _flax_bn_backward(shape, seed=21) -> Check:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def run(dtype, centered=False):
        x, e = bn_data(shape, -1, None, centered, seed)
        layer = nn.BatchNorm(use_running_average=False,
                             dtype=_jdt(dtype), param_dtype=_jdt(dtype))
        stats = {"mean": jnp.zeros(shape[-1], _jdt(dtype)), "var": jnp.ones(shape[-1], _jdt(dtype))}
        dy = jnp.asarray(cast(e["dy"], dtype))

        def loss(xx, params):
            y, _ = layer.apply({"params": params, "batch_stats": stats}, xx,
                               mutable=["batch_stats"])
            return jnp.sum(y * dy)

        xj = jnp.asarray(cast(x, dtype))
        params = {"scale": jnp.asarray(cast(e["weight"], dtype)),
                  "bias": jnp.asarray(cast(e["bias"], dtype))}
        dx, dp = jax.grad(loss, argnums=(0, 1))(xj, params)
        fw = {"dx": np.asarray(dx), "dweight": np.asarray(dp["scale"]),
              "dbias": np.asarray(dp["bias"])}
        w = cast(e["weight"], dtype)
        _, mean, invstd = bncore.batch_norm_forward(xj, w, None, eps=FLAX.eps, axis=FLAX.axis)
        bdx, bdw, bdb = bncore.batch_norm_backward(dy, xj, mean, invstd, w, axis=-1)
        return fw, {"dx": bdx, "dweight": bdw, "dbias": bdb}

    return Check("flax.linen.BatchNorm", f"backward (jax.grad) {'x'.join(map(str, shape))} NHWC",
                 run)


# --------------------------------------------------------------------------
# optax

def _optax(name: str, kw: dict, cls: str, ours: dict, lr0=0.01, seed=22, alternatives=None,
           note="") -> Check:
    import jax.numpy as jnp
    import optax

    def bncore_run(dtype, extra=None):
        params, grads = optim_data(STEPS, seed)
        lrs = lr_schedule(lr0, STEPS)
        bp = [cast(p, dtype) for p in params]
        opt = getattr(bncore.optim, cls)(bp, convention="optax", lr=lrs[0], **{**ours, **(extra or {})})
        for k in range(STEPS):
            bncore.optim.set_lr(opt, lrs[k])
            opt.step([jnp.asarray(cast(g, dtype)) for g in grads[k]])   # DLPack, read-only
        return {"params": concat(bp)}

    def run(dtype, centered=False):
        params, grads = optim_data(STEPS, seed)
        lrs = jnp.asarray(lr_schedule(lr0, STEPS), dtype=_jdt(dtype))
        tx = getattr(optax, name)(learning_rate=lambda count: lrs[count], **kw)
        p = [jnp.asarray(cast(a, dtype)) for a in params]
        state = tx.init(p)
        for k in range(STEPS):
            g = [jnp.asarray(cast(a, dtype)) for a in grads[k]]
            updates, state = tx.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return {"params": concat([np.asarray(a) for a in p])}, bncore_run(dtype)

    alts = {k: (lambda dt, v=v: bncore_run(dt, v)) for k, v in (alternatives or {}).items()}
    flags = ", ".join(f"{k}={v}" for k, v in kw.items())
    return Check(f"optax.{name}", flags or "defaults", run, alternatives=alts,
                 show_alternatives=bool(alts), alt_keys=("params",) if alts else None, note=note)


def _optax_clip(kind: str, scale: float, seed=23) -> Check:
    import jax.numpy as jnp
    import optax

    def grads_for(dtype):
        return clip_grads(seed, scale, dtype)

    total = bncore.grad_norm(grads_for("float64"))
    c = float(np.float32(0.5 * total))
    cv = float(np.float32(0.5 * scale))

    def ours(dtype, eps=0.0):
        g = grads_for(dtype)
        if kind == "global":
            bncore.clip_grad_norm(g, c, eps=eps)
        else:
            bncore.clip_grad_value(g, cv)
        return {"grads": concat(g)}

    def run(dtype, centered=False):
        tx = optax.clip_by_global_norm(c) if kind == "global" else optax.clip(cv)
        g = [jnp.asarray(a) for a in grads_for(dtype)]
        out, _ = tx.update(g, tx.init(g))
        return {"grads": concat([np.asarray(a) for a in out])}, ours(dtype)

    if kind == "global":
        return Check("optax.clip_by_global_norm", f"max_norm=norm/2, norm {total:.1e}", run,
                     alternatives={"eps=1e-6 (torch's clip)": lambda dt: ours(dt, 1e-6)},
                     show_alternatives=True, alt_keys=("grads",),
                     note="optax clips exactly: g / norm * max_norm.")
    return Check("optax.clip", f"max_delta={cv:g}", run)


def checks(report: Report, quick: bool = False) -> None:
    report.add(_flax_bn((8, 6, 5, 4), True))
    report.add(_flax_bn((8, 6, 5, 4), False))
    report.add(_flax_bn((8, 6, 5, 4), True, offset=1e2))
    if not quick:
        report.add(_flax_bn((64, 5), True))
        report.add(_flax_bn((8, 6, 5, 4), True, offset=1e3))
    report.add(_flax_bn_backward((8, 6, 5, 4)))
    report.add(_optax("sgd", dict(momentum=0.9), "SGD", dict(momentum=0.9), lr0=0.05))
    report.add(_optax("adam", {}, "Adam", {}))
    if not quick:
        report.add(_optax("sgd", dict(momentum=0.9, nesterov=True), "SGD",
                          dict(momentum=0.9, nesterov=True), lr0=0.05))
        report.add(_optax("adamw", {}, "AdamW", {}))
        report.add(_optax("amsgrad", {}, "Adam", dict(amsgrad=True)))
        report.add(_optax("rmsprop", {}, "RMSprop", {}))
    report.add(_optax("rmsprop", dict(centered=True, momentum=0.5), "RMSprop",
                      dict(centered=True, momentum=0.5),
                      alternatives={"torch's momentum form (style='torch')":
                                    dict(style="torch")},
                      note="optax.rmsprop applies the learning rate before trace(momentum), so "
                           "it sits inside the momentum buffer (b = mu b + lr g/den; p -= b), "
                           "not outside as in torch (b = mu b + g/den; p -= lr b); the two "
                           "differ once the learning rate changes (here: a schedule)."))
    if not quick:
        report.add(_optax("adagrad", {}, "Adagrad", {}, lr0=0.05))
    report.add(_optax_clip("global", 1.0))
    report.add(_optax_clip("global", 3e-6))
    report.add(_optax_clip("value", 1.0))

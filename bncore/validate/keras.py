"""Keras 3 against bncore (convention "keras"), on the JAX backend.

``KERAS_BACKEND`` defaults to ``jax`` here (set before Keras is imported), so
TensorFlow is not needed; JAX's 64-bit mode is switched on for the float64
reruns (float32 runs pass float32 arrays explicitly and stay float32).
Gradients of BatchNormalization come from ``jax.grad`` through the layer's
``stateless_call``.
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np

import bncore
from bncore.validate.data import (NHWC_NAMES, bn_data, bn_label, cast, clip_grads, concat,
                                  lr_schedule, optim_data, other_variance)
from bncore.conventions import BATCH_NORM
from bncore.validate.report import Check, Report

# bncore's side of the batch-norm rows takes the preset (so that a wrong preset
# shows); the framework's side takes its own defaults
PRESET = BATCH_NORM["keras"]

REQUIRES = ("jax", "keras")
STEPS = 5


def prepare() -> None:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import jax

        jax.config.update("jax_enable_x64", True)
    except ImportError:
        pass


def versions() -> Dict[str, str]:
    import jax
    import keras

    return {"keras": keras.__version__, "backend": keras.backend.backend(),
            "jax": jax.__version__, "bncore": bncore.__version__}


def _np(a):
    return np.asarray(a)


# --------------------------------------------------------------------------
# BatchNormalization (channels-last, axis=-1; momentum 0.99 is a decay)

def _layer(dtype, shape, e):
    import keras

    layer = keras.layers.BatchNormalization(dtype=dtype)
    layer.build(tuple(shape))
    layer.gamma.assign(cast(e["weight"], dtype))
    layer.beta.assign(cast(e["bias"], dtype))
    layer.moving_mean.assign(cast(e["running_mean"], dtype))
    layer.moving_variance.assign(cast(e["running_var"], dtype))
    return layer


def _bn_forward(shape, training: bool, offset=None, seed=10) -> Check:
    import jax.numpy as jnp

    def run(dtype, centered=False, unbiased=PRESET.unbiased_running_var):
        x, e = bn_data(shape, -1, offset, centered, seed)
        layer = _layer(dtype, shape, e)
        xj = jnp.asarray(cast(x, dtype))
        y = layer(xj, training=training)
        fw = {"y": _np(y)}
        rm, rv = cast(e["running_mean"], dtype), cast(e["running_var"], dtype)
        # bncore reads the JAX array through DLPack (zero-copy, read-only)
        by, _, _ = bncore.batch_norm_forward(
            xj, cast(e["weight"], dtype), cast(e["bias"], dtype), rm, rv, training=training,
            momentum=PRESET.momentum, eps=PRESET.eps, axis=PRESET.axis,
            unbiased_running_var=unbiased)
        bn = {"y": by}
        if training:
            fw.update(running_mean=_np(layer.moving_mean.value),
                      running_var=_np(layer.moving_variance.value))
            bn.update(running_mean=rm, running_var=rv)
        return fw, bn

    def emulate(dtype):
        """keras/src/backend/jax/nn.py batch_normalization: inv = rsqrt(var + eps) * gamma;
        y = x * inv + (beta - mean * inv), in float32, from exact statistics."""
        x, e = bn_data(shape, -1, offset, False, seed)
        x64 = x.astype(np.float64)
        red = tuple(range(len(shape) - 1))
        f = np.float32
        mean, var = x64.mean(axis=red).astype(f), x64.var(axis=red).astype(f)
        inv = (f(1) / np.sqrt(var + f(1e-3))) * e["weight"]
        res = -mean * inv + e["bias"]
        return {"y": x * inv + res}

    cond, cfg = bn_label("train" if training else "eval", shape, NHWC_NAMES[len(shape)], -1,
                         offset, seed)
    show = training and not offset
    return Check("BatchNormalization", cfg, run, centered=bool(offset), condition=cond,
                 alternatives=other_variance(PRESET, lambda dt, u: run(dt, unbiased=u)[1])
                 if training else {},
                 show_alternatives=show, alt_keys=("running_var",) if training else None,
                 emulations={"Keras' y = x*inv + (beta - mean*inv)": emulate} if offset else {},
                 note="moving_variance: Keras 3 folds in the biased batch variance (momentum "
                      "0.99 is a decay: bncore rate 0.01)." if show else "")


def _bn_backward(shape, seed=11) -> Check:
    import jax
    import jax.numpy as jnp

    def run(dtype, centered=False):
        x, e = bn_data(shape, -1, None, centered, seed)
        layer = _layer(dtype, shape, e)
        tv = [v.value for v in layer.trainable_variables]          # gamma, beta
        ntv = [v.value for v in layer.non_trainable_variables]
        dy = jnp.asarray(cast(e["dy"], dtype))

        def loss(xx, tvv):
            y, _ = layer.stateless_call(tvv, ntv, xx, training=True)
            return jnp.sum(y * dy)

        xj = jnp.asarray(cast(x, dtype))
        dx, (dg, db) = jax.grad(loss, argnums=(0, 1))(xj, tv)
        fw = {"dx": _np(dx), "dweight": _np(dg), "dbias": _np(db)}
        w = cast(e["weight"], dtype)
        _, mean, invstd = bncore.batch_norm_forward(xj, w, None, eps=PRESET.eps,
                                                    axis=PRESET.axis)
        bdx, bdw, bdb = bncore.batch_norm_backward(dy, xj, mean, invstd, w, axis=-1)
        return fw, {"dx": bdx, "dweight": bdw, "dbias": bdb}

    return Check("BatchNormalization", f"backward (jax.grad) {'x'.join(map(str, shape))} NHWC",
                 run)


# --------------------------------------------------------------------------
# optimizers

def _optimizer(name: str, kw: dict, ours: dict, lr0: float = 0.01, seed=12,
               bncore_name: str = None) -> Check:
    import keras

    def run(dtype, centered=False):
        params, grads = optim_data(STEPS, seed)
        lrs = lr_schedule(lr0, STEPS)
        kv = [keras.Variable(cast(p, dtype), dtype=dtype) for p in params]
        opt = getattr(keras.optimizers, name)(learning_rate=lrs[0], **kw)
        for k in range(STEPS):
            opt.learning_rate = lrs[k]
            opt.apply_gradients(zip([cast(g, dtype) for g in grads[k]], kv))
        fw = {"params": concat([_np(v.value) for v in kv])}
        bp = [cast(p, dtype) for p in params]
        bopt = getattr(bncore.optim, bncore_name or name)(bp, convention="keras", lr=lrs[0],
                                                           **ours)
        for k in range(STEPS):
            bncore.optim.set_lr(bopt, lrs[k])
            bopt.step([cast(g, dtype) for g in grads[k]])
        return fw, {"params": concat(bp)}

    flags = ", ".join(f"{k}={v}" for k, v in kw.items())
    return Check(f"keras.optimizers.{name}", flags or "defaults", run)


# --------------------------------------------------------------------------
# clipping (the optimizer's own clip, applied to the gradients it receives)

def _clip(kind: str, scale: float, seed=13) -> Check:
    import keras

    def grads_for(dtype):
        return clip_grads(seed, scale, dtype)

    total = bncore.grad_norm(grads_for("float64"))
    per = [bncore.grad_norm([g]) for g in grads_for("float64")]
    c = float(np.float32(0.5 * total)) if kind != "clipnorm" else float(np.float32(0.5 * min(per)))
    cv = float(np.float32(0.5 * scale))

    def ours(dtype, eps):
        g = grads_for(dtype)
        if kind == "global_clipnorm":
            bncore.clip_grad_norm(g, c, eps=eps)
        elif kind == "clipnorm":
            for t in g:
                bncore.clip_grad_norm(t, c, eps=eps)
        else:
            bncore.clip_grad_value(g, cv)
        return {"grads": concat(g)}

    def run(dtype, centered=False):
        arg = {"global_clipnorm": c, "clipnorm": c, "clipvalue": cv}[kind]
        opt = keras.optimizers.SGD(learning_rate=0.1, **{kind: arg})
        out = opt._clip_gradients([keras.ops.convert_to_tensor(g) for g in grads_for(dtype)])
        return {"grads": concat([_np(g) for g in out])}, ours(dtype, 0.0)

    cfg = {"global_clipnorm": f"global_clipnorm=norm/2, norm {total:.1e}",
           "clipnorm": f"clipnorm (per tensor), norm {total:.1e}",
           "clipvalue": f"clipvalue={cv:g}"}[kind]
    alts = {} if kind == "clipvalue" else {"eps=1e-6 (torch's clip)": lambda dt: ours(dt, 1e-6)}
    return Check("optimizer clipping", cfg, run, alternatives=alts,
                 show_alternatives=bool(alts), alt_keys=("grads",),
                 note="Keras clips exactly: g * c / max(norm, c)." if alts else "")


def checks(report: Report, quick: bool = False) -> None:
    import keras

    if keras.backend.backend() != "jax":
        # every row hands Keras NumPy arrays and reads JAX ones back: on another
        # backend they would fail (torch tensors that require grad, ...) and look
        # like differences
        report.skip(f"keras: runs on the {keras.backend.backend()} backend here (KERAS_BACKEND="
                    f"{os.environ.get('KERAS_BACKEND')!r}); bncore validate keras drives Keras "
                    f"on JAX: unset KERAS_BACKEND or set it to jax; skipped")
        return
    report.add(_bn_forward((8, 6, 5, 4), True))
    report.add(_bn_forward((8, 6, 5, 4), False))
    if not quick:
        report.add(_bn_forward((64, 5), True))
    report.add(_bn_forward((8, 6, 5, 4), True, offset=1e3))
    if keras.backend.backend() == "jax":
        report.add(_bn_backward((8, 6, 5, 4)))
    report.add(_optimizer("SGD", dict(momentum=0.9), dict(momentum=0.9), lr0=0.05))
    report.add(_optimizer("Adam", {}, {}))
    if not quick:
        report.add(_optimizer("SGD", dict(momentum=0.9, nesterov=True),
                              dict(momentum=0.9, nesterov=True), lr0=0.05))
        report.add(_optimizer("SGD", dict(momentum=0.9, weight_decay=0.01),
                              dict(momentum=0.9, weight_decay=0.01), lr0=0.05))
        report.add(_optimizer("Adam", dict(amsgrad=True), dict(amsgrad=True)))
        report.add(_optimizer("AdamW", {}, {}))
        report.add(_optimizer("RMSprop", {}, {}))
        report.add(_optimizer("RMSprop", dict(centered=True, momentum=0.5),
                              dict(centered=True, momentum=0.5)))
        report.add(_optimizer("Adagrad", {}, {}, lr0=0.05))
    report.add(_clip("global_clipnorm", 1.0))
    report.add(_clip("global_clipnorm", 3e-6))
    if not quick:
        report.add(_clip("clipnorm", 1.0))
    report.add(_clip("clipvalue", 1.0))

"""Framework conventions, as data (see the table in DESIGN.md).

Each entry records what the framework's own source does, so that
``convention="keras"`` (and friends) reproduces that framework's defaults and
formulas. Momentum is always stored as bncore's *rate* (the weight of the new
batch statistic); frameworks that call 0.99 "momentum" mean a decay, i.e. a
rate of 0.01, and the ``framework_momentum`` column keeps their number.

ONNX attributes are float32, so the onnx presets' defaults are the float32
values (0.9 is 0.89999997615814209); a value passed explicitly is used as
given: pass float(numpy.float32(v)) to mirror an ONNX model's attribute.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

CONVENTION_NAMES = ("torch", "keras", "tf_fused", "flax", "optax", "onnx")


@dataclass(frozen=True)
class BatchNormConvention:
    """Batch-normalization defaults of one framework."""

    name: str
    momentum: float            # bncore rate: r = (1 - momentum) r + momentum * stat
    framework_momentum: float  # the number the framework's own API takes
    momentum_is_decay: bool    # True when the framework's number is 1 - rate
    eps: float
    unbiased_running_var: bool
    axis: int                  # default channel axis
    source: str                # where the convention comes from
    # tf.keras 2 takes its fused kernel only for these input ranks, with the
    # channel axis first or last after the batch and a float16/float32 compute
    # dtype (BatchNormalizationBase._fused_can_be_used); otherwise tf.nn.moments
    # (biased variance, eps as given). None: every input alike
    fused_ranks: Optional[Tuple[int, ...]] = None
    fused_min_eps: float = 0.0  # tf.nn.fused_batch_norm raises eps to at least this

    def for_input(self, ndim: int, axis: int, dtype) -> Tuple[bool, float]:
        """(unbiased running variance, minimum eps) for an input of `ndim`
        dimensions, channel axis `axis`, computed in `dtype`."""
        if self.fused_ranks is None:
            return self.unbiased_running_var, 0.0
        fused = (ndim in self.fused_ranks and axis % ndim in (1, ndim - 1)
                 and str(dtype) in ("float16", "float32"))
        if fused:
            return self.unbiased_running_var, self.fused_min_eps
        return False, 0.0


def _f32(v: float) -> float:
    """v as a float32 holds it: ONNX attributes (epsilon, momentum, alpha, ...)
    are float32, so an ONNX model's default 0.9 is 0.89999997615814209."""
    return float(struct.unpack("f", struct.pack("f", v))[0])


BATCH_NORM: Dict[str, BatchNormConvention] = {
    "torch": BatchNormConvention(
        "torch", 0.1, 0.1, False, 1e-5, True, 1,
        "torch.nn.BatchNorm*d: momentum=0.1 (rate; None = cumulative average), eps=1e-5, "
        "running_var updated with the unbiased batch variance"),
    "keras": BatchNormConvention(
        "keras", 0.01, 0.99, True, 1e-3, False, -1,
        "keras.layers.BatchNormalization (Keras 3): momentum=0.99 (decay), epsilon=1e-3, "
        "moving_variance updated with the biased batch variance, channels-last"),
    "tf_fused": BatchNormConvention(
        "tf_fused", 0.01, 0.99, True, 1e-3, True, -1,
        "tf.keras 2 BatchNormalization: decay 0.99, epsilon=1e-3; 4D/5D float16/float32 "
        "inputs with the channel axis 1 or last take the fused kernel, whose "
        "tf.nn.fused_batch_norm applies Bessel's correction to the variance and raises "
        "epsilon to at least 1.001e-5; other inputs take tf.nn.moments (biased variance)",
        fused_ranks=(4, 5), fused_min_eps=1.001e-5),
    "flax": BatchNormConvention(
        "flax", 0.01, 0.99, True, 1e-5, False, -1,
        "flax.linen.BatchNorm: momentum=0.99 (decay), epsilon=1e-5, biased variance"),
    "onnx": BatchNormConvention(
        "onnx", 1.0 - _f32(0.9), _f32(0.9), True, _f32(1e-5), False, 1,
        "ONNX BatchNormalization (opset 15): momentum=0.9 (decay), epsilon=1e-5, both "
        "float32 attributes (the defaults here are those float32 values), running_var "
        "from the population (biased) variance"),
}


def batch_norm_convention(name: str) -> BatchNormConvention:
    try:
        return BATCH_NORM[name]
    except KeyError:
        raise ValueError(f"unknown batch-norm convention {name!r}; choose one of "
                         f"{', '.join(BATCH_NORM)}") from None


# --------------------------------------------------------------------------
# Optimizers: the defaults and formula switches of each framework, as the
# keyword arguments of bncore's step functions (see bncore/optimizers.py).
# "decoupled_weight_decay" True means the framework applies weight decay as
# p -= lr * wd * p (Keras on every optimizer; AdamW); False adds wd * p to g.

OPTIMIZERS: Dict[str, Dict[str, dict]] = {
    "SGD": {
        "torch": dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                      style="torch", decoupled_weight_decay=False),
        "keras": dict(lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                      style="keras", decoupled_weight_decay=True),
        "optax": dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                      style="torch", decoupled_weight_decay=False),
        "onnx": dict(lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
                     style="onnx", decoupled_weight_decay=False),
    },
    "Adam": {
        "torch": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                      eps_style="torch", eps_root=0.0, decoupled_weight_decay=False,
                      onnx_update_count=False, weight_decay_post=0.0),
        "keras": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-7, weight_decay=0.0, amsgrad=False,
                      eps_style="hat", eps_root=0.0, decoupled_weight_decay=True,
                      onnx_update_count=False, weight_decay_post=0.0),
        "optax": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                      eps_style="optax", eps_root=0.0, decoupled_weight_decay=False,
                      onnx_update_count=False, weight_decay_post=0.0),
        # ONNX Adam's alpha, beta and epsilon are float32 attributes
        "onnx": dict(lr=1e-3, betas=(_f32(0.9), _f32(0.999)), eps=_f32(1e-6), weight_decay=0.0,
                     amsgrad=False, eps_style="hat", eps_root=0.0, decoupled_weight_decay=False,
                     onnx_update_count=True, weight_decay_post=0.0),
    },
    "AdamW": {
        "torch": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                      eps_style="torch", eps_root=0.0, decoupled_weight_decay=True,
                      onnx_update_count=False, weight_decay_post=0.0),
        "keras": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-7, weight_decay=4e-3, amsgrad=False,
                      eps_style="hat", eps_root=0.0, decoupled_weight_decay=True,
                      onnx_update_count=False, weight_decay_post=0.0),
        "optax": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4, amsgrad=False,
                      eps_style="optax", eps_root=0.0, decoupled_weight_decay=True,
                      onnx_update_count=False, weight_decay_post=0.0),
    },
    "RMSprop": {
        "torch": dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False, eps_inside_sqrt=False, style="torch",
                      decoupled_weight_decay=False),
        "keras": dict(lr=1e-3, alpha=0.9, eps=1e-7, weight_decay=0.0, momentum=0.0,
                      centered=False, eps_inside_sqrt=True, style="keras",
                      decoupled_weight_decay=True),
        # optax.rmsprop chains scale_by_learning_rate *before* trace(momentum), so the
        # learning rate sits inside the momentum buffer as in Keras (style="keras");
        # found by `bncore validate jax` with a learning-rate schedule
        "optax": dict(lr=1e-3, alpha=0.9, eps=1e-8, weight_decay=0.0, momentum=0.0,
                      centered=False, eps_inside_sqrt=True, style="keras",
                      decoupled_weight_decay=False),
    },
    "Adagrad": {
        "torch": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=1e-10,
                      initial_accumulator_value=0.0, eps_inside_sqrt=False,
                      decoupled_weight_decay=False),
        "keras": dict(lr=1e-3, lr_decay=0.0, weight_decay=0.0, eps=1e-7,
                      initial_accumulator_value=0.1, eps_inside_sqrt=True,
                      decoupled_weight_decay=True),
        "optax": dict(lr=1e-3, lr_decay=0.0, weight_decay=0.0, eps=1e-7,
                      initial_accumulator_value=0.1, eps_inside_sqrt=True,
                      decoupled_weight_decay=False),
        "onnx": dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, eps=_f32(1e-6),
                     initial_accumulator_value=0.0, eps_inside_sqrt=False,
                     decoupled_weight_decay=False),
    },
}


# "tf_fused" (tf.keras 2, DESIGN.md's fused column) names the batch-norm rule of
# tf.keras 2's fused kernel; its optimizers are Keras's (tf.keras.optimizers in
# TF 2.11+ are the Keras optimizers Keras 3 kept, with the same defaults and
# formulas: eps-hat Adam with 1e-7, SGD's m = mu m - lr g, eps inside the sqrt
# for RMSprop and Adagrad), so convention="tf_fused" on an optimizer class is
# convention="keras"
for _table in OPTIMIZERS.values():
    _table["tf_fused"] = dict(_table["keras"])
del _table


def optimizer_defaults(optimizer: str, convention: str) -> dict:
    table = OPTIMIZERS[optimizer]
    if convention not in table:
        raise ValueError(f"{optimizer} has no {convention!r} convention; choose one of "
                         f"{', '.join(table)}")
    return dict(table[convention])

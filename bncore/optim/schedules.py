"""Learning-rate schedules as plain callables ``step -> lr`` (step counts from 0).

    sched = bncore.optim.cosine_lr(1e-3, total_steps=10_000, warmup_steps=500)
    for step in range(10_000):
        bncore.optim.set_lr(opt, sched(step))
        opt.step(grads)
"""
from __future__ import annotations

import math
from typing import Callable

from bncore import _checks as chk

__all__ = ["step_lr", "cosine_lr", "linear_warmup", "set_lr"]

Schedule = Callable[[int], float]


def _step_index(step) -> int:
    return chk.count("step", step, 0)


def step_lr(base_lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``base_lr * gamma ** (step // step_size)`` (PyTorch's StepLR)."""
    base_lr = chk.non_negative("base_lr", base_lr)
    step_size = chk.count("step_size", step_size, 1)
    gamma = chk.non_negative("gamma", gamma)

    def lr(step: int) -> float:
        k = _step_index(step) // step_size
        try:
            factor = gamma ** k
        except OverflowError:
            factor = math.inf
        if base_lr == 0:
            return base_lr                    # also where gamma ** k overflowed
        if gamma == 0 or 0.0 < factor < math.inf:
            return base_lr * factor           # torch's closed form, bit for bit
        # gamma ** k alone leaves float64 where the product need not (1e-300 *
        # 2 ** 1100): the product through logarithms, as torch's recursive
        # form multiplies its way there (relative error about k * 2^-53 * |ln gamma|)
        try:
            return math.exp(math.log(base_lr) + k * math.log(gamma))
        except OverflowError:
            return math.inf
    return lr


def linear_warmup(base_lr: float, warmup_steps: int, start_factor: float = 0.0,
                  after: Schedule = None) -> Schedule:
    """Linear ramp from ``start_factor * base_lr`` to ``base_lr`` over
    ``warmup_steps`` steps, then ``after(step - warmup_steps)`` (or base_lr)."""
    base_lr = chk.non_negative("base_lr", base_lr)
    start_factor = chk.in_unit_interval("start_factor", start_factor)
    w = chk.count("warmup_steps", warmup_steps, 0)
    if after is not None and not callable(after):
        raise TypeError(f"after must be a schedule (a callable step -> lr) or None, "
                        f"got {type(after).__name__}")

    def lr(step: int) -> float:
        s = _step_index(step)
        if s < w:
            return base_lr * (start_factor + (1.0 - start_factor) * s / w)
        return after(s - w) if after is not None else base_lr
    return lr


def cosine_lr(base_lr: float, total_steps: int, min_lr: float = 0.0,
              warmup_steps: int = 0) -> Schedule:
    """Cosine decay from base_lr to min_lr over total_steps (optionally after a
    linear warm-up from 0), then min_lr: ``min + (base - min) (1 + cos(pi t / T)) / 2``
    (torch's CosineAnnealingLR closed form; at t = 0 exactly base_lr, as torch's
    scheduler starts, where the formula can round one ulp above it)."""
    base_lr = chk.non_negative("base_lr", base_lr)
    min_lr = chk.non_negative("min_lr", min_lr)
    total_steps = chk.count("total_steps", total_steps, 1)
    warmup_steps = chk.count("warmup_steps", warmup_steps, 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps "
                         f"({total_steps}): the cosine decay needs at least one step")
    decay_steps = total_steps - warmup_steps
    lo, hi = min(base_lr, min_lr), max(base_lr, min_lr)

    def cosine(s: int) -> float:
        if s == 0:                 # base_lr exactly (the formula can round above it)
            return base_lr
        t = min(s, decay_steps)
        lr = min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t / decay_steps))
        # within [min_lr, base_lr] (or [base_lr, min_lr]): near t = 0 the formula
        # can round one ulp past base_lr, and the schedule would rise at step 1
        return min(max(lr, lo), hi)
    if warmup_steps:
        return linear_warmup(base_lr, warmup_steps, 0.0, after=cosine)
    return lambda step: cosine(_step_index(step))


def set_lr(optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group of ``optimizer``."""
    lr = chk.non_negative("lr", lr)
    for g in optimizer.param_groups:
        g["lr"] = lr

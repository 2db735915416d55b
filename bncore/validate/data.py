"""Inputs shared by the validators: drawn once in float32, then cast.

The float64 run of a check uses the float32 values cast to float64, so it
solves exactly the same problem, and bncore's float64 result is the exact
answer for the float32 inputs (to ~1e-15).

Offset data: every channel's mean is ``offset`` times its standard deviation.
The offset is itself a float32 number, so ``x - offset`` is exact in float32
(Sterbenz): the centred variant is the *same* data shifted, with the same
exact normalized output, which is what the cancellation diagnostic needs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

DT = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


def bn_data(shape, axis: int, offset: Optional[float] = None, centered: bool = False,
            seed: int = 0) -> Tuple[np.ndarray, dict]:
    """float32 x with per-channel means and spreads, plus per-channel parameters.

    Returns (x, extra) with extra = dict(weight, bias, running_mean, running_var,
    dy, condition): float32 (C,) vectors and a float32 cotangent like x.
    """
    rng = np.random.default_rng(seed)
    shape = tuple(shape)
    axis = axis % len(shape)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    std = rng.uniform(0.5, 2.0, C)
    if offset:
        mean = (std * offset * rng.choice((-1.0, 1.0), C)).astype(np.float32).astype(np.float64)
    else:
        mean = rng.normal(0.0, 1.0, C)
    z = rng.standard_normal(shape)
    x = (mean.reshape(bshape) + std.reshape(bshape) * z).astype(np.float32)
    if centered and offset:
        # exact in float32: x and mean have the same binade (Sterbenz)
        x = (x - mean.astype(np.float32).reshape(bshape)).astype(np.float32)
    red = tuple(i for i in range(len(shape)) if i != axis)
    x64 = x.astype(np.float64)
    cond = float(np.max(np.abs(x64.mean(axis=red)) / x64.std(axis=red)))
    extra = dict(
        weight=rng.normal(1.0, 0.3, C).astype(np.float32),
        bias=rng.normal(0.0, 0.3, C).astype(np.float32),
        running_mean=(mean - (mean if centered and offset else 0) + rng.normal(0, 0.1, C) * std)
        .astype(np.float32),
        running_var=(std ** 2 * rng.uniform(0.8, 1.25, C)).astype(np.float32),
        dy=rng.standard_normal(shape).astype(np.float32),
        condition=cond,
    )
    return x, extra


def bn_label(head: str, shape, tail: str, axis: int, offset: Optional[float],
             seed: int) -> Tuple[float, str]:
    """(condition, configuration text) of a batch-norm row: "head SHAPE tail",
    plus the data's largest |mean|/std when it is offset."""
    cond = bn_data(shape, axis, offset, False, seed)[1]["condition"]
    cfg = f"{head} {'x'.join(map(str, shape))}" + (f" {tail}" if tail else "")
    if offset:
        cfg += f", |mean|/std={cond:.0e}"
    return cond, cfg


#: channels-last layout names by ndim
NHWC_NAMES = {2: "NC", 3: "NLC", 4: "NHWC", 5: "NDHWC"}


def other_variance(preset, run_with) -> dict:
    """The alternative each batch-norm row shows beside its preset: {label:
    bncore's outputs under the other running-variance rule}, from
    run_with(dtype, unbiased_running_var) -> outputs."""
    other = not preset.unbiased_running_var
    return {f"{'unbiased' if other else 'biased'} running var":
            lambda dtype: run_with(dtype, other)}


def cast(a, dtype: str):
    return None if a is None else np.asarray(a).astype(DT[dtype])


SHAPES = [(7,), (3, 5), (2000,)]


def optim_data(steps: int, seed: int = 0, grad_scale: float = 0.3,
               shapes=SHAPES) -> Tuple[List[np.ndarray], List[List[np.ndarray]]]:
    """float32 parameters and one list of float32 gradients per step."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[(rng.standard_normal(s) * grad_scale + 0.05).astype(np.float32) for s in shapes]
             for _ in range(steps)]
    return params, grads


CLIP_SHAPES = [(10,), (4, 6), (3000,)]


def clip_grads(seed: int, scale: float, dtype: str) -> List[np.ndarray]:
    """Gradients for the clipping checks: standard normal times scale, drawn in
    float32 (so every dtype sees the same values), then cast to dtype."""
    rng = np.random.default_rng(seed)
    return [cast((rng.standard_normal(s) * scale).astype(np.float32), dtype)
            for s in CLIP_SHAPES]


def lr_schedule(lr0: float, steps: int) -> List[float]:
    """A changing learning rate, so schedule conventions show up. Binary
    fractions of a power of two, so frameworks that keep the learning rate in
    a float32 variable (Keras) hold it exactly, also in their float64 runs."""
    lr0 = 2.0 ** round(np.log2(lr0))
    return [lr0 * (1.0 - k / 16.0) for k in range(steps)]


def concat(arrays) -> np.ndarray:
    from bncore.validate.report import _np

    return np.concatenate([_np(a).reshape(-1) for a in arrays])

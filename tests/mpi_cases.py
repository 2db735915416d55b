"""Cases shared by the MPI worker (tests/mpi_worker.py, run under mpiexec) and
the pytest side (tests/test_distributed.py), so both build bitwise the same
global data: the worker computes on its rank's shard, pytest computes the
single-process answer on the whole batch and compares.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}

# Tolerances of the issue: normwise relative difference to single-process bncore.
TOL = {"float64": 1e-12, "float32": 1e-6}


def split(n: int, P: int, rule: str) -> List[int]:
    """Per-rank batch sizes adding up to n.

    equal: as equal as possible; unequal: rank r gets about (r+1)^2 parts,
    so sizes differ a lot; empty: rank 0 and, with 3+ ranks, rank 2 get
    nothing and rank 1 gets 1 value (when n allows), the rest the remainder.
    """
    if rule == "equal":
        return [n // P + (1 if r < n % P else 0) for r in range(P)]
    if rule == "unequal":
        w = np.array([(r + 1) ** 2 for r in range(P)], dtype=float)
        sizes = np.floor(n * w / w.sum()).astype(int)
        sizes[-1] += n - sizes.sum()
        return [int(s) for s in sizes]
    if rule == "empty":
        sizes = [0] * P
        sizes[1] = 1
        rest = n - 1
        live = [r for r in range(P) if r not in (0, 1, 2)] or [1]
        for i, r in enumerate(live):
            sizes[r] += rest // len(live) + (1 if i < rest % len(live) else 0)
        return sizes
    raise ValueError(rule)


# ---- batch norm ----------------------------------------------------------------

BN_CASES: Dict[str, dict] = {
    # name: global shape (batch axis 0), channel axis, dtype, split rule, mean offset
    "nchw_f64_equal": dict(shape=(12, 5, 6, 7), axis=1, dtype="float64", rule="equal", offset=2.0),
    "nchw_f32_equal": dict(shape=(12, 5, 6, 7), axis=1, dtype="float32", rule="equal", offset=2.0),
    "nchw_f64_unequal": dict(shape=(13, 4, 9, 5), axis=1, dtype="float64", rule="unequal", offset=100.0),
    "nchw_f32_unequal": dict(shape=(13, 4, 9, 5), axis=1, dtype="float32", rule="unequal", offset=100.0),
    "nchw_f64_empty": dict(shape=(11, 3, 8, 8), axis=1, dtype="float64", rule="empty", offset=1.0),
    "nchw_f32_empty": dict(shape=(11, 3, 8, 8), axis=1, dtype="float32", rule="empty", offset=1.0),
    "nhwc_f32_offset1e4": dict(shape=(10, 4, 4, 16), axis=-1, dtype="float32", rule="unequal",
                               offset=1e4),
    "nhwc_f64_empty": dict(shape=(9, 3, 5, 24), axis=3, dtype="float64", rule="empty", offset=5.0),
    "nc_f64_unequal": dict(shape=(40, 7), axis=1, dtype="float64", rule="unequal", offset=10.0),
    "ncdhw_f32_equal": dict(shape=(8, 3, 4, 5, 6), axis=1, dtype="float32", rule="equal", offset=3.0),
    # 3 values in total over up to 4 ranks: single ranks hold 0 or 1
    "tiny_f64": dict(shape=(3, 2, 1), axis=1, dtype="float64", rule="empty", offset=1.0),
}


def bn_data(name: str):
    """Global (x, dy, weight, bias, running_mean, running_var) of a case."""
    c = BN_CASES[name]
    rng = np.random.default_rng(_seed(name))
    shape, axis = c["shape"], c["axis"] % len(c["shape"])
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    mean = c["offset"] * rng.choice((-1.0, 1.0), C) * rng.uniform(0.5, 1.5, C)
    std = rng.uniform(0.5, 2.0, C)
    dt = DTYPES[c["dtype"]]
    x = (mean.reshape(bshape) + std.reshape(bshape) * rng.standard_normal(shape)).astype(dt)
    dy = rng.standard_normal(shape).astype(dt)
    w = rng.normal(1.0, 0.2, C).astype(dt)
    b = rng.normal(0.0, 0.2, C).astype(dt)
    rm = rng.normal(0.0, 1.0, C).astype(dt)
    rv = rng.uniform(0.5, 2.0, C).astype(dt)
    return x, dy, w, b, rm, rv


def _seed(name: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(name))


def shard(a: np.ndarray, sizes: List[int], rank: int) -> np.ndarray:
    start = sum(sizes[:rank])
    return a[start:start + sizes[rank]]


# ---- SyncBatchNorm layer ------------------------------------------------------------

LAYER = dict(C=6, shape=(14, 6, 5, 5), steps=3, rule="unequal")


def layer_data(step: int, dtype=np.float64):
    rng = np.random.default_rng(100 + step)
    x = (3.0 + 2.0 * rng.standard_normal(LAYER["shape"])).astype(dtype)
    dy = rng.standard_normal(LAYER["shape"]).astype(dtype)
    return x, dy


# ---- clipping ------------------------------------------------------------------------

CLIP_CASES: Dict[str, dict] = {
    # sizes of the global tensors; each tensor is split across ranks by `rule`
    "l2_f32": dict(sizes=(1000, 37, 0, 5000), dtype="float32", p=2.0, max_norm=1.0, eps=1e-6,
                   rule="unequal", scale=1.0),
    "l2_f64_exact": dict(sizes=(1000, 37, 4096), dtype="float64", p=2.0, max_norm=3.0, eps=0.0,
                         rule="equal", scale=1.0),
    "l1_f64": dict(sizes=(300, 3001), dtype="float64", p=1.0, max_norm=10.0, eps=1e-6,
                   rule="unequal", scale=1.0),
    "inf_f32": dict(sizes=(2000, 17), dtype="float32", p=float("inf"), max_norm=0.5, eps=1e-6,
                    rule="unequal", scale=1.0),
    "p3_f64": dict(sizes=(777, 1234), dtype="float64", p=3.0, max_norm=2.0, eps=1e-6,
                   rule="empty", scale=1.0),
    "no_clip_f64": dict(sizes=(100, 50), dtype="float64", p=2.0, max_norm=1e6, eps=1e-6,
                        rule="equal", scale=1.0),
    "empty_ranks_f32": dict(sizes=(9,), dtype="float32", p=2.0, max_norm=1.0, eps=1e-6,
                            rule="empty", scale=1.0),
    # every local float64 sum of squares overflows: the scaled path on every rank
    "overflow_local_f64": dict(sizes=(64, 64), dtype="float64", p=2.0, max_norm=1.0, eps=1e-6,
                               rule="equal", scale=1e200),
    # each rank's sum of squares is finite but their total overflows
    "overflow_global_f64": dict(sizes=(4,), dtype="float64", p=2.0, max_norm=1.0, eps=0.0,
                                rule="equal", scale=1.3e154, constant=True),
    "nan_f32": dict(sizes=(50, 60), dtype="float32", p=2.0, max_norm=1.0, eps=1e-6,
                    rule="equal", scale=1.0, nan=True),
}


def clip_data(name: str) -> List[np.ndarray]:
    c = CLIP_CASES[name]
    rng = np.random.default_rng(_seed(name))
    dt = DTYPES[c["dtype"]]
    out = []
    for n in c["sizes"]:
        g = np.ones(n) if c.get("constant") else rng.standard_normal(n)
        out.append((g * c["scale"]).astype(dt))
    if c.get("nan"):
        out[-1][-1] = np.nan
    return out


def clip_shard(grads: List[np.ndarray], P: int, rank: int, rule: str) -> List[np.ndarray]:
    """This rank's slices of every tensor (views: clipping writes through them);
    a rank whose slices are all empty gets an empty list."""
    mine = []
    for g in grads:
        sizes = split(g.size, P, rule)
        part = shard(g, sizes, rank)
        if part.size:
            mine.append(part)
    return mine


def clip_unshard(name: str, pieces: List[np.ndarray]) -> List[np.ndarray]:
    """The global tensors of a clip case rebuilt from every rank's flat
    concatenation of its slices (pieces[r]), in the order clip_shard cut them."""
    c = CLIP_CASES[name]
    P = len(pieces)
    out = [g.copy() for g in clip_data(name)]
    offsets = [0] * P
    for g in out:
        parts = []
        for r in range(P):
            mine = clip_shard([g], P, r, c["rule"])
            n = mine[0].size if mine else 0
            parts.append(pieces[r][offsets[r]:offsets[r] + n])
            offsets[r] += n
        g[...] = np.concatenate(parts)
    return out

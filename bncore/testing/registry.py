"""The op registry: one spec per public op, driving every generic check.

A spec says how to draw inputs for the op (from a small dict of named
parameters whose domains are listed in ``space``), how to call it on a
backend (CPU ``bncore`` or GPU ``bncore_gpu``), what the float64 oracle says
the outputs are, how far each output may be from the oracle, and how to
finite-difference it. The test-suite turns ``space`` into Hypothesis
strategies; ``bncore check`` walks a fixed sample of it. A test asserts that
every public function of bncore is covered by some spec (``covers``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bncore.testing import reference as ref

Params = Dict[str, Any]
Arrays = Dict[str, np.ndarray]


# --------------------------------------------------------------------------
# Backends

@dataclass(frozen=True)
class Backend:
    """An implementation of the bncore API and how to move arrays to it."""

    name: str
    module: Any
    to_device: Callable[[np.ndarray], Any]
    to_host: Callable[[Any], np.ndarray]


def cpu_backend() -> Backend:
    import bncore

    return Backend("cpu", bncore, lambda a: a, np.asarray)


def cpu_backend_with(**ops: Callable) -> Backend:
    """The CPU backend with the named ops replaced (the others bncore's): a
    deliberately broken implementation, to show that a check catches it."""
    import types

    import bncore

    class Module(types.SimpleNamespace):
        def __getattr__(self, name):          # (only for names not replaced)
            return getattr(bncore, name)

    return Backend("cpu", Module(**ops), lambda a: a, np.asarray)


def gpu_backend() -> Optional[Backend]:
    """The CUDA backend, or None when bncore_gpu cannot run here."""
    try:
        gpu = importlib.import_module("bncore_gpu")
        import cupy
    except (ImportError, RuntimeError):   # no CuPy, no device (CUDA errors are RuntimeErrors)
        # anything else (a bad BNCORE_GPU_CLUSTER value, a bug) is raised, so that
        # the GPU tests fail instead of skipping as if there were no GPU
        return None

    def to_device(a):
        return cupy.asarray(a) if isinstance(a, np.ndarray) else a

    def to_host(a):
        return cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else np.asarray(a)

    return Backend("gpu", gpu, to_device, to_host)


# --------------------------------------------------------------------------
# Specs

@dataclass(frozen=True)
class Case:
    """Inputs for one call: arrays (NumPy, in their drawn layout) and keywords."""

    params: Params
    arrays: Dict[str, Optional[np.ndarray]]
    kwargs: Dict[str, Any]

    def describe(self) -> str:
        keys = ("dtype", "layout", "values", "training")
        shape = self.params.get("shape")
        parts = [f"{k}={self.params[k]}" for k in keys if k in self.params]
        if shape is not None:
            parts.insert(0, f"shape={shape}")
        return ", ".join(parts)


@dataclass(frozen=True)
class OpSpec:
    name: str                                     # registry name (usually the function's)
    covers: Tuple[str, ...]                       # public names this spec exercises
    space: Dict[str, Sequence[Any]]               # parameter domains
    make_case: Callable[[Params], Case]
    call: Callable[[Backend, Case, Optional[int]], Arrays]
    oracle: Callable[[Case], Arrays]
    tolerance: Callable[[Case, str], float]       # normwise relative error allowed
    gradcheck: Optional[Callable[[Params], Any]] = None   # returns a GradcheckReport
    fd_space: Dict[str, Sequence[Any]] = field(default_factory=dict)
    gpu: bool = True                              # has a bncore_gpu twin
    # floor for the norm an output's error is relative to: where an output is
    # a difference of larger terms (cancellation), errors scale with the terms
    error_floor: Optional[Callable[[Case, str], float]] = None
    # expected values of outputs defined in terms of other outputs of the same
    # call, which are checked against the oracle on their own (e.g. the layer's
    # eval-mode y, computed from the running statistics it stored): evaluated on
    # the backend's outputs, so a rounding allowed in those is not counted twice
    dependent_oracle: Optional[Callable[[Case, Arrays], Arrays]] = None

    def default_params(self) -> Params:
        return {k: v[0] for k, v in self.space.items()}


REGISTRY: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def covered_names() -> set:
    names = set()
    for spec in REGISTRY.values():
        names.update(spec.covers)
    return names


def errors_against_oracle(spec: OpSpec, backend: Backend, case: Case,
                          num_threads: Optional[int] = None) -> Dict[str, Tuple[float, float]]:
    """{output: (normwise relative error, tolerance)} of one backend call."""
    got = spec.call(backend, case, num_threads)
    want = spec.oracle(case)
    if spec.dependent_oracle is not None:
        want.update(spec.dependent_oracle(case, got))
    out = {}
    for key, expected in want.items():
        if expected is None:
            continue
        floor = spec.error_floor(case, key) if spec.error_floor else 0.0
        out[key] = (ref.normwise_relative_error(got[key], expected, floor=max(floor, 1e-30)),
                    spec.tolerance(case, key))
    return out


def errors_between_backends(spec: OpSpec, case: Case, a: Arrays,
                            b: Arrays) -> Dict[str, Tuple[float, float]]:
    """{output: (normwise relative error, tolerance)} of backend b's outputs
    against backend a's, for one case. An output with a dependent oracle is
    measured instead against that oracle evaluated on b's own other outputs:
    two backends' float32 running statistics may round to neighbouring values,
    and the eval output is as sensitive to that as the data is offset, so
    comparing it across backends would measure that rounding. The error is
    relative to the same floor as against the oracle (spec.error_floor): an
    output that cancels, such as dx of a batch of two, where it is zero but
    for eps, is compared against the size of the terms that cancel."""
    out = {}
    exact = spec.dependent_oracle(case, b) if spec.dependent_oracle else {}
    for key in a:
        want = exact[key] if key in exact else a[key]
        floor = spec.error_floor(case, key) if spec.error_floor else 0.0
        out[key] = (ref.normwise_relative_error(b[key], want, floor=max(floor, 1e-30)),
                    spec.tolerance(case, key))
    return out


# --------------------------------------------------------------------------
# Drawing arrays

DTYPES = {"float16": np.float16, "float32": np.float32, "float64": np.float64}


def realize_layout(values: np.ndarray, layout: str, rng: np.random.Generator) -> np.ndarray:
    """The same logical values, stored in the named memory layout.

    c: C-contiguous; permuted: contiguous in a random axis order (e.g.
    channels-last memory behind an NCHW shape); fortran: column-major;
    strided: every other element of a larger buffer (needs a copy).
    """
    if layout == "c":
        return np.ascontiguousarray(values)
    if layout == "permuted":
        perm = tuple(rng.permutation(values.ndim))
        mem = np.ascontiguousarray(values.transpose(perm))
        return mem.transpose(np.argsort(perm))
    if layout == "fortran":
        return np.asfortranarray(values)
    if layout == "strided":
        ax = int(rng.integers(values.ndim))
        shape = list(values.shape)
        shape[ax] *= 2
        big = np.zeros(shape, dtype=values.dtype)
        index = [slice(None)] * values.ndim
        index[ax] = slice(None, None, 2)
        big[tuple(index)] = values
        return big[tuple(index)]
    raise ValueError(f"unknown layout {layout!r}")


def param_dtype(dtype: str):
    """Dtype of weights and running statistics for inputs of `dtype`."""
    return np.float64 if dtype == "float64" else np.float32


# --------------------------------------------------------------------------
# Batch normalization

#: size of the "large" cases (params["large"] = True) that thread-count checks
#: draw: large enough for the batch-norm kernels to run 4 threads (they give
#: one thread per 16384 elements, and just one below 32768: _threads_for), the
#: most that the checks ask for; at 40000 elements 3 and 4 threads ran as 2
LARGE_ELEMENTS = 4 * 16384


def threads_space(spec: "OpSpec") -> Dict[str, Sequence[Any]]:
    """The parameter space of thread-count checks: the op's own, with every case
    made large enough to be split between threads (a small one runs on one
    thread whatever num_threads says, and would compare nothing)."""
    return dict(spec.space, large=(True,))


BN_SPACE: Dict[str, Sequence[Any]] = {
    "seed": range(0, 2 ** 16),
    "ndim": (4, 2, 3, 5),
    "batch": (3, 1, 2, 5, 8),
    "channels": (3, 1, 2, 7, 16, 64),
    "axis": ("1", "-1", "any"),
    "layout": ("c", "permuted", "fortran", "strided"),
    "dtype": ("float32", "float64", "float16"),
    "values": ("normal", "offset", "near_constant"),
    "training": (True, False),
    "affine": (True, False),
    "running": (True, False),
}

# float16: bncore's float16 outputs are the float64 result rounded once, within
# 2^-11 = 4.9e-4 of it element by element (a 1e-3 systematic error passed 2e-3)
TOLERANCE = {"float64": 1e-12, "float32": 1e-6, "float16": 6e-4}
# the largest data condition (|mean| / std) a float64 tolerance scales with:
# 1e-15 * 1e8 = 1e-7, still a tenth of float32's bound (a channel of one value
# has std 0, and an unbounded condition made the float64 tolerance ~1e285)
CONDITION_CAP = 1e8


def _data_tolerance(case: "Case") -> float:
    """Allowed normwise error of an output in x's dtype.

    float64 results inherit the rounding of the float64 mean itself, about
    u * |mean| / std relative to the normalized output (u = 1.1e-16), so the
    bound grows with the data's condition (|mean|/std up to 1e5 here); the
    float32 and float16 bounds are their output rounding.
    """
    dtype = case.params["dtype"]
    if dtype == "float64":
        return max(TOLERANCE[dtype], 1e-15 * case.params.get("condition", 1.0))
    return TOLERANCE[dtype]


def _bn_shape(p: Params, rng: np.random.Generator) -> Tuple[Tuple[int, ...], int]:
    ndim, C = p["ndim"], p["channels"]
    spatial = [int(rng.choice((1, 2, 3, 5, 9))) for _ in range(ndim - 2)]
    others = [p["batch"]] + spatial
    if p.get("large"):
        # past the kernels' thread cutoffs (LARGE_ELEMENTS), so that a
        # thread-count check really runs every thread count it asks for
        need = -(-LARGE_ELEMENTS // (C * int(np.prod(others))))
        if need > 1:
            k = len(others) - 1 if ndim > 2 else 0     # grow the last non-channel axis
            others[k] *= need
    if p["axis"] == "1":
        axis = 1
    elif p["axis"] == "-1":
        axis = ndim - 1
    else:
        axis = int(rng.integers(ndim))
    shape = others[:axis] + [C] + others[axis:]
    return tuple(shape), axis


def _channel_values(p: Params, rng: np.random.Generator, shape, axis) -> np.ndarray:
    """float64 values with the drawn per-channel character."""
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    z = rng.standard_normal(shape)
    kind = p["values"]
    f16 = p["dtype"] == "float16"
    if kind == "normal":
        mean = rng.normal(0, 1, C)
        std = rng.uniform(0.5, 2.0, C)
    elif kind == "offset":
        # channel mean up to 1e5 times its standard deviation (1e2 in float16,
        # whose 11-bit significand cannot hold more)
        std = rng.uniform(0.5, 2.0, C) if not f16 else rng.uniform(1.0, 4.0, C)
        ratio = 10.0 ** rng.uniform(2, 2 if f16 else 5, C)
        mean = std * ratio * rng.choice((-1.0, 1.0), C)
    elif kind == "offset_mild":
        std = rng.uniform(0.5, 2.0, C)
        mean = std * 10.0 ** rng.uniform(1, 3, C) * rng.choice((-1.0, 1.0), C)
    elif kind == "near_constant":
        mean = rng.normal(0, 10, C)
        std = np.abs(mean) * 1e-6 + 1e-7 if not f16 else np.full(C, 1e-3)
    else:
        raise ValueError(kind)
    return mean.reshape(bshape) + std.reshape(bshape) * z


def make_bn_forward_case(p: Params) -> Case:
    p = dict(p)
    rng = np.random.default_rng(p["seed"])
    if not p["training"]:
        p["running"] = True
    shape, axis = _bn_shape(p, rng)
    if p["training"] and np.prod(shape) // shape[axis] < 2:
        shape = tuple(2 if (i != axis and s == 1) else s for i, s in enumerate(shape))
    p["shape"] = shape
    dt = DTYPES[p["dtype"]]
    pdt = param_dtype(p["dtype"])
    x = realize_layout(_channel_values(p, rng, shape, axis).astype(dt), p["layout"], rng)
    C = shape[axis]
    momentum = float(rng.choice((0.1, 0.01, 0.5, 1.0)))
    eps = float(rng.choice((1e-5, 1e-3)))
    # the condition the float64 tolerances scale with: |mean| / std of the data
    # as drawn (a batch of 2 can be far tighter than its intended spread); the
    # rounding of the mean, u |mean|, is an error of u * condition in y
    # (channels that do not vary are left out: in eval mode a channel of one
    # value meets a running mean equal to it, and x - mean is exactly 0)
    x64 = x.astype(np.float64)
    red = tuple(i for i in range(len(shape)) if i != axis)
    if x64.size:
        spread, centre = x64.std(axis=red), np.abs(x64.mean(axis=red))
        varies = spread > 0
        worst = float(np.max(centre[varies] / spread[varies])) if varies.any() else 1.0
        p["condition"] = min(worst, CONDITION_CAP)
    arrays: Dict[str, Optional[np.ndarray]] = {"x": x, "weight": None, "bias": None,
                                               "running_mean": None, "running_var": None}
    if p["affine"]:
        arrays["weight"] = rng.normal(1.0, 0.3, C).astype(pdt)
        arrays["bias"] = rng.normal(0.0, 0.3, C).astype(pdt)
    if p["running"]:
        xf = x.astype(np.float64)
        red = tuple(i for i in range(len(shape)) if i != axis)
        true_mean = xf.mean(axis=red)
        true_var = xf.var(axis=red)
        # running statistics near the data's, so inference mode is well conditioned
        arrays["running_mean"] = (true_mean + 0.1 * np.sqrt(true_var) * rng.standard_normal(C)).astype(pdt)
        arrays["running_var"] = (true_var * rng.uniform(0.8, 1.25, C) + 1e-3).astype(pdt)
    kwargs = dict(training=p["training"], momentum=momentum, eps=eps,
                  axis=axis if rng.integers(2) else axis - len(shape),
                  unbiased_running_var=bool(rng.integers(2)))
    return Case(p, arrays, kwargs)


def _uses_out(case: Case) -> int:
    """Whether a batch-norm call writes into arrays of its own (out=): 0 no, 1
    every output, 2 the first only; decided by the case's seed, so that the
    out= paths are checked on a quarter to a half of the draws."""
    return (0, 1, 0, 2)[int(case.params["seed"]) % 4]


def _bn_forward_call(backend: Backend, case: Case, num_threads: Optional[int]) -> Arrays:
    a = {k: (None if v is None else backend.to_device(v.copy() if k.startswith("running") else v))
         for k, v in case.arrays.items()}
    # (NaN-filled: an output not written shows, whatever memory it reused)
    target = (backend.to_device(np.full_like(case.arrays["x"], np.nan)) if _uses_out(case)
              else None)
    y, mean, invstd = backend.module.batch_norm_forward(
        a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
        num_threads=num_threads, out=target, **case.kwargs)
    # with out=, what is checked is what landed in out (y may be a view of it)
    out = {"y": backend.to_host(y if target is None else target), "mean": backend.to_host(mean),
           "invstd": backend.to_host(invstd)}
    if a["running_mean"] is not None:
        out["running_mean"] = backend.to_host(a["running_mean"])
        out["running_var"] = backend.to_host(a["running_var"])
    return out


def _bn_forward_oracle(case: Case) -> Arrays:
    a = case.arrays
    y, mean, invstd, rm, rv = ref.batch_norm_forward(
        a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"], **case.kwargs)
    out = {"y": y, "mean": mean, "invstd": invstd}
    if a["running_mean"] is not None:
        out["running_mean"] = rm
        out["running_var"] = rv
    return out


def _bn_tolerance(case: Case, key: str) -> float:
    dtype = case.params["dtype"]
    if key in ("mean", "invstd"):
        return 1e-12          # float64 outputs, from exact float64 sums
    if key.startswith("running"):
        return 1e-6 if param_dtype(dtype) == np.float32 else 1e-12
    return _data_tolerance(case)


def make_bn_backward_case(p: Params) -> Case:
    fwd = make_bn_forward_case(p)
    rng = np.random.default_rng(fwd.params["seed"] + 7919)
    a = fwd.arrays
    kw = fwd.kwargs
    x = a["x"]
    _, mean, invstd, _, _ = ref.batch_norm_forward(
        x, a["weight"], a["bias"], a["running_mean"], a["running_var"], **kw)
    dy = realize_layout(rng.standard_normal(x.shape).astype(x.dtype),
                        str(rng.choice(("c", "permuted", "fortran", "strided"))), rng)
    arrays = {"dy": dy, "x": x, "mean": mean, "invstd": invstd, "weight": a["weight"]}
    return Case(fwd.params, arrays, dict(training=kw["training"], axis=kw["axis"]))


def _bn_backward_call(backend: Backend, case: Case, num_threads: Optional[int]) -> Arrays:
    a = {k: (None if v is None else backend.to_device(v)) for k, v in case.arrays.items()}
    use = _uses_out(case)
    targets = (None, None, None)
    if use:
        C = case.arrays["x"].shape[case.kwargs["axis"]]
        targets = (backend.to_device(np.full_like(case.arrays["x"], np.nan)),
                   backend.to_device(np.full(C, np.nan)) if use == 1 else None,
                   backend.to_device(np.full(C, np.nan)) if use == 1 else None)
    dx, dw, db = backend.module.batch_norm_backward(
        a["dy"], a["x"], a["mean"], a["invstd"], a["weight"], num_threads=num_threads,
        out=targets if use else None, **case.kwargs)
    # with out=, what is checked is what landed in the given arrays
    dx, dw, db = (got if t is None else t for got, t in zip((dx, dw, db), targets))
    return {"dx": backend.to_host(dx), "dweight": backend.to_host(dw),
            "dbias": backend.to_host(db)}


def _bn_backward_oracle(case: Case) -> Arrays:
    a = case.arrays
    dx, dw, db = ref.batch_norm_backward(a["dy"], a["x"], a["mean"], a["invstd"],
                                         a["weight"], **case.kwargs)
    return {"dx": dx, "dweight": dw, "dbias": db}


def _bn_backward_tolerance(case: Case, key: str) -> float:
    if key == "dx":
        return _data_tolerance(case)
    # dweight / dbias: float64 sums rounded once to weight's dtype (x's without weight)
    w = case.arrays["weight"]
    out_dtype = np.dtype(w.dtype if w is not None else case.arrays["x"].dtype).name
    if out_dtype == "float64":
        return _data_tolerance(case)
    return TOLERANCE[out_dtype]


def _bn_backward_floor(case: Case, key: str) -> float:
    """Norms of the terms each gradient sums, for outputs that cancel.

    dx is dy less its projections: its error is measured against |w invstd dy|;
    dweight and dbias are sums of dy * xhat and dy, whose rounding scales with
    the sums of their absolute values."""
    a = case.arrays
    x = a["x"].astype(np.float64)
    dy = a["dy"].astype(np.float64)
    axis = case.kwargs["axis"] % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    red = tuple(i for i in range(x.ndim) if i != axis)
    invstd = np.asarray(a["invstd"], dtype=np.float64)
    if key in ("dx",):
        g = invstd if a["weight"] is None else invstd * a["weight"]
        return float(np.linalg.norm(dy * g.reshape(shape)))
    if key in ("dweight", "grad_weight"):
        xhat = (x - np.asarray(a["mean"], np.float64).reshape(shape)) * invstd.reshape(shape)
        return float(np.linalg.norm(np.abs(dy * xhat).sum(axis=red)))
    if key in ("dbias", "grad_bias"):
        return float(np.linalg.norm(np.abs(dy).sum(axis=red)))
    return 0.0



def _gradcheck_args(p: Params, case: "Case", settings) -> dict:
    """gradcheck's keyword arguments for the registry's batch-norm ops (inputs
    x, weight, bias): these defaults, each replaced by a caller's value
    (bncore gradcheck --rtol ...).

    * scales: x's directions have the smallest scale over which a channel's
      output varies, sqrt(var + eps) (its spread, not its offset; eps where
      the channel is nearly constant: there a step of the spread's size would
      be lost in y's own rounding, u |x| / sqrt(var + eps)).
    * f_accuracy: when x moves in training mode, the statistics of a channel
      whose mean is K times sqrt(var + eps) move at |mean|'s scale: y is
      accurate to about sqrt(K) roundings of its own size there (measured: x -
      mean is formed against the pivot; K roundings is the bound of a naive
      x - mean). Moving the weight or the bias leaves the statistics alone.
    * seed: not the case's own (the same stream drew the data, so the
      cotangents would be the data's draws shifted by one)."""
    from bncore.gradcheck import NOISE

    x = np.asarray(case.arrays["x"], dtype=np.float64)
    scale, K = 1.0, 1.0
    if x.size:
        red = tuple(i for i in range(x.ndim) if i != case.kwargs["axis"] % x.ndim)
        width = np.sqrt(x.var(axis=red) + case.kwargs["eps"])
        scale = float(np.min(width))
        if case.kwargs["training"]:            # (eval mode's statistics do not move)
            K = float(np.max(np.abs(x.mean(axis=red)) / width))
    out = dict(h=1e-5, rtol=1e-6, atol=0.0, scales=[scale, 1.0, 1.0],
               f_accuracy=[NOISE * np.sqrt(max(1.0, K)), NOISE, NOISE],
               seed=(int(p["seed"]) * 2654435761 + 97) % 2 ** 32)
    out.update({k: v for k, v in settings.items() if v is not None})
    return out


def bn_gradcheck(p: Params, backend: Optional[Backend] = None, mode: str = "random",
                 **settings):
    """Finite differences of batch_norm_forward against batch_norm_backward (float64)."""
    from bncore.gradcheck import gradcheck

    backend = backend or cpu_backend()
    p = dict(p, dtype="float64", layout="c", affine=True)
    case = make_bn_forward_case(p)
    a = case.arrays
    kw = case.kwargs
    rm, rv = a["running_mean"], a["running_var"]
    bn = backend.module

    def f(x, w, b):
        y, _, _ = bn.batch_norm_forward(
            backend.to_device(x), backend.to_device(w), backend.to_device(b),
            None if kw["training"] else backend.to_device(rm),
            None if kw["training"] else backend.to_device(rv),
            training=kw["training"], eps=kw["eps"], axis=kw["axis"])
        return backend.to_host(y)

    def vjp(u, x, w, b):
        xd = backend.to_device(x)
        _, mean, invstd = bn.batch_norm_forward(
            xd, backend.to_device(w), backend.to_device(b),
            None if kw["training"] else backend.to_device(rm),
            None if kw["training"] else backend.to_device(rv),
            training=kw["training"], eps=kw["eps"], axis=kw["axis"])
        dx, dw, db = bn.batch_norm_backward(backend.to_device(u), xd, mean, invstd,
                                            backend.to_device(w), training=kw["training"],
                                            axis=kw["axis"])
        return backend.to_host(dx), backend.to_host(dw), backend.to_host(db)

    return gradcheck(f, [a["x"], a["weight"], a["bias"]], vjp, mode=mode,
                     **_gradcheck_args(p, case, settings))


# finite differences on every kind of data, large offsets and near-constant
# channels included (DESIGN.md): gradcheck divides by the step actually taken,
# and the directions have the size over which y varies (_gradcheck_args)
BN_FD_SPACE = dict(BN_SPACE, values=("normal", "offset_mild", "offset", "near_constant"),
                   dtype=("float64",), layout=("c",), affine=(True,))

register(OpSpec(
    name="batch_norm_forward",
    covers=("batch_norm_forward",),
    space=BN_SPACE,
    make_case=make_bn_forward_case,
    call=_bn_forward_call,
    oracle=_bn_forward_oracle,
    tolerance=_bn_tolerance,
    gradcheck=bn_gradcheck,
    fd_space=BN_FD_SPACE,
))

register(OpSpec(
    name="batch_norm_backward",
    covers=("batch_norm_backward",),
    space=BN_SPACE,
    make_case=make_bn_backward_case,
    call=_bn_backward_call,
    oracle=_bn_backward_oracle,
    tolerance=_bn_backward_tolerance,
    error_floor=_bn_backward_floor,
    gradcheck=bn_gradcheck,
    fd_space=BN_FD_SPACE,
))


def _layer_call(backend: Backend, case: Case, num_threads: Optional[int]) -> Arrays:
    """A BatchNorm layer: training forward, backward, then inference forward."""
    a = case.arrays
    kw = case.kwargs
    x = a["x"]
    C = x.shape[kw["axis"]]
    layer = backend.module.BatchNorm(
        C, eps=kw["eps"], momentum=kw["momentum"], affine=a["weight"] is not None,
        track_running_stats=a["running_mean"] is not None, axis=kw["axis"],
        convention="torch" if kw["unbiased_running_var"] else "flax",
        dtype=param_dtype(case.params["dtype"]))
    state = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        if a[key] is not None:
            state[key] = backend.to_device(a[key])
    if a["running_mean"] is not None:
        state["num_batches_tracked"] = np.array(3, dtype=np.int64)
    layer.load_state_dict(state)
    xd = backend.to_device(x)
    y = layer.forward(xd, num_threads=num_threads)
    dy = backend.to_device(case.arrays["dy"])
    dx = layer.backward(dy, num_threads=num_threads)
    out = {"y": backend.to_host(y), "dx": backend.to_host(dx)}
    if a["weight"] is not None:
        out["grad_weight"] = backend.to_host(layer.grad_weight)
        out["grad_bias"] = backend.to_host(layer.grad_bias)
    if a["running_mean"] is not None:
        out["running_mean"] = backend.to_host(layer.running_mean)
        out["running_var"] = backend.to_host(layer.running_var)
        layer.eval()
        out["y_eval"] = backend.to_host(layer.forward(xd, num_threads=num_threads))
    return out


def make_layer_case(p: Params) -> Case:
    p = dict(p, training=True)
    case = make_bn_forward_case(p)
    rng = np.random.default_rng(case.params["seed"] + 104729)
    x = case.arrays["x"]
    arrays = dict(case.arrays, dy=rng.standard_normal(x.shape).astype(x.dtype))
    return Case(case.params, arrays, case.kwargs)


def _layer_oracle(case: Case) -> Arrays:
    a = case.arrays
    kw = dict(case.kwargs)
    y, mean, invstd, rm, rv = ref.batch_norm_forward(
        a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"], **kw)
    dx, dw, db = ref.batch_norm_backward(a["dy"], a["x"], mean, invstd, a["weight"],
                                         training=True, axis=kw["axis"])
    out = {"y": y, "dx": dx}
    if a["weight"] is not None:
        out["grad_weight"] = dw
        out["grad_bias"] = db
    if a["running_mean"] is not None:
        out["running_mean"] = rm
        out["running_var"] = rv      # y_eval: see _layer_eval_oracle
    return out


def _layer_eval_oracle(case: Case, got: Arrays) -> Arrays:
    """y_eval from the running statistics the layer stored (float32 for float32
    data; checked against the oracle's as outputs of their own). At |mean| = 1e6
    std one float32 ulp of running_mean moves y_eval by 1e-3, so comparing it
    with an eval pass over the oracle's own rounding of the statistics would
    measure that ulp, not the eval kernel."""
    if "y_eval" not in got:
        return {}
    a = case.arrays
    kw = dict(case.kwargs, training=False)
    return {"y_eval": ref.batch_norm_forward(a["x"], a["weight"], a["bias"],
                                             got["running_mean"], got["running_var"], **kw)[0]}


def _layer_tolerance(case: Case, key: str) -> float:
    if key in ("grad_weight", "grad_bias"):
        return _bn_backward_tolerance(case, "dweight")
    return _bn_tolerance(case, key)


def _layer_floor(case: Case, key: str) -> float:
    if key not in ("dx", "grad_weight", "grad_bias"):
        return 0.0
    a = case.arrays
    _, mean, invstd, _, _ = ref.batch_norm_forward(
        a["x"], a["weight"], a["bias"], a["running_mean"], a["running_var"], **case.kwargs)
    bwd = Case(case.params, {"dy": a["dy"], "x": a["x"], "mean": mean, "invstd": invstd,
                             "weight": a["weight"]}, {"axis": case.kwargs["axis"]})
    return _bn_backward_floor(bwd, key)


def layer_gradcheck(p: Params, backend: Optional[Backend] = None, mode: str = "random",
                    **settings):
    """Finite differences of BatchNorm.forward against BatchNorm.backward (float64),
    in training mode (batch statistics) or eval mode (running statistics)."""
    from bncore.gradcheck import gradcheck

    backend = backend or cpu_backend()
    p = dict(p, dtype="float64", layout="c", affine=True, running=True)
    case = make_bn_forward_case(p)
    a = case.arrays
    kw = case.kwargs
    C = a["x"].shape[kw["axis"]]

    def layer(w, b):
        bn = backend.module.BatchNorm(C, eps=kw["eps"], momentum=kw["momentum"],
                                      axis=kw["axis"], dtype=np.float64)
        bn.load_state_dict({"weight": backend.to_device(w), "bias": backend.to_device(b),
                            "running_mean": backend.to_device(a["running_mean"]),
                            "running_var": backend.to_device(a["running_var"]),
                            "num_batches_tracked": np.array(1, dtype=np.int64)})
        return bn.train(kw["training"])

    def f(x, w, b):
        return backend.to_host(layer(w, b).forward(backend.to_device(x)))

    def vjp(u, x, w, b):
        bn = layer(w, b)
        bn.forward(backend.to_device(x))
        dx = bn.backward(backend.to_device(u))
        return backend.to_host(dx), backend.to_host(bn.grad_weight), backend.to_host(bn.grad_bias)

    return gradcheck(f, [a["x"], a["weight"], a["bias"]], vjp, mode=mode,
                     **_gradcheck_args(p, case, settings))


register(OpSpec(
    name="BatchNorm",
    gradcheck=layer_gradcheck,
    fd_space=dict(BN_FD_SPACE, running=(True,)),
    error_floor=_layer_floor,
    covers=("BatchNorm",),
    space=dict(BN_SPACE, training=(True,)),
    make_case=make_layer_case,
    call=_layer_call,
    oracle=_layer_oracle,
    dependent_oracle=_layer_eval_oracle,
    tolerance=_layer_tolerance,
))


def sample_params(spec: OpSpec, rng: np.random.Generator, space: Optional[dict] = None) -> Params:
    """One random parameter draw from a spec's space (Hypothesis-free)."""
    space = space or spec.space
    out = {}
    for k, dom in space.items():
        dom = list(dom) if not isinstance(dom, range) else dom
        out[k] = dom[int(rng.integers(len(dom)))]
    return out


def all_specs() -> List[OpSpec]:
    return list(REGISTRY.values())


# the optimizer and clipping specs register themselves on import
from bncore.testing import optim_specs  # noqa: E402,F401

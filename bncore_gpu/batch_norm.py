"""Batch normalization on the GPU: the API and semantics of bncore.batch_norm,
on CuPy arrays, over the kernels of bncore_gpu/_bn_kernels.cu (the three-kernel
path) and bncore_gpu/_bn_cluster_kernels.cu (single-read, where they apply).

Formulas, conventions, errors and dtypes are those of the CPU functions (see
their docstrings). Differences: arrays must live on the device (CuPy, or
anything with ``__cuda_array_interface__`` / CUDA DLPack, zero-copy);
``num_threads`` is accepted and ignored; float16 is computed straight from
half-precision storage (float64 arithmetic inside the kernels). Results are
identical from run to run (reductions in a fixed order, no atomics) and agree
with the CPU engine to the float32 tolerance of the parity tests, not bit for
bit (the two use different summation trees).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Optional, Tuple

import cupy
import numpy as np

from bncore._bn_args import backward_args, forward_args
from bncore._torch_interop import bump_versions
from bncore._layout import channel_view
from bncore_gpu import _bn_args_fast as _fast
from bncore_gpu import _checks as chk
from bncore_gpu import _loader

__all__ = ["batch_norm_forward", "batch_norm_backward"]

FILE = "_bn_kernels.cu"
TARGET_BLOCKS = 1024          # work decomposition is a function of the shape only
ROWS_MIN_INNER = 32           # below this inner size the rows kernels are used
ROWS_BLOCKS_PER_SM = 8        # row blocks of the rows vec4 elementwise kernels, per SM
# ROWS_L2_REUSE: the three-kernel path's rows vec4 elementwise pass in training
# walks the tiles of the reduction before it, each from its last row to its
# first, with evict-first loads and stores, to start on data still in L2 (see
# bn_tile_rows in _bn_kernels.cu; the cooperative kernels always do). Off: on
# an H100 (2026-11-28, fourth session, run 3) it gave nothing on the one
# GPU-bound case, (128,256,28,28) channels-last: forward 0.137 ms both ways,
# backward 0.207 against 0.204 for the one-wave walk, first row to last. The
# host-bound shapes went both ways, by about 20% each ((256,1024) 0.087 / 0.081
# against 0.109 / 0.101; (32,64,56,56) channels-last backward 0.106 against
# 0.088), which a host-bound row's noise can do; one run cannot settle it.
ROWS_L2_REUSE = False
MAX_GRID_Y = 65535
MAX_GRID_X = 2 ** 31 - 1
_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
           np.dtype(np.float16): "unsigned short"}
_F64 = np.dtype(np.float64)


def _names():
    names = ["bn_stats_rows_vec4", "bn_dy_sums_rows_vec4", "bn_apply_rows_vec4",
             "bn_dx_rows_vec4"]
    for k in ("bn_stats_planes", "bn_apply_planes", "bn_dy_sums_planes", "bn_dx_planes"):
        names.append(f"{k}<float4>")       # float planes, 16-byte aligned, inner % 4 == 0
    for t in _CTYPES.values():
        for k in ("bn_stats_planes", "bn_stats_rows", "bn_apply_planes", "bn_apply_rows",
                  "bn_dy_sums_planes", "bn_dy_sums_rows", "bn_dx_planes", "bn_dx_rows"):
            names.append(f"{k}<{t}>")
        for pt in ("float", "double"):
            names.append(f"bn_finalize_train<{t}, {pt}>")
    names.append("bn_store_rounded<unsigned short>")
    for pt in ("float", "double"):
        names += [f"bn_prepare_eval<{pt}>", f"bn_finalize_backward<{pt}>",
                  f"bn_forward_rows_coop<{pt}>", f"bn_backward_rows_coop<{pt}>"]
    return tuple(names)


NAMES = _names()
NULL = np.uint64(0)           # a null pointer argument

# The single-read training forward and backward on thread-block clusters
# (compute capability 9.0+, float32 planes): see _bn_cluster_kernels.cu. On by
# default since their first run on hardware (H200, 2026-11-28: 1.2-2.3x faster
# than the three-kernel path, outputs within 1e-6 of it and of the CPU);
# BNCORE_GPU_CLUSTER=0 at import (or CLUSTER_KERNELS = False) keeps every call
# on the three-kernel path, as on devices without clusters.
CLUSTER_FILE = "_bn_cluster_kernels.cu"
CLUSTER_NAMES = tuple(f"bn_{k}_cluster<{t}>" for k in ("forward", "backward")
                      for t in ("float", "double"))
CLUSTER_SIZE = 8              # BNC_CLUSTER in the .cu file
CLUSTER_SMEM = 106496         # bytes of data one CTA may hold (two CTAs per H100 SM)
CLUSTER_STATIC_SMEM = 8192    # room left for the kernels' static shared memory (4112 B)
CLUSTER_MIN_BLOCKS_PER_SM = 2  # fewer CTAs (8 C) than this many per SM: three-kernel path


def _switch_setting(value: Optional[str], name: str = "BNCORE_GPU_CLUSTER") -> bool:
    """An on/off environment setting: unset, empty, "1", "true", "yes" or "on"
    -> True; "0", "false", "no" or "off" -> False; anything else is an error,
    not a guess."""
    v = (value or "").strip().lower() or "1"
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false, yes/no, on/off), got {value!r}")


CLUSTER_KERNELS = _switch_setting(os.environ.get("BNCORE_GPU_CLUSTER"))

# The training forward and backward of the float32 rows layout (channels-last,
# 2-D) in one cooperative launch each instead of three kernels
# (bn_forward_rows_coop and bn_backward_rows_coop in _bn_kernels.cu: the same
# tiles and sums, so bitwise the same results, tested on an H100 at a0b7712).
# Measured there (2026-11-28, fourth session, run 3), one launch against the
# three kernels with their default one-wave walk: (32,64,56,56) channels-last
# forward 0.068 against 0.114 ms, backward 0.068 against 0.088; (256,1024)
# 0.053 / 0.043 against 0.109 / 0.101; (128,256,28,28) channels-last 0.140 /
# 0.199 against 0.137 / 0.204. Slower in one case: data whose every channel
# needs the outlier-pivot second pass, 0.263 against 0.109 ms at (32,64,56,56)
# (not understood yet). Compute capability
# 9.x only, as the cluster kernels; BNCORE_GPU_ROWS_COOP=0 at import (or
# ROWS_COOP = False) keeps the three kernels.
ROWS_COOP = _switch_setting(os.environ.get("BNCORE_GPU_ROWS_COOP"), "BNCORE_GPU_ROWS_COOP")
_ATTR_COOPERATIVE_LAUNCH = 95  # cudaDevAttrCooperativeLaunch
_coop_blocks = {}             # (device, kernel name) -> blocks resident at once (0: none)
_coop_refused = set()         # devices that refused a cooperative launch: none from then on
# CUDA's answers that mean "no cooperative launch of this grid here" (a refusal,
# not a fault): CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, CUDA_ERROR_NOT_SUPPORTED
_COOP_REFUSALS = (720, 801)
# CUDA statuses that report a fault of a kernel already run (uncorrectable ECC
# error, illegal address, launch timeout, assert, hardware stack error, illegal
# instruction, misaligned address, invalid address space, invalid PC, launch
# failure): the context is unusable, so such an error at a launch is raised,
# never taken for the device refusing a kernel
_CUDA_FAULTS = (214, 700, 702, 710, 714, 715, 716, 717, 718, 719)
# the cooperative kernels' barrier words, per host thread: {(device, stream): word}
_barriers = threading.local()
_ATTR_OPTIN_SMEM = 97         # cudaDevAttrMaxSharedMemoryPerBlockOptin
_ATTR_CLUSTER_LAUNCH = 120    # cudaDevAttrClusterLaunch
_cluster_caps = {}            # device -> bytes a cluster CTA may hold (0: no clusters)
_cluster_ready = set()        # (device, kernel name) whose shared-memory cap is raised


def _kernel(name: str):
    return _loader.kernel(FILE, NAMES, name)


def _empty64(n: int):
    # separate allocations rather than rows of one: a row view of a CuPy
    # array costs the host more than an allocation from the memory pool
    return cupy.empty(n, _F64)


def _ptr(a):
    return NULL if a is None else a


def _vec64(v):
    """A per-channel vector as a C-contiguous float64 device array (or None)."""
    return _as_param(v, _F64)


_F32 = np.dtype(np.float32)
_F16 = np.dtype(np.float16)


def _param_dtype(*vectors) -> np.dtype:
    """The one dtype the kernels read weight, bias and running statistics in:
    float64 if any of them is float64 or float16 (float16 ones are written back
    rounded once, from float64: _store), else float32."""
    return _F64 if any(v is not None and v.dtype in (_F64, _F16) for v in vectors) else _F32


def _store(dst, src) -> None:
    """dst[...] = src, each value rounded once: float64 into float16 through
    bn_store_rounded (CuPy's cast rounds to float32 first), else CuPy's copy."""
    if dst.dtype == _F16 and src.dtype == _F64 and src.size:
        flat = src if src.flags.c_contiguous else cupy.ascontiguousarray(src)
        out = dst if dst.flags.c_contiguous else cupy.empty(dst.shape, _F16)
        n = flat.size
        _kernel("bn_store_rounded<unsigned short>")((min(-(-n // 256), 1024),), (256,),
                                                    (flat, out, np.int64(n)))
        if out is not dst:
            dst[...] = out
    else:
        dst[...] = src


def _as_param(v, pt):
    """v in dtype pt, C-contiguous: itself when it already is, else a copy
    (running statistics are then written back by the caller)."""
    # (v is 1-D: contiguous is one stride of one element, read without
    # building CuPy's flags object)
    if v is None or (v.dtype == pt and v.strides == (pt.itemsize,)):
        return v
    return cupy.ascontiguousarray(v, dtype=pt)


def _output_target(view, out, dtype):
    """Where a kernel writes: `out` itself when it has the view's layout, else a temporary."""
    return out if (out is not None and view.has_layout(out)) else view.empty(dtype, cupy)


def _finish_output(target, out):
    """The result: the target, copied into `out` first when it is a temporary."""
    if out is None or target is out:
        return target
    cupy.copyto(out, target)
    return out


def _vec4_ok(*arrays) -> bool:
    return all(a.dtype == _F32 and a.data.ptr % 16 == 0 for a in arrays)


def _planes_grid(C: int, outer: int) -> int:
    """Blocks per channel (grid y) of the planes reductions; the channels are
    grid x, so any channel count launches."""
    return max(1, min(outer, -(-TARGET_BLOCKS // C), MAX_GRID_Y))


def _row_blocks(outer: int, ncol: int) -> Tuple[int, int]:
    """(row blocks, rows per block) of the rows reductions with ncol column
    tiles: about TARGET_BLOCKS blocks in all, from the shape alone."""
    nrb = max(1, min(outer, -(-TARGET_BLOCKS // ncol), MAX_GRID_Y))
    R = -(-outer // nrb)
    return -(-outer // R), R


def _rows_vec4_tile(P: int, *arrays) -> int:
    """Float4 columns per block of the rows vec4 kernels (0: use the scalar ones):
    256, or P/4 when that divides 256; needs float32 and 16-byte alignment."""
    if P % 4 or not _vec4_ok(*arrays):
        return 0
    P4 = P // 4
    if P4 >= 256:
        return 256
    return P4 if 256 % P4 == 0 else 0


def _elementwise_blocks(nplanes: int) -> int:
    # 8 warps per block, one plane per warp at a time (grid-stride)
    return max(1, min(-(-nplanes // 8), _loader.sm_count() * 16))


def _partial_sums(kind: str, a, b, outer: int, C: int, inner: int, mean=None):
    """Per-channel partial sums, contiguous per channel; returns (s1, s2, M).

    kind "stats": sum (x - K) and sum (x - K)^2 of a (x);
    kind "dy": sum (a) and sum (a * (b - mean)) of a = dy, b = x."""
    ct = _CTYPES[a.dtype]
    if inner >= ROWS_MIN_INNER:
        G = _planes_grid(C, outer)
        s1, s2 = _empty64(C * G), _empty64(C * G)
        vec = inner % 4 == 0 and _vec4_ok(a, *(() if b is None else (b,)))
        grid, block = (C, G), (256,)
        inner_arg = np.int64(inner // 4 if vec else inner)
        if kind == "stats":
            name = f"bn_stats_planes<{'float4' if vec else ct}>"
            _kernel(name)(grid, block, (a, np.int64(outer), np.int32(C), inner_arg,
                                        np.int32(G), s1, s2))
        else:
            name = f"bn_dy_sums_planes<{'float4' if vec else ct}>"
            _kernel(name)(grid, block, (a, b, np.int64(outer), np.int32(C), inner_arg,
                                        np.int32(G), mean, s1, s2))
        return s1, s2, G
    P = C * inner
    TC = _rows_vec4_tile(P, a, *(() if b is None else (b,)))
    if TC:
        ntile = -(-(P // 4) // TC)
        nrb, R = _row_blocks(outer, ntile)
        s1, s2 = _empty64(P * nrb), _empty64(P * nrb)
        grid, block = (ntile, nrb), (256,)
        common = (np.int64(outer), np.int64(inner), np.int64(P // 4), np.int32(TC),
                  np.int64(R), np.int32(nrb))
        if kind == "stats":
            _kernel("bn_stats_rows_vec4")(grid, block, (a, *common, s1, s2))
        else:
            _kernel("bn_dy_sums_rows_vec4")(grid, block, (a, b, *common, mean, s1, s2))
        return s1, s2, inner * nrb
    ncol = -(-P // 32)
    nrb, R = _row_blocks(outer, ncol)
    s1, s2 = _empty64(P * nrb), _empty64(P * nrb)
    grid, block = (ncol, nrb), (32, 8)
    if kind == "stats":
        _kernel(f"bn_stats_rows<{ct}>")(grid, block, (a, np.int64(outer), np.int32(C),
                                                       np.int64(inner), np.int64(R),
                                                       np.int32(nrb), s1, s2))
    else:
        _kernel(f"bn_dy_sums_rows<{ct}>")(grid, block, (a, b, np.int64(outer), np.int32(C),
                                                         np.int64(inner), np.int64(R),
                                                         np.int32(nrb), mean, s1, s2))
    return s1, s2, inner * nrb


def _elementwise(kind: str, srcs, dst, outer: int, C: int, inner: int, consts,
                 after_reduction: bool = False) -> None:
    """kind "apply": dst = (x - mean) scale + shift; "dx": dst = g ((dy - a) - (x - mean) k).
    after_reduction: _partial_sums has just read these sources (training)."""
    ct = _CTYPES[dst.dtype]
    if inner >= ROWS_MIN_INNER:
        nplanes = outer * C
        vec = inner % 4 == 0 and _vec4_ok(dst, *srcs)
        grid, block = (_elementwise_blocks(nplanes),), (256,)
        inner_arg = np.int64(inner // 4 if vec else inner)
        name = f"bn_{'apply' if kind == 'apply' else 'dx'}_planes<{'float4' if vec else ct}>"
        _kernel(name)(grid, block, (*srcs, dst, np.int64(nplanes), np.int32(C), inner_arg,
                                    *consts))
        return
    P = C * inner
    TC = _rows_vec4_tile(P, dst, *srcs)
    if TC:
        ntile = -(-(P // 4) // TC)
        rpi = 256 // TC
        if after_reduction and ROWS_L2_REUSE:
            # the reduction's own tiles, each walked backwards (R > 0)
            rows_y, R = _row_blocks(outer, ntile)
        else:
            # one resident wave (8 blocks of 256 threads per SM), each thread
            # looping over rows with its channels' constants in registers. Timed
            # alone on an H200 (scripts/gpu_rows_grid.py), the channels-last
            # apply pass went from 29.6 to 16.9 us (32,64,56,56) and 66.9 to 56.5
            # us (128,256,28,28), dx from 40.2 to 26.9 and 96.8 to 85.3 us,
            # against the former cap of 8192 row blocks; on an H100 the whole
            # (128,256,28,28) call gained 2-4% (bench.py --gpu, 2026-11-28,
            # fourth session, run 1).
            rows_y, R = max(1, min(-(-outer // rpi), MAX_GRID_Y,
                                   max(1, ROWS_BLOCKS_PER_SM * _loader.sm_count() // ntile))), 0
        name = f"bn_{'apply' if kind == 'apply' else 'dx'}_rows_vec4"
        _kernel(name)((ntile, rows_y), (256,), (*srcs, dst, np.int64(outer), np.int64(P // 4),
                                                np.int64(inner), np.int32(TC), np.int64(R),
                                                *consts))
        return
    ncol = -(-P // 32)
    rows_y = max(1, min(-(-outer // 8), MAX_GRID_Y, max(1, 8192 // ncol)))
    name = f"bn_{'apply' if kind == 'apply' else 'dx'}_rows<{ct}>"
    _kernel(name)((ncol, rows_y), (32, 8), (*srcs, dst, np.int64(outer), np.int64(P),
                                            np.int64(inner), *consts))


def _hopper_with(dev: int, attribute: int) -> bool:
    """Whether device `dev` is a Hopper GPU (compute capability 9.x) that has
    `attribute` (cluster or cooperative launches). The single-launch kernels
    (cluster, cooperative) have run on Hoppers alone; later architectures
    have these launches too, but keep the three kernels until the kernels
    have been tested there."""
    return (90 <= int(cupy.cuda.Device(dev).compute_capability) < 100
            and bool(cupy.cuda.runtime.deviceGetAttribute(attribute, dev)))


def _cluster_cap() -> int:
    """Bytes of data one CTA of a cluster kernel may hold on this device: 0
    outside compute capability 9.x or without cluster launches, else
    CLUSTER_SMEM or less where the device allows less shared memory per block."""
    dev = cupy.cuda.runtime.getDevice()
    cap = _cluster_caps.get(dev)
    if cap is None:
        rt = cupy.cuda.runtime
        cap = 0
        if _hopper_with(dev, _ATTR_CLUSTER_LAUNCH):
            optin = int(rt.deviceGetAttribute(_ATTR_OPTIN_SMEM, dev))
            cap = max(0, min(CLUSTER_SMEM, optin - CLUSTER_STATIC_SMEM))
        _cluster_caps[dev] = cap
    return cap


def cluster_smem(outer: int, C: int, inner: int, held: int, *arrays) -> int:
    """Dynamic shared memory (bytes per CTA) of a cluster kernel that holds
    `held` arrays of the channel on chip (forward 1, backward 2), or 0 when
    the cluster path is off or does not apply: float32 `arrays` in planes
    (inner >= ROWS_MIN_INNER, inner % 4 == 0, 16-byte aligned), at most
    _cluster_cap() bytes per CTA, channels enough for CLUSTER_MIN_BLOCKS_PER_SM
    CTAs per SM, and few enough for one grid (x at most 2^31 - 1 CTAs: past it
    the launch would fail, and the failure take clusters off the device)."""
    if not CLUSTER_KERNELS or inner < ROWS_MIN_INNER or inner % 4 or not _vec4_ok(*arrays):
        return 0
    if CLUSTER_SIZE * C > MAX_GRID_X:
        return 0
    nbytes = held * -(-outer // CLUSTER_SIZE) * inner * 4
    if CLUSTER_SIZE * C < CLUSTER_MIN_BLOCKS_PER_SM * _loader.sm_count():
        return 0
    if nbytes > _cluster_cap():
        return 0
    return nbytes


def _launch_cluster(name: str, C: int, args, smem: int) -> bool:
    """Launch cluster kernel `name` over C channels; False (and the three-kernel
    path from then on, with a warning) when this device refuses it: a
    compile error or a launch-configuration error is raised at once, before
    anything is written."""
    dev = cupy.cuda.runtime.getDevice()
    try:
        fn = _loader.kernel(CLUSTER_FILE, CLUSTER_NAMES, name)
        if (dev, name) not in _cluster_ready:
            fn.max_dynamic_shared_size_bytes = _cluster_cap()    # above the 48 KiB default
            _cluster_ready.add((dev, name))
        fn((CLUSTER_SIZE * C,), (256,), args, shared_mem=smem)
        return True
    except Exception as exc:      # noqa: BLE001 - any refusal: fall back, say so once
        if getattr(exc, "status", None) in _CUDA_FAULTS:
            raise                 # an earlier kernel's fault, not a refusal
        _cluster_caps[dev] = 0
        warnings.warn(f"bncore_gpu: cluster kernel {name} unavailable on device {dev} "
                      f"({type(exc).__name__}: {exc}); using the three-kernel path",
                      RuntimeWarning, stacklevel=3)
        return False


def _coop_capacity(name: str) -> int:
    """Blocks of 256 threads of cooperative kernel `name` that this device holds
    at once (0: no cooperative path on this device: not compute capability
    9.x, no cooperative launches, or one refused already)."""
    dev = cupy.cuda.runtime.getDevice()
    if dev in _coop_refused:
        return 0
    n = _coop_blocks.get((dev, name))
    if n is None:
        n = 0
        if _hopper_with(dev, _ATTR_COOPERATIVE_LAUNCH):
            fn = _kernel(name).kernel
            n = _loader.sm_count() * int(
                cupy.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.ptr, 256, 0))
        _coop_blocks[(dev, name)] = n
    return n


def _barrier_word():
    """The grid barrier's word for the current device and stream, in this host
    thread. Kernels that share a word must run one after another: those of one
    stream do, but a stream handle does not name one stream in every thread
    (the per-thread default stream's handle is the same in all of them, each
    thread's stream running beside the others'), so each thread keeps its own
    words, and a thread's words go with it.

    None while the stream captures a CUDA graph: the caller then takes the
    three kernels, which keep no state between launches. A captured
    cooperative kernel would carry this stream's word into the graph, and the
    graph may be replayed on any stream, beside this one's own calls (and a
    new word's zeroing would only be recorded, not run)."""
    stream = cupy.cuda.get_current_stream()
    if _capturing(stream):
        return None
    words = getattr(_barriers, "words", None)
    if words is None:
        words = _barriers.words = {}
    key = (cupy.cuda.runtime.getDevice(), stream.ptr)
    w = words.get(key)
    if w is None:
        w = words[key] = cupy.zeros(1, np.uint32)
    return w


def _capturing(stream) -> bool:
    """Whether `stream` is capturing a CUDA graph (True also when CUDA cannot
    say, e.g. the legacy stream while another stream captures globally)."""
    try:
        return bool(stream.is_capturing())
    except Exception as exc:      # noqa: BLE001 - unknown: assume capture, take no risk
        if getattr(exc, "status", None) in _CUDA_FAULTS:
            raise                 # an earlier kernel's fault: say so, do not hide it
        return True


def _rows_coop(name: str, view, C: int, n: float, arrays, args, nconst: int) -> bool:
    """Run cooperative kernel `name` over the float4 rows tiles of `arrays`
    (its array arguments, in order; `args` its arguments between the shape
    and the work buffer), with a work buffer of the partial sums and `nconst`
    per-channel vectors. False where the cooperative path does not apply
    (ROWS_COOP off, planes layout, not float32 with 16-byte alignment, no
    cooperative launch on this device, a CUDA graph being captured) or the
    device refuses it."""
    outer, inner = view.outer, view.inner
    if not ROWS_COOP or inner >= ROWS_MIN_INNER:
        return False
    P = C * inner
    TC = _rows_vec4_tile(P, *arrays)
    cap = _coop_capacity(name) if TC else 0
    if not cap:
        return False
    word = _barrier_word()
    if word is None:
        return False
    ntile = -(-(P // 4) // TC)
    nrb, R = _row_blocks(outer, ntile)
    return _launch_coop(name, min(ntile * nrb, cap), (
        *arrays, np.int64(outer), np.int64(inner), np.int64(P // 4), np.int32(TC), np.int64(R),
        np.int32(nrb), np.int32(C), np.float64(n), *args, _empty64(2 * P * nrb + nconst * C),
        word))


def _launch_coop(name: str, blocks: int, args) -> bool:
    """Launch cooperative kernel `name`; False (and the three kernels from then
    on for every call on this device, with one warning) when the device
    refuses it. Any other error (a fault left by an earlier kernel, a bug in
    the arguments) propagates."""
    dev = cupy.cuda.runtime.getDevice()
    try:
        _kernel(name).kernel((blocks,), (256,), args, shared_mem=0,
                             enable_cooperative_groups=True)
        return True
    except RuntimeError as exc:   # CuPy's CUDA errors are RuntimeErrors with a status
        if getattr(exc, "status", None) not in _COOP_REFUSALS:
            raise
        _coop_refused.add(dev)
        warnings.warn(f"bncore_gpu: cooperative kernel {name} refused on device {dev} "
                      f"({type(exc).__name__}: {exc}); using three kernels",
                      RuntimeWarning, stacklevel=3)
        return False


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training: bool = True, momentum: float = 0.1, eps: float = 1e-5,
                       axis: int = 1, unbiased_running_var: bool = True, out=None,
                       num_threads: Optional[int] = None):
    """Batch-normalize `x` over every axis but `axis` (see bncore.batch_norm_forward).

    Returns ``(y, mean, invstd)``: y like x (same dtype and memory layout),
    mean and invstd float64 (C,) device arrays.
    """
    args = _fast.forward_args(x, weight, bias, running_mean, running_var, training, momentum,
                              eps, axis, out, num_threads) or forward_args(
        chk, x, weight, bias, running_mean, running_var, training, momentum, eps, axis, out,
        num_threads)
    given = (running_mean, running_var, out)   # the caller's objects (torch tensors?)
    # (torch inference tensors among the written arrays were refused inside
    # forward_args, as on the CPU: _checks.writeable)
    x, weight, bias, running_mean, running_var, training, momentum, eps, ax, C, n, out, _ = args
    unbiased_running_var = chk.flag("unbiased_running_var", unbiased_running_var)
    view = channel_view(x, ax)
    xk = view.arrange(x, cupy)
    target = _output_target(view, out, x.dtype)
    mean, invstd = _empty64(C), _empty64(C)
    if C:
        pt = _param_dtype(weight, bias, running_mean, running_var)
        w, b = _as_param(weight, pt), _as_param(bias, pt)
        rm, rv = _as_param(running_mean, pt), _as_param(running_var, pt)
        ptn = _CTYPES[pt]
        xf = view.flat(xk)
        yf = view.flat(target)
        smem = cluster_smem(view.outer, C, view.inner, 1, xf, yf) if training and x.size else 0
        clustered = bool(smem) and _launch_cluster(
            f"bn_forward_cluster<{ptn}>", C,
            (xf, yf, np.int64(view.outer), np.int32(C), np.int64(view.inner // 4),
             np.float64(n), np.float64(eps), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv),
             np.float64(momentum), np.int32(bool(unbiased_running_var)), mean, invstd), smem)
        one_kernel = clustered or (training and x.size > 0 and _rows_coop(
            f"bn_forward_rows_coop<{ptn}>", view, C, n, (xf, yf),
            (np.float64(eps), _ptr(w), _ptr(b), _ptr(rm), _ptr(rv), np.float64(momentum),
             np.int32(bool(unbiased_running_var)), mean, invstd), 2))
        if not one_kernel:        # (the one kernel wrote y, mean, invstd, running stats)
            scale, shift = _empty64(C), _empty64(C)
            if training:
                s1, s2, M = _partial_sums("stats", xf, None, view.outer, C, view.inner)
                _kernel(f"bn_finalize_train<{_CTYPES[xf.dtype]}, {ptn}>")(
                    (C,), (256,), (xf, np.int32(C), np.int64(view.inner),
                                   np.int64(view.outer), np.int32(M), s1, s2,
                                   np.float64(n), np.float64(eps), _ptr(w), _ptr(b), _ptr(rm),
                                   _ptr(rv), np.float64(momentum),
                                   np.int32(bool(unbiased_running_var)), mean, invstd, scale,
                                   shift))
            else:
                _kernel(f"bn_prepare_eval<{ptn}>")((-(-C // 256),), (256,),
                                                  (np.int32(C), rm, rv, np.float64(eps),
                                                   _ptr(w), _ptr(b), mean, invstd, scale,
                                                   shift))
        if training and rm is not running_mean:
            _store(running_mean, rm)
        if training and rv is not running_var:
            _store(running_var, rv)
        if x.size and not one_kernel:
            _elementwise("apply", (xf,), yf, view.outer, C, view.inner, (mean, scale, shift),
                         after_reduction=training)
    bump_versions(*(given if training else given[2:]))
    return _finish_output(target, out), mean, invstd


def _backward_kernels(dyf, xf, dxf, view, C, n, training, mean64, invstd64, w, dweight, dbias):
    """The three-kernel backward: partial sums, finalize, then the dx pass (in
    inference dx = g dy, which never reads x: the apply pass over dy with mean
    +0 and shift -0, g dy rounded once as on the CPU)."""
    a_part, b_part, M = _partial_sums("dy", dyf, xf, view.outer, C, view.inner, mean64)
    g, a, k = _empty64(C), _empty64(C), _empty64(C)
    _kernel(f"bn_finalize_backward<{_CTYPES[dweight.dtype]}>")(
        (C,), (256,), (np.int32(C), np.int32(M), a_part, b_part, np.float64(n),
                       np.int32(bool(training)), invstd64, _ptr(w), dweight, dbias,
                       g, a, k))
    if training:
        _elementwise("dx", (dyf, xf), dxf, view.outer, C, view.inner,
                     (mean64, g, a, k), after_reduction=True)
    else:
        a.fill(0.0)
        k.fill(-0.0)
        _elementwise("apply", (dyf,), dxf, view.outer, C, view.inner, (a, g, k))


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training: bool = True,
                        axis: int = 1, out=None, num_threads: Optional[int] = None):
    """Gradients of batch_norm_forward (see bncore.batch_norm_backward).

    Returns ``(dx, dweight, dbias)``; dweight and dbias in weight's dtype
    (x's when weight is None).
    """
    # (torch inference tensors among the outputs are refused inside
    # backward_args, where the CPU refuses its read-only views: _checks.writeable)
    args = _fast.backward_args(dy, x, mean, invstd, weight, training, axis, out,
                               num_threads) or backward_args(
        chk, dy, x, mean, invstd, weight, training, axis, out, num_threads)
    bump_versions(out)      # written below, once the arguments have passed (torch tensors?)
    dy, x, mean, invstd, weight, training, ax, C, n, dx_out, dw_out, db_out, _ = args
    view = channel_view(x, ax)
    xk = view.arrange(x, cupy)
    dyk = view.arrange(dy, cupy)
    target = _output_target(view, dx_out, x.dtype)
    # dweight and dbias come back in weight's dtype (x's without weight); the
    # kernel writes float32 or float64, other dtypes go through a cast
    pdtype = weight.dtype if weight is not None else x.dtype
    # float64 for float16 (rounded once when stored) and wherever an output of
    # another dtype asks for it (float64, or float16 rounded once from float64,
    # not through float32); else weight's own
    wide = any(o is not None and o.dtype != pdtype for o in (dw_out, db_out))
    kdtype = pdtype if pdtype in (_F32, _F64) and not wide else _F64
    # the kernels write every channel's dweight and dbias; only an empty x
    # leaves them at zero (and needs the memset that cupy.zeros launches)
    alloc = cupy.empty if x.size else cupy.zeros
    dweight, dbias = alloc(C, kdtype), alloc(C, kdtype)
    mean64, invstd64 = _vec64(mean), _vec64(invstd)
    if C and x.size:
        xf, dyf, dxf = view.flat(xk), view.flat(dyk), view.flat(target)
        w = _as_param(weight, kdtype)
        smem = cluster_smem(view.outer, C, view.inner, 2, dyf, xf, dxf)
        done = bool(smem) and _launch_cluster(
            f"bn_backward_cluster<{_CTYPES[kdtype]}>", C,
            (dyf, xf, dxf, np.int64(view.outer), np.int32(C), np.int64(view.inner // 4),
             np.float64(n), np.int32(bool(training)), mean64, invstd64, _ptr(w), dweight,
             dbias), smem)
        done = done or _rows_coop(
            f"bn_backward_rows_coop<{_CTYPES[kdtype]}>", view, C, n, (dyf, xf, dxf),
            (np.int32(bool(training)), mean64, invstd64, _ptr(w), dweight, dbias), 3)
        if not done:
            _backward_kernels(dyf, xf, dxf, view, C, n, training, mean64, invstd64, w,
                              dweight, dbias)
    dx = _finish_output(target, dx_out)
    return dx, _parameter_grad(dweight, dw_out, pdtype), _parameter_grad(dbias, db_out, pdtype)


def _parameter_grad(v, out, dtype):
    """A parameter gradient as computed (v) handed back: stored into `out` when
    given, else in `dtype`; each value rounded once (see _store)."""
    if out is None:
        if v.dtype == dtype:
            return v
        out = cupy.empty(v.shape, dtype)
    _store(out, v)
    return out

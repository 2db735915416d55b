"""Argument checking for bncore_gpu: the rules of bncore._checks, on CuPy arrays.

Scalar checks are bncore's own; only what touches arrays differs: device
arrays (CuPy, or anything with ``__cuda_array_interface__`` or a CUDA
``__dlpack__``, e.g. torch CUDA tensors) are taken zero-copy, host arrays are
refused (a silent host-to-device copy would hide its cost and break in-place
updates). CuPy arrays are always writeable; overlap is decided on the device
addresses themselves (CuPy's may_share_memory compares only arrays of one
allocation object), exactly as on the CPU: interleaved views that share no
element are apart.
"""
from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from bncore._checks import (  # noqa: F401  (re-exported: the same scalar rules)
    FLOAT_DTYPES, any_none, array_rules, flag, in_unit_interval, non_negative, normalize_axis,
    positive, real_scalar, refuse_misleading_export, same_shape, without_none)
from bncore._torch_interop import refuse_inference_writes


def _not_viewable(name: str, a: Any, via: str, exc: Exception) -> str:
    text = str(exc)
    if "require" in text and "grad" in text:
        hint = "pass tensor.detach(), which shares its memory"
    else:
        hint = "is it on the GPU? host arrays go to bncore"
    return f"{name}: cannot view {type(a).__name__} as a CuPy array through {via} ({text}); {hint}"


def is_device(a: Any) -> bool:
    """True for CuPy arrays and objects exposing CUDA memory (a torch CUDA
    tensor that requires grad counts: as_array then explains the fix)."""
    if isinstance(a, cupy.ndarray):
        return True
    try:
        return hasattr(a, "__cuda_array_interface__")
    except RuntimeError:
        return True


def as_array(name: str, a: Any) -> "cupy.ndarray":
    return _aligned(name, device_array(name, a))


def _aligned(name: str, a: "cupy.ndarray") -> "cupy.ndarray":
    """a, when its elements are aligned. A device array can start at any byte
    (a uint8 buffer viewed at an odd offset as float32), or step by a number
    of bytes that is not a multiple of its itemsize; the kernels' loads
    would then fault with a misaligned address, which leaves the CUDA context
    unusable. The CPU copies such an input and refuses such an output; here
    both are refused, before anything runs (an input could be copied, but
    the same array may be written in place elsewhere in the call)."""
    size = a.dtype.itemsize
    if a.size and (a.data.ptr % size
                   or any(s % size for s, d in zip(a.strides, a.shape) if d > 1)):
        raise ValueError(f"{name} is not aligned to its {size}-byte elements (device address "
                         f"{a.data.ptr:#x}, strides {a.strides}): pass an aligned copy "
                         f"({name or 'a'}.copy())")
    return a


def device_array(name: str, a: Any) -> "cupy.ndarray":
    """a as a CuPy array (zero-copy), alignment unchecked; as_array checks it."""
    if isinstance(a, cupy.ndarray):
        return a
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    if isinstance(a, np.ndarray) or np.isscalar(a) or isinstance(a, (list, tuple)):
        raise TypeError(f"{name} is a host array ({type(a).__name__}); bncore_gpu works on "
                        f"device arrays: move it with cupy.asarray() (or use bncore on the CPU)")
    refuse_misleading_export(name, a)
    try:
        # a torch CUDA tensor that requires grad raises here rather than
        # lacking the attribute, so hasattr alone would let that escape
        if hasattr(a, "__cuda_array_interface__"):
            return cupy.asarray(a)
    except RuntimeError as exc:
        raise TypeError(_not_viewable(name, a, "__cuda_array_interface__", exc)) from exc
    if hasattr(a, "__dlpack__"):
        try:
            return cupy.from_dlpack(a)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(_not_viewable(name, a, "DLPack", exc)) from exc
    raise TypeError(f"{name} must be a CuPy array (or a CUDA array), got {type(a).__name__}")


def writeable(name: str, a, source: Any = None) -> None:
    """CuPy arrays have no read-only flag: the object the array was made from
    is asked instead (a torch inference tensor, outside inference mode, must
    not be written), at the point where the CPU's flag check refuses it, so
    that both report the same argument first."""
    if source is not None:
        refuse_inference_writes(name, source)


# CuPy's own allocations: cudaMalloc, its memory pool, stream-ordered and
# managed memory. Two different ones never overlap. Memory CuPy did not
# allocate gets a new wrapper at every conversion (UnownedMemory through the
# CUDA array interface, DLPackMemory through DLPack: in some CuPy versions a
# subclass of Memory, hence the exact types), so two views of one torch
# tensor have different .mem objects that do overlap
_memory = getattr(getattr(cupy, "cuda", None), "memory", None)
_OWN_ALLOCATIONS = frozenset(
    c for c in (getattr(_memory, n, None)
                for n in ("Memory", "PooledMemory", "MemoryAsync", "ManagedMemory"))
    if isinstance(c, type))


def own_allocation(a: "cupy.ndarray"):
    """The CuPy allocation behind `a`, or None for memory CuPy did not allocate
    (which overlap tests must bound-check)."""
    mem = getattr(a.data, "mem", None)
    return mem if type(mem) in _OWN_ALLOCATIONS else None


class _Layout:
    """A device array's addresses and layout as NumPy's array interface: a
    host array made from it is never read, only its layout is compared."""

    def __init__(self, a: "cupy.ndarray"):
        self.__array_interface__ = {"data": (a.data.ptr, False), "shape": a.shape,
                                    "strides": a.strides, "typestr": a.dtype.str,
                                    "version": 3}


def _shares_memory(a: "cupy.ndarray", b: "cupy.ndarray") -> bool:
    """Whether a and b have an element's bytes in common, whatever allocation
    object they come through (cupy.may_share_memory answers False for two
    different .mem objects, so it never sees two imports of one torch tensor
    overlap; device addresses are unique in a process, so they compare
    directly): NumPy's exact test on the layouts, as the CPU package decides
    (columns of one buffer are apart). (An empty array may have a null address.)"""
    if a.size == 0 or b.size == 0:
        return False
    return bool(np.shares_memory(np.asarray(_Layout(a)), np.asarray(_Layout(b))))


def _pair(name_a, a, name_b, b) -> None:
    # an empty array shares no memory, even with itself (NumPy's rule, the CPU's)
    if a.size == 0 or b.size == 0:
        return
    # arrays from different CuPy allocations cannot overlap (cheap); views of
    # one allocation, and memory CuPy did not allocate, get the bounds test
    ma, mb = own_allocation(a), own_allocation(b)
    if a is not b and ma is not None and mb is not None and ma is not mb:
        return
    if a is b or _shares_memory(a, b):
        raise ValueError(f"{name_a} and {name_b} share memory; bncore does not "
                         f"write an output over an input or over another output")


float_array, channel_vector, no_overlap_among, output_array = array_rules(
    as_array, writeable, _pair)

"""Argument checking shared by every public function.

Every check runs before any array is modified, and every message names the
argument. ``TypeError`` is for a wrong kind of thing (not an array, not a
floating dtype); ``ValueError`` for a wrong value (shape, range, aliasing,
read-only output).
"""
from __future__ import annotations

import itertools
import math
import numbers
import operator
import re
from typing import Any, Optional, Sequence, Tuple

import numpy as np

# torch's side of arrays shared through DLPack (autograd versions, inference
# tensors): their own module, re-exported for the callers of these checks
from bncore._torch_interop import (READ_ONLY_HINT, bump_versions,  # noqa: F401
                                   inference_outside_mode, inference_tensors_refused,
                                   is_torch_tensor, refuse_inference_writes,
                                   refuse_misleading_export)

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def as_array(name: str, a: Any) -> np.ndarray:
    """`a` as a NumPy array without copying: ndarrays as they are, objects with
    ``__dlpack__`` (torch CPU tensors, JAX CPU arrays, anything implementing
    the DLPack protocol) zero-copy through ``np.from_dlpack``, anything else
    through ``np.asarray``.

    In-place updates (optimizer steps, clipping, running statistics) write
    through to the caller's tensor. A torch tensor that requires grad cannot be
    exported: pass ``t.detach()`` (same memory). JAX arrays arrive read-only:
    they can be inputs but not arrays that bncore updates in place. GPU
    tensors are for ``bncore_gpu`` (CuPy, torch CUDA tensors)."""
    if type(a) is np.ndarray:
        return a
    if isinstance(a, np.ma.MaskedArray):
        # its data would be read whole, the masked values included
        raise TypeError(f"{name} is a masked array; bncore does not apply masks: pass "
                        f"{name}.filled(value) or the selected values (compressed())")
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__dlpack__") and not isinstance(a, (list, tuple)):
        refuse_misleading_export(name, a)
        try:
            arr = np.from_dlpack(a)
        except (BufferError, TypeError, RuntimeError) as exc:
            text = str(exc)
            device = getattr(getattr(a, "device", None), "type", None)
            if "require" in text and "grad" in text:
                hint = "pass tensor.detach(), which shares its memory"
            elif "dtype" in text.lower():
                what = getattr(a, "dtype", None)
                hint = (f"NumPy has no {'such dtype (bfloat16?)' if what is None else what} "
                        f"dtype: convert it first, e.g. tensor.float()")
            elif "layout" in text:
                hint = "bncore takes dense (strided) tensors: pass tensor.to_dense()"
            elif device == "cpu":
                hint = "bncore takes dense real float tensors"
            else:
                hint = "is it on the CPU? GPU arrays go to bncore_gpu"
            raise TypeError(f"{name}: cannot view {type(a).__name__} as a NumPy array "
                            f"through DLPack ({text}); {hint}") from exc
        if inference_outside_mode(a):
            # readable, not writable: torch refuses in-place updates of an
            # inference tensor outside inference mode (the flag makes every
            # write path refuse it, naming the argument)
            arr = arr.view()
            arr.flags.writeable = False
        return arr
    if a is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:   # (a ragged nested list)
        raise TypeError(f"{name} cannot be read as an array: {exc}") from None


def viewable_in_place(a: Any) -> bool:
    """Whether converting `a` to an array views its memory (an array, a tensor
    shared through DLPack or the CUDA array interface, a buffer) rather than
    copying it (a list): an argument bncore writes must be one of these, or the
    update would go to a temporary. An ndarray is tested first:
    hasattr(__array_interface__) builds a dict (~1 us)."""
    if isinstance(a, np.ndarray):
        return True
    if isinstance(a, (list, tuple, np.generic)):
        return False              # (a NumPy scalar is immutable: np.asarray copies it)
    if (isinstance(a, memoryview) or hasattr(a, "__dlpack__")
            or hasattr(a, "__array_interface__") or hasattr(a, "__cuda_array_interface__")):
        return True
    try:                          # the buffer protocol (array.array, bytearray, mmap)
        memoryview(a).release()
    except TypeError:
        return False
    return True


def writeable(name: str, a: np.ndarray, source: Any = None) -> None:
    """Refuse a read-only array (`source`, the object it was made from, is for
    backends whose arrays carry no read-only flag: bncore_gpu)."""
    if not a.flags.writeable:
        raise ValueError(f"{name} is read-only; bncore writes it in place ({READ_ONLY_HINT})")


def same_shape(name: str, a: np.ndarray, shape: Sequence[int], ref: str) -> None:
    if a.shape != tuple(shape):
        raise ValueError(f"{name} has shape {a.shape}, expected {tuple(shape)} (as {ref})")


def _pair(name_a, a, name_b, b) -> None:
    if a is not b and a.base is None and b.base is None:
        return       # two distinct arrays that each own their buffer cannot overlap
    if np.may_share_memory(a, b) and np.shares_memory(a, b):
        raise ValueError(f"{name_a} and {name_b} share memory; bncore does not "
                         f"write an output over an input or over another output")


def first_overlap(starts, ends, writes) -> Optional[Tuple[int, int]]:
    """Among byte ranges [starts[k], ends[k]) (empty ones never overlap), each
    written or only read (writes[k]): the indices (i, j) of a pair that
    overlaps with at least one side written, or None. One sort and two
    running maxima (the furthest end so far, of any range and of written
    ones), vectorized: O(n log n) also when many read-only ranges overlap."""
    st, en = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
    w = np.asarray(writes, dtype=bool)
    live = np.nonzero(en > st)[0]
    if len(live) < 2:
        return None
    order = live[np.lexsort((en[live], st[live]))]
    st, en, w = st[order], en[order], w[order]
    prev_any = np.maximum.accumulate(en)[:-1]
    prev_w = np.maximum.accumulate(np.where(w, en, np.iinfo(np.int64).min))[:-1]
    bad = (st[1:] < prev_w) | (w[1:] & (st[1:] < prev_any))
    if not bad.any():
        return None
    j = int(np.argmax(bad)) + 1
    # its partner: an earlier range reaching past its start, written if it is not
    i = int(np.nonzero((en[:j] > st[j]) & (w[:j] | w[j]))[0][-1])
    return int(order[i]), int(order[j])


def refuse_overlap(labels, starts, ends, writes) -> None:
    """ValueError naming the first pair of first_overlap's (written ranges that
    overlap another range), labels[k] naming range k (``grads[3]``)."""
    pair = first_overlap(starts, ends, writes)
    if pair is not None:
        i, j = sorted(pair)
        raise ValueError(f"{labels[i]} and {labels[j]} share memory; every array of an "
                         f"in-place update must be distinct")


def any_none(items) -> bool:
    """Whether a list holds None (by identity: `None in arrays` would compare
    each array with None elementwise)."""
    return any(map(operator.is_, items, itertools.repeat(None)))


def without_none(name: str, items: list, check):
    """check(the items that are not None), its errors' ``name[k]`` indices
    counting over all of `items`: torch skips parameters whose .grad is None
    (clip_grad_norm_, clip_grad_value_, optimizers)."""
    if not any_none(items):
        return check(items)
    keep = [i for i, a in enumerate(items) if a is not None]
    try:
        return check([items[i] for i in keep])
    except (TypeError, ValueError) as exc:
        raise renumbered(exc, name, keep) from None


def renumbered(exc: Exception, names: str, idx: Sequence[int]) -> Exception:
    """exc again, its ``name[k]`` indices (name one of the '|'-separated
    `names`) replaced by idx[k]: a check run on a sub-list reports positions
    in the whole list."""
    text = re.sub(rf"\b({names})\[(\d+)\]",
                  lambda m: f"{m[1]}[{idx[int(m[2])] if int(m[2]) < len(idx) else m[2]}]",
                  str(exc))
    return type(exc)(text)


def host_copy_of_device_array(v: Any) -> Any:
    """A device array (CuPy, a CUDA torch tensor) as a NumPy array, anything else
    as it is: np.asarray refuses CuPy arrays, so a GPU state_dict could not be
    loaded into a CPU optimizer or layer."""
    if not hasattr(v, "__cuda_array_interface__"):
        return v
    if hasattr(v, "get"):                 # CuPy
        return v.get()
    if hasattr(v, "cpu"):                 # torch
        return v.detach().cpu().numpy()
    return v


def _value_of_0d(v: Any) -> Any:
    """A 0-d array or tensor as its value (as NumPy scalars are); anything else as it is."""
    if getattr(v, "shape", None) == () and hasattr(v, "item"):
        return v.item()
    return v


def flag(name: str, v: Any) -> bool:
    """An on/off argument: a bool (NumPy's, a 0-d array or tensor of one too) or
    the integers 0 and 1; anything else (a string, None, 0.5) is a TypeError,
    not a truth value ("False" is true)."""
    if type(v) is bool:
        return v
    v = _value_of_0d(v)
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    raise TypeError(f"{name} must be a bool, got {v!r}")


def to_float(v: numbers.Real) -> float:
    """float(v), and +-inf for an integer past float64's range (as IEEE rounds
    it; float() raises OverflowError)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def real_scalar(name: str, v: Any) -> float:
    if type(v) is float:
        # the usual case, without the numbers.Real ABC check (~0.3 us a
        # scalar, 7 scalars an adam_step); float subclasses take the long way
        if v != v:
            raise ValueError(f"{name} must not be NaN")
        return v
    v = _value_of_0d(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    f = to_float(v)
    if math.isnan(f):
        raise ValueError(f"{name} must not be NaN")
    return f


def positive(name: str, v: Any) -> float:
    f = real_scalar(name, v)
    if not (f > 0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return f


COUNT_MAX = 2 ** 63 - 1            # counts become int64 (step counters, num_batches_tracked)


def count(name: str, v: Any, minimum: int = 0) -> int:
    """An integer count >= minimum (a step count, a batch count, a schedule
    length): ints, integral floats, NumPy integers and 0-d arrays or tensors (a
    device step counter, torch's 0-d num_batches_tracked); bool, None, NaN,
    infinities, fractions and arrays of other shapes are refused, naming `name`."""
    shape = getattr(v, "shape", None)
    if shape is not None and hasattr(v, "item"):
        if tuple(shape) != ():
            raise ValueError(f"{name} must be a scalar, got shape {tuple(shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
    if isinstance(v, numbers.Integral):
        v = int(v)                # (math.isfinite of a huge int raises OverflowError)
    elif not math.isfinite(v) or int(v) != v:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {v!r}")
    if not minimum <= v <= COUNT_MAX:
        raise ValueError(f"{name} must be an integer >= {minimum} (and below 2**63), got {v!r}")
    return int(v)


def clip_bound(name: str, v: Any) -> float:
    """A clipping bound: a number >= 0, or inf (no clipping while the norm is
    finite, as in torch's ``clip_grad_norm_(params, float('inf'))``, the idiom
    for the norm alone; a non-finite norm gives inf / inf = NaN there too)."""
    f = real_scalar(name, v)
    if not f >= 0.0:
        raise ValueError(f"{name} must be a number >= 0 (or inf: no clipping), got {v!r}")
    return f


def in_unit_interval(name: str, v: Any, *, closed_right: bool = True) -> float:
    f = real_scalar(name, v)
    ok = 0.0 <= f <= 1.0 if closed_right else 0.0 <= f < 1.0
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {v!r}")
    return f


def non_negative(name: str, v: Any) -> float:
    f = real_scalar(name, v)
    if not (f >= 0.0 and math.isfinite(f)):
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return f


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(axis).__name__}")
    a = int(axis)
    if not -ndim <= a < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array with {ndim} dimensions")
    return a % ndim


def overlaps_itself(shape: Sequence[int], strides: Sequence[int], itemsize: int) -> bool:
    """Whether two elements of an array of this shape and these byte strides
    share memory (a broadcast view: a stride of 0; an as_strided view whose
    rows overlap). Strides sorted by size, each at least the extent of the
    smaller ones, prove the elements apart; otherwise the offsets are
    counted (exact; only such unusual views get there)."""
    dims = [(abs(int(st)), int(n)) for n, st in zip(shape, strides) if n != 1]
    if any(n == 0 for _, n in dims):
        return False
    extent = itemsize
    for st, n in sorted(dims):
        if st < extent:
            break
        extent += st * (n - 1)
    else:
        return False
    if any(st == 0 for st, _ in dims):
        return True
    offsets = np.zeros(1, dtype=np.int64)
    for st, n in dims:
        offsets = (offsets[:, None] + st * np.arange(n, dtype=np.int64)).ravel()
    offsets.sort()
    # elements of itemsize bytes at these offsets: apart when consecutive ones differ by itemsize or more
    return bool(np.any(np.diff(offsets) < itemsize))


def array_rules(as_array, writeable, pair):
    """float_array, channel_vector, no_overlap_among and output_array over a
    package's own as_array / writeable / pair-overlap test (NumPy here, CuPy in
    bncore_gpu): the rules are the same, only the arrays differ."""

    def output_array(name: str, a: Any):
        """An array bncore writes in place: an array or a tensor viewed through
        DLPack / the CUDA array interface. A list (or any other object) would
        be converted into a temporary copy and the result silently lost."""
        if not viewable_in_place(a):
            raise TypeError(f"{name} is written in place, so it must be an array (or a tensor "
                            f"shared through DLPack or the buffer protocol), got "
                            f"{type(a).__name__}")
        arr = as_array(name, a)
        writeable(name, arr, a)
        if not (arr.flags.c_contiguous or arr.flags.f_contiguous) and overlaps_itself(
                arr.shape, arr.strides, arr.itemsize):
            raise ValueError(f"{name} has elements that share memory (a broadcast or "
                             f"as_strided view): bncore writes every element of it, so "
                             f"pass an array whose elements are distinct")
        return arr

    def float_array(name: str, a: Any, dtypes=FLOAT_DTYPES):
        arr = as_array(name, a)
        if arr.dtype not in dtypes:
            allowed = ", ".join(str(d) for d in dtypes)
            native = arr.dtype.newbyteorder("=")
            if arr.dtype.byteorder not in "=|" and native in dtypes:
                raise TypeError(f"{name} has dtype {arr.dtype.str}, {native} in the opposite "
                                f"byte order; bncore reads native-endian arrays: pass "
                                f"{name}.astype({native.name!r})")
            raise TypeError(f"{name} must have dtype {allowed}; got {arr.dtype}")
        return arr

    def channel_vector(name: str, v: Optional[Any], channels: int, *, out: bool = False):
        """A per-channel parameter: None, or a floating 1-D array of length C."""
        if v is None:
            return None
        arr = float_array(name, output_array(name, v) if out else v)
        if arr.shape != (channels,):
            raise ValueError(f"{name} must have shape ({channels},) (one value per channel), "
                             f"got {arr.shape}")
        return arr

    def no_overlap_among(writes, reads) -> None:
        """Raise if an output overlaps an input or another output.

        `writes` and `reads` are lists of (name, array-or-None)."""
        live_w = [(n, a) for n, a in writes if a is not None]
        for i, (wn, w) in enumerate(live_w):
            for rn, r in reads:
                if r is not None:
                    pair(wn, w, rn, r)
            for wn2, w2 in live_w[i + 1:]:
                pair(wn, w, wn2, w2)

    return float_array, channel_vector, no_overlap_among, output_array


float_array, channel_vector, no_overlap_among, output_array = array_rules(as_array, writeable,
                                                                          _pair)

"""Lists of device arrays -> the pointer table of the multi-tensor kernels.

The GPU twin of ``bncore._optim_kernels.gather``: the same validation (list
lengths, dtypes, shapes, layouts, aliasing, all before anything runs), then a
table of long longs (see bncore_gpu/_optim_kernels.cu) uploaded to the device.
Uploaded tables are cached by content, so a training loop that passes the same
arrays every step uploads its table once and never waits on the host.
"""
from __future__ import annotations

import operator
import threading
import weakref
from collections import OrderedDict
from typing import List, Optional, Sequence

import cupy
import numpy as np

from bncore._checks import first_overlap
from bncore._torch_interop import refuse_inference_writes
from bncore_gpu import _checks as chk

CHUNK = 16384                 # must equal MT_CHUNK in _optim_kernels.cu
_CACHE_SIZE = 16
_cache: "OrderedDict[bytes, cupy.ndarray]" = OrderedDict()
# (the infos of a call's lists, its settings, device, stream) -> what its Table holds
_calls: "OrderedDict[tuple, tuple]" = OrderedDict()

_F16, _F32, _F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
CTYPES = {_F16: "unsigned short", _F32: "float", _F64: "double"}


class Table:
    """A validated multi-tensor call: device table, counts, dtypes, the arrays."""

    __slots__ = ("device", "nops", "n", "nchunks", "pdtype", "gdtype", "arrays", "ptrs",
                 "writes")

    def __init__(self, device, nops, n, nchunks, pdtype, gdtype, arrays, ptrs, writes=()):
        self.writes = tuple(writes)
        self.device = device
        self.nops = nops
        self.n = n
        self.nchunks = nchunks
        self.pdtype = pdtype
        self.gdtype = gdtype
        self.arrays = arrays
        self.ptrs = ptrs

    def aligned16(self, nops: int) -> bool:
        """Every tensor of the first `nops` operands starts on a 16-byte boundary."""
        return bool(all((p % 16 == 0).all() for p in self.ptrs[:nops]))

    def args(self):
        return (self.device, np.int32(self.nops), np.int32(self.n), np.int64(self.nchunks))

    def written(self) -> list:
        """The caller's objects of the written operands (for bump_versions)."""
        return [a for w, lst in zip(self.writes, self.arrays) if w and lst for a in lst]


# the caches' bookkeeping (look-up, recency, eviction) under one lock: between
# one thread's get and its move_to_end another thread may evict the key
_lock = threading.Lock()


def _lru(cache: OrderedDict, limit: int, key, make):
    """cache[key], made by make() on a miss (outside the lock; another thread's
    entry made meanwhile wins); the least recently used entry beyond `limit`
    is dropped."""
    with _lock:
        value = cache.get(key)
        if value is not None:
            cache.move_to_end(key)
            return value
    value = make()
    with _lock:
        value = cache.setdefault(key, value)
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)
    return value


# cudaStreamPerThread: the handle of every thread's own default stream
_PER_THREAD_STREAM = getattr(getattr(cupy.cuda, "runtime", None), "streamPerThread", 2)


def _stream_key() -> tuple:
    """The current stream, as the table caches key it: its handle, and the
    thread under the per-thread default stream (one handle, but each thread's
    stream runs beside the others', so a table uploaded on one thread's must
    not serve another's)."""
    ptr = cupy.cuda.get_current_stream().ptr
    return (ptr, threading.get_ident() if ptr == _PER_THREAD_STREAM else 0)


def _upload(host: np.ndarray) -> "cupy.ndarray":
    # per device and per stream: a table dropped from the cache goes back to the
    # memory pool of the stream it was made on, which may reuse it at once; a
    # kernel of another stream still reading it would read whatever came next
    key = (host.tobytes(), cupy.cuda.Device().id, _stream_key())
    return _lru(_cache, _CACHE_SIZE, key, lambda: cupy.asarray(host))


class _ListInfo:
    """What the table needs from one list of arrays, computed once per list.

    Holds weak references to the caller's objects, never the arrays: a cache
    entry must not keep a dropped gradient list alive on the device (a
    training loop makes new gradients every step), and a live object must
    still be the one the entry describes (see _info)."""

    __slots__ = ("refs", "foreign", "dtype", "ptrs", "nbytes", "sizes", "shapes", "c_order")

    def __init__(self, name: str, lst: list, grad: bool):
        arrays = [chk.as_array(f"{name}[{i}]", a) for i, a in enumerate(lst)]
        self.dtype = arrays[0].dtype if arrays else None
        for i, a in enumerate(arrays):
            if a.dtype != self.dtype:
                raise TypeError(f"{name}[{i}] has dtype {a.dtype}, but {name}[0] has "
                                f"{self.dtype}: one dtype per list")
            if not _dense(a):
                raise ValueError(f"{name}[{i}] is not contiguous: it does not fill one block "
                                 f"of memory (a strided view with gaps, or negative strides); "
                                 f"bncore takes arrays in any axis order that does (C, "
                                 f"Fortran, channels-last), and updates them in place, so a "
                                 f"written one cannot be a copy")
        self.ptrs = np.array([a.data.ptr for a in arrays], dtype=np.int64)
        self.nbytes = np.array([a.nbytes for a in arrays], dtype=np.int64)
        self.sizes = np.array([a.size for a in arrays], dtype=np.int64)
        self.shapes = [a.shape for a in arrays]
        # flat element order: each axis's stride in elements (axes longer than 1)
        self.c_order = [_layout(a) for a in arrays]
        # objects that are not CuPy arrays (torch tensors, ...) can change their
        # storage in place (p.data = ..., p.t_(), module.to(...)): their
        # address, shape, strides and dtype are re-checked on each hit
        self.foreign = [(i, _storage(a)) for i, a in enumerate(lst)
                        if not isinstance(a, cupy.ndarray)]
        try:
            self.refs = tuple(weakref.ref(a) for a in lst)
        except TypeError:                  # an object without weak references:
            self.refs = None               # checked every call, never cached

    def describes(self, lst: list) -> bool:
        """Whether this entry still describes `lst` (same live objects, same storage)."""
        # the same live objects, still of the shapes checked (a CuPy array's
        # shape can be set in place: p.shape = (2, 3)); map over C-level
        # callables, since this runs on every list of every step
        alive = list(map(_CALL, self.refs))
        if not all(map(operator.is_, alive, lst)) or list(map(_SHAPE, lst)) != self.shapes:
            return False
        return all(_storage(lst[i]) == storage for i, storage in self.foreign)


def _dense(a) -> bool:
    """Whether a's elements fill one block of memory from its data pointer
    (positive strides, no gaps), in any axis order: the kernels walk it flat
    (the CPU's _optim_kernels._dense)."""
    if a.flags.c_contiguous or a.flags.f_contiguous or a.size == 0:
        return True
    axes = sorted((st, n) for st, n in zip(a.strides, a.shape) if n > 1)
    want = a.itemsize
    for st, n in axes:
        if st != want:
            return False
        want *= n
    return True


def _layout(a) -> tuple:
    """The element strides of a's axes longer than 1 (0 for the others): equal
    for two dense arrays of one shape exactly when their flat orders agree."""
    if a.size <= 1:            # no order to pair (the CPU compares sizes > 1 only)
        return ()
    return tuple(st // a.itemsize if n > 1 else 0 for st, n in zip(a.strides, a.shape))


def _storage(a) -> tuple:
    """A non-CuPy array's storage as it is now: (address, shape, strides, dtype),
    from torch's accessors where it has them (no conversion per call), else
    from its CuPy view (device_array: a changed storage only means a cache
    miss, and the rebuilt entry checks and names the array)."""
    if hasattr(a, "data_ptr") and hasattr(a, "stride"):
        return a.data_ptr(), tuple(a.shape), tuple(a.stride()), a.dtype
    v = chk.device_array("", a)
    return v.data.ptr, v.shape, v.strides, v.dtype


_SHAPE = operator.attrgetter("shape")
_CALL = getattr(operator, "call", None) or (lambda r: r())   # operator.call: Python 3.11+

_lists: "OrderedDict[tuple, _ListInfo]" = OrderedDict()
_LIST_CACHE = 64


def _info(name: str, lst: list, grad: bool) -> _ListInfo:
    """Per-list validation, cached by the identity of its objects: an
    optimizer's parameter and state lists are checked once, not every step.
    An id can be reused once its object is gone, so a hit counts only when the
    entry's weak references still point at these very objects, with the same
    storage (torch tensors can swap theirs)."""
    # the key names the list cheaply (a hit is then checked element by element
    # by describes; two lists under one key only cost a rebuild)
    key = (name, len(lst), id(lst[0]), id(lst[-1])) if lst else (name, 0)
    with _lock:
        info = _lists.get(key)
    if info is not None and info.describes(lst):
        with _lock:
            if key in _lists:
                _lists.move_to_end(key)
        return info
    info = _ListInfo(name, lst, grad)
    if info.refs is not None:
        with _lock:
            _lists[key] = info
            _lists.move_to_end(key)
            while len(_lists) > _LIST_CACHE:
                _lists.popitem(last=False)
    return info


def clear_caches() -> None:
    """Forget cached validations and uploaded tables."""
    with _lock:
        _lists.clear()
        _cache.clear()
        _calls.clear()


def gather(lists: List[Optional[list]], names: Sequence[str], writes: Sequence[bool],
           grad_op: int, half_first: bool = False) -> Table:
    """Validate and tabulate; lists[k] None means operand k is absent (null pointers)."""
    n = len(lists[0])
    for k, lst in enumerate(lists):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{names[k]} has {len(lst)} entries but {names[0]} has {n}")
    if n == 0:
        # nothing to update, as on the CPU (a rank may hold no gradients at all);
        # callers launch nothing when nchunks == 0
        empty = np.zeros(0, dtype=np.int64)
        return Table(np.uint64(0), len(lists), 0, 0, _F32, _F32,
                     [None if lst is None else [] for lst in lists], [empty] * len(lists), writes)
    for k, lst in enumerate(lists):
        if writes[k] and lst is not None:
            # (a CuPy view of a torch inference tensor cannot say it is read-only)
            refuse_inference_writes(names[k], lst)
    infos = [None if lst is None else _info(names[k], lst, k == grad_op)
             for k, lst in enumerate(lists)]
    arrays = [None if lst is None else list(lst) for lst in lists]
    # a call on lists already checked together (the same cached infos: an
    # info is remade whenever its list changed) has the same table: the
    # checks below and the upload are skipped (an optimizer's every step)
    key = (tuple(infos), tuple(writes), grad_op, half_first, cupy.cuda.Device().id,
           _stream_key())
    # (a list of objects without weak references is checked every call, never cached)
    cacheable = all(i is None or i.refs is not None for i in infos)
    hit = None
    if cacheable:
        with _lock:
            hit = _calls.get(key)
            if hit is not None:
                _calls.move_to_end(key)
    if hit is not None:
        device, nchunks, pdtype, gdtype, ptrs = hit
        return Table(device, len(infos), n, nchunks, pdtype, gdtype, arrays, ptrs, writes)
    params = infos[0]
    pdtype = params.dtype
    if pdtype not in (_F32, _F64) and not (half_first and pdtype == _F16):
        raise TypeError(f"{names[0]}[0] must be float32 or float64"
                        f"{' or float16' if half_first else ''}, got {pdtype}")
    gdtype = pdtype
    for k, info in enumerate(infos):
        if info is None or k == 0:
            continue
        if k == grad_op:
            gdtype = info.dtype
            if gdtype != pdtype and not (gdtype == _F16 and pdtype == _F32):
                raise TypeError(f"{names[k]}[0] has dtype {gdtype}; gradients must have the "
                                f"parameters' dtype ({pdtype}) or float16 with float32")
        elif info.dtype != pdtype:
            raise TypeError(f"{names[k]}[0] has dtype {info.dtype}, expected {pdtype} "
                            f"(as {names[0]}[0])")
        if info.shapes != params.shapes:
            i = next(i for i, (a, b) in enumerate(zip(info.shapes, params.shapes)) if a != b)
            raise ValueError(f"{names[k]}[{i}] has shape {info.shapes[i]}, but {names[0]}[{i}] "
                             f"has shape {params.shapes[i]}")
        if info.c_order != params.c_order:
            i = next(i for i, (a, b) in enumerate(zip(info.c_order, params.c_order)) if a != b)
            raise ValueError(f"{names[k]}[{i}] is stored in a different order (C, Fortran, "
                             f"channels-last) from {names[0]}[{i}]: the update pairs their "
                             f"elements in memory order")
    _check_aliasing(infos, names, writes)

    sizes = params.sizes
    nch = (sizes + CHUNK - 1) // CHUNK
    nchunks = int(nch.sum())
    tensor = np.repeat(np.arange(n, dtype=np.int64), nch)
    first = np.repeat(np.cumsum(nch) - nch, nch)
    offset = (np.arange(nchunks, dtype=np.int64) - first) * CHUNK
    zeros = np.zeros(n, dtype=np.int64)
    ptrs = [zeros if info is None else info.ptrs for info in infos]
    host = np.concatenate(ptrs + [sizes, np.stack([tensor, offset], axis=1).reshape(-1)])
    device = _upload(host)
    if cacheable:
        _lru(_calls, _CACHE_SIZE, key, lambda: (device, nchunks, pdtype, gdtype, ptrs))
    return Table(device, len(infos), n, nchunks, pdtype, gdtype, arrays, ptrs, writes)


def _check_aliasing(infos, names, writes) -> None:
    """No written array may overlap any other array of the call (bncore's
    _checks.first_overlap over every array's byte range)."""
    starts, ends, ops, idx = [], [], [], []
    for k, info in enumerate(infos):
        if info is None:
            continue
        starts.append(info.ptrs)
        ends.append(info.ptrs + info.nbytes)
        ops.append(np.full(len(info.ptrs), k))
        idx.append(np.arange(len(info.ptrs)))
    if not starts:
        return
    op, ix = np.concatenate(ops), np.concatenate(idx)
    pair = first_overlap(np.concatenate(starts), np.concatenate(ends),
                         np.asarray([bool(w) for w in writes])[op])
    if pair is not None:
        i, j = pair
        raise ValueError(f"{names[op[i]]}[{ix[i]}] and {names[op[j]]}[{ix[j]}] share "
                         f"memory; every array of an in-place update must be distinct")

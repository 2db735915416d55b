"""The (outer, C, inner) view of an array around its channel axis.

Per-channel statistics do not depend on the order of the other axes, so any
array that is C-contiguous after *some* permutation of its axes can be
processed in place: order the axes by decreasing stride, and the axes before
the channel axis in that order form `outer`, those after it form `inner`. This
covers NCHW, NHWC, PyTorch's channels_last (an NCHW-shaped view of NHWC
memory), Fortran-ordered and transposed arrays without a copy. Anything else
(slices with steps, broadcast views) is copied once to C order.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from bncore._bn_kernels import placed_empty


class ChannelView:
    """How a (logical) array maps onto a contiguous (outer, C, inner) block.

    Immutable: channel_view shares one per (shape, axis) for C-contiguous
    arrays and one per (shape, strides, itemsize, axis) for the others, between
    calls and threads, so assigning to an attribute raises."""

    __slots__ = ("shape", "perm", "outer", "channels", "inner", "is_identity", "inverse",
                 "_c_strides")

    def __init__(self, shape: Tuple[int, ...], perm: Tuple[int, ...], outer: int,
                 channels: int, inner: int) -> None:
        put = object.__setattr__
        put(self, "shape", shape)          # logical shape
        put(self, "perm", perm)            # axis order in memory (slowest first)
        put(self, "outer", outer)
        put(self, "channels", channels)
        put(self, "inner", inner)
        put(self, "is_identity", perm == tuple(range(len(shape))))
        # the axis order that takes memory order back to the logical one
        inverse = [0] * len(perm)
        for k, p in enumerate(perm):
            inverse[p] = k
        put(self, "inverse", tuple(inverse))
        put(self, "_c_strides", {})        # itemsize -> strides of this layout, per axis

    def __setattr__(self, name, value):
        raise AttributeError(f"ChannelView is immutable (shared between calls); "
                             f"cannot set {name}")

    def flat(self, a: np.ndarray) -> np.ndarray:
        """1-D view of `a` in this layout (a must already have it)."""
        m = a if self.is_identity else a.transpose(self.perm)
        return m.reshape(-1)

    def layout_strides(self, itemsize: int) -> Tuple[int, ...]:
        """Byte strides, per logical axis, of an array of this shape stored
        contiguously in this layout."""
        st = self._c_strides.get(itemsize)
        if st is None:
            st = [0] * len(self.perm)
            step = itemsize
            for p in reversed(self.perm):
                st[p] = step
                step *= self.shape[p]
            st = self._c_strides[itemsize] = tuple(st)
        return st

    def has_layout(self, a: np.ndarray) -> bool:
        """True when `a` is stored in exactly this layout (so flat() is a view)."""
        if (not self.is_identity and a.shape == self.shape
                and a.strides == self.layout_strides(a.itemsize)):
            # the common channels-last case, without building a transposed view
            # (a few microseconds for a CuPy array); any other strides (size-1
            # axes, empty arrays) take the general test below
            return getattr(a.flags, "aligned", True)
        m = a if self.is_identity else a.transpose(self.perm)
        # misaligned memory (np.frombuffer at an odd offset) is C-contiguous too,
        # but the kernels' typed loads need aligned elements: it gets a copy
        return m.flags.c_contiguous and getattr(m.flags, "aligned", True)

    def empty(self, dtype, xp=np, near=()):
        """A new array of the logical shape stored in this layout (xp: numpy or cupy);
        on the host placed half a page from the arrays in `near` (placed_empty)."""
        shape = self.shape if self.is_identity else tuple(self.shape[i] for i in self.perm)
        mem = placed_empty(shape, dtype, near) if xp is np else xp.empty(shape, dtype=dtype)
        return mem if self.is_identity else mem.transpose(self.inverse)

    def arrange(self, a, xp=np):
        """`a` itself when it has this layout, else a copy that has it."""
        if self.has_layout(a):
            return a
        out = self.empty(a.dtype, xp)
        xp.copyto(out, a)
        return out


def _view(shape, perm, axis) -> ChannelView:
    pos = perm.index(axis)
    outer = 1
    for i in perm[:pos]:
        outer *= shape[i]
    inner = 1
    for i in perm[pos + 1:]:
        inner *= shape[i]
    return ChannelView(tuple(shape), tuple(perm), outer, shape[axis], inner)


_IDENTITY = {}
# views are immutable, so one per layout is kept (a training loop has a
# handful): keyed by (shape, axis) for C-contiguous arrays, by (shape,
# strides, itemsize, axis), everything a view depends on, for the others
_VIEWS = {}
_VIEWS_MAX = 512


def _identity(nd: int) -> Tuple[int, ...]:
    p = _IDENTITY.get(nd)
    if p is None:
        p = _IDENTITY[nd] = tuple(range(nd))
    return p


def channel_view(x: np.ndarray, axis: int) -> ChannelView:
    """Best layout for `x` with channel axis `axis` (axis already normalized).

    The layout is x's own memory order when x is contiguous in some axis
    order; otherwise C order (and the caller copies x into it).
    """
    contiguous = x.flags.c_contiguous
    key = (x.shape, axis) if contiguous else (x.shape, x.strides, x.itemsize, axis)
    v = _VIEWS.get(key)
    if v is None:
        if len(_VIEWS) >= _VIEWS_MAX:
            _VIEWS.clear()
        v = _VIEWS[key] = (_view(x.shape, _identity(x.ndim), axis) if contiguous
                           else _strided_view(x, axis))
    return v


def _strided_view(x, axis: int) -> ChannelView:
    nd = x.ndim
    # Sort axes by stride, slowest first; size-1 axes carry no information and
    # keep their logical place (stable sort on a key that ignores them).
    strides = [abs(s) if n > 1 else 0 for s, n in zip(x.strides, x.shape)]
    perm = tuple(sorted(range(nd), key=lambda i: (-strides[i], i)))
    if x.transpose(perm).flags.c_contiguous:
        return _view(x.shape, perm, axis)
    return _view(x.shape, _identity(nd), axis)

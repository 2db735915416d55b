"""A NumPy-backed stand-in for the parts of CuPy that bncore_gpu uses (tests only)."""
import numpy as _np

from . import cuda  # noqa: F401
from ._core import (RawModule, array, ascontiguousarray, asarray, asnumpy, copyto, empty,  # noqa: F401
                    empty_like, from_dlpack, full, ndarray, ones, sqrt,
                    zeros, zeros_like, ones_like, full_like, concatenate, isfinite, float16,
                    float32, float64, int32, int64, maximum, abs, get_array_module,
                    exp, log, arange, pad, flatnonzero, where, broadcast_to)

from ._core import raw_kernel as RawKernel  # noqa: E402,N812 - CuPy's name

__version__ = "emulated"
EMULATED = True
inf, nan = _np.inf, _np.nan


def array_equal(a, b, equal_nan=False):
    return _np.array_equal(a, b, equal_nan=equal_nan)


class _Generator:
    def __init__(self, seed):
        self._rng = _np.random.default_rng(seed)

    def standard_normal(self, shape, dtype=_np.float64):
        return asarray(self._rng.standard_normal(shape).astype(dtype))


class random:  # noqa: N801
    default_rng = _Generator


import emulations  # noqa: E402,F401  (the kernel emulations register themselves)

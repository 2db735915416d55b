"""The batch-normalization layer on the GPU: bncore.BatchNorm over CuPy arrays.

Parameters and running statistics are CuPy arrays; ``state_dict()`` returns
CuPy copies (and ``num_batches_tracked`` as a host integer array);
``load_state_dict`` accepts CuPy or NumPy arrays.
"""
import cupy

from bncore.layers import BatchNorm as _CpuBatchNorm
from bncore_gpu import _checks
from bncore_gpu.batch_norm import batch_norm_backward, batch_norm_forward

__all__ = ["BatchNorm"]


class BatchNorm(_CpuBatchNorm):
    __doc__ = _CpuBatchNorm.__doc__
    _xp = cupy
    _chk = _checks
    _forward = staticmethod(batch_norm_forward)
    _backward = staticmethod(batch_norm_backward)

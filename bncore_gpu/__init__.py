"""bncore_gpu: bncore's API on CuPy arrays, over CUDA kernels (RawModule/NVRTC).

The same names, signatures and semantics as ``bncore``; arrays live on the
device. Importing this package without CuPy raises ImportError, and without a
usable CUDA device RuntimeError: there is never a silent fallback to NumPy.
"""
try:
    import cupy as _cupy
except ImportError as _exc:       # pragma: no cover - depends on the machine
    raise ImportError(
        "bncore_gpu needs CuPy: pip install 'bncore[gpu]' (or the cupy-cudaXXx wheel that "
        "matches your CUDA); for the CPU engine import bncore") from _exc

try:
    _ndev = _cupy.cuda.runtime.getDeviceCount()
except Exception as _exc:         # pragma: no cover - depends on the machine
    raise RuntimeError(f"bncore_gpu: CuPy found no usable CUDA device ({_exc})") from _exc
if _ndev < 1:                     # pragma: no cover
    raise RuntimeError("bncore_gpu: CuPy found no CUDA device")

from bncore._version import __version__  # noqa: E402
from bncore_gpu.batch_norm import batch_norm_backward, batch_norm_forward  # noqa: E402
from bncore_gpu.layers import BatchNorm  # noqa: E402

__all__ = ["__version__", "batch_norm_forward", "batch_norm_backward", "BatchNorm"]
from bncore.clipping import NonFiniteError  # noqa: E402
from bncore_gpu.clipping import (clip_grad_norm, clip_grad_value, found_inf,  # noqa: E402
                                 grad_norm)
from bncore_gpu.optimizers import adagrad_step, adam_step, rmsprop_step, sgd_step  # noqa: E402
from bncore_gpu import optim  # noqa: E402

__all__ += ["sgd_step", "adam_step", "rmsprop_step", "adagrad_step", "clip_grad_norm",
            "clip_grad_value", "grad_norm", "found_inf", "NonFiniteError", "optim"]

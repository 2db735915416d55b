"""The batch-normalization layer: parameters, running statistics, mode.

A thin object over :func:`bncore.batch_norm_forward` /
:func:`bncore.batch_norm_backward`, shaped like ``torch.nn.BatchNorm2d``:
the functions stay stateless (they save mean and invstd), the layer owns
weight, bias and running statistics and remembers what backward needs.
"""
from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Dict, Optional

import numpy as np

from bncore import _checks as chk
from bncore._bn_args import _axis as channel_axis
from bncore.batch_norm import batch_norm_backward, batch_norm_forward
from bncore.conventions import BATCH_NORM, batch_norm_convention

_UNSET: Any = object()


class BatchNorm:
    """Batch normalization over the channel axis of inputs of any ndim >= 2.

    Parameters
    ----------
    num_features : C, the size of the channel axis.
    eps : added to the variance (default: the convention's; torch 1e-5).
    momentum : rate of the running average, ``r = (1 - m) r + m * stat``
        (default: the convention's; torch 0.1). ``None`` gives the cumulative
        moving average, ``m = 1 / num_batches_tracked``, as PyTorch does.
        Keras and flax state 0.99 as a decay: their convention here is a rate
        of 0.01.
    affine : learnable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : keep running_mean / running_var (zeros / ones) and
        ``num_batches_tracked``; when False, inference also uses batch statistics.
    axis : channel axis (default: the convention's; torch 1, Keras -1).
    convention : "torch", "keras", "tf_fused", "flax" or "onnx": sets the
        defaults above and the running-variance rule (unbiased for torch and
        tf_fused, biased otherwise).
    dtype : dtype of the parameters and running statistics (float32).

    Gradients of the last ``backward`` are in ``grad_weight`` and ``grad_bias``.
    ``forward`` keeps a reference to x (not a copy) for ``backward``: x must not
    be changed in place between the two (NumPy has no version counter to
    catch it, as torch's autograd does; a changed x gives wrong gradients).
    A ``forward`` that raises leaves nothing for ``backward``.
    """

    # the backend: bncore_gpu.BatchNorm swaps in CuPy, its checks and the CUDA functions
    _xp = np
    _chk = chk
    _forward = staticmethod(batch_norm_forward)
    _backward = staticmethod(batch_norm_backward)

    def __init__(self, num_features: int, eps: Optional[float] = None,
                 momentum: Optional[float] = _UNSET, affine: bool = True,
                 track_running_stats: bool = True, axis: Optional[int] = None, *,
                 convention: str = "torch", dtype=np.float32) -> None:
        conv = batch_norm_convention(convention)
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = int(num_features)
        self.convention = conv.name
        self.eps = chk.positive("eps", conv.eps if eps is None else eps)
        if momentum is _UNSET:
            momentum = conv.momentum
        self.momentum = None if momentum is None else chk.in_unit_interval("momentum", momentum)
        if axis is None:
            axis = conv.axis
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        self.axis = int(axis)
        self.unbiased_running_var = conv.unbiased_running_var
        # ("False" would be true: refused, as train() refuses it)
        self.affine = chk.flag("affine", affine)
        self.track_running_stats = chk.flag("track_running_stats", track_running_stats)
        self.dtype = np.dtype(dtype)
        if self.dtype not in chk.FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, float32 or float64, got {self.dtype}")
        C = self.num_features
        xp = self._xp
        self.weight = xp.ones(C, self.dtype) if self.affine else None
        self.bias = xp.zeros(C, self.dtype) if self.affine else None
        if self.track_running_stats:
            self.running_mean = xp.zeros(C, self.dtype)
            self.running_var = xp.ones(C, self.dtype)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.training = True
        self.grad_weight: Optional[np.ndarray] = None
        self.grad_bias: Optional[np.ndarray] = None
        self._saved: Optional[tuple] = None

    # ---- state
    def reset_running_stats(self) -> None:
        """running_mean = 0, running_var = 1, num_batches_tracked = 0, in place
        (the arrays stay the same objects), as ``torch.nn.BatchNorm2d``'s; nothing
        without ``track_running_stats``."""
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """reset_running_stats(), and weight = 1, bias = 0 in place (affine), as
        torch's; the gradients of the last backward are cleared."""
        self.reset_running_stats()
        if self.affine:
            self.weight[...] = 1
            self.bias[...] = 0
        self.grad_weight = self.grad_bias = None

    # ---- mode
    def train(self, mode: bool = True) -> "BatchNorm":
        self.training = chk.flag("mode", mode)     # train("False") would be training
        return self

    def eval(self) -> "BatchNorm":
        return self.train(False)

    def _uses_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats

    # ---- computation
    def _input_shape(self, x):
        """x's shape, its channel count checked against num_features (the
        functions cannot: without weight or running statistics nothing else
        says how many there are)."""
        shape = getattr(x, "shape", None)
        if shape is None:
            # a list (the functions take one as NumPy does): its shape, so that
            # the channel count and tf_fused's per-input rule are checked too
            shape = np.shape(x)
        self._check_input(shape)
        return shape

    def _check_input(self, shape) -> None:
        if shape is not None and len(shape) >= 2:
            ax = channel_axis(chk, self.axis, len(shape))
            if shape[ax] != self.num_features:
                raise ValueError(f"x has {shape[ax]} channels on axis {self.axis}; this layer "
                                 f"has num_features={self.num_features}")

    def forward(self, x, *, num_threads: Optional[int] = None) -> np.ndarray:
        """Normalize x; in training mode also update the running statistics.
        x is kept (by reference) for ``backward``: do not change it in place
        before then."""
        # a forward that raises must not leave the previous batch for backward
        self._saved = None
        shape = self._input_shape(x)
        unbiased, eps = self.unbiased_running_var, self.eps
        conv = BATCH_NORM.get(self.convention)
        if shape is not None and conv is not None and conv.fused_ranks is not None \
                and len(shape) >= 2:
            # tf_fused: tf.keras 2 fuses only some inputs (see bncore.conventions)
            unbiased, min_eps = conv.for_input(len(shape), self.axis, self.dtype)
            eps = max(eps, min_eps)
        batch_stats = self._uses_batch_stats()
        update = self.training and self.track_running_stats
        momentum = 0.0
        if update:
            if self.momentum is None:
                momentum = 1.0 / (self.num_batches_tracked + 1)
            else:
                momentum = self.momentum
        y, mean, invstd = self._forward(
            x, self.weight, self.bias,
            self.running_mean if (update or not batch_stats) else None,
            self.running_var if (update or not batch_stats) else None,
            training=batch_stats, momentum=momentum, eps=eps, axis=self.axis,
            unbiased_running_var=unbiased, num_threads=num_threads)
        if update:
            self.num_batches_tracked += 1
        self._saved = (x, mean, invstd, batch_stats)
        return y

    __call__ = forward

    def backward(self, dy, *, num_threads: Optional[int] = None) -> np.ndarray:
        """dx for the last forward; stores grad_weight and grad_bias."""
        if self._saved is None:
            raise RuntimeError("backward() called before forward()")
        x, mean, invstd, batch_stats = self._saved
        dx, dw, db = self._backward(dy, x, mean, invstd, self.weight,
                                         training=batch_stats, axis=self.axis,
                                         num_threads=num_threads)
        if self.affine:
            self.grad_weight, self.grad_bias = dw, db
        return dx

    # ---- state
    def state_dict(self) -> Dict[str, np.ndarray]:
        """Copies of weight, bias, running statistics and num_batches_tracked."""
        state: Dict[str, np.ndarray] = {}
        xp = self._xp

        def copy(key, v):
            # (a user may have put torch tensors in the layer, which it updates
            # in place through DLPack: they had no .copy())
            return (v if isinstance(v, xp.ndarray) else self._chk.as_array(key, v)).copy()
        if self.affine:
            state["weight"] = copy("weight", self.weight)
            state["bias"] = copy("bias", self.bias)
        if self.track_running_stats:
            state["running_mean"] = copy("running_mean", self.running_mean)
            state["running_var"] = copy("running_var", self.running_var)
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Copy a state_dict in, bit for bit; keys and shapes must match exactly."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping (as state_dict() returns), "
                            f"got {type(state).__name__}")
        expected = set(self.state_dict())
        got = set(state)
        if got != expected:
            raise ValueError(f"state_dict keys {sorted(got)} do not match {sorted(expected)}")
        arrays = {}
        xp = self._xp
        for key in ("weight", "bias", "running_mean", "running_var"):
            if key in expected:
                v = state[key]
                v = xp.asarray(chk.host_copy_of_device_array(v) if xp is np else v)
                if v.shape != (self.num_features,):
                    raise ValueError(f"state_dict[{key!r}] has shape {v.shape}, "
                                     f"expected ({self.num_features},)")
                if v.dtype != self.dtype:
                    raise TypeError(f"state_dict[{key!r}] has dtype {v.dtype}, expected {self.dtype}")
                arrays[key] = v
        count = None
        if "num_batches_tracked" in expected:
            count = chk.count("state_dict['num_batches_tracked']", state["num_batches_tracked"])
        # where the layer holds a foreign array (a torch tensor put in by the
        # user, updated in place through DLPack), a view of it to copy into,
        # made before anything is written
        targets = {key: self._writable(key) for key in arrays}
        # everything is checked: now copy (a state_dict that raised changed nothing)
        for key, v in arrays.items():
            xp.copyto(targets[key], v)
        if count is not None:
            self.num_batches_tracked = count

    def _writable(self, key: str):
        a = getattr(self, key)
        return a if type(a) is self._xp.ndarray else self._chk.output_array(key, a)

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, convention={self.convention!r})")

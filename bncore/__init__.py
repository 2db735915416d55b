"""bncore: a reference engine for the numerics of neural-network training.

Batch normalization, gradient clipping and optimizer updates as OpenMP-parallel
kernels over NumPy arrays, with every framework's conventions selectable and
float64 accumulation throughout. See DESIGN.md for the contract.
"""
from bncore._version import __version__
from bncore._config import build_info, show_config
from bncore._threads import get_num_threads, set_num_threads
from bncore.batch_norm import batch_norm_backward, batch_norm_forward
from bncore.clipping import NonFiniteError, clip_grad_norm, clip_grad_value, found_inf, grad_norm
from bncore.gradcheck import GradcheckReport, gradcheck  # noqa: E402 (the function shadows the module name, as torch.autograd.gradcheck does)
from bncore.layers import BatchNorm
from bncore.optimizers import adagrad_step, adam_step, rmsprop_step, sgd_step
from bncore import optim  # noqa: E402  (after the step functions it uses)

__all__ = [
    "__version__",
    "batch_norm_forward",
    "batch_norm_backward",
    "BatchNorm",
    "sgd_step",
    "adam_step",
    "rmsprop_step",
    "adagrad_step",
    "clip_grad_norm",
    "clip_grad_value",
    "grad_norm",
    "found_inf",
    "NonFiniteError",
    "gradcheck",
    "GradcheckReport",
    "optim",
    "show_config",
    "build_info",
    "get_num_threads",
    "set_num_threads",
]

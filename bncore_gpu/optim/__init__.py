"""Optimizer classes on the GPU: bncore.optim's classes over bncore_gpu's kernels.

The same parameter groups, hyperparameters, conventions, state_dict and
checkpoints as bncore.optim. Differences: parameters and state are CuPy
arrays, and the step count lives on the device (a 0-d float64 array per
parameter group, shared by the group's parameters, incremented by a kernel
unless ``found_inf`` is set), so ``step(grads, grad_scale=..., found_inf=...)``
with device scalars never waits on the host. One consequence: SGD's momentum
buffer is created (host side) at the group's first momentum step, and a step
that a device-side ``found_inf`` skips still counts as that first use; the
buffer stays zero, so with dampening d > 0 the next step stores (1 - d) g
where torch, whose GradScaler skips the whole step, would store g.
"""
import cupy

from bncore.optim import algorithms as _alg
from bncore.optim.checkpoint import load, save
from bncore.optim.schedules import cosine_lr, linear_warmup, set_lr, step_lr
from bncore.optimizers import as_list
from bncore_gpu import _checks as chk
from bncore_gpu import optimizers as _ops
from bncore_gpu._tables import gather

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "save", "load", "step_lr",
           "cosine_lr", "linear_warmup", "set_lr"]


def _device_param(name, p):
    a = chk.as_array(name, p)
    if a.dtype not in (cupy.float32, cupy.float64):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a


class _OnDevice:
    _xp = cupy
    _ops = _ops
    _as_param = staticmethod(_device_param)

    def _counters(self):
        if not hasattr(self, "_steps"):
            self._steps = {}
        return self._steps

    def _counter(self, gi, idx):
        steps = self._counters()
        c = steps.get(gi)
        if c is None:
            c = cupy.zeros((), cupy.float64)
            for i in idx:                  # resume from a loaded state
                if i in self.state:
                    c[...] = self.state[i]["step"]
                    break
            steps[gi] = c
        return c

    def _gather_all(self, params, grads):
        gather([params, grads], ("params", "grads"), (True, False), 1)

    def _load_step(self, v):
        return cupy.asarray(v, dtype=cupy.float64).reshape(())

    def _after_load(self):
        self._steps = {}

    def step(self, grads, *, grad_scale=None, found_inf=None, num_threads=None) -> None:
        glist = as_list("grads", grads)
        params = self._sync_params()
        if len(glist) != len(params):
            raise ValueError(f"grads has {len(glist)} entries but the optimizer has "
                             f"{len(params)} parameters")
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
        skip, _, _, _ = _ops.amp_args(None, found_inf)
        # every array is checked before the first step counter moves: a step
        # that raises changes nothing
        self._gather_all(params, glist)
        if skip:
            return
        dev_found = found_inf if found_inf is not None and _ops.is_device(found_inf) else None
        offset = 0
        for gi, group in enumerate(self.param_groups):
            n = len(group["params"])
            idx = list(range(offset, offset + n))
            counter = self._counter(gi, idx)
            for i, p in zip(idx, group["params"]):
                if i not in self.state:
                    self.state[i] = self._init_state(p, group)
                self.state[i]["step"] = counter
            _ops.step_increment(counter, dev_found)
            self._apply(group, group["params"], glist[offset:offset + n],
                        [self.state[i] for i in idx], counter, grad_scale, num_threads,
                        found_inf=dev_found)
            offset += n



class SGD(_OnDevice, _alg.SGD):
    __doc__ = _alg.SGD.__doc__


class Adam(_OnDevice, _alg.Adam):
    __doc__ = _alg.Adam.__doc__


class AdamW(_OnDevice, _alg.AdamW):
    __doc__ = _alg.AdamW.__doc__


class RMSprop(_OnDevice, _alg.RMSprop):
    __doc__ = _alg.RMSprop.__doc__


class Adagrad(_OnDevice, _alg.Adagrad):
    __doc__ = _alg.Adagrad.__doc__

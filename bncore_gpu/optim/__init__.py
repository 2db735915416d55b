"""Optimizer classes on the GPU: bncore.optim's classes over bncore_gpu's kernels.

The same parameter groups, hyperparameters, conventions, state_dict and
checkpoints as bncore.optim. Differences: parameters and state are CuPy
arrays, and the step count lives on the device (a 0-d float64 array shared by
the parameters of a group that started together, incremented by a kernel
unless ``found_inf`` is set), so ``step(grads, grad_scale=..., found_inf=...)``
with device scalars never waits on the host. One consequence: SGD's momentum
buffer is created (host side) at the group's first momentum step, and a step
that a device-side ``found_inf`` skips still counts as that first use; the
buffer stays zero, so with dampening d > 0 the next step stores (1 - d) g
where torch, whose GradScaler skips the whole step, would store g.
"""
import itertools
import operator

import cupy

from bncore.optim import algorithms as _alg
from bncore._checks import any_none as _any_none
from bncore.optim.checkpoint import load, save
from bncore.optim.schedules import cosine_lr, linear_warmup, set_lr, step_lr
from bncore_gpu import _checks as chk
from bncore_gpu import optimizers as _ops
from bncore_gpu._tables import gather

_STEP = operator.itemgetter("step")

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

    def _gather(self, params, grads):
        gather([params, grads], ("params", "grads"), (True, False), 1)

    @staticmethod
    def _byte_range(name, a):
        arr = a if type(a) is cupy.ndarray else chk.as_array(name, a)
        return arr.data.ptr, arr.nbytes

    def _retired(self, state):
        # the counter is shared with the group's other parameters, which go on
        # stepping: a removed parameter keeps a copy of its count
        state = dict(state)
        if _ops.is_device(state["step"]):
            state["step"] = state["step"].copy()
        return state

    def _load_step(self, v):
        return int(v)                  # a host count; _after_load makes the counters

    def _after_load(self):
        # parameters of a group with the same step count share one device
        # counter, and so one kernel call per step
        offset = 0
        for group in self.param_groups:
            shared = {}
            for i in range(offset, offset + len(group["params"])):
                s = self.state.get(i)
                if s is not None and not _ops.is_device(s["step"]):
                    v = int(s["step"])
                    if v not in shared:
                        shared[v] = cupy.full((), float(v), dtype=cupy.float64)
                    s["step"] = shared[v]
            offset += len(group["params"])

    def step(self, grads, *, grad_scale=None, found_inf=None, num_threads=None) -> None:
        """As bncore.optim's step, with the step counts on the device: each
        parameter's state holds a device counter, shared by the parameters that
        started together; one kernel call per group, counter and call key (as
        on the CPU: SGD's new torch-style buffers apart from old ones), and each
        counter moves once per step (also when its parameters now sit in
        several groups)."""
        glist, params, skip = self._begin_step(grads, grad_scale, found_inf, num_threads)
        if skip:
            # a bad call still raises (a group's parameters checked as one call,
            # state arrays included; parameters without state against a fresh
            # one, not kept)
            groups, off = [], 0
            for g in self.param_groups:
                # (parameters without a gradient are skipped, as on the CPU)
                groups.append([i for i in range(off, off + len(g["params"]))
                               if glist[i] is not None])
                off += len(g["params"])
            self._gather_all(params, glist, groups)
            one = cupy.ones((), cupy.float64)
            self._check_calls(
                [(g, [params[i] for i in idx], [glist[i] for i in idx], idx, one)
                 for g, idx in zip(self.param_groups, groups)],
                [[self.state[i] if i in self.state else self._init_state(params[i], g)
                  for i in idx] for g, idx in zip(self.param_groups, groups)],
                grad_scale, num_threads)
            return
        dev_found = found_inf if found_inf is not None and _ops.is_device(found_inf) else None
        calls, counters, fresh_counter, created = [], {}, None, []
        offset = 0
        partial = _any_none(glist)
        for group in self.param_groups:
            n = len(group["params"])
            live = range(n)
            if partial and _any_none(glist[offset:offset + n]):
                # as torch.optim with a .grad of None: the parameter is skipped
                # (no state made, no step counted), as on the CPU
                live = [k for k in live if glist[offset + k] is not None]
                if not live:
                    offset += n
                    continue
            if partial:
                states = [self.state.get(offset + k) for k in live]
            else:
                states = list(map(self.state.get, range(offset, offset + n)))
            if None in states:
                for j, s in enumerate(states):
                    k = live[j]
                    if s is None:
                        # parameters new to this step start together, from 0
                        if fresh_counter is None:
                            fresh_counter = cupy.zeros((), cupy.float64)
                        s = self._init_state(group["params"][k], group)
                        s["step"] = fresh_counter
                        self.state[offset + k] = s
                        created.append(offset + k)
                        states[j] = s
            # one call per counter, split further as the class's call keys say
            keys = self._call_keys(states, group)
            steps = list(map(_STEP, states))
            if keys is None and n and all(map(operator.is_, steps, itertools.repeat(steps[0]))):
                # the usual case, without Python work per parameter: one counter
                # and one call key for the whole group
                members = [offset + k for k in live] if partial else list(range(offset, offset + n))
                buckets = {None: (steps[0], members)}
            else:
                buckets = {}
                for j, c in enumerate(steps):
                    key = (id(c),) if keys is None else (id(c),) + keys[j]
                    buckets.setdefault(key, (c, []))[1].append(offset + live[j])
            for counter, idx in buckets.values():
                counters[id(counter)] = counter
                calls.append((group, counter, idx))
            offset += n
        single = len(calls) == 1
        sizes = list(map(len, map(self.state.__getitem__,
                                  itertools.chain.from_iterable(c[2] for c in calls))))
        if not single or partial:
            # a later call must not fail after an earlier one has written: the
            # parameters against their gradients, then each call's own checks
            # (also where parameters without a gradient are left out, so that
            # messages count over all parameters)
            try:
                self._gather_all(params, glist, [idx for _, _, idx in calls])
                self._check_calls(
                    [(g, [params[i] for i in idx], [glist[i] for i in idx], idx, c)
                     for g, c, idx in calls],
                    [[self.state[i] for i in idx] for _, _, idx in calls], grad_scale,
                    num_threads)
            except BaseException:
                self._forget_new_state(created, [self.state[i] for _, _, idx in calls
                                                 for i in idx], sizes)
                raise
        if partial:
            # a parameter without a gradient keeps its count while the others
            # that share its counter step: it gets a copy (one per counter)
            copies = {}
            for i, g in enumerate(glist):
                st = self.state.get(i) if g is None else None
                if st is not None and id(st["step"]) in counters:
                    c = st["step"]
                    if id(c) not in copies:
                        copies[id(c)] = c.copy()
                    st["step"] = copies[id(c)]
        for counter in counters.values():
            _ops.step_increment(counter, dev_found)
        try:
            for group, counter, idx in calls:
                self._apply(group, list(map(params.__getitem__, idx)),
                            list(map(glist.__getitem__, idx)),
                            list(map(self.state.__getitem__, idx)), counter, grad_scale,
                            num_threads, found_inf=dev_found)
        except BaseException:
            if single:
                # one call checks its arrays before writing any: only the counter,
                # moved first (the kernel reads the count after this step), and new
                # state need undoing; on the device, without waiting for it
                for c in counters.values():
                    back = 1.0 if dev_found is None else (dev_found.reshape(()) == 0)
                    c[...] = c - back
                self._forget_new_state(created, [self.state[i] for _, _, idx in calls
                                                 for i in idx], sizes)
            raise


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

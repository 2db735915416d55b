"""Optimizer classes over bncore's multi-tensor step functions, PyTorch-shaped.

An optimizer owns ``param_groups`` (a list of dicts: ``"params"`` plus the
hyperparameters, which may be changed between steps, e.g. by a schedule) and
per-parameter ``state``. ``step(grads)`` takes the gradients in the order of
the parameters (all groups, in order) and runs one multi-tensor kernel call
per group. ``convention=`` picks a framework's defaults and formulas
(bncore/conventions.py); explicit keyword arguments override them.

State is created lazily at the first step. A step with ``found_inf`` true
changes nothing: parameters, state and step counts stay as they were.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bncore import _checks as chk
from bncore import _optim_kernels as _k
from bncore import optimizers as _cpu_ops
from bncore.conventions import optimizer_defaults
from bncore.optimizers import amp_args, as_list

__all__ = ["Optimizer"]


def _as_param(name: str, p) -> np.ndarray:
    a = chk.as_array(name, p)
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a


class Optimizer:
    """Base class: parameter groups, lazy state, state_dict, the AMP skip."""

    #: the class name in bncore.conventions.OPTIMIZERS
    kind: str = ""
    #: per-parameter state arrays, by name, in kernel-argument order
    state_arrays: Sequence[str] = ()
    #: the backend: bncore_gpu.optim swaps in CuPy and the CUDA step functions
    _xp = np
    _ops = _cpu_ops

    def __init__(self, params, convention: str = "torch", **hyper: Any) -> None:
        defaults = optimizer_defaults(self.kind, convention)
        defaults["maximize"] = False
        unknown = set(hyper) - set(defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(unknown)}")
        defaults.update(hyper)
        self.convention = convention
        self.defaults = defaults
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Dict[int, Dict[str, Any]] = {}
        groups = self._split_groups(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        for g in groups:
            self.add_param_group(g)

    # ---- groups
    @staticmethod
    def _split_groups(params) -> List[dict]:
        if isinstance(params, np.ndarray) or hasattr(params, "__dlpack__"):
            return [{"params": [params]}]
        params = list(params)
        if params and isinstance(params[0], dict):
            return [dict(g) for g in params]
        return [{"params": params}] if params else []

    _as_param = staticmethod(_as_param)

    def add_param_group(self, group: Dict[str, Any]) -> None:
        """Add a group: ``{"params": [...], **overrides}`` (torch's add_param_group)."""
        if "params" not in group:
            raise ValueError("a parameter group needs a 'params' entry")
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown hyperparameters in a parameter group: {sorted(unknown)}")
        plist = as_list("params", group["params"])
        arrays = [self._as_param(f"params[{i}]", p) for i, p in enumerate(plist)]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for a in arrays:
            if id(a) in seen:
                raise ValueError("a parameter appears in more than one group")
            seen.add(id(a))
        full = dict(self.defaults)
        full.update({k: v for k, v in group.items() if k != "params"})
        self._check_hyper(full)
        full["params"] = arrays
        self.param_groups.append(full)

    def _check_hyper(self, group: Dict[str, Any]) -> None:
        """Subclasses validate their hyperparameters (the step functions do too)."""

    def _flat_params(self) -> List[np.ndarray]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_offsets(self) -> List[int]:
        offs, n = [], 0
        for g in self.param_groups:
            offs.append(n)
            n += len(g["params"])
        return offs

    # ---- stepping
    def _init_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": 0, **{name: self._xp.zeros_like(p) for name in self.state_arrays}}

    def _apply(self, group: Dict[str, Any], params, grads, states, step: int, grad_scale,
               num_threads, found_inf=None) -> None:
        """One step function call for these parameters (all at step `step`)."""
        raise NotImplementedError

    def step(self, grads, *, grad_scale=None, found_inf=None,
             num_threads: Optional[int] = None) -> None:
        """Update every parameter from ``grads`` (same order as the parameters).

        ``grad_scale`` divides the gradients inside the kernel; a true
        ``found_inf`` skips the step entirely (nothing changes)."""
        glist = as_list("grads", grads)
        params = self._flat_params()
        if len(glist) != len(params):
            raise ValueError(f"grads has {len(glist)} entries but the optimizer has "
                             f"{len(params)} parameters")
        skip, _ = amp_args(grad_scale, found_inf)
        if skip:
            # validate (so a bad call still raises), then leave everything as it is
            _k.gather([params, glist], ("params", "grads"), (True, False), 1, chk.as_array)
            return
        offset = 0
        for group in self.param_groups:
            n = len(group["params"])
            gparams = group["params"]
            ggrads = glist[offset:offset + n]
            idx = list(range(offset, offset + n))
            for i, p in zip(idx, gparams):
                if i not in self.state:
                    self.state[i] = self._init_state(p, group)
            # parameters of a group normally share their step count; run one
            # kernel call per distinct count (one call in the usual case)
            by_step: Dict[int, List[int]] = {}
            for k, i in enumerate(idx):
                by_step.setdefault(self.state[i]["step"] + 1, []).append(k)
            for step, ks in sorted(by_step.items()):
                self._apply(group, [gparams[k] for k in ks], [ggrads[k] for k in ks],
                            [self.state[idx[k]] for k in ks], step, grad_scale, num_threads)
                for k in ks:
                    self.state[idx[k]]["step"] = step
            offset += n

    # ---- state
    def state_dict(self) -> Dict[str, Any]:
        """A deep copy: ``{"optimizer", "convention", "state": {index: {...}},
        "param_groups": [{hyperparameters, "params": [indices]}]}``."""
        groups = []
        for off, g in zip(self._group_offsets(), self.param_groups):
            d = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(off, off + len(g["params"])))
            groups.append(d)
        state = {i: {k: (v.copy() if hasattr(v, "copy") and hasattr(v, "shape") else v)
                     for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"optimizer": type(self).__name__, "convention": self.convention,
                "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore hyperparameters and state bit for bit; the structure must match."""
        if state_dict.get("optimizer") != type(self).__name__:
            raise ValueError(f"state_dict is for {state_dict.get('optimizer')!r}, "
                             f"not {type(self).__name__!r}")
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer "
                             f"has {len(self.param_groups)}")
        params = self._flat_params()
        for g_new, g_old in zip(groups, self.param_groups):
            if len(g_new["params"]) != len(g_old["params"]):
                raise ValueError("state_dict's parameter groups do not match the optimizer's")
        new_state: Dict[int, Dict[str, Any]] = {}
        for key, s in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"state_dict has state for parameter {i}, which does not exist")
            entry = {}
            for name, v in s.items():
                if name == "step":
                    entry[name] = self._load_step(v)
                elif getattr(v, "ndim", 0) > 0 or name in self.state_arrays:
                    if tuple(v.shape) != tuple(params[i].shape) or v.dtype != params[i].dtype:
                        raise ValueError(f"state_dict state[{i}][{name!r}] has shape "
                                         f"{tuple(v.shape)} and dtype {v.dtype}; parameter {i} "
                                         f"has {params[i].shape}, {params[i].dtype}")
                    entry[name] = self._xp.array(v, copy=True)
                else:
                    entry[name] = copy.deepcopy(v)
            new_state[i] = entry
        for g_new, g_old in zip(groups, self.param_groups):
            hyper = {k: copy.deepcopy(v) for k, v in g_new.items() if k != "params"}
            self._check_hyper(dict(g_old, **hyper))
            g_old.update(hyper)
        self.convention = state_dict.get("convention", self.convention)
        self.state = new_state
        self._after_load()

    def _load_step(self, v) -> Any:
        """A step count from a state_dict (the GPU classes keep it on the device)."""
        return int(v)

    def _after_load(self) -> None:
        """Hook for subclasses that keep derived state (the GPU step counters)."""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (convention={self.convention!r})"]
        for i, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)

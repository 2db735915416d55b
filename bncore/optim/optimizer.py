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
import difflib
import functools
import operator
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from bncore import _checks as chk
from bncore import _optim_kernels as _k
from bncore import optimizers as _cpu_ops
from bncore._threads import resolve_num_threads
from bncore.conventions import optimizer_defaults
from bncore.optimizers import as_list

# the step functions' per-parameter list arguments, as their messages name them
_LIST_NAMES = ("params|grads|exp_avgs|exp_avg_sqs|max_exp_avg_sqs|momentum_buffers|"
               "square_avgs|grad_avgs|state_sums")
# the hyperparameters that switch a formula on or off (every class's)
_FLAGS = ("nesterov", "maximize", "amsgrad", "centered", "decoupled_weight_decay",
          "eps_inside_sqrt", "onnx_update_count")


_any_none = chk.any_none


__all__ = ["Optimizer"]


# other frameworks' names for bncore's hyperparameters
_FOREIGN_NAMES = {"learning_rate": "lr", "beta_1": "betas", "beta_2": "betas",
                  "epsilon": "eps", "rho": "alpha", "decay": "weight_decay or lr_decay",
                  "initial_accumulator": "initial_accumulator_value"}


@functools.lru_cache(maxsize=256)
def _meant(key, known: tuple) -> str:
    """What a group key that this class does not use most likely meant, or ""
    for a key of the caller's own (initial_lr, name): another framework's
    name for a hyperparameter, another bncore optimizer's hyperparameter, or a
    misspelling of one of this class's. Memoized: every step checks every
    group, and a scheduler's initial_lr would otherwise cost a fuzzy match per
    step (18 us, more than the rest of a small step's checks)."""
    if not isinstance(key, str):
        return ""
    if key in _FOREIGN_NAMES:
        return f"bncore calls it {_FOREIGN_NAMES[key]!r}"
    from bncore.conventions import OPTIMIZERS

    others = {k for table in OPTIMIZERS.values() for preset in table.values() for k in preset}
    if key in others:
        return "it is another optimizer's hyperparameter"
    # a key built on a hyperparameter's name and more words (torch's OneCycleLR and
    # CyclicLR keep max_momentum and base_momentum in the groups; weight_decay_mult)
    # is the caller's own, not a misspelling of it ("lr_" still is one)
    parts = [w for w in key.split("_") if w]
    runs = {"_".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)}
    if any(k in runs and len(k.split("_")) < len(parts) for k in known):
        return ""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.8)
    return f"did you mean {close[0]!r}?" if close else ""


def _buffer_key(a) -> tuple:
    """Where an array's elements are: address, shape, strides, dtype. A DLPack
    tensor (torch) becomes a new view at every conversion, so a parameter put
    back into its group is known by its memory, not by the view's id (another
    view of the same elements resumes too, where torch, keyed by tensor
    object, would start it fresh). Zero-size arrays are not matched: NumPy
    gives every empty slice its base's address."""
    iface = getattr(a, "__array_interface__", None) or a.__cuda_array_interface__
    return iface["data"][0], tuple(a.shape), tuple(a.strides), str(a.dtype)


def _as_param(name: str, p) -> np.ndarray:
    if not chk.viewable_in_place(p):
        # a list or a Python float would be copied, and the copy stepped
        raise TypeError(f"{name} is updated in place, so it must be an array or a tensor, "
                        f"got {type(p).__name__}")
    a = chk.as_array(name, p)
    if a.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return a


def _check_structure(state_dict: Dict[str, Any]) -> None:
    """The containers of a state_dict (what load_state_dict walks) are what
    state_dict() makes: a malformed one is a TypeError naming the entry, not
    an AttributeError from inside the loader."""
    def kind(ok, where, want, v):
        if not ok:
            raise TypeError(f"state_dict{where} must be {want}, got {type(v).__name__}")
    conv = state_dict.get("convention")
    kind(conv is None or isinstance(conv, str), "['convention']", "a str", conv)
    groups, state = state_dict["param_groups"], state_dict["state"]
    kind(isinstance(groups, (list, tuple)), "['param_groups']", "a list", groups)
    for gi, g in enumerate(groups):
        kind(isinstance(g, Mapping), f"['param_groups'][{gi}]", "a dict", g)
        if "params" in g:
            kind(isinstance(g["params"], (list, tuple)), f"['param_groups'][{gi}]['params']",
                 "a list", g["params"])
    kind(isinstance(state, Mapping), "['state']", "a dict", state)
    for i, s in state.items():
        kind(isinstance(s, Mapping), f"['state'][{i!r}]", "a dict", s)


class Optimizer:
    """Base class: parameter groups, lazy state, state_dict, the AMP skip."""

    #: the class name in bncore.conventions.OPTIMIZERS
    kind: str = ""
    #: per-parameter state arrays, by name, in kernel-argument order
    state_arrays: Sequence[str] = ()
    #: state arrays created at their first use (may be absent from a state_dict)
    optional_arrays: Sequence[str] = ()
    #: the backend: bncore_gpu.optim swaps in CuPy and the CUDA step functions
    _xp = np
    _ops = _cpu_ops

    def __init__(self, params, convention: str = "torch", **hyper: Any) -> None:
        defaults = self._defaults_of(convention, {})
        unknown = set(hyper) - set(defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {sorted(unknown)}")
        defaults.update(hyper)
        self.convention = convention
        self.defaults = defaults
        # what the caller set: kept over the convention's defaults when a
        # load_state_dict brings another convention (references, as in defaults:
        # a tensor that is not a graph leaf cannot be deep-copied)
        self._explicit_hyper = dict(hyper)
        self.param_groups: List[Dict[str, Any]] = []
        self.state: Dict[int, Dict[str, Any]] = {}
        # the flat parameter list that self.state's indices refer to
        self._state_params: List[Any] = []
        # state of parameters removed from param_groups, by id: (array, state)
        self._removed_state: Dict[int, Any] = {}
        # torch tensors behind parameter arrays, by the array's id: (array,
        # tensor), the array held so its id stays its own. A step tells
        # autograd it wrote them (chk.bump_versions), as torch.optim's does
        self._tensor_of: Dict[int, Any] = {}
        groups = self._split_groups(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        for g in groups:
            self.add_param_group(g)

    def _defaults_of(self, convention: str, explicit: Dict[str, Any]) -> Dict[str, Any]:
        """The hyperparameters a group gets by default: the convention's, then
        the constructor's explicit arguments."""
        defaults = optimizer_defaults(self.kind, convention)
        defaults["maximize"] = False
        defaults.update(explicit)
        return defaults

    # ---- groups
    @staticmethod
    def _split_groups(params) -> List[dict]:
        if isinstance(params, np.ndarray) or hasattr(params, "__dlpack__"):
            return [{"params": [params]}]
        if isinstance(params, dict):
            raise TypeError("params is a dict: pass a list of parameter groups "
                            "([{'params': [...], ...}]) or of arrays")
        params = list(params)
        if params and isinstance(params[0], dict):
            return [dict(g) for g in params]
        return [{"params": params}] if params else []

    _as_param = staticmethod(_as_param)

    def _param(self, name: str, p) -> Any:
        a = self._as_param(name, p)
        if a is not p and chk.is_torch_tensor(p):
            if p.is_inference() and isinstance(a, np.ndarray) and not a.flags.writeable:
                # kept writable: whether a step may write it is the torch mode
                # at that step, not at construction (step)
                a = np.from_dlpack(p)
            self._tensor_of[id(a)] = (a, p)
        return a

    def _tensors_behind(self, params) -> list:
        """The torch tensor behind each parameter array (None for the others)."""
        return [None if e is None else e[1] for e in map(self._tensor_of.get, map(id, params))]

    def add_param_group(self, group: Dict[str, Any]) -> None:
        """Add a group: ``{"params": [...], **overrides}`` (torch's add_param_group).

        Keys that are not this class's hyperparameters (a scheduler's
        ``initial_lr``, a ``name``) are kept, unused, and travel through
        state_dict, load_state_dict and bncore.optim.save, as in torch."""
        if not isinstance(group, dict):
            raise TypeError(f"a parameter group must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError("a parameter group needs a 'params' entry")
        self._sync_params()
        plist = as_list("params", group["params"])
        arrays = [self._param(f"params[{i}]", p) for i, p in enumerate(plist)]
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for a in arrays:
            if id(a) in seen:
                raise ValueError("a parameter appears in more than one group")
            seen.add(id(a))
        full = dict(self.defaults)
        full.update({k: v for k, v in group.items() if k != "params"})
        self._check_group(len(self.param_groups), full)
        full["params"] = arrays
        self.param_groups.append(full)
        # the new parameters' state: fresh, or theirs if they were taken out of
        # a group earlier (as a parameter put back by editing a group's list)
        self._sync_params()

    def _check_hyper(self, group: Dict[str, Any]) -> None:
        """Subclasses validate their hyperparameters by the step function's rules."""

    def _check_group(self, index: int, group: Dict[str, Any]) -> None:
        """The on/off hyperparameters and _check_hyper, with the group's index in
        the message when there are several."""
        where = f"param_groups[{index}]" if len(self.param_groups) > 1 else "the parameter group"
        missing = [k for k in self.defaults if k not in group]
        if missing:
            raise ValueError(f"{where} lacks hyperparameters {missing} (deleted from the group?)")
        for key in group:
            if key != "params" and key not in self.defaults:
                meant = _meant(key, tuple(self.defaults))
                if meant:
                    raise ValueError(f"{where} has {key!r}, which {type(self).__name__} does not "
                                     f"use: {meant} (keys that are no optimizer's "
                                     f"hyperparameter, such as initial_lr, are kept)")
        try:
            for name in _FLAGS:
                if name in group:
                    chk.flag(name, group[name])   # "False" is true: refused, not used
            self._check_hyper(group)
        except (TypeError, ValueError) as exc:
            if index == 0 and len(self.param_groups) <= 1:
                raise
            raise type(exc)(f"param_groups[{index}]: {exc}") from None

    def _sync_params(self) -> List[Any]:
        """The flat parameter list, after edits made to ``param_groups[i]["params"]``
        in place (torch allows them: its state is keyed by tensor). New entries
        are checked and converted like add_param_group's; every state entry
        moves with its parameter, so an inserted parameter starts fresh, the
        others keep theirs, and one taken out gets its state back when the
        same array is put back (until a load_state_dict)."""
        flat = self._flat_params()
        old = self._state_params
        if len(flat) == len(old) and all(map(operator.is_, flat, old)):
            return flat
        known = {id(p) for p in old}
        seen = set()
        for gi, g in enumerate(self.param_groups):
            plist = as_list(f"param_groups[{gi}]['params']", g["params"])
            for k, p in enumerate(plist):
                if id(p) not in known:
                    plist[k] = self._param(f"param_groups[{gi}]['params'][{k}]", p)
                if id(plist[k]) in seen:
                    raise ValueError(f"param_groups[{gi}]['params'][{k}] appears twice "
                                     "among the optimizer's parameters")
                seen.add(id(plist[k]))
            g["params"] = plist
        flat = self._flat_params()
        where = {id(p): i for i, p in enumerate(old)}   # old holds them: ids are unique
        now = {id(p) for p in flat}
        # a parameter taken out keeps its state for when it comes back (torch's
        # state is keyed by tensor: freezing a parameter by removing it from
        # its group and putting it back resumes its momentum); the entry holds
        # the array, so its id cannot be reused meanwhile
        for i, p in enumerate(old):
            if id(p) not in now and i in self.state:
                self._removed_state[id(p)] = (p, self._retired(self.state[i]))
        state = {}
        removed_at = None        # removed parameters by _buffer_key, when first needed
        for j, p in enumerate(flat):
            if id(p) in where:
                if where[id(p)] in self.state:
                    state[j] = self.state[where[id(p)]]
            elif id(p) in self._removed_state and self._removed_state[id(p)][0] is p:
                state[j] = self._removed_state.pop(id(p))[1]
            elif self._removed_state:
                # the same memory through a new view (a torch tensor put back):
                # the entry holds the old view, so that memory is still its own
                if removed_at is None:
                    removed_at = {_buffer_key(rp): rid
                                  for rid, (rp, _) in self._removed_state.items()}
                rid = removed_at.pop(_buffer_key(p), None) if p.size else None
                entry = self._removed_state.pop(rid, None) if rid is not None else None
                if entry is not None:        # (None: it came back as itself above)
                    state[j] = entry[1]
        self.state = state
        self._state_params = flat
        return flat

    def _retired(self, state: Dict[str, Any]) -> Dict[str, Any]:
        """A removed parameter's state, kept for its return: as it is (the GPU
        classes copy the step counter, which the group's other parameters go
        on moving)."""
        return state

    def _gather_all(self, params, grads, calls) -> None:
        """_gather_all_of over the parameters that have a gradient this step,
        the messages counting over all of them."""
        if not _any_none(grads):
            self._gather_all_of(params, grads, calls)
            return
        keep = [i for i, g in enumerate(grads) if g is not None]
        where = {i: k for k, i in enumerate(keep)}
        try:
            self._gather_all_of([params[i] for i in keep], [grads[i] for i in keep],
                                [[where[i] for i in idx] for idx in calls])
        except (TypeError, ValueError) as exc:
            raise chk.renumbered(exc, _LIST_NAMES, keep) from None

    def _gather_all_of(self, params, grads, calls) -> None:
        """Check every parameter against its gradient (shape, dtype, aliasing,
        writability) at once, with indices over all groups, before a step of
        several kernel calls (`calls`: each call's parameter indices), so that
        none can fail after another has written. Groups may differ in dtype
        (each call takes one): then each dtype's parameters are checked
        together, the messages still counting over all groups, and a call
        that would mix dtypes is refused."""
        try:
            self._gather(params, grads)
        except TypeError:
            kinds, kind_of = {}, {}
            for i, (p, g) in enumerate(zip(params, grads)):
                kind_of[i] = (str(getattr(p, "dtype", "")), str(getattr(g, "dtype", "")))
                kinds.setdefault(kind_of[i], []).append(i)
            if len(kinds) == 1:
                raise
            for idx in kinds.values():
                try:
                    self._gather([params[i] for i in idx], [grads[i] for i in idx])
                except (TypeError, ValueError) as exc:
                    raise chk.renumbered(exc, "params|grads", idx) from None
            for idx in calls:
                mixed = [i for i in idx if kind_of[i] != kind_of[idx[0]]]
                if mixed:
                    i, j = idx[0], mixed[0]
                    raise TypeError(
                        f"params[{i}] ({kind_of[i][0]}, gradient {kind_of[i][1]}) and "
                        f"params[{j}] ({kind_of[j][0]}, gradient {kind_of[j][1]}) are in one "
                        "parameter group: a group's parameters share one dtype, and so "
                        "do its gradients (groups may differ)") from None
            # each dtype's gather saw only its own arrays: across dtypes here
            labels, starts, ends, writes = [], [], [], []
            for name, lst, written in (("params", params, True), ("grads", grads, False)):
                for i, a in enumerate(lst):
                    start, nbytes = self._byte_range(f"{name}[{i}]", a)
                    labels.append(f"{name}[{i}]")
                    starts.append(start)
                    ends.append(start + nbytes)
                    writes.append(written)
            chk.refuse_overlap(labels, starts, ends, writes)

    @staticmethod
    def _byte_range(name: str, a) -> tuple:
        """(first byte, byte count) of a contiguous array (checked by _gather)."""
        arr = a if type(a) is np.ndarray else chk.as_array(name, a)
        return arr.__array_interface__["data"][0], arr.nbytes

    def _gather(self, params, grads) -> None:
        _k.gather([params, grads], ("params", "grads"), (True, False), 1, chk.as_array)

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

    def _calls(self, grads, partial: Optional[bool] = None) -> List[tuple]:
        """The kernel calls of one step: (group, params, grads, state indices, step).
        Parameters of a group normally share their step count: one call per
        distinct count (one call in the usual case); subclasses may split further."""
        calls, offset = [], 0
        if partial is None:
            partial = _any_none(grads)
        for group in self.param_groups:
            n = len(group["params"])
            gparams, ggrads = group["params"], grads[offset:offset + n]
            idx = list(range(offset, offset + n))
            if partial and _any_none(ggrads):
                # as torch.optim with a .grad of None: the parameter is skipped
                # (no state made, no step counted, no weight decay)
                keep = [k for k, g in enumerate(ggrads) if g is not None]
                gparams, ggrads = [gparams[k] for k in keep], [ggrads[k] for k in keep]
                idx = [idx[k] for k in keep]
                if not keep:
                    offset += n
                    continue
            states = list(map(self.state.get, idx))
            keys = self._call_keys(states, group)
            # the usual case, without Python work per parameter: every parameter
            # has state, all at one step count, all with the same call key
            if keys is None and None not in states:
                counts = set(map(operator.itemgetter("step"), states))
                if len(counts) == 1:
                    calls.append((group, list(gparams), ggrads, idx, counts.pop() + 1))
                    offset += n
                    continue
            by_key: Dict[tuple, List[int]] = {}
            for k, state in enumerate(states):
                count = state["step"] + 1 if state is not None else 1
                key = (count,) if keys is None else (count,) + keys[k]
                by_key.setdefault(key, []).append(k)
            for key, ks in sorted(by_key.items()):
                calls.append((group, [gparams[k] for k in ks], [ggrads[k] for k in ks],
                              [idx[k] for k in ks], key[0]))
            offset += n
        return calls

    def _call_keys(self, states: List[Optional[Dict[str, Any]]],
                   group: Dict[str, Any]) -> Optional[List[tuple]]:
        """A key per parameter of the group (its state, None before the first
        step): parameters with different keys go to separate kernel calls.
        None: one key for all, said without Python work per parameter."""
        return None

    def _begin_step(self, grads, grad_scale, found_inf, num_threads):
        """What every step checks before its first kernel (CPU and GPU classes):
        (grads as a list, the parameters, whether found_inf skips the step)."""
        glist = as_list("grads", grads)
        params = self._sync_params()
        if len(glist) != len(params):
            raise ValueError(f"grads has {len(glist)} entries but the optimizer has "
                             f"{len(params)} parameters")
        for gi, group in enumerate(self.param_groups):
            self._check_group(gi, group)
        resolve_num_threads(num_threads)
        skip = self._ops.amp_args(grad_scale, found_inf)[0]
        return glist, params, skip

    def step(self, grads, *, grad_scale=None, found_inf=None,
             num_threads: Optional[int] = None) -> None:
        """Update every parameter from ``grads`` (same order as the parameters).

        A ``None`` in ``grads`` is PyTorch's ``.grad`` of None (a frozen or
        unused parameter): that parameter is skipped, with no state made, no
        step counted and no weight decay, as ``torch.optim`` does.
        ``grad_scale`` divides the gradients inside the kernel; a true
        ``found_inf`` skips the step entirely (nothing changes). Every group's
        hyperparameters and every array are checked before any is written: a
        step that raises has changed nothing."""
        glist, params, skip = self._begin_step(grads, grad_scale, found_inf, num_threads)
        partial = _any_none(glist)      # parameters without a gradient: skipped
        tensors = None
        if self._tensor_of:
            # the torch tensors written (None where a parameter is skipped: not
            # refused as an inference tensor, not told to autograd as written,
            # as in torch.optim). torch decides whether an inference tensor may
            # be written by the mode at the write, not at construction
            tensors = self._tensors_behind(params)
            if partial:
                tensors = [None if g is None else t for t, g in zip(tensors, glist)]
            chk.refuse_inference_writes("params", tensors)
        calls = self._calls(glist, partial)
        if skip or len(calls) > 1 or partial:
            # one kernel call checks all its arrays before writing any; several
            # calls are checked together first, so a later one cannot fail
            # after an earlier one has written (and where parameters without a
            # gradient are left out, so that messages count over all parameters)
            self._gather_all(params, glist, [c[3] for c in calls])
        if skip:
            # a skipped step refuses what a taken one would (a gradient that is
            # a state array), with no state made: parameters without any yet
            # are checked against a fresh one, not kept
            self._check_calls(calls, [[self.state[i] if i in self.state else
                                        self._init_state(p, group) for i, p in zip(idx, gp)]
                                       for group, gp, _, idx, _ in calls],
                              grad_scale, num_threads)
            return
        made = []                  # per call: (its states, new entries, sizes before)
        for group, gparams, ggrads, idx, step in calls:
            created = [i for i in idx if i not in self.state]
            for i, p in zip(idx, gparams):
                if i not in self.state:
                    self.state[i] = self._init_state(p, group)
            states = [self.state[i] for i in idx]
            made.append((states, created, list(map(len, states))))
        done = 0                   # calls whose kernels have run
        try:
            if len(calls) > 1 or partial:
                # (a partial step's single call too: its kernel would count its
                # messages over the parameters that have a gradient only)
                self._check_calls(calls, [m[0] for m in made], grad_scale, num_threads)
            for k, ((group, gparams, ggrads, idx, step), (states, _, _)) in enumerate(
                    zip(calls, made)):
                self._apply(group, gparams, ggrads, states, step, grad_scale, num_threads)
                for st in states:
                    st["step"] = step
                done = k + 1
        except BaseException:
            for states, created, sizes in made[done:]:
                self._forget_new_state(created, states, sizes)
            raise
        if tensors is not None:
            chk.bump_versions(tensors)

    def _check_calls(self, calls, states, grad_scale, num_threads) -> None:
        """Every kernel call's own checks (its step function with found_inf set:
        everything validated, nothing written), before the first call runs: a
        later call cannot refuse its arrays (a gradient that is one of its
        state arrays, say) after an earlier one has written. Indices in a
        message are over all the optimizer's parameters."""
        for (group, gparams, ggrads, idx, step), st in zip(calls, states):
            try:
                # on copies of the state dicts: what _apply adds (a first momentum
                # buffer) must not be there yet when the real call looks
                self._apply(group, gparams, ggrads, [dict(x) for x in st], step, grad_scale,
                            num_threads, found_inf=True)
            except (TypeError, ValueError) as exc:
                raise chk.renumbered(exc, _LIST_NAMES, idx) from None

    def _forget_new_state(self, created, states, sizes) -> None:
        """Undo the state a step made before its kernel call refused the arrays
        (the call checks them all before writing any): the entries of `created`
        and the arrays added to `states` since they had `sizes` entries (dicts
        keep insertion order: the new arrays are the last ones). Left behind,
        a zero momentum buffer would pass for an old one at the next step."""
        for s, n in zip(states, sizes):
            while len(s) > n:
                s.popitem()
        for i in created:
            self.state.pop(i, None)

    # ---- state
    def state_dict(self) -> Dict[str, Any]:
        """A deep copy: ``{"optimizer", "convention", "state": {index: {...}},
        "param_groups": [{hyperparameters, "params": [indices]}]}``."""
        self._sync_params()          # parameters edited in place take their state along
        groups = []
        for off, g in zip(self._group_offsets(), self.param_groups):
            d = {k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
            d["params"] = list(range(off, off + len(g["params"])))
            groups.append(d)
        # order="K": a Fortran-ordered parameter's state stays Fortran-ordered
        state = {i: {k: (v.copy(order="K") if hasattr(v, "copy") and hasattr(v, "shape")
                         else v)
                     for k, v in s.items()}
                 for i, s in self.state.items()}
        return {"optimizer": type(self).__name__, "convention": self.convention,
                "state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore hyperparameters and state bit for bit; the structure must match.

        Everything is checked before anything is replaced: a state_dict that
        raises leaves the optimizer as it was. Each parameter's state needs its
        step count (an integer >= 0) and the class's state arrays (same shape
        and dtype as the parameter); arrays created on first use (AMSGrad's
        max_exp_avg_sq, RMSprop's grad_avg and momentum_buffer, SGD's
        momentum_buffer) may be absent: they start as after switching the
        option on (at zero; SGD's torch-style buffer as the first gradient)."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        name = state_dict.get("optimizer")
        if name is None and "optimizer" not in state_dict:
            # torch.optim's state_dicts do not say which optimizer wrote them
            raise ValueError(
                f"state_dict has no 'optimizer' entry naming the class that wrote it (a "
                f"torch.optim state_dict? its tensors load as they are once you add "
                f"'optimizer': {type(self).__name__!r}, having checked that it is one)")
        if not isinstance(name, str) or name != type(self).__name__:
            raise ValueError(f"state_dict is for {name!r}, not {type(self).__name__!r}")
        for key in ("param_groups", "state"):
            if key not in state_dict:
                raise ValueError(f"state_dict has no {key!r} entry")
        _check_structure(state_dict)
        params = self._sync_params()
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer "
                             f"has {len(self.param_groups)}")
        new_hyper = []
        # the groups are checked under the convention they were saved with (the
        # rules differ: optax's SGD takes nesterov without momentum, torch's not)
        own_convention = self.convention
        self.convention = state_dict.get("convention", own_convention)
        try:
            # an unknown convention raises here, before anything is changed
            new_defaults = (self._defaults_of(self.convention, self._explicit_hyper)
                            if self.convention != own_convention else self.defaults)
            self._check_loaded_groups(groups, new_hyper)
        finally:
            self.convention = own_convention
        self._load_state(state_dict, params, new_hyper, new_defaults)

    def _check_loaded_groups(self, groups, new_hyper) -> None:
        for gi, (g_new, g_old) in enumerate(zip(groups, self.param_groups)):
            if "params" not in g_new:
                raise ValueError(f"state_dict's param_groups[{gi}] is not a dict with a "
                                 f"'params' entry")
            if len(g_new["params"]) != len(g_old["params"]):
                raise ValueError(f"state_dict's param_groups[{gi}] has {len(g_new['params'])} "
                                 f"parameters, the optimizer's has {len(g_old['params'])}")
            # keys that are not hyperparameters are carried along (add_param_group)
            hyper = {k: copy.deepcopy(v) for k, v in g_new.items() if k != "params"}
            self._check_group(gi, {**g_old, **hyper})     # keys need not be strings
            new_hyper.append(hyper)

    def _load_state(self, state_dict, params, new_hyper, new_defaults) -> None:
        new_state: Dict[int, Dict[str, Any]] = {}
        for key, s in state_dict["state"].items():
            i = int(key)
            if not 0 <= i < len(params):
                raise ValueError(f"state_dict has state for parameter {i}, which does not exist")
            # None is "no such array" (torch 1.x wrote momentum_buffer: None)
            missing = {"step", *self.state_arrays} - {k for k, v in s.items() if v is not None}
            if missing:
                raise ValueError(f"state_dict state[{i}] lacks {sorted(missing)}")
            entry = {}
            p = params[i]
            for name, v in s.items():
                if v is None and name in self.optional_arrays:
                    continue                  # absent: created at its first use
                if chk.is_torch_tensor(v):
                    # a torch tensor (torch.optim's checkpoints hold them, CPU or
                    # CUDA): its values as a NumPy array, copied below into the
                    # parameter's layout on this optimizer's device (its torch
                    # dtype never equalled the parameter's NumPy one: refused)
                    v = v.detach().cpu().resolve_conj().resolve_neg().numpy()
                elif self._xp is np:          # a GPU optimizer's state, loaded on the CPU
                    v = chk.host_copy_of_device_array(v)
                if name == "step":
                    entry[name] = self._load_step(chk.count(f"state_dict state[{i}]['step']", v))
                elif (name in self.state_arrays or name in self.optional_arrays
                      or hasattr(v, "shape") or isinstance(v, (list, tuple))):
                    if not hasattr(v, "shape"):       # a list, or a number for a 0-d parameter
                        v = np.asarray(v, dtype=p.dtype)
                    if tuple(v.shape) != tuple(p.shape) or v.dtype != p.dtype:
                        raise ValueError(f"state_dict state[{i}][{name!r}] has shape "
                                         f"{tuple(v.shape)} and dtype {v.dtype}; parameter {i} "
                                         f"has {p.shape}, {p.dtype}")
                    # in the parameter's memory order, which the kernels require
                    # (a checkpoint may hold a Fortran or channels-last
                    # parameter's state in C order): empty_like keeps p's layout
                    entry[name] = self._xp.empty_like(p)
                    entry[name][...] = self._xp.asarray(v)
                else:
                    entry[name] = copy.deepcopy(v)
            new_state[i] = entry
        for g_old, hyper in zip(self.param_groups, new_hyper):
            g_old.update(hyper)
        # a group added later gets the loaded convention's defaults (eps,
        # eps_style, ...), as the loaded groups have them
        self.defaults = new_defaults
        self.convention = state_dict.get("convention", self.convention)
        self.state = new_state
        self._removed_state = {}
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

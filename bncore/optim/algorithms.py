"""SGD, Adam, AdamW, RMSprop and Adagrad over the multi-tensor step functions.

Each class is a thin adapter: it maps its hyperparameters (PyTorch's names;
``betas`` as a pair) and per-parameter state onto one call of the step
function per parameter group. The formulas, per convention, are documented on
the functions in bncore.optimizers.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Dict

import numpy as np

from bncore import _checks as chk
from bncore import optimizers as _rules
from bncore.optim.optimizer import Optimizer

# _check_hyper runs the step functions' own rules (bncore.optimizers.*_hyper),
# at construction, at every step (before any kernel call) and in
# load_state_dict; the placeholder () stands for state lists the class supplies.

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"]


def _have_all(states, name: str) -> bool:
    """Every state holds `name` (a C-level loop: no Python work per parameter)."""
    return all(map(operator.contains, states, itertools.repeat(name)))


class SGD(Optimizer):
    """SGD with momentum (``bncore.sgd_step``). State: ``momentum_buffer``, from
    the first step with momentum > 0 (as torch's: that step sets it to the
    gradient, in the torch style, whatever the step count).

    conventions: torch (default), keras (``v = mu v + lr g; p -= v``, decoupled
    weight decay), optax (torch's formula with dampening 0), onnx (``Momentum``:
    momentum = alpha, dampening = 1 - beta, the first step is T = 0).
    """

    kind = "SGD"
    state_arrays = ()      # momentum_buffer is created at its first use
    optional_arrays = ("momentum_buffer",)

    def _nesterov(self, g: Dict[str, Any]) -> bool:
        # optax.sgd(nesterov=True) without momentum is plain SGD (torch raises;
        # the keras and onnx styles allow it in the step function itself)
        return bool(g["nesterov"]) and not (self.convention == "optax" and g["momentum"] == 0)

    def _check_hyper(self, g: Dict[str, Any]) -> None:
        _rules.sgd_hyper(g["lr"], g["momentum"], g["dampening"], self._nesterov(g),
                         g["weight_decay"], g["style"], ())

    def _call_keys(self, states, group):
        # torch's buffer starts as the gradient at its first use (also when
        # momentum is switched on mid-training, or a loaded state lacks it):
        # parameters without a buffer yet get kernel calls of their own, with
        # first_step, so each call's buffers are all new or all old (_apply)
        if not (group["momentum"] and group["style"] == "torch"):
            return None
        if None not in states and _have_all(states, "momentum_buffer"):
            return None
        return [(s is None or "momentum_buffer" not in s,) for s in states]

    def _apply(self, g, params, grads, states, step, grad_scale, num_threads,
               found_inf=None) -> None:
        momentum = g["momentum"]
        fresh = bool(momentum) and not _have_all(states, "momentum_buffer")
        if fresh:
            for s, p in zip(states, params):
                if "momentum_buffer" not in s:
                    s["momentum_buffer"] = self._xp.zeros_like(p)
        # torch style: first_step from the buffers' age (all new or all old in
        # one call, by _call_keys), not from the step count
        first = fresh if momentum and g["style"] == "torch" else None
        self._ops.sgd_step(
            params, grads,
            list(map(operator.itemgetter("momentum_buffer"), states)) if momentum else None,
            lr=g["lr"], momentum=momentum, dampening=g["dampening"],
            nesterov=self._nesterov(g), weight_decay=g["weight_decay"],
            maximize=g.get("maximize", False),
            first_step=bool(first), step=step if first is None else None,
            style=g["style"], decoupled_weight_decay=g["decoupled_weight_decay"],
            grad_scale=grad_scale, found_inf=found_inf, num_threads=num_threads)


class Adam(Optimizer):
    """Adam (``bncore.adam_step``). State: ``exp_avg``, ``exp_avg_sq`` and, with
    amsgrad, ``max_exp_avg_sq``.

    conventions: torch (default), keras (epsilon-hat, eps 1e-7, decoupled weight
    decay), optax (AMSGrad over the bias-corrected v, ``eps_root``), onnx
    (epsilon-hat, eps 1e-6, bias correction with ONNX's update count T = step - 1,
    ``weight_decay`` = norm_coefficient, ``weight_decay_post`` = norm_coefficient_post).
    """

    kind = "Adam"
    state_arrays = ("exp_avg", "exp_avg_sq")
    optional_arrays = ("max_exp_avg_sq",)

    def _check_hyper(self, g: Dict[str, Any]) -> None:
        betas = g["betas"]
        try:
            b1, b2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}") from None
        chk.in_unit_interval("betas[0]", b1, closed_right=False)
        chk.in_unit_interval("betas[1]", b2, closed_right=False)
        _rules.adam_hyper(g["lr"], b1, b2, g["eps"], g["eps_root"], g["weight_decay"],
                          g["weight_decay_post"], g["eps_style"], g["amsgrad"], ())

    def _init_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        s = super()._init_state(p, group)
        if group["amsgrad"]:
            s["max_exp_avg_sq"] = self._xp.zeros_like(p)
        return s

    def _apply(self, g, params, grads, states, step, grad_scale, num_threads,
               found_inf=None) -> None:
        if g["amsgrad"]:
            for s, p in zip(states, params):
                s.setdefault("max_exp_avg_sq", self._xp.zeros_like(p))
        b1, b2 = g["betas"]
        self._ops.adam_step(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                  step=step, lr=g["lr"], beta1=b1, beta2=b2, eps=g["eps"],
                  weight_decay=g["weight_decay"],
                  decoupled_weight_decay=g["decoupled_weight_decay"], amsgrad=g["amsgrad"],
                  max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if g["amsgrad"] else None,
                  maximize=g.get("maximize", False), eps_style=g["eps_style"],
                  eps_root=g["eps_root"],
                  bias_correction_step=step - 1 if g["onnx_update_count"] else None,
                  weight_decay_post=g["weight_decay_post"], grad_scale=grad_scale,
                  found_inf=found_inf, num_threads=num_threads)


class AdamW(Adam):
    """Adam with decoupled weight decay, ``p *= 1 - lr * weight_decay`` (torch's
    default weight_decay 1e-2; keras 4e-3; optax 1e-4)."""

    kind = "AdamW"


class RMSprop(Optimizer):
    """RMSprop (``bncore.rmsprop_step``). State: ``square_avg``, ``grad_avg``
    (centered), ``momentum_buffer`` (momentum > 0).

    conventions: torch (default; eps outside the sqrt), keras (rho 0.9, eps 1e-7
    inside the sqrt, lr inside the momentum buffer), optax (decay 0.9, eps 1e-8
    inside the sqrt, lr inside the momentum buffer as in Keras: optax applies
    the learning rate before ``trace``).
    """

    kind = "RMSprop"
    state_arrays = ("square_avg",)
    optional_arrays = ("grad_avg", "momentum_buffer")

    def _check_hyper(self, g: Dict[str, Any]) -> None:
        _rules.rmsprop_hyper(g["lr"], g["alpha"], g["eps"], g["weight_decay"], g["momentum"],
                             g["style"], g["centered"], (), ())

    def _apply(self, g, params, grads, states, step, grad_scale, num_threads,
               found_inf=None) -> None:
        for s, p in zip(states, params):
            if g["centered"]:
                s.setdefault("grad_avg", self._xp.zeros_like(p))
            if g["momentum"]:
                s.setdefault("momentum_buffer", self._xp.zeros_like(p))
        self._ops.rmsprop_step(params, grads, [s["square_avg"] for s in states], lr=g["lr"],
                     alpha=g["alpha"], eps=g["eps"], weight_decay=g["weight_decay"],
                     momentum=g["momentum"], centered=g["centered"],
                     grad_avgs=[s["grad_avg"] for s in states] if g["centered"] else None,
                     momentum_buffers=([s["momentum_buffer"] for s in states]
                                       if g["momentum"] else None),
                     maximize=g.get("maximize", False), eps_inside_sqrt=g["eps_inside_sqrt"],
                     style=g["style"], decoupled_weight_decay=g["decoupled_weight_decay"],
                     grad_scale=grad_scale, found_inf=found_inf, num_threads=num_threads)


class Adagrad(Optimizer):
    """Adagrad (``bncore.adagrad_step``). State: ``sum``, initialised to
    ``initial_accumulator_value`` (torch 0; keras and optax 0.1).

    conventions: torch (default), keras and optax (eps inside the sqrt), onnx
    (eps 1e-6; ``lr_decay`` is ONNX's decay_factor).
    """

    kind = "Adagrad"
    state_arrays = ("sum",)    # made by _init_state (initial_accumulator_value); required

    def _check_hyper(self, g: Dict[str, Any]) -> None:
        _rules.adagrad_hyper(g["lr"], g["lr_decay"], g["weight_decay"], g["eps"])
        chk.non_negative("initial_accumulator_value", g["initial_accumulator_value"])

    def _init_state(self, p: np.ndarray, group: Dict[str, Any]) -> Dict[str, Any]:
        return {"step": 0, "sum": self._xp.full_like(p, group["initial_accumulator_value"])}

    def _apply(self, g, params, grads, states, step, grad_scale, num_threads,
               found_inf=None) -> None:
        self._ops.adagrad_step(params, grads, [s["sum"] for s in states], step=step, lr=g["lr"],
                     lr_decay=g["lr_decay"], weight_decay=g["weight_decay"], eps=g["eps"],
                     maximize=g.get("maximize", False), eps_inside_sqrt=g["eps_inside_sqrt"],
                     decoupled_weight_decay=g["decoupled_weight_decay"], grad_scale=grad_scale,
                     found_inf=found_inf, num_threads=num_threads)

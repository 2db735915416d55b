"""Registry specs for the optimizer and clipping ops (see registry.py).

A case is a few steps (1 or 3, with a changing learning rate) on a list of
tensors of random sizes, with every flag of the op drawn from its space.
Outputs are the concatenated parameters and state after the last step.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from bncore.testing import reference as ref
from bncore.testing.registry import (LARGE_ELEMENTS, Arrays, Backend, Case, OpSpec, Params,
                                     register)

COMMON = {
    "seed": range(0, 2 ** 16),
    "dtype": ("float32", "float64", "float16_grads"),
    "ntensors": (3, 1, 7),
    "steps": (3, 1),
    "maximize": (False, True),
    "weight_decay": (0.0, 0.01),
    "decoupled": (False, True),
    "grad_scale": (None, 1024.0),
}

SGD_SPACE = dict(COMMON, momentum=(0.9, 0.0), dampening=(0.0, 0.3), nesterov=(False, True),
                 style=("torch", "keras", "onnx"))
ADAM_SPACE = dict(COMMON, amsgrad=(False, True), eps_style=("torch", "hat", "optax"),
                  eps_root=(0.0, 1e-8), onnx_t=(False, True), weight_decay_post=(0.0, 0.01))
RMSPROP_SPACE = dict(COMMON, centered=(False, True), momentum=(0.0, 0.5),
                     eps_inside_sqrt=(False, True), style=("torch", "keras"))
ADAGRAD_SPACE = dict(COMMON, lr_decay=(0.0, 0.01), eps_inside_sqrt=(False, True),
                     initial=(0.0, 0.1))


def _dtypes(p: Params):
    if p["dtype"] == "float64":
        return np.float64, np.float64
    if p["dtype"] == "float16_grads":
        return np.float32, np.float16
    return np.float32, np.float32


def _tensors(p: Params, rng) -> List[tuple]:
    shapes = []
    for _ in range(p["ntensors"]):
        nd = int(rng.integers(1, 4))
        shape = tuple(int(s) for s in rng.integers(1, 24, nd))
        if rng.random() < 0.2:
            shape = (int(rng.integers(1, 20000)),)     # long enough to span several chunks
        shapes.append(shape)
    if p.get("large"):
        # past the one-thread cutoff (32768 elements), across several chunks
        shapes.append((int(rng.integers(LARGE_ELEMENTS, 2 * LARGE_ELEMENTS)),))
    return shapes


def _base_case(p: Params, n_state: int, state_init: float = 0.0) -> Case:
    rng = np.random.default_rng(p["seed"])
    pdt, gdt = _dtypes(p)
    shapes = _tensors(p, rng)
    scale = p["grad_scale"] or 1.0
    arrays: Dict[str, Any] = {
        "params": [rng.standard_normal(s).astype(pdt) for s in shapes],
        "grads": [[(rng.standard_normal(s) * 0.1 * scale).astype(gdt) for s in shapes]
                  for _ in range(p["steps"])],
        "state": [[np.full(s, state_init, dtype=pdt) for s in shapes] for _ in range(n_state)],
    }
    lrs = [0.05 * (1.0 - 0.2 * k) for k in range(p["steps"])]
    return Case(dict(p), arrays, {"lrs": lrs})


def _copy_lists(backend: Backend, case: Case):
    params = [backend.to_device(a.copy()) for a in case.arrays["params"]]
    state = [[backend.to_device(a.copy()) for a in lst] for lst in case.arrays["state"]]
    return params, state


def _step_calls(backend: Backend, case: Case, k: int):
    """The (gradients, found_inf) of the calls that make step k: one, and on
    half the multi-step draws a call before step 1 with an Inf in the
    gradients and found_inf=True, which must change nothing (the AMP skip;
    the oracle does not see it)."""
    g = [backend.to_device(a) for a in case.arrays["grads"][k]]
    if k != 1 or int(case.params["seed"]) % 2 == 0:
        return [(g, None)]
    bad = []
    for a in case.arrays["grads"][k]:
        b = a.copy()
        if b.size:
            b.reshape(-1)[b.size // 2] = np.inf
        bad.append(backend.to_device(b))
    return [(bad, True), (g, None)]


def _collect(backend: Backend, params, state, names) -> Arrays:
    out = {"params": np.concatenate([backend.to_host(a).astype(np.float64).reshape(-1)
                                     for a in params])}
    for name, lst in zip(names, state):
        out[name] = np.concatenate([backend.to_host(a).astype(np.float64).reshape(-1)
                                    for a in lst])
    return out


def _tolerance(case: Case, key: str) -> float:
    return 1e-12 if case.params["dtype"] == "float64" else 1e-6


def _inv(case: Case) -> float:
    gs = case.params["grad_scale"]
    return 1.0 if gs is None else 1.0 / gs


# ---- SGD

def _sgd_fix(p: Params) -> Params:
    """The drawn flags as each style allows them: torch refuses nesterov without
    momentum or with dampening, Keras has no dampening."""
    p = dict(p)
    if p["nesterov"] and p["style"] == "torch" and (p["momentum"] == 0.0 or p["dampening"]):
        p["nesterov"] = False
    if p["style"] == "keras":
        p["dampening"] = 0.0
    return p


def make_sgd_case(p: Params) -> Case:
    return _base_case(_sgd_fix(p), 1)


def _sgd_kwargs(case: Case, k: int) -> dict:
    p = case.params
    return dict(lr=case.kwargs["lrs"][k], momentum=p["momentum"], dampening=p["dampening"],
                nesterov=p["nesterov"], weight_decay=p["weight_decay"], maximize=p["maximize"],
                first_step=k == 0, style=p["style"], decoupled_weight_decay=p["decoupled"])


def _sgd_call(backend: Backend, case: Case, num_threads) -> Arrays:
    params, state = _copy_lists(backend, case)
    for k in range(len(case.arrays["grads"])):
        for g, skip in _step_calls(backend, case, k):
            backend.module.sgd_step(params, g, state[0], grad_scale=case.params["grad_scale"],
                                    found_inf=skip, num_threads=num_threads,
                                    **_sgd_kwargs(case, k))
    out = _collect(backend, params, state if _sgd_keeps_buffers(case) else [],
                   ["momentum_buffers"])
    return out


def _sgd_keeps_buffers(case: Case) -> bool:
    # with momentum; in the ONNX style at alpha = 0 too (V = beta' G)
    return bool(case.params["momentum"]) or case.params["style"] == "onnx"


def _sgd_oracle(case: Case) -> Arrays:
    params = [a for a in case.arrays["params"]]
    bufs = [a for a in case.arrays["state"][0]]
    for k, grads in enumerate(case.arrays["grads"]):
        kw = _sgd_kwargs(case, k)
        res = [ref.sgd(p, g, b, inv_scale=_inv(case), **kw) for p, g, b in zip(params, grads, bufs)]
        params = [r[0] for r in res]
        bufs = [r[1] for r in res]
    out = {"params": np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in params])}
    if _sgd_keeps_buffers(case):
        out["momentum_buffers"] = np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in bufs])
    return out


# ---- Adam

def make_adam_case(p: Params) -> Case:
    p = dict(p)
    if p["eps_style"] == "hat":
        p["eps_root"] = 0.0
    if not p["onnx_t"]:
        p["weight_decay_post"] = 0.0
    return _base_case(p, 3)


def _adam_kwargs(case: Case, k: int) -> dict:
    p = case.params
    return dict(step=k + 1, lr=case.kwargs["lrs"][k] * 0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                weight_decay=p["weight_decay"], decoupled_weight_decay=p["decoupled"],
                amsgrad=p["amsgrad"], maximize=p["maximize"], eps_style=p["eps_style"],
                eps_root=p["eps_root"], bias_correction_step=k if p["onnx_t"] else None,
                weight_decay_post=p["weight_decay_post"])


def _adam_call(backend: Backend, case: Case, num_threads) -> Arrays:
    params, state = _copy_lists(backend, case)
    for k in range(len(case.arrays["grads"])):
        kw = _adam_kwargs(case, k)
        for g, skip in _step_calls(backend, case, k):
            backend.module.adam_step(params, g, state[0], state[1], max_exp_avg_sqs=state[2],
                                     grad_scale=case.params["grad_scale"], found_inf=skip,
                                     num_threads=num_threads, **kw)
    names = ["exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"]
    return _collect(backend, params, state if case.params["amsgrad"] else state[:2], names)


def _adam_oracle(case: Case) -> Arrays:
    params = list(case.arrays["params"])
    m, v, vm = (list(s) for s in case.arrays["state"])
    for k, grads in enumerate(case.arrays["grads"]):
        kw = _adam_kwargs(case, k)
        res = [ref.adam(*args, inv_scale=_inv(case), **kw)
               for args in zip(params, grads, m, v, vm)]
        params, m, v, vm = ([r[i] for r in res] for i in range(4))
    cat = lambda lst: np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in lst])  # noqa: E731
    out = {"params": cat(params), "exp_avgs": cat(m), "exp_avg_sqs": cat(v)}
    if case.params["amsgrad"]:
        out["max_exp_avg_sqs"] = cat(vm)
    return out


# ---- RMSprop

def make_rmsprop_case(p: Params) -> Case:
    return _base_case(p, 3)


def _rmsprop_kwargs(case: Case, k: int) -> dict:
    p = case.params
    return dict(lr=case.kwargs["lrs"][k] * 0.1, alpha=0.9, eps=1e-8, weight_decay=p["weight_decay"],
                momentum=p["momentum"], centered=p["centered"], maximize=p["maximize"],
                eps_inside_sqrt=p["eps_inside_sqrt"], style=p["style"],
                decoupled_weight_decay=p["decoupled"])


def _rmsprop_call(backend: Backend, case: Case, num_threads) -> Arrays:
    params, state = _copy_lists(backend, case)
    for k in range(len(case.arrays["grads"])):
        for g, skip in _step_calls(backend, case, k):
            backend.module.rmsprop_step(params, g, state[0], grad_avgs=state[1],
                                        momentum_buffers=state[2],
                                        grad_scale=case.params["grad_scale"], found_inf=skip,
                                        num_threads=num_threads, **_rmsprop_kwargs(case, k))
    names, lists = ["square_avgs"], [state[0]]
    if case.params["centered"]:
        names.append("grad_avgs")
        lists.append(state[1])
    if case.params["momentum"]:
        names.append("momentum_buffers")
        lists.append(state[2])
    return _collect(backend, params, lists, names)


def _rmsprop_oracle(case: Case) -> Arrays:
    params = list(case.arrays["params"])
    sq, ga, mb = (list(s) for s in case.arrays["state"])
    for k, grads in enumerate(case.arrays["grads"]):
        kw = _rmsprop_kwargs(case, k)
        res = [ref.rmsprop(*args, inv_scale=_inv(case), **kw)
               for args in zip(params, grads, sq, ga, mb)]
        params, sq, ga, mb = ([r[i] for r in res] for i in range(4))
    cat = lambda lst: np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in lst])  # noqa: E731
    out = {"params": cat(params), "square_avgs": cat(sq)}
    if case.params["centered"]:
        out["grad_avgs"] = cat(ga)
    if case.params["momentum"]:
        out["momentum_buffers"] = cat(mb)
    return out


# ---- Adagrad

def make_adagrad_case(p: Params) -> Case:
    return _base_case(p, 1, state_init=p["initial"])


def _adagrad_kwargs(case: Case, k: int) -> dict:
    p = case.params
    return dict(step=k + 1, lr=case.kwargs["lrs"][k], lr_decay=p["lr_decay"],
                weight_decay=p["weight_decay"], eps=1e-10 if not p["eps_inside_sqrt"] else 1e-7,
                maximize=p["maximize"], eps_inside_sqrt=p["eps_inside_sqrt"],
                decoupled_weight_decay=p["decoupled"])


def _adagrad_call(backend: Backend, case: Case, num_threads) -> Arrays:
    params, state = _copy_lists(backend, case)
    for k in range(len(case.arrays["grads"])):
        for g, skip in _step_calls(backend, case, k):
            backend.module.adagrad_step(params, g, state[0], grad_scale=case.params["grad_scale"],
                                        found_inf=skip, num_threads=num_threads,
                                        **_adagrad_kwargs(case, k))
    return _collect(backend, params, state, ["state_sums"])


def _adagrad_oracle(case: Case) -> Arrays:
    params = list(case.arrays["params"])
    hs = list(case.arrays["state"][0])
    for k, grads in enumerate(case.arrays["grads"]):
        kw = _adagrad_kwargs(case, k)
        res = [ref.adagrad(p, g, h, inv_scale=_inv(case), **kw) for p, g, h in zip(params, grads, hs)]
        params = [r[0] for r in res]
        hs = [r[1] for r in res]
    cat = lambda lst: np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in lst])  # noqa: E731
    return {"params": cat(params), "state_sums": cat(hs)}


register(OpSpec("sgd_step", ("sgd_step",), SGD_SPACE, make_sgd_case, _sgd_call, _sgd_oracle,
                _tolerance))
register(OpSpec("adam_step", ("adam_step",), ADAM_SPACE, make_adam_case, _adam_call,
                _adam_oracle, _tolerance))
register(OpSpec("rmsprop_step", ("rmsprop_step",), RMSPROP_SPACE, make_rmsprop_case,
                _rmsprop_call, _rmsprop_oracle, _tolerance))
register(OpSpec("adagrad_step", ("adagrad_step",), ADAGRAD_SPACE, make_adagrad_case,
                _adagrad_call, _adagrad_oracle, _tolerance))


# ---- clipping and norms

CLIP_SPACE = {
    "seed": range(0, 2 ** 16),
    "dtype": ("float32", "float64", "float16"),
    "ntensors": (3, 1, 7),
    "norm_type": (2.0, 1.0, float("inf"), 3.0, 0.5),
    "ratio": (0.5, 2.0),          # max_norm / total
    "eps": (1e-6, 0.0),
    "nonfinite": (False, False, False, True),
}


def make_clip_case(p: Params) -> Case:
    rng = np.random.default_rng(p["seed"])
    dt = {"float16": np.float16, "float32": np.float32, "float64": np.float64}[p["dtype"]]
    shapes = _tensors(p, rng)
    grads = [(rng.standard_normal(s) * rng.uniform(0.1, 3)).astype(dt) for s in shapes]
    if p["nonfinite"]:
        t = int(rng.integers(len(grads)))
        grads[t].reshape(-1)[int(rng.integers(grads[t].size))] = rng.choice([np.inf, -np.inf, np.nan])
    total = ref.global_norm(grads, p["norm_type"])
    max_norm = p["ratio"] * total if np.isfinite(total) else 1.0
    return Case(dict(p), {"grads": grads}, {"max_norm": float(max_norm)})


def _clip_call(backend: Backend, case: Case, num_threads) -> Arrays:
    g = [backend.to_device(a.copy()) for a in case.arrays["grads"]]
    total = backend.module.clip_grad_norm(g, case.kwargs["max_norm"],
                                          norm_type=case.params["norm_type"],
                                          eps=case.params["eps"], num_threads=num_threads)
    return {"total": np.asarray(float(backend.to_host(total)) if not isinstance(total, float) else total),
            "grads": np.concatenate([backend.to_host(a).astype(np.float64).reshape(-1) for a in g])}


def _clip_oracle(case: Case) -> Arrays:
    grads, total = ref.clip_by_norm(case.arrays["grads"], case.kwargs["max_norm"],
                                    case.params["norm_type"], case.params["eps"])
    if not np.isfinite(total):
        coef = case.kwargs["max_norm"] / (total + case.params["eps"])
        with np.errstate(invalid="ignore"):  # inf * 0 -> NaN is the convention
            grads = [np.asarray(g, np.float64) * coef for g in case.arrays["grads"]]
    dt = case.arrays["grads"][0].dtype
    return {"total": np.asarray(total),
            # the stored gradients are rounded to their dtype once
            "grads": np.concatenate([np.asarray(g).astype(dt).astype(np.float64).reshape(-1)
                                     for g in grads])}


def _clip_tolerance(case: Case, key: str) -> float:
    if key == "total":
        return 1e-12
    # each stored gradient is the float64 product rounded once, as the oracle's:
    # they differ only where a 1e-16 difference in the coefficient meets a tie
    return {"float64": 1e-14, "float32": 1e-7, "float16": 1e-6}[case.params["dtype"]]


def _norm_call(backend: Backend, case: Case, num_threads) -> Arrays:
    g = [backend.to_device(a) for a in case.arrays["grads"]]
    total = backend.module.grad_norm(g, case.params["norm_type"], num_threads=num_threads)
    return {"total": np.asarray(float(backend.to_host(total)) if not isinstance(total, float) else total)}


def _norm_oracle(case: Case) -> Arrays:
    return {"total": np.asarray(ref.global_norm(case.arrays["grads"], case.params["norm_type"]))}


def _value_call(backend: Backend, case: Case, num_threads) -> Arrays:
    g = [backend.to_device(a.copy()) for a in case.arrays["grads"]]
    backend.module.clip_grad_value(g, case.kwargs["max_norm"] / 10.0, num_threads=num_threads)
    return {"grads": np.concatenate([backend.to_host(a).astype(np.float64).reshape(-1) for a in g])}


def _value_oracle(case: Case) -> Arrays:
    c = case.kwargs["max_norm"] / 10.0
    dt = case.arrays["grads"][0].dtype
    out = []
    for g in case.arrays["grads"]:
        g = np.asarray(g, np.float64)
        clipped = np.where(g > c, c, np.where(g < -c, -c, g))      # NaN stays NaN
        out.append(clipped.astype(dt).astype(np.float64).reshape(-1))
    return {"grads": np.concatenate(out)}


def _found_call(backend: Backend, case: Case, num_threads) -> Arrays:
    g = [backend.to_device(a) for a in case.arrays["grads"]]
    return {"found_inf": np.asarray(bool(backend.module.found_inf(g, num_threads=num_threads)))}


def _found_oracle(case: Case) -> Arrays:
    return {"found_inf": np.asarray(not all(np.isfinite(np.asarray(g, np.float64)).all()
                                            for g in case.arrays["grads"]))}


register(OpSpec("clip_grad_norm", ("clip_grad_norm",), CLIP_SPACE, make_clip_case, _clip_call,
                _clip_oracle, _clip_tolerance))
register(OpSpec("grad_norm", ("grad_norm",), CLIP_SPACE, make_clip_case, _norm_call,
                _norm_oracle, _clip_tolerance))
register(OpSpec("clip_grad_value", ("clip_grad_value",), CLIP_SPACE, make_clip_case, _value_call,
                _value_oracle, _clip_tolerance))
register(OpSpec("found_inf", ("found_inf",), CLIP_SPACE, make_clip_case, _found_call,
                _found_oracle, lambda case, key: 0.0))

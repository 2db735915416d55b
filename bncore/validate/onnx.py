"""ONNX against bncore (convention "onnx"): ``onnx.reference.ReferenceEvaluator``
and onnxruntime, on models built with ``onnx.helper``.

* BatchNormalization (opset 15), inference and ``training_mode=1``: ONNX's
  ``momentum`` 0.9 is a decay (bncore rate ``1 - momentum``), the running
  variance takes the biased batch variance.
* Adam, Momentum (standard and Nesterov) and Adagrad from the
  ``ai.onnx.preview.training`` domain, run for several steps with T = 0, 1,
  2, ... (the official node tests only reach T = 0 or a single T):
  Adam = ``adam_step(eps_style="hat", bias_correction_step=T,
  weight_decay=norm_coefficient, weight_decay_post=norm_coefficient_post)``;
  Momentum = ``sgd_step(style="onnx", momentum=alpha, dampening=1 - beta,
  weight_decay=norm_coefficient, first_step=T == 0)``; Adagrad =
  ``adagrad_step(step=T + 1, lr_decay=decay_factor, weight_decay=norm_coefficient,
  eps=epsilon)``.

ONNX stores float attributes as float32, so every hyperparameter here is a
float32 number, passed to bncore as that exact value.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np

import bncore
from bncore.validate.data import (SHAPES, bn_data, bn_label, cast, concat, lr_schedule,
                                  optim_data, other_variance)
from bncore.conventions import BATCH_NORM
from bncore.validate.report import Check, Report

# bncore's side of the batch-norm rows takes the preset (so that a wrong preset
# shows); the framework's side takes its own defaults
PRESET = BATCH_NORM["onnx"]

REQUIRES = ("onnx",)
STEPS = 5
TRAINING_DOMAIN = "ai.onnx.preview.training"
STATE_NAMES = {"Adam": ("V", "H"), "Momentum": ("V",), "Adagrad": ("H",)}


def f32(v: float) -> float:
    """The value ONNX stores for a float attribute."""
    return float(np.float32(v))


def versions() -> Dict[str, str]:
    import onnx

    out = {"onnx": onnx.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        out["onnxruntime"] = "not installed"
    except Exception as exc:  # noqa: BLE001 - installed but broken: its rows are skipped
        out["onnxruntime"] = f"broken ({type(exc).__name__})"
    out["bncore"] = bncore.__version__
    return out


def _tp(dtype):
    from onnx import TensorProto

    return TensorProto.DOUBLE if dtype == "float64" else TensorProto.FLOAT


# --------------------------------------------------------------------------
# models

def bn_model(training: bool, dtype: str, epsilon=None, momentum=None):
    from onnx import helper

    outs = ["y", "running_mean", "running_var"] if training else ["y"]
    # attributes not given take ONNX's defaults (epsilon 1e-5, momentum 0.9)
    attrs = {k: v for k, v in dict(epsilon=epsilon, momentum=momentum).items() if v is not None}
    if training:
        attrs["training_mode"] = 1
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], outs,
                            **attrs)
    ins = [helper.make_tensor_value_info(n, _tp(dtype), None)
           for n in ("x", "scale", "bias", "mean", "var")]
    outv = [helper.make_tensor_value_info(n, _tp(dtype), None) for n in outs]
    graph = helper.make_graph([node], "bn", ins, outv)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])


def training_model(op: str, n: int, dtype: str, **attrs):
    """An ai.onnx.preview.training optimizer node over n tensors."""
    from onnx import TensorProto, helper

    states = {"Adam": ("V", "H"), "Momentum": ("V",), "Adagrad": ("H",)}[op]
    xs = [f"X{i}" for i in range(n)]
    gs = [f"G{i}" for i in range(n)]
    st = [[f"{s}{i}" for i in range(n)] for s in states]
    inputs = ["R", "T"] + xs + gs + [name for lst in st for name in lst]
    outputs = [f"{x}_new" for x in xs] + [f"{name}_new" for lst in st for name in lst]
    node = helper.make_node(op, inputs, outputs, domain=TRAINING_DOMAIN, **attrs)
    vi = [helper.make_tensor_value_info("R", _tp(dtype), []),
          helper.make_tensor_value_info("T", TensorProto.INT64, [])]
    vi += [helper.make_tensor_value_info(name, _tp(dtype), None) for name in inputs[2:]]
    vo = [helper.make_tensor_value_info(name, _tp(dtype), None) for name in outputs]
    graph = helper.make_graph([node], op.lower(), vi, vo)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15),
                                                   helper.make_opsetid(TRAINING_DOMAIN, 1)])


def _session(model, engine: str):
    if engine == "reference":
        from onnx.reference import ReferenceEvaluator

        return lambda feeds: ReferenceEvaluator(model).run(None, feeds)
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


# --------------------------------------------------------------------------
# batch norm

def _bn(engine: str, training: bool, offset=None, shape=(8, 4, 6, 6), seed=30) -> Check:
    def run(dtype, centered=False, unbiased=PRESET.unbiased_running_var):
        x, e = bn_data(shape, 1, offset, centered, seed)
        feeds = {"x": cast(x, dtype), "scale": cast(e["weight"], dtype),
                 "bias": cast(e["bias"], dtype), "mean": cast(e["running_mean"], dtype),
                 "var": cast(e["running_var"], dtype)}
        outs = _session(bn_model(training, dtype), engine)(feeds)
        fw = dict(zip(("y", "running_mean", "running_var"), outs))
        rm, rv = feeds["mean"].copy(), feeds["var"].copy()
        y, _, _ = bncore.batch_norm_forward(feeds["x"], feeds["scale"], feeds["bias"], rm, rv,
                                            training=training, momentum=PRESET.momentum,
                                            eps=PRESET.eps, axis=PRESET.axis,
                                            unbiased_running_var=unbiased)
        bn = {"y": y, "running_mean": rm, "running_var": rv} if training else {"y": y}
        return fw, bn

    cond, cfg = bn_label(f"{engine}, {'training_mode=1' if training else 'inference'}", shape, "",
                         1, offset, seed)
    show = training and not offset
    emulations = {}
    if offset and engine == "onnxruntime":
        emulations = {"a folded scale/shift y = x*scale + (bias - mean*scale)": _folded(shape, offset, seed)}
    return Check("BatchNormalization", cfg, run, centered=bool(offset), condition=cond,
                 alternatives=other_variance(PRESET, lambda dt, u: run(dt, unbiased=u)[1])
                 if show else {}, show_alternatives=show,
                 alt_keys=("running_var",) if show else None, emulations=emulations,
                 note="running_var: ONNX folds in the biased batch variance (momentum 0.9 is a "
                      "decay: bncore rate 0.1)." if show else "")


def _folded(shape, offset, seed):
    def emulate(dtype):
        x, e = bn_data(shape, 1, offset, False, seed)
        f = np.float32
        x64 = x.astype(np.float64)
        red = (0,) + tuple(range(2, len(shape)))
        mean, var = x64.mean(axis=red).astype(f), x64.var(axis=red).astype(f)
        scale = e["weight"] / np.sqrt(var + f(1e-5))
        shift = e["bias"] - mean * scale
        b = (1, -1) + (1,) * (len(shape) - 2)
        return {"y": x * scale.reshape(b) + shift.reshape(b)}
    return emulate


# --------------------------------------------------------------------------
# training operators, several steps with T = 0, 1, 2, ...

def _optim(op: str, attrs: dict, lr0=0.05, seed=31, single=False) -> Check:
    attrs = {k: (f32(v) if isinstance(v, float) else v) for k, v in attrs.items()}

    def run(dtype, centered=False):
        params, grads = optim_data(STEPS, seed, shapes=[(2000,)] if single else SHAPES)
        lrs = lr_schedule(lr0, STEPS)
        n = len(params)
        nstate = {"Adam": 2, "Momentum": 1, "Adagrad": 1}[op]
        sess = _session(training_model(op, n, dtype, **attrs), "reference")
        X = [cast(p, dtype) for p in params]
        S = [[np.zeros_like(x) for x in X] for _ in range(nstate)]
        for T in range(STEPS):
            feeds = {"R": np.array(lrs[T], dtype=X[0].dtype), "T": np.array(T, dtype=np.int64)}
            feeds.update({f"X{i}": X[i] for i in range(n)})
            feeds.update({f"G{i}": cast(grads[T][i], dtype) for i in range(n)})
            names = {"Adam": "VH", "Momentum": "V", "Adagrad": "H"}[op]
            for s, lst in zip(names, S):
                feeds.update({f"{s}{i}": lst[i] for i in range(n)})
            out = sess(feeds)
            X = list(out[:n])
            S = [list(out[n * (k + 1):n * (k + 2)]) for k in range(nstate)]
        fw = {"params": concat(X)}
        for name, lst in zip(STATE_NAMES[op], S):
            fw[name] = concat(lst)
        return fw, _ours(op, attrs, params, grads, lrs, dtype)

    short = {"epsilon": "eps", "norm_coefficient": "norm", "norm_coefficient_post": "post",
             "decay_factor": "decay"}
    flags = " ".join(f"{short.get(k, k)}={v:.6g}" if isinstance(v, float) else
                     f"{short.get(k, k)}={v}" for k, v in attrs.items())
    def ref_scalars(dtype):
        params, grads = optim_data(STEPS, seed, shapes=[(2000,)] if single else SHAPES)
        return _ours(op, attrs, params, grads, lr_schedule(lr0, STEPS), dtype, ref_scalars=True)

    n = "1 tensor" if single else f"{len(SHAPES)} tensors"
    alts = {}
    if op == "Adam":
        alts = {"the factor 1 - norm_coefficient_post rounded to float32 (onnx.reference "
                "keeps attributes as np.float32 scalars)": ref_scalars}
    return Check(op, f"reference, {n}, {flags}", run, quirks=alts)


def _onnx_ref_post(a) -> float:
    """onnx.reference keeps float attributes as np.float32 scalars, so Adam's
    ``(1 - norm_coefficient_post) * x_new`` takes the factor rounded to float32,
    also for float64 tensors (its other scalar factors meet the int64 T or a
    float64 tensor first and are computed in float64)."""
    f = np.float32
    return 1.0 - float(f(1) - f(a.get("norm_coefficient_post", 0.0)))


def _ours(op, a, params, grads, lrs, dtype, ref_scalars=False):
    P = [cast(p, dtype) for p in params]
    S = [[np.zeros_like(p) for p in P] for _ in range(2)]
    for T in range(STEPS):
        G = [cast(g, dtype) for g in grads[T]]
        if op == "Adam":
            post = _onnx_ref_post(a) if ref_scalars else a.get("norm_coefficient_post", 0.0)
            bncore.adam_step(P, G, S[0], S[1], step=T + 1, lr=lrs[T], beta1=a["alpha"],
                             beta2=a["beta"], eps=a["epsilon"], eps_style="hat",
                             bias_correction_step=T, weight_decay=a.get("norm_coefficient", 0.0),
                             weight_decay_post=post)
        elif op == "Momentum":
            bncore.sgd_step(P, G, S[0], lr=lrs[T], momentum=a["alpha"], dampening=1.0 - a["beta"],
                            weight_decay=a["norm_coefficient"], style="onnx",
                            nesterov=a["mode"] == "nesterov", first_step=T == 0)
        else:
            bncore.adagrad_step(P, G, S[0], step=T + 1, lr=lrs[T], lr_decay=a["decay_factor"],
                                weight_decay=a["norm_coefficient"], eps=a["epsilon"])
    out = {"params": concat(P)}
    for name, lst in zip(STATE_NAMES[op], S):
        out[name] = concat(lst)
    return out


def _ort_available() -> Optional[str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime not installed (pip install \"bncore[validate]\"); its rows skipped"
    except Exception as exc:  # noqa: BLE001 - installed but broken counts as missing
        return f"onnxruntime cannot be imported ({type(exc).__name__}: {exc}); its rows skipped"
    return None


def _ort_training_ops() -> Optional[str]:
    """onnxruntime's inference wheels do not register the training domain: say so, measured."""
    import onnxruntime as ort

    try:
        model = training_model("Adam", 1, "float32", alpha=f32(0.9), beta=f32(0.999),
                               epsilon=f32(1e-6))
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        msg = str(exc).splitlines()[0]
        return (f"onnxruntime {ort.__version__}: Adam/Momentum/Adagrad not checked, it does not "
                f"run the {TRAINING_DOMAIN} domain ({msg.strip()[:120]})")
    return None


def checks(report: Report, quick: bool = False) -> None:
    report.add(_bn("reference", False))
    report.add(_bn("reference", True))
    report.add(_bn("reference", True, offset=1e4))
    ort_missing = _ort_available()
    if ort_missing:
        report.skip(ort_missing)
    else:
        report.add(_bn("onnxruntime", False))
        report.add(_bn("onnxruntime", True))
        report.add(_bn("onnxruntime", True, offset=1e3))
        if not quick:
            report.add(_bn("onnxruntime", True, shape=(16, 5)))
    adam = dict(alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.01,
                norm_coefficient_post=0.001)
    report.add(_optim("Adam", adam, lr0=0.01))
    report.add(_optim("Adam", adam, lr0=0.01, single=True))
    report.add(_optim("Momentum", dict(alpha=0.9, beta=0.8, mode="standard",
                                       norm_coefficient=0.01)))
    report.add(_optim("Momentum", dict(alpha=0.9, beta=1.0, mode="nesterov",
                                       norm_coefficient=0.01)))
    report.add(_optim("Adagrad", dict(decay_factor=0.1, epsilon=1e-6, norm_coefficient=0.01)))
    if not ort_missing:
        msg = _ort_training_ops()
        if msg:
            report.skip(msg)

"""ONNX conformance: bncore against the ONNX node test cases, rebuilt from the
installed onnx package (``collect_testcases``: recent wheels ship the generator
code, not the data files), for BatchNormalization (inference and training
mode), Adam, Momentum, Nesterov momentum and Adagrad; plus cases with T > 0,
which the official ones never reach, against ``onnx.reference.ReferenceEvaluator``.

CI installs onnx; the module skips only where onnx is absent.
"""
import warnings

import numpy as np
import pytest

import bncore

onnx = pytest.importorskip("onnx")
from onnx import defs, helper  # noqa: E402

TRAINING = "ai.onnx.preview.training"
OPS = ("BatchNormalization", "Adam", "Momentum", "Adagrad")
# every official case for these ops: the test fails if one disappears unnoticed
EXPECTED = {
    "test_batchnorm_example", "test_batchnorm_epsilon",
    "test_batchnorm_example_training_mode", "test_batchnorm_epsilon_training_mode",
    "test_adam", "test_adam_multiple", "test_momentum", "test_nesterov_momentum",
    "test_momentum_multiple", "test_adagrad", "test_adagrad_multiple",
}


def _collect():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            cases = collect_testcases()
    return [c for c in cases if c.model.graph.node[0].op_type in OPS]


CASES = _collect()


def attributes(node):
    """The node's attributes over the schema's defaults (as ONNX stores them: float32)."""
    schema = defs.get_schema(node.op_type, domain=node.domain)
    out = {k: helper.get_attribute_value(a.default_value)
           for k, a in schema.attributes.items() if a.default_value.name}
    out.update({a.name: helper.get_attribute_value(a) for a in node.attribute})
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in out.items()}


def run_bncore(node, inputs):
    """bncore's outputs for an ONNX node, in the node's output order."""
    a = attributes(node)
    op = node.op_type
    if op == "BatchNormalization":
        x, s, b, mean, var = (np.array(v) for v in inputs)
        training = bool(a["training_mode"])
        rm, rv = mean.copy(), var.copy()
        y, _, _ = bncore.batch_norm_forward(x, s, b, rm, rv, training=training,
                                            momentum=1.0 - a["momentum"], eps=a["epsilon"],
                                            unbiased_running_var=False)
        return [y, rm, rv] if training else [y]
    R, T = float(inputs[0]), int(inputs[1])
    nstate = {"Adam": 2, "Momentum": 1, "Adagrad": 1}[op]
    n = (len(inputs) - 2) // (2 + nstate)
    X = [np.array(v) for v in inputs[2:2 + n]]
    G = [np.array(v) for v in inputs[2 + n:2 + 2 * n]]
    S = [[np.array(v) for v in inputs[2 + (2 + k) * n:2 + (3 + k) * n]] for k in range(nstate)]
    if op == "Adam":
        bncore.adam_step(X, G, S[0], S[1], step=T + 1, lr=R, beta1=a["alpha"], beta2=a["beta"],
                         eps=a["epsilon"], eps_style="hat", bias_correction_step=T,
                         weight_decay=a["norm_coefficient"],
                         weight_decay_post=a["norm_coefficient_post"])
    elif op == "Momentum":
        bncore.sgd_step(X, G, S[0], lr=R, momentum=a["alpha"], dampening=1.0 - a["beta"],
                        nesterov=a["mode"] == "nesterov", weight_decay=a["norm_coefficient"],
                        style="onnx", first_step=T == 0)
    else:
        bncore.adagrad_step(X, G, S[0], step=T + 1, lr=R, lr_decay=a["decay_factor"],
                            weight_decay=a["norm_coefficient"], eps=a["epsilon"])
    return X + [s for lst in S for s in lst]


def test_every_official_case_was_rebuilt():
    names = {c.name for c in CASES}
    assert EXPECTED <= names, f"missing ONNX node cases: {sorted(EXPECTED - names)}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_official_node_case(case):
    node = case.model.graph.node[0]
    inputs, expected = case.data_sets[0]
    got = run_bncore(node, inputs)
    assert len(got) == len(expected)
    for name, g, e in zip(node.output, got, expected):
        e = np.asarray(e)
        assert g.shape == e.shape, name
        # the expected values are float32 NumPy arithmetic; bncore rounds once from
        # float64: they agree far inside ONNX's own rtol=1e-3, atol=1e-7
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=1e-7, err_msg=f"{case.name}: {name}")


def test_a_wrong_convention_fails_the_official_cases():
    """The check has teeth: torch's unbiased running variance, or Adam with torch's eps
    placement, does not pass the official expected outputs."""
    by = {c.name: c for c in CASES}
    case = by["test_batchnorm_example_training_mode"]
    x, s, b, mean, var = (np.array(v) for v in case.data_sets[0][0])
    rm, rv = mean.copy(), var.copy()
    bncore.batch_norm_forward(x, s, b, rm, rv, momentum=0.1, unbiased_running_var=True)
    assert not np.allclose(rv, case.data_sets[0][1][2], rtol=1e-5)

    case = by["test_adam"]
    inputs, expected = case.data_sets[0]
    a = attributes(case.model.graph.node[0])
    X, G, V, H = (np.array(v) for v in inputs[2:])
    bncore.adam_step([X], [G], [V], [H], step=int(inputs[1]) + 1, lr=float(inputs[0]),
                     beta1=a["alpha"], beta2=a["beta"], eps=a["epsilon"], eps_style="torch",
                     weight_decay=a["norm_coefficient"])
    assert not np.allclose(X, expected[0], rtol=1e-5)


# ---------------------------------------------------------------- T > 0

from bncore.validate.onnx import _onnx_ref_post, f32, training_model  # noqa: E402

ATTRS = {
    "Adam": dict(alpha=f32(0.9), beta=f32(0.999), epsilon=f32(1e-6), norm_coefficient=f32(0.01),
                 norm_coefficient_post=f32(0.002)),
    "Momentum": dict(alpha=f32(0.9), beta=f32(0.7), mode="standard", norm_coefficient=f32(0.01)),
    "Nesterov": dict(alpha=f32(0.8), beta=f32(1.0), mode="nesterov", norm_coefficient=f32(0.02)),
    "Adagrad": dict(decay_factor=f32(0.1), epsilon=f32(1e-6), norm_coefficient=f32(0.01)),
}


def _reference(op, attrs, n, dtype, T, rng):
    from onnx.reference import ReferenceEvaluator

    onnx_op = "Momentum" if op == "Nesterov" else op
    model = training_model(onnx_op, n, "float64" if dtype == np.float64 else "float32", **attrs)
    nstate = {"Adam": 2, "Momentum": 1, "Adagrad": 1}[onnx_op]
    names = {"Adam": "VH", "Momentum": "V", "Adagrad": "H"}[onnx_op]
    shapes = [(7,), (3, 4), (50,)][:n]
    feeds = {"R": np.array(0.05, dtype), "T": np.array(T, np.int64)}
    for i, s in enumerate(shapes):
        feeds[f"X{i}"] = rng.standard_normal(s).astype(dtype)
        feeds[f"G{i}"] = rng.standard_normal(s).astype(dtype)
        for k in range(nstate):   # state as it would be after earlier steps
            v = rng.standard_normal(s).astype(dtype) * 0.1
            feeds[f"{names[k]}{i}"] = np.abs(v) if names[k] == "H" else v
    out = ReferenceEvaluator(model).run(None, feeds)
    inputs = [feeds["R"], feeds["T"]] + [feeds[f"X{i}"] for i in range(n)] \
        + [feeds[f"G{i}"] for i in range(n)] \
        + [feeds[f"{names[k]}{i}"] for k in range(nstate) for i in range(n)]
    return model.graph.node[0], inputs, out


@pytest.mark.parametrize("T", [1, 2, 5, 100])
@pytest.mark.parametrize("op", list(ATTRS))
@pytest.mark.parametrize("n", [1, 3])
def test_training_ops_with_T_above_zero_float32(op, n, T):
    rng = np.random.default_rng(T * 10 + n)
    node, inputs, want = _reference(op, ATTRS[op], n, np.float32, T, rng)
    got = run_bncore(node, inputs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, np.asarray(w, np.float64), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("T", [1, 3, 50])
@pytest.mark.parametrize("op", list(ATTRS))
def test_training_ops_with_T_above_zero_float64(op, T):
    """float64, one tensor (the reference's multi-tensor Adam returns float32): agreement to
    rounding, once Adam's (1 - norm_coefficient_post) is taken as the reference computes it,
    rounded to float32 (its attributes are np.float32 scalars)."""
    rng = np.random.default_rng(T)
    attrs = dict(ATTRS[op])
    node, inputs, want = _reference(op, attrs, 1, np.float64, T, rng)
    if op == "Adam":
        a = attributes(node)
        X, G, V, H = (np.array(v) for v in inputs[2:])
        bncore.adam_step([X], [G], [V], [H], step=T + 1, lr=float(inputs[0]), beta1=a["alpha"],
                         beta2=a["beta"], eps=a["epsilon"], eps_style="hat",
                         bias_correction_step=T, weight_decay=a["norm_coefficient"],
                         weight_decay_post=_onnx_ref_post(a))
        got = [X, V, H]
    else:
        got = run_bncore(node, inputs)
    for g, w in zip(got, want):
        assert np.asarray(w).dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("T", [0, 1, 3])
@pytest.mark.parametrize("buffers", [True, False])
@pytest.mark.parametrize("mode", ["standard", "nesterov"])
def test_momentum_with_alpha_zero_still_weights_the_gradient_by_beta(T, buffers, mode):
    """ONNX Momentum at alpha = 0 is not plain SGD: V = beta' G (beta' = 1 at
    T == 0, else beta), X -= R V (nesterov: X -= R (G + alpha V), plain SGD
    here). bncore's onnx style gives the reference's X with or without
    momentum buffers, and its V where buffers are given."""
    rng = np.random.default_rng(60 + T)
    attrs = dict(alpha=f32(0.0), beta=f32(0.7), mode=mode, norm_coefficient=f32(0.01))
    node, inputs, want = _reference("Momentum", attrs, 2, np.float64, T, rng)
    a = attributes(node)
    X = [np.array(v) for v in inputs[2:4]]
    G = [np.array(v) for v in inputs[4:6]]
    V = [np.array(v) for v in inputs[6:8]] if buffers else None
    bncore.sgd_step(X, G, V, lr=float(inputs[0]), momentum=a["alpha"],
                    dampening=1.0 - a["beta"], weight_decay=a["norm_coefficient"],
                    nesterov=mode == "nesterov", style="onnx", first_step=T == 0)
    for g, w in zip(X + (V or []), want if buffers else want[:2]):
        np.testing.assert_allclose(g, w, rtol=1e-14, atol=1e-15)
    if T and mode == "standard":          # beta matters: plain SGD would be far off
        assert not np.allclose(X[0], inputs[2] - inputs[0] * (
            inputs[4] + a["norm_coefficient"] * inputs[2]), rtol=1e-6)


def test_adam_post_factor_is_what_separates_float64_results():
    """Without the float32 rounding of (1 - norm_coefficient_post) the float64 results
    differ by about 1e-8 relative: the attribution bncore validate onnx reports."""
    rng = np.random.default_rng(0)
    attrs = ATTRS["Adam"]
    node, inputs, want = _reference("Adam", attrs, 1, np.float64, 3, rng)
    got = run_bncore(node, inputs)
    rel = np.max(np.abs(got[0] - want[0])) / np.max(np.abs(want[0]))
    assert 1e-10 < rel < 1e-7

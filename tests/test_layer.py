"""The BatchNorm layer: modes, cumulative momentum, conventions, state_dict."""
import numpy as np
import pytest

import bncore
from bncore.conventions import BATCH_NORM
from reference import batch_norm_backward as ref_backward
from reference import batch_norm_forward as ref_forward
from reference import normwise_relative_error as rel_err


def data(shape=(8, 4, 6, 6), seed=0, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)


def test_cumulative_average_with_momentum_none():
    layer = bncore.BatchNorm(4, momentum=None)
    batches = [data(seed=s) for s in range(5)]
    for x in batches:
        layer.forward(x)
    assert layer.num_batches_tracked == 5
    xs = np.stack([b.astype(np.float64) for b in batches])
    means = xs.mean(axis=(1, 3, 4))
    n = 8 * 36
    uvars = xs.var(axis=(1, 3, 4)) * n / (n - 1)
    # the cumulative average of the batch statistics (running mean starts at 0
    # and the first batch's weight is 1)
    assert rel_err(layer.running_mean, means.mean(axis=0)) < 1e-6
    assert rel_err(layer.running_var, uvars.mean(axis=0)) < 1e-6


@pytest.mark.parametrize("name", ["torch", "keras", "tf_fused", "flax", "onnx"])
def test_conventions_set_framework_defaults_and_formulas(name):
    conv = BATCH_NORM[name]
    layer = bncore.BatchNorm(4, convention=name)
    assert layer.eps == conv.eps and layer.momentum == conv.momentum and layer.axis == conv.axis
    x = data((8, 6, 6, 4) if conv.axis == -1 else (8, 4, 6, 6), seed=1)
    rm, rv = layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64)
    layer.forward(x)
    axes = tuple(i for i in range(4) if i != conv.axis % 4)
    x64 = x.astype(np.float64)
    n = x.size // 4
    batch_var = x64.var(axis=axes)
    stat_var = batch_var * n / (n - 1) if conv.unbiased_running_var else batch_var
    # written as each framework writes it: decay d = framework momentum for
    # Keras/flax/ONNX (moving = moving * d + stat * (1 - d)), rate for torch
    if conv.momentum_is_decay:
        d = conv.framework_momentum
        exp_rm = rm * d + x64.mean(axis=axes) * (1 - d)
        exp_rv = rv * d + stat_var * (1 - d)
    else:
        m = conv.framework_momentum
        exp_rm = (1 - m) * rm + m * x64.mean(axis=axes)
        exp_rv = (1 - m) * rv + m * stat_var
    assert rel_err(layer.running_mean, exp_rm) < 1e-6
    assert rel_err(layer.running_var, exp_rv) < 1e-6


def test_train_eval_and_no_running_stats():
    x = data(seed=2)
    layer = bncore.BatchNorm(4, track_running_stats=False, affine=False)
    y_train = layer.forward(x)
    layer.eval()
    y_eval = layer.forward(x)          # batch statistics in eval too, as torch
    assert np.array_equal(y_train, y_eval)
    assert layer.state_dict() == {}
    tracked = bncore.BatchNorm(4)
    tracked.forward(x)
    tracked.eval()
    y = tracked.forward(x)
    e = ref_forward(x, tracked.weight, tracked.bias, tracked.running_mean, tracked.running_var,
                    training=False)[0]
    assert rel_err(y, e) < 1e-6


def test_backward_stores_parameter_gradients():
    x = data(seed=3)
    layer = bncore.BatchNorm(4)
    layer.weight[:] = [1.0, 2.0, 0.5, -1.0]
    layer.forward(x)
    dy = data(seed=4)
    dx = layer.backward(dy)
    _, mean, invstd = bncore.batch_norm_forward(x, layer.weight, layer.bias)
    edx, edw, edb = bncore.batch_norm_backward(dy, x, mean, invstd, layer.weight)
    assert np.array_equal(dx, edx)
    assert np.array_equal(layer.grad_weight, edw) and np.array_equal(layer.grad_bias, edb)
    assert layer.grad_weight.dtype == np.float32


def test_state_dict_round_trips_bit_for_bit():
    a = bncore.BatchNorm(4, momentum=0.3, dtype=np.float64)
    for s in range(3):
        a.forward(data(seed=s, dtype=np.float64))
    a.weight[:] = np.random.default_rng(9).standard_normal(4)
    state = a.state_dict()
    b = bncore.BatchNorm(4, momentum=0.3, dtype=np.float64)
    b.load_state_dict(state)
    for key, value in state.items():
        assert np.asarray(b.state_dict()[key]).tobytes() == np.asarray(value).tobytes()
    state["weight"][0] = 123.0                      # a copy, not a view
    assert a.weight[0] != 123.0
    x = data(seed=7, dtype=np.float64)
    a.eval(), b.eval()
    assert a.forward(x).tobytes() == b.forward(x).tobytes()


@pytest.mark.parametrize("shape,axis,dtype,fused", [
    ((16, 5), -1, np.float32, False), ((8, 10, 5), -1, np.float32, False),
    ((8, 4, 4, 5), -1, np.float32, True), ((2, 3, 4, 4, 5), -1, np.float32, True),
    ((8, 5, 4, 4), 1, np.float32, True), ((8, 4, 5, 4), 2, np.float32, False),
    ((8, 4, 4, 5), 3, np.float32, True), ((2, 3, 4, 4, 5), 4, np.float32, True),
    ((8, 4, 4, 5), -1, np.float64, False)])
def test_tf_fused_follows_tf_keras_2_fused_rule(shape, axis, dtype, fused):
    """tf.keras 2 fuses only 4D/5D float16/float32 inputs with the channel axis
    1 or last (BatchNormalizationBase._fused_can_be_used): the fused kernel keeps
    the unbiased variance and raises eps to 1.001e-5; every other input goes
    through tf.nn.moments (biased variance, eps as given)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    layer = bncore.BatchNorm(5, convention="tf_fused", eps=1e-6, axis=axis, dtype=dtype)
    layer.forward(x)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    n = x.size // 5
    var = x.astype(np.float64).var(axis=red) * (n / (n - 1) if fused else 1.0)
    tol = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(layer.running_var, 0.99 + 0.01 * var, rtol=tol)
    layer.eval()
    y = layer.forward(np.ones(shape, dtype))
    eps = 1.001e-5 if fused else 1e-6
    bshape = [1] * len(shape)
    bshape[axis % len(shape)] = 5
    rm = layer.running_mean.astype(np.float64).reshape(bshape)
    rv = layer.running_var.astype(np.float64).reshape(bshape)
    expected = np.broadcast_to((1.0 - rm) / np.sqrt(rv + eps), shape)
    np.testing.assert_allclose(y, expected, rtol=tol)


def test_onnx_defaults_are_its_float32_attributes():
    """ONNX stores epsilon and momentum as float32: its default momentum 0.9 is
    0.89999997615814209, and that is what a model computes with."""
    onnx = pytest.importorskip("onnx", reason="onnx not installed: the reference is ONNX's")
    from onnx import helper, TensorProto
    from onnx.reference import ReferenceEvaluator
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5, 5))
    scale, bias = rng.standard_normal(3), rng.standard_normal(3)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    names = ["X", "scale", "B", "mean", "var"]
    node = helper.make_node("BatchNormalization", names, ["Y", "rm", "rv"], training_mode=1)
    graph = helper.make_graph(
        [node], "bn", [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in names],
        [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in ("Y", "rm", "rv")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    y_ref, rm_ref, rv_ref = ReferenceEvaluator(model).run(
        None, dict(zip(names, (x, scale, bias, rm, rv))))
    layer = bncore.BatchNorm(3, convention="onnx", dtype=np.float64)
    layer.weight[:], layer.bias[:] = scale, bias
    layer.running_mean[:], layer.running_var[:] = rm, rv
    y = layer.forward(x)
    np.testing.assert_allclose(layer.running_mean, rm_ref, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(layer.running_var, rv_ref, rtol=1e-14)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


def test_eval_without_running_stats_backpropagates_through_batch_statistics():
    """track_running_stats=False: eval() still normalizes with the batch
    statistics (as torch), so backward must differentiate through them too,
    not treat them as constants."""
    x = data(seed=5, dtype=np.float64)
    dy = data(seed=6, dtype=np.float64)
    layer = bncore.BatchNorm(4, track_running_stats=False, dtype=np.float64)
    layer.weight[:] = [1.0, 2.0, 0.5, -1.5]
    layer.eval()
    layer.forward(x)
    dx = layer.backward(dy)
    red = (0, 2, 3)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=red)
    invstd = 1.0 / np.sqrt(x64.var(axis=red) + layer.eps)
    edx, edw, edb = ref_backward(dy, x, mean, invstd, layer.weight, training=True)
    assert rel_err(dx, edx) < 1e-12
    assert rel_err(layer.grad_weight, edw) < 1e-12 and rel_err(layer.grad_bias, edb) < 1e-12


@pytest.mark.parametrize("momentum", [0.1, None])
def test_eval_forward_counts_no_batch(momentum):
    """num_batches_tracked counts training batches only: an eval pass in
    between leaves it, and the cumulative average (momentum=None), alone."""
    layer = bncore.BatchNorm(4, momentum=momentum, dtype=np.float64)
    batches = [data(seed=s, dtype=np.float64) for s in range(3)]
    layer.forward(batches[0])
    layer.forward(batches[1])
    layer.eval()
    layer.forward(data(seed=9, dtype=np.float64))
    assert layer.num_batches_tracked == 2
    layer.train()
    layer.forward(batches[2])
    assert layer.num_batches_tracked == 3
    means = np.stack([b.mean(axis=(0, 2, 3)) for b in batches])
    if momentum is None:
        expected = means.mean(axis=0)
    else:
        expected = np.zeros(4)
        for m in means:
            expected = (1 - momentum) * expected + momentum * m
    assert rel_err(layer.running_mean, expected) < 1e-14


def test_tf_fused_keeps_an_eps_above_its_minimum():
    """The fused kernel raises eps to at least 1.001e-5; a larger eps (Keras'
    default 1e-3) is used as given."""
    x = data((8, 3, 4, 4), seed=8)      # 4-D float32: fused
    layer = bncore.BatchNorm(4, convention="tf_fused")
    assert layer.eps == 1e-3
    y = layer.forward(x)
    ey = ref_forward(x, eps=1e-3, axis=-1)[0]
    assert rel_err(y, ey) < 1e-6


def test_onnx_epsilon_is_the_float32_attribute():
    """ONNX's epsilon attribute is a float32: its default 1e-5 is
    float32(1e-5) = 9.99999974737875e-06, which shows where the variance is 0."""
    layer = bncore.BatchNorm(2, convention="onnx", dtype=np.float64)
    layer.running_var[:] = 0.0
    layer.eval()
    y = layer.forward(np.ones((3, 2)))
    eps32 = float(np.float32(1e-5))
    np.testing.assert_allclose(y, np.full((3, 2), 1.0 / np.sqrt(eps32)), rtol=1e-15)


def test_a_list_input_is_checked_and_treated_as_its_array():
    """A nested list is taken as NumPy takes it: its channel count is checked
    against num_features (also without weight or running statistics), and
    tf_fused's per-input rule sees its shape (a list once got the unbiased
    running variance where its array got the biased one)."""
    x = np.random.default_rng(8).standard_normal((4, 5, 5, 3))
    a, b = (bncore.BatchNorm(3, convention="tf_fused") for _ in range(2))
    np.testing.assert_array_equal(a.forward(x), b.forward(x.tolist()))
    np.testing.assert_array_equal(a.running_var, b.running_var)
    bare = bncore.BatchNorm(4, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="num_features=4"):
        bare.forward(np.moveaxis(x, -1, 1).tolist())


def test_train_takes_a_bool():
    bn = bncore.BatchNorm(3)
    with pytest.raises(TypeError, match="mode must be a bool"):
        bn.train("False")
    assert bn.training
    assert not bn.train(np.bool_(False)).training and bn.train(1).training


def test_backward_after_a_forward_that_raised_is_refused():
    """Found by review: a forward that raised left the previous batch saved, and
    backward silently returned that batch's gradients."""
    layer = bncore.BatchNorm(4)
    layer.forward(data())
    with pytest.raises(ValueError, match="channel"):
        layer.forward(np.ones((1, 4), np.float32))        # one value per channel
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(data())


@pytest.mark.parametrize("state", [None, [1, 2], "weight"])
def test_load_state_dict_of_something_not_a_mapping_is_a_type_error(state):
    layer = bncore.BatchNorm(4)
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        layer.load_state_dict(state)


def test_state_dict_is_a_snapshot():
    """state_dict() holds copies: a checkpoint taken before training does not
    move with it (mutation testing: a live view of running_var passed)."""
    bn = bncore.BatchNorm(3)
    sd = bn.state_dict()
    x = np.random.default_rng(0).standard_normal((16, 3, 4)).astype(np.float32) * 3 + 1
    bn.forward(x)
    bn.backward(np.ones_like(x))
    bn.weight += 1
    bn.bias -= 1
    fresh = bncore.BatchNorm(3).state_dict()
    assert set(sd) == set(fresh)
    for k in sd:
        assert np.array_equal(sd[k], fresh[k]), k


def test_reset_running_stats_and_parameters_as_torch():
    """torch.nn.BatchNorm2d's reset_running_stats() / reset_parameters(): in
    place, after which the layer runs as a fresh one (momentum=None's
    cumulative average restarts)."""
    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 2 + 1 for _ in range(3)]
    bn = bncore.BatchNorm(3, momentum=None)
    arrays = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
    for x in xs:
        bn.forward(x)
    bn.backward(np.ones_like(xs[0]))
    bn.weight[:] = 2.0
    bn.bias[:] = -1.0
    bn.reset_running_stats()
    assert (bn.running_mean == 0).all() and (bn.running_var == 1).all()
    assert bn.num_batches_tracked == 0 and (bn.weight == 2.0).all()
    bn.reset_parameters()
    assert (bn.weight == 1).all() and (bn.bias == 0).all() and bn.grad_weight is None
    assert all(a is b for a, b in zip(arrays, (bn.running_mean, bn.running_var, bn.weight,
                                                  bn.bias)))
    fresh = bncore.BatchNorm(3, momentum=None)
    for x in xs[:2]:
        np.testing.assert_array_equal(bn.forward(x), fresh.forward(x))
    for k, v in fresh.state_dict().items():
        np.testing.assert_array_equal(bn.state_dict()[k], v)
    plain = bncore.BatchNorm(3, affine=False, track_running_stats=False)
    plain.reset_parameters()                        # nothing to reset: no error


def test_state_dict_of_a_layer_holding_torch_tensors():
    """A layer whose running statistics are torch tensors (updated in place
    through DLPack) gives NumPy copies in state_dict (review: 'Tensor' object
    has no attribute 'copy')."""
    torch = pytest.importorskip("torch")
    bn = bncore.BatchNorm(3)
    bn.running_mean, bn.running_var = torch.zeros(3), torch.ones(3)
    bn.forward(np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32) + 5)
    sd = bn.state_dict()
    assert isinstance(sd["running_mean"], np.ndarray)
    np.testing.assert_array_equal(sd["running_mean"], bn.running_mean.numpy())
    assert float(bn.running_mean.mean()) > 0.4          # the tensors were updated


def test_a_layer_holding_torch_tensors_loads_a_state_dict_whole_or_not_at_all():
    """Its torch tensors are written through DLPack views made before any copy
    (review: weight and bias were written, then np.copyto refused the tensor);
    a bad entry changes nothing."""
    torch = pytest.importorskip("torch")
    bn = bncore.BatchNorm(3)
    bn.running_mean, bn.running_var = torch.zeros(3), torch.ones(3)
    bn.forward(np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32) + 5)
    sd = bn.state_dict()
    sd["weight"] = np.full(3, 2.0, np.float32)
    sd["running_mean"] = np.full(3, 7.0, np.float32)
    bad = dict(sd, running_var=np.ones(3, np.float64))
    with pytest.raises(TypeError, match="running_var"):
        bn.load_state_dict(bad)
    assert (bn.weight == 1.0).all() and float(bn.running_mean[0]) != 7.0
    bn.load_state_dict(sd)
    assert (bn.weight == 2.0).all() and (bn.running_mean.numpy() == 7.0).all()

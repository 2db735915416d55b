"""Every bad input raises ValueError/TypeError naming the argument, before any
array is modified (checked against copies)."""
import numpy as np
import pytest

import bncore
from conftest import assert_unchanged

C = 3


def fresh():
    rng = np.random.default_rng(0)
    return dict(
        x=rng.standard_normal((4, C, 5)).astype(np.float32),
        weight=np.ones(C, np.float32),
        bias=np.zeros(C, np.float32),
        running_mean=np.full(C, 0.5, np.float32),
        running_var=np.full(C, 2.0, np.float32),
    )


def readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _self_overlapping(shape):
    """A writeable float32 view of `shape` whose elements all share one value's
    memory (stride 0), as torch's expand() or np.broadcast_to made writeable."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape, (0,) * len(shape))


def call_forward(arrays, **kw):
    return bncore.batch_norm_forward(arrays["x"], arrays["weight"], arrays["bias"],
                                     arrays["running_mean"], arrays["running_var"], **kw)


FORWARD_CASES = [
    # (description, mutate(arrays) -> kwargs, exception, text in message)
    ("one value per channel in training",
     lambda a: a.update(x=a["x"][:1, :, :1]) or {}, ValueError, "more than 1 value"),
    ("1-D x", lambda a: a.update(x=a["x"].reshape(-1)) or {}, ValueError, "x must have"),
    ("integer x", lambda a: a.update(x=np.ones((4, C), np.int32)) or {}, TypeError, "x must have dtype"),
    ("complex x", lambda a: a.update(x=np.ones((4, C), np.complex64)) or {}, TypeError, "x"),
    ("big-endian x", lambda a: a.update(x=a["x"].astype(">f4")) or {}, TypeError,
     "opposite byte order"),
    ("masked x", lambda a: a.update(x=np.ma.masked_array(a["x"], mask=a["x"] > 0)) or {},
     TypeError, "masked array"),
    ("weight of the wrong length", lambda a: a.update(weight=np.ones(C + 1, np.float32)) or {},
     ValueError, "weight"),
    ("bias 2-D", lambda a: a.update(bias=np.zeros((C, 1), np.float32)) or {}, ValueError, "bias"),
    ("integer weight", lambda a: a.update(weight=np.ones(C, np.int64)) or {}, TypeError, "weight"),
    ("running_mean wrong shape", lambda a: a.update(running_mean=np.zeros(C + 2, np.float32)) or {},
     ValueError, "running_mean"),
    ("read-only running_var", lambda a: a.update(running_var=readonly(a["running_var"])) or {},
     ValueError, "running_var"),
    ("running stats aliased", lambda a: a.update(running_var=a["running_mean"]) or {},
     ValueError, "share memory"),
    ("only one running stat", lambda a: a.update(running_var=None) or {}, ValueError, "both"),
    ("eps = 0", lambda a: {"eps": 0.0}, ValueError, "eps"),
    ("eps < 0", lambda a: {"eps": -1e-5}, ValueError, "eps"),
    ("eps NaN", lambda a: {"eps": float("nan")}, ValueError, "eps"),
    ("eps a string", lambda a: {"eps": "1e-5"}, TypeError, "eps"),
    ("momentum > 1", lambda a: {"momentum": 1.5}, ValueError, "momentum"),
    ("momentum < 0", lambda a: {"momentum": -0.1}, ValueError, "momentum"),
    ("axis out of range", lambda a: {"axis": 3}, ValueError, "axis"),
    ("axis a float", lambda a: {"axis": 1.0}, TypeError, "axis"),
    ("num_threads = 0", lambda a: {"num_threads": 0}, ValueError, "num_threads"),
    ("out wrong shape", lambda a: {"out": np.empty((4, C), np.float32)}, ValueError, "out"),
    ("out wrong dtype", lambda a: {"out": np.empty((4, C, 5), np.float64)}, TypeError, "out"),
    ("out read-only", lambda a: {"out": readonly(np.empty((4, C, 5), np.float32))}, ValueError, "out"),
    ("out is x", lambda a: {"out": a["x"]}, ValueError, "share memory"),
    ("out overlaps x", lambda a: {"out": a["x"][::-1]}, ValueError, "share memory"),
    # an output whose elements share memory would silently keep the last write
    ("out a writeable broadcast", lambda a: {"out": _self_overlapping((4, C, 5))}, ValueError,
     "elements that share memory"),
    ("running_mean a broadcast", lambda a: a.update(running_mean=_self_overlapping((C,))) or {},
     ValueError, "elements that share memory"),
    ("inference without running stats",
     lambda a: a.update(running_mean=None, running_var=None) or {"training": False},
     ValueError, "running_mean"),
]


@pytest.mark.parametrize("desc,mutate,exc,text", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_forward_rejects_bad_input_and_modifies_nothing(desc, mutate, exc, text):
    arrays = fresh()
    kwargs = mutate(arrays)
    before = {k: (None if v is None else np.array(v, copy=True)) for k, v in arrays.items()}
    out = kwargs.get("out")
    out_before = None if out is None else out.copy()
    with pytest.raises(exc, match=text):
        call_forward(arrays, **kwargs)
    assert_unchanged(before, arrays)
    if out is not None and out.flags.writeable and not np.may_share_memory(out, arrays["x"]):
        assert np.array_equal(out, out_before, equal_nan=True) or np.isnan(out_before).any()


def backward_args():
    a = fresh()
    y, mean, invstd = bncore.batch_norm_forward(a["x"], a["weight"], a["bias"])
    dy = np.random.default_rng(1).standard_normal(a["x"].shape).astype(np.float32)
    return dict(dy=dy, x=a["x"], mean=mean, invstd=invstd, weight=a["weight"])


BACKWARD_CASES = [
    ("dy shape differs", lambda a: a.update(dy=a["dy"][:, :, :2]) or {}, ValueError, "dy"),
    ("dy dtype differs", lambda a: a.update(dy=a["dy"].astype(np.float64)) or {}, TypeError, "dy"),
    ("mean wrong length", lambda a: a.update(mean=a["mean"][:2]) or {}, ValueError, "mean"),
    ("invstd missing", lambda a: a.update(invstd=None) or {}, TypeError, "invstd"),
    ("weight wrong length", lambda a: a.update(weight=np.ones(5, np.float32)) or {}, ValueError, "weight"),
    ("dx out aliases dy", lambda a: {"out": a["dy"]}, ValueError, "share memory"),
    ("dx out read-only", lambda a: {"out": readonly(a["x"])}, ValueError, "read-only"),
    ("dx out a broadcast", lambda a: {"out": _self_overlapping(a["x"].shape)}, ValueError,
     "elements that share memory"),
    ("dweight out a broadcast", lambda a: {"out": (None, _self_overlapping((C,)), None)},
     ValueError, "elements that share memory"),
    ("out tuple of 2", lambda a: {"out": (np.empty_like(a["x"]), None)}, ValueError, "tuple"),
    ("dweight out wrong shape", lambda a: {"out": (None, np.empty(7, np.float32), None)},
     ValueError, "dweight"),
    ("dweight and dbias alias", lambda a: {"out": (None, a.setdefault("_w", np.empty(C)), a["_w"])},
     ValueError, "share memory"),
    ("training with one value per channel",
     lambda a: a.update(dy=a["dy"][:1, :, :1], x=a["x"][:1, :, :1]) or {}, ValueError, "more than 1"),
]


@pytest.mark.parametrize("desc,mutate,exc,text", BACKWARD_CASES, ids=[c[0] for c in BACKWARD_CASES])
def test_backward_rejects_bad_input_and_modifies_nothing(desc, mutate, exc, text):
    args = backward_args()
    kwargs = mutate(args)
    args.pop("_w", None)
    before = {k: (None if v is None else np.array(v, copy=True)) for k, v in args.items()}
    with pytest.raises(exc, match=text):
        bncore.batch_norm_backward(args["dy"], args["x"], args["mean"], args["invstd"],
                                   args["weight"], **kwargs)
    assert_unchanged(before, args)


def test_layer_rejects_bad_configuration():
    with pytest.raises(ValueError, match="convention"):
        bncore.BatchNorm(3, convention="caffe")
    with pytest.raises(ValueError, match="num_features"):
        bncore.BatchNorm(0)
    with pytest.raises(ValueError, match="momentum"):
        bncore.BatchNorm(3, momentum=2.0)
    with pytest.raises(ValueError, match="eps"):
        bncore.BatchNorm(3, eps=0)
    # "False" is a true string: refused, as train("False") is (it gave an affine layer)
    for name in ("affine", "track_running_stats"):
        with pytest.raises(TypeError, match=f"{name} must be a bool"):
            bncore.BatchNorm(3, **{name: "False"})
    layer = bncore.BatchNorm(3)
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.ones((2, 3), np.float32))
    state = layer.state_dict()
    state["running_mean"] = np.zeros(4, np.float32)
    before = layer.state_dict()
    with pytest.raises(ValueError, match="running_mean"):
        layer.load_state_dict(state)
    assert_unchanged(before, layer.state_dict())


@pytest.mark.parametrize("which", ["running_mean", "out", "dweight"])
def test_in_place_arguments_given_as_lists_are_refused(which):
    """np.asarray would copy a list; the update would be lost without a word."""
    a = fresh()
    x = a["x"]
    if which == "running_mean":
        with pytest.raises(TypeError, match="running_mean is written in place"):
            bncore.batch_norm_forward(x, running_mean=[0.0] * C, running_var=a["running_var"])
    elif which == "out":
        with pytest.raises(TypeError, match="out is written in place"):
            bncore.batch_norm_forward(x, out=np.zeros_like(x).tolist())
    else:
        _, mean, invstd = bncore.batch_norm_forward(x)
        with pytest.raises(TypeError, match=r"out\[1\] \(dweight\) is written in place"):
            bncore.batch_norm_backward(x, x, mean, invstd, out=(None, [0.0] * C, None))


def test_inference_reads_read_only_running_statistics():
    a = fresh()
    rm, rv = a["running_mean"], a["running_var"]
    rm.flags.writeable = rv.flags.writeable = False
    y, _, _ = bncore.batch_norm_forward(a["x"], running_mean=rm, running_var=rv, training=False)
    expected = (a["x"] - 0.5) / np.sqrt(2.0 + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bncore.batch_norm_forward(a["x"], running_mean=rm, running_var=rv)


def test_inference_overlap_rules_treat_running_statistics_as_inputs():
    """In inference the running statistics are read, not written: one array may
    serve as both; only out must not overlap them (or x, weight, bias)."""
    a = fresh()
    stat = np.full(C, 2.0, np.float32)
    y, _, _ = bncore.batch_norm_forward(a["x"], running_mean=stat, running_var=stat,
                                        training=False)
    np.testing.assert_allclose(y, (a["x"] - 2.0) / np.sqrt(2.0 + 1e-5), rtol=1e-6, atol=1e-6)
    out = np.full_like(a["x"], 2.0)
    inside_out = out.reshape(-1)[:C]          # running_mean stored inside out
    before = out.copy()
    with pytest.raises(ValueError, match="out and running_mean share memory"):
        bncore.batch_norm_forward(a["x"], running_mean=inside_out, running_var=stat,
                                  training=False, out=out)
    np.testing.assert_array_equal(out, before)


def test_layer_load_state_dict_checks_everything_first():
    bn = bncore.BatchNorm(C, momentum=None)
    good = bn.state_dict()
    for count, exc in [(np.array([1, 2]), ValueError), (-1, ValueError), (2.7, ValueError),
                       ("3", TypeError)]:
        sd = dict(good, weight=np.full(C, 5, np.float32), num_batches_tracked=count)
        with pytest.raises(exc, match="num_batches_tracked"):
            bn.load_state_dict(sd)
        np.testing.assert_array_equal(bn.weight, good["weight"])   # nothing copied
    bn.load_state_dict(dict(good, num_batches_tracked=np.int64(4)))
    assert bn.num_batches_tracked == 4


def test_layer_axis_and_channel_count():
    for axis, exc in [(1.7, TypeError), ("a", TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="axis"):
            bncore.BatchNorm(C, axis=axis)
    layer = bncore.BatchNorm(C, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match="num_features=3"):
        layer(np.ones((4, 5)))


def test_buffer_protocol_outputs_are_written_through():
    """A memoryview (or anything np.asarray views without copying) is written in
    place, as before the list check; only objects np.asarray would copy are refused."""
    x = np.random.default_rng(0).standard_normal((8, 3))
    rm, rv = np.zeros(3), np.ones(3)
    bncore.batch_norm_forward(x, running_mean=memoryview(rm), running_var=memoryview(rv))
    assert (rm != 0).all() and (rv != 1).all()


@pytest.mark.parametrize("name, value", [("training", "False"), ("training", None),
                                         ("training", 0.5), ("unbiased_running_var", "no")])
def test_on_off_arguments_must_be_bools(name, value):
    """training and unbiased_running_var are bools (NumPy's, 0 and 1 too): a
    string such as "False" is true, so it is refused rather than obeyed
    wrongly; nothing is written."""
    x = np.random.default_rng(9).standard_normal((4, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        bncore.batch_norm_forward(x, None, None, rm, rv, **{name: value})
    assert (rm == 0).all() and (rv == 1).all()
    if name == "training":
        with pytest.raises(TypeError, match="training must be a bool"):
            bncore.batch_norm_backward(x, x, np.zeros(3), np.ones(3), training=value)
    for ok in (np.bool_(False), 0, 1, np.array(True)):
        bncore.batch_norm_forward(x, None, None, rm.copy(), rv.copy(), **{name: ok})


def test_overlaps_itself_agrees_with_counting_the_offsets():
    """bncore._checks.overlaps_itself (the output check behind the cases
    above) against a brute-force count over random shapes and strides,
    negative and interleaved ones included."""
    from bncore._checks import overlaps_itself
    rng = np.random.default_rng(3)
    seen = {True: 0, False: 0}
    for _ in range(3000):
        nd = int(rng.integers(1, 4))
        shape = tuple(int(n) for n in rng.integers(1, 5, nd))
        itemsize = int(rng.choice([2, 4, 8]))
        strides = tuple(int(v) * int(rng.choice([-1, 1])) for v in rng.integers(0, 40, nd))
        idx = np.indices(shape).reshape(nd, -1).T
        offs = idx @ np.array(strides)
        # element k covers bytes [offs[k], offs[k] + itemsize)
        o = np.sort(offs)
        want = bool(np.any(np.diff(o) < itemsize))
        assert overlaps_itself(shape, strides, itemsize) == want, (shape, strides, itemsize)
        seen[want] += 1
    assert min(seen.values()) > 300


def test_a_strided_view_with_distinct_elements_is_a_valid_output():
    """Rows interleaved by as_strided (offsets 0, 12, 8, 20, 16, 28 bytes)
    share no element: written, not refused."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2)).astype(np.float32)
    buf = np.zeros(8, np.float32)
    out = np.lib.stride_tricks.as_strided(buf, (3, 2), (8, 12))
    y = bncore.batch_norm_forward(x, out=out)[0]
    assert y is out
    np.testing.assert_allclose(out, bncore.batch_norm_forward(x)[0], rtol=1e-6)


def test_float16_running_statistics_overflow_to_inf_without_raising():
    """Under np.errstate(over="raise") the float16 write-back of the running
    statistics raised FloatingPointError after y and running_mean were
    written; it narrows as the kernel does for float32 (Inf, silently)."""
    x = np.array([[0, 0], [60000, 4], [-60000, 8]], np.float16)
    rm16, rv16 = np.zeros(2, np.float16), np.ones(2, np.float16)
    rm32, rv32 = np.zeros(2, np.float32), np.ones(2, np.float32)
    with np.errstate(over="raise"):
        bncore.batch_norm_forward(x, running_mean=rm16, running_var=rv16)
    bncore.batch_norm_forward(x.astype(np.float32), running_mean=rm32, running_var=rv32)
    assert np.isinf(rv16[0]) and np.isfinite(rv32[0])       # 3.6e8 > float16's 65504
    np.testing.assert_array_equal(rv16[1:], rv32[1:].astype(np.float16))
    np.testing.assert_array_equal(rm16, rm32.astype(np.float16))


@pytest.mark.parametrize("call", [
    lambda x: bncore.batch_norm_forward(x, eps=10 ** 400),
    lambda x: bncore.batch_norm_forward(x, momentum=-10 ** 400),
    lambda x: bncore.BatchNorm(3, eps=10 ** 400),
    lambda x: bncore.BatchNorm(3).load_state_dict(
        dict(bncore.BatchNorm(3).state_dict(), num_batches_tracked=10 ** 400)),
    lambda x: bncore.adam_step([x], [x.copy()], [0 * x], [0 * x], step=10 ** 400),
    lambda x: bncore.optim.step_lr(0.1, 10 ** 400),
])
def test_integers_past_float64_or_int64_raise_value_errors_naming_the_argument(call):
    """Found in review: float() of a huge int raised OverflowError, not the
    ValueError naming the argument that DESIGN.md promises."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    with pytest.raises(ValueError, match=r"eps|momentum|num_batches_tracked|step"):
        call(x)


def test_an_empty_training_batch_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="an empty batch; PyTorch returns an empty y"):
        bncore.batch_norm_forward(np.zeros((0, 3), np.float32))

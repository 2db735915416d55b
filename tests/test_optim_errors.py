"""Bad optimizer and clipping inputs raise a clear error before any array is modified."""
import os

import numpy as np
import pytest

import bncore
from conftest import assert_unchanged


def fresh(n=3, dtype=np.float32):
    rng = np.random.default_rng(0)
    shapes = [(4,), (2, 3), (5,)][:n]
    mk = lambda: [rng.standard_normal(s).astype(dtype) for s in shapes]  # noqa: E731
    return dict(params=mk(), grads=mk(), m=mk(), v=[np.abs(a) for a in mk()], vmax=mk())


def ro(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def adam(a, **kw):
    args = dict(step=1, lr=1e-3)
    args.update(kw)
    return bncore.adam_step(a["params"], a["grads"], a["m"], a["v"], **args)


ADAM_CASES = [
    ("unequal list lengths", lambda a: a["grads"].pop() is None or {}, ValueError, "grads has 2 entries"),
    ("shape mismatch", lambda a: a["m"].__setitem__(1, np.zeros((3, 2), np.float32)) or {},
     ValueError, r"exp_avgs\[1\] has shape"),
    ("state dtype mismatch", lambda a: a["v"].__setitem__(0, np.zeros(4, np.float64)) or {},
     TypeError, r"exp_avg_sqs\[0\] has dtype float64"),
    ("grad dtype mismatch", lambda a: a["grads"].__setitem__(2, np.zeros(5, np.float64)) or {},
     TypeError, r"grads\[2\]"),
    ("integer params", lambda a: a["params"].__setitem__(0, np.zeros(4, np.int32)) or {},
     TypeError, r"params\[0\]"),
    ("negative lr", lambda a: {"lr": -1e-3}, ValueError, "lr"),
    ("beta1 = 1", lambda a: {"beta1": 1.0}, ValueError, "beta1"),
    ("beta2 < 0", lambda a: {"beta2": -0.1}, ValueError, "beta2"),
    ("eps < 0", lambda a: {"eps": -1e-8}, ValueError, "eps"),
    ("step 0", lambda a: {"step": 0}, ValueError, "step"),
    ("step a fraction", lambda a: {"step": 1.5}, ValueError, "step must be an integer"),
    ("step a string", lambda a: {"step": "2"}, TypeError, "step"),
    ("read-only param", lambda a: a["params"].__setitem__(1, ro(a["params"][1])) or {},
     ValueError, r"params\[1\] is read-only"),
    ("read-only state", lambda a: a["v"].__setitem__(2, ro(a["v"][2])) or {},
     ValueError, r"exp_avg_sqs\[2\] is read-only"),
    ("same array twice", lambda a: a["m"].__setitem__(0, a["v"][0]) or {},
     ValueError, "share memory"),
    ("state aliasing a param", lambda a: a["m"].__setitem__(2, a["params"][2]) or {},
     ValueError, "share memory"),
    ("overlapping views", lambda a: a.update(params=[a["vmax"][0][:3], a["vmax"][0][1:4]],
                                             grads=[np.zeros(3, np.float32)] * 2,
                                             m=[np.zeros(3, np.float32) for _ in range(2)],
                                             v=[np.zeros(3, np.float32) for _ in range(2)])
     or {}, ValueError, "share memory"),
    ("non-contiguous", lambda a: a["params"].__setitem__(0, np.zeros(8, np.float32)[::2]) or {},
     ValueError, "not contiguous"),
    ("amsgrad without state", lambda a: {"amsgrad": True}, ValueError, "max_exp_avg_sqs"),
    ("unknown eps_style", lambda a: {"eps_style": "keras"}, ValueError, "eps_style"),
    ("grad_scale zero", lambda a: {"grad_scale": 0.0}, ValueError, "grad_scale"),
]


@pytest.mark.parametrize("desc,mutate,exc,text", ADAM_CASES, ids=[c[0] for c in ADAM_CASES])
def test_adam_rejects_and_modifies_nothing(desc, mutate, exc, text):
    a = fresh()
    kw = mutate(a)
    before = {f"{k}{i}": x.copy() for k, lst in a.items() for i, x in enumerate(lst)}
    with pytest.raises(exc, match=text):
        adam(a, **kw)
    after = {f"{k}{i}": x for k, lst in a.items() for i, x in enumerate(lst)}
    assert_unchanged(before, after)


def test_sgd_rejects_bad_configurations():
    a = fresh()
    before = {i: p.copy() for i, p in enumerate(a["params"])}
    with pytest.raises(ValueError, match="nesterov"):
        bncore.sgd_step(a["params"], a["grads"], a["m"], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        bncore.sgd_step(a["params"], a["grads"], a["m"], lr=0.1, momentum=0.9, dampening=0.1,
                        nesterov=True)
    with pytest.raises(ValueError, match="momentum_buffers"):
        bncore.sgd_step(a["params"], a["grads"], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="style"):
        bncore.sgd_step(a["params"], a["grads"], lr=0.1, style="caffe")
    with pytest.raises(TypeError, match="lr"):
        bncore.sgd_step(a["params"], a["grads"], lr="0.1")
    with pytest.raises(ValueError, match="momentum"):
        bncore.sgd_step(a["params"], a["grads"], a["m"], lr=0.1, momentum=-0.5)
    assert_unchanged(before, dict(enumerate(a["params"])))


@pytest.mark.parametrize("momentum", [1.5, 1.0 + 2 ** -52, -0.1, float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["sgd_step", "rmsprop_step", "SGD", "RMSprop"])
def test_momentum_outside_the_unit_interval_is_refused(which, momentum):
    """DESIGN.md: momentum outside [0, 1] raises before any array is modified
    (Keras refuses it too; torch takes momentum > 1). Found by review: SGD and
    RMSprop took 1.5 and ran."""
    a = fresh()
    m = [np.zeros_like(p) for p in a["params"]]

    def step(mu):
        if which == "sgd_step":
            bncore.sgd_step(a["params"], a["grads"], m, lr=0.1, momentum=mu)
        elif which == "rmsprop_step":
            bncore.rmsprop_step(a["params"], a["grads"], a["m"], lr=0.1, momentum=mu,
                                momentum_buffers=m)
        else:
            getattr(bncore.optim, which)(a["params"], lr=0.1, momentum=mu).step(a["grads"])
    before = {f"{k}{i}": x.copy() for k, lst in dict(a, buf=m).items() for i, x in enumerate(lst)}
    with pytest.raises(ValueError, match="momentum must (be in|not be NaN)"):
        step(momentum)
    after = {f"{k}{i}": x for k, lst in dict(a, buf=m).items() for i, x in enumerate(lst)}
    assert_unchanged(before, after)
    for ok in (0.0, 1.0):              # the ends of the interval are taken
        step(ok)


def test_rmsprop_and_adagrad_reject_bad_configurations():
    a = fresh()
    before = {i: p.copy() for i, p in enumerate(a["params"])}
    with pytest.raises(ValueError, match="grad_avgs"):
        bncore.rmsprop_step(a["params"], a["grads"], a["v"], centered=True)
    with pytest.raises(ValueError, match="alpha"):
        bncore.rmsprop_step(a["params"], a["grads"], a["v"], alpha=1.5)
    with pytest.raises(ValueError, match="lr_decay"):
        bncore.adagrad_step(a["params"], a["grads"], a["v"], step=1, lr_decay=-1)
    with pytest.raises(ValueError, match="share memory"):
        bncore.adagrad_step(a["params"], a["grads"], a["params"], step=1)
    assert_unchanged(before, dict(enumerate(a["params"])))


def test_clipping_rejects_bad_arguments():
    g = fresh()["grads"]
    before = {i: x.copy() for i, x in enumerate(g)}
    with pytest.raises(ValueError, match="norm_type"):
        bncore.clip_grad_norm(g, 1.0, norm_type=-1)
    with pytest.raises(ValueError, match="max_norm"):
        bncore.clip_grad_norm(g, -1.0)
    with pytest.raises(ValueError, match="clip_value"):
        bncore.clip_grad_value(g, -0.5)
    with pytest.raises(ValueError, match=r"grads\[0\] is read-only"):
        bncore.clip_grad_value([ro(g[0])], 0.5)
    with pytest.raises(ValueError, match="share memory"):
        bncore.clip_grad_norm([g[0], g[0]], 0.1)
    assert_unchanged(before, dict(enumerate(g)))


def test_optimizer_classes_reject_bad_input():
    p = fresh()["params"]
    with pytest.raises(ValueError, match="convention"):
        bncore.optim.Adam(p, convention="caffe")
    with pytest.raises(TypeError, match="unexpected"):
        bncore.optim.Adam(p, momentum=0.9)
    with pytest.raises(ValueError, match="empty"):
        bncore.optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="more than one group"):
        bncore.optim.SGD([{"params": [p[0]]}, {"params": [p[0]]}], lr=0.1)
    opt = bncore.optim.Adam(p)
    before = {i: x.copy() for i, x in enumerate(p)}
    with pytest.raises(ValueError, match="grads has 2 entries"):
        opt.step(fresh()["grads"][:2])
    assert_unchanged(before, dict(enumerate(p)))
    assert opt.state == {}


# The alias check sorts byte ranges and sweeps them; here it is compared with
# the definition, pair by pair, on arrays cut from one buffer.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def cut_buffers(draw):
    """Four lists (params, grads, exp_avgs, exp_avg_sqs) of equal-length
    contiguous float32 pieces of one 24-element buffer: overlaps of one
    element up to whole arrays, and disjoint neighbours, all frequent."""
    buf = np.zeros(24, np.float32)
    ntens = draw(st.integers(1, 3))
    sizes = [draw(st.integers(0, 4)) for _ in range(ntens)]
    lists = []
    for _ in range(4):
        row = []
        for n in sizes:
            start = draw(st.integers(0, 24 - n))
            row.append(buf[start:start + n])
        lists.append(row)
    return lists


def _overlap(a, b):
    if a.size == 0 or b.size == 0:
        return False
    a0, b0 = a.ctypes.data, b.ctypes.data
    return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes


@settings(max_examples=400)       # each example takes microseconds
@given(cut_buffers())
def test_adam_refuses_exactly_the_overlapping_calls(lists):
    writes = (True, False, True, True)   # params, grads (read only), exp_avgs, exp_avg_sqs
    flat = [(k, a) for k, row in enumerate(lists) for a in row]
    expected = any(_overlap(a, b) for x, (k, a) in enumerate(flat) for y, (j, b) in
                   enumerate(flat) if x < y and (writes[k] or writes[j]))
    try:
        bncore.adam_step(*lists, step=1, lr=0.0)
    except ValueError as e:
        assert expected and "share memory" in str(e), str(e)
    else:
        assert not expected


def test_in_place_arguments_must_be_arrays():
    """A list would be converted into a temporary copy: the update would be lost."""
    pl = [1.0, 2.0]
    with pytest.raises(TypeError, match=r"params\[0\] is updated in place"):
        bncore.sgd_step(pl, [0.5, 0.5], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] is updated in place"):
        bncore.sgd_step([[1.0, 2.0]], [np.array([0.5, 0.5])], lr=0.1)
    with pytest.raises(TypeError, match=r"grads\[0\] is updated in place"):
        bncore.clip_grad_value([[1.0, 2.0]], 0.5)
    g = np.array([3.0, 4.0])
    bncore.sgd_step(np.array([1.0, 2.0]), [[0.5, 0.5]], lr=0.1)   # read-only inputs may be lists
    assert bncore.grad_norm([[3.0, 4.0]]) == 5.0 and g[0] == 3.0


def test_buffer_protocol_objects_are_updated_in_place():
    """The refusal's message names the buffer protocol, and np.asarray views an
    array.array in place, but array.array was refused (found in review)."""
    import array
    p = array.array("d", [1.0, 2.0])
    bncore.sgd_step([p], [np.ones(2)], lr=0.5)
    assert list(p) == [0.5, 1.5]
    q = array.array("f", [1.0])
    opt = bncore.optim.SGD([q], lr=1.0)
    opt.step([np.ones(1, np.float32)])
    assert list(q) == [0.0]


@pytest.mark.parametrize("call,text", [
    (lambda a: adam(a, eps=0.0), "eps"),
    (lambda a: bncore.rmsprop_step(a["params"], a["grads"], a["v"], eps=0.0), "eps"),
    (lambda a: bncore.adagrad_step(a["params"], a["grads"], a["v"], step=1, eps=0.0), "eps"),
    (lambda a: adam(a, grad_scale=-1024.0), "grad_scale"),
    (lambda a: adam(a, num_threads=2 ** 40), "num_threads"),
])
def test_values_that_would_give_garbage_are_refused(call, text):
    a = fresh()
    a["grads"][0][:] = 0.0                     # eps = 0 would give 0 / 0 here
    before = {i: p.copy() for i, p in enumerate(a["params"])}
    with pytest.raises(ValueError, match=text):
        call(a)
    assert_unchanged(before, dict(enumerate(a["params"])))


@pytest.mark.parametrize("kw,text", [(dict(found_inf="yes"), "found_inf"),
                                     (dict(found_inf=None, grad_scale="2"), "grad_scale"),
                                     (dict(num_threads=True), "num_threads")])
def test_wrong_kinds_of_scalars_are_type_errors(kw, text):
    a = fresh()
    with pytest.raises(TypeError, match=text):
        adam(a, **kw)


_FLAG_CALLS = {
    "sgd_step": (lambda a, kw: bncore.sgd_step(a["params"], a["grads"], a["m"], lr=0.1,
                                              momentum=0.9, **kw),
                 ("nesterov", "maximize", "first_step", "decoupled_weight_decay")),
    "adam_step": (lambda a, kw: bncore.adam_step(a["params"], a["grads"], a["m"], a["v"], step=1,
                                                max_exp_avg_sqs=a["vmax"], **kw),
                  ("amsgrad", "maximize", "decoupled_weight_decay")),
    "rmsprop_step": (lambda a, kw: bncore.rmsprop_step(a["params"], a["grads"], a["v"],
                                                      grad_avgs=a["m"], **kw),
                     ("centered", "maximize", "eps_inside_sqrt", "decoupled_weight_decay")),
    "adagrad_step": (lambda a, kw: bncore.adagrad_step(a["params"], a["grads"], a["v"], step=1,
                                                      **kw),
                     ("maximize", "eps_inside_sqrt", "decoupled_weight_decay")),
    "clip_grad_norm": (lambda a, kw: bncore.clip_grad_norm(a["grads"], 1e-3, **kw),
                       ("error_if_nonfinite",)),
}


@pytest.mark.parametrize("bad", ["False", None, 0.5, 2])
@pytest.mark.parametrize("fn", sorted(_FLAG_CALLS))
def test_on_off_arguments_must_be_bools(fn, bad):
    """A string is not an on/off value: nesterov="False" switched Nesterov on
    (bool("False") is True). Each flag refuses it, naming itself, with every
    array as it was."""
    call, flags = _FLAG_CALLS[fn]
    for name in flags:
        a = fresh()
        before = {f"{k}{i}": x.copy() for k in a for i, x in enumerate(a[k])}
        with pytest.raises(TypeError, match=name):
            call(a, {name: bad})
        assert_unchanged(before, {f"{k}{i}": x for k in a for i, x in enumerate(a[k])})
    a = fresh()
    call(a, {name: np.bool_(True) for name in flags if name != "first_step"})   # NumPy bools are bools


@pytest.mark.parametrize("cls,flag", [("SGD", "nesterov"), ("Adam", "amsgrad"),
                                      ("RMSprop", "centered"), ("Adagrad", "eps_inside_sqrt"),
                                      ("AdamW", "maximize")])
def test_optimizer_classes_refuse_non_bool_flags(cls, flag):
    Opt = getattr(bncore.optim, cls)
    kw = {"momentum": 0.9} if cls == "SGD" else {}
    with pytest.raises(TypeError, match=flag):
        Opt([np.ones(3)], lr=0.1, **kw, **{flag: "False"})
    p = np.ones(3)
    opt = Opt([p], lr=0.1, **kw)
    opt.param_groups[0][flag] = "no"           # a schedule's edit between steps
    with pytest.raises(TypeError, match=flag):
        opt.step([np.ones(3)])
    assert np.array_equal(p, np.ones(3))


def test_infinite_clip_bounds_compute_without_clipping():
    """torch's idiom clip_grad_norm_(params, inf) returns the norm and clips nothing."""
    g = [np.array([3.0, 4.0])]
    assert bncore.clip_grad_norm(g, float("inf")) == 5.0
    assert bncore.clip_grad_norm(g, 1e300, norm_type="inf") == 4.0
    bncore.clip_grad_value(g, float("inf"))
    np.testing.assert_array_equal(g[0], [3.0, 4.0])
    with pytest.raises(ValueError, match="max_norm"):
        bncore.clip_grad_norm(g, float("nan"))
    with pytest.raises(TypeError, match="norm_type"):
        bncore.clip_grad_norm(g, 1.0, norm_type="two")


def test_threads_are_capped_by_the_work_not_by_the_request():
    """num_threads far above the work: the same bits, and no thousands of threads."""
    rng = np.random.default_rng(5)
    mk = lambda: [rng.standard_normal(70000).astype(np.float32)]  # noqa: E731
    a = dict(params=mk(), grads=mk(), m=mk(), v=[np.abs(x) for x in mk()])
    b = {k: [x.copy() for x in v] for k, v in a.items()}
    tasks = "/proc/self/task"
    threads_before = len(os.listdir(tasks)) if os.path.isdir(tasks) else 0
    adam(a, num_threads=1)
    adam(b, num_threads=4096)
    for x, y in zip(a["params"], b["params"]):
        assert x.tobytes() == y.tobytes()
    if os.path.isdir(tasks):
        # OpenMP keeps the threads of a parallel region alive in its pool: 70000
        # elements are 5 chunks, so a handful of threads more at most (earlier
        # tests may have grown the pool already), not the 4096 asked for
        assert len(os.listdir(tasks)) <= threads_before + 8


def test_sgd_flags_follow_each_style():
    """torch refuses nesterov without momentum or with dampening; Keras runs
    nesterov without momentum as plain SGD, and has no dampening (refused rather
    than ignored); optax.sgd(nesterov=True) without momentum is plain SGD."""
    a = fresh()
    with pytest.raises(ValueError, match="nesterov"):
        bncore.sgd_step(a["params"], a["grads"], lr=0.1, nesterov=True)
    plain = [p.copy() for p in a["params"]]
    bncore.sgd_step(plain, a["grads"], lr=0.1)
    for style in ("keras", "onnx"):
        b = fresh()
        bncore.sgd_step(b["params"], b["grads"], lr=0.1, nesterov=True, style=style)
        for x, y in zip(b["params"], plain):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="dampening"):
        bncore.sgd_step(a["params"], a["grads"], a["m"], lr=0.1, momentum=0.9, dampening=0.5,
                        style="keras")
    c = fresh()
    bncore.optim.SGD(c["params"], convention="optax", lr=0.1, nesterov=True).step(c["grads"])
    for x, y in zip(c["params"], plain):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("style", ["torch", "keras"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_first_step_does_not_read_the_momentum_buffer(style, nesterov):
    """first_step starts the buffer afresh whatever it holds: torch sets it to g,
    Keras (whose momentum starts at 0) to lr * g."""
    a = fresh(dtype=np.float64)
    lr, mu = 0.1, 0.9
    bufs = [np.full_like(p, 123.0) for p in a["params"]]
    want_p, want_b = [], []
    for p, g in zip(a["params"], a["grads"]):
        v = g.copy() if style == "torch" else lr * g
        step = (lr * (g + mu * v) if style == "torch" else mu * v + lr * g) if nesterov else \
            (lr * v if style == "torch" else v)
        want_p.append(p - step)
        want_b.append(v)
    bncore.sgd_step(a["params"], a["grads"], bufs, lr=lr, momentum=mu, nesterov=nesterov,
                    style=style, first_step=True)
    for x, y in zip(a["params"] + bufs, want_p + want_b):
        np.testing.assert_allclose(x, y, rtol=1e-15, atol=1e-15)


def test_empty_arrays_overlap_nothing():
    """An empty view inside another operand holds no element: not an alias
    (p[3:][:0] points at p[3]; NumPy gives p[3:3] p's own address)."""
    p, g = np.arange(8.0), np.ones(8)
    assert p[3:][:0].ctypes.data == p.ctypes.data + 24
    bncore.sgd_step([p, p[3:][:0]], [g, g[5:][:0]], lr=0.5)
    np.testing.assert_array_equal(p, np.arange(8.0) - 0.5)


@pytest.mark.parametrize("call", [
    lambda p, g, s: bncore.sgd_step([p], None, lr=0.1),
    lambda p, g, s: bncore.sgd_step(None, [g], lr=0.1),
    lambda p, g, s: bncore.adam_step([p], [g], None, [s], step=1),
    lambda p, g, s: bncore.adam_step([p], [g], [s], None, step=1),
    lambda p, g, s: bncore.rmsprop_step([p], [g], None),
    lambda p, g, s: bncore.adagrad_step([p], [g], None, step=1),
    lambda p, g, s: bncore.clip_grad_norm(None, 1.0),
    lambda p, g, s: bncore.found_inf(None),
])
def test_a_missing_required_list_is_a_type_error(call):
    """None for a list every step reads was taken for an absent optional
    operand: the kernel then read through a null pointer (a crash)."""
    p, g, s = np.ones(3, np.float32), np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="got None"):
        call(p, g, s)
    np.testing.assert_array_equal(p, 1.0)


def test_misaligned_arrays_are_read_from_copies_and_refused_as_outputs():
    """np.frombuffer at an odd offset is C-contiguous and writeable but not
    aligned: the typed loads and stores of the kernels are undefined there. An
    input is read from an aligned copy; an updated array cannot be copied."""
    a = np.frombuffer(bytearray(4 * 10 + 1), np.float32, offset=1, count=10)
    a[:] = np.arange(10, dtype=np.float32)
    assert not a.flags.aligned
    with pytest.raises(ValueError, match=r"params\[0\] is not aligned"):
        bncore.sgd_step([a], [np.ones(10, np.float32)], lr=0.1)
    assert bncore.grad_norm([a]) == bncore.grad_norm([np.arange(10, dtype=np.float32)])
    p = np.zeros(10, np.float32)
    bncore.sgd_step([p], [a], lr=0.5)
    np.testing.assert_array_equal(p, -0.5 * np.arange(10, dtype=np.float32))


def test_a_misaligned_input_overlapping_an_updated_array_is_refused():
    """Found in review: the aliasing check looked at the aligned copy of a
    misaligned input, not at the caller's memory, so a gradient overlapping its
    own parameter passed (the step read a snapshot)."""
    buf = np.zeros(4 * 12, np.uint8)
    p = np.frombuffer(buf, np.float32, count=8)
    g = np.frombuffer(buf, np.float32, offset=2, count=8)       # misaligned, overlapping p
    assert not g.flags.aligned
    with pytest.raises(ValueError, match=r"share memory"):
        bncore.sgd_step([p], [g], lr=0.1)
    q = np.frombuffer(np.zeros(4 * 12, np.uint8), np.float32, offset=2, count=8)
    bncore.sgd_step([p], [q], lr=0.1)                           # elsewhere: fine


@pytest.mark.parametrize("call", [
    lambda a: bncore.sgd_step([np.ones(4)], [a], lr=0.1),
    lambda a: bncore.sgd_step([a], [np.ones(4)], lr=0.1),
    lambda a: bncore.grad_norm([a]),
    lambda a: bncore.clip_grad_value([a], 1.0),
    lambda a: bncore.found_inf([a]),
    lambda a: bncore.adam_step([np.ones(4)], [np.ones(4)], [a], [np.zeros(4)], step=1),
])
def test_arrays_in_the_other_byte_order_are_refused(call):
    """Found in review: a '>f8' array has float64's type number, so the kernels
    read its bytes as native doubles (grad_norm of [3,3,3,3] was 2e-320, an
    SGD step with a >f4 gradient did nothing); batch norm already refused it."""
    a = np.full(4, 3.0, dtype=">f8")
    with pytest.raises(TypeError, match="opposite byte order"):
        call(a)


def test_a_huge_integer_loss_scale_is_a_value_error():
    with pytest.raises(ValueError, match="grad_scale"):
        bncore.adam_step([np.ones(2)], [np.ones(2)], [np.zeros(2)], [np.zeros(2)], step=1,
                         grad_scale=10 ** 400)


@pytest.mark.parametrize("step", [2, 2.0, np.float64(2), np.int64(2), np.array(2.0)])
@pytest.mark.parametrize("lr", [0.1, np.float32(0.1), np.array(0.1)])
def test_integral_steps_and_0d_learning_rates_are_values(step, lr):
    """A step count given as an integral float, a NumPy scalar or a 0-d array,
    and a learning rate given as a 0-d array, mean their values: the same
    step as plain Python numbers give."""
    ref = [np.ones(3)]
    bncore.adam_step(ref, [np.full(3, 0.5)], [np.zeros(3)], [np.zeros(3)], step=2,
                     lr=float(np.float32(0.1)) if isinstance(lr, np.float32) else 0.1)
    p = [np.ones(3)]
    bncore.adam_step(p, [np.full(3, 0.5)], [np.zeros(3)], [np.zeros(3)], step=step, lr=lr)
    np.testing.assert_array_equal(p[0], ref[0])


def test_a_numpy_scalar_cannot_be_updated_in_place():
    """NumPy scalars carry __array_interface__ but are immutable: the update
    went to a copy and was silently lost; now refused like a list."""
    p = np.float64(1.0)
    with pytest.raises(TypeError, match="updated in place"):
        bncore.sgd_step([p], [np.float64(0.5)], lr=0.1)
    assert bncore.grad_norm([np.float64(3.0)]) == 3.0     # read-only uses still work


def test_first_overlap_agrees_with_checking_every_pair():
    """bncore._checks.first_overlap (bncore_gpu's tables, mixed-dtype clipping)
    against all pairs, on random byte ranges."""
    from bncore._checks import first_overlap
    rng = np.random.default_rng(5)
    for _ in range(5000):
        n = int(rng.integers(0, 7))
        st = rng.integers(0, 20, n)
        en = st + rng.integers(0, 6, n)
        w = rng.random(n) < 0.5
        want = any(i != j and en[i] > st[i] and en[j] > st[j] and st[i] < en[j] and st[j] < en[i]
                   and (w[i] or w[j]) for i in range(n) for j in range(n))
        got = first_overlap(st, en, w)
        assert (got is not None) == want, (st, en, w)
        if got is not None:
            i, j = got
            assert i != j and st[i] < en[j] and st[j] < en[i] and (w[i] or w[j])


@pytest.mark.parametrize("call,exc,text", [
    (lambda P, G, Z: bncore.sgd_step(P, G, lr=0.1, style=np.array(["torch", "keras"])),
     TypeError, "style must be one of"),
    (lambda P, G, Z: bncore.rmsprop_step(P, G, Z(), style=np.array(["torch", "keras"])),
     TypeError, "style must be one of"),
    (lambda P, G, Z: bncore.adam_step(P, G, Z(), Z(), step=1, eps_style=np.array(["torch", "hat"])),
     TypeError, "eps_style must be one of"),
    (lambda P, G, Z: bncore.sgd_step(P, G, lr=0.1, grad_scale=True), TypeError, "grad_scale"),
    (lambda P, G, Z: bncore.adam_step(P, G, Z(), Z(), step=1, grad_scale=np.True_), TypeError,
     "grad_scale"),
    (lambda P, G, Z: bncore.sgd_step(P, G, lr=0.1, grad_scale=np.array(True)), TypeError,
     "grad_scale"),
    (lambda P, G, Z: bncore.sgd_step(P, G, lr=0.1, found_inf=float("nan")), ValueError,
     "found_inf"),
    (lambda P, G, Z: bncore.found_inf([[np.ones(3), np.ones(2)]]), TypeError, r"grads\[0\]"),
    (lambda P, G, Z: bncore.grad_norm([[np.ones(3), np.ones(2)]]), TypeError, r"grads\[0\]"),
])
def test_fuzzed_bad_arguments_are_named(call, exc, text):
    """Found by fuzzing the error paths: an array as a string option raised
    NumPy's "truth value ... ambiguous", a bool loss scale was taken as 1.0, a
    NaN found_inf skipped the step, and a ragged nested list of gradients gave
    NumPy's own message; each now names its argument, and nothing changes."""
    P = [np.ones(3, np.float32)]
    G = [np.ones(3, np.float32)]
    with pytest.raises(exc, match=text):
        call(P, G, lambda: [np.zeros(3, np.float32)])
    assert P[0].tobytes() == np.ones(3, np.float32).tobytes()


def test_a_torch_bool_loss_scale_is_refused_and_mappings_load():
    """Review of the fuzzing fixes: torch.tensor(True) slipped past the bool
    check (its dtype is torch.bool); a state_dict whose 'state' is a read-only
    mapping loaded before the structure checks and loads again."""
    torch = pytest.importorskip("torch")
    P = [np.ones(3, np.float32)]
    with pytest.raises(TypeError, match="grad_scale"):
        bncore.sgd_step(P, [np.ones(3, np.float32)], lr=0.1, grad_scale=torch.tensor(True))
    bncore.sgd_step(P, [np.ones(3, np.float32)], lr=0.1, grad_scale=torch.tensor(2.0))
    np.testing.assert_array_equal(P[0], np.full(3, 0.95, np.float32))
    import types
    opt = bncore.optim.Adam([np.ones(3)], lr=0.1)
    opt.step([np.ones(3)])
    sd = opt.state_dict()
    sd["state"] = types.MappingProxyType(sd["state"])
    sd["param_groups"] = [types.MappingProxyType(g) for g in sd["param_groups"]]
    opt.load_state_dict(sd)
    opt.step([np.ones(3)])

"""The fast paths of batch_norm_forward / batch_norm_backward (forward_fast and
backward_fast in bncore/_bn_kernels.pyx) against the checked path: the same
bits wherever they accept a call, and None (the checked path then decides,
raising where it must) for every argument they must leave to it."""
import contextlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bncore
from bncore import _bn_kernels as kernels


@contextlib.contextmanager
def checked_path_only():
    """Both fast paths declining every call, as for a non-plain argument."""
    saved = kernels.forward_fast, kernels.backward_fast
    kernels.forward_fast = kernels.backward_fast = lambda *a: None
    try:
        yield
    finally:
        kernels.forward_fast, kernels.backward_fast = saved


def _copies(d):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in d.items()}


def _same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.strides == b.strides
        assert a.tobytes() == b.tobytes()


def _both_ways(fn, args):
    """fn(**args) through the public function and through the checked path only
    (each on its own copies): the same outputs and the same updated arrays, or
    the same exception."""
    fast_args, slow_args = _copies(args), _copies(args)
    outcomes = []
    for a, ctx in ((fast_args, contextlib.nullcontext()), (slow_args, checked_path_only())):
        with ctx:
            try:
                outcomes.append(fn(**a))
            except (TypeError, ValueError) as e:
                outcomes.append(e)
    got, want = outcomes
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
        return
    for g, w in zip(got, want):
        _same(g, w)
    for key in args:
        _same(fast_args[key], slow_args[key])


@st.composite
def forward_calls(draw):
    nd = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=nd, max_size=nd)))
    axis = draw(st.integers(-nd, nd - 1))
    C = shape[axis]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    offset = draw(st.sampled_from([0.0, 3.0, 1e4]))
    args = dict(x=(rng.standard_normal(shape) + offset).astype(dtype),
                training=draw(st.booleans()), axis=axis,
                eps=draw(st.sampled_from([1e-5, 1e-3])),
                momentum=draw(st.sampled_from([0.0, 0.1, 1.0])),
                unbiased_running_var=draw(st.booleans()),
                num_threads=draw(st.sampled_from([None, 1, 2, 3])))
    for name in ("weight", "bias"):
        vdt = draw(st.sampled_from([None, np.float32, np.float64]))
        args[name] = None if vdt is None else rng.normal(1.0, 0.5, C).astype(vdt)
    rdt = draw(st.sampled_from([None, np.float32, np.float64]))
    if rdt is not None or not args["training"]:
        rdt = rdt or np.float64
        args["running_mean"] = rng.normal(0.0, 1.0, C).astype(rdt)
        args["running_var"] = rng.uniform(0.5, 2.0, C).astype(rdt)
    if draw(st.booleans()):
        args["out"] = np.full_like(args["x"], np.nan)
    return args


@given(forward_calls())
def test_forward_fast_path_gives_the_checked_paths_bits(args):
    _both_ways(bncore.batch_norm_forward, args)


@given(forward_calls(), st.integers(0, 2**32 - 1))
def test_backward_fast_path_gives_the_checked_paths_bits(fargs, seed):
    x, axis = fargs["x"], fargs["axis"]
    C = x.shape[axis]
    rng = np.random.default_rng(seed)
    args = dict(dy=rng.standard_normal(x.shape).astype(x.dtype), x=x,
                mean=rng.normal(0.0, 1.0, C), invstd=rng.uniform(0.5, 2.0, C),
                weight=fargs["weight"], training=fargs["training"], axis=axis,
                num_threads=fargs["num_threads"], out=fargs.get("out"))
    _both_ways(bncore.batch_norm_backward, args)


@pytest.mark.parametrize("shape,axis", [((16, 32, 24, 24), 1), ((16, 24, 24, 32), -1),
                                        ((3000, 40), 1)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fast_paths_on_multithreaded_sizes(shape, axis, threads):
    """Above the one-thread cutoff (32768 elements), with running statistics."""
    rng = np.random.default_rng(4)
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 50).astype(np.float32)
    stats = dict(running_mean=np.zeros(C, np.float32), running_var=np.ones(C, np.float32))
    _both_ways(bncore.batch_norm_forward,
               dict(x=x, weight=rng.normal(1, 0.2, C).astype(np.float32), axis=axis,
                    num_threads=threads, **stats))
    _, mean, invstd = bncore.batch_norm_forward(x, axis=axis)
    _both_ways(bncore.batch_norm_backward,
               dict(dy=rng.standard_normal(shape).astype(np.float32), x=x, mean=mean,
                    invstd=invstd, axis=axis, num_threads=threads))


def _plain_forward():
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((4, 3, 5)).astype(np.float32),
                weight=np.ones(3, np.float32), bias=np.zeros(3, np.float32),
                running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32),
                training=True, momentum=0.1, eps=1e-5, axis=1, unbiased=True, out=None)


def _fast_forward(a):
    return kernels.forward_fast(a["x"], a["weight"], a["bias"], a["running_mean"],
                                a["running_var"], a["training"], a["momentum"], a["eps"],
                                a["axis"], a["unbiased"], a["out"], 2)


def _big_endian(a):
    return a.astype(a.dtype.newbyteorder(">"))


def _misaligned(a):
    buf = np.zeros(a.nbytes + 1, np.uint8)
    m = np.frombuffer(buf.data, dtype=a.dtype, count=a.size, offset=1).reshape(a.shape)
    m[...] = a
    return m


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


# (description, change to the plain arguments): each must leave the call to
# the checked path, which converts, copies or refuses what it gets
DECLINED = [
    ("float16 x", lambda a: a.update(x=a["x"].astype(np.float16))),
    ("non-contiguous x", lambda a: a.update(x=np.repeat(a["x"], 2, axis=2)[:, :, ::2])),
    ("x a list", lambda a: a.update(x=a["x"].tolist())),
    ("x big-endian", lambda a: a.update(x=_big_endian(a["x"]))),
    ("x misaligned", lambda a: a.update(x=_misaligned(a["x"]))),
    ("x 1-D", lambda a: a.update(x=a["x"].reshape(-1))),
    ("x with no values per channel", lambda a: a.update(x=np.zeros((0, 3, 5), np.float32))),
    ("one value per channel in training", lambda a: a.update(x=a["x"][:1, :, :1].copy())),
    ("axis a float", lambda a: a.update(axis=1.0)),
    ("axis out of range", lambda a: a.update(axis=3)),
    ("axis a numpy integer", lambda a: a.update(axis=np.int64(1))),
    ("training an int", lambda a: a.update(training=1)),
    ("unbiased None", lambda a: a.update(unbiased=None)),
    ("eps a numpy float", lambda a: a.update(eps=np.float64(1e-5))),
    ("eps zero", lambda a: a.update(eps=0.0)),
    ("eps infinite", lambda a: a.update(eps=float("inf"))),
    ("momentum NaN", lambda a: a.update(momentum=float("nan"))),
    ("momentum above 1", lambda a: a.update(momentum=1.5)),
    ("weight float16", lambda a: a.update(weight=a["weight"].astype(np.float16))),
    ("weight strided", lambda a: a.update(weight=np.ones(6, np.float32)[::2])),
    ("weight wrong length", lambda a: a.update(weight=np.ones(4, np.float32))),
    ("bias a list", lambda a: a.update(bias=[0.0, 0.0, 0.0])),
    ("running_mean read-only in training",
     lambda a: a.update(running_mean=_readonly(a["running_mean"]))),
    ("running statistics one array", lambda a: a.update(running_var=a["running_mean"])),
    ("running_var overlapping x", lambda a: a.update(running_var=a["x"].reshape(-1)[:3])),
    ("running_mean is weight", lambda a: a.update(running_mean=a["weight"])),
    ("only one running statistic", lambda a: a.update(running_var=None)),
    ("inference without running statistics",
     lambda a: a.update(training=False, running_mean=None, running_var=None)),
    ("out read-only", lambda a: a.update(out=_readonly(a["x"]))),
    ("out of another dtype", lambda a: a.update(out=a["x"].astype(np.float64))),
    ("out of another shape", lambda a: a.update(out=a["x"][:, :, :4].copy())),
    ("out non-contiguous", lambda a: a.update(out=np.empty((4, 3, 10), np.float32)[:, :, ::2])),
    ("out a list", lambda a: a.update(out=a["x"].tolist())),
    ("out is x", lambda a: a.update(out=a["x"])),
    ("out holding running_mean",
     lambda a: a.update(out=np.zeros_like(a["x"])) or a.update(
         running_mean=a["out"].reshape(-1)[:3])),
    ("out holding running_var in inference",
     lambda a: a.update(out=np.ones_like(a["x"])) or a.update(
         training=False, running_var=a["out"].reshape(-1)[3:6])),
]


def test_the_fast_path_takes_plain_calls():
    assert _fast_forward(_plain_forward()) is not None
    assert _fast_forward(dict(_plain_forward(), out=np.empty((4, 3, 5), np.float32))) is not None
    a = _plain_forward()
    a.update(training=False, axis=-2)
    a["running_mean"].flags.writeable = False    # inference only reads them
    assert _fast_forward(a) is not None


@pytest.mark.parametrize("desc,change", DECLINED, ids=[d for d, _ in DECLINED])
def test_the_fast_path_leaves_other_calls_to_the_checked_path(desc, change):
    a = _plain_forward()
    change(a)
    before = {k: np.array(v, copy=True) if isinstance(v, np.ndarray) else v
              for k, v in a.items()}
    assert _fast_forward(a) is None
    for key, v in before.items():
        if isinstance(v, np.ndarray):
            assert a[key].tobytes() == v.tobytes(), f"{key} modified by a declined call"


def test_backward_fast_path_declines_what_it_must():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x)
    ok = dict(dy=dy, x=x, mean=mean, invstd=invstd, weight=None, training=True, axis=1,
              out=np.empty_like(x))
    assert kernels.backward_fast(*ok.values(), 2) is not None
    assert kernels.backward_fast(*dict(ok, out=None).values(), 2) is not None
    for change in (dict(dy=dy.astype(np.float64)), dict(dy=dy[:, :, :4].copy()),
                   dict(mean=mean.astype(np.float32)), dict(invstd=invstd[:2].copy()),
                   dict(invstd=np.repeat(invstd, 2)[::2]), dict(weight=[1.0, 1.0, 1.0]),
                   dict(training="yes"), dict(axis=-4), dict(x=x.astype(np.float16),
                                                             dy=dy.astype(np.float16)),
                   dict(x=x[:1, :, :1].copy(), dy=dy[:1, :, :1].copy()),
                   dict(out=dy), dict(out=(np.empty_like(x), None, None)),
                   dict(out=_readonly(x)), dict(out=np.empty((4, 3, 5)))):
        assert kernels.backward_fast(*dict(ok, **change).values(), 2) is None, change


# ---- review: floating-point exceptions and dtype identity ------------------

def _backward_fp_case(wdt, invstd):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5))
    return dict(dy=rng.standard_normal(x.shape), x=x, mean=np.zeros(3),
                invstd=np.full(3, invstd), weight=None if wdt is None else np.ones(3, wdt))


FP_CASES = [("overflow in the float32 cast", np.float32, 1e200),
            ("underflow in the float32 cast", np.float32, 1e-42),
            ("overflow in dweight = sum * invstd", None, 1e308),
            ("underflow in dweight = sum * invstd", None, 1e-320)]


@pytest.mark.parametrize("desc,wdt,invstd", FP_CASES, ids=[c[0] for c in FP_CASES])
def test_backward_fast_path_raises_the_checked_paths_floating_point_errors(desc, wdt, invstd):
    """Under np.errstate(all="raise") the checked path's NumPy epilogue (the
    multiply and the astype) raises FloatingPointError; the fast path must
    give the same outcome, not a silent inf / subnormal."""
    args = _backward_fp_case(wdt, invstd)
    outcomes = []
    for ctx in (contextlib.nullcontext(), checked_path_only()):
        with ctx, np.errstate(all="raise"):
            try:
                outcomes.append(bncore.batch_norm_backward(**args))
            except FloatingPointError as e:
                outcomes.append(str(e))
    got, want = outcomes
    assert isinstance(want, str), "the case should raise on the checked path"
    assert got == want


def test_backward_fast_path_warns_as_the_checked_path_does():
    import warnings
    args = _backward_fp_case(np.float32, 1e200)
    caught = []
    for ctx in (contextlib.nullcontext(), checked_path_only()):
        with ctx, warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            bncore.batch_norm_backward(**args)
        caught.append([str(m.message) for m in w])
    assert caught[0] == caught[1] and caught[1]


def test_fast_paths_keep_xs_dtype_object():
    """y / dx get x's dtype itself (np.empty(shape, x.dtype) on the checked
    path), metadata included."""
    meta = np.dtype(np.float64, metadata={"unit": "m"})
    x = np.random.default_rng(6).standard_normal((4, 3, 5)).astype(meta)
    y, mean, invstd = bncore.batch_norm_forward(x)
    with checked_path_only():
        y_ref, _, _ = bncore.batch_norm_forward(x)
    assert y.dtype.metadata == y_ref.dtype.metadata == {"unit": "m"}
    dx, _, _ = bncore.batch_norm_backward(x, x, mean, invstd)
    with checked_path_only():
        dx_ref, _, _ = bncore.batch_norm_backward(x, x, mean, invstd)
    assert dx.dtype.metadata == dx_ref.dtype.metadata == {"unit": "m"}


def test_plain_calls_never_reach_the_checked_path(monkeypatch):
    """The public functions do take the fast paths (the comparisons above would
    pass just as well if they never did), also for a backward whose dweight
    NumPy must form (an Inf in dy): that one reuses dx and the sums rather
    than running the kernels again through the checked path."""
    import bncore.batch_norm as bnm

    def refuse(*args, **kwargs):
        raise AssertionError("the checked path was taken")

    monkeypatch.setattr(bnm, "forward_args", refuse)
    monkeypatch.setattr(bnm, "backward_args", refuse)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, num_threads=2)
    bncore.batch_norm_forward(x, w, b, rm, rv, training=False)
    bncore.batch_norm_forward(x.astype(np.float64), axis=-1)
    bncore.batch_norm_backward(dy, x, mean, invstd, w)
    y = np.empty_like(x)
    assert bncore.batch_norm_forward(x, w, b, rm, rv, out=y)[0] is y
    assert bncore.batch_norm_backward(dy, x, mean, invstd, w, out=y)[0] is y
    dy[0, 0, 0] = np.inf
    with np.errstate(all="ignore"):
        _, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w)
    assert db[0] == np.inf and dw.dtype == np.float32
    layer = bncore.BatchNorm(3)
    layer.forward(x)
    layer.backward(np.ones_like(x))


def _page_gap(a, b):
    d = (a.__array_interface__["data"][0] - b.__array_interface__["data"][0]) % 4096
    return min(d, 4096 - d)


@pytest.mark.parametrize("layout", ["plain", "channels_last_view", "float16"])
def test_new_outputs_sit_half_a_page_from_the_inputs(layout):
    """A new y or dx of 64 KiB or more is placed about half a page from x (and
    dy) within a 4 KiB page: a few bytes apart, every store collided with a
    later load in the store buffer's 4 KiB check (float32 (256,1024) backward
    96-101 us against 73-76). Where malloc put it decided, run by run. The
    values are those written into a given out=, bit for bit."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if layout == "float16" else np.float32
    x = rng.standard_normal((64, 16, 8, 8)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    if layout == "channels_last_view":          # the checked path, a permuted layout
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    y, m, s = bncore.batch_norm_forward(x)
    dx = bncore.batch_norm_backward(dy, x, m, s)[0]
    assert _page_gap(y, x) >= 1024 and _page_gap(dx, x) >= 512 and _page_gap(dx, dy) >= 512
    y2, dx2 = np.empty_like(x), np.empty_like(x)
    bncore.batch_norm_forward(x, out=y2)
    bncore.batch_norm_backward(dy, x, m, s, out=dx2)
    assert y.tobytes() == y2.tobytes() and dx.tobytes() == dx2.tobytes()
    assert y.shape == x.shape and y.dtype == x.dtype and y.flags.writeable
    small = np.ones((4, 8), np.float32)                 # below 64 KiB: np.empty
    assert bncore.batch_norm_forward(small)[0].base is None

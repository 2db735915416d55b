"""Batch-norm functions: accuracy on adversarial data, layouts, out=, the GIL,
thread invariance on large shapes. (The registry tests cover the oracle and
finite differences over random draws; these pin down specific promises.)"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bncore
from bncore import _bn_kernels as _k
from reference import batch_norm_backward as ref_backward
from reference import batch_norm_forward as ref_forward
from conftest import calls_before_main_ran
from reference import normwise_relative_error as rel_err


def adversarial(shape, axis, ratio, rng, dtype=np.float32):
    """Channels with |mean| = ratio * std (std ~ 1) plus one near-constant channel."""
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    std = rng.uniform(0.5, 2.0, C)
    std[0] = 1e-4                                # near-constant channel
    mean = std * ratio * rng.choice((-1.0, 1.0), C)
    mean[0] = 3.0
    x = mean.reshape(bshape) + std.reshape(bshape) * rng.standard_normal(shape)
    return x.astype(dtype)


LAYOUTS = [((16, 8, 12, 12), 1), ((16, 12, 12, 8), 3), ((64, 32), 1), ((4, 6, 5, 7, 3), 1)]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("ratio", [1e3, 1e5])
@pytest.mark.parametrize("training", [True, False])
def test_float32_accuracy_on_adversarial_data(shape, axis, ratio, training):
    rng = np.random.default_rng(int(ratio) + len(shape))
    x = adversarial(shape, axis, ratio, rng)
    C = shape[axis]
    w = rng.normal(1, 0.2, C).astype(np.float32)
    b = rng.normal(0, 0.2, C).astype(np.float32)
    red = tuple(i for i in range(len(shape)) if i != axis)
    x64 = x.astype(np.float64)
    rm = (x64.mean(axis=red) + 0.05 * x64.std(axis=red)).astype(np.float32)
    rv = (x64.var(axis=red) * 1.1).astype(np.float32)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, training=training,
                                                momentum=0.3, axis=axis)
    ey, emean, einvstd, erm, erv = ref_forward(x, w, b, rm0, rv0, training=training,
                                               momentum=0.3, axis=axis)
    assert rel_err(y, ey) <= 1e-6
    assert rel_err(rm, erm) <= 1e-6 and rel_err(rv, erv) <= 1e-6
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=training, axis=axis)
    edx, edw, edb = ref_backward(dy, x, emean, einvstd, w, training=training, axis=axis)
    assert rel_err(dx, edx) <= 1e-6
    assert rel_err(dw, edw) <= 1e-6
    assert rel_err(db, edb) <= 1e-6


SCHEDULE_SHAPES = [((7, 3, 50, 41), 1, "rows"),        # one segment per row
                   ((2, 3, 20000), 1, "rows"),          # three segments per row
                   ((2, 1, 8192), 1, "rows"),           # one long segment
                   ((40, 10, 10, 64), 3, "narrow"),     # 64 channels-last
                   ((4099, 16), 1, "narrow"),           # 4 rows per super-row, a tail
                   ((60, 9, 9, 100), 3, "tiles"),       # tiles and a partial tile
                   ((43688, 3), 1, "tiles"),            # 3 channels: long tile blocks
                   ((300, 1024), 1, "tiles"),           # wide rows
                   ((50, 6, 7, 5), 2, "flat")]          # short inner: flat super-rows


def _longdouble_var(x, axis):
    red = tuple(i for i in range(x.ndim) if i != axis)
    xl = x.astype(np.longdouble)
    return ((xl - xl.mean(axis=red, keepdims=True)) ** 2).mean(axis=red)


def _outliers_at_every_pivot(x, axis, distance, rng):
    """Move the value each work item takes as its pivot (a segment's first
    value, a block's first row) `distance` away, in place; returns the plan."""
    from bncore import _bn_kernels as kernels
    outer, C = int(np.prod(x.shape[:axis])), x.shape[axis]
    inner = int(np.prod(x.shape[axis + 1:]))
    v = x.reshape(outer, C, inner)
    plan = kernels.plan_info(outer, C, inner, x.itemsize)
    if plan["schedule"] == "rows":
        for k in range(0, inner, plan["seg_len"]):
            v[:, :, k] += distance * rng.choice((-1.0, 1.0), (outer, C))
    else:
        for r in range(0, outer, plan["block_rows"]):
            v[r, :, 0] += distance * rng.choice((-1.0, 1.0), C)
    return plan


@pytest.mark.parametrize("shape,axis,schedule", SCHEDULE_SHAPES)
@pytest.mark.parametrize("outliers", [False, True])
def test_statistics_exact_for_nearly_constant_float64(shape, axis, schedule, outliers):
    """Channels 1e6 times their std away from 0 (each at its own offset) get
    their variance to ~1e-15 relative, not ~u * 1e12 as a one-pass sum against
    0 would. With outliers (1e4 std off) at every work item's pivot, the
    one-pass S2 - S1^2/n would lose a factor n (3.9e-10 measured on
    (43688, 3)); those items' sums are taken again against their first-pass
    mean instead."""
    rng = np.random.default_rng(3)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (10.0 + 3.0 * np.arange(C)).reshape(bshape) + 1e-5 * rng.standard_normal(shape)
    from bncore import _bn_kernels as kernels
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    assert kernels.plan_info(outer, C, inner, 8)["schedule"] == schedule
    if outliers:
        _outliers_at_every_pivot(x, axis, 0.1, rng)
    y, mean, invstd = bncore.batch_norm_forward(x, eps=1e-30, axis=axis)
    var = _longdouble_var(x, axis)
    got_var = 1.0 / invstd.astype(np.longdouble) ** 2
    assert np.max(np.abs(got_var / var - 1)) < 1e-13


@pytest.mark.parametrize("shape,axis", [((6, 3, 100, 100), 1),      # two segments per row
                                        ((32, 28, 28, 48), 3),      # many channels-last blocks
                                        ((16, 14, 14, 64), 3),      # narrow rows, one row each
                                        ((16, 14, 14, 32), 3),      # narrow rows, two rows each
                                        ((64, 300), 1),             # 2-D, flat identity rows
                                        ((5000, 37), 1),            # 2-D, C not a tile multiple
                                        ((40, 5, 7, 3), 2),         # short inner, any axis
                                        ((8, 64, 64, 64), 3)])      # narrow, 65536-element blocks
def test_large_shapes_bitwise_identical_across_threads(shape, axis):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 100).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    ref = None
    for n in (1, 2, 3, 4, 7):
        y, mean, invstd = bncore.batch_norm_forward(x, axis=axis, num_threads=n)
        dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, axis=axis, num_threads=n)
        got = [a.tobytes() for a in (y, mean, invstd, dx, dw, db)]
        if ref is None:
            ref = got
        assert got == ref, f"results differ with {n} threads"
    ey, emean, einvstd, _, _ = ref_forward(x, axis=axis)
    assert rel_err(y, ey) <= 1e-6


def test_layouts_give_the_same_answer_and_keep_the_layout():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((4, 5, 6, 7)).astype(np.float32)
    views = {
        "c": base,
        "channels_last": np.ascontiguousarray(base.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
        "fortran": np.asfortranarray(base),
        "strided": np.repeat(base, 2, axis=3)[..., ::2],
        "reversed": np.ascontiguousarray(base[::-1])[::-1],
    }
    expected = bncore.batch_norm_forward(base)[0]
    for name, x in views.items():
        assert np.array_equal(x, base)
        y = bncore.batch_norm_forward(x)[0]
        assert rel_err(y, expected) <= 1e-6, name
        if name == "channels_last":
            assert y.transpose(0, 2, 3, 1).flags.c_contiguous, "output should keep NHWC memory"
        if name == "fortran":
            assert y.flags.f_contiguous


def test_out_arrays_are_written_and_returned():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 4, 5)).astype(np.float32)
    out = np.full_like(x, np.nan)
    y, mean, invstd = bncore.batch_norm_forward(x, out=out)
    assert y is out and np.isfinite(out).all()
    assert np.array_equal(out, bncore.batch_norm_forward(x)[0])
    # an out with another layout is filled through a temporary
    out_f = np.asfortranarray(np.full_like(x, np.nan))
    bncore.batch_norm_forward(x, out=out_f)
    assert np.array_equal(out_f, out)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = np.empty_like(x)
    dw = np.empty(4, np.float32)
    db = np.empty(4, np.float32)
    r = bncore.batch_norm_backward(dy, x, mean, invstd, np.ones(4, np.float32), out=(dx, dw, db))
    assert r[0] is dx and r[1] is dw and r[2] is db
    e = bncore.batch_norm_backward(dy, x, mean, invstd, np.ones(4, np.float32))
    for a, b in zip(r, e):
        assert np.array_equal(a, b)


def test_float16_goes_through_float64_and_rounds_once():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((6, 3, 8, 8)) * 4 + 20).astype(np.float16)
    y, mean, invstd = bncore.batch_norm_forward(x)
    assert y.dtype == np.float16
    ey = ref_forward(x)[0]
    # rounded once from (nearly) the exact value: within half a float16 ulp of it
    half_ulp = 0.5 * np.spacing(np.abs(y)).astype(np.float64)
    assert np.all(np.abs(y.astype(np.float64) - ey) <= half_ulp * (1 + 1e-6))
    y64 = bncore.batch_norm_forward(x.astype(np.float64))[0]
    assert np.array_equal(y, y64.astype(np.float16))


def test_float16_results_are_not_rounded_twice():
    """1 + 2^-11 + 2^-40 lies just above the binary16 tie between 1 and
    1 + 2^-10: rounded once it is 1 + 2^-10; through float32 it became the tie,
    then 1 (round half to even)."""
    exact = 1 + 2.0 ** -11 + 2.0 ** -40
    want = np.float16(1 + 2.0 ** -10)
    x = np.ones((1, 1), np.float16)
    eps = 2.0 ** -20
    y = bncore.batch_norm_forward(x, np.array([exact]), None, np.zeros(1), np.array([1 - eps]),
                                  training=False, eps=eps)[0]
    assert y[0, 0] == want
    dx = bncore.batch_norm_backward(np.ones((1, 1), np.float16), x, np.zeros(1), np.ones(1),
                                    np.array([exact]), training=False)[0]
    assert dx.dtype == np.float16 and dx[0, 0] == want


def test_nan_and_inf_propagate_without_crashing():
    x = np.ones((4, 3, 5), np.float32)
    x[:, 0] = np.arange(20, dtype=np.float32).reshape(4, 5)
    x[1, 1, 2] = np.nan
    x[2, 2, 3] = np.inf
    y, mean, invstd = bncore.batch_norm_forward(x)
    assert np.isfinite(y[:, 0]).all()
    assert np.isnan(y[:, 1]).all() and np.isnan(mean[1])
    assert np.isnan(y[:, 2]).all() or np.isinf(y[:, 2]).any()
    dx, dw, db = bncore.batch_norm_backward(np.ones_like(x), x, mean, invstd)
    assert np.isfinite(dx[:, 0]).all()


def test_empty_and_single_channel_edge_cases():
    x = np.zeros((0, 3), np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, None, None, rm, rv, training=False)
    assert y.shape == (0, 3)
    x1 = np.arange(10, dtype=np.float64).reshape(10, 1)
    y1 = bncore.batch_norm_forward(x1)[0]
    assert rel_err(y1, ref_forward(x1)[0]) < 1e-14


def test_the_gil_is_released_during_kernels():
    """Another Python thread runs while a kernel does; the same probe on a C
    loop that holds the GIL (sum over a range) sees no such thing, which shows
    that the probe can fail."""
    x = np.random.default_rng(5).standard_normal((32, 64, 56, 56)).astype(np.float32)
    _, mean, invstd = bncore.batch_norm_forward(x, num_threads=1)
    holding = calls_before_main_ran(lambda: sum(range(3_000_000)), max_calls=3)
    assert holding == [False, False, False]
    for call in (lambda: bncore.batch_norm_forward(x, num_threads=1),
                 lambda: bncore.batch_norm_backward(x, x, mean, invstd, num_threads=1)):
        seen = calls_before_main_ran(call, max_calls=100)
        assert seen[-1], f"the main thread never ran during {len(seen)} kernel calls"


@pytest.mark.parametrize("shape,axis,dtype", [((16, 64, 64, 72), 1, np.float32),  # rows
                                              ((16, 64, 72, 64), 3, np.float32),  # narrow
                                              ((16, 48, 72, 100), 3, np.float32),  # tiles
                                              ((4200, 200, 5), 1, np.float32),  # flat
                                              ((800, 3, 1100), 1, np.float64),  # rows
                                              ((2100, 200, 5), 1, np.float64)])  # flat
@pytest.mark.parametrize("offset", [0, 1])
def test_streamed_dx_equals_the_stored_one(shape, axis, dtype, offset):
    """dx of 16 MiB and more is written with streaming stores (bncore/_stream.h),
    smaller ones normally. Both must give the same bits: compute the big dx,
    then each half of it (under the threshold) from the same sums, and compare.
    offset=1 writes into an out= view one element off alignment."""
    from bncore import _bn_kernels as kernels
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 3 + 50).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    outer, C, inner = int(np.prod(shape[:axis])), shape[axis], int(np.prod(shape[axis + 1:]))
    assert kernels.plan_info(outer, C, inner, x.itemsize)["stream_dx"]
    assert not kernels.plan_info(outer // 2, C, inner, x.itemsize)["stream_dx"]
    w = rng.normal(1, 0.2, shape[axis]).astype(dtype)
    _, mean, invstd = bncore.batch_norm_forward(x, w, axis=axis)
    buf = np.empty(x.size + 1, dtype)
    dx = buf[offset:offset + x.size].reshape(shape)
    bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis, out=(dx, None, None))
    xv, dyv = x.reshape(outer, C, inner), dy.reshape(outer, C, inner)
    s_dy, s_dyx = kernels.dy_sums(dyv, xv, outer, C, inner, mean, 2)
    halves = []
    for part in (slice(0, outer // 2), slice(outer // 2, outer)):
        xp, dyp = np.ascontiguousarray(xv[part]), np.ascontiguousarray(dyv[part])
        dxp = np.empty_like(xp)
        kernels.input_grad(dyp, xp, dxp, xp.shape[0], C, inner, True, float(outer * inner),
                           mean, invstd, w, s_dy, s_dyx, 2)
        halves.append(dxp)
    assert np.concatenate(halves).tobytes() == dx.tobytes()


@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_float32_outputs_are_the_float64_formula_rounded_once(shape, axis):
    """y and dx are computed in float64 with x - mean formed first, so they must
    be the float64 formula, with bncore's own mean/invstd, rounded once to
    float32: within half an ulp (plus 1e-13 for the order of the float64
    sums behind dx). Computing in float32, or folding the mean into the
    constants, would be off by far more at |mean| = 1e5 std."""
    rng = np.random.default_rng(11)
    x = adversarial(shape, axis, 1e5, rng)
    C = shape[axis]
    w = rng.normal(1, 0.2, C).astype(np.float32)
    b = rng.normal(0, 0.2, C).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, w, b, axis=axis)
    dx, _, _ = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis)
    bshape = [1] * len(shape)
    bshape[axis] = C
    red = tuple(i for i in range(len(shape)) if i != axis)
    m, s = mean.reshape(bshape), invstd.reshape(bshape)
    xc = x.astype(np.float64) - m
    g = s * w.reshape(bshape).astype(np.float64)
    ey = xc * g + b.reshape(bshape)
    n = x.size / C
    a = dy.astype(np.float64).sum(axis=red).reshape(bshape) / n
    k = s * s * (dy * xc).sum(axis=red).reshape(bshape) / n
    edx = g * ((dy - a) - xc * k)
    for got, exact in ((y, ey), (dx, edx)):
        half_ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64) / 2
        slack = 1e-13 * np.sqrt(np.mean(exact ** 2))
        assert np.all(np.abs(got - exact) <= half_ulp + slack)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
def test_values_equal_to_the_mean_normalize_to_exactly_the_bias(dtype, training):
    """x - mean is formed first, so a constant channel (training) or a value
    equal to the running mean (inference) gives exactly the bias, not a
    rounding residue of x * scale - mean * scale."""
    C = 5
    x = np.broadcast_to(np.array([1e3, -7.25, 0.1, 3e4, 1.0 / 3.0], dtype)[None, :, None],
                        (4, C, 6)).copy()
    b = np.array([0.0, 0.5, -2.0, 0.0, 1e-3], dtype)
    w = np.array([1.0, 3.0, 0.5, 2.0, 1.0], dtype)
    rm, rv = x[0, :, 0].copy(), np.full(C, 0.25, dtype)
    y, _, _ = bncore.batch_norm_forward(x, w, b, rm, rv, training=training)
    assert np.array_equal(y, np.broadcast_to(b[None, :, None], x.shape))


@pytest.mark.parametrize("shape,axis", [((4, 1), 1), ((64, 8, 30, 30), 1), ((64, 30, 30, 8), 3),
                                        ((6, 3, 100, 100), 1), ((5000, 37), 1)])
@pytest.mark.parametrize("where", ["first", "middle"])
@pytest.mark.parametrize("value", [np.inf, -np.inf])
def test_an_infinite_value_gives_an_infinite_mean(shape, axis, where, value):
    """IEEE (and numpy, and torch) give the mean of data holding one +-Inf as
    +-Inf; re-centring on a pivot or on the first pass's mean must not turn it
    into Inf - Inf = NaN. The other channels are untouched."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    idx = [0] * len(shape)
    if where == "middle":
        idx = [s // 2 for s in shape]
    idx[axis] = 0
    x[tuple(idx)] = value
    rm = np.zeros(shape[axis], np.float32)
    rv = np.ones(shape[axis], np.float32)
    for threads in (1, 2):
        _, mean, _ = bncore.batch_norm_forward(x, running_mean=rm, running_var=rv, axis=axis,
                                               num_threads=threads)
        red = tuple(i for i in range(len(shape)) if i != axis)
        expected = x.astype(np.float64).mean(axis=red)
        np.testing.assert_array_equal(mean[0], value)
        np.testing.assert_allclose(mean[1:], expected[1:], rtol=1e-12, atol=1e-15)
    assert rm[0] == value


def _misaligned(a):
    out = np.frombuffer(bytearray(a.nbytes + 1), a.dtype, offset=1, count=a.size)
    out = out.reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("shape,axis", [((16, 3, 40, 40), 1), ((16, 40, 40, 3), 3), ((300, 7), 1)])
def test_misaligned_inputs_and_outputs_give_the_aligned_results(shape, axis):
    """Misaligned x, out= and running statistics are copied to aligned memory
    (the kernels' loads need it) and the results written back: the same bits."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    C = shape[axis]
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, running_mean=rm, running_var=rv, axis=axis)
    mx, mout = _misaligned(x), _misaligned(np.zeros_like(x))
    mrm, mrv = _misaligned(np.zeros(C, np.float32)), _misaligned(np.ones(C, np.float32))
    y2, mean2, invstd2 = bncore.batch_norm_forward(mx, running_mean=mrm, running_var=mrv,
                                                   axis=axis, out=mout)
    assert y2 is mout
    for a, b in ((y, mout), (mean, mean2), (invstd, invstd2), (rm, mrm), (rv, mrv)):
        assert a.tobytes() == np.ascontiguousarray(b).tobytes()
    dx, dw, db = bncore.batch_norm_backward(x, x, mean, invstd, axis=axis)
    dx2, dw2, db2 = bncore.batch_norm_backward(_misaligned(x), mx, mean, invstd, axis=axis,
                                               out=_misaligned(np.zeros_like(x)))
    for a, b in ((dx, dx2), (dw, dw2), (db, db2)):
        assert a.tobytes() == np.ascontiguousarray(b).tobytes()


def test_a_large_thread_count_uses_no_more_threads_than_the_work_needs():
    """num_threads up to bncore's limit (4096) runs and gives the one-thread
    bits (libgomp failed to create 32768 threads, and crashed at 65536)."""
    x = np.random.default_rng(1).standard_normal((64, 300, 3)).astype(np.float32)
    ref = bncore.batch_norm_forward(x, num_threads=1)
    got = bncore.batch_norm_forward(x, num_threads=4096)
    for a, b in zip(ref, got):
        assert a.tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="num_threads"):
        bncore.batch_norm_forward(x, num_threads=4097)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_strided_channel_vectors_are_read_and_written_in_place(dtype):
    """weight, bias and the running statistics may be strided views (every
    other element of a larger buffer): they are read element by element, the
    running statistics are updated through the view, and the buffer's other
    elements are left alone."""
    rng = np.random.default_rng(21)
    C = 5
    x = (rng.standard_normal((6, C, 7)) * 2 + 3).astype(np.float32)
    bufs = {k: rng.normal(1.0, 0.3, 2 * C).astype(dtype) for k in ("w", "b", "rm", "rv")}
    before = {k: v.copy() for k, v in bufs.items()}
    w, b, rm, rv = (bufs[k][::2] for k in ("w", "b", "rm", "rv"))
    assert not w.flags.c_contiguous
    y, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, momentum=0.3)
    ey, emean, einvstd, erm, erv = ref_forward(x, before["w"][::2], before["b"][::2],
                                               before["rm"][::2], before["rv"][::2],
                                               momentum=0.3)
    assert rel_err(y, ey) <= 1e-6
    assert rel_err(mean, emean) <= 1e-12 and rel_err(invstd, einvstd) <= 1e-12
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert rel_err(rm, erm) <= tol and rel_err(rv, erv) <= tol
    for k in bufs:
        assert bufs[k][1::2].tobytes() == before[k][1::2].tobytes(), f"{k}: gaps written"
    yi, _, _ = bncore.batch_norm_forward(x, w, b, rm, rv, training=False)
    assert rel_err(yi, ref_forward(x, w, b, rm, rv, training=False)[0]) <= 1e-6
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w)
    edx, edw, edb = ref_backward(dy, x, mean, invstd, w)
    assert rel_err(dx, edx) <= 1e-6 and rel_err(dw, edw) <= 1e-6 and rel_err(db, edb) <= 1e-6


@pytest.mark.parametrize("shape,axis,schedule,what", [
    ((40, 64, 5, 5), 1, "flat", "rows of W = 1600 >= 1024: four-row sums"),
    ((700, 100, 32), 1, "rows", "700 x 100 partials: combined on threads, a short last chunk"),
    ((700, 100), 1, "tiles", "100 channels-last: three full tiles of 32 and a partial one"),
])
@pytest.mark.parametrize("threads", [1, 2])
def test_statistics_and_gradient_sums_on_every_path(shape, axis, schedule, what, threads):
    """Per-channel statistics and gradient sums against the float64 oracle on
    shapes that take code paths the small registry draws rarely reach."""
    from bncore import _bn_kernels as kernels
    outer, C, inner = int(np.prod(shape[:axis])), shape[axis], int(np.prod(shape[axis + 1:]))
    assert kernels.plan_info(outer, C, inner, 4)["schedule"] == schedule
    rng = np.random.default_rng(31)
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (rng.uniform(-50, 50, C).reshape(bshape)
         + rng.uniform(0.5, 2, C).reshape(bshape) * rng.standard_normal(shape)).astype(np.float32)
    dy = (rng.standard_normal(shape) + 0.5).astype(np.float32)
    w = rng.normal(1, 0.2, C).astype(np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, w, axis=axis, num_threads=threads)
    ey, emean, einvstd, _, _ = ref_forward(x, w, axis=axis)
    assert rel_err(mean, emean) <= 1e-12 and rel_err(invstd, einvstd) <= 1e-12
    assert rel_err(y, ey) <= 1e-6
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=axis,
                                            num_threads=threads)
    edx, edw, edb = ref_backward(dy, x, mean, invstd, w, axis=axis)
    assert rel_err(dw, edw) <= 1e-6 and rel_err(db, edb) <= 1e-6
    assert rel_err(dx, edx) <= 1e-6


@pytest.mark.parametrize("shape,rows,elem_rows", [((256, 512, 4, 4), 32, 2),
                                                   ((64, 16, 3, 3), 8, 8),
                                                   ((300, 96, 5, 5), 32, 6),
                                                   ((10, 20000, 3, 5), 1, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_flat_reductions_in_larger_blocks_keep_every_guarantee(shape, rows, elem_rows, dtype):
    """The flat schedule (NCHW with fewer than 32 values per channel and image)
    sums in blocks of up to 32 super-rows, its elementwise passes keep their
    smaller items (make_plan: FLAT_ROWS, elem_rows). Against the float64 oracle,
    bitwise across thread counts, and float16 as the float64 path rounded once."""
    from bncore import _bn_kernels as kernels
    outer, C, inner = shape[0], shape[1], int(np.prod(shape[2:]))
    plan = kernels.plan_info(outer, C, inner, np.dtype(dtype).itemsize, 2)
    assert plan["schedule"] == "flat"
    assert (plan["block_rows"], plan["elementwise_rows"]) == (rows, elem_rows)
    rng = np.random.default_rng(outer * C)
    x = (rng.uniform(-30, 30, C)[:, None, None] + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    ref = None
    for n in (1, 2, 3, 4):
        y, mean, invstd = bncore.batch_norm_forward(x, num_threads=n)
        dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, num_threads=n)
        got = [a.tobytes() for a in (y, mean, invstd, dx, dw, db)]
        ref = ref or got
        assert got == ref, f"results differ with {n} threads"
    if dtype == np.float16:
        y64, m64, s64 = bncore.batch_norm_forward(x.astype(np.float64))
        assert mean.tobytes() == m64.tobytes() and invstd.tobytes() == s64.tobytes()
        assert y.tobytes() == y64.astype(np.float16).tobytes()
        dx64 = bncore.batch_norm_backward(dy.astype(np.float64), x.astype(np.float64), mean,
                                          invstd)[0]
        assert dx.tobytes() == dx64.astype(np.float16).tobytes()
    else:
        ey, emean, einvstd, _, _ = ref_forward(x)
        assert rel_err(mean, emean) <= 1e-12 and rel_err(invstd, einvstd) <= 1e-12
        assert rel_err(y, ey) <= 1e-6
        edx, edw, edb = ref_backward(dy, x, mean, invstd)
        assert rel_err(dx, edx) <= 1e-6 and rel_err(dw, edw) <= 1e-6
        assert rel_err(db, edb) <= 1e-6


@pytest.mark.parametrize("outer,C,rows", [(32768, 64, 1024), (32767, 64, 256),
                                          (65536, 32, 2048), (8192, 64, 256)])
def test_large_narrow_inputs_take_larger_blocks_and_keep_every_guarantee(outer, C, rows):
    """Narrow inputs of at least 32 x 65536 elements sum in 65536-element blocks
    (make_plan: NARROW_WIDE_ITEMS); smaller ones keep 16384. Both against the
    float64 oracle, and bitwise across thread counts."""
    from bncore import _bn_kernels as kernels
    plan = kernels.plan_info(outer, C, 1, 4, 2)
    assert plan["schedule"] == "narrow" and plan["block_rows"] == rows
    rng = np.random.default_rng(outer + C)
    x = (rng.uniform(-1e3, 1e3, C) + rng.standard_normal((outer, C))).astype(np.float32)
    dy = rng.standard_normal((outer, C)).astype(np.float32)
    ref = None
    for n in (1, 2, 3, 4):
        y, mean, invstd = bncore.batch_norm_forward(x, axis=1, num_threads=n)
        dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, axis=1, num_threads=n)
        got = [a.tobytes() for a in (y, mean, invstd, dx, dw, db)]
        ref = ref or got
        assert got == ref, f"results differ with {n} threads"
    ey, emean, einvstd, _, _ = ref_forward(x, axis=1)
    assert rel_err(mean, emean) <= 1e-12 and rel_err(invstd, einvstd) <= 1e-12
    assert rel_err(y, ey) <= 1e-6
    edx, edw, edb = ref_backward(dy, x, mean, invstd, axis=1)
    assert rel_err(dx, edx) <= 1e-6 and rel_err(dw, edw) <= 1e-6 and rel_err(db, edb) <= 1e-6


@pytest.mark.parametrize("outer,C,dtype", [
    (128, 1024, np.float32), (64, 1024, np.float64), (32, 2048, np.float32),
    (40, 1057, np.float64), (3, 1000, np.float32), (64, 257, np.float64),
    (17, 129, np.float32), (2, 65, np.float64), (100, 300, np.float32),
    (128, 130, np.float32)])
def test_backward_in_channel_strips_is_the_two_pass_result_bit_for_bit(outer, C, dtype):
    """Small channels-last inputs run backward in channel strips (a strip's
    sums and then its dx, while the strip is in cache). Its dx and sums must
    be those of dy_sums() then input_grad() (the two passes, which the
    distributed batch norm runs), bit for bit: training and inference, with
    and without weight, on every thread count, on channels whose mean is 1e4
    times their spread, with NaN and Inf in dy; and a strip that ends past a
    tile (C not a multiple of 32) or a channel count under one strip, and
    several rows per super-row (C < 256) on several threads. NaN and Inf
    each come from one element here: where several operands of one element
    are NaN, which NaN comes out (sign, payload) is not promised."""
    itemsize = np.dtype(dtype).itemsize
    for nt in (1, 2):
        assert _k.plan_info(outer, C, 1, itemsize, nt)["backward_strips"], (outer, C, nt)
    assert not _k.plan_info(outer, C, 1, 2, 2)["backward_strips"]       # never float16
    rng = np.random.default_rng(outer * C)
    x = (rng.uniform(-1e4, 1e4, C) + rng.standard_normal((outer, C))).astype(dtype)
    dy = rng.standard_normal((outer, C)).astype(dtype)
    dy[outer // 2, C - 1] = np.nan
    dy[0, C // 2] = np.inf
    mean = x.astype(np.float64).mean(axis=0)
    invstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=0) + 1e-5)
    for weight in (None, rng.normal(1, 0.2, C).astype(np.float32),
                   rng.normal(1, 0.2, C).astype(np.float64)):
        for training in (True, False):
            for nt in (1, 2, 3, 4):
                dx = np.full_like(x, 7)
                sums = _k.backward(dy, x, dx, outer, C, 1, training, mean, invstd, weight, nt)
                want = _k.dy_sums(dy, x, outer, C, 1, mean, nt)
                want_dx = np.full_like(x, 7)
                _k.input_grad(dy, x, want_dx, outer, C, 1, training, float(outer), mean,
                              invstd, weight, *want, nt)
                case = (weight is None, training, nt)
                assert dx.tobytes() == want_dx.tobytes(), case
                for got, exp in zip(sums, want):
                    assert got.tobytes() == exp.tobytes(), case


@pytest.mark.parametrize("outer,C,dtype", [
    (32, 2048, np.float32), (64, 1024, np.float64), (40, 1057, np.float32),
    (128, 512, np.float32), (48, 700, np.float64), (200, 200, np.float32)])
def test_forward_in_channel_strips_is_the_two_pass_result_bit_for_bit(outer, C, dtype):
    """Forward-train in channel strips (short-and-wide channels-last inputs,
    more than one thread) gives the two passes' y, mean, invstd and running
    statistics bit for bit: channels whose mean is 1e4 times their spread, a
    nearly constant one, a block whose first row is an outlier (the pivot
    retry), Inf and NaN; with and without weight and bias, 2 to 4 threads."""
    itemsize = np.dtype(dtype).itemsize
    assert _k.plan_info(outer, C, 1, itemsize, 2)["forward_strips"], (outer, C)
    assert not _k.plan_info(outer, C, 1, itemsize, 1)["forward_strips"]
    assert not _k.plan_info(outer, C, 1, 2, 2)["forward_strips"]        # never float16
    rng = np.random.default_rng(outer + C)
    x = (rng.uniform(-1e4, 1e4, C) + rng.uniform(1e-3, 3, C) * rng.standard_normal((outer, C)))
    x[:, 1] = 0.25 + 1e-9 * rng.standard_normal(outer)
    x[outer // 2, 5] = x[0, 5] + 1e3
    x[0, 7] = 1e6
    x[3, C - 2] = np.inf
    x[outer - 1, C - 1] = np.nan
    x = x.astype(dtype)
    for wb in ((None, None), (rng.normal(1, 0.2, C).astype(dtype),
                              rng.normal(0, 1, C).astype(np.float64))):
        for nt in (2, 3, 4):
            results = []
            for on in (True, False):
                was = _k.channel_strips(on)
                try:
                    y = np.full_like(x, 7)
                    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
                    got = _k.forward(x, y, outer, C, 1, True, rm, rv, *wb, 1e-5, 0.1, True, nt)
                finally:
                    _k.channel_strips(was)
                results.append([y, rm, rv, *got])
            for a, b in zip(*results):
                assert a.tobytes() == b.tobytes(), (wb[0] is None, nt)


@pytest.mark.parametrize("outer,C,dtype", [
    (2100, 300, np.float64), (2100, 600, np.float32), (1100, 530, np.float64),
    (256, 2100, np.float64), (512, 3000, np.float32)])
def test_tile_row_groups_give_the_whole_blocks_bits(outer, C, dtype):
    """Out of cache the channel tiles' sums take a block's rows in groups,
    passing the running sums through the partials; statistics, backward sums,
    forward-train (y, mean, invstd, M2, running statistics) and backward (dx,
    sums) must be the bits of whole blocks: short last groups, blocks shorter
    than a group, the last columns under a tile, outlier pivots at every block
    start (the retry, in every block and in the last channel), forward and
    backward strips on and off, 1 and 2 threads."""
    itemsize = np.dtype(dtype).itemsize
    plan = _k.plan_info(outer, C, 1, itemsize)
    assert plan["schedule"] == "tiles" and plan["tile_group_rows"] < plan["block_rows"]
    rng = np.random.default_rng(outer + C)
    x = rng.uniform(-50, 50, C) + rng.uniform(0.1, 2, C) * rng.standard_normal((outer, C))
    starts = np.arange(0, outer, plan["block_rows"])
    for c in list(rng.choice(C - 1, 5, replace=False)) + [C - 1]:
        x[starts, c] = 900.0
    x = x.astype(dtype)
    dy = rng.standard_normal((outer, C)).astype(dtype)
    mean = x.astype(np.float64).mean(axis=0)
    invstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=0) + 1e-5)

    def run(nt):
        y, dx = np.full_like(x, 7), np.full_like(x, 7)
        rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
        out = list(_k.stats(x, outer, C, 1, nt)) + list(_k.dy_sums(dy, x, outer, C, 1, mean, nt))
        out += list(_k.forward(x, y, outer, C, 1, True, rm, rv, None, None, 1e-5, 0.1, True, nt))
        out += list(_k.backward(dy, x, dx, outer, C, 1, True, mean, invstd, None, nt))
        return out + [y, dx, rm, rv]

    for strips in (True, False):
        for nt in (1, 2):
            results = []
            for groups in (True, False):
                was_g, was_s = _k.tile_groups(groups), _k.channel_strips(strips)
                try:
                    results.append(run(nt))
                finally:
                    _k.tile_groups(was_g)
                    _k.channel_strips(was_s)
            for i, (a, b) in enumerate(zip(*results)):
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (strips, nt, i)


_, HAVE_FLOAT_ROWS = _k.float_rows(True)


@pytest.mark.skipif(not HAVE_FLOAT_ROWS, reason="this build has no AVX-512 float32 rows "
                    "(_float_rows.h needs AVX-512F and FMA: -march=native on such a CPU); "
                    "the Cython loops are then the only path")
@pytest.mark.parametrize("shape,axis", [
    ((256, 1024), 1), ((40, 1057), 1), ((3, 1000), 1), ((17, 129), 1), ((100, 300), 1),
    ((2100, 600), 1), ((7, 13, 5), 1), ((6, 3, 2, 7), 1), ((9, 70), 1), ((513, 64), 1),
    ((4, 6, 5, 24), 3), ((32, 6, 6, 64), 3), ((65536, 64), 1), ((4, 3, 100), 1),
    ((2, 5, 37), 1), ((16, 64, 4100), 1), ((4200, 1000), 1), ((1001, 13, 5), 1),
    ((257, 8, 4), 1), ((1025, 32), 1), ((8, 16, 200), 1)])
def test_float_rows_give_the_cython_loops_bits(shape, axis):
    """The AVX-512 float32 loops (_float_rows.h: affine and dx over one row
    or four, the channel tiles' sums) must give the bits of the Cython loops
    they stand in for, which compute the same float64 operations: forward-train
    (y, mean, invstd, running statistics), forward-eval, backward (dx and the
    parameter gradients, training and eval), with and without weight and
    bias, on rows whose length is not a multiple of 8 and blocks whose row
    count is not a multiple of 4, the narrow schedule (64 channels; 16 MiB,
    where dx is streamed), the rows schedule (NCHW-like; 16 MiB, streamed
    too), channel tiles past 16 MiB (y in whole rows, not column chunks; dx
    streams there, so input_grad below), blocks of many super-rows, a narrow
    block ending in a partial super-row, channels whose mean is 1e4 times their spread, a
    nearly constant channel, Inf and NaN; strips on and off; 1 to 3 threads."""
    if shape in ((65536, 64), (16, 64, 4100)):
        assert _k.plan_info(shape[0], shape[1], int(np.prod(shape[2:])), 4)["stream_dx"]
    rng = np.random.default_rng(sum(shape))
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (rng.uniform(-1e4, 1e4, C).reshape(bshape)
         + rng.uniform(1e-3, 3, C).reshape(bshape) * rng.standard_normal(shape))
    x = np.moveaxis(x, axis, -1)
    x[..., 1] = 0.25 + 1e-9 * rng.standard_normal(x.shape[:-1])
    x.reshape(-1, C)[0, C - 1] = np.inf
    x.reshape(-1, C)[-1, 0] = np.nan
    x = np.moveaxis(x, -1, axis).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    dy.reshape(-1)[dy.size // 3] = np.nan

    def run(weight, bias, nt):
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        y, mean, invstd = bncore.batch_norm_forward(x, weight, bias, rm, rv, axis=axis,
                                                    num_threads=nt)
        ye = bncore.batch_norm_forward(x, weight, bias, rm, rv, training=False, axis=axis,
                                       num_threads=nt)[0]
        with np.errstate(all="ignore"):
            g_train = bncore.batch_norm_backward(dy, x, mean, invstd, weight, axis=axis,
                                                 num_threads=nt)
            g_eval = bncore.batch_norm_backward(dy, x, rm, 1 / np.sqrt(rv + 1e-5), weight,
                                                training=False, axis=axis, num_threads=nt)
        return [y, mean, invstd, rm, rv, ye, *g_train, *g_eval]

    w, b = rng.normal(1, 0.2, C).astype(np.float32), rng.normal(0, 1, C).astype(np.float32)
    for weight, bias in ((None, None), (w, b)):
        for strips in (True, False):
            for nt in (1, 2, 3):
                results = []
                for on in (True, False):
                    was_r, was_s = _k.float_rows(on)[0], _k.channel_strips(strips)
                    try:
                        results.append(run(weight, bias, nt))
                    finally:
                        _k.float_rows(was_r)
                        _k.channel_strips(was_s)
                for i, (a, c) in enumerate(zip(*results)):
                    if a is None:
                        assert c is None
                        continue
                    assert np.asarray(a).tobytes() == np.asarray(c).tobytes(), (
                        weight is None, strips, nt, i)


@pytest.mark.skipif(not HAVE_FLOAT_ROWS, reason="this build has no AVX-512 float32 rows")
@pytest.mark.parametrize("outer,C,inner", [(4200, 1000, 1), (300, 1000, 1), (64, 3, 4100),
                                           (2000, 64, 1), (100, 13, 5)])
def test_float_rows_input_grad_gives_the_cython_loops_bits(outer, C, inner):
    """input_grad (the dx pass alone, which the distributed batch norm runs
    and which never streams) with the AVX-512 loops on and off: the same bits,
    on channel tiles past 16 MiB (whole rows) and in cache (column chunks),
    the rows, narrow and blocks schedules."""
    rng = np.random.default_rng(outer + C)
    shape = (outer, C, inner)
    x = (rng.uniform(-1e4, 1e4, (1, C, 1)) + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    mean = x.astype(np.float64).mean(axis=(0, 2))
    invstd = 1.0 / np.sqrt(x.astype(np.float64).var(axis=(0, 2)) + 1e-5)
    w = rng.normal(1, 0.2, C).astype(np.float32)
    sums = _k.dy_sums(dy, x, outer, C, inner, mean, 2)
    results = []
    for on in (True, False):
        dx = np.full_like(x, 7)
        was = _k.float_rows(on)[0]
        try:
            _k.input_grad(dy, x, dx, outer, C, inner, True, float(outer * inner), mean, invstd,
                          w, *sums, 2)
        finally:
            _k.float_rows(was)
        results.append(dx)
    assert results[0].tobytes() == results[1].tobytes()


@pytest.mark.parametrize("outer,C,inner", [(64, 1000, 1), (8, 64, 1), (4, 3, 40),
                                           (7, 13, 5)])
def test_float_rows_and_the_cython_loops_both_fuse_the_multiply_add(outer, C, inner):
    """(x - mean) * scale + shift with x = 3, mean = 0, scale = 1/3 (in
    float64), shift = -1: one rounding (a fused multiply-add) gives
    -5.55e-17, which float32 keeps; a product rounded before the add gives
    0. The AVX-512 loops fuse by construction and the Cython loops by the
    build's -ffp-contract=fast (setup.py): a build that fused in one and not
    the other would break the float_rows tests' claim of equal bits without
    those tests noticing (on ordinary float32 data the difference rarely
    survives the rounding to float32). On every schedule, float_rows on and
    off; on a target without FMA (BNCORE_PORTABLE=1) neither fuses."""
    x = np.full((outer, C, inner), 3.0, np.float32)
    y = np.full_like(x, 7)
    mean, invstd = np.zeros(C), np.full(C, 1.0 / 3.0)
    bias = np.full(C, -1.0, np.float32)
    assert 3.0 * (1.0 / 3.0) - 1.0 == 0.0        # Python rounds the product first
    outs = []
    for on in (True, False):
        was = _k.float_rows(on)[0]
        try:
            _k.normalize(x, y, outer, C, inner, mean, invstd, None, bias, 1)
        finally:
            _k.float_rows(was)
        outs.append(y.copy())
    assert outs[0].tobytes() == outs[1].tobytes()
    if HAVE_FLOAT_ROWS:        # AVX-512 with FMA: both fuse, 3 (1 - 2^-54) / 3 - 1 = -2^-54
        assert np.all(outs[0] == np.float32(-2.0 ** -54)), outs[0].reshape(-1)[:4]


def test_channel_views_are_shared_and_immutable():
    """channel_view keeps one view per (shape, axis) of C-contiguous inputs, so
    a view must not be changeable by one caller under another."""
    from bncore._layout import channel_view
    a, b = np.zeros((4, 3, 5)), np.ones((4, 3, 5))
    v = channel_view(a, 1)
    assert channel_view(b, 1) is v and (v.outer, v.channels, v.inner) == (4, 3, 5)
    with pytest.raises(AttributeError, match="immutable"):
        v.outer = 1
    assert channel_view(a, 2) is not v and channel_view(a, 2).inner == 1


@settings(deadline=None)
@given(data=st.data())
def test_cached_views_and_the_layout_shortcut_agree_with_the_general_rule(data):
    """channel_view keeps strided (channels-last, transposed, sliced) views per
    (shape, strides, itemsize, axis), and has_layout answers from the layout's
    strides before building a transposed view: both must give what the
    uncached rule gives, for every permutation, size-1 axis, slice and dtype."""
    from bncore import _layout
    nd = data.draw(st.integers(2, 4), label="ndim")
    shape = tuple(data.draw(st.lists(st.integers(0, 4), min_size=nd, max_size=nd),
                            label="shape"))
    dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]), label="dtype")
    perm = data.draw(st.permutations(range(nd)), label="memory order")
    step = data.draw(st.sampled_from([1, 1, 2]), label="step")
    mem = np.zeros(tuple(shape[p] * (step if k == nd - 1 else 1)
                         for k, p in enumerate(perm)), dtype)
    if step > 1:
        mem = mem[..., ::step]
    x = mem.transpose(np.argsort(perm))
    assert x.shape == shape
    axis = data.draw(st.integers(0, nd - 1), label="axis")
    v = _layout.channel_view(x, axis)
    fresh = (_layout._view(x.shape, _layout._identity(nd), axis) if x.flags.c_contiguous
             else _layout._strided_view(x, axis))
    assert (v.shape, v.perm, v.outer, v.channels, v.inner) == \
        (fresh.shape, fresh.perm, fresh.outer, fresh.channels, fresh.inner)
    assert _layout.channel_view(x.copy(order="K"), axis).perm == v.perm or step > 1
    # in this layout's axis order but with gaps: with float16, strides that
    # equal the contiguous strides of a float32 array in this layout
    mem_shape = [shape[p] for p in v.perm]
    mem_shape[-1] *= 2
    gapped = np.zeros(mem_shape, dtype)[..., ::2].transpose(v.inverse)
    for a in (x, np.ascontiguousarray(x), np.asfortranarray(x), v.empty(dtype), gapped):
        general = (a if v.is_identity else a.transpose(v.perm)).flags.c_contiguous
        assert v.has_layout(a) == bool(general and a.flags.aligned)
    got = v.empty(dtype)
    assert got.shape == shape and v.has_layout(got)


def test_layout_cache_and_shortcut_on_chosen_arrays(monkeypatch):
    """The cases random draws reach rarely, each checked every run: two arrays
    of one shape in different memory orders get different views from the
    cache; a gapped float16 array whose byte strides equal a contiguous float32
    channels-last array's gets its own (C-order) view; and a misaligned
    channels-last array is not taken as having the layout (arrange copies it)."""
    from bncore import _layout
    monkeypatch.setattr(_layout, "_VIEWS", {})
    nhwc = np.zeros((2, 4, 5, 3), np.float32).transpose(0, 3, 1, 2)
    fortran = np.asfortranarray(np.zeros((2, 3, 4, 5), np.float32))
    assert _layout.channel_view(nhwc, 1).perm == (0, 2, 3, 1)
    assert _layout.channel_view(fortran, 1).perm == (3, 2, 1, 0)
    assert _layout.channel_view(nhwc, 1).perm == (0, 2, 3, 1)

    gapped16 = np.zeros((2, 4, 5, 6), np.float16)[..., ::2].transpose(0, 3, 1, 2)
    assert gapped16.strides == nhwc.strides and gapped16.shape == nhwc.shape
    cl = _layout.channel_view(nhwc, 1)
    assert cl.has_layout(nhwc) and not cl.has_layout(gapped16)
    v16 = _layout.channel_view(gapped16, 1)
    assert v16.perm == (0, 1, 2, 3) and not v16.has_layout(gapped16)

    raw = np.zeros(2 * 3 * 4 * 5 * 4 + 1, np.uint8)
    mis = np.frombuffer(raw, np.float32, count=120, offset=1).reshape(2, 4, 5, 3)
    mis = mis.transpose(0, 3, 1, 2)
    assert not mis.flags.aligned and mis.strides == nhwc.strides
    v = _layout.channel_view(mis, 1)
    assert v.perm == (0, 2, 3, 1) and not v.has_layout(mis)
    copy = v.arrange(mis)
    assert copy is not mis and copy.flags.aligned and v.has_layout(copy)
    assert np.array_equal(copy, mis)


@pytest.mark.parametrize("shape, axis", [((6, 3, 8, 8), 1), ((4096, 64), 1), ((5, 7, 33), 1),
                                         ((2, 5, 9000), 1), ((64, 3, 1, 1), 1),
                                         ((4, 9, 6), -1), ((700, 100), 1), ((1003, 16), 1),
                                         ((33, 1025), 1), ((3, 700, 2), 1)])
@pytest.mark.parametrize("layout", ["c", "fortran", "channels-last", "strided"])
@pytest.mark.parametrize("training", [True, False])
def test_float16_kernels_equal_the_float64_path_rounded_once(shape, axis, layout, training):
    """The kernels read and write float16 themselves (every schedule: planes,
    rows, narrow (with a part super-row at the end), tiles, flat, long
    segments, super-rows longer than a staged piece; runs converted and
    staged by _half.h); the results are bit for bit those of
    the same data in float64, rounded once to float16: y, dx; mean, invstd,
    dweight, dbias and the (float16) running statistics too."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * 3 + 300).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    if layout == "fortran":
        x, dy = np.asfortranarray(x), np.asfortranarray(dy)
    elif layout == "channels-last":
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))
    elif layout == "strided":
        x, dy = (np.repeat(a, 2, axis=0)[::2] for a in (x, dy))
    C = x.shape[axis]
    w = rng.uniform(0.5, 1.5, C).astype(np.float16)
    b = rng.uniform(-1, 1, C).astype(np.float16)
    rm, rv = np.zeros(C, np.float16), np.ones(C, np.float16)
    rm64, rv64 = rm.copy(), rv.copy()
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    y, m, s = bncore.batch_norm_forward(x, w, b, rm, rv, training=training, axis=axis)
    y64, m64, s64 = bncore.batch_norm_forward(x64, w, b, rm64, rv64, training=training,
                                              axis=axis)
    assert y.dtype == np.float16
    assert np.array_equal(y, y64.astype(np.float16))
    assert np.array_equal(m, m64) and np.array_equal(s, s64)
    assert np.array_equal(rm, rm64) and np.array_equal(rv, rv64)
    got = bncore.batch_norm_backward(dy, x, m, s, w, training=training, axis=axis)
    want = bncore.batch_norm_backward(dy64, x64, m, s, w, training=training, axis=axis)
    assert got[0].dtype == np.float16 and np.array_equal(got[0], want[0].astype(np.float16))
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])
    for nt in (1, 3):
        again = bncore.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training,
                                          axis=axis, num_threads=nt)[0]
        assert np.array_equal(again, y)


def test_float16_sums_are_the_float64_sums_bit_for_bit():
    """The float64 statistics and backward sums of float16 data (what the
    distributed batch norm exchanges) equal those of the same data in float64,
    exactly, on every schedule: segment lengths around the 32 lanes' tails,
    narrow, tiles (full and part), flat. Staged as float32, the float32 code's
    fused multiply-adds in the tail of the backward sums once made them 1 ulp
    off for segments with a tail of 8 or more elements."""
    shapes = [(2, 3, n) for n in range(1, 100)] + [
        (3, 2, 513), (1, 2, 8193), (1003, 16, 1), (300, 64, 1), (200, 100, 1), (70, 33, 1),
        (9, 40, 5), (5, 7, 20), (2100, 300, 1), (600, 1024, 1)]
    # the last two: the float64 copy is large enough for the tiles' sums to go
    # in groups of rows (float16 stages its own runs, never grouped)
    for outer, C in ((2100, 300), (600, 1024)):
        plan = _k.plan_info(outer, C, 1, 8)
        assert plan["schedule"] == "tiles" and plan["tile_group_rows"] < plan["block_rows"]
    for i, (outer, C, inner) in enumerate(shapes):
        rng = np.random.default_rng(i)
        x = (rng.standard_normal((outer, C, inner)) * 3 + 300).astype(np.float16)
        dy = rng.standard_normal((outer, C, inner)).astype(np.float16)
        x[0, 0, 0] = 500                                   # an outlier pivot: the retry
        mean = np.full(C, 300.123456789)
        for nt in (1, 2):
            got = _k.stats(x, outer, C, inner, nt) + _k.dy_sums(dy, x, outer, C, inner, mean, nt)
            want = (_k.stats(x.astype(np.float64), outer, C, inner, nt)
                    + _k.dy_sums(dy.astype(np.float64), x.astype(np.float64), outer, C, inner,
                                 mean, nt))
            for g, w in zip(got, want):
                assert np.array_equal(g, w), ((outer, C, inner), nt)


def test_kernel_forward_refuses_training_on_empty_input():
    """The kernel entry point itself (batch_norm_forward refuses first): no
    statistics of nothing, no read of a pivot past an empty array."""
    for dtype in (np.float16, np.float32, np.float64):
        x = np.ones((3, 2, 0), dtype)
        with pytest.raises(ValueError, match="at least one value"):
            _k.forward(x, np.empty_like(x), 3, 2, 0, True, None, None, None, None, 1e-5, 0.1,
                       True, 1)


@pytest.mark.parametrize("shape", [(2, 3, 0), (4, 3, 0, 5), (0, 3, 4)])
def test_float16_inference_on_empty_inputs(shape):
    """No elements per channel (or no rows): inference and its backward give
    empty float16 results (the float16 staging once divided by the empty
    super-row's length and crashed the process)."""
    x = np.ones(shape, np.float16)
    C = shape[1]
    rm, rv = np.zeros(C, np.float16), np.ones(C, np.float16)
    y, m, s = bncore.batch_norm_forward(x, None, None, rm, rv, training=False)
    assert y.shape == shape and y.dtype == np.float16
    dx, dw, db = bncore.batch_norm_backward(x, x, m, s, training=False)
    assert dx.shape == shape and dx.dtype == np.float16
    assert np.array_equal(dw, np.zeros(C)) and np.array_equal(db, np.zeros(C))


@pytest.mark.parametrize("layout", ["nchw", "channels-last", "tiles"])
def test_float16_kernels_keep_ieee_specials_as_the_float64_path(layout):
    """NaN, +-Inf, subnormal halves, +-0 and the largest finite half in the
    data: the float16 kernels (staged through _half.h's whole-run conversions)
    give the float64 path's results rounded once, NaN where it has NaN."""
    rng = np.random.default_rng(3)
    shape = {"nchw": (4, 8, 6, 6), "channels-last": (4, 8, 6, 6), "tiles": (96, 40)}[layout]
    x = rng.standard_normal(shape).astype(np.float16)
    flat = x.reshape(-1)
    specials = np.array([np.nan, np.inf, -np.inf, 6e-8, -6e-8, 3e-5, 0.0, -0.0, 65504, -65504],
                        np.float16)
    # channel 0 gets a NaN and channel 1 an Inf; the rest are finite extremes
    idx = rng.choice(flat.size, specials.size, replace=False)
    flat[idx] = specials
    dy = rng.standard_normal(shape).astype(np.float16)
    dy.reshape(-1)[rng.choice(dy.size, 5, replace=False)] = [np.inf, 6e-8, -0.0, 65504, np.nan]
    if layout == "channels-last":
        x, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1) for a in (x, dy))
    C = x.shape[1]
    w = np.ones(C, np.float32)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    with np.errstate(all="ignore"):
        for training in (True, False):
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            rm64, rv64 = rm.copy(), rv.copy()
            y, m, s = bncore.batch_norm_forward(x, w, None, rm, rv, training=training)
            y64, m64, s64 = bncore.batch_norm_forward(x64, w, None, rm64, rv64,
                                                      training=training)
            assert np.array_equal(y, y64.astype(np.float16), equal_nan=True)
            assert np.array_equal(m, m64, equal_nan=True)
            assert np.array_equal(rv, rv64, equal_nan=True)
            got = bncore.batch_norm_backward(dy, x, m, s, w, training=training)[0]
            want = bncore.batch_norm_backward(dy64, x64, m, s, w, training=training)[0]
            assert np.array_equal(got, want.astype(np.float16), equal_nan=True)
            if training:
                assert np.isnan(y).any() and np.isfinite(y).any()


@pytest.mark.skipif(not HAVE_FLOAT_ROWS, reason="this build has no AVX-512 float32 rows")
@pytest.mark.parametrize("training", [True, False])
def test_streamed_narrow_y_gives_the_stored_bits(training):
    """The narrow schedule writes y from 16 MiB on with non-temporal stores
    when y is 32-byte aligned (bncore._bn_kernels.affine_stream): the same
    bits as normal stores, and as a misaligned out= (which stores normally)."""
    rng = np.random.default_rng(11)
    x = (rng.uniform(-1e3, 1e3, 64) + rng.standard_normal((65536, 64))).astype(np.float32)
    w, b = rng.normal(1, 0.2, 64).astype(np.float32), rng.normal(0, 1, 64).astype(np.float32)
    assert _k.plan_info(65536, 64, 1, 4)["stream_dx"]        # past the 16 MiB threshold
    rm, rv = x.mean(axis=0).astype(np.float32), x.var(axis=0).astype(np.float32)
    ys = []
    for on in (True, False):
        was = _k.affine_stream(on)
        try:
            ys.append(bncore.batch_norm_forward(x, w, b, rm.copy(), rv.copy(),
                                                training=training, num_threads=2)[0])
        finally:
            _k.affine_stream(was)
    raw = np.empty(x.size * 4 + 64, np.uint8)
    start = (-raw.ctypes.data) % 64 + 4                   # 4 bytes past a cache line
    odd = raw[start:start + x.size * 4].view(np.float32).reshape(x.shape)
    bncore.batch_norm_forward(x, w, b, rm.copy(), rv.copy(), training=training,
                              num_threads=2, out=odd)
    assert ys[0].ctypes.data % 32 == 0
    assert ys[0].tobytes() == ys[1].tobytes() == odd.tobytes()


# every schedule: rows (NCHW-like), narrow (channels-last, small C), flat
# (short rows), tiles (channels-last, wide C; (4, 3) in backward strips on 2 threads)
_INFERENCE_DX_SHAPES = [((4, 1, 40), 1), ((4, 3), 1), ((64, 3, 7), 1), ((600, 256), 1),
                        ((8, 5, 5, 16), -1), ((2048, 64), 1)]


@pytest.mark.parametrize("shape, axis", _INFERENCE_DX_SHAPES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_inference_dx_is_g_dy_and_never_reads_x(shape, axis, dtype, threads):
    """Found in review: in inference dx = weight * invstd * dy does not depend
    on x, but the kernels formed g ((dy - 0) - (x - mean) 0), which is NaN
    where x is Inf or NaN (torch gives g dy there). dx must be g dy rounded
    once, signed zeros included, on every schedule."""
    rng = np.random.default_rng(7)
    C = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[::7] = np.inf
    flat[3::11] = np.nan
    flat[5::13] = -np.inf
    dy = rng.standard_normal(shape).astype(dtype)
    dy.reshape(-1)[1::9] = -0.0
    w = rng.uniform(0.5, 2.0, C)
    mean, invstd = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    dx, _, _ = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=False, axis=axis,
                                          num_threads=threads)
    bshape = [1] * len(shape)
    bshape[axis] = C
    want = (dy.astype(np.float64) * (w * invstd).reshape(bshape)).astype(dtype)
    assert dx.tobytes() == want.tobytes()


def test_inference_dx_when_x_minus_mean_overflows_float64():
    x = np.array([[1.7e308], [0.0], [1.0], [2.0]])
    dx, _, _ = bncore.batch_norm_backward(np.ones((4, 1)), x, np.array([-1e308]),
                                          np.ones(1), training=False)
    np.testing.assert_array_equal(dx, np.ones((4, 1)))


@pytest.mark.parametrize("shape, threads", [((2000, 1, 32), 1), ((20000, 2, 31), 2),
                                            ((200000, 3, 1), 2), ((200000, 1, 1), 1),
                                            ((2000, 1, 32), 3)])
def test_an_outlier_as_a_channels_first_element_costs_no_accuracy(shape, threads):
    """Found in review: the channel pivot K is the channel's first element, and
    every partial mean is stated relative to it, so an outlier there (D std from
    the mean) cost each partial u D: the mean was 7e-12 std off and 15% of the
    float32 y were not the correctly rounded formula. K now moves to the mean
    when it lies beyond 16 std (rows, flat, tiles, narrow; channel strips hold
    at most 256 values a channel, none of which can lie 16 std out)."""
    from bncore import _bn_kernels as K
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape)
    x[0, :, 0] = 3e3 * np.sqrt(x.size / shape[1])      # an outlier as every channel's K
    x = x.astype(np.float32)
    y, mean, invstd = bncore.batch_norm_forward(x, num_threads=threads)
    y1, mean1, _ = bncore.batch_norm_forward(x, num_threads=1)
    assert y.tobytes() == y1.tobytes() and mean.tobytes() == mean1.tobytes()
    xl = x.astype(np.longdouble)
    exact = xl.mean(axis=(0, 2))
    std = np.sqrt(((xl - exact[None, :, None]) ** 2).mean(axis=(0, 2)))
    assert (np.abs(mean - exact) / std).max() < 1e-15
    _, mean_d, _ = bncore.batch_norm_forward(x.astype(np.float64), num_threads=threads)
    assert (np.abs(mean_d - exact) / std).max() < 1e-15
    # the distributed statistics (pivot, mean - pivot) carry the same accuracy
    pivot, delta, _ = K.stats(x, shape[0], shape[1], shape[2], threads)
    got = pivot.astype(np.longdouble) + delta.astype(np.longdouble)
    assert (np.abs(got - exact) / std).max() < 1e-15

"""AMP (grad_scale, found_inf), the non-finite check, clipping corner cases."""
import math

import numpy as np
import pytest

import bncore
from bncore.testing import reference as ref
from conftest import assert_unchanged


def problem(dtype=np.float32, gdtype=None, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(5,), (3, 4), (20000,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    grads = [rng.standard_normal(s).astype(gdtype or dtype) for s in shapes]
    return params, grads


def test_grad_scale_divides_gradients_inside_the_kernel():
    p1, g = problem()
    p2 = [p.copy() for p in p1]
    scaled = [gi * np.float32(1024) for gi in g]
    m1, v1 = [np.zeros_like(p) for p in p1], [np.zeros_like(p) for p in p1]
    m2, v2 = [np.zeros_like(p) for p in p1], [np.zeros_like(p) for p in p1]
    bncore.adam_step(p1, g, m1, v1, step=1, lr=1e-2)
    bncore.adam_step(p2, scaled, m2, v2, step=1, lr=1e-2, grad_scale=np.float32(1024))
    for a, b in zip(p1 + m1 + v1, p2 + m2 + v2):
        assert np.array_equal(a, b)          # a power of two: exactly the same arithmetic


@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_found_inf_changes_nothing(name):
    params, grads = problem()
    grads[1][0, 0] = np.inf
    state = [[np.full_like(p, 0.5) for p in params] for _ in range(3)]
    before = {f"p{i}": p.copy() for i, p in enumerate(params)}
    before.update({f"s{k}{i}": s.copy() for k, lst in enumerate(state) for i, s in enumerate(lst)})
    skip = bncore.found_inf(grads)
    assert skip is True
    if name == "sgd":
        bncore.sgd_step(params, grads, state[0], lr=0.1, momentum=0.9, found_inf=skip)
    elif name == "adam":
        bncore.adam_step(params, grads, state[0], state[1], step=3, amsgrad=True,
                         max_exp_avg_sqs=state[2], found_inf=np.array(1.0), grad_scale=2.0)
    elif name == "rmsprop":
        bncore.rmsprop_step(params, grads, state[0], centered=True, grad_avgs=state[1],
                            momentum=0.5, momentum_buffers=state[2], found_inf=True)
    else:
        bncore.adagrad_step(params, grads, state[0], step=2, found_inf=1)
    after = {f"p{i}": p for i, p in enumerate(params)}
    after.update({f"s{k}{i}": s for k, lst in enumerate(state) for i, s in enumerate(lst)})
    assert_unchanged(before, after)


def test_optimizer_class_skips_the_step_and_its_count():
    params, grads = problem()
    opt = bncore.optim.Adam(params, lr=1e-2)
    opt.step(grads)
    snapshot = opt.state_dict()
    pbefore = [p.copy() for p in params]
    opt.step(grads, grad_scale=4.0, found_inf=True)
    assert all(np.array_equal(a, b) for a, b in zip(params, pbefore))
    after = opt.state_dict()
    for i in snapshot["state"]:
        assert after["state"][i]["step"] == snapshot["state"][i]["step"] == 1
        assert np.array_equal(after["state"][i]["exp_avg"], snapshot["state"][i]["exp_avg"])
    fresh = bncore.optim.SGD([p.copy() for p in params], lr=0.1, momentum=0.9)
    fresh.step(grads, found_inf=True)
    assert fresh.state == {}                # no state is even created by a skipped step


def test_found_inf_sees_nan_inf_in_any_tensor_and_dtype():
    for dtype in (np.float16, np.float32, np.float64):
        _, grads = problem(dtype=np.float64 if dtype == np.float64 else np.float32, gdtype=dtype)
        assert bncore.found_inf(grads) is False
        for bad in (np.nan, np.inf, -np.inf):
            g = [x.copy() for x in grads]
            g[2][-1] = bad
            assert bncore.found_inf(g) is True


def test_error_if_nonfinite_raises_before_touching_gradients():
    _, grads = problem()
    grads[0][2] = np.nan
    before = {i: g.copy() for i, g in enumerate(grads)}
    with pytest.raises(bncore.NonFiniteError, match="no gradient was modified"):
        bncore.clip_grad_norm(grads, 1.0, error_if_nonfinite=True)
    assert_unchanged(before, dict(enumerate(grads)))
    assert issubclass(bncore.NonFiniteError, RuntimeError)
    # without the flag NaN propagates, as in torch
    total = bncore.clip_grad_norm(grads, 1.0)
    assert math.isnan(total) and all(np.isnan(g).all() for g in grads)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_error_if_nonfinite_raises_on_an_infinite_norm(norm_type, bad):
    """An Inf gradient (no NaN) gives an infinite total: refused too, untouched."""
    _, grads = problem()
    grads[1][2, 3] = bad
    before = {i: g.copy() for i, g in enumerate(grads)}
    with pytest.raises(bncore.NonFiniteError, match="no gradient was modified"):
        bncore.clip_grad_norm(grads, 1.0, norm_type=norm_type, error_if_nonfinite=True)
    assert_unchanged(before, dict(enumerate(grads)))


@pytest.mark.parametrize("found", [False, 0, np.array(0.0), np.float32(0.0)])
@pytest.mark.parametrize("name", ["sgd", "adam", "rmsprop", "adagrad"])
def test_grad_scale_applies_when_found_inf_is_false(name, found):
    """A false found_inf runs the step, still dividing out grad_scale: the same
    bits as the unscaled gradients (a power of two: exact)."""
    results = []
    for amp in (False, True):
        params, grads = problem()
        state = [[np.full_like(p, 0.5) for p in params] for _ in range(3)]
        kw = dict(grad_scale=1024.0, found_inf=found) if amp else {}
        if amp:
            grads = [g * np.float32(1024) for g in grads]
        if name == "sgd":
            bncore.sgd_step(params, grads, state[0], lr=0.1, momentum=0.9, **kw)
        elif name == "adam":
            bncore.adam_step(params, grads, state[0], state[1], step=3, amsgrad=True,
                             max_exp_avg_sqs=state[2], **kw)
        elif name == "rmsprop":
            bncore.rmsprop_step(params, grads, state[0], centered=True, grad_avgs=state[1],
                                momentum=0.5, momentum_buffers=state[2], **kw)
        else:
            bncore.adagrad_step(params, grads, state[0], step=2, **kw)
        results.append(params + [s for lst in state for s in lst])
    plain, scaled = results
    assert not all(np.array_equal(a, b) for a, b in zip(plain, problem()[0]))  # it stepped
    for a, b in zip(plain, scaled):
        assert a.tobytes() == b.tobytes()


def test_exact_clip_with_eps_zero_and_torch_style_with_eps():
    _, grads = problem(np.float64)
    total = ref.global_norm(grads)
    g1 = [g.copy() for g in grads]
    t1 = bncore.clip_grad_norm(g1, total / 4, eps=0.0)
    assert t1 == pytest.approx(total, rel=1e-15)
    assert ref.global_norm(g1) == pytest.approx(total / 4, rel=1e-14)
    g2 = [g.copy() for g in grads]
    bncore.clip_grad_norm(g2, total / 4)     # eps = 1e-6: slightly below max_norm
    assert ref.global_norm(g2) < total / 4
    g3 = [g.copy() for g in grads]
    bncore.clip_grad_norm(g3, total * 2)     # nothing to clip: untouched bit for bit
    assert all(np.array_equal(a, b) for a, b in zip(g3, grads))


def test_two_norm_does_not_overflow_on_large_finite_gradients():
    g = [np.full(1000, 1e200), np.full(10, -3e200)]
    total = bncore.grad_norm(g)
    expected = math.sqrt(1000 + 10 * 9) * 1e200
    assert math.isfinite(total) and total == pytest.approx(expected, rel=1e-14)
    assert bncore.grad_norm(g, norm_type=3.0) == pytest.approx(
        (1000 + 10 * 27) ** (1 / 3) * 1e200, rel=1e-12)


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5])
def test_p_norms_do_not_underflow_on_tiny_gradients(p):
    """Powers of |g| below float64's normal range were lost (the 2-norm of
    [1e-200] * 2 was 0, so clip_grad_norm with eps = 0 did not clip); the sum
    is then taken again on gradients scaled by their largest magnitude, as an
    overflowing one is. Subnormal gradients too."""
    for scale in (1e-200, 1e-170, 5e-324):
        g = [np.full(7, scale), np.full(3, -2 * scale)]
        expected = (7 + 3 * 2.0 ** p) ** (1 / p) * scale
        got = bncore.grad_norm(g, norm_type=p)
        rel = 1e-14 if scale > 1e-300 else 1.0        # subnormals carry few bits
        assert got == pytest.approx(expected, rel=rel) and got > 0
    g = [np.full(2, 1e-200)]
    bncore.clip_grad_norm(g, 1e-250, eps=0.0)
    assert g[0][0] == pytest.approx(1e-250 / math.sqrt(2), rel=1e-14)
    assert bncore.grad_norm([np.zeros(4)], norm_type=p) == 0.0


@pytest.mark.parametrize("p", [1100.0, 1200.0, 5000.0, 1e4, 1e20])
@pytest.mark.parametrize("top", [2.1, 0.3, 1e-3, 1e300])
def test_large_p_norms_are_the_largest_magnitude_not_zero(p, top):
    """|g|^p over- or underflows float64 for p past ~1000, and the rescue
    then took the powers relative to a power of two at or above max |g|:
    the largest term could be 0.5^p, which vanishes past p = 1074, so the norm
    of [2.1] came out 0 and clip_grad_norm clipped nothing. Relative to max
    |g| itself that term is 1."""
    g = [np.array([top, -top / 3]), np.array([top / 7])]
    # the other terms are (1/3)^p and (1/7)^p, far below 1 ulp of 1 for these p
    assert bncore.grad_norm(g, norm_type=p) == pytest.approx(top, rel=1e-15)
    total = bncore.clip_grad_norm(g, top / 4, norm_type=p, eps=0.0)
    assert total == pytest.approx(top, rel=1e-15)
    np.testing.assert_allclose(g[0], [top / 4, -top / 12], rtol=1e-14)


def test_a_p_norm_past_float64_is_inf_not_an_exception():
    """sum |g|^0.5 is finite for 1e308s, its square is not: Python's float
    power raised OverflowError."""
    assert bncore.grad_norm([np.full(4, 1e308)], norm_type=0.5) == math.inf


def test_float16_gradients_with_float32_parameters():
    params, grads = problem(np.float32, np.float16)
    p64 = [p.astype(np.float64) for p in params]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    bncore.adam_step(params, grads, m, v, step=1, lr=1e-2)
    for p, p0, g in zip(params, p64, grads):
        e, _, _, _ = ref.adam(p0, g, np.zeros_like(p0), np.zeros_like(p0), None, step=1, lr=1e-2)
        np.testing.assert_allclose(p, e, rtol=1e-7, atol=1e-7)
    # clipping writes float16 back, rounded once
    g16 = [g.copy() for g in grads]
    bncore.clip_grad_norm(g16, 1.0)
    assert all(g.dtype == np.float16 for g in g16)
    assert ref.global_norm(g16) == pytest.approx(1.0, rel=2e-3)


def test_clip_grad_value_clamps_and_keeps_nan():
    g = [np.array([-3.0, -0.5, 0.0, 0.5, 3.0, np.nan], np.float32)]
    bncore.clip_grad_value(g, 1.0)
    np.testing.assert_array_equal(g[0][:5], [-1.0, -0.5, 0.0, 0.5, 1.0])
    assert np.isnan(g[0][5])


# --------------------------------------------------------------------------
# The gradient scans (non-finite check, inf-norm, value clamp) against NumPy,
# bit for bit, on lists that mix sizes around the kernels' blocks (32-lane
# maxima, 64-element clamp blocks, 16384-element chunks) and special values.

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_DTYPES = [np.float16, np.float32, np.float64]
_SPECIALS = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 65504.0, 1e-7]


@st.composite
def gradient_lists(draw, dtype, special=None):
    """Gradients of `dtype` in 1-4 arrays; `special` (or, when None, a few
    values drawn from _SPECIALS) placed at drawn positions."""
    sizes = draw(st.lists(st.one_of(st.integers(0, 200), st.integers(16380, 16500)),
                          min_size=1, max_size=4))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    grads = [(rng.standard_normal(n) * scale).astype(dtype) for n in sizes]
    count = 1 if special is not None else draw(st.integers(0, 3))
    for _ in range(count):
        k = draw(st.integers(0, len(grads) - 1))
        if grads[k].size:
            i = draw(st.integers(0, grads[k].size - 1))
            grads[k][i] = special if special is not None else draw(st.sampled_from(_SPECIALS))
    return grads


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf, 1.0])
@pytest.mark.parametrize("dtype", _DTYPES)
@given(data=st.data(), threads=st.sampled_from([1, 2]))
def test_found_inf_is_any_nonfinite(dtype, special, data, threads):
    grads = data.draw(gradient_lists(dtype, special))
    expected = any(not np.isfinite(g).all() for g in grads)
    assert bncore.found_inf(grads, num_threads=threads) is expected


@pytest.mark.parametrize("dtype", _DTYPES)
@given(data=st.data(), threads=st.sampled_from([1, 2]))
def test_inf_norm_is_the_largest_magnitude(dtype, data, threads):
    grads = data.draw(gradient_lists(dtype))
    flat = np.concatenate([g.astype(np.float64) for g in grads])
    got = bncore.grad_norm(grads, float("inf"), num_threads=threads)
    if np.isnan(flat).any():
        assert math.isnan(got)          # a NaN gradient makes the norm NaN, as in torch
    else:
        assert got == (float(np.abs(flat).max()) if flat.size else 0.0)


@pytest.mark.parametrize("dtype", _DTYPES)
@given(data=st.data(), c=st.one_of(st.just(0.0), st.floats(1e-4, 10.0)),
       threads=st.sampled_from([1, 2]))
def test_clip_grad_value_matches_numpy_bit_for_bit(dtype, data, c, threads):
    grads = data.draw(gradient_lists(dtype))
    expected = []
    for g in grads:
        a = g.astype(np.float64)        # compared unrounded, as the kernel does
        e = g.copy()
        e[a > c] = g.dtype.type(c)      # the bound rounded once to the gradient dtype
        e[a < -c] = g.dtype.type(-c)    # (NaN compares false both ways: kept)
        expected.append(e)
    bncore.clip_grad_value(grads, c, num_threads=threads)
    for g, e in zip(grads, expected):
        assert g.tobytes() == e.tobytes()


@pytest.mark.parametrize("dtype", _DTYPES)
@pytest.mark.parametrize("c", [0.1, 0.5, 1.0 / 3.0, 1e-30, 3e38, 1e300, 0.0, 65504.0, 7e-8])
def test_clip_grad_value_at_the_neighbours_of_the_bound(dtype, c):
    """Values one ulp (of the gradient dtype) either side of +-c and at the
    bound as the dtype rounds it: the comparison with the float64 bound must
    be exact whatever precision the kernel compares in."""
    inf = dtype(np.inf)
    with np.errstate(over="ignore"):
        near = np.array([c, -c], np.float64).astype(dtype)
        vals = np.concatenate([near, np.nextafter(near, inf), np.nextafter(near, -inf),
                               [dtype(0.0), -dtype(0.0), inf, -inf, dtype(np.nan)]]).astype(dtype)
    g = np.tile(vals, 9)[:70]               # past one 64-element block
    a = g.astype(np.float64)
    expected = g.copy()
    with np.errstate(over="ignore"):
        expected[a > c] = np.float64(c).astype(dtype)
        expected[a < -c] = np.float64(-c).astype(dtype)
    bncore.clip_grad_value([g], c)
    assert g.tobytes() == expected.tobytes()


def test_norm_near_the_top_of_float64():
    """The overflow rescue's scale is at most 2^1023 (2^1024 is not a float64:
    the rescue itself raised OverflowError for values near 1e308)."""
    g = [np.array([1e308, 1e308])]
    assert bncore.grad_norm(g) == pytest.approx(np.sqrt(2.0) * 1e308, rel=1e-15)
    assert bncore.grad_norm(g, 1) == np.inf           # 2e308 is not representable
    total = bncore.clip_grad_norm(g, 1.0, eps=0.0)
    assert total == pytest.approx(np.sqrt(2.0) * 1e308, rel=1e-15)
    np.testing.assert_allclose(g[0], [2 ** -0.5] * 2, rtol=1e-15)


def _big(n=2_000_000, k=1):
    rng = np.random.default_rng(3)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(k)]


@pytest.mark.parametrize("name,call", [
    ("sgd_step", lambda p, g, s: bncore.sgd_step(p, g, s[0], lr=1e-3, momentum=0.9,
                                                 num_threads=1)),
    ("adam_step", lambda p, g, s: bncore.adam_step(p, g, s[0], s[1], step=1, lr=1e-3,
                                                   num_threads=1)),
    ("rmsprop_step", lambda p, g, s: bncore.rmsprop_step(p, g, s[0], lr=1e-3, num_threads=1)),
    ("adagrad_step", lambda p, g, s: bncore.adagrad_step(p, g, s[0], step=1, lr=1e-3,
                                                         num_threads=1)),
    ("clip_grad_norm", lambda p, g, s: bncore.clip_grad_norm(g, 1e30, num_threads=1)),
    ("clip_grad_value", lambda p, g, s: bncore.clip_grad_value(g, 1e30, num_threads=1)),
    ("grad_norm", lambda p, g, s: bncore.grad_norm(g, num_threads=1)),
    ("found_inf", lambda p, g, s: bncore.found_inf(g, num_threads=1)),
])
def test_the_gil_is_released_during_optimizer_and_clipping_kernels(name, call):
    """Another Python thread runs while each kernel does (the probe and its
    control are tests/conftest.py's calls_before_main_ran, as for batch norm).
    The update kernels' parallel loops sit in `nogil` cdef functions, and
    Cython 3 wraps such a prange in __Pyx_SaveUnknownThread, which releases the
    GIL when the caller holds it: so for them this test passes even without
    the wrappers' `with nogil` blocks (checked in the generated C); found_inf's
    loop does not, and it fails without its block."""
    from conftest import calls_before_main_ran
    params, grads = _big(), _big()
    state = [[np.zeros_like(params[0])], [np.zeros_like(params[0])]]
    seen = calls_before_main_ran(lambda: call(params, grads, state), max_calls=200)
    assert seen[-1], f"{name}: the main thread never ran during {len(seen)} calls"


@pytest.mark.parametrize("threads", [1, 2])
def test_float16_gradients_give_the_float32_gradients_bits(threads):
    """float16 gradients are read through whole-run conversions (staged in
    pieces and chunks); every kernel's result is bit for bit what the same
    values as float32 gradients give (the widening is exact), and clipping
    writes back the float64 path's product rounded once to float16."""
    rng = np.random.default_rng(7)
    sizes = [1, 7, 511, 513, 16384 + 9, 40000]
    g16 = [(rng.standard_normal(n) * 3).astype(np.float16) for n in sizes]
    g16[3][5] = np.float16(6e-8)            # a subnormal half
    g16[4][100] = np.float16(-65504)
    g32 = [g.astype(np.float32) for g in g16]
    base = [rng.standard_normal(n).astype(np.float32) for n in sizes]

    def run(fn, grads, **kw):
        params = [p.copy() for p in base]
        srng = np.random.default_rng(1)
        states = [[np.abs(srng.standard_normal(p.size)).astype(np.float32) for p in base]
                  for _ in range(3)]
        if kw.get("amsgrad"):
            kw["max_exp_avg_sqs"] = states[2]
        fn(params, grads, *states[:kw.pop("nstates")], num_threads=threads, **kw)
        return params, states

    cases = [
        (bncore.sgd_step, dict(nstates=1, lr=0.1, momentum=0.9)),
        (bncore.adam_step, dict(nstates=2, step=3, lr=1e-2, weight_decay=0.1)),
        (bncore.adam_step, dict(nstates=2, step=3, amsgrad=True, lr=1e-2)),
        (bncore.adagrad_step, dict(nstates=1, step=2, lr=0.1)),
    ]
    for fn, kw in cases:
        a = run(fn, g16, **dict(kw))
        b = run(fn, g32, **dict(kw))
        assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0])), fn.__name__
        assert all(np.array_equal(x, y) for s, t in zip(a[1], b[1]) for x, y in zip(s, t))
    p16, p32 = [p.copy() for p in base], [p.copy() for p in base]
    sq16 = [np.ones_like(p) for p in base]
    sq32 = [np.ones_like(p) for p in base]
    extra16 = dict(grad_avgs=[np.zeros_like(p) for p in base],
                   momentum_buffers=[np.zeros_like(p) for p in base])
    extra32 = dict(grad_avgs=[np.zeros_like(p) for p in base],
                   momentum_buffers=[np.zeros_like(p) for p in base])
    bncore.rmsprop_step(p16, g16, sq16, centered=True, momentum=0.9, num_threads=threads,
                        **extra16)
    bncore.rmsprop_step(p32, g32, sq32, centered=True, momentum=0.9, num_threads=threads,
                        **extra32)
    assert all(np.array_equal(x, y) for x, y in zip(p16, p32))
    for norm_type in (2.0, 1.0, float("inf"), 3.0):
        assert (bncore.grad_norm(g16, norm_type, num_threads=threads)
                == bncore.grad_norm(g32, norm_type, num_threads=threads))
    c16 = [g.copy() for g in g16]
    c64 = [g.astype(np.float64) for g in g16]
    t16 = bncore.clip_grad_norm(c16, 1.0, num_threads=threads)
    t64 = bncore.clip_grad_norm(c64, 1.0, num_threads=threads)
    assert t16 == t64
    with np.errstate(under="ignore"):
        assert all(np.array_equal(x, y.astype(np.float16)) for x, y in zip(c16, c64))


def _mixed(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(5).astype(np.float32), rng.standard_normal(70000),
            (rng.standard_normal(3) * 4).astype(np.float16),
            rng.standard_normal((2, 3)).astype(np.float32)]


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_gradients_of_several_dtypes_are_one_norm(p):
    """A mixed-precision model's gradients in one list (torch's clip_grad_norm_
    takes them): one kernel table per dtype, the parts combined; the norm is
    the float64 norm of all the values, and clipping scales every gradient by
    the one coefficient, rounded once to its dtype."""
    g = _mixed()
    flat = np.concatenate([a.astype(np.float64).ravel() for a in g])
    want = np.max(np.abs(flat)) if math.isinf(p) else np.sum(np.abs(flat) ** p) ** (1 / p)
    assert bncore.grad_norm(g, norm_type=p) == pytest.approx(want, rel=1e-13)
    c = [a.copy() for a in g]
    total = bncore.clip_grad_norm(c, 1.0, norm_type=p)
    assert total == bncore.grad_norm(g, norm_type=p)
    coef = 1.0 / (total + 1e-6)
    for got, a in zip(c, g):
        assert got.dtype == a.dtype
        assert got.tobytes() == (a.astype(np.float64) * coef).astype(a.dtype).tobytes()


def test_gradients_of_several_dtypes_clamp_check_and_refuse_as_one_list():
    g = _mixed(1)
    c = [a.copy() for a in g]
    bncore.clip_grad_value(c, 0.5)
    for got, a in zip(c, g):
        assert got.tobytes() == np.clip(a, -a.dtype.type(0.5), a.dtype.type(0.5)).tobytes()
    assert not bncore.found_inf(g)
    bad = [a.copy() for a in g]
    bad[2][1] = np.inf
    assert bncore.found_inf(bad)
    with pytest.raises(TypeError, match=r"grads\[4\]"):            # the index in the whole list
        bncore.grad_norm(g + [np.ones(3, np.int32)])
    with pytest.raises(ValueError, match=r"grads\[3\] .*not contiguous"):
        bncore.clip_grad_norm(g[:3] + [np.ones((3, 4), np.float32)[:, ::2]], 1.0)
    # a list among them cannot be clipped in place (np.asarray would clip a copy)
    with pytest.raises(TypeError, match=r"grads\[4\] is updated in place"):
        bncore.clip_grad_norm(g + [[10.0, 20.0]], 1e-3)
    with pytest.raises(TypeError, match=r"grads\[4\] is updated in place"):
        bncore.clip_grad_value(g + [np.float64(3.0)], 1e-3)
    buf = np.ones(8, np.float32)
    before = [a.copy() for a in g]
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[4\] share memory"):
        bncore.clip_grad_norm([buf] + g[1:] + [buf.view(np.float16)[:4]], 1e-3)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(g, before))
    assert np.array_equal(buf, np.ones(8, np.float32))


def test_inf_norm_of_mixed_dtypes_is_nan_when_a_later_dtype_has_a_nan():
    """The per-dtype inf-norms combine as max with NaN kept (mutation testing:
    a max that drops NaN from a later dtype group passed; clip_grad_norm with
    error_if_nonfinite then clipped instead of raising)."""
    for g in ([np.ones(3, np.float32), np.array([np.nan, 1.0])],
              [np.array([np.nan, 1.0]), np.ones(3, np.float32)]):
        assert math.isnan(bncore.grad_norm(g, float("inf")))
        before = {i: a.copy() for i, a in enumerate(g)}
        with pytest.raises(bncore.NonFiniteError):
            bncore.clip_grad_norm(g, 1.0, norm_type=float("inf"), error_if_nonfinite=True)
        assert_unchanged(before, dict(enumerate(g)))


def test_two_norm_of_gradients_whose_squares_are_subnormal_keeps_float64_accuracy():
    """Squares below 2^-1022 are rescaled before summing (mutation testing: a
    rescue threshold moved from 2^-1000 to 2^-1022 gave 8.7e-12 relative
    error, unnoticed)."""
    for n, a in ((2 ** 18, 1.1 * 2.0 ** -520), (1000, 3.3 * 2.0 ** -530), (7, 2.0 ** -537)):
        want = a * math.sqrt(n)
        assert abs(bncore.grad_norm([np.full(n, a)]) - want) <= 1e-14 * want, (n, a)


def test_clipping_leaves_out_missing_gradients_as_torch_does():
    """None among the gradients ([p.grad for p in model.parameters()] with a
    frozen parameter): left out of the norm and of the clipping, as torch's
    clip_grad_norm_ / clip_grad_value_ leave out parameters whose .grad is None;
    messages count over the whole list. It was refused."""
    g = [np.ones(3), None, np.full(2, 2.0)]
    assert bncore.grad_norm(g) == pytest.approx(np.sqrt(11.0), rel=1e-15)
    assert bncore.found_inf(g) is False
    total = bncore.clip_grad_norm(g, 1.0)
    assert total == pytest.approx(np.sqrt(11.0), rel=1e-15) and g[1] is None
    np.testing.assert_allclose(g[0], 1.0 / (np.sqrt(11.0) + 1e-6), rtol=1e-15)
    bncore.clip_grad_value(g, 0.1)
    assert (g[2] == 0.1).all()
    with pytest.raises(TypeError, match=r"grads\[2\] must be"):
        bncore.grad_norm([np.ones(3), None, np.ones(2, np.int32)])
    with pytest.raises(TypeError, match=r"grads\[3\] must be"):     # mixed dtypes too
        bncore.grad_norm([np.ones(3), None, np.ones(2, np.float32), np.ones(2, np.int32)])
    assert bncore.grad_norm([None, None]) == 0.0
    torch = pytest.importorskip("torch")
    ps = [torch.ones(n, dtype=torch.float64, requires_grad=True) for n in (3, 2, 2)]
    ps[0].grad = torch.ones(3, dtype=torch.float64)
    ps[2].grad = torch.full((2,), 2.0, dtype=torch.float64)
    ours = [np.ones(3), None, np.full(2, 2.0)]
    assert bncore.clip_grad_norm(ours, 1.0) == pytest.approx(
        float(torch.nn.utils.clip_grad_norm_(ps, 1.0)), rel=1e-15)
    np.testing.assert_allclose(ours[0], ps[0].grad.numpy(), rtol=1e-15)


def test_gradients_may_come_from_a_generator_as_in_torch():
    """(p.grad for p in params), as torch's clip_grad_norm_ takes any iterable:
    read once, as a list (it was refused). A dict is still refused."""
    gs = [np.ones(3), np.full(2, 2.0)]
    assert bncore.grad_norm(g for g in gs) == bncore.grad_norm(gs)
    assert bncore.clip_grad_norm(iter(gs), 1.0) == pytest.approx(np.sqrt(11.0), rel=1e-15)
    assert gs[0][0] < 1.0
    ps = [np.ones(3), np.ones(2)]
    opt = bncore.optim.SGD(ps, lr=0.5)
    opt.step(np.ones_like(p) for p in ps)
    assert (ps[0] == 0.5).all() and (ps[1] == 0.5).all()
    with pytest.raises(TypeError, match="grads must be"):
        bncore.grad_norm({"a": np.ones(2)})


def test_clipping_torch_tensors_from_a_generator_tells_autograd():
    """A generator is read once: clip_grad_norm looked at it a second time to
    bump the torch tensors' versions and found it empty (review)."""
    torch = pytest.importorskip("torch")
    gs = [torch.full((3,), 2.0), torch.full((2,), 2.0)]
    before = [g._version for g in gs]
    bncore.clip_grad_norm((g for g in gs), 1.0)
    assert all(g._version > v for g, v in zip(gs, before))
    before = [g._version for g in gs]
    bncore.clip_grad_value(iter(gs), 0.5)
    assert all(g._version > v for g, v in zip(gs, before)) and float(gs[0][0]) <= 0.5

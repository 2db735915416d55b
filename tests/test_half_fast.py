"""The float32 fast path of the float16 batch-norm elementwise passes
(bncore/_half_fast.h): a chunk it calls decided must be the float64 formula
rounded once to float16, bit for bit; exact rounding boundaries, cancellation,
subnormal results and non-finite values must be left to the float64 path; and
the kernels give the same bits with the path on and off."""
import numpy as np
import pytest

import bncore
from bncore import _bn_kernels as _k

_, HAVE_FAST = _k.half_fast(True)
needs_fast = pytest.mark.skipif(not HAVE_FAST, reason="this build has no float32 fast path "
                                "for float16 (it needs AVX-512 F/VL and F16C: -march=native "
                                "on such a CPU)")

# every finite float16 value, in a scrambled order, padded to chunks of 16
_ALL = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
FINITE = _ALL[np.isfinite(_ALL)]
FINITE = np.random.default_rng(0).permutation(FINITE)[: len(FINITE) // 16 * 16].copy()


def bits(a):
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def affine_ref(x, m, s, b):
    with np.errstate(all="ignore"):
        return ((x.astype(np.float64) - m) * s + b).astype(np.float16)


def dx_ref(dy, x, m, g, a, k):
    with np.errstate(all="ignore"):
        return (g * ((dy.astype(np.float64) - a) - (x.astype(np.float64) - m) * k)).astype(
            np.float16)


def constants(rng, n):
    """n draws of a float64 constant: magnitudes from 1e-12 to 1e12, either sign,
    and some zeros."""
    v = 10.0 ** rng.uniform(-12, 12, n) * rng.choice((-1.0, 1.0), n)
    v[rng.random(n) < 0.1] = 0.0
    return v


@needs_fast
def test_decided_chunks_are_the_float64_affine_rounded_once():
    rng = np.random.default_rng(1)
    decided_total = 0
    for m, s, b in zip(constants(rng, 60), constants(rng, 60), constants(rng, 60)):
        y, decided = _k.half_fast_probe(FINITE, m, s, b)
        want = affine_ref(FINITE, m, s, b)
        got_d = bits(y).reshape(-1, 16)[decided]
        assert np.array_equal(got_d, bits(want).reshape(-1, 16)[decided]), (m, s, b)
        decided_total += decided.mean()
    assert decided_total > 0
    # ordinary data and constants: nearly every chunk decided (the path is used)
    x = rng.standard_normal(1 << 14).astype(np.float16)
    y, decided = _k.half_fast_probe(x, 0.01, 1.3, 0.2)
    assert decided.mean() > 0.9
    assert np.array_equal(bits(y).reshape(-1, 16)[decided],
                          bits(affine_ref(x, 0.01, 1.3, 0.2)).reshape(-1, 16)[decided])


@needs_fast
def test_decided_chunks_are_the_float64_dx_rounded_once():
    rng = np.random.default_rng(2)
    dy = rng.permutation(FINITE)
    for m, g, a, k in zip(constants(rng, 40), constants(rng, 40), constants(rng, 40),
                          constants(rng, 40)):
        y, decided = _k.half_fast_probe(FINITE, m, g, 0.0, dy=dy, a=a, k=k)
        want = dx_ref(dy, FINITE, m, g, a, k)
        assert np.array_equal(bits(y).reshape(-1, 16)[decided],
                              bits(want).reshape(-1, 16)[decided]), (m, g, a, k)
    x = rng.standard_normal(1 << 14).astype(np.float16)
    dyn = rng.standard_normal(1 << 14).astype(np.float16)
    y, decided = _k.half_fast_probe(x, 0.01, 1.3, 0.0, dy=dyn, a=0.003, k=0.2)
    assert decided.mean() > 0.9
    assert np.array_equal(bits(y).reshape(-1, 16)[decided],
                          bits(dx_ref(dyn, x, 0.01, 1.3, 0.003, 0.2)).reshape(-1, 16)[decided])


@needs_fast
def test_short_last_chunks_are_decided_and_nothing_past_the_end_is_touched():
    """A run's last chunk may hold 1 to 15 elements (masked loads and stores):
    decided ones equal the float64 formula, and the element after the end is
    neither read into a result nor written."""
    rng = np.random.default_rng(3)
    for n in list(range(1, 40)) + [511, 512, 513, 1000]:
        buf = rng.standard_normal(n + 1).astype(np.float16)
        x = buf[:n]
        y, decided = _k.half_fast_probe(x, 0.01, 1.3, 0.2)
        assert len(decided) == (n + 15) // 16 and decided.mean() > 0.5, n
        d = np.repeat(decided, 16)[:n]
        assert np.array_equal(bits(y)[d], bits(affine_ref(x, 0.01, 1.3, 0.2))[d]), n
        dy = rng.standard_normal(n).astype(np.float16)
        y, decided = _k.half_fast_probe(x, 0.01, 1.3, 0.0, dy=dy, a=0.003, k=0.2)
        d = np.repeat(decided, 16)[:n]
        assert np.array_equal(bits(y)[d], bits(dx_ref(dy, x, 0.01, 1.3, 0.003, 0.2))[d]), n
    # through the kernels: rows of 196 (12 chunks and 4), 49, 33 elements, and
    # the elements between the rows (other channels) left as they were
    for inner in (196, 49, 33):
        x = rng.standard_normal((4, 8, inner)).astype(np.float16)
        mean, invstd = rng.normal(0, 0.1, 8), rng.uniform(0.5, 2, 8)
        ys = []
        for on in (True, False):
            was, _ = _k.half_fast(on)
            try:
                y = np.full_like(x, 7)
                _k.normalize(x, y, 4, 8, inner, mean, invstd, None, None, 1)
            finally:
                _k.half_fast(was)
            ys.append(y)
        assert np.array_equal(bits(ys[0]), bits(ys[1])), inner


@needs_fast
def test_dx_with_a_subnormal_float32_intermediate_is_bounded():
    """k near 2^-126 and g near 2^126 with dy = a = 0: t3 = -(x - mean) k is a
    float32 subnormal, whose rounding error (absolute, not relative) g scales
    into the float16 range. The bound once missed it and decided chunks came
    out 1 float16 ulp off (found in review); directly and through
    batch_norm_backward."""
    kk, g = 1.7771377827146012e-38, 1.6592709707591372e+38
    x = np.full(16, 7.420778274536133e-05, np.float16)
    dy = np.zeros(16, np.float16)
    y, decided = _k.half_fast_probe(x, 0.0, g, 0.0, dy=dy, a=0.0, k=kk)
    want = dx_ref(dy, x, 0.0, g, 0.0, kk)
    assert np.array_equal(bits(y)[np.repeat(decided, 16)], bits(want)[np.repeat(decided, 16)])
    rng = np.random.default_rng(5)
    for kk in 2.0 ** -126 * rng.uniform(1, 4, 200):
        for g in 2.0 ** 126 * rng.uniform(0.5, 2, 5):
            x = (rng.uniform(-1, 1, 64) * 2.0 ** -8).astype(np.float16)
            dy = np.zeros(64, np.float16)
            y, decided = _k.half_fast_probe(x, 0.0, g, 0.0, dy=dy, a=0.0, k=kk)
            d16 = np.repeat(decided, 16)
            assert np.array_equal(bits(y)[d16], bits(dx_ref(dy, x, 0.0, g, 0.0, kk))[d16])
    # end to end: sum(dy) = 0 exactly (a = 0), invstd 2^-39, weight 1.3 2^166
    inner = 512
    x = (rng.uniform(-1, 1, inner) * 2.0 ** -8).astype(np.float16)
    dy = np.zeros(inner, np.float16)
    x[-2], x[-1] = 1.8271 * 2.0 ** -14, 0.0
    dy[-2], dy[-1] = 2.0 ** -24, -(2.0 ** -24)
    x, dy = x.reshape(1, 1, 1, inner), dy.reshape(1, 1, 1, inner)
    args = (np.array([0.0]), np.array([2.0 ** -39]), np.array([1.3 * 2.0 ** 166]))
    got = {}
    for on in (True, False):
        was, _ = _k.half_fast(on)
        try:
            got[on] = bncore.batch_norm_backward(dy, x, *args, num_threads=1)[0]
        finally:
            _k.half_fast(was)
    assert np.array_equal(bits(got[True]), bits(got[False]))


@needs_fast
def test_boundaries_and_specials_are_left_to_float64():
    """y = x + 2^-11 for x in [1, 2): every result a tie between two float16
    values; a 1e4-fold cancellation; results in the float16 subnormal range or
    past 65504; NaN and Inf: no chunk decided. (The kernels then compute them
    the float64 way: next test.)"""
    ones = np.arange(0x3C00, 0x4000, dtype=np.uint16).view(np.float16)      # [1, 2)
    _, decided = _k.half_fast_probe(ones, 0.0, 1.0, 2.0 ** -11)
    assert not decided.any()
    x = (1000 + np.arange(-8, 8) / 64).astype(np.float16)
    _, decided = _k.half_fast_probe(np.tile(x, 8), 1000.0, 1e4, -1e4 * 1e-7)
    assert not decided.any()
    tiny = np.full(64, 1.0, np.float16)
    _, decided = _k.half_fast_probe(tiny, 0.0, 1e-6, 0.0)                 # 1e-6: subnormal
    assert not decided.any()
    _, decided = _k.half_fast_probe(tiny, 0.0, 70000.0, 0.0)              # overflow
    assert not decided.any()
    special = np.tile(np.array([np.nan, np.inf, -np.inf, 1.0], np.float16), 4)
    _, decided = _k.half_fast_probe(special, 0.0, 1.0, 0.0)
    assert not decided.any()
    for bad in (1e-40, 1e39, np.inf, np.nan):       # a constant float32 cannot hold (DAZ)
        _, decided = _k.half_fast_probe(tiny, 0.0, 1.0, bad)
        assert not decided.any(), bad


def _kernel_runs(on, x, dy, mean, invstd, w, b, outer, C, inner):
    was, _ = _k.half_fast(on)
    try:
        y = np.full_like(x, 7)
        _k.normalize(x, y, outer, C, inner, mean, invstd, w, b, 1)
        dx = np.full_like(x, 7)
        sums = _k.dy_sums(dy, x, outer, C, inner, mean, 2)
        _k.input_grad(dy, x, dx, outer, C, inner, True, float(outer * inner), mean, invstd, w,
                      *sums, 2)
        ye, _, _ = bncore.batch_norm_forward(x, w, b, mean.astype(np.float32),
                                             (1.0 / invstd ** 2).astype(np.float32),
                                             training=False, num_threads=2)
        return y, dx, ye
    finally:
        _k.half_fast(was)


@pytest.mark.parametrize("shape", [(2, 3, 1000), (4, 8, 33), (3, 2, 8200), (8, 16, 7, 7)])
@pytest.mark.parametrize("data", ["normal", "offset", "ties", "specials", "extreme"])
def test_float16_kernels_give_the_same_bits_with_and_without_the_fast_path(shape, data):
    rng = np.random.default_rng(len(data) + shape[-1])
    C = shape[1]
    outer, inner = shape[0], int(np.prod(shape[2:]))
    bshape = (1, C) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape)
    mean = rng.normal(0, 0.1, C)
    invstd = rng.uniform(0.5, 2, C)
    w = rng.normal(1, 0.3, C).astype(np.float32)
    b = rng.normal(0, 1, C).astype(np.float32)
    if data == "offset":
        off = rng.uniform(-2000, 2000, C)
        x = off.reshape(bshape) + x * 0.5
        mean = off + rng.normal(0, 0.01, C)
    elif data == "ties":                  # y = x + 2^-11 on [1, 2): exact ties everywhere
        x = rng.uniform(1, 2, shape)
        mean, invstd, w = np.zeros(C), np.ones(C), None
        b = np.full(C, 2.0 ** -11, np.float32)
    elif data == "specials":
        x = x * 300
        x.flat[:: 7] = np.inf
        x.flat[3:: 11] = np.nan
        x.flat[5:: 13] = 65504
    elif data == "extreme":               # results past 65504 and in the subnormal range
        invstd = np.where(np.arange(C) % 2, 1e5, 1e-6)
    x = x.astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    on = _kernel_runs(True, x, dy, mean, invstd, w, b, outer, C, inner)
    off = _kernel_runs(False, x, dy, mean, invstd, w, b, outer, C, inner)
    for got, want, what in zip(on, off, ("normalize", "dx", "eval")):
        assert np.array_equal(bits(got), bits(want)), what
    if data == "ties":    # and the float64 way is right: ties to even, as NumPy
        want = affine_ref(x, 0.0, 1.0, 2.0 ** -11)
        assert np.array_equal(bits(on[0]), bits(want))

"""bncore_gpu on a real GPU: trajectories, AMP on device scalars, determinism,
batch-norm layouts and adversarial data. Skipped (with the reason) without
CuPy or a CUDA device; scripts/gpu_check.sh runs these on a GPU machine.
(The op-registry tests in test_registry_ops.py add GPU-vs-oracle and
GPU-vs-CPU checks on Hypothesis draws.)"""
import numpy as np
import pytest

import bncore
from bncore.testing.reference import normwise_relative_error as rel

try:
    import cupy
    import bncore_gpu
    _REASON = None
except (ImportError, RuntimeError) as exc:     # no CuPy, or no device
    cupy = bncore_gpu = None
    _REASON = f"no usable GPU: {exc}"

pytestmark = pytest.mark.skipif(cupy is None, reason=_REASON or "")

STEPS = 25
SHAPES = [(7,), (3, 5), (40000,)]

CONFIGS = [
    ("SGD", "torch", dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", "torch", dict(momentum=0.9, dampening=0.3)),
    ("SGD", "keras", dict(momentum=0.9, weight_decay=0.01)),
    ("SGD", "onnx", dict(momentum=0.9, dampening=0.2, nesterov=True)),
    ("Adam", "torch", dict(amsgrad=True, weight_decay=0.05)),
    ("Adam", "torch", dict(maximize=True)),
    ("AdamW", "torch", dict(amsgrad=True)),
    ("Adam", "keras", dict(amsgrad=True)),
    ("Adam", "optax", dict(amsgrad=True, eps_root=1e-8)),
    ("Adam", "onnx", dict(weight_decay=0.01, weight_decay_post=0.001)),
    ("RMSprop", "torch", dict(centered=True, momentum=0.5, weight_decay=0.01)),
    ("RMSprop", "keras", dict(centered=True, momentum=0.5)),
    ("RMSprop", "optax", dict(centered=True)),
    ("Adagrad", "torch", dict(lr_decay=0.01, weight_decay=0.01)),
    ("Adagrad", "keras", dict()),
    ("Adagrad", "onnx", dict(lr_decay=0.01)),
]
LR0 = {"SGD": 0.05, "Adam": 0.01, "AdamW": 0.01, "RMSprop": 0.005, "Adagrad": 0.05}


def data(seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[(rng.standard_normal(s) * 0.3 + 0.05).astype(np.float32) for s in SHAPES]
             for _ in range(STEPS)]
    return params, grads


def trajectory(module, name, convention, cfg, dtype, on_gpu):
    params, grads = data()
    xp = cupy if on_gpu else np
    ps = [xp.asarray(p.astype(dtype)) for p in params]
    opt = getattr(module.optim, name)(ps, lr=LR0[name], convention=convention, **cfg)
    out = []
    for k in range(STEPS):
        module.optim.set_lr(opt, LR0[name] * (1 - 0.03 * k))
        opt.step([xp.asarray(g.astype(dtype)) for g in grads[k]])
        out.append(np.concatenate([(cupy.asnumpy(p) if on_gpu else p).astype(np.float64).ravel()
                                   for p in ps]))
    return np.stack(out)


def ulp_distance(traj32, ref64):
    scale = np.maximum.accumulate(np.abs(ref64), axis=0)
    spacing = np.spacing(scale.astype(np.float32)).astype(np.float64)
    return float(np.max(np.abs(traj32 - ref64) / spacing))


@pytest.mark.parametrize("name,convention,cfg", CONFIGS,
                         ids=[f"{n}-{c}-{k}" for n, c, k in CONFIGS])
def test_gpu_trajectory_no_further_from_float64_than_cpu(name, convention, cfg):
    ref64 = trajectory(bncore, name, convention, cfg, np.float64, False)
    cpu = ulp_distance(trajectory(bncore, name, convention, cfg, np.float32, False), ref64)
    gpu = ulp_distance(trajectory(bncore_gpu, name, convention, cfg, np.float32, True), ref64)
    gpu64 = trajectory(bncore_gpu, name, convention, cfg, np.float64, True)
    assert np.max(np.abs(gpu64 - ref64)) <= 1e-12 * np.max(np.abs(ref64))
    assert gpu <= cpu + 4, f"GPU {gpu:.1f} ulp vs CPU {cpu:.1f} ulp from the float64 trajectory"


def test_device_found_inf_changes_nothing_and_needs_no_sync():
    params, grads = data()
    ps = [cupy.asarray(p) for p in params]
    opt = bncore_gpu.optim.Adam(ps, lr=1e-2, amsgrad=True)
    opt.step([cupy.asarray(g) for g in grads[0]])
    before = [p.copy() for p in ps]
    state_before = {i: {k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}
                    for i, s in opt.state.items()}
    g = [cupy.asarray(g) for g in grads[1]]
    g[2][5] = cupy.inf
    found = bncore_gpu.found_inf(g)                 # a 0-d device array
    assert isinstance(found, cupy.ndarray) and found.shape == ()
    opt.step(g, grad_scale=cupy.asarray(2.0), found_inf=found)
    for a, b in zip(ps, before):
        assert bool((a == b).all())
    for i, s in state_before.items():
        for k, v in s.items():
            assert bool((opt.state[i][k] == v).all()), k
    assert float(opt.state[0]["step"]) == 1.0
    # and a clean step afterwards counts as step 2
    opt.step([cupy.asarray(g) for g in grads[1]], found_inf=bncore_gpu.found_inf(
        [cupy.asarray(g) for g in grads[1]]))
    assert float(opt.state[0]["step"]) == 2.0


def test_grad_scale_as_device_scalar_matches_host_scalar():
    params, grads = data()
    a = [cupy.asarray(p) for p in params]
    b = [cupy.asarray(p) for p in params]
    ma, va = [cupy.zeros_like(p) for p in a], [cupy.zeros_like(p) for p in a]
    mb, vb = [cupy.zeros_like(p) for p in a], [cupy.zeros_like(p) for p in a]
    scaled = [cupy.asarray(g * np.float32(1024)) for g in grads[0]]
    bncore_gpu.adam_step(a, scaled, ma, va, step=1, lr=1e-2, grad_scale=1024.0)
    bncore_gpu.adam_step(b, scaled, mb, vb, step=cupy.asarray(1.0), lr=1e-2,
                         grad_scale=cupy.asarray(1024.0, dtype=cupy.float32))
    for x, y in zip(a, b):
        assert bool((x == y).all())


def test_a_bool_device_loss_scale_is_refused_as_on_the_cpu():
    """grad_scale=True as a device array was taken as a scale of 1.0 where the
    CPU refuses a bool scale (review: its dtype is known on the host)."""
    p = np.ones(3, np.float32)
    g = np.full(3, 0.5, np.float32)
    with pytest.raises(TypeError, match="grad_scale.*bool"):
        bncore.sgd_step([p], [g], lr=0.1, grad_scale=np.array(True))
    dp = cupy.asarray(p)
    with pytest.raises(TypeError, match="grad_scale.*bool"):
        bncore_gpu.sgd_step([dp], [cupy.asarray(g)], lr=0.1, grad_scale=cupy.asarray(True))
    assert (p == 1.0).all() and (cupy.asnumpy(dp) == 1.0).all()


def test_device_amp_scalars_must_be_real_numbers():
    """A complex device grad_scale, found_inf or step is refused as the CPU
    refuses a complex scalar, before anything is written."""
    params, grads = data()
    ps = [cupy.asarray(p) for p in params]
    gs = [cupy.asarray(g) for g in grads[0]]
    ms, vs = [cupy.zeros_like(p) for p in ps], [cupy.zeros_like(p) for p in ps]
    before = [p.copy() for p in ps]
    for kw in (dict(grad_scale=cupy.asarray(2 + 0j)), dict(found_inf=cupy.asarray(1j)),
               dict(step=cupy.asarray(1 + 0j))):
        name = next(iter(kw))
        args = dict(step=1, lr=1e-2)
        args.update(kw)
        with pytest.raises(TypeError, match=name):
            bncore_gpu.adam_step(ps, gs, ms, vs, **args)
        with pytest.raises(TypeError, match=name):
            bncore.adam_step(params, grads[0], [np.zeros_like(p) for p in params],
                             [np.zeros_like(p) for p in params],
                             **{**args, name: cupy.asnumpy(kw[name])})
    assert all(bool((a == b).all()) for a, b in zip(ps, before))
    assert all(not bool(m.any()) for m in ms + vs)


def _misaligned(a):
    """(m, raw): m holds a's values but starts one byte past an element
    boundary, inside the uint8 buffer raw. On a real device no CuPy kernel
    may touch m (its loads would fault): it is filled, and read back, through
    raw's bytes only."""
    raw = cupy.zeros(a.nbytes + a.itemsize, dtype=np.uint8)
    raw[1:1 + a.nbytes] = cupy.ascontiguousarray(a).view(np.uint8).ravel()
    try:
        m = raw[1:1 + a.nbytes].view(a.dtype).reshape(a.shape)
    except (ValueError, TypeError):          # a CuPy whose view() refuses it
        m = cupy.ndarray(a.shape, a.dtype, memptr=raw.data + 1)
    assert m.data.ptr % a.itemsize != 0
    return m, raw


def test_misaligned_device_arrays_are_refused_before_anything_runs():
    """A kernel's load from a misaligned address faults and leaves the CUDA
    context unusable; every device array is checked first (ValueError naming
    it), inputs and in-place outputs alike, and nothing is written."""
    rng = np.random.default_rng(5)
    x = cupy.asarray(rng.standard_normal((4, 3, 5)).astype(np.float32))
    w = cupy.ones(3, dtype=cupy.float32)
    with pytest.raises(ValueError, match="x is not aligned"):
        bncore_gpu.batch_norm_forward(_misaligned(x)[0], w)
    rm, rm_raw = _misaligned(cupy.zeros(3, dtype=cupy.float32))
    rv = cupy.ones(3, dtype=cupy.float32)
    with pytest.raises(ValueError, match="running_mean is not aligned"):
        bncore_gpu.batch_norm_forward(x, w, None, rm, rv)
    assert not bool(rm_raw.any()) and bool((rv == 1).all())
    _, mean, invstd = bncore_gpu.batch_norm_forward(x, w)
    with pytest.raises(ValueError, match="dy is not aligned"):
        bncore_gpu.batch_norm_backward(_misaligned(x)[0], x, mean, invstd, w)
    params = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in (7, 33)]
    grads = [cupy.asarray(rng.standard_normal(n).astype(np.float32)) for n in (7, 33)]
    p1, p1_raw = _misaligned(params[1])
    p1_bytes = p1_raw.copy()
    p0 = params[0].copy()
    with pytest.raises(ValueError, match=r"params\[1\] is not aligned"):
        bncore_gpu.sgd_step([params[0], p1], grads, lr=0.1)
    with pytest.raises(ValueError, match=r"grads\[1\] is not aligned"):
        bncore_gpu.sgd_step(params, [grads[0], _misaligned(grads[1])[0]], lr=0.1)
    assert bool(cupy.array_equal(params[0], p0)) and bool(cupy.array_equal(p1_raw, p1_bytes))
    with pytest.raises(ValueError, match="not aligned"):
        bncore_gpu.clip_grad_norm([_misaligned(grads[1])[0]], 1.0)
    # an aligned start but a stride of 6 bytes between float32 elements
    raw = cupy.zeros(64, dtype=np.uint8)
    args = (raw[:4 * 4].view(np.float32), (2, 3), (18, 6))
    try:
        odd = cupy.lib.stride_tricks.as_strided(*args)
    except AttributeError:                  # the emulated device: NumPy's
        odd = np.lib.stride_tricks.as_strided(*args).view(type(raw))
    assert odd.data.ptr % 4 == 0 and odd.strides == (18, 6)
    with pytest.raises(ValueError, match="x is not aligned"):
        bncore_gpu.batch_norm_forward(odd, cupy.ones(3, dtype=cupy.float32))


def test_clip_grad_norm_stays_on_device_and_matches_cpu():
    rng = np.random.default_rng(3)
    gs = [(rng.standard_normal(s) * 3).astype(np.float32) for s in SHAPES]
    gg = [cupy.asarray(g) for g in gs]
    total_gpu = bncore_gpu.clip_grad_norm(gg, 1.0)
    assert isinstance(total_gpu, cupy.ndarray) and total_gpu.shape == ()
    total_cpu = bncore.clip_grad_norm(gs, 1.0)
    assert abs(float(total_gpu) - total_cpu) <= 1e-12 * total_cpu
    for a, b in zip(gg, gs):
        assert rel(cupy.asnumpy(a), b) <= 1e-7
    with pytest.raises(bncore.NonFiniteError):
        bad = [cupy.asarray(g) for g in gs]
        bad[0][0] = cupy.nan
        before = [x.copy() for x in bad]
        bncore_gpu.clip_grad_norm(bad, 1.0, error_if_nonfinite=True)
    assert all(bool(cupy.array_equal(x, y, equal_nan=True)) for x, y in zip(bad, before))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHWC64", "2D", "2Dwide"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_batch_norm_is_deterministic_and_matches_cpu_on_offset_data(layout, dtype):
    rng = np.random.default_rng(7)
    # NHWC64 and 2Dwide take the float4 rows kernels (C = 64: 16 float4 columns
    # per block; C = 1024: 256), NHWC (C = 24) and 2D (C = 96) the scalar ones
    shape = {"NCHW": (16, 24, 20, 20), "NHWC": (16, 20, 20, 24), "NHWC64": (8, 20, 20, 64),
             "2D": (512, 96), "2Dwide": (300, 1024)}[layout]
    axis = -1 if layout.startswith("NHWC") else 1
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    ratio = 1e2 if dtype == np.float16 else 1e5
    std = rng.uniform(0.5, 2.0, C)
    x = (std * ratio).reshape(bshape) + std.reshape(bshape) * rng.standard_normal(shape)
    x = x.astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    xg, dyg = cupy.asarray(x), cupy.asarray(dy)
    runs = []
    for _ in range(2):
        y, m, s = bncore_gpu.batch_norm_forward(xg, axis=axis)
        dx, dw, db = bncore_gpu.batch_norm_backward(dyg, xg, m, s, axis=axis)
        runs.append([cupy.asnumpy(a) for a in (y, m, s, dx, dw, db)])
    for a, b in zip(*runs):
        assert a.tobytes() == b.tobytes(), "two GPU runs differ"
    y_c, m_c, s_c = bncore.batch_norm_forward(x, axis=axis)
    dx_c, dw_c, db_c = bncore.batch_norm_backward(dy, x, m_c, s_c, axis=axis)
    tol = {np.float32: 1e-6, np.float16: 2e-3, np.float64: 1e-10}[dtype]
    for got, want in zip(runs[0], (y_c, m_c, s_c, dx_c, dw_c, db_c)):
        assert rel(got, want) <= tol


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "2D"])
def test_batch_norm_statistics_with_an_outlier_as_pivot(layout):
    """The statistics kernels pivot each channel on its first value; when that
    value is an outlier (1e4 std from the rest of a float64 channel whose
    mean is 1e6 std from 0), s2 - s1^2/N loses a factor 1 + (K - mean)^2/var,
    about N = 65536 here (~1e-11 measured without the fix), and
    bn_finalize_train sums the channel again against the first pass's mean.
    The variance must come out to 1e-13 relative, as on the CPU. (float64
    data takes the scalar kernels: planes for NCHW, rows for the others.)"""
    rng = np.random.default_rng(11)
    shape = {"NCHW": (16, 4, 64, 64), "NHWC": (16, 64, 64, 4), "2D": (65536, 6)}[layout]
    axis = -1 if layout == "NHWC" else 1
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (10.0 + 3.0 * np.arange(C)).reshape(bshape) + 1e-5 * rng.standard_normal(shape)
    first = [0] * len(shape)
    first[axis] = slice(None)
    x[tuple(first)] += 0.1                       # x[0, c, 0] of every channel
    _, mean, invstd = bncore_gpu.batch_norm_forward(cupy.asarray(x), eps=1e-30, axis=axis)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    xl = x.astype(np.longdouble)
    var = ((xl - xl.mean(axis=red, keepdims=True)) ** 2).mean(axis=red)
    got = 1.0 / cupy.asnumpy(invstd).astype(np.longdouble) ** 2
    assert np.max(np.abs(got / var - 1)) < 1e-13
    assert np.max(np.abs(cupy.asnumpy(mean) / xl.mean(axis=red) - 1)) < 1e-15


def test_sgd_state_without_some_momentum_buffers_matches_the_cpu():
    """A state_dict may lack momentum_buffer for some parameters: in torch's
    style those start from the gradient at their next step while the others
    keep theirs, in one step, on the GPU as on the CPU."""
    rng = np.random.default_rng(41)
    start = [rng.standard_normal(5), rng.standard_normal(3)]
    grads = [[rng.standard_normal(5), rng.standard_normal(3)] for _ in range(3)]
    first = bncore.optim.SGD([p.copy() for p in start], lr=0.1, momentum=0.9)
    first.step(grads[0])
    sd = first.state_dict()
    del sd["state"][1]["momentum_buffer"]
    results = []
    for module, xp in ((bncore, np), (bncore_gpu, cupy)):
        params = [xp.asarray(p.copy()) for p in first.param_groups[0]["params"]]
        opt = module.optim.SGD(params, lr=0.1, momentum=0.9)
        opt.load_state_dict(sd)
        for g in grads[1:]:
            opt.step([xp.asarray(a) for a in g])
        results.append([np.asarray(cupy.asnumpy(p) if xp is cupy else p) for p in params])
    for c, g in zip(*results):
        np.testing.assert_allclose(g, c, rtol=1e-14, atol=1e-15)


@pytest.fixture
def cluster_kernels(monkeypatch):
    """The single-read cluster kernels (bncore_gpu/_bn_cluster_kernels.cu) on,
    for any channel count (the small test shapes would otherwise leave an
    H100's SMs idle and take the three-kernel path); afterwards, the device must
    not have fallen back to the three-kernel path (a refused launch warns and
    falls back, which would pass the value checks silently)."""
    from bncore_gpu import batch_norm as gbn
    if gbn._cluster_cap() == 0:      # e.g. an A100 (compute capability 8.0)
        pytest.skip("no thread-block clusters on this GPU (compute capability "
                    f"{cupy.cuda.Device().compute_capability})")
    monkeypatch.setattr(gbn, "CLUSTER_KERNELS", True)
    monkeypatch.setattr(gbn, "CLUSTER_MIN_BLOCKS_PER_SM", 0)
    yield gbn
    dev = cupy.cuda.runtime.getDevice()
    assert gbn._cluster_caps.get(dev, 1) > 0, "the cluster kernels fell back on this device"


def _takes_cluster(gbn, shape, held):
    """Whether a float32 NCHW-like `shape` qualifies for the cluster kernels:
    planes with inner % 4 == 0 and at most what this device lets a CTA of a
    cluster of 8 hold (104 KiB on an H100)."""
    inner = int(np.prod(shape[2:]))
    cap = gbn._cluster_cap()
    return inner % 4 == 0 and inner >= 32 and held * -(-shape[0] // 8) * inner * 4 <= cap


def _offset_data(rng, shape):
    C = shape[1]
    bshape = [1, C] + [1] * (len(shape) - 2)
    std = rng.uniform(0.5, 2.0, C)
    x = (std * 1e5).reshape(bshape) + std.reshape(bshape) * rng.standard_normal(shape)
    return x.astype(np.float32)


# the cluster kernels where they apply ((32, 16, 56, 56): 50 KiB of dy and x per
# CTA; (5, 3, 8, 12): three CTAs hold nothing; (9, 4, 32): a short last slice;
# (64, 2, 32, 64): 64 KiB of x per CTA, so the
# forward only: dy and x would need 128) and
# the three-kernel path where they do not ((64, 2, 7, 7): inner not a multiple of 4)
CLUSTER_SHAPES = [(32, 16, 56, 56), (5, 3, 8, 12), (9, 4, 32), (64, 2, 32, 64), (64, 2, 7, 7)]


@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_cluster_forward_matches_cpu_on_offset_data(cluster_kernels, shape, affine):
    """y, mean, invstd and the running statistics within the parity tolerance
    of the CPU engine on data offset 1e5 std from 0, identical from run to run."""
    gbn = cluster_kernels
    rng = np.random.default_rng(5)
    C = shape[1]
    x = _offset_data(rng, shape)
    xg = cupy.asarray(x)
    flat = xg.reshape(-1)
    inner = int(np.prod(shape[2:]))
    assert (gbn.cluster_smem(shape[0], C, inner, 1, flat, flat) > 0) \
        == _takes_cluster(gbn, shape, 1)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32) if affine else None
    b = rng.uniform(-1, 1, C).astype(np.float32) if affine else None
    runs = []
    for _ in range(2):
        rm, rv = cupy.full(C, 3.0, cupy.float32), cupy.full(C, 2.0, cupy.float32)
        y, m, s = bncore_gpu.batch_norm_forward(
            xg, None if w is None else cupy.asarray(w), None if b is None else cupy.asarray(b),
            rm, rv, momentum=0.3)
        runs.append([cupy.asnumpy(a) for a in (y, m, s, rm, rv)])
    for a, b_ in zip(*runs):
        assert a.tobytes() == b_.tobytes(), "two GPU runs differ"
    rm_c, rv_c = np.full(C, 3.0, np.float32), np.full(C, 2.0, np.float32)
    y_c, m_c, s_c = bncore.batch_norm_forward(x, w, b, rm_c, rv_c, momentum=0.3)
    for got, want in zip(runs[0], (y_c, m_c, s_c, rm_c, rv_c)):
        assert rel(got, want) <= 1e-6


@pytest.mark.parametrize("shape", CLUSTER_SHAPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("wdtype", [np.float32, np.float64, None])
def test_cluster_backward_matches_cpu_on_offset_data(cluster_kernels, shape, training, wdtype):
    """dx, dweight and dbias (in weight's dtype) within the parity tolerance of
    the CPU engine, identical from run to run, training and inference."""
    gbn = cluster_kernels
    rng = np.random.default_rng(6)
    C = shape[1]
    x = _offset_data(rng, shape)
    dy = rng.standard_normal(shape).astype(np.float32)
    inner = int(np.prod(shape[2:]))
    xg, dyg = cupy.asarray(x), cupy.asarray(dy)
    flat = xg.reshape(-1)
    assert (gbn.cluster_smem(shape[0], C, inner, 2, flat, flat, flat) > 0) \
        == _takes_cluster(gbn, shape, 2)
    w = None if wdtype is None else rng.uniform(0.5, 1.5, C).astype(wdtype)
    _, m_c, s_c = bncore.batch_norm_forward(x)
    runs = []
    for _ in range(2):
        dx, dw, db = bncore_gpu.batch_norm_backward(
            dyg, xg, cupy.asarray(m_c), cupy.asarray(s_c), None if w is None else cupy.asarray(w),
            training=training)
        runs.append([cupy.asnumpy(a) for a in (dx, dw, db)])
    for a, b_ in zip(*runs):
        assert a.tobytes() == b_.tobytes(), "two GPU runs differ"
    want = bncore.batch_norm_backward(dy, x, m_c, s_c, w, training=training)
    for got, exp in zip(runs[0], want):
        assert got.dtype == exp.dtype
        assert rel(got, exp) <= 1e-6


def test_cluster_forward_statistics_are_exact_with_an_outlier_first_value(cluster_kernels):
    """Two-pass statistics over shared memory: an outlier at x[0, c, 0] (where
    the three-kernel path takes its pivot) costs nothing; the variance of
    float32 data offset 1e5 std from 0 is the float64 one to 1e-13."""
    rng = np.random.default_rng(12)
    shape = (64, 4, 32, 32)
    x = (1e5 + rng.standard_normal(shape)).astype(np.float32)
    x[0, :, 0, 0] += 1e3
    xg = cupy.asarray(x)
    assert cluster_kernels.cluster_smem(64, 4, 1024, 1, xg.reshape(-1)) > 0
    _, mean, invstd = bncore_gpu.batch_norm_forward(xg, eps=1e-30)
    xl = x.astype(np.longdouble)
    var = ((xl - xl.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean(axis=(0, 2, 3))
    got = 1.0 / cupy.asnumpy(invstd).astype(np.longdouble) ** 2
    assert np.max(np.abs(got / var - 1)) < 1e-13
    assert np.max(np.abs(cupy.asnumpy(mean) / xl.mean(axis=(0, 2, 3)) - 1)) < 1e-15


@pytest.mark.parametrize("wdtype", [np.float32, np.float64, None])
def test_inference_backward_of_an_empty_batch_gives_zero_parameter_gradients(wdtype):
    """No sample, no kernel: dweight and dbias are zeros (as on the CPU), not
    whatever the freshly allocated device memory held."""
    x = np.empty((0, 3, 4), np.float32)
    w = None if wdtype is None else np.ones(3, wdtype)
    mean, invstd = np.zeros(3), np.ones(3)
    dx, dw, db = bncore_gpu.batch_norm_backward(
        cupy.asarray(x), cupy.asarray(x), cupy.asarray(mean), cupy.asarray(invstd),
        None if w is None else cupy.asarray(w), training=False)
    want = bncore.batch_norm_backward(x, x, mean, invstd, w, training=False)
    for got, exp in zip((dx, dw, db), want):
        got = cupy.asnumpy(got)
        assert got.shape == exp.shape and got.dtype == exp.dtype
        assert np.array_equal(got, exp)


def _cluster_kernels_raise(gbn, monkeypatch, exc):
    """From here on, asking the loader for a cluster kernel raises `exc`; the
    other kernels load as before."""
    real = gbn._loader.kernel

    def loader(filename, names, name):
        if filename == gbn.CLUSTER_FILE:
            raise exc
        return real(filename, names, name)

    monkeypatch.setattr(gbn._loader, "kernel", loader)


def test_cluster_kernels_fall_back_with_a_warning_when_refused(cluster_kernels, monkeypatch):
    """A device or toolchain that refuses the cluster kernels (compile error,
    launch-configuration error) gets the three-kernel path, the same results
    and one RuntimeWarning, and keeps the three-kernel path afterwards."""
    gbn = cluster_kernels
    _cluster_kernels_raise(gbn, monkeypatch,
                           RuntimeError("CUDA_ERROR_INVALID_CLUSTER_SIZE (simulated)"))
    dev = cupy.cuda.runtime.getDevice()
    saved = dict(gbn._cluster_caps)
    rng = np.random.default_rng(9)
    x = _offset_data(rng, (16, 3, 32))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    try:
        with pytest.warns(RuntimeWarning, match="using the three-kernel path"):
            y, m, s = bncore_gpu.batch_norm_forward(cupy.asarray(x))
        assert gbn._cluster_caps[dev] == 0
        dx, dw, db = bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), m, s)
        want_y, want_m, want_s = bncore.batch_norm_forward(x)
        want = bncore.batch_norm_backward(dy, x, want_m, want_s)
        for got, exp in zip((y, m, s, dx, dw, db), (want_y, want_m, want_s) + tuple(want)):
            assert rel(cupy.asnumpy(got), exp) <= 1e-6
    finally:
        gbn._cluster_caps.clear()
        gbn._cluster_caps.update(saved)


def test_a_cuda_fault_at_a_cluster_launch_is_raised_not_hidden(cluster_kernels, monkeypatch):
    """A fault an earlier kernel left (CUDA_ERROR_ILLEGAL_ADDRESS, 700) shows at
    the next launch: raised, not taken for the device refusing clusters (which
    switched them off for the device with a misleading warning)."""
    gbn = cluster_kernels

    class CudaError(RuntimeError):
        status = 700

    _cluster_kernels_raise(gbn, monkeypatch, CudaError("CUDA_ERROR_ILLEGAL_ADDRESS (simulated)"))
    dev = cupy.cuda.runtime.getDevice()
    saved = dict(gbn._cluster_caps)
    x = _offset_data(np.random.default_rng(9), (16, 3, 32))
    try:
        with pytest.raises(CudaError):
            bncore_gpu.batch_norm_forward(cupy.asarray(x))
        assert gbn._cluster_caps.get(dev) != 0
    finally:
        gbn._cluster_caps.clear()
        gbn._cluster_caps.update(saved)


@pytest.mark.parametrize("value, want", [(None, True), ("", True), ("  ", True), ("1", True),
                                         ("on", True), ("0", False), ("False", False),
                                         (" off ", False)])
def test_cluster_setting_is_on_unless_the_environment_says_0(value, want):
    from bncore_gpu import batch_norm as gbn
    assert gbn._switch_setting(value) is want


@pytest.mark.parametrize("value", ["2", "cluster", "y"])
def test_cluster_setting_refuses_what_it_cannot_read(value):
    from bncore_gpu import batch_norm as gbn
    with pytest.raises(ValueError, match="BNCORE_GPU_CLUSTER must be 1 or 0"):
        gbn._switch_setting(value)


@pytest.mark.parametrize("path", ["cluster", "cooperative rows"])
@pytest.mark.parametrize("cc, hopper", [("80", False), ("90", True), ("100", False),
                                        ("120", False)])
def test_single_launch_kernels_are_used_on_compute_capability_9_only(monkeypatch, cc, hopper,
                                                                      path):
    """Only Hopper (9.x) takes the cluster kernels and the cooperative rows
    kernels by default: they have run on Hoppers alone, and later
    architectures keep the three-kernel path."""
    from bncore_gpu import batch_norm as gbn

    class Reported:
        compute_capability = cc

    attr, cache, used = {
        "cluster": (gbn._ATTR_CLUSTER_LAUNCH, "_cluster_caps", lambda: gbn._cluster_cap()),
        "cooperative rows": (gbn._ATTR_COOPERATIVE_LAUNCH, "_coop_blocks",
                             lambda: gbn._coop_capacity("bn_forward_rows_coop<float>")),
    }[path]
    dev = cupy.cuda.runtime.getDevice()
    launches = bool(cupy.cuda.runtime.deviceGetAttribute(attr, dev))
    monkeypatch.setattr(cupy.cuda, "Device", lambda *a: Reported())
    monkeypatch.setattr(gbn, cache, {})
    assert (used() > 0) == (hopper and launches)


def test_cluster_kernels_take_a_plain_call_by_default(monkeypatch):
    """With no setting the cluster path is on, and then a float32 NCHW training
    forward and backward with channels enough to fill the device goes through
    the cluster kernels (one launch each); switched off, the same calls take
    the three-kernel path, with results within the parity tolerance of each
    other. (The import-time value itself follows BNCORE_GPU_CLUSTER, which a
    caller may have set to 0, so the default is read from the rule.)"""
    from bncore_gpu import batch_norm as gbn
    assert gbn._switch_setting(None) is True
    if gbn._cluster_cap() == 0:
        pytest.skip("no thread-block clusters on this GPU (compute capability "
                    f"{cupy.cuda.Device().compute_capability})")
    launched = []
    real = gbn._launch_cluster

    def spy(name, *args):
        launched.append(name)
        return real(name, *args)

    monkeypatch.setattr(gbn, "_launch_cluster", spy)
    C = -(-gbn.CLUSTER_MIN_BLOCKS_PER_SM * gbn._loader.sm_count() // gbn.CLUSTER_SIZE)
    rng = np.random.default_rng(21)
    x = cupy.asarray(_offset_data(rng, (8, C, 8, 8)))
    dy = cupy.asarray(rng.standard_normal(x.shape).astype(np.float32))
    results = {}
    for on in (True, False):
        monkeypatch.setattr(gbn, "CLUSTER_KERNELS", on)
        launched.clear()
        y, m, s = bncore_gpu.batch_norm_forward(x)
        results[on] = (y, m, s) + bncore_gpu.batch_norm_backward(dy, x, m, s)
        assert launched == (["bn_forward_cluster<float>", "bn_backward_cluster<float>"]
                            if on else [])
    for a, b in zip(results[True], results[False]):
        assert rel(cupy.asnumpy(a), cupy.asnumpy(b)) <= 1e-6


@pytest.mark.parametrize("l2_reuse", [True, False], ids=["tiles-backwards", "one-wave"])
def test_channels_last_rows_kernels_loop_over_their_rows(l2_reuse, monkeypatch):
    """(32,64,56,56) channels-last float32: the rows vec4 elementwise kernels
    loop over rows, either through the reduction's tiles from their last row to
    their first (ROWS_L2_REUSE, training) or in one wave of row blocks
    (ROWS_BLOCKS_PER_SM per SM), fewer than the shape's row groups; y (training
    and eval), dx, dweight and dbias must still match the CPU engine. (The three
    kernels' path: the cooperative one, where it applies, walks its own way.)"""
    from bncore_gpu import batch_norm as gbn
    monkeypatch.setattr(gbn, "ROWS_L2_REUSE", l2_reuse)
    monkeypatch.setattr(gbn, "ROWS_COOP", False)
    walked = []
    real = gbn._elementwise

    def spy(kind, srcs, dst, outer, C, inner, consts, after_reduction=False):
        walked.append((kind, after_reduction))
        return real(kind, srcs, dst, outer, C, inner, consts, after_reduction)

    monkeypatch.setattr(gbn, "_elementwise", spy)
    rng = np.random.default_rng(31)
    shape = (32, 64, 56, 56)
    x = np.ascontiguousarray(_offset_data(rng, shape).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = np.ascontiguousarray(
        rng.standard_normal(shape).astype(np.float32).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    outer, P = 32 * 56 * 56, 64
    TC = P // 4                                   # the tile _rows_vec4_tile picks for P = 64
    assert -(-outer // (256 // TC)) > gbn.ROWS_BLOCKS_PER_SM * gbn._loader.sm_count()
    # cupy.asarray copies a non-contiguous host array to C order: move the NHWC
    # memory and take the same NCHW-shaped view of it on the device
    xg = cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    dyg = cupy.asarray(np.ascontiguousarray(dy.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert xg.strides == x.strides                 # channels-last on the device too
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    b = rng.uniform(-1, 1, 64).astype(np.float32)
    rm = rng.uniform(-1, 1, 64).astype(np.float32)
    rv = rng.uniform(0.5, 2, 64).astype(np.float32)
    y, m, s = bncore_gpu.batch_norm_forward(xg, cupy.asarray(w), cupy.asarray(b))
    dx, dw, db = bncore_gpu.batch_norm_backward(dyg, xg, m, s, cupy.asarray(w))
    ye, _, _ = bncore_gpu.batch_norm_forward(xg, cupy.asarray(w), cupy.asarray(b),
                                             cupy.asarray(rm), cupy.asarray(rv), training=False)
    y_c, m_c, s_c = bncore.batch_norm_forward(x, w, b)
    want = (y_c, m_c, s_c) + tuple(bncore.batch_norm_backward(dy, x, m_c, s_c, w))
    want += (bncore.batch_norm_forward(x, w, b, rm, rv, training=False)[0],)
    for got, exp in zip((y, m, s, dx, dw, db, ye), want):
        assert rel(cupy.asnumpy(got), exp) <= 1e-6
    assert y.strides == x.strides and dx.strides == x.strides and ye.strides == x.strides
    # training's two passes after a reduction (where ROWS_L2_REUSE applies), eval's not
    assert walked == [("apply", True), ("dx", True), ("apply", False)]


def test_cluster_kernels_respect_the_devices_shared_memory(cluster_kernels, monkeypatch):
    """A device with less shared memory per block than CLUSTER_SMEM (an sm_120
    GPU allows about 99 KB) caps what a CTA may hold: larger channels take the
    three-kernel path."""
    gbn = cluster_kernels
    dev = cupy.cuda.runtime.getDevice()
    gbn._cluster_cap()
    monkeypatch.setitem(gbn._cluster_caps, dev, 50000)
    x = cupy.zeros((64, 2, 32, 64), cupy.float32)        # 8 planes of 8 KiB per CTA
    f = x.reshape(-1)
    assert gbn.cluster_smem(64, 2, 2048, 1, f) == 0       # 64 KiB > 50000
    assert gbn.cluster_smem(48, 2, 2048, 1, f) == 49152   # 6 planes fit


def test_cluster_kernels_take_no_grid_past_cudas_limit(cluster_kernels):
    """Found in review: 2^28 channels (a 32 GiB float32 input, which an H200
    holds) asked for a grid of 8 C = 2^31 CTAs, one past CUDA's limit; the
    failed launch was taken for a refusal, and the device lost the cluster
    path for the rest of the process."""
    gbn = cluster_kernels
    f = cupy.zeros(64, cupy.float32)
    assert gbn.cluster_smem(1, 2 ** 28, 32, 1, f) == 0
    assert gbn.cluster_smem(1, 2 ** 28 - 1, 32, 1, f) == 128


# ---- found by review without a device: each was wrong on the GPU only

@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("where", ["first", "middle"])
def test_gpu_infinite_value_gives_infinite_mean_as_on_the_cpu(layout, where):
    x = np.random.default_rng(0).standard_normal((16, 4, 9, 9)).astype(np.float32)
    i = (0, 1, 0, 0) if where == "first" else (8, 1, 4, 4)
    x[i] = np.inf
    axis = 1
    if layout == "nhwc":
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), 3
    _, mean_c, _ = bncore.batch_norm_forward(x, axis=axis)
    _, mean_g, _ = bncore_gpu.batch_norm_forward(cupy.asarray(x), axis=axis)
    assert mean_c[1] == np.inf and cupy.asnumpy(mean_g)[1] == np.inf
    # the other channels: the same up to the summation order
    np.testing.assert_allclose(cupy.asnumpy(mean_g), mean_c, rtol=1e-12, atol=1e-15)


def test_gpu_float16_statistics_and_gradients_are_rounded_once():
    """float16 running statistics, dweight and dbias are computed in float64 and
    rounded once (bn_store_rounded): CuPy's float64 -> float16 cast goes through
    float32. 1 + 2^-11 + 2^-30 lies just above a binary16 tie: once, it rounds
    up to 1 + 2^-10; twice, to 1. As on the CPU."""
    a = 1 + 2.0 ** -11 + 2.0 ** -30
    x = np.array([[a, 0.0], [a, 1.0]])
    want = np.float16(1 + 2.0 ** -10)
    rm = cupy.zeros(2, cupy.float16)
    bncore_gpu.batch_norm_forward(cupy.asarray(x), running_mean=rm,
                                  running_var=cupy.ones(2, cupy.float16), momentum=1.0)
    rmc = np.zeros(2, np.float16)
    bncore.batch_norm_forward(x, running_mean=rmc, running_var=np.ones(2, np.float16),
                              momentum=1.0)
    assert cupy.asnumpy(rm)[0] == want == rmc[0]
    dy = np.array([[a, 0.0], [0.0, 0.0]])
    w = np.ones(2, np.float16)
    _, m, s = bncore.batch_norm_forward(x)
    dw_c, db_c = bncore.batch_norm_backward(dy, x, m, s, w)[1:]
    dw_g, db_g = bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x),
                                                cupy.asarray(m), cupy.asarray(s),
                                                cupy.asarray(w))[1:]
    assert db_g.dtype == np.float16 and cupy.asnumpy(db_g)[0] == want == db_c[0]
    np.testing.assert_array_equal(cupy.asnumpy(dw_g), dw_c)


def test_gpu_float64_dweight_out_with_float32_weight_is_not_rounded_to_float32():
    """out=(None, dw64, db64) with a float32 weight: the CPU stores the float64
    values; the GPU computed them in float32 first."""
    rng = np.random.default_rng(50)
    x, dy = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    w = rng.standard_normal(3).astype(np.float32)
    _, m, s = bncore.batch_norm_forward(x)
    dw_c, db_c = np.empty(3), np.empty(3)
    bncore.batch_norm_backward(dy, x, m, s, w, out=(None, dw_c, db_c))
    dw_g, db_g = cupy.empty(3), cupy.empty(3)
    bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), cupy.asarray(m),
                                   cupy.asarray(s), cupy.asarray(w), out=(None, dw_g, db_g))
    np.testing.assert_allclose(cupy.asnumpy(dw_g), dw_c, rtol=1e-13)
    np.testing.assert_allclose(cupy.asnumpy(db_g), db_c, rtol=1e-13)


def test_gpu_skipped_step_still_refuses_a_group_that_mixes_dtypes():
    p32, p64 = cupy.ones(3, cupy.float32), cupy.ones(3)
    opt = bncore_gpu.optim.SGD([p32, p64], lr=0.1)
    with pytest.raises(TypeError, match="one parameter group"):
        opt.step([cupy.ones(3, cupy.float32), cupy.ones(3)], found_inf=True)


@pytest.mark.parametrize("shape", [(2, 1), (2, 1, 75)])
def test_gpu_float64_variance_overflow_is_infinite_not_nan(shape):
    """Squares past float64's range: s2 = Inf and s2 - s1 d = Inf - Inf = NaN
    took no second pass, and NaN reached y, invstd and the running variance.
    As on the CPU: variance Inf, invstd 0, y = bias."""
    x = np.zeros(shape)
    x[0], x[1] = 1e200, -1e200
    rm, rv = np.zeros(1), np.ones(1)
    y, m, s = bncore.batch_norm_forward(x, None, None, rm, rv)
    rmg, rvg = cupy.zeros(1), cupy.ones(1)
    yg, mg, sg = bncore_gpu.batch_norm_forward(cupy.asarray(x), None, None, rmg, rvg)
    assert float(s[0]) == 0.0 and float(cupy.asnumpy(sg)[0]) == 0.0
    assert cupy.asnumpy(rvg)[0] == np.inf == rv[0]
    np.testing.assert_array_equal(cupy.asnumpy(yg), y)


@pytest.mark.parametrize("p,values,dtype", [
    (100.0, 1e-4, np.float32),       # |g|^100 underflows: the norm was 0, nothing clipped
    (3.0, 1e-120, np.float64),       # |g|^3 underflows
    (11.0, 1e30, np.float32),        # |g|^11 overflows on finite data: the norm was inf
])
def test_gpu_p_norm_is_rescued_from_underflow_and_overflow_as_on_the_cpu(p, values, dtype):
    """Found by review: the GPU summed |g|^p with no rescue, so small gradients
    at a large p had norm 0 and clip_grad_norm left them unclipped; the CPU
    sums again relative to max |g|. The GPU now does too, on the device."""
    rng = np.random.default_rng(71)
    gs = [(values * rng.uniform(0.5, 1.0, n)).astype(dtype) for n in (700, 300)]
    want = bncore.grad_norm(gs, p)
    assert 0.0 < want < np.inf
    got = float(bncore_gpu.grad_norm([cupy.asarray(g) for g in gs], p))
    assert abs(got - want) <= 1e-12 * want
    cpu = [g.copy() for g in gs]
    dev = [cupy.asarray(g) for g in gs]
    total_cpu = bncore.clip_grad_norm(cpu, want / 10, norm_type=p, eps=0.0)
    total_gpu = float(bncore_gpu.clip_grad_norm(dev, want / 10, norm_type=p, eps=0.0))
    assert abs(total_gpu - total_cpu) <= 1e-12 * total_cpu
    for c, d, g in zip(cpu, dev, gs):
        np.testing.assert_allclose(cupy.asnumpy(d), c, rtol=1e-6)
        assert np.all(np.abs(c) < np.abs(g))           # clipped
    # an Inf in the data still gives inf (no rescue)
    bad = [g.copy() for g in gs]
    bad[1][3] = np.inf
    assert float(bncore_gpu.grad_norm([cupy.asarray(g) for g in bad], p)) == np.inf


def test_gpu_two_norm_of_several_infinities_is_infinite():
    """float64 scaled sum of squares: Inf / Inf made the total NaN."""
    g = [cupy.asarray(np.array([np.inf, np.inf, 1.0])), cupy.asarray(np.array([np.inf]))]
    assert float(bncore_gpu.grad_norm(g)) == np.inf
    assert bncore.grad_norm([cupy.asnumpy(a) for a in g]) == np.inf


def test_gpu_float16_results_are_rounded_once():
    """dev_st: float64 straight to binary16 (cvt.rn.f16.f64). 1 + 2^-11 + 2^-40
    is just above the tie between 1 and 1 + 2^-10; through float32 it would
    become the tie and round to 1. As on the CPU."""
    exact = 1 + 2.0 ** -11 + 2.0 ** -40
    want = np.float16(1 + 2.0 ** -10)
    eps = 2.0 ** -20
    args = (np.array([exact]), None, np.zeros(1), np.array([1 - eps]))
    x = np.ones((1, 1), np.float16)
    y = bncore_gpu.batch_norm_forward(cupy.asarray(x), *[None if a is None else cupy.asarray(a)
                                                         for a in args],
                                      training=False, eps=eps)[0]
    assert cupy.asnumpy(y)[0, 0] == want
    assert bncore.batch_norm_forward(x, *args, training=False, eps=eps)[0][0, 0] == want


@pytest.mark.parametrize("name", ["sgd_step", "adam_step", "rmsprop_step", "adagrad_step"])
def test_gpu_infinite_parameter_stays_infinite_without_weight_decay(name):
    """No L2 term at weight_decay 0 (0 * inf is NaN): as on the CPU."""
    p = np.array([np.inf, -np.inf, 2.0])
    g = np.array([0.5, -1.0, 0.25])
    state = {"sgd_step": 0, "adam_step": 2, "rmsprop_step": 1, "adagrad_step": 1}[name]
    kw = dict(lr=0.1, **({"step": 1} if name in ("adam_step", "adagrad_step") else {}))
    pc = p.copy()
    getattr(bncore, name)([pc], [g], *[[np.zeros(3)] for _ in range(state)], **kw)
    pg = cupy.asarray(p)
    getattr(bncore_gpu, name)([pg], [cupy.asarray(g)],
                              *[[cupy.zeros(3)] for _ in range(state)], **kw)
    assert list(pc[:2]) == [np.inf, -np.inf]
    np.testing.assert_allclose(cupy.asnumpy(pg), pc, rtol=1e-15)


@pytest.mark.parametrize("style", ["torch", "keras", "onnx"])
@pytest.mark.parametrize("nesterov", [False, True])
def test_gpu_sgd_infinite_gradient_gives_the_cpus_infinities(style, nesterov):
    """Momentum without Nesterov: p -= L v, without a 0 * g term (NaN for an
    infinite g, where torch gives -+inf); as on the CPU."""
    g = np.array([np.inf, -np.inf, 0.25])
    kw = dict(lr=0.1, momentum=0.9, nesterov=nesterov, style=style, step=2)
    pc, vc = np.array([1.0, 2.0, 3.0]), np.ones(3)
    pg, vg = cupy.asarray(pc), cupy.asarray(vc)
    bncore.sgd_step([pc], [g], [vc], **kw)
    bncore_gpu.sgd_step([pg], [cupy.asarray(g)], [vg], **kw)
    assert not np.isnan(pc[:2]).any()
    np.testing.assert_array_equal(cupy.asnumpy(pg), pc)
    np.testing.assert_array_equal(cupy.asnumpy(vg), vc)


@pytest.mark.parametrize("buffers", [True, False])
def test_gpu_onnx_momentum_at_alpha_zero_weights_the_gradient_by_beta(buffers):
    """ONNX Momentum at alpha = 0: V = beta G, X -= R V (not plain SGD), as on the CPU."""
    rng = np.random.default_rng(49)
    p, g = rng.standard_normal(5), rng.standard_normal(5)
    v = rng.standard_normal(5)
    kw = dict(lr=0.1, momentum=0.0, dampening=0.3, style="onnx", step=3)
    pc, vc = p.copy(), v.copy()
    bncore.sgd_step([pc], [g], [vc] if buffers else None, **kw)
    pg, vg = cupy.asarray(p), cupy.asarray(v)
    bncore_gpu.sgd_step([pg], [cupy.asarray(g)], [vg] if buffers else None, **kw)
    np.testing.assert_allclose(pc, p - 0.1 * 0.7 * g, rtol=1e-14)
    np.testing.assert_allclose(cupy.asnumpy(pg), pc, rtol=1e-15)
    np.testing.assert_allclose(cupy.asnumpy(vg), vc, rtol=1e-15)
    np.testing.assert_allclose(vc, 0.7 * g if buffers else v, rtol=1e-15)


@pytest.mark.parametrize("when", ["first step", "momentum switched on"])
def test_gpu_step_the_kernel_refuses_leaves_no_state_behind(when):
    """As on the CPU: state a refused step made (entries, buffers made on first
    use) is forgotten, so the next steps equal a fresh optimizer's."""
    p0 = np.array([1.0, 2.0, 3.0])
    grads = [np.array([0.5, -1.0, 2.0]), np.array([0.25, 1.0, -1.0])]
    p, q = cupy.asarray(p0), cupy.asarray(p0)
    opt, ref = (bncore_gpu.optim.SGD([a], lr=0.1, momentum=0.9, dampening=0.5) for a in (p, q))
    if when == "momentum switched on":
        for o in (opt, ref):
            o.param_groups[0]["momentum"] = 0.0
            o.step([cupy.asarray(grads[0])])
            o.param_groups[0]["momentum"] = 0.9
    keys = {i: set(s) for i, s in opt.state.items()}
    with pytest.raises(ValueError, match="shape"):
        opt.step([cupy.ones(4)])
    assert {i: set(s) for i, s in opt.state.items()} == keys
    for g in grads:
        opt.step([cupy.asarray(g)])
        ref.step([cupy.asarray(g)])
    np.testing.assert_array_equal(cupy.asnumpy(p), cupy.asnumpy(q))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "x"])
def test_gpu_step_that_raises_changes_nothing(bad):
    p = cupy.asarray(np.ones(4))
    opt = bncore_gpu.optim.Adam([p], lr=0.1)
    with pytest.raises((ValueError, TypeError), match="grad_scale"):
        opt.step([cupy.asarray(np.ones(4))], grad_scale=bad)
    assert opt.state == {}
    opt.step([cupy.asarray(np.ones(4))])
    ref = [np.ones(4)]
    bncore.optim.Adam(ref, lr=0.1).step([np.ones(4)])
    np.testing.assert_array_equal(cupy.asnumpy(p), ref[0])


def test_gpu_parameter_appended_to_a_group_starts_fresh():
    ps = [np.ones(3), np.ones(3)]
    gs = [np.full(3, 0.5), np.full(3, -0.25)]
    cpu = bncore.optim.Adam([ps[0].copy()], lr=0.1)
    dev = [cupy.asarray(p) for p in ps]
    gpu = bncore_gpu.optim.Adam([dev[0]], lr=0.1)
    cpu_p = cpu.param_groups[0]["params"]
    for _ in range(3):
        cpu.step([gs[0]])
        gpu.step([cupy.asarray(gs[0])])
    cpu_p.append(ps[1].copy())
    gpu.param_groups[0]["params"].append(dev[1])
    for _ in range(2):
        cpu.step(gs)
        gpu.step([cupy.asarray(g) for g in gs])
    for c, g in zip(cpu.param_groups[0]["params"], gpu.param_groups[0]["params"]):
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-15, atol=0)
    assert float(gpu.state[0]["step"]) == 5 and float(gpu.state[1]["step"]) == 2


@pytest.mark.parametrize("back", ["itself", "a new view of it"])
def test_gpu_parameter_taken_out_and_put_back_resumes_its_step_count(back):
    """Found by review: the removed parameter's state held the group's shared
    device counter, which went on counting while it was out (its bias
    correction came back at step 5 where the CPU and torch have 2). Put back
    as a new view of its memory (what a DLPack tensor becomes), it resumes too."""
    ps = [np.ones(3), np.ones(3) * 2.0]
    gs = [np.full(3, 0.5), np.full(3, -0.25)]
    cpu = bncore.optim.Adam([p.copy() for p in ps], lr=0.1)
    gpu = bncore_gpu.optim.Adam([cupy.asarray(p) for p in ps], lr=0.1)
    cpu.step(gs)
    gpu.step([cupy.asarray(g) for g in gs])
    out = [o.param_groups[0]["params"].pop(1) for o in (cpu, gpu)]
    for _ in range(3):
        cpu.step(gs[:1])
        gpu.step([cupy.asarray(gs[0])])
    if back != "itself":
        out = [a[...] for a in out]
    cpu.param_groups[0]["params"].append(out[0])
    gpu.param_groups[0]["params"].append(out[1])
    cpu.step(gs)
    gpu.step([cupy.asarray(g) for g in gs])
    assert float(gpu.state[1]["step"]) == cpu.state[1]["step"] == 2
    assert float(gpu.state[0]["step"]) == cpu.state[0]["step"] == 5
    for c, g in zip(cpu.param_groups[0]["params"], gpu.param_groups[0]["params"]):
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-15, atol=0)


def test_gpu_validation_cache_keeps_no_gradients_alive():
    import gc
    import weakref
    p = cupy.asarray(np.ones(8))
    opt = bncore_gpu.optim.SGD([p], lr=0.1)
    refs = []
    for _ in range(20):
        g = cupy.asarray(np.ones(8))
        refs.append(weakref.ref(g))
        opt.step([g])
        bncore_gpu.clip_grad_norm([g], 1.0)
        del g
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_gpu_num_threads_is_checked_as_on_the_cpu():
    g = [cupy.asarray(np.ones(3))]
    with pytest.raises(TypeError, match="num_threads"):
        bncore_gpu.clip_grad_norm(g, 1.0, num_threads=True)
    with pytest.raises(ValueError, match="num_threads"):
        bncore_gpu.sgd_step(g, [cupy.asarray(np.ones(3))], lr=0.1, num_threads=10 ** 6)


def test_gpu_parameter_moved_to_another_group_steps_once_per_step():
    """Parameters that started together share a device counter; one moved to
    another group must still count one step per step (it counted two)."""
    ps = [np.ones(3) * k for k in (1.0, 2.0, 3.0)]
    gs = [np.full(3, 0.1), np.full(3, -0.2), np.full(3, 0.3)]
    cpu = bncore.optim.Adam([{"params": [p.copy() for p in ps[:2]]},
                             {"params": [ps[2].copy()]}], lr=0.1)
    gpu = bncore_gpu.optim.Adam([{"params": [cupy.asarray(p) for p in ps[:2]]},
                                 {"params": [cupy.asarray(ps[2])]}], lr=0.1)
    for opt, conv in ((cpu, np.asarray), (gpu, cupy.asarray)):
        opt.step([conv(g) for g in gs])
        opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop())
        for _ in range(3):
            opt.step([conv(g) for g in (gs[0], gs[2], gs[1])])
    assert [float(gpu.state[i]["step"]) for i in range(3)] == [4, 4, 4]
    for c, g in zip(cpu._flat_params(), gpu._flat_params()):
        np.testing.assert_allclose(cupy.asnumpy(g), c, rtol=1e-15)


@pytest.mark.parametrize("device_found", [None, 0.0, 1.0])
def test_gpu_step_that_fails_in_its_kernel_call_leaves_the_count(device_found):
    """A shape error surfaces in the step function, after the device counter
    has moved (the kernel reads the count after the step): it is moved back."""
    p = cupy.asarray(np.ones(4))
    opt = bncore_gpu.optim.Adam([p], lr=0.1)
    opt.step([cupy.asarray(np.ones(4))])
    found = None if device_found is None else cupy.full((), device_found)
    with pytest.raises(ValueError, match="shape"):
        opt.step([cupy.asarray(np.ones(5))], found_inf=found)
    assert float(opt.state[0]["step"]) == 1.0


# ---- the cooperative rows kernels (bn_forward_rows_coop, bn_backward_rows_coop)

def _coop_or_skip(gbn, name="bn_forward_rows_coop<float>"):
    if not gbn.ROWS_COOP:
        pytest.skip("BNCORE_GPU_ROWS_COOP=0 in the environment")
    if gbn._coop_capacity(name) == 0:
        pytest.skip("no cooperative rows path on this GPU (compute capability "
                    f"{cupy.cuda.Device().compute_capability})")


def _nhwc_pair(rng, shape, dtype=np.float32):
    """x and dy of NCHW shape `shape` in channels-last memory, on the device."""
    x = np.ascontiguousarray(_offset_data(rng, shape).astype(dtype).transpose(0, 2, 3, 1))
    dy = np.ascontiguousarray(rng.standard_normal(x.shape).astype(dtype))
    return (cupy.asarray(x).transpose(0, 3, 1, 2), cupy.asarray(dy).transpose(0, 3, 1, 2),
            x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("shape, outlier", [((8, 64, 10, 12), False), ((3, 1024, 2, 2), False),
                                            ((5, 8, 7, 3), False), ((2, 2048, 3, 3), False),
                                            ((8, 64, 10, 12), True)])
@pytest.mark.parametrize("per_sm", [4, 1])
def test_rows_coop_kernels_give_the_three_kernel_results_bit_for_bit(monkeypatch, shape, outlier,
                                                                     per_sm):
    """A float32 channels-last training forward and backward take one cooperative
    launch each, and give bit for bit what the three kernels give (same tiles,
    same sums, same order), running statistics and parameter gradients
    included; with fewer blocks resident than tiles (per_sm 1 on the emulated
    device) each block loops over several tiles. outlier: every channel's first
    value (its pivot) far from its mean, so that the finalize phase sums every
    channel again (block-wide, with its own barriers). Also matches the CPU
    engine."""
    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    if getattr(cupy, "EMULATED", False):
        monkeypatch.setattr(cupy.cuda.driver, "OCCUPANCY", per_sm)
        monkeypatch.setattr(gbn, "_coop_blocks", {})
    elif per_sm != 4:
        pytest.skip("the resident-block count is the device's own on a real GPU")
    launched = []
    real = gbn._launch_coop

    def spy(name, blocks, args):
        launched.append((name, blocks))
        return real(name, blocks, args)

    monkeypatch.setattr(gbn, "_launch_coop", spy)
    rng = np.random.default_rng(41)
    xg, dyg, x, dy = _nhwc_pair(rng, shape)
    C = shape[1]
    if outlier:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        x[0, 0, 0, :] += 60 * x.std(axis=(0, 1, 2))
        xg = cupy.asarray(x).transpose(0, 3, 1, 2)
        x = x.transpose(0, 3, 1, 2)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-1, 1, C).astype(np.float32)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(gbn, "ROWS_COOP", on)
        launched.clear()
        rm, rv = cupy.zeros(C, cupy.float32), cupy.ones(C, cupy.float32)
        y, m, s = bncore_gpu.batch_norm_forward(xg, cupy.asarray(w), cupy.asarray(b), rm, rv)
        dx, dw, db = bncore_gpu.batch_norm_backward(dyg, xg, m, s, cupy.asarray(w))
        results[on] = [cupy.asnumpy(a) for a in (y, m, s, rm, rv, dx, dw, db)]
        assert y.strides == xg.strides and dx.strides == xg.strides
        names = [n for n, _ in launched]
        assert names == (["bn_forward_rows_coop<float>", "bn_backward_rows_coop<float>"]
                         if on else [])
        for name, blocks in launched:
            assert 1 <= blocks <= gbn._coop_capacity(name)
    for a, b_ in zip(results[True], results[False]):
        assert np.array_equal(a, b_)
    rm_c, rv_c = np.zeros(C, np.float32), np.ones(C, np.float32)
    y_c, m_c, s_c = bncore.batch_norm_forward(x, w, b, rm_c, rv_c)
    want = [y_c, m_c, s_c, rm_c, rv_c] + list(bncore.batch_norm_backward(dy, x, m_c, s_c, w))
    for got, exp in zip(results[True], want):
        assert rel(got, exp) <= 1e-6


def test_rows_coop_kernels_run_again_on_the_same_barrier_word():
    """The barrier word is kept per device and stream and reused by every
    launch: many launches in a row (each with two grid barriers) must neither
    hang nor change a result."""
    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    rng = np.random.default_rng(43)
    xg, dyg, _, _ = _nhwc_pair(rng, (16, 32, 6, 6))
    first = [cupy.asnumpy(a) for a in bncore_gpu.batch_norm_forward(xg)]
    for _ in range(50):
        again = bncore_gpu.batch_norm_forward(xg)
    bncore_gpu.batch_norm_backward(dyg, xg, again[1], again[2])
    for a, b_ in zip(first, bncore_gpu.batch_norm_forward(xg)):
        assert np.array_equal(a, cupy.asnumpy(b_))
    word = int(cupy.asnumpy(gbn._barrier_word())[0])
    assert word & 0x7FFFFFFF == 0          # no arrivals left over between launches


def _coop_launches_raise(monkeypatch, gbn, status, what):
    """From here on every cooperative launch raises what CuPy raises for CUDA
    error `status` (a RuntimeError carrying it); other kernels run. No device
    has refused one yet. Returns the exception type."""
    class CudaError(RuntimeError):
        pass

    CudaError.status = status
    real_kernel = gbn._kernel

    class Raising:                       # a Function object: its ptr, then the launch fails
        def __init__(self, fn):
            self.ptr = fn.ptr

        def __call__(self, *a, **kw):
            raise CudaError(f"{what} (simulated)")

    class Kernel:
        def __init__(self, k):
            self.k = k

        @property
        def kernel(self):
            return Raising(self.k.kernel)

    monkeypatch.setattr(gbn, "_kernel", lambda n: Kernel(real_kernel(n)) if "coop" in n
                        else real_kernel(n))
    monkeypatch.setattr(gbn, "_coop_refused", set())
    return CudaError


def test_a_refused_cooperative_launch_falls_back_to_three_kernels(monkeypatch):
    """A device that refuses the cooperative launch (a grid too large, no
    support) gets a warning once and the three kernels from then on, with the
    same results."""
    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    rng = np.random.default_rng(45)
    xg, dyg, x, dy = _nhwc_pair(rng, (4, 16, 5, 5))
    monkeypatch.setattr(gbn, "ROWS_COOP", False)
    want = bncore_gpu.batch_norm_forward(xg)
    monkeypatch.setattr(gbn, "ROWS_COOP", True)
    monkeypatch.setattr(gbn, "_coop_blocks", {})
    name = "bn_forward_rows_coop<float>"
    cap = gbn._coop_capacity(name)
    assert cap > 0
    _coop_launches_raise(monkeypatch, gbn, 720, "CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE")
    with pytest.warns(RuntimeWarning, match="using three kernels"):
        got = bncore_gpu.batch_norm_forward(xg)
    # refused once: no cooperative kernel on this device from then on, the
    # backward's included (one warning, not one per kernel)
    assert gbn._coop_capacity(name) == 0
    assert gbn._coop_capacity("bn_backward_rows_coop<float>") == 0
    for a, b_ in zip(got, want):
        assert np.array_equal(cupy.asnumpy(a), cupy.asnumpy(b_))


def test_a_cuda_fault_at_a_cooperative_launch_is_raised_not_hidden(monkeypatch):
    """Only a refusal (a grid too large, no support) means three kernels; any
    other CUDA error, such as a fault an earlier kernel left behind, propagates
    and leaves the cooperative path on."""
    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    rng = np.random.default_rng(46)
    xg = _nhwc_pair(rng, (4, 16, 5, 5))[0]
    fault = _coop_launches_raise(monkeypatch, gbn, 700, "CUDA_ERROR_ILLEGAL_ADDRESS")
    with pytest.raises(fault):
        bncore_gpu.batch_norm_forward(xg)
    assert gbn._coop_capacity("bn_forward_rows_coop<float>") > 0


def test_rows_coop_setting_names_itself_in_its_error():
    from bncore_gpu import batch_norm as gbn
    with pytest.raises(ValueError, match="BNCORE_GPU_ROWS_COOP must be 1 or 0"):
        gbn._switch_setting("maybe", "BNCORE_GPU_ROWS_COOP")
    assert gbn._switch_setting(" 0 ", "BNCORE_GPU_ROWS_COOP") is False


def test_rows_coop_barrier_words_are_per_host_thread():
    """Kernels sharing a barrier word must run one after another; a stream
    handle does not name one stream in every thread (the per-thread default
    stream), so each host thread has its own words."""
    import threading

    from bncore_gpu import batch_norm as gbn
    mine = gbn._barrier_word()
    assert gbn._barrier_word() is mine
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(gbn._barrier_word()))
    t.start()
    t.join()
    assert theirs[0] is not mine


@pytest.mark.parametrize("answer", ["capturing", "cannot say"])
def test_rows_coop_kernels_stay_out_of_cuda_graph_captures(monkeypatch, answer):
    """While the current stream captures a CUDA graph (or CUDA cannot say
    whether it does), a channels-last training forward and backward take the
    three kernels: a captured cooperative kernel would carry the stream's
    barrier word into a graph that may be replayed on any stream, and a new
    word's zeroing would only be recorded. No word is made for that stream;
    the results are the three kernels' own."""
    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    rng = np.random.default_rng(48)
    xg, dyg = _nhwc_pair(rng, (4, 16, 5, 5))[:2]
    monkeypatch.setattr(gbn, "ROWS_COOP", False)
    want = bncore_gpu.batch_norm_forward(xg)
    want += bncore_gpu.batch_norm_backward(dyg, xg, want[1], want[2])
    monkeypatch.setattr(gbn, "ROWS_COOP", True)
    real_stream = cupy.cuda.get_current_stream()

    class Capturing:                     # the current stream, as CUDA reports it
        ptr = real_stream.ptr

        def is_capturing(self):
            if answer == "cannot say":   # e.g. the legacy stream during a global capture
                raise RuntimeError("cudaErrorStreamCaptureImplicit (simulated)")
            return True

    launched = []
    real = gbn._launch_coop
    monkeypatch.setattr(gbn, "_launch_coop",
                        lambda name, blocks, args: launched.append(name) or real(name, blocks,
                                                                                  args))
    monkeypatch.setattr(gbn._barriers, "words", {})
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: Capturing())
    got = bncore_gpu.batch_norm_forward(xg)
    got += bncore_gpu.batch_norm_backward(dyg, xg, got[1], got[2])
    assert launched == [] and gbn._barriers.words == {}
    for a, b_ in zip(got, want):
        assert np.array_equal(cupy.asnumpy(a), cupy.asnumpy(b_))
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: real_stream)
    bncore_gpu.batch_norm_forward(xg)    # the capture over: one launch again
    assert launched == ["bn_forward_rows_coop<float>"]


def test_rows_coop_kernels_from_two_threads_at_once():
    """Two host threads each on their own stream (per-thread default streams
    where CuPy offers them) run channels-last training forwards at the same
    time, many times: every result equals the one computed alone."""
    import threading

    from bncore_gpu import batch_norm as gbn
    _coop_or_skip(gbn)
    rng = np.random.default_rng(47)
    # 16 row tiles: 16 blocks per launch, so that both threads' grids fit on
    # the device at once (a barrier word shared between them would then show)
    xs = [_nhwc_pair(rng, (1, 32, 4, 4))[0] for _ in range(2)]
    want = [cupy.asnumpy(bncore_gpu.batch_norm_forward(x)[0]) for x in xs]
    bad = []

    def work(i):
        ptds = getattr(cupy.cuda, "Stream", None)
        ctx = ptds.ptds if ptds is not None and hasattr(ptds, "ptds") else None
        for _ in range(30):
            if ctx is not None:
                with ctx:
                    y = bncore_gpu.batch_norm_forward(xs[i])[0]
                    ctx.synchronize()
            else:
                y = bncore_gpu.batch_norm_forward(xs[i])[0]
            if not np.array_equal(cupy.asnumpy(y), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a cooperative launch hung"
    assert not bad


def test_gpu_array_tables_notice_a_shape_set_in_place():
    """The validated tables are cached per list of arrays; an array whose shape
    is set in place after a step (p.shape = (2, 3)) is checked again, not
    refused against its old shape."""
    p = cupy.ones(6)
    bncore_gpu.sgd_step([p], [cupy.ones(6)], lr=0.1)
    p.shape = (2, 3)
    bncore_gpu.sgd_step([p], [cupy.ones((2, 3))], lr=0.1)
    np.testing.assert_allclose(cupy.asnumpy(p), np.full((2, 3), 0.8))


def test_gpu_array_tables_notice_a_middle_entry_swapped():
    """The validated lists and tables are cached under the list's length and
    its first and last entries: a list that differs only in between is checked
    again, entry by entry (a swapped-in array of another dtype, or one that is
    also a parameter, is refused), and a good swap updates the new array."""
    ps = [cupy.ones(4) for _ in range(3)]
    gs = [cupy.full(4, 0.5) for _ in range(3)]
    for _ in range(2):                                  # the second call is a hit
        bncore_gpu.sgd_step(ps, gs, lr=1.0)
    bad = [gs[0], cupy.ones(4, cupy.float32), gs[2]]
    with pytest.raises(TypeError, match=r"grads\[1\]"):
        bncore_gpu.sgd_step(ps, bad, lr=1.0)
    with pytest.raises(ValueError, match="share memory"):
        bncore_gpu.sgd_step(ps, [gs[0], ps[1], gs[2]], lr=1.0)
    q = cupy.full(4, 3.0)
    bncore_gpu.sgd_step([ps[0], q, ps[2]], gs, lr=1.0)
    np.testing.assert_array_equal(cupy.asnumpy(q), np.full(4, 2.5))
    np.testing.assert_array_equal(cupy.asnumpy(ps[1]), np.zeros(4))   # not stepped again
    np.testing.assert_array_equal(cupy.asnumpy(ps[0]), np.full(4, -0.5))


def _torch_on_device():
    """torch and the device its tensors share with CuPy: CUDA on a GPU, the
    CPU under the emulated device (whose arrays are host memory)."""
    torch = pytest.importorskip("torch")
    if getattr(cupy, "EMULATED", False):
        return torch, "cpu"
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    return torch, "cuda"


def test_gpu_array_tables_notice_a_torch_tensor_changed_in_place():
    """A torch tensor in a cached list can change its storage in place with the
    same address and shape: transposed (p.t_(): now Fortran-ordered against a
    C-ordered gradient) or viewed as another dtype. Each is checked again and
    refused as on a first call, not stepped through the old table."""
    torch, dev = _torch_on_device()
    p = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64, device=dev)
    g = cupy.asarray(np.array([[10.0, 20.0], [30.0, 40.0]]))
    bncore_gpu.sgd_step([p], [g], lr=0.0)              # checked and cached
    p.t_()
    with pytest.raises(ValueError, match="different order"):
        bncore_gpu.sgd_step([p], [g], lr=1.0)
    q = torch.ones(4, dtype=torch.float64, device=dev)
    bncore_gpu.sgd_step([q], [cupy.full(4, 0.5)], lr=1.0)
    q.data = q.data.view(torch.int64)
    with pytest.raises(TypeError, match="float32 or float64"):
        bncore_gpu.sgd_step([q], [cupy.full(4, 0.5)], lr=1.0)


def test_gpu_views_imported_through_dlpack_are_bounds_checked():
    """Two DLPack imports of one buffer are two wrappers (CuPy's DLPackMemory),
    not two allocations: a running mean written over the weight it reads is
    refused as for two views of one CuPy array, and nothing is written."""
    shared = cupy.arange(4.0)
    w, rm = (cupy.from_dlpack(_Exported(shared[k:k + 3])) for k in (0, 1))
    x = cupy.asarray(np.random.default_rng(1).standard_normal((5, 3)))
    with pytest.raises(ValueError, match="share memory"):
        bncore_gpu.batch_norm_forward(x, w, None, rm, cupy.ones(3))
    np.testing.assert_array_equal(cupy.asnumpy(shared), np.arange(4.0))
    apart = cupy.from_dlpack(_Exported(cupy.zeros(3)))          # another buffer: fine
    bncore_gpu.batch_norm_forward(x, w, None, apart, cupy.ones(3))


def test_gpu_views_of_one_torch_tensor_are_bounds_checked():
    """The same with torch: a weight and a running mean that are overlapping
    views of one tensor (each converted to a CuPy array of its own wrapper)
    are refused; views that do not overlap pass."""
    torch, dev = _torch_on_device()
    t = torch.arange(4.0, dtype=torch.float64, device=dev)
    x = cupy.asarray(np.random.default_rng(2).standard_normal((5, 3)))
    with pytest.raises(ValueError, match="share memory"):
        bncore_gpu.batch_norm_forward(x, t[:3], None, t[1:], cupy.ones(3))
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0]
    u = torch.zeros(6, dtype=torch.float64, device=dev)
    bncore_gpu.batch_norm_forward(x, u[:3], None, u[3:], cupy.ones(3))


def test_gpu_overlap_decisions_match_the_cpu():
    """The GPU's overlap test decides as the CPU's (NumPy's exact
    shares_memory): random 2-D slices of one buffer, with steps and reversed
    axes, share memory on the device exactly when the same slices of a host
    buffer do; interleaved ones that share no element among them."""
    from bncore_gpu import _checks as chk
    rng = np.random.default_rng(7)
    dev, host = cupy.zeros((8, 8)), np.zeros((8, 8))
    seen = {True: 0, False: 0}
    def axis_slice():
        # k >= 1 indices, step st, all within 0..7
        st = int(rng.choice([-3, -2, -1, 1, 2, 3]))
        k = int(rng.integers(1, 8 // abs(st) + 1))
        span = abs(st) * (k - 1)
        start = int(rng.integers(0, 8 - span)) + (span if st < 0 else 0)
        stop = start + st * k
        return slice(start, stop if stop >= 0 else None, st)

    for _ in range(400):
        cut = [(axis_slice(), axis_slice()) for _ in range(2)]
        want = bool(np.shares_memory(host[cut[0]], host[cut[1]]))
        assert chk._shares_memory(dev[cut[0]], dev[cut[1]]) == want, cut
        seen[want] += 1
    assert min(seen.values()) > 40, seen


def test_gpu_interleaved_columns_are_apart():
    """Running statistics that are the two columns of one (C, 2) buffer, CuPy's
    or a torch tensor's, share no element: accepted, as on the CPU, and
    updated as separate arrays would be."""
    x = cupy.asarray(np.random.default_rng(3).standard_normal((6, 3)))
    cols = cupy.zeros((3, 2))
    cols[:, 1] = 1.0
    rm, rv = cupy.zeros(3), cupy.ones(3)
    y = bncore_gpu.batch_norm_forward(x, running_mean=cols[:, 0], running_var=cols[:, 1])[0]
    y_apart = bncore_gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)[0]
    assert cupy.asnumpy(y).tobytes() == cupy.asnumpy(y_apart).tobytes()
    np.testing.assert_array_equal(cupy.asnumpy(cols[:, 0]), cupy.asnumpy(rm))
    np.testing.assert_array_equal(cupy.asnumpy(cols[:, 1]), cupy.asnumpy(rv))
    torch, dev = _torch_on_device()
    t = torch.zeros(3, 2, dtype=torch.float64, device=dev)
    t[:, 1] = 1.0
    bncore_gpu.batch_norm_forward(x, running_mean=t[:, 0], running_var=t[:, 1])
    np.testing.assert_array_equal(t[:, 0].cpu().numpy(), cupy.asnumpy(rm))


def test_gpu_array_tables_a_list_read_then_written():
    """One list checked for a read (a repeated entry is fine) and then for a
    write (it is not: the update would apply twice) is refused the second
    time; the cached check of the read must not answer for the write."""
    g = cupy.full(4, 3.0)
    grads = [g, g]
    assert float(bncore_gpu.grad_norm(grads)) == pytest.approx(np.sqrt(8 * 9.0))
    with pytest.raises(ValueError, match="share memory"):
        bncore_gpu.clip_grad_value(grads, 1.0)
    np.testing.assert_array_equal(cupy.asnumpy(g), np.full(4, 3.0))


def test_gpu_array_tables_under_threads():
    """Threads stepping lists of their own share the validation caches: each
    look-up and its recency update happen under one lock (another thread's
    eviction in between raised KeyError)."""
    import sys
    import threading
    errors = []

    def work():
        sets = [([cupy.ones(4) for _ in range(2)], [cupy.full(4, 0.5) for _ in range(2)])
                for _ in range(6)]
        try:
            for it in range(400):
                ps, gs = sets[it % 6]
                bncore_gpu.sgd_step(ps, gs, lr=0.0)
        except Exception as exc:          # noqa: BLE001 - reported below
            errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)           # switch threads as often as possible
    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_more_channels_than_a_grid_y_holds(dtype, monkeypatch):
    """70000 channels in the planes layout (a trailing size of 32): the planes
    reductions take the channels on the grid's x axis, so training forward and
    backward run (with channels on y, whose limit is 65535, they had to refuse)
    and match the CPU engine. Cluster kernels off, so the planes kernels run."""
    from bncore_gpu import batch_norm as gbn
    monkeypatch.setattr(gbn, "CLUSTER_KERNELS", False)
    rng = np.random.default_rng(5)
    C = 70000
    shape = (2, C, 32)
    x = (rng.uniform(-100, 100, (1, C, 1)) + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    y, m, s = bncore_gpu.batch_norm_forward(cupy.asarray(x))
    dx, dw, db = bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), m, s)
    y_c, m_c, s_c = bncore.batch_norm_forward(x)
    want = (y_c, m_c, s_c) + tuple(bncore.batch_norm_backward(dy, x, m_c, s_c))
    for got, exp in zip((y, m, s, dx, dw, db), want):
        assert rel(cupy.asnumpy(got), exp) <= 1e-6


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_float32_subnormals_are_not_flushed(layout):
    """CuPy compiles with -ftz=true, under which a float <-> double cast
    flushes: subnormal float32 data read as 0 and subnormal results stored as
    0. The kernels convert through f2d / d2f (PTX without .ftz), so
    subnormal inputs and outputs are what the CPU engine gives (to a
    subnormal ulp or two where the two formulas' float64 values differ)."""
    rng = np.random.default_rng(11)
    tiny = np.float32(1e-39)                       # below 2^-126 = 1.18e-38
    x = (rng.standard_normal((4, 3, 5, 5)) * tiny).astype(np.float32)
    assert np.all(np.abs(x[x != 0]) < np.finfo(np.float32).tiny)
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gx = cupy.asarray(x) if layout == "nchw" else cupy.asarray(
        np.ascontiguousarray(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    # statistics of subnormal data: y = (x - mean) / sqrt(var + eps), about
    # 300 x (eps dominates), mostly normal floats; flushed inputs would give 0
    y, m, s = bncore_gpu.batch_norm_forward(gx)
    y_c, m_c, s_c = bncore.batch_norm_forward(x)
    assert np.abs(y_c).max() > 10 * np.finfo(np.float32).tiny
    assert rel(cupy.asnumpy(y), y_c) <= 1e-6
    # outputs below 2^-126: the same times a weight of 1e-3
    w = np.full(3, 1e-3, np.float32)
    y2 = bncore_gpu.batch_norm_forward(gx, cupy.asarray(w))[0]
    y2_c = bncore.batch_norm_forward(x, w)[0]
    sub = np.finfo(np.float32).smallest_subnormal
    assert np.count_nonzero((y2_c != 0) & (np.abs(y2_c) < np.finfo(np.float32).tiny)) > 10
    assert np.count_nonzero(cupy.asnumpy(y2)) > 0
    np.testing.assert_allclose(cupy.asnumpy(y2), y2_c, rtol=0, atol=2 * sub)
    # optimizers and norms of subnormal float32 gradients
    g = (rng.standard_normal(1000) * tiny).astype(np.float32)
    assert float(bncore_gpu.grad_norm([cupy.asarray(g)])) == pytest.approx(
        bncore.grad_norm([g]), rel=1e-12)
    p, gp = np.zeros(1000, np.float32), cupy.zeros(1000, cupy.float32)
    bncore.sgd_step([p], [g], lr=1.0)
    bncore_gpu.sgd_step([gp], [cupy.asarray(g)], lr=1.0)
    assert np.count_nonzero(p) > 0 and np.array_equal(cupy.asnumpy(gp), p)


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, np.inf])
def test_gpu_gradients_of_several_dtypes_match_the_cpu(p):
    """One list of float32, float64 and float16 gradients: one table per
    dtype, combined on the device; norm, clipping, clamping and the
    non-finite flag as the CPU gives them."""
    rng = np.random.default_rng(12)
    g = [rng.standard_normal(5).astype(np.float32), rng.standard_normal(40000),
         (rng.standard_normal(3) * 4).astype(np.float16)]
    dev = [cupy.asarray(a) for a in g]
    assert float(bncore_gpu.grad_norm(dev, norm_type=p)) == pytest.approx(
        bncore.grad_norm(g, norm_type=p), rel=1e-12)
    host = [a.copy() for a in g]
    total = bncore_gpu.clip_grad_norm(dev, 1.0, norm_type=p)
    assert float(total) == pytest.approx(bncore.clip_grad_norm(host, 1.0, norm_type=p), rel=1e-12)
    for d, h in zip(dev, host):
        assert d.dtype == h.dtype
        np.testing.assert_allclose(cupy.asnumpy(d).astype(np.float64), h, rtol=2e-3 if
                                   h.dtype == np.float16 else 1e-6)
    dev = [cupy.asarray(a) for a in g]
    host = [a.copy() for a in g]
    bncore_gpu.clip_grad_value(dev, 0.01)
    bncore.clip_grad_value(host, 0.01)
    for d, h in zip(dev, host):
        assert cupy.asnumpy(d).tobytes() == h.tobytes()      # clamped to the bound's rounding
    assert float(bncore_gpu.found_inf(dev)) == 0.0
    dev[2][1] = np.inf
    assert float(bncore_gpu.found_inf(dev)) == 1.0
    with pytest.raises(TypeError, match=r"grads\[3\]"):
        bncore_gpu.grad_norm(dev + [cupy.ones(3, cupy.int32)])


@pytest.mark.parametrize("other", ["stream", "thread"])
def test_gpu_kernel_tables_are_uploaded_per_stream(other):
    """The uploaded pointer tables are cached per stream: a table dropped from
    the cache returns to its stream's memory pool, which may reuse it at once,
    so a kernel of another stream must never read a table made on this one.
    "thread": under CuPy's per-thread default stream every thread's stream has
    one handle but runs beside the others, so each thread gets its own table."""
    import contextlib
    import threading
    from bncore_gpu import _tables
    ptds = getattr(cupy.cuda.Stream, "ptds", None)
    if other == "thread" and ptds is None:
        pytest.skip("this CuPy has no per-thread default stream")
    _tables.clear_caches()
    p, g = cupy.ones(6), cupy.ones(6)

    def step(stream=ptds if other == "thread" else None):
        with stream if stream is not None else contextlib.nullcontext():
            bncore_gpu.sgd_step([p], [g], lr=0.1)
            cupy.cuda.Device().synchronize()

    step()
    n = len(_tables._cache)
    assert n == 1
    step()                                                   # the same stream: a hit
    assert len(_tables._cache) == n
    if other == "stream":
        step(cupy.cuda.Stream(non_blocking=True))            # another stream: its own table
    else:
        worker = threading.Thread(target=step)               # another thread: its own table
        worker.start()
        worker.join()
    assert len(_tables._cache) == n + 1
    np.testing.assert_allclose(cupy.asnumpy(p), np.full(6, 0.7))


def _fast_args_pools(C=3):
    """Arguments for the batch-norm checks, usual and not: each pool's first
    entries are the usual kind, the rest each break one rule of the fast path."""
    x = cupy.asarray(np.random.default_rng(0).standard_normal((4, C, 2, 2)))
    buf = cupy.zeros(4 * C)
    fresh = lambda dt=np.float64: cupy.ones(C, dt)          # noqa: E731
    # float64 data one byte off its element boundary, and views of one buffer
    # imported through DLPack (memory CuPy did not allocate)
    raw = cupy.zeros(8 * (x.size + C) + 1, np.uint8)[1:]
    odd = raw[:8 * x.size].view(np.float64).reshape(x.shape)
    odd_vector = raw[8 * x.size:].view(np.float64)
    shared = cupy.zeros(2 * C)
    imported = [cupy.from_dlpack(_Exported(shared[k:k + C])) for k in (0, 1)]
    # (x[:1, :, :1, :1]: one value per channel, which training refuses)
    xs = [x, x.astype(np.float32), x.astype(np.float16),
          cupy.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2),
          x[:1, :, :1, :1], x.reshape(4, C * 4)[:, :C], x[:, :, :1, :1], x[::2],
          x.astype(np.int32), cupy.asarray(np.float64(1.0)), x.get(), x[:, :0],
          cupy.ones(C), odd]
    # (broadcast_to: every element at one address, which an output may not be)
    vectors = [None, fresh(), fresh(np.float32), fresh(np.float16), buf[:C], buf[C:2 * C],
               buf[::4][:C], cupy.broadcast_to(cupy.zeros(1), (C,)), cupy.ones((1, C)),
               cupy.ones(C + 1), cupy.ones(C, np.int32), x.reshape(-1)[:C], fresh().get(),
               odd_vector] + imported
    return xs, vectors


class _Exported:
    """A foreign array: any object that hands its memory over through DLPack."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, *args, **kw):
        return self.a.__dlpack__(*args, **kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


@pytest.mark.parametrize("seed", range(4))
def test_gpu_fast_batch_norm_checks_return_the_general_result(seed):
    """bncore_gpu._bn_args_fast answers the usual call with exactly what the
    general checks (bncore._bn_args) return, and declines (None) everything
    else, also every call that the general checks refuse; over drawn mixes
    of usual and unusual arguments."""
    from bncore._bn_args import backward_args, forward_args
    from bncore_gpu import _bn_args_fast as fast
    from bncore_gpu import _checks as chk
    rng = np.random.default_rng(seed)
    xs, vectors = _fast_args_pools()
    # (pool, how many of its first entries are usual): usual ones 85% of the time
    pools = {"x": (xs, 5), "v": (vectors, 4), "flag": ([True, False, 1, np.bool_(True), "yes"], 2),
             "momentum": ([0.1, 0.0, 1.0, 1.5, -1.0, float("nan"), 1, np.float64(0.1)], 3),
             "eps": ([1e-5, 0.5, 0.0, -1.0, float("inf"), float("nan"), 1], 2),
             "axis": ([1, -3, 0, 3, 4, True, 1.0], 2)}

    def pick(kind):
        pool, usual = pools[kind]
        return pool[rng.integers(usual if rng.random() < 0.85 else len(pool))]

    taken = 0
    for _ in range(400):
        x, axis = pick("x"), pick("axis")
        w, b, rm, rv = (pick("v") for _ in range(4))
        if rng.random() < 0.1:
            rm = rv                                     # one array as both statistics
        training, momentum, eps = pick("flag"), pick("momentum"), pick("eps")
        out = None if rng.random() < 0.9 else cupy.empty_like(x)
        nt = None if rng.random() < 0.85 else [1, 2, 10 ** 6, 0, True][rng.integers(5)]
        call = (x, w, b, rm, rv, training, momentum, eps, axis, out, nt)
        dy = x if rng.random() < 0.7 else pick("x")
        mean, invstd = pick("v"), pick("v")
        for fast_check, general, args in (
                (fast.forward_args, forward_args, call),
                (fast.backward_args, backward_args, (dy, x, mean, invstd, w, training, axis,
                                                     out, nt))):
            got = fast_check(*args)
            try:
                want = general(chk, *args)
            except (TypeError, ValueError):
                assert got is None, args
                continue
            if got is not None:
                taken += 1
                assert len(got) == len(want)
                for g, w_ in zip(got, want):
                    assert g is w_ if not isinstance(g, (int, float)) else (
                        type(g) is type(w_) and g == w_)
    assert taken >= 40, taken          # the draws reach the fast path, not only refusals


def test_gpu_usual_batch_norm_calls_take_the_fast_checks():
    """The fast checks accept the calls they are for (NCHW, channels-last and
    2-D, every float dtype, training with and without running statistics,
    inference) and decline views of one buffer written in place."""
    from bncore_gpu import _bn_args_fast as fast
    C = 5
    for dt in (np.float16, np.float32, np.float64):
        x = cupy.ones((4, C, 3, 3), dt)
        cl = cupy.ones((4, 3, 3, C), dt).transpose(0, 3, 1, 2)
        for xx in (x, cl, cupy.ones((8, C), dt)):
            w, b = cupy.ones(C, dt), cupy.zeros(C, dt)
            rm, rv = cupy.zeros(C, np.float32), cupy.ones(C, np.float32)
            assert fast.forward_args(xx, w, b, rm, rv, True, 0.1, 1e-5, 1, None, None)
            assert fast.forward_args(xx, None, None, None, None, True, 0.1, 1e-5, 1, None, None)
            assert fast.forward_args(xx, w, b, rm, rv, False, 0.1, 1e-5, 1, None, None)
            m, s = cupy.zeros(C), cupy.ones(C)
            assert fast.backward_args(xx, xx, m, s, w, True, 1, None, None)
            assert fast.backward_args(xx, xx, m, s, None, False, 1, None, None)
    buf = cupy.zeros(2 * C)
    x = cupy.ones((4, C))
    assert fast.forward_args(x, None, None, buf[:C], buf[C:], True, 0.1, 1e-5, 1, None,
                             None) is None
    assert fast.forward_args(x, None, None, buf[:C], buf[C:], False, 0.1, 1e-5, 1, None,
                             None)                   # (read only in inference)
    # each declined, and each refused by the general checks: a 1-D x; a running
    # mean imported through DLPack over the weight's memory
    w, rv = cupy.ones(C), cupy.ones(C)
    assert fast.forward_args(cupy.ones(C), None, None, w, rv, False, 0.1, 1e-5, 0, None,
                             None) is None
    rm = cupy.from_dlpack(_Exported(w))
    assert fast.forward_args(x, w, None, rm, rv, True, 0.1, 1e-5, 1, None, None) is None
    with pytest.raises(ValueError, match="share memory"):
        bncore_gpu.batch_norm_forward(x, w, None, rm, rv)


@pytest.mark.parametrize("wdtype", [np.float32, None])
def test_float16_parameter_gradient_outputs_are_rounded_once_as_on_the_cpu(wdtype):
    """Found in review: with a float32 weight (or none, float32 x) and float16
    out= for dweight/dbias, the kernel stored float32 and the float16 store
    rounded again: dbias 1 + 2^-11 + 2^-30 came back 1.0, the CPU's 1.001."""
    x = np.array([[0.0], [1.0]], np.float32)
    dy = np.array([[1.0], [2.0 ** -11 + 2.0 ** -30]], np.float32)
    w = None if wdtype is None else np.ones(1, wdtype)
    mean, invstd = np.zeros(1), np.ones(1)
    dw_c, db_c = np.zeros(1, np.float16), np.zeros(1, np.float16)
    bncore.batch_norm_backward(dy, x, mean, invstd, w, training=False, out=(None, dw_c, db_c))
    dw_g, db_g = cupy.zeros(1, np.float16), cupy.zeros(1, np.float16)
    bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x), cupy.asarray(mean),
                                   cupy.asarray(invstd),
                                   None if w is None else cupy.asarray(w), training=False,
                                   out=(None, dw_g, db_g))
    assert db_c[0] == np.float16(1 + 2.0 ** -11 + 2.0 ** -30) != np.float16(1.0)
    assert cupy.asnumpy(db_g).tobytes() == db_c.tobytes()
    assert cupy.asnumpy(dw_g).tobytes() == dw_c.tobytes()


def test_an_empty_array_passed_twice_shares_nothing_as_on_the_cpu():
    """Found in review: the GPU refused the same empty array in two roles
    ("share memory"), where NumPy's rule (the CPU's) says an empty array
    overlaps nothing."""
    for xp, mod in ((np, bncore), (cupy, bncore_gpu)):
        x = xp.ones((4, 0))
        r = xp.zeros(0)
        y, _, _ = mod.batch_norm_forward(x, None, None, r, r)      # C == 0, one array twice
        assert y.shape == (4, 0)
        e = xp.ones((0, 3))
        rm, rv = xp.zeros(3), xp.ones(3)
        y, _, _ = mod.batch_norm_forward(e, None, None, rm, rv, training=False, out=e)
        assert y.shape == (0, 3)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "2D"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("one_launch", [True, False])
def test_inference_dx_is_g_dy_whatever_x_holds(layout, dtype, one_launch, monkeypatch):
    """Found in review (CPU, and the same formula here): inference dx =
    weight * invstd * dy, but the kernels formed g ((dy - 0) - (x - mean) 0),
    NaN where x is Inf or NaN. The one-launch kernels (cluster, rows) where
    they apply, and the three kernels (planes and rows, float4 and scalar),
    must give the CPU's g dy."""
    from bncore_gpu import batch_norm as gbn
    if not one_launch:
        monkeypatch.setattr(gbn, "CLUSTER_KERNELS", False)
        monkeypatch.setattr(gbn, "ROWS_COOP", False)
    rng = np.random.default_rng(8)
    shape = {"NCHW": (4, 8, 8, 8), "NHWC": (4, 8, 4, 4), "2D": (16, 8)}[layout]
    x = rng.standard_normal(shape).astype(dtype)
    x.reshape(-1)[::5] = np.inf
    x.reshape(-1)[2::7] = np.nan
    dy = rng.standard_normal(shape).astype(dtype)
    if layout == "NHWC":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    w = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    mean, invstd = rng.standard_normal(8), rng.uniform(0.5, 2.0, 8)
    want, _, _ = bncore.batch_norm_backward(dy, x, mean, invstd, w, training=False)
    assert np.isfinite(want).all()
    got, _, _ = bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x),
                                               cupy.asarray(mean), cupy.asarray(invstd),
                                               cupy.asarray(w), training=False)
    assert cupy.asnumpy(got).tobytes() == want.tobytes()


@pytest.mark.parametrize("one_launch", [True, False])
def test_training_dx_zero_signs_match_the_cpu(one_launch, monkeypatch):
    """Review of the inference fix: dropping dx's x term wherever k was 0 also
    changed training's zero signs (dy all -0 gives k = 0); the GPU now computes
    the training formula as the CPU does, and g dy in inference only."""
    from bncore_gpu import batch_norm as gbn
    if not one_launch:
        monkeypatch.setattr(gbn, "CLUSTER_KERNELS", False)
        monkeypatch.setattr(gbn, "ROWS_COOP", False)
    x = np.array([[1.0, 2.0], [3.0, 1.0], [0.5, 4.0], [2.0, 0.0]], np.float32)
    dy = np.full((4, 2), -0.0, np.float32)
    _, m, s = bncore.batch_norm_forward(x)
    want, _, _ = bncore.batch_norm_backward(dy, x, m, s)
    got, _, _ = bncore_gpu.batch_norm_backward(cupy.asarray(dy), cupy.asarray(x),
                                               cupy.asarray(m), cupy.asarray(s))
    assert np.signbit(want).any() and not np.signbit(want).all()
    assert cupy.asnumpy(got).tobytes() == want.tobytes()


@pytest.mark.parametrize("call", [
    lambda m, xp: m.sgd_step([xp.ones(3)], [xp.ones(3)], lr=-1.0, num_threads=1.5),
    lambda m, xp: m.adam_step([xp.ones(3)], [xp.ones(3)], [xp.zeros(3)], [xp.zeros(3)], step=1,
                              beta1=1.5, num_threads=1.5),
    lambda m, xp: m.adagrad_step([xp.ones(3)], [xp.ones(3)], [xp.zeros(3)], step=0,
                                 num_threads=1.5),
    lambda m, xp: m.rmsprop_step([xp.ones(3)], [xp.ones(3)], [xp.zeros(3)], alpha=2.0,
                                 num_threads=1.5),
    lambda m, xp: m.clip_grad_norm([xp.ones(3)], -1.0, num_threads=1.5),
    lambda m, xp: m.grad_norm([xp.ones(3)], -1.0, num_threads=1.5),
    lambda m, xp: m.clip_grad_value([xp.ones(3)], float("nan"), num_threads=1.5),
])
def test_two_bad_arguments_raise_the_cpus_error(call):
    """Found in review: the GPU checked num_threads first, so a call with two
    bad arguments raised TypeError (num_threads) where the CPU raised the
    other argument's ValueError."""
    errors = []
    for mod, xp in ((bncore, np), (bncore_gpu, cupy)):
        with pytest.raises((TypeError, ValueError)) as info:
            call(mod, xp)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]


def test_gpu_parameters_in_any_dense_axis_order_step_in_place():
    """As on the CPU: arrays that fill one block of memory in another axis order
    (channels-last conv weights, transposes) are stepped in place, gradients
    and state in the same order; a different order or a gapped view is refused."""
    rng = np.random.default_rng(3)
    p_host = rng.standard_normal((4, 5, 6)).transpose(2, 0, 1)
    g_host = rng.standard_normal((4, 5, 6)).transpose(2, 0, 1)
    p = cupy.asarray(rng.standard_normal((4, 5, 6))).transpose(2, 0, 1)
    p[...] = cupy.asarray(p_host)
    g = cupy.asarray(rng.standard_normal((4, 5, 6))).transpose(2, 0, 1)
    g[...] = cupy.asarray(g_host)
    assert not (p.flags.c_contiguous or p.flags.f_contiguous)
    bncore_gpu.sgd_step([p], [g], lr=0.1)
    want = p_host.copy()
    bncore.sgd_step([want], [g_host.copy()], lr=0.1)
    np.testing.assert_array_equal(cupy.asnumpy(p), want)
    with pytest.raises(ValueError, match="different order"):
        bncore_gpu.sgd_step([p], [cupy.ascontiguousarray(g)], lr=0.1)
    with pytest.raises(ValueError, match="not contiguous"):
        bncore_gpu.sgd_step([p[::2]], [g[::2]], lr=0.1)


def test_gpu_written_torch_tensors_tell_autograd():
    """As on the CPU: a torch tensor bncore_gpu writes gets its version counter
    bumped, so a backward through a graph that saved it raises instead of
    using the new values."""
    torch, dev = _torch_on_device()
    w = torch.nn.Parameter(torch.ones(3, device=dev))
    x = torch.tensor([1.0, 2.0, 3.0], device=dev, requires_grad=True)
    y = (x * w).sum()
    bncore_gpu.sgd_step([w.detach()], [cupy.ones(3, dtype=cupy.float32)], lr=0.5)
    assert w._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    g = torch.ones(3, device=dev)
    bncore_gpu.grad_norm([g])
    rm = torch.zeros(3, dtype=torch.float64, device=dev)
    rv = torch.ones(3, dtype=torch.float64, device=dev)
    bncore_gpu.batch_norm_forward(cupy.asarray(np.random.default_rng(0).standard_normal((8, 3))),
                                  running_mean=rm, running_var=rv)
    assert g._version == 0 and rm._version > 0 and rv._version > 0


def test_gpu_empty_arrays_of_any_strides_pair_as_on_the_cpu():
    """Review: an empty gradient whose strides differ from its empty parameter's
    was refused on the GPU ("different order"), accepted on the CPU and before."""
    p = cupy.zeros((2, 3), dtype=cupy.float32)[:0]
    g = cupy.zeros((3, 2), dtype=cupy.float32).T[:0]
    assert p.shape == g.shape == (0, 3) and p.strides != g.strides
    bncore_gpu.sgd_step([p], [g], lr=0.1)
    bncore.sgd_step([np.zeros((2, 3), np.float32)[:0]], [np.zeros((3, 2), np.float32).T[:0]],
                    lr=0.1)


def test_gpu_refuses_to_write_torch_inference_tensors_outside_inference_mode():
    """As the CPU: torch refuses in-place updates of inference tensors outside
    inference mode; CuPy views carry no read-only flag, so bncore_gpu asks."""
    torch, dev = _torch_on_device()
    with torch.inference_mode():
        p = torch.ones(3, device=dev)
        rm = torch.zeros(3, dtype=torch.float64, device=dev)
        rv = torch.ones(3, dtype=torch.float64, device=dev)
    with pytest.raises(ValueError, match=r"params\[0\] is read-only.*inference"):
        bncore_gpu.sgd_step([p], [cupy.ones(3, dtype=cupy.float32)], lr=0.5)
    x = cupy.asarray(np.random.default_rng(0).standard_normal((8, 3)))
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bncore_gpu.batch_norm_forward(x, running_mean=rm, running_var=rv)
    assert torch.equal(p, torch.ones(3, device=dev))
    bncore_gpu.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)  # read
    with torch.inference_mode():
        bncore_gpu.sgd_step([p], [cupy.ones(3, dtype=cupy.float32)], lr=0.5)
    assert torch.equal(p, torch.full((3,), 0.5, device=dev))


def test_gpu_refuses_inference_backward_outputs_where_and_as_the_cpu_does():
    """CuPy views carry no read-only flag, so the GPU asks the torch tensor
    behind a written output, inside the argument checks where the CPU tests its
    read-only view: the same argument named, first (reviews: the GPU said 'out'
    or 'out[1]', checked after every shape, then before dy's)."""
    torch, dev = _torch_on_device()
    xh = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    with torch.inference_mode():
        dx_c, dw_c = torch.zeros((4, 3, 5)), torch.zeros(3)
        dx_d, dw_d = torch.zeros((4, 3, 5), device=dev), torch.zeros(3, device=dev)
    cases = [  # (dy rows, out on the CPU, out on the device)
        (4, dx_c, dx_d),
        (4, (dx_c, np.zeros(4, np.float32), None), (dx_d, cupy.zeros(4, cupy.float32), None)),
        (4, (np.zeros_like(xh), dw_c, None), (cupy.zeros(xh.shape, cupy.float32), dw_d, None)),
        (2, dx_c, dx_d),                                            # dy's shape first
        (4, (np.zeros((2, 3, 5), np.float32), dw_c, None),          # out[0]'s shape first
         (cupy.zeros((2, 3, 5), cupy.float32), dw_d, None)),
        (4, [dx_c, dw_c], [dx_d, dw_d]),                            # not a 3-tuple
    ]
    for rows, out_c, out_d in cases:
        with pytest.raises(ValueError) as cpu:
            bncore.batch_norm_backward(xh[:rows], xh, np.zeros(3), np.ones(3), out=out_c)
        x = cupy.asarray(xh)
        with pytest.raises(ValueError) as gpu:
            bncore_gpu.batch_norm_backward(x[:rows], x, cupy.zeros(3), cupy.ones(3), out=out_d)
        assert str(gpu.value) == str(cpu.value)
    assert "out[0] (dx) is read-only" in str(_raised(
        lambda: bncore_gpu.batch_norm_backward(x, x, cupy.zeros(3), cupy.ones(3), out=dx_d)))
    assert not dx_d.any() and not dw_d.any()


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def test_centered_rmsprop_clamps_a_rounded_negative_variance_as_the_cpu():
    """Tiny float32 gradients (s underflows, a does not): d = s - a^2 rounds
    negative; clamped at 0 on both backends, the same p (without it p went
    NaN), and the state as close as fused multiply-adds leave it (ga cancels,
    where a fused and an unfused a*ga + b*g differ by more than an ulp)."""
    for alpha, scale in ((0.99, 1e-25), (0.9, 1e-23)):
        out = []
        for module, xp in ((bncore, np), (bncore_gpu, cupy)):
            p, sq, ga = (xp.asarray(v) for v in (np.ones(3000, np.float32),
                                                 np.zeros(3000, np.float32),
                                                 np.zeros(3000, np.float32)))
            gen = np.random.default_rng(7)
            for _ in range(4):
                g = xp.asarray((scale * gen.standard_normal(3000)).astype(np.float32))
                module.rmsprop_step([p], [g], [sq], grad_avgs=[ga], lr=1e-2, alpha=alpha,
                                    centered=True)
            out.append([cupy.asnumpy(v) if xp is cupy else v for v in (p, sq, ga)])
        assert np.isfinite(out[0][0]).all() and np.isfinite(out[1][0]).all()
        np.testing.assert_array_max_ulp(out[1][0], out[0][0], maxulp=1)
        for c, d in zip(out[0][1:], out[1][1:]):
            assert rel(d, c) < 1e-6


def test_parameters_without_gradients_are_skipped_as_on_the_cpu():
    """None gradients: the device classes skip those parameters as the CPU's do
    (no state, no count), through fresh state, several counters, a skipped
    step and a bad gradient elsewhere."""
    rng = np.random.default_rng(8)
    starts = [rng.standard_normal(3), rng.standard_normal((2, 2)), rng.standard_normal(4)]
    pattern = [[1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 1, 1], [1, 1, 1]]
    grads = [[rng.standard_normal(p.shape) for p in starts] for _ in pattern]
    for name in ("Adam", "SGD", "RMSprop"):
        kw = dict(lr=0.1, weight_decay=0.1, **({"momentum": 0.9} if name != "Adam" else {}))
        out, states = [], []
        for module, xp in ((bncore, np), (bncore_gpu, cupy)):
            ps = [xp.asarray(p.copy()) for p in starts]
            opt = getattr(module.optim, name)(ps, **kw)
            for k, (on, g) in enumerate(zip(pattern, grads)):
                gs = [xp.asarray(gi) if o else None for gi, o in zip(g, on)]
                opt.step(gs, found_inf=True if k == 1 else None)     # step 1 skipped
            out.append([cupy.asnumpy(p) if xp is cupy else p for p in ps])
            states.append(sorted(opt.state))
        assert states[0] == states[1] == [0, 1, 2]
        for c, d in zip(*out):
            np.testing.assert_allclose(d, c, rtol=1e-13, atol=1e-15)
    opt = bncore_gpu.optim.Adam([cupy.ones(3), cupy.ones(2)], lr=0.1)
    opt.step([cupy.ones(3), None])
    assert sorted(opt.state) == [0]
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\)"):
        opt.step([None, cupy.ones(5)])


def test_clipping_leaves_out_missing_gradients_as_the_cpu():
    """None among the gradients is left out of the norm and of the clipping on
    the device as on the CPU (torch's .grad of None)."""
    host = [np.ones(3), None, np.full(2, 2.0)]
    dev = [cupy.asarray(np.ones(3)), None, cupy.asarray(np.full(2, 2.0))]
    assert float(bncore_gpu.grad_norm(dev)) == bncore.grad_norm(host)
    assert float(bncore_gpu.clip_grad_norm(dev, 1.0)) == bncore.clip_grad_norm(host, 1.0)
    for c, d in zip(host, dev):
        assert (c is None and d is None) or np.array_equal(cupy.asnumpy(d), c)
    assert not bool(bncore_gpu.found_inf(dev))
    with pytest.raises(TypeError, match=r"grads\[2\]"):
        bncore_gpu.grad_norm([cupy.ones(3), None, cupy.ones(2, dtype=cupy.int32)])


def test_layer_resets_in_place_on_the_device():
    """BatchNorm.reset_running_stats() / reset_parameters() on CuPy arrays."""
    bn = bncore_gpu.BatchNorm(3)
    rm = bn.running_mean
    bn.forward(cupy.asarray(np.random.default_rng(1).standard_normal((6, 3)) + 4))
    bn.weight[:] = 3.0
    bn.reset_parameters()
    assert bn.running_mean is rm and float(rm.sum()) == 0.0
    assert float(bn.running_var.min()) == 1.0 and float(bn.weight.max()) == 1.0
    assert bn.num_batches_tracked == 0

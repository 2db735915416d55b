"""bncore_gpu on torch CUDA tensors: taken zero-copy (through
``__cuda_array_interface__`` / DLPack), updated in place, same results as on
CuPy arrays; a tensor that requires grad or lives on the CPU is refused with
the fix in the message. Needs a GPU and torch built with CUDA; skipped (with
the reason) otherwise. scripts/gpu_check.sh runs it on a GPU machine."""
import numpy as np
import pytest

try:
    import cupy
    import bncore_gpu
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("torch has no CUDA device")
    _REASON = None
except (ImportError, RuntimeError) as exc:
    cupy = bncore_gpu = torch = None
    _REASON = f"no GPU interop to test: {exc}"

pytestmark = pytest.mark.skipif(cupy is None, reason=_REASON or "")


def _pair(a):
    """The same host values as a torch CUDA tensor and as a CuPy array."""
    return torch.tensor(a, device="cuda"), cupy.asarray(a)


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else cupy.asnumpy(t)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_on_torch_tensors_matches_cupy_and_updates_running_stats(channels_last):
    rng = np.random.default_rng(0)
    shape, axis = ((8, 6, 5, 7), 1)
    x = (rng.standard_normal(shape) * 3 + 10).astype(np.float32)
    if channels_last:
        x, axis = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), -1
    C = x.shape[axis]
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    xt, xc = _pair(x)
    (wt, wc), (bt, bc), (rmt, rmc), (rvt, rvc) = _pair(w), _pair(b), _pair(rm), _pair(rv)

    yt, mt, st = bncore_gpu.batch_norm_forward(xt, wt, bt, rmt, rvt, axis=axis, training=True)
    yc, mc, sc = bncore_gpu.batch_norm_forward(xc, wc, bc, rmc, rvc, axis=axis, training=True)
    np.testing.assert_array_equal(_np(yt), _np(yc))
    np.testing.assert_array_equal(_np(mt), _np(mc))
    # the running statistics of the torch tensors themselves were updated
    np.testing.assert_array_equal(_np(rmt), _np(rmc))
    np.testing.assert_array_equal(_np(rvt), _np(rvc))
    assert not np.array_equal(_np(rmt), rm)

    dy = rng.standard_normal(x.shape).astype(np.float32)
    dyt, dyc = _pair(dy)
    gt = bncore_gpu.batch_norm_backward(dyt, xt, mt, st, wt, axis=axis)
    gc = bncore_gpu.batch_norm_backward(dyc, xc, mc, sc, wc, axis=axis)
    for a, c in zip(gt, gc):
        np.testing.assert_array_equal(_np(a), _np(c))

    # and torch's own batch norm agrees to float32 rounding
    xt_nchw = xt.permute(0, 3, 1, 2) if channels_last else xt
    ref = torch.nn.functional.batch_norm(xt_nchw, torch.zeros(C, device="cuda"),
                                         torch.ones(C, device="cuda"), wt, bt, training=True)
    ref = ref.permute(0, 2, 3, 1) if channels_last else ref
    assert np.max(np.abs(_np(ref) - _np(yt))) < 1e-5 * np.max(np.abs(_np(ref)))


def test_optimizer_and_clipping_update_torch_tensors_in_place():
    rng = np.random.default_rng(1)
    shapes = [(7,), (3, 5), (1000,)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) * 5 for s in shapes]
    pt = [torch.tensor(p, device="cuda") for p in params]
    gt = [torch.tensor(g, device="cuda") for g in grads]
    pc = [cupy.asarray(p) for p in params]
    gc = [cupy.asarray(g) for g in grads]
    ptrs = [t.data_ptr() for t in pt]

    nt = bncore_gpu.clip_grad_norm(gt, 1.0)
    nc = bncore_gpu.clip_grad_norm(gc, 1.0)
    assert float(nt) == float(nc) and float(nt) > 1.0
    opt_t = bncore_gpu.optim.Adam(pt, lr=0.01)
    opt_c = bncore_gpu.optim.Adam(pc, lr=0.01)
    for _ in range(3):
        opt_t.step(gt)
        opt_c.step(gc)
    assert [t.data_ptr() for t in pt] == ptrs
    for t, c, p0 in zip(pt, pc, params):
        np.testing.assert_array_equal(_np(t), _np(c))
        assert not np.array_equal(_np(t), p0), "the step updated a copy, not the tensor"
    # the clipped gradients are the torch tensors themselves
    total = np.sqrt(sum(float(np.sum(_np(g).astype(np.float64) ** 2)) for g in gt))
    assert abs(total - 1.0) < 1e-5


def test_torch_tensors_that_cannot_be_viewed_are_refused_with_the_fix():
    t = torch.randn(16, device="cuda", requires_grad=True)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore_gpu.clip_grad_norm([t], 1.0)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore_gpu.optim.SGD([t], lr=0.1)
    bncore_gpu.clip_grad_norm([t.detach()], 1.0)        # the documented fix works
    with pytest.raises(TypeError, match="host|GPU"):
        bncore_gpu.clip_grad_norm([torch.randn(16)], 1.0)   # a CPU tensor

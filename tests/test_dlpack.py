"""Interop: every public function takes DLPack arrays (torch CPU tensors, JAX
CPU arrays) zero-copy; in-place updates land in the caller's tensor.

CI installs torch and jax; each half skips only where its framework is absent.
"""
import numpy as np
import pytest

import bncore
from reference import normwise_relative_error as rel_err


# ---------------------------------------------------------------- torch

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _np(t):
    return t.detach().numpy().copy()


def test_a_bfloat16_tensor_is_refused_for_its_dtype(torch):
    """NumPy has no bfloat16: the DLPack export fails, and the message says
    why (it used to suggest the tensor was on the GPU)."""
    with pytest.raises(TypeError, match=r"NumPy has no torch\.bfloat16 dtype"):
        bncore.batch_norm_forward(torch.ones(4, 3, dtype=torch.bfloat16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_batch_norm_forward_backward_and_running_stats(torch, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 6, generator=g) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_np, rv_np = _np(rm), _np(rv)
    ptr = rm.data_ptr()

    y, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, momentum=0.2)
    y_np, mean_np, invstd_np = bncore.batch_norm_forward(_np(x), _np(w), _np(b), rm_np, rv_np,
                                                        momentum=0.2)
    assert isinstance(y, np.ndarray) and y.tobytes() == y_np.tobytes()
    # the running statistics were updated in the torch tensors themselves
    assert rm.data_ptr() == ptr
    assert np.array_equal(rm.numpy(), rm_np) and np.array_equal(rv.numpy(), rv_np)
    assert not np.array_equal(rm.numpy(), np.zeros(3, np.float32))
    if channels_last:        # the output keeps the tensor's memory layout
        assert y.strides == tuple(s * 4 for s in x.stride())

    dy = torch.randn(x.shape, generator=g)
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w)
    dx_np, dw_np, db_np = bncore.batch_norm_backward(_np(dy), _np(x), mean_np, invstd_np, _np(w))
    assert dx.tobytes() == dx_np.tobytes() and dw.tobytes() == dw_np.tobytes()
    assert db.tobytes() == db_np.tobytes()

    # and against torch itself
    ty = torch.nn.functional.batch_norm(x, torch.zeros(3), torch.ones(3), w, b, training=True)
    assert rel_err(y, ty.numpy()) < 2e-6


def test_torch_tensors_are_not_copied(torch):
    t = torch.randn(10)
    a = bncore._checks.as_array("t", t)
    assert a.ctypes.data == t.data_ptr()
    a[0] = 123.0
    assert float(t[0]) == 123.0


def _torch_lists(torch, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5,), (3, 4), (1000,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    return params, grads


@pytest.mark.parametrize("op", ["sgd", "adam", "rmsprop", "adagrad"])
def test_torch_optimizer_steps_update_tensors_in_place(torch, op):
    params, grads = _torch_lists(torch)
    ptrs = [p.data_ptr() for p in params]
    state = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    params_np = [_np(p) for p in params]
    grads_np = [_np(g) for g in grads]
    state_np = [[np.zeros_like(p) for p in params_np] for _ in range(3)]

    def step(P, G, S):
        if op == "sgd":
            bncore.sgd_step(P, G, S[0], lr=0.1, momentum=0.9, first_step=True)
        elif op == "adam":
            bncore.adam_step(P, G, S[0], S[1], step=1, lr=0.01, amsgrad=True,
                             max_exp_avg_sqs=S[2])
        elif op == "rmsprop":
            bncore.rmsprop_step(P, G, S[0], lr=0.01, centered=True, grad_avgs=S[1],
                                momentum=0.5, momentum_buffers=S[2])
        else:
            bncore.adagrad_step(P, G, S[0], step=1, lr=0.1)

    before = [_np(p) for p in params]
    step(params, grads, state)
    step(params_np, grads_np, state_np)
    for p, p_np, b, ptr in zip(params, params_np, before, ptrs):
        assert p.data_ptr() == ptr, "the tensor was replaced, not updated"
        assert not np.array_equal(p.numpy(), b), "the update did not reach the torch tensor"
        assert p.numpy().tobytes() == p_np.tobytes()
    for lst, lst_np in zip(state, state_np):
        for s, s_np in zip(lst, lst_np):
            assert s.numpy().tobytes() == s_np.tobytes()


def test_torch_clipping_and_norms(torch):
    params, grads = _torch_lists(torch)
    grads_np = [_np(g) for g in grads]
    assert bncore.grad_norm(grads) == bncore.grad_norm(grads_np)
    total = bncore.clip_grad_norm(grads, 0.5)
    total_np = bncore.clip_grad_norm(grads_np, 0.5)
    assert total == total_np
    for g, g_np in zip(grads, grads_np):
        assert g.numpy().tobytes() == g_np.tobytes()
    # torch's own clip_grad_norm_ on the same gradients (same eps convention)
    ref = [torch.nn.Parameter(torch.from_numpy(_np(p))) for p in params]
    _, g0 = _torch_lists(torch)
    for r, g in zip(ref, g0):
        r.grad = g.clone()
    t_total = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert abs(float(t_total) - total) <= 1e-6 * total
    for r, g in zip(ref, grads):
        assert rel_err(g.numpy(), r.grad.numpy()) < 1e-6
    bncore.clip_grad_value(grads, 0.01)
    assert max(float(g.abs().max()) for g in grads) <= 0.01
    grads[1][0, 0] = float("inf")
    assert bncore.found_inf(grads) is True


def test_torch_layer_and_optimizer_classes(torch):
    x = torch.randn(8, 4, 3)
    bn = bncore.BatchNorm(4)
    y = bn.forward(x)
    assert rel_err(y, torch.nn.functional.batch_norm(x, None, None, training=True).numpy()) < 2e-6
    dx = bn.backward(torch.ones_like(x))
    assert dx.shape == (8, 4, 3)
    p = torch.ones(6)
    opt = bncore.optim.Adam([p], lr=0.1)
    opt.step([torch.full((6,), 0.5)])
    assert np.allclose(p.numpy(), 0.9), "the class updated a copy, not the tensor"


def test_a_tensor_with_its_negative_bit_set_is_refused(torch):
    """Found in review: z.conj().imag is a lazy negation (a flag over memory
    holding the opposite values); DLPack exports the memory without the flag,
    so bncore normalized -x (and would have written running statistics, out=
    and optimizer updates with the wrong sign). torch's .numpy() refuses it."""
    def neg(*shape):
        t = torch.randn(*shape, dtype=torch.complex64).conj().imag
        assert t.is_neg()
        return t
    x = torch.randn(6, 3)
    calls = {
        "x": lambda: bncore.batch_norm_forward(neg(6, 3)),
        "running_mean": lambda: bncore.batch_norm_forward(x, None, None, neg(3), torch.ones(3)),
        "out": lambda: bncore.batch_norm_forward(x, out=neg(6, 3)),
        "dy": lambda: bncore.batch_norm_backward(neg(6, 3), x, np.zeros(3), np.ones(3)),
        r"grads\[0\]": lambda: bncore.clip_grad_norm([neg(5)], 1.0),
        r"params\[0\]": lambda: bncore.sgd_step([neg(5)], [torch.ones(5)], lr=0.1),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=name + r" is a torch tensor with its negative bit"):
            call()
    t = neg(6, 3)
    _, mean, _ = bncore.batch_norm_forward(t.resolve_neg())     # the fix the message names
    np.testing.assert_allclose(mean, t.resolve_neg().double().mean(0).numpy(), rtol=1e-12)


def test_torch_tensor_requiring_grad_gives_a_clear_error(torch):
    t = torch.randn(3, requires_grad=True)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore.clip_grad_norm([t], 1.0)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore.batch_norm_forward(torch.randn(4, 3, requires_grad=True))
    bncore.clip_grad_norm([t.detach()], 1.0)      # the documented fix works


# ---------------------------------------------------------------- JAX

@pytest.fixture(scope="module")
def jnp():
    pytest.importorskip("jax")
    import jax.numpy as jnp

    return jnp


def test_jax_arrays_are_read_zero_copy(jnp):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32))
    a = bncore._checks.as_array("x", x)
    assert a.ctypes.data == x.unsafe_buffer_pointer()
    y, mean, invstd = bncore.batch_norm_forward(x)
    y_np, _, _ = bncore.batch_norm_forward(np.asarray(x))
    assert y.tobytes() == y_np.tobytes()
    dx, dw, db = bncore.batch_norm_backward(jnp.ones_like(x), x, mean, invstd)
    assert dx.shape == x.shape
    grads = [jnp.asarray([3.0, 4.0], dtype=jnp.float32)]
    assert bncore.grad_norm(grads) == 5.0
    assert bncore.found_inf(grads) is False


def test_jax_gradients_update_numpy_params(jnp):
    params = [np.ones(4, np.float32)]
    grads = [jnp.full((4,), 0.5, dtype=jnp.float32)]
    m, v = [np.zeros(4, np.float32)], [np.zeros(4, np.float32)]
    bncore.adam_step(params, grads, m, v, step=1, lr=0.1)
    assert np.allclose(params[0], 0.9)


def test_jax_arrays_cannot_be_updated_in_place(jnp):
    grads = [jnp.ones(3, dtype=jnp.float32)]
    with pytest.raises(ValueError, match="read-only"):
        bncore.clip_grad_norm(grads, 0.1)
    with pytest.raises(ValueError, match="read-only"):
        bncore.batch_norm_forward(np.ones((4, 3), np.float32), running_mean=jnp.zeros(3),
                                  running_var=jnp.ones(3))


# ---- torch tensors written in place: autograd's version counter, inference
# tensors, ZeroTensors, channels-last parameters (found in review)

def _graph_over(torch, w):
    """A graph that saved w for its backward: (x * w).sum(), x a leaf."""
    x = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    return x, (x * w).sum()


@pytest.mark.parametrize("write", ["sgd_step", "optim.Adam", "clip_grad_value", "out"])
def test_a_written_tensor_tells_autograd(torch, write):
    """DLPack shares memory but not autograd's version counter: a backward that
    had saved a tensor bncore then wrote used the new values silently (x.grad
    0.5 where it is 1). torch's own in-place updates make that backward raise;
    bncore's writes now do the same."""
    w = torch.nn.Parameter(torch.ones(3))
    x, y = _graph_over(torch, w)
    t = w.detach()                   # shares memory and version counter with w
    if write == "sgd_step":
        bncore.sgd_step([t], [torch.ones(3)], lr=0.5)
    elif write == "optim.Adam":
        bncore.optim.Adam([t], lr=0.1).step([torch.ones(3)])
    elif write == "clip_grad_value":
        bncore.clip_grad_value([t], 0.5)
    else:
        bncore.batch_norm_forward(np.ones((1, 3), np.float32), training=False,
                                  running_mean=np.zeros(3), running_var=np.ones(3),
                                  out=t.view(1, 3))
    assert w._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_running_statistics_tensors_tell_autograd(torch):
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    bncore.batch_norm_forward(np.random.default_rng(0).standard_normal((8, 3)),
                              running_mean=rm, running_var=rv)
    assert rm._version > 0 and rv._version > 0 and not torch.equal(rm, torch.zeros(3).double())
    before = rm._version
    bncore.batch_norm_forward(np.ones((4, 3)), running_mean=rm, running_var=rv, training=False)
    assert rm._version == before             # inference reads them: no bump


def test_read_tensors_keep_their_version(torch):
    """Only written tensors are bumped: a bump of an input would make a
    correct backward raise."""
    g = torch.ones(3)
    x = torch.randn(8, 3)
    bncore.sgd_step([np.ones(3, np.float32)], [g], lr=0.1)
    bncore.grad_norm([g])
    bncore.clip_grad_norm([g], 100.0)        # nothing to clip: nothing written
    bncore.batch_norm_forward(x)
    assert g._version == 0 and x._version == 0


def test_an_inference_tensor_is_read_but_not_written_outside_inference_mode(torch):
    """torch refuses in-place updates of inference tensors outside inference
    mode; bncore wrote them (parameters, running statistics, out=)."""
    with torch.inference_mode():
        p, rm, rv = torch.ones(3), torch.zeros(3), torch.ones(3)
        x = torch.randn(8, 3)
    with pytest.raises(ValueError, match=r"params\[0\] is read-only.*inference"):
        bncore.sgd_step([p], [torch.ones(3)], lr=0.5)
    with pytest.raises(ValueError, match="running_mean is read-only"):
        bncore.batch_norm_forward(torch.randn(8, 3), running_mean=rm, running_var=rv)
    assert torch.equal(p, torch.ones(3)) and torch.equal(rm, torch.zeros(3))
    y, _, _ = bncore.batch_norm_forward(x)            # read: fine
    assert np.isfinite(y).all()
    with torch.inference_mode():
        bncore.sgd_step([p], [torch.ones(3)], lr=0.5)  # inside: allowed, as in torch
    assert torch.equal(p, torch.full((3,), 0.5))


def test_a_zero_tensor_is_refused(torch):
    """torch's ZeroTensor exports memory that is not zeros (bncore read
    garbage from it, and wrote into it as a state array)."""
    z = torch._efficientzerotensor(3)
    for call in (lambda: bncore.sgd_step([torch.ones(3)], [z], lr=0.1),
                 lambda: bncore.adam_step([torch.ones(3)], [torch.ones(3)], [z],
                                          [torch.zeros(3)], step=1)):
        with pytest.raises(TypeError, match="ZeroTensor"):
            call()


def test_the_hint_for_a_sparse_tensor_is_not_about_the_device(torch):
    with pytest.raises(TypeError, match="to_dense") as info:
        bncore.grad_norm([torch.ones(3).to_sparse()])
    assert "GPU" not in str(info.value)


def test_channels_last_parameters_step_in_place(torch):
    """A channels-last conv weight and its gradient (same strides) fill one
    block of memory: the optimizers and clipping take them in place (they were
    refused, with a hint to copy that would have lost the update)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).double().to(memory_format=torch.channels_last)
    conv(torch.randn(2, 3, 8, 8, dtype=torch.float64)
         .to(memory_format=torch.channels_last)).square().sum().backward()
    w, g = conv.weight.detach(), conv.weight.grad
    assert not w.is_contiguous() and w.stride() == g.stride()
    ref = torch.nn.Parameter(w.clone())
    ref_opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, foreach=False)
    opt = bncore.optim.SGD([w], lr=0.1, momentum=0.9)
    for _ in range(3):
        ref.grad = g.clone()
        ref_opt.step()
        opt.step([g])
    torch.testing.assert_close(w, ref.detach(), rtol=1e-15, atol=1e-15)
    state = opt.state_dict()
    opt.load_state_dict(state)           # the loaded buffer keeps the parameter's layout
    opt.step([g])
    norm = bncore.clip_grad_norm([g], 0.5)
    assert norm > 0.5 and abs(float(g.norm()) - 0.5) < 1e-6
    with pytest.raises(ValueError, match=r"grads\[0\] is stored in a different order"):
        bncore.sgd_step([w], [g.contiguous()], lr=0.1)


def test_dense_numpy_arrays_in_any_axis_order_step_in_place():
    """No torch needed: a transposed 3-D array fills one block of memory."""
    rng = np.random.default_rng(1)
    p = rng.standard_normal((4, 5, 6)).transpose(2, 0, 1)
    g = rng.standard_normal((4, 5, 6)).transpose(2, 0, 1)
    assert not (p.flags.c_contiguous or p.flags.f_contiguous)
    want = p - 0.1 * g
    bncore.sgd_step([p], [g], lr=0.1)
    np.testing.assert_array_equal(p, want)
    with pytest.raises(ValueError, match="not contiguous.*pass the array itself"):
        bncore.sgd_step([p[::2]], [g[::2]], lr=0.1)


def test_an_optimizer_class_decides_on_inference_tensors_at_each_step(torch):
    """Review: the class kept the view it made at construction, so one built in
    inference mode wrote the inference tensor outside it (torch refuses), and
    one built outside refused a step inside inference mode (torch allows)."""
    with torch.inference_mode():
        p = torch.ones(3)
        opt = bncore.optim.SGD([p], lr=0.5)
    with pytest.raises(ValueError, match="inference"):
        opt.step([torch.ones(3)])
    assert torch.equal(p, torch.ones(3))
    with torch.inference_mode():
        q = torch.ones(3)
    opt2 = bncore.optim.SGD([q], lr=0.5)
    with torch.inference_mode():
        opt2.step([torch.ones(3)])
        opt.step([torch.ones(3)])
    assert torch.equal(q, torch.full((3,), 0.5)) and torch.equal(p, torch.full((3,), 0.5))

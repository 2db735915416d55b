"""Optimizer classes: parameter groups, schedules, state_dict, atomic checkpoints."""
import os

import numpy as np
import pytest

import bncore
from bncore.optim import checkpoint

CLASSES = [(bncore.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
           (bncore.optim.Adam, dict(lr=1e-2, amsgrad=True)),
           (bncore.optim.AdamW, dict(lr=1e-2)),
           (bncore.optim.RMSprop, dict(lr=1e-2, centered=True, momentum=0.3)),
           (bncore.optim.Adagrad, dict(lr=0.1, lr_decay=0.01))]


def problem(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in [(5,), (3, 4), (7,)]]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params] for _ in range(6)]
    return params, grads


@pytest.mark.parametrize("cls,kw", CLASSES, ids=[c.__name__ for c, _ in CLASSES])
def test_state_dict_round_trips_bit_for_bit_and_resumes(cls, kw, tmp_path):
    params, grads = problem()
    a = cls([{"params": params[:2]}, {"params": params[2:], "lr": kw["lr"] / 2}], **kw)
    for g in grads[:3]:
        a.step(g)
    params_b = [p.copy() for p in params]
    b = cls([{"params": params_b[:2]}, {"params": params_b[2:]}], **kw)
    b.load_state_dict(a.state_dict())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            w = sb["state"][i][k]
            assert (v.tobytes() == w.tobytes()) if isinstance(v, np.ndarray) else v == w
    # checkpoint file, then both continue identically
    path = tmp_path / "opt.npz"
    bncore.optim.save(a, path)
    c_params = [p.copy() for p in params]
    c = cls([{"params": c_params[:2]}, {"params": c_params[2:]}], **kw)
    bncore.optim.load(c, path)
    for g in grads[3:]:
        a.step(g)
        b.step(g)
        c.step(g)
    for x, y, z in zip(params, params_b, c_params):
        assert x.tobytes() == y.tobytes() == z.tobytes()


def test_param_groups_are_mutable_between_steps_and_schedules_apply():
    params, grads = problem(dtype=np.float64)
    ref = [p.copy() for p in params]
    opt = bncore.optim.SGD(params, lr=1.0)
    sched = bncore.optim.step_lr(0.1, step_size=2, gamma=0.5)
    for k, g in enumerate(grads):
        bncore.optim.set_lr(opt, sched(k))
        opt.step(g)
        for r, gi in zip(ref, g):
            r -= sched(k) * gi
    for p, r in zip(params, ref):
        np.testing.assert_allclose(p, r, rtol=1e-15, atol=1e-15)
    opt.param_groups[0]["momentum"] = 0.5       # any hyperparameter, not only lr
    opt.step(grads[0])
    assert "momentum_buffer" in opt.state[0]


def test_schedules():
    s = bncore.optim.step_lr(1.0, 3, 0.1)
    assert [s(k) for k in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 0.1, 0.01])
    w = bncore.optim.linear_warmup(1.0, 4, start_factor=0.2)
    assert [w(k) for k in (0, 2, 4, 10)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    c = bncore.optim.cosine_lr(1.0, 10, min_lr=0.1)
    assert c(0) == pytest.approx(1.0) and c(5) == pytest.approx(0.55) and c(10) == pytest.approx(0.1)
    assert c(20) == pytest.approx(0.1)
    cw = bncore.optim.cosine_lr(1.0, 12, warmup_steps=2)
    assert cw(0) == 0.0 and cw(1) == pytest.approx(0.5) and cw(2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        s(-1)


def test_step_lr_past_float64_is_inf_as_torch_steplr_reaches():
    """gamma > 1 passes step_lr's checks; gamma ** k overflowed (OverflowError)."""
    s = bncore.optim.step_lr(0.1, 1, 2.0)
    assert s(1000) == pytest.approx(0.1 * 2.0 ** 1000)
    assert s(1100) == np.inf
    assert bncore.optim.step_lr(0.0, 1, 2.0)(1100) == 0.0


@pytest.mark.parametrize("cls", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
@pytest.mark.parametrize("param", [[1.0, 2.0], 3.0, (1.0,)])
def test_a_parameter_that_would_be_copied_is_refused(cls, param):
    """A list or a Python float was copied into a private array, which the
    steps then updated: the caller's parameter never moved, without an error
    (the functional steps refuse it; torch: "can only optimize Tensors")."""
    opt_cls = getattr(bncore.optim, cls)
    with pytest.raises(TypeError, match="updated in place"):
        opt_cls([param], lr=0.1)
    opt = opt_cls([np.zeros(2)], lr=0.1)
    with pytest.raises(TypeError, match="updated in place"):
        opt.add_param_group({"params": [param]})
    opt.param_groups[0]["params"].append(param)
    with pytest.raises(TypeError, match="updated in place"):
        opt.step([np.ones(2), np.ones(2)])


def test_linear_warmup_hands_over_at_warmup_steps():
    """Steps 0 .. warmup_steps - 1 ramp; step warmup_steps is after(0)."""
    after = bncore.optim.step_lr(0.5, step_size=2, gamma=0.1)
    w = bncore.optim.linear_warmup(1.0, 4, after=after)
    assert [w(k) for k in range(4)] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert [w(k) for k in (4, 5, 6)] == pytest.approx([0.5, 0.5, 0.05])


def test_set_lr_sets_every_group_and_cosine_decays_after_its_warmup():
    params, _ = problem()
    opt = bncore.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.3}], lr=0.1)
    bncore.optim.set_lr(opt, 0.02)
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]
    # warm-up over 2 steps, then min + (base - min) (1 + cos(pi t / 10)) / 2 for t = step - 2
    cw = bncore.optim.cosine_lr(1.0, 12, min_lr=0.1, warmup_steps=2)
    for k in (2, 5, 7, 11, 12, 30):
        t = min(k - 2, 10)
        assert cw(k) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 10)), abs=1e-15)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    params, grads = problem()
    opt = bncore.optim.Adam(params)
    opt.step(grads[0])
    path = tmp_path / "ckpt.npz"
    bncore.optim.save(opt, path)
    good = path.read_bytes()
    opt.step(grads[1])

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")
    monkeypatch.setattr(checkpoint.os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        bncore.optim.save(opt, path)
    assert path.read_bytes() == good                       # the old checkpoint survives
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".bncore-")]  # no debris
    monkeypatch.undo()
    fresh = bncore.optim.Adam([p.copy() for p in params])
    bncore.optim.load(fresh, path)
    assert fresh.state[0]["step"] == 1


def test_load_rejects_mismatched_structure(tmp_path):
    params, grads = problem()
    opt = bncore.optim.Adam(params)
    opt.step(grads[0])
    bncore.optim.save(opt, tmp_path / "a.npz")
    with pytest.raises(ValueError, match="Adam"):
        bncore.optim.load(bncore.optim.SGD(params, lr=0.1), tmp_path / "a.npz")
    other = bncore.optim.Adam([np.zeros(9, np.float32)] * 1 + params[1:])
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(opt.state_dict())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError):
        bncore.optim.load(opt, tmp_path / "junk.npz")


def test_tensor_hyperparameters_are_saved_as_their_values(tmp_path):
    """A hyperparameter given as a torch tensor (a learning rate held by a
    scheduler) is accepted by the step; save wrote no file and raised
    TypeError ("Tensor is not JSON serializable"). It is saved as its value."""
    torch = pytest.importorskip("torch")
    params, grads = problem()
    opt = bncore.optim.Adam(params, lr=torch.tensor(0.01), betas=(torch.tensor(0.8), 0.99))
    opt.step(grads[0])
    bncore.optim.save(opt, tmp_path / "t.npz")
    fresh = bncore.optim.Adam([p.copy() for p in problem()[0]])
    bncore.optim.load(fresh, tmp_path / "t.npz")
    assert fresh.param_groups[0]["lr"] == pytest.approx(0.01)
    assert fresh.param_groups[0]["betas"][0] == pytest.approx(0.8)


def test_parameters_without_gradients_are_skipped():
    """None gradients (torch's .grad of None): those parameters keep their
    values and get no state; a found_inf skip and a bad gradient elsewhere
    behave as without them, the messages counting over all parameters."""
    ps = [np.ones(3), np.ones(2), np.ones(4)]
    opt = bncore.optim.Adam(ps, lr=0.1, weight_decay=0.1)
    opt.step([np.ones(3), None, np.ones(4)])
    assert sorted(opt.state) == [0, 2] and (ps[1] == 1.0).all() and (ps[0] < 1).all()
    opt.step([None, None, None])
    assert sorted(opt.state) == [0, 2]
    before = [p.copy() for p in ps]
    opt.step([np.ones(3), np.ones(2), None], found_inf=True)
    assert sorted(opt.state) == [0, 2] and all((a == b).all() for a, b in zip(ps, before))
    opt.step([np.ones(3), np.ones(2), None])     # two step counts: two calls
    with pytest.raises(ValueError, match=r"grads\[2\] has shape \(5,\)"):
        opt.step([np.ones(3), None, np.ones(5)])
    assert [int(opt.state[i]["step"]) for i in range(3)] == [2, 1, 1]
    one = bncore.optim.SGD([np.ones(3), np.ones(2)], lr=0.1)     # one kernel call
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(5,\)"):
        one.step([None, np.ones(5)])


def test_a_step_with_missing_gradients_names_arrays_over_all_parameters():
    """One kernel call over the parameters that have a gradient: its own
    refusals (a gradient that is a state array) still count over all the
    optimizer's parameters (review: 'grads[1] and exp_avgs[1]' for the third)."""
    ps = [np.ones(3), np.ones(3), np.ones(3)]
    opt = bncore.optim.Adam(ps, lr=0.1)
    opt.step([np.ones(3)] * 3)
    with pytest.raises(ValueError, match=r"grads\[2\] and exp_avgs\[2\] share memory"):
        opt.step([None, np.ones(3), opt.state[2]["exp_avg"]])


def test_a_parameter_without_a_gradient_is_not_written_for_torch():
    """torch: a skipped parameter is not told to autograd as written (a graph
    that saved it could not run backward again) and may be an inference
    tensor (review: it was bumped and refused)."""
    torch = pytest.importorskip("torch")
    w = torch.randn(3, requires_grad=True)
    frozen = torch.randn(3)
    opt = bncore.optim.SGD([w.detach(), frozen], lr=0.1)
    loss = (w * frozen).sum()
    loss.backward(retain_graph=True)
    opt.step([w.grad, None])
    loss.backward()                                 # raised: frozen had been modified
    with torch.inference_mode():
        inf = torch.randn(3)
    opt = bncore.optim.SGD([torch.zeros(3), inf], lr=0.1)
    opt.step([torch.ones(3), None])
    with pytest.raises(ValueError, match=r"params\[1\] is read-only"):
        opt.step([torch.ones(3), torch.ones(3)])

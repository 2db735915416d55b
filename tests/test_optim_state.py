"""Optimizer classes under the operations that can half-apply: several groups
in one step, parameter lists edited in place, state_dicts and checkpoints that
are wrong, hyperparameters that are wrong. A call that raises changes nothing;
state stays with its parameter; torch is the reference for the semantics."""
import os

import numpy as np
import pytest

from bncore import optim

try:
    import torch
except ImportError:
    torch = None


def arrays(n, size=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(dtype) for _ in range(n)]


def snapshot(opt, params):
    return ([p.copy() for p in params],
            {i: {k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}
             for i, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_same(a, b):
    pa, sa, ga = a
    pb, sb, gb = b
    for x, y in zip(pa, pb):
        assert x.tobytes() == y.tobytes()
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert np.asarray(sa[i][k]).tobytes() == np.asarray(sb[i][k]).tobytes(), (i, k)
    assert ga == gb


# ---- a step that raises has changed nothing, whichever group is at fault

BAD_LATER_GROUP = [
    ("SGD weight_decay", optim.SGD, dict(lr=0.1, momentum=0.9), {"weight_decay": -1.0},
     "weight_decay"),
    ("Adam betas", optim.Adam, dict(lr=0.1), {"betas": (0.9, 1.5)}, r"betas\[1\]"),
    ("Adam eps_style", optim.Adam, dict(lr=0.1), {"eps_style": "x"}, "eps_style"),
    ("RMSprop alpha", optim.RMSprop, dict(lr=0.1), {"alpha": 2.0}, "alpha"),
    ("Adagrad lr_decay", optim.Adagrad, dict(lr=0.1), {"lr_decay": -1.0}, "lr_decay"),
]


@pytest.mark.parametrize("desc,cls,kw,bad,text", BAD_LATER_GROUP, ids=[c[0] for c in BAD_LATER_GROUP])
def test_bad_hyperparameter_in_a_later_group_changes_nothing(desc, cls, kw, bad, text):
    params = arrays(3)
    opt = cls([{"params": params[:2]}, {"params": params[2:]}], **kw)
    opt.step(arrays(3, seed=1))
    before = snapshot(opt, params)
    opt.param_groups[1].update(bad)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*" + text):
        opt.step(arrays(3, seed=2))
    opt.param_groups[1].update({k: opt.defaults[k] for k in bad})
    assert_same(before[:2] + (before[2],), snapshot(opt, params))


@pytest.mark.parametrize("bad_grad", ["shape", "dtype", "alias"])
def test_bad_gradient_in_a_later_group_changes_nothing(bad_grad):
    params = arrays(3)
    opt = optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1)
    opt.step(arrays(3, seed=1))
    before = snapshot(opt, params)
    grads = arrays(3, seed=2)
    if bad_grad == "shape":
        grads[2] = np.zeros(4)
    elif bad_grad == "dtype":
        grads[2] = grads[2].astype(np.float32)
    else:
        grads[2] = params[2]
    with pytest.raises((ValueError, TypeError), match=r"\[2\]"):   # the global index
        opt.step(grads)
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("cls,kw,state", [
    (optim.SGD, dict(lr=0.1, momentum=0.9), "momentum_buffer"),
    (optim.Adam, dict(lr=0.1), "exp_avg_sq"),
    (optim.RMSprop, dict(lr=0.1, centered=True), "grad_avg"),
    (optim.Adagrad, dict(lr=0.1), "sum"),
])
def test_a_gradient_that_is_a_later_groups_state_changes_nothing(cls, kw, state):
    """Each kernel call checks its own arrays, so a gradient passed as its own
    group's state array was refused by that group's call only after the calls
    before it had written (found by review: group 0 moved, then ValueError).
    Every call's checks now run before the first kernel; the message counts
    over all parameters."""
    params = arrays(3)
    opt = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], **kw)
    opt.step(arrays(3, seed=1))
    before = snapshot(opt, params)
    grads = arrays(3, seed=2)
    grads[2] = opt.state[2][state][:3]              # group 1's gradient is its own state
    with pytest.raises(ValueError, match=r"grads\[2\] and \w+\[2\] share memory|"
                                         r"\w+\[2\] and grads\[2\] share memory"):
        opt.step(grads)
    assert_same(before, snapshot(opt, params))


def test_mixed_step_counts_in_a_group_are_checked_before_either_call():
    params = arrays(2)
    opt = optim.Adam(params, lr=0.1)
    opt.step(arrays(2, seed=1))
    opt.state[1]["step"] = 5                        # two kernel calls in this group
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        opt.step([np.ones(3), np.ones(4)])
    assert_same(before, snapshot(opt, params))


# ---- hyperparameters are checked at construction, by the step functions' rules

@pytest.mark.parametrize("cls,kw,text", [
    (optim.Adam, dict(weight_decay=-1), "weight_decay"),
    (optim.Adam, dict(eps_style="x"), "eps_style"),
    (optim.Adam, dict(betas=(0.9,)), "betas"),
    (optim.Adam, dict(betas=None), "betas"),
    (optim.Adam, dict(eps=0.0), "eps"),
    (optim.SGD, dict(lr=0.1, dampening=2), "dampening"),
    (optim.SGD, dict(lr=0.1, weight_decay=-1), "weight_decay"),
    (optim.SGD, dict(lr=0.1, style="x"), "style"),
    (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5, nesterov=True), "nesterov"),
    (optim.RMSprop, dict(momentum=-1), "momentum"),
    (optim.RMSprop, dict(eps=-1), "eps"),
    (optim.RMSprop, dict(eps=0.0), "eps"),
    (optim.Adagrad, dict(eps=-1), "eps"),
    (optim.Adagrad, dict(lr_decay=-1), "lr_decay"),
])
def test_constructors_reject_what_step_would(cls, kw, text):
    with pytest.raises(ValueError, match=text):
        cls(arrays(1), **kw)


def test_optax_eps_zero_with_eps_root_is_allowed():
    p = arrays(1)
    optim.Adam(p, eps=0.0, eps_root=1e-8).step([np.zeros(3)])
    assert np.isfinite(p[0]).all()


# ---- state follows its parameter when param_groups are edited in place

def test_state_moves_with_its_parameter_when_a_group_grows():
    a, b, c = arrays(3)
    ga, gb, gc = arrays(3, seed=1)
    opt = optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    for _ in range(5):
        opt.step([ga, gb])
    opt.param_groups[0]["params"].append(c)
    opt.step([ga, gc, gb])
    steps = {id(p): opt.state[i]["step"] for i, p in enumerate(opt._flat_params())}
    assert steps == {id(a): 6, id(c): 1, id(b): 6}


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("route", ["append to its group", "add_param_group"])
def test_a_parameter_taken_out_and_put_back_resumes_its_state_as_in_torch(route):
    """Found by review: bncore dropped the state of a parameter removed from its
    group (freezing it for a while); torch keys state by tensor and resumes.
    A later review: put back through add_param_group, it still started fresh."""
    a, b = arrays(2)
    ta, tb = torch.tensor(a.copy()), torch.tensor(b.copy())
    opt = optim.SGD([a, b], lr=0.1, momentum=0.9)
    topt = torch.optim.SGD([ta, tb], lr=0.1, momentum=0.9)
    ga, gb = arrays(2, seed=1)

    def both(grads, tparams):
        opt.step(grads)
        for t, g in zip(tparams, grads):
            t.grad = torch.tensor(g)
        topt.step()
    both([ga, gb], (ta, tb))
    del opt.param_groups[0]["params"][1]             # b, frozen for a step
    del topt.param_groups[0]["params"][1]
    both([ga], (ta,))
    if route == "add_param_group":                   # and back
        opt.add_param_group({"params": [b]})
        topt.add_param_group({"params": [tb]})
    else:
        opt.param_groups[0]["params"].append(b)
        topt.param_groups[0]["params"].append(tb)
    both([ga, gb], (ta, tb))
    for x, t in ((a, ta), (b, tb)):
        np.testing.assert_allclose(x, t.numpy(), rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(opt.state[1]["momentum_buffer"],
                               topt.state[tb]["momentum_buffer"].numpy(), rtol=1e-14)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("back", ["the same tensor", "a new view of it"])
def test_a_torch_parameter_put_back_resumes_its_state(back):
    """Found by review: with torch tensors as parameters (DLPack), the groups
    hold NumPy views, and the tensor put back became a new view with a new id:
    it started fresh. It is known by its memory now, as torch knows it; the
    reference is the same run on NumPy arrays, each put back as itself."""
    a, b = arrays(2)
    ta, tb = torch.tensor(a), torch.tensor(b)
    opt = optim.SGD([ta, tb], lr=0.1, momentum=0.9)
    ref = optim.SGD([a, b], lr=0.1, momentum=0.9)
    ga, gb = arrays(2, seed=1)
    for o in (opt, ref):
        o.step([ga, gb])
        del o.param_groups[0]["params"][1]
        o.step([ga])
    opt.param_groups[0]["params"].append(tb if back == "the same tensor" else tb.numpy())
    ref.param_groups[0]["params"].append(b)
    for o in (opt, ref):
        o.step([ga, gb])
    np.testing.assert_array_equal(tb.numpy(), b)
    assert opt.state[1]["step"] == ref.state[1]["step"] == 2
    np.testing.assert_array_equal(opt.state[1]["momentum_buffer"],
                                  ref.state[1]["momentum_buffer"])
    # a tensor that was never a parameter, at other memory, still starts fresh
    opt.param_groups[0]["params"].append(torch.tensor(arrays(1, seed=3)[0]))
    opt.step([ga, gb, arrays(1, seed=4)[0]])
    assert opt.state[2]["step"] == 1


def test_a_parameter_back_as_itself_and_as_a_view_is_refused_cleanly():
    """Found by review of the memory lookup: a removed array put back as itself
    and, in the same edit, as a view of itself raised KeyError (and lost its
    state); it is the ValueError for two parameters sharing memory, and the
    array keeps its state."""
    a, b, d = arrays(3)
    opt = optim.SGD([a, b, d], lr=0.1, momentum=0.9)
    opt.step(arrays(3, seed=1))
    del opt.param_groups[0]["params"][1:]              # b and d out (two kept states)
    opt.step(arrays(1, seed=1))
    opt.param_groups[0]["params"] += [np.ones(5), b, b[...]]
    with pytest.raises(ValueError, match="share memory"):
        opt.step([*arrays(1), np.ones(5), *arrays(2)])
    opt.param_groups[0]["params"].pop()
    opt.step([*arrays(1), np.ones(5), *arrays(1)])
    assert opt.state[2]["step"] == 2 and opt.state[1]["step"] == 1


def test_an_empty_parameter_is_not_known_by_its_address():
    """Every empty slice of an array has the array's address: a new empty
    parameter took a removed empty one's state (its step count)."""
    buf = np.ones(10)
    first, other = buf[2:2], buf[7:7]
    opt = optim.Adam([np.ones(3), first], lr=0.1)
    for _ in range(3):
        opt.step([np.ones(3), np.ones(0)])
    del opt.param_groups[0]["params"][1]
    opt.param_groups[0]["params"].append(other)
    opt.step([np.ones(3), np.ones(0)])
    assert opt.state[1]["step"] == 1 and opt.state[0]["step"] == 4


def test_a_removed_parameters_state_is_forgotten_by_load_state_dict():
    a, b = arrays(2)
    opt = optim.SGD([a, b], lr=0.1, momentum=0.9)
    opt.step(arrays(2, seed=1))
    del opt.param_groups[0]["params"][1]
    opt.step(arrays(1, seed=1))
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["params"].append(b)
    opt.step(arrays(2, seed=1))
    assert opt.state[1]["step"] == 1                 # fresh: the load replaced all state


def test_group_keys_that_are_not_hyperparameters_travel_with_the_group(tmp_path):
    """Found by review: a group key such as a scheduler's initial_lr stepped and
    saved fine, but load_state_dict and optim.load refused it (torch keeps it)."""
    p = arrays(1, dtype=np.float32)
    opt = optim.Adam(p, lr=0.1)
    opt.param_groups[0]["initial_lr"] = 0.1
    opt.add_param_group({"params": arrays(1, seed=2, dtype=np.float32), "name": "head"})
    opt.step(arrays(2, seed=1, dtype=np.float32))
    sd = opt.state_dict()
    assert sd["param_groups"][0]["initial_lr"] == 0.1
    assert sd["param_groups"][1]["name"] == "head"
    opt.load_state_dict(sd)
    optim.save(opt, tmp_path / "c.npz")
    back = optim.Adam([p[0].copy()], lr=0.5)
    back.add_param_group({"params": arrays(1, seed=2, dtype=np.float32)})
    optim.load(back, tmp_path / "c.npz")
    assert back.param_groups[0]["initial_lr"] == 0.1
    assert back.param_groups[1]["name"] == "head"
    back.step(arrays(2, seed=1, dtype=np.float32))


@pytest.mark.parametrize("key,text", [("learning_rate", "calls it 'lr'"),
                                      ("momentun", "did you mean 'momentum'"),
                                      ("betas", "another optimizer's")])
def test_a_group_key_that_looks_like_a_mistake_is_refused(key, text):
    """Found by review: with extra keys allowed, Keras's learning_rate or a
    misspelt momentum were silently ignored; keys of the caller's own pass."""
    with pytest.raises(ValueError, match=text):
        optim.SGD([{"params": arrays(1), key: 0.5}], lr=0.1)
    opt = optim.SGD(arrays(1), lr=0.1)
    opt.param_groups[0][key] = 0.5
    with pytest.raises(ValueError, match=text):
        opt.step(arrays(1, seed=1))
    optim.SGD([{"params": arrays(1), "initial_lr": 0.1, "name": "x"}], lr=0.1).step(arrays(1))


@pytest.mark.parametrize("key", ["max_momentum", "base_momentum", "weight_decay_mult"])
def test_group_keys_built_on_a_hyperparameter_name_are_the_callers_own(key):
    """Found in review: torch's OneCycleLR and CyclicLR keep max_momentum and
    base_momentum in the groups; max_momentum was refused as a misspelling
    of momentum ("did you mean 'momentum'?")."""
    opt = optim.SGD([{"params": arrays(1), key: 0.9}], lr=0.1, momentum=0.9)
    opt.param_groups[0][key] = 0.95
    opt.step(arrays(1, seed=1))
    assert opt.param_groups[0][key] == 0.95


def test_a_hyperparameter_deleted_from_a_group_is_named():
    opt = optim.SGD(arrays(1), lr=0.1)
    del opt.param_groups[0]["lr"]
    with pytest.raises(ValueError, match=r"lacks hyperparameters \['lr'\]"):
        opt.step(arrays(1, seed=1))


def test_params_given_as_one_dict_is_a_type_error():
    with pytest.raises(TypeError, match="list of parameter groups"):
        optim.SGD({"params": arrays(1)}, lr=0.1)


def test_a_parameter_appended_twice_is_refused():
    a, b = arrays(2)
    opt = optim.SGD([a, b], lr=0.1)
    opt.param_groups[0]["params"].append(a)
    with pytest.raises(ValueError, match="twice"):
        opt.step(arrays(3))


@pytest.mark.skipif(torch is None, reason="torch not installed")
def test_edited_groups_match_torch():
    a, b, c = arrays(3)
    ga, gb, gc = arrays(3, seed=1)
    ta, tb, tc = (torch.tensor(x.copy()) for x in (a, b, c))
    opt = optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    topt = torch.optim.Adam([{"params": [ta]}, {"params": [tb]}], lr=0.1)
    for _ in range(3):
        opt.step([ga, gb])
        ta.grad, tb.grad = torch.tensor(ga), torch.tensor(gb)
        topt.step()
    opt.param_groups[0]["params"].append(c)
    topt.param_groups[0]["params"].append(tc)
    for _ in range(2):
        opt.step([ga, gc, gb])
        ta.grad, tb.grad, tc.grad = torch.tensor(ga), torch.tensor(gb), torch.tensor(gc)
        topt.step()
    for x, t in zip((a, b, c), (ta, tb, tc)):
        np.testing.assert_allclose(x, t.numpy(), rtol=1e-14, atol=1e-15)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_momentum_switched_on_mid_training_matches_torch(dampening):
    p, = arrays(1)
    tp = torch.tensor(p.copy())
    opt = optim.SGD([p], lr=0.1, momentum=0.0, dampening=dampening)
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.0, dampening=dampening)
    grads = arrays(4, seed=3)
    for k, g in enumerate(grads):
        if k == 1:
            opt.param_groups[0]["momentum"] = 0.9
            topt.param_groups[0]["momentum"] = 0.9
        opt.step([g])
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(p, tp.numpy(), rtol=1e-14, atol=1e-15)


# ---- load_state_dict checks everything before it replaces anything

def loaded_adam():
    params = arrays(2)
    opt = optim.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    opt.step(arrays(2, seed=1))
    return opt, params


@pytest.mark.parametrize("desc,edit,exc,text", [
    ("bad lr in group 1", lambda sd: sd["param_groups"][1].update(lr=-1.0), ValueError,
     r"param_groups\[1\].*lr"),
    ("bad weight_decay", lambda sd: sd["param_groups"][0].update(weight_decay=-1.0),
     ValueError, "weight_decay"),
    ("missing exp_avg", lambda sd: sd["state"][1].pop("exp_avg"), ValueError, "exp_avg"),
    ("missing step", lambda sd: sd["state"][0].pop("step"), ValueError, "step"),
    ("negative step", lambda sd: sd["state"][0].update(step=-3), ValueError, "step"),
    ("fractional step", lambda sd: sd["state"][0].update(step=2.7), ValueError, "step"),
    ("step a string", lambda sd: sd["state"][0].update(step="2"), TypeError, "step"),
    ("wrong shape", lambda sd: sd["state"][1].update(exp_avg=np.zeros(4)), ValueError, "shape"),
    ("exp_avg None", lambda sd: sd["state"][1].update(exp_avg=None), ValueError, "exp_avg"),
    # found by review: a bare KeyError, where every other corrupt input is a ValueError
    ("group without params", lambda sd: sd["param_groups"][1].pop("params"), ValueError,
     r"param_groups\[1\].*'params'"),
    # found by fuzzing: AttributeError / unnamed errors from inside the loader
    ("state entry None", lambda sd: sd["state"].__setitem__(0, None), TypeError,
     r"\['state'\]\[0\] must be a dict"),
    ("state not a dict", lambda sd: sd.__setitem__("state", 3), TypeError, r"\['state'\]"),
    ("groups None", lambda sd: sd.__setitem__("param_groups", None), TypeError,
     r"\['param_groups'\] must be a list"),
    ("params None", lambda sd: sd["param_groups"][0].__setitem__("params", None), TypeError,
     r"\['params'\] must be a list"),
    ("convention a dict", lambda sd: sd.__setitem__("convention", {}), TypeError, "convention"),
    ("optimizer an array", lambda sd: sd.__setitem__("optimizer", np.array([1, 2])), ValueError,
     "state_dict is for"),
])
def test_bad_state_dict_leaves_the_optimizer_as_it_was(desc, edit, exc, text):
    opt, params = loaded_adam()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.777          # would be loaded first, if anything were
    edit(sd)
    before = snapshot(opt, params)
    with pytest.raises(exc, match=text):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))


def test_state_given_as_lists_loads_as_arrays():
    opt, params = loaded_adam()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"].tolist()
    fresh = optim.Adam([{"params": [p.copy()]} for p in params], lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.state[0]["exp_avg"].tobytes() == opt.state[0]["exp_avg"].tobytes()


def test_state_dicts_are_copies_both_ways():
    """state_dict() is a snapshot and load_state_dict() copies it in: stepping
    either optimizer afterwards leaves the dict as it was."""
    params, grads = arrays(2, size=5), arrays(2, size=5, seed=1)
    opt = optim.Adam(params, lr=0.1, amsgrad=True)
    opt.step(grads)
    sd = opt.state_dict()
    kept = {i: {k: np.array(v, copy=True) for k, v in s.items() if isinstance(v, np.ndarray)}
            for i, s in sd["state"].items()}

    def assert_kept():
        for i, s in kept.items():
            for k, v in s.items():
                assert sd["state"][i][k].tobytes() == v.tobytes(), (i, k)
    opt.step(grads)
    assert opt.state[0]["exp_avg"].tobytes() != kept[0]["exp_avg"].tobytes()  # it moved on
    assert_kept()
    other = optim.Adam([p.copy() for p in params], lr=0.1, amsgrad=True)
    other.load_state_dict(sd)
    other.step(grads)
    assert_kept()


# ---- checkpoints

def test_checkpoint_of_numpy_typed_hyperparameters(tmp_path):
    p = arrays(1, dtype=np.float32)
    opt = optim.Adam(p, lr=np.float32(0.1), amsgrad=np.bool_(True), betas=np.array([0.9, 0.99]))
    opt.step(arrays(1, seed=1, dtype=np.float32))
    optim.save(opt, tmp_path / "c.npz")
    back = optim.load(optim.Adam([p[0].copy()], amsgrad=True), tmp_path / "c.npz")
    assert back.param_groups[0]["amsgrad"] is True
    assert list(back.param_groups[0]["betas"]) == [0.9, 0.99]


def test_checkpoint_permissions_follow_the_umask(tmp_path):
    opt = optim.SGD(arrays(1), lr=0.1)
    old = os.umask(0o022)
    try:
        optim.save(opt, tmp_path / "c.npz")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "c.npz").st_mode & 0o777 == 0o644


def test_saving_over_a_checkpoint_keeps_its_permissions(tmp_path):
    """Found by review: the rename put a 0644 file where a 0600 one was."""
    opt = optim.SGD(arrays(1), lr=0.1)
    optim.save(opt, tmp_path / "c.npz")
    os.chmod(tmp_path / "c.npz", 0o600)
    opt.step(arrays(1, seed=1))
    optim.save(opt, tmp_path / "c.npz")
    assert os.stat(tmp_path / "c.npz").st_mode & 0o777 == 0o600
    assert optim.load(optim.SGD(arrays(1), lr=0.1), tmp_path / "c.npz").state[0]["step"] == 1


def test_load_passes_on_an_os_error(tmp_path):
    """A directory (or no permission) is an OSError about the path, not a
    ValueError about the file's contents."""
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError):
        optim.load(optim.SGD(arrays(1), lr=0.1), tmp_path / "d.npz")


def test_checkpoint_restores_the_convention_and_hyperparameters_as_saved(tmp_path):
    """A file round trip gives what load_state_dict of the dict gives: the saved
    convention (not the loading optimizer's) and the groups as they were, betas a tuple."""
    p = arrays(1, dtype=np.float32)
    opt = optim.Adam(p, convention="keras", lr=0.01, amsgrad=True)
    opt.step(arrays(1, seed=1, dtype=np.float32))
    optim.save(opt, tmp_path / "k.npz")
    back = optim.load(optim.Adam([p[0].copy()], lr=0.5), tmp_path / "k.npz")
    want, got = opt.state_dict(), back.state_dict()
    assert back.convention == "keras" and got["convention"] == "keras"
    assert got["param_groups"] == want["param_groups"]
    assert isinstance(back.param_groups[0]["betas"], tuple)


def test_checkpoint_through_a_symlink_keeps_the_link(tmp_path):
    opt = optim.SGD(arrays(1), lr=0.1)
    optim.save(opt, tmp_path / "real.npz")
    os.symlink(tmp_path / "real.npz", tmp_path / "link.npz")
    opt.step(arrays(1, seed=1))
    optim.save(opt, tmp_path / "link.npz")
    assert os.path.islink(tmp_path / "link.npz")
    assert optim.load(optim.SGD(arrays(1), lr=0.1), tmp_path / "real.npz").state[0]["step"] == 1


@pytest.mark.parametrize("content", ["junk", "truncated", "foreign", "npy"])
def test_load_of_a_file_that_is_not_a_checkpoint_is_a_value_error(tmp_path, content):
    opt = optim.SGD(arrays(1), lr=0.1)
    opt.step(arrays(1, seed=1))
    optim.save(opt, tmp_path / "good.npz")
    bad = tmp_path / "bad.npz"
    if content == "junk":
        bad.write_bytes(b"hello")
    elif content == "truncated":
        bad.write_bytes((tmp_path / "good.npz").read_bytes()[:300])
    elif content == "foreign":
        np.savez(bad, x=np.ones(2))
    else:
        bad = tmp_path / "bad.npy"
        np.save(bad, np.ones(2))
    before = snapshot(opt, opt._flat_params())
    with pytest.raises(ValueError, match="not a.*bncore optimizer checkpoint"):
        optim.load(opt, bad)
    assert_same(before, snapshot(opt, opt._flat_params()))


# ---- schedules

@pytest.mark.parametrize("make,exc,text", [
    (lambda: optim.cosine_lr(1.0, 5, warmup_steps=10), ValueError, "warmup_steps"),
    (lambda: optim.cosine_lr(1.0, float("inf")), ValueError, "total_steps"),
    (lambda: optim.cosine_lr(1.0, 10)(None), TypeError, "step"),
    (lambda: optim.cosine_lr(1.0, 10)(float("nan")), ValueError, "step"),
    (lambda: optim.step_lr(1.0, 2)(1.5), ValueError, "step"),
    (lambda: optim.step_lr(1.0, True), TypeError, "step_size"),
])
def test_schedules_reject_bad_counts(make, exc, text):
    with pytest.raises(exc, match=text):
        make()


def test_state_dict_after_an_in_place_edit_follows_the_parameters():
    a, b, c = arrays(3)
    opt = optim.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    for _ in range(5):
        opt.step(arrays(2, seed=1))
    b_state = opt.state[1]["exp_avg"].copy()
    opt.param_groups[0]["params"].append(c)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["params"] == [0, 1] and sd["param_groups"][1]["params"] == [2]
    assert 1 not in sd["state"]                           # c has no state yet
    np.testing.assert_array_equal(sd["state"][2]["exp_avg"], b_state)


def test_adagrad_state_without_its_sum_is_refused():
    opt = optim.Adagrad(arrays(1), lr=0.1)
    opt.step(arrays(1, seed=1))
    sd = opt.state_dict()
    del sd["state"][0]["sum"]
    with pytest.raises(ValueError, match="sum"):
        opt.load_state_dict(sd)


def test_a_state_dict_is_checked_under_the_convention_it_was_saved_with():
    """optax's SGD runs nesterov without momentum as plain SGD; torch's refuses
    it. Loading the optax state into an SGD built with torch's convention."""
    saved = optim.SGD(arrays(1), convention="optax", lr=0.1, nesterov=True)
    saved.step(arrays(1, seed=1))
    other = optim.SGD(arrays(1), lr=0.1)
    other.load_state_dict(saved.state_dict())
    assert other.convention == "optax" and other.param_groups[0]["nesterov"] is True


def test_schedules_take_a_0d_step_count():
    sched = optim.cosine_lr(1.0, 100)
    assert sched(np.array(7)) == sched(7) == optim.cosine_lr(1.0, np.array(100))(7)
    if torch is not None:
        assert sched(torch.tensor(7)) == sched(7)


def test_sgd_fast_path_keeps_torch_semantics_with_mixed_buffers():
    """A group where some parameters have a momentum buffer and some do not
    (one appended later) still gives each its own first step."""
    a, b = arrays(2)
    ta, tb = (torch.tensor(x.copy()) for x in (a, b)) if torch is not None else (None, None)
    opt = optim.SGD([a], lr=0.1, momentum=0.9, dampening=0.5)
    grads = arrays(4, seed=7)
    for g in grads[:2]:
        opt.step([g])
    opt.param_groups[0]["params"].append(b)
    for g in grads[2:]:
        opt.step([g, g])
    if torch is not None:
        topt = torch.optim.SGD([ta], lr=0.1, momentum=0.9, dampening=0.5)
        for g in grads[:2]:
            ta.grad = torch.tensor(g)
            topt.step()
        topt.param_groups[0]["params"].append(tb)
        for g in grads[2:]:
            ta.grad, tb.grad = torch.tensor(g), torch.tensor(g)
            topt.step()
        np.testing.assert_allclose(a, ta.numpy(), rtol=1e-14)
        np.testing.assert_allclose(b, tb.numpy(), rtol=1e-14)


# ---- found by review (2026-11-28): state left by a refused step, Fortran
# order through state_dict, 0-d optional state, groups of different dtypes

@pytest.mark.parametrize("cls, kw", [(optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.5)),
                                     (optim.Adam, dict(lr=0.1, amsgrad=True)),
                                     (optim.RMSprop, dict(lr=0.01, momentum=0.5,
                                                          centered=True))])
@pytest.mark.parametrize("when", ["first step", "option switched on"])
def test_a_step_the_kernel_refuses_leaves_no_state_behind(cls, kw, when):
    """The kernel call checks its arrays before writing; the state the step
    made for it (new entries, buffers added on first use) goes too. Left
    behind, SGD's zero buffer passed for an old one: the next steps drifted
    from a fresh optimizer's (and torch's)."""
    p, q = arrays(1, seed=5)[0], arrays(1, seed=5)[0]
    grads = arrays(3, seed=6)
    opt, ref = cls([p], **kw), cls([q], **kw)
    if when == "option switched on":
        for o in (opt, ref):            # state exists; the option's buffers do not yet
            key = "amsgrad" if cls is optim.Adam else "momentum"
            o.param_groups[0][key] = False if key == "amsgrad" else 0.0
            o.step([grads[0]])
            o.param_groups[0][key] = kw[key]
    before = snapshot(opt, [p])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(p.size + 1)])
    after = snapshot(opt, [p])
    assert after[1].keys() == before[1].keys()
    for i in before[1]:
        assert after[1][i].keys() == before[1][i].keys()
    for g in grads[1:]:
        opt.step([g])
        ref.step([g])
    np.testing.assert_array_equal(p, q)


def test_state_dict_round_trips_fortran_ordered_parameters(tmp_path):
    """state_dict keeps each array's memory order, and load_state_dict puts
    state in its parameter's order (a checkpoint may hold it in C order):
    the steps after a round trip, through a file too, equal those without."""
    rng = np.random.default_rng(7)
    make = lambda: [np.asfortranarray(rng.standard_normal((3, 4))) for _ in range(2)]  # noqa: E731
    p = make()
    q = [a.copy(order="F") for a in p]
    grads = [[np.asfortranarray(g) for g in make()] for _ in range(3)]
    opt = optim.Adam([{"params": [p[0]]}, {"params": [p[1]], "lr": 0.01}], amsgrad=True)
    ref = optim.Adam([{"params": [q[0]]}, {"params": [q[1]], "lr": 0.01}], amsgrad=True)
    for o in (opt, ref):
        o.step(grads[0])
    sd = opt.state_dict()
    assert all(v.flags.f_contiguous for s in sd["state"].values() for k, v in s.items()
               if k != "step")
    for s in sd["state"].values():      # as an older checkpoint held them
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            s[k] = np.ascontiguousarray(s[k])
    opt.load_state_dict(sd)
    optim.save(opt, str(tmp_path / "ck.npz"))
    optim.load(opt, str(tmp_path / "ck.npz"))
    for g in grads[1:]:
        opt.step(g)
        ref.step(g)
    for a, b in zip(p, q):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("cls, name, kw", [(optim.SGD, "momentum_buffer", dict(momentum=0.9)),
                                           (optim.Adam, "max_exp_avg_sq", dict(amsgrad=True)),
                                           (optim.RMSprop, "grad_avg", dict(centered=True))])
def test_optional_state_of_a_0d_parameter_is_checked_at_load(cls, name, kw):
    """Arrays made on first use are checked like the others, 0-d parameters
    included: a wrong dtype is refused at load, not at a later step (which,
    with several groups, could come after another group had stepped)."""
    p = np.array(1.5)
    opt = cls([p], lr=0.1, **kw)
    opt.step([np.array(0.5)])
    sd = opt.state_dict()
    sd["state"][0][name] = np.array(0.25, np.float32)
    with pytest.raises(ValueError, match=name):
        opt.load_state_dict(sd)
    sd["state"][0][name] = 0.25            # a number: the parameter's dtype
    opt.load_state_dict(sd)
    assert opt.state[0][name].dtype == np.float64 and opt.state[0][name] == 0.25
    opt.step([np.array(0.5)])


def test_groups_of_different_dtypes_step_together():
    """Each kernel call takes one dtype, but groups may differ (float32 and
    float64 parameters; float16 and float32 gradients), as in torch; a bad
    array still stops the step before anything is written, named by its
    index over all groups."""
    a, b = np.ones(3, np.float32), np.ones(3)
    opt = optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9)
    opt.step([np.full(3, 2, np.float32), np.full(3, 2.0)])
    np.testing.assert_allclose(a, 0.8, rtol=1e-7)
    np.testing.assert_allclose(b, 0.8, rtol=1e-15)
    before = snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(4,\)"):
        opt.step([np.ones(3, np.float32), np.ones(4)])
    after = snapshot(opt, [a, b])
    for x, y in zip(before[0], after[0]):
        np.testing.assert_array_equal(x, y)
    c, d = np.ones(3, np.float32), np.ones(3, np.float32)
    opt = optim.Adam([{"params": [c]}, {"params": [d], "lr": 0.01}])
    opt.step([np.ones(3, np.float16), np.ones(3, np.float32)])
    np.testing.assert_allclose(c, 1 - 1e-3, rtol=1e-6)
    np.testing.assert_allclose(d, 1 - 1e-2, rtol=1e-6)


def test_a_group_that_mixes_dtypes_is_refused_before_any_group_steps():
    """One kernel call per group: a group mixing dtypes is refused, with the
    step's other groups untouched, whether it comes first or last."""
    for order in (0, 1):
        a, b, c = np.ones(3, np.float32), np.ones(3), np.ones(3, np.float32)
        groups = [{"params": [a]}, {"params": [b, c]}]
        opt = optim.SGD(groups[::-1] if order else groups, lr=0.1)
        flat = [p for g in opt.param_groups for p in g["params"]]
        with pytest.raises(TypeError, match="one parameter group"):
            opt.step([np.ones_like(p) for p in flat])
        for p in (a, b, c):
            np.testing.assert_array_equal(p, 1.0)


def test_a_device_state_dict_loads_into_a_cpu_optimizer():
    """A GPU optimizer's state arrays (CuPy: np.asarray refuses them) are copied
    to the host; stood in for here by an object with CuPy's interface."""
    class Device:
        def __init__(self, a):
            self.a = a
            self.shape, self.dtype = a.shape, a.dtype

        @property
        def __cuda_array_interface__(self):
            return {"shape": self.a.shape}

        def get(self):
            return self.a.copy()

    p, q = arrays(1, seed=11)[0], arrays(1, seed=11)[0]
    opt, ref = optim.Adam([p], lr=0.1), optim.Adam([q], lr=0.1)
    for o in (opt, ref):
        o.step([np.full(3, 0.5)])
    sd = ref.state_dict()
    sd["state"][0] = {k: (Device(v) if k != "step" else v) for k, v in sd["state"][0].items()}
    opt.load_state_dict(sd)
    assert isinstance(opt.state[0]["exp_avg"], np.ndarray)
    for o in (opt, ref):
        o.step([np.full(3, -0.25)])
    np.testing.assert_array_equal(p, q)


def test_loading_another_conventions_state_dict_changes_the_defaults_too():
    """load_state_dict takes the saved convention; a group added afterwards got
    the constructor's convention's defaults (torch's eps and eps_style beside
    loaded Keras groups). The defaults now follow the loaded convention, the
    constructor's explicit arguments kept over them."""
    keras = optim.Adam(arrays(1), convention="keras")
    keras.step(arrays(1, seed=1))
    opt = optim.Adam(arrays(1), lr=0.01)
    opt.load_state_dict(keras.state_dict())
    assert opt.convention == "keras"
    opt.add_param_group({"params": arrays(1, seed=2)})
    added, loaded = opt.param_groups[1], opt.param_groups[0]
    for k in ("eps", "eps_style", "decoupled_weight_decay", "betas"):
        assert added[k] == loaded[k] == optim.Adam(arrays(1), convention="keras").defaults[k], k
    assert added["lr"] == 0.01                      # explicit: kept


def test_a_state_dict_with_an_unknown_convention_changes_nothing():
    """Found by review: the unknown convention raised only after the groups
    had taken the loaded hyperparameters."""
    src = optim.Adam(arrays(1), lr=0.5)
    src.step(arrays(1, seed=1))
    sd = src.state_dict()
    sd["convention"] = "Keras"
    params = arrays(1)
    opt = optim.Adam(params, lr=0.01)
    opt.step(arrays(1, seed=2))
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="Keras"):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, params))
    assert opt.param_groups[0]["lr"] == 0.01 and opt.convention == "torch"


def test_a_hyperparameter_that_cannot_be_deep_copied_is_accepted():
    """A learning rate computed from a tensor that requires grad (not a graph
    leaf: no deepcopy) constructs and steps, as it did before the defaults
    kept the constructor's arguments."""
    if torch is None:
        pytest.skip("torch not installed")
    lr = torch.tensor(0.01, requires_grad=True) * 1
    p = np.ones(3)
    opt = optim.SGD([p], lr=lr)
    opt.step([np.ones(3)])
    np.testing.assert_allclose(p, 0.99)


def test_groups_of_different_dtypes_may_not_overlap():
    """Each dtype's arrays were checked against each other only: a float32
    parameter viewing a float64 parameter's memory was accepted (found by
    review); the same overlap within one dtype was refused."""
    buf = np.ones(4)
    p32 = buf.view(np.float32)[:4]
    opt = optim.SGD([{"params": [p32]}, {"params": [buf]}], lr=0.1)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        opt.step([np.ones(4, np.float32), np.ones(4)])
    assert np.array_equal(buf, np.ones(4))


@pytest.mark.parametrize("groups", [1, 2])
def test_a_skipped_step_refuses_what_a_taken_one_would(groups):
    """found_inf skips the step, but a gradient that is a state array is still
    an error (the step function refuses it too), in one group or several."""
    params = arrays(3)
    spec = [{"params": params}] if groups == 1 else [{"params": params[:2]},
                                                     {"params": params[2:]}]
    opt = optim.Adam(spec, lr=0.1)
    opt.step(arrays(3, seed=1))
    before = snapshot(opt, params)
    grads = arrays(3, seed=2)
    grads[1] = opt.state[1]["exp_avg"]
    with pytest.raises(ValueError, match=r"grads\[1\] and exp_avgs\[1\] share memory"):
        opt.step(grads, found_inf=1.0)
    assert_same(before, snapshot(opt, params))
    opt.step(arrays(3, seed=3), found_inf=1.0)            # a good skipped step: nothing made
    assert_same(before, snapshot(opt, params))


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("cls, name, kw", [(optim.SGD, "momentum_buffer", dict(momentum=0.9)),
                                           (optim.Adam, "max_exp_avg_sq", dict(amsgrad=True)),
                                           (optim.RMSprop, "grad_avg", dict(centered=True))])
def test_an_optional_array_given_as_none_is_absent(shape, cls, name, kw):
    """Found by review: None (torch 1.x's "no momentum buffer") became
    np.asarray(None, float32) = nan for a 0-d parameter, which then poisoned
    the parameter; other shapes got a message about shape (). None is now the
    array's absence: the next step starts it as a fresh optimizer would."""
    def run(state_edit):
        p = np.full(shape, 1.5, np.float32)
        opt = cls([p], lr=0.1, **kw)
        opt.step([np.full(shape, 0.5, np.float32)])
        sd = opt.state_dict()
        state_edit(sd["state"][0])
        fresh = cls([p], lr=0.1, **kw)
        fresh.load_state_dict(sd)
        fresh.step([np.full(shape, 0.25, np.float32)])
        return p, fresh.state[0][name]
    p_none, s_none = run(lambda st: st.update({name: None}))
    p_gone, s_gone = run(lambda st: st.pop(name))
    assert np.all(np.isfinite(p_none))
    assert p_none.tobytes() == p_gone.tobytes() and s_none.tobytes() == s_gone.tobytes()


def test_a_group_key_that_is_not_a_string_loads_and_round_trips(tmp_path):
    """Found by review: add_param_group accepted a key such as 0, and then
    load_state_dict of the optimizer's own state_dict raised "keywords must be
    strings"; optim.save wrote integer keys of a dict value as strings, and a
    user's {"__tuple__": [...]} came back as a tuple."""
    p = arrays(1)
    opt = optim.SGD([{"params": p, 0: "tag", "milestones": {0: 0.1, 10: 0.01},
                      "cfg": {"__tuple__": [1]}, "pair": {(1, 2): "x"}}], lr=0.1)
    opt.load_state_dict(opt.state_dict())
    optim.save(opt, tmp_path / "c.npz")
    back = optim.SGD([arrays(1)[0].copy()], lr=0.5)
    optim.load(back, tmp_path / "c.npz")
    g = back.param_groups[0]
    assert g[0] == "tag" and g["milestones"] == {0: 0.1, 10: 0.01}
    assert g["cfg"] == {"__tuple__": [1]} and g["pair"] == {(1, 2): "x"} and g["lr"] == 0.1


def test_step_lr_where_gamma_power_leaves_float64_but_the_product_does_not():
    """Found by review: gamma ** k overflowed (or underflowed) on its own, so
    step_lr gave inf (or 0) where base_lr * gamma ** k is an ordinary float, the
    value torch's recursive StepLR multiplies its way to."""
    from fractions import Fraction
    for base, gamma, k in [(1e-300, 2.0, 1100), (1e300, 0.5, 1100), (3e-200, 1.5, 1500),
                           (2.0, 0.25, 530)]:
        exact = float(Fraction(base) * Fraction(gamma) ** k)
        got = optim.step_lr(base, 1, gamma)(k)
        assert got == pytest.approx(exact, rel=1e-12), (base, gamma, k)
    assert optim.step_lr(1e-300, 1, 0.5)(1100) == float(Fraction(1e-300) / 2 ** 1100) == 0.0
    assert optim.step_lr(1e10, 1, 2.0)(1100) == np.inf
    # within float64, torch's closed form bit for bit, a subnormal gamma ** k
    # included (exact for a power of two; review: the fallback once took it)
    assert optim.step_lr(0.1, 3, 0.7)(40) == 0.1 * 0.7 ** 13
    for base, gamma, k in [(1e300, 0.5, 1030), (1e300, 0.5, 1074), (1.0, 0.1, 310)]:
        assert optim.step_lr(base, 1, gamma)(k) == base * gamma ** k


def test_cosine_starts_at_base_lr_exactly():
    """Found by review: min + (base - min) * 0.5 * 2 rounds to 0.010000000000000002
    for (0.01, 0.001); torch's CosineAnnealingLR starts at its base lr."""
    assert optim.cosine_lr(0.01, 100, 0.001)(0) == 0.01
    assert optim.cosine_lr(0.01, 110, 0.001, warmup_steps=10)(10) == 0.01
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=0.001)
    ours = optim.cosine_lr(0.01, 100, 0.001)
    for k in range(5):
        assert ours(k) == pytest.approx(sched.get_last_lr()[0], rel=1e-15, abs=0)
        opt.step()
        sched.step()


def test_cosine_never_rises_above_base_lr():
    """Review: with base_lr exact at step 0, step 1 of a long schedule could
    round one ulp above it (0.7052833998544062 then ...064): the schedule rose."""
    s = optim.cosine_lr(0.7052833998544062, 10 ** 9, 0.1944001701948989)
    assert s(0) == 0.7052833998544062 >= s(1) >= s(2)
    rng = np.random.default_rng(0)
    for base, lo in rng.uniform(0.01, 1.0, size=(300, 2)):
        s = optim.cosine_lr(base, 10 ** 9, lo)
        vals = [s(k) for k in (0, 1, 2, 10 ** 9 - 1, 10 ** 9, 10 ** 9 + 5)]
        assert all(min(base, lo) <= v <= max(base, lo) for v in vals)
        if lo <= base:
            assert vals == sorted(vals, reverse=True)


def test_checkpoint_keys_json_cannot_hold_are_saved_as_text(tmp_path):
    """Review: a group key such as an Enum made optim.save raise TypeError
    (keys were always saved as str() before; they still are, for those)."""
    import enum

    class Tag(enum.Enum):
        A = 1
    opt = optim.SGD([{"params": arrays(1), "tags": {Tag.A: 1, 2: "two"}}], lr=0.1)
    optim.save(opt, tmp_path / "c.npz")
    back = optim.SGD(arrays(1), lr=0.5)
    optim.load(back, tmp_path / "c.npz")
    assert back.param_groups[0]["tags"] == {"Tag.A": 1, 2: "two"}
    opt = optim.SGD([{"params": arrays(1), "tags": {(Tag.A, 1): 2}}], lr=0.1)
    optim.save(opt, tmp_path / "d.npz")          # (review: a tuple holding an Enum failed)
    optim.load(back, tmp_path / "d.npz")
    assert back.param_groups[0]["tags"] == {("Tag.A", 1): 2}


def test_linear_warmup_checks_after_when_built():
    """Found by review: a number as after= failed at the first step past the
    warm-up, with "'float' object is not callable"."""
    with pytest.raises(TypeError, match="after"):
        optim.linear_warmup(0.1, 3, after=0.01)

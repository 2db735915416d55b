"""bncore.distributed without an MPI job: what holds on one process.

* ``import bncore`` (and bncore.distributed) never imports mpi4py;
* the rank combination (Chan's update in rank order) against pooled statistics;
* on a one-rank communicator the synchronized functions are bitwise the
  single-process ones, for every dtype, layout and ``out=``: the split
  kernel entry points run the same code as the fused drivers.

The communicator here is a stand-in with the four methods bncore uses, so
these run where mpi4py is not installed; tests/test_distributed.py runs the
real MPI jobs.
"""
import subprocess
import sys

import numpy as np
import pytest

import bncore
import bncore.distributed as dist


class OneRank:
    """A communicator of size 1 (what MPI.COMM_SELF does, without MPI)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allgather(self, send, recv):
        recv[...] = np.asarray(send).reshape(recv.shape)

    def allgather(self, obj):
        return [obj]


COMM = OneRank()


def test_import_does_not_load_mpi4py():
    code = ("import sys, bncore, bncore.distributed; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_combine_statistics_equals_pooled():
    rng = np.random.default_rng(0)
    C = 5
    sizes = [0, 7, 1, 0, 30, 2, 0]
    parts = [1e3 + rng.standard_normal((n, C)) * rng.uniform(0.1, 3, C) for n in sizes]
    counts = np.array(sizes, dtype=float)
    means = np.array([p.mean(axis=0) if len(p) else np.zeros(C) for p in parts])
    m2s = np.array([((p - p.mean(axis=0)) ** 2).sum(axis=0) if len(p) else np.zeros(C)
                    for p in parts])
    N, mean, m2 = dist.combine_statistics(counts, means, m2s)
    allx = np.concatenate(parts).astype(np.longdouble)
    want_mean = allx.mean(axis=0)
    want_m2 = ((allx - want_mean) ** 2).sum(axis=0)
    assert N == sum(sizes)
    assert np.max(np.abs(mean - want_mean) / np.abs(want_mean)) < 1e-15
    assert np.max(np.abs(m2 - want_m2) / want_m2) < 1e-13


def test_combine_statistics_all_empty_and_single():
    N, mean, m2 = dist.combine_statistics(np.zeros(3), np.zeros((3, 2)), np.zeros((3, 2)))
    assert N == 0 and not mean.any() and not m2.any()
    means = np.array([[0.0, 0.0], [1.5, -2.0], [0.0, 0.0]])
    m2s = np.array([[0.0, 0.0], [4.0, 8.0], [0.0, 0.0]])
    N, mean, m2 = dist.combine_statistics(np.array([0.0, 5.0, 0.0]), means, m2s)
    assert N == 5 and mean.tobytes() == means[1].tobytes() and m2.tobytes() == m2s[1].tobytes()


CASES = [((6, 4, 5, 7), 1, np.float64, "c"), ((6, 4, 5, 7), 1, np.float32, "c"),
         ((6, 5, 7, 4), 3, np.float32, "c"), ((6, 4, 5, 7), 1, np.float16, "c"),
         ((40, 3), 1, np.float64, "fortran"), ((6, 4, 5, 7), 1, np.float32, "strided")]


def _layout(a, kind):
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "strided":
        big = np.zeros((a.shape[0] * 2,) + a.shape[1:], a.dtype)
        big[::2] = a
        return big[::2]
    return a


@pytest.mark.parametrize("shape,axis,dtype,layout", CASES)
def test_one_rank_is_bitwise_single_process(shape, axis, dtype, layout):
    rng = np.random.default_rng(1)
    x = _layout((3 + 2 * rng.standard_normal(shape)).astype(dtype), layout)
    dy = _layout(rng.standard_normal(shape).astype(dtype), layout)
    C = shape[axis]
    w, b = rng.normal(1, 0.2, C).astype(np.float32), rng.normal(0, 0.2, C)
    rm1, rv1 = np.zeros(C, dtype), np.ones(C, dtype)
    rm2, rv2 = rm1.copy(), rv1.copy()
    got = dist.sync_batch_norm_forward(x, w, b, rm1, rv1, comm=COMM, axis=axis, momentum=0.2)
    want = bncore.batch_norm_forward(x, w, b, rm2, rv2, axis=axis, momentum=0.2)
    for g, e in zip(got + (rm1, rv1), want + (rm2, rv2)):
        assert g.dtype == e.dtype and g.tobytes() == e.tobytes()
    gb = dist.sync_batch_norm_backward(dy, x, got[1], got[2], w, comm=COMM, axis=axis)
    wb = bncore.batch_norm_backward(dy, x, want[1], want[2], w, axis=axis)
    for g, e in zip(gb, wb):
        assert g.dtype == e.dtype and g.shape == e.shape and g.tobytes() == e.tobytes()


def test_out_arguments_and_inference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 3, 4)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y_out = np.empty_like(x)
    y, mean, invstd = dist.sync_batch_norm_forward(x, comm=COMM, out=y_out)
    assert y is y_out
    outs = (np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32))
    dx, dw, db = dist.sync_batch_norm_backward(dy, x, mean, invstd, comm=COMM, out=outs)
    assert dx is outs[0] and dw is outs[1] and db is outs[2]
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    ye, _, _ = dist.sync_batch_norm_forward(x, None, None, rm, rv, comm=COMM, training=False)
    assert ye.tobytes() == bncore.batch_norm_forward(x, None, None, rm, rv,
                                                     training=False)[0].tobytes()


def test_layer_and_clipping_on_one_rank():
    rng = np.random.default_rng(3)
    sbn, bn = dist.SyncBatchNorm(4, comm=COMM), bncore.BatchNorm(4)
    for _ in range(2):
        x = rng.standard_normal((5, 4, 3)).astype(np.float32)
        assert sbn.forward(x).tobytes() == bn.forward(x).tobytes()
        assert sbn.backward(x).tobytes() == bn.backward(x).tobytes()
    for k, v in bn.state_dict().items():
        assert sbn.state_dict()[k].tobytes() == v.tobytes()
    for p in (2.0, 1.0, 3.0, float("inf")):
        g1 = [rng.standard_normal(100), rng.standard_normal(7)]
        g2 = [a.copy() for a in g1]
        assert bncore.clip_grad_norm(g1, 0.5, norm_type=p, comm=COMM) == \
            bncore.clip_grad_norm(g2, 0.5, norm_type=p)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(g1, g2))


def test_local_errors_raise_through_the_protocol():
    x = np.ones((4, 3, 2))
    with pytest.raises(ValueError, match=r"failed on rank 0 of 1: weight must have shape"):
        dist.sync_batch_norm_forward(x, np.ones(4), comm=COMM)
    with pytest.raises(ValueError, match="over all ranks, got 1"):
        dist.sync_batch_norm_forward(x[:1, :, :1], comm=COMM)
    with pytest.raises(TypeError, match="mpi4py communicator"):
        dist.sync_batch_norm_forward(x, comm=object())
    with pytest.raises(ValueError, match="max_norm"):
        dist.clip_grad_norm([x], -1.0, comm=COMM)
    with pytest.raises(ValueError, match="weight_grads"):
        dist.SyncBatchNorm(3, comm=COMM, weight_grads="sum")


# ---- several ranks as threads (tests/thread_comm.py)

def _every_rank(P, fn, timeout=10.0):
    """fn(comm) on P thread-ranks without aborting the others when one raises
    (which would hide a hang): each rank's result or exception."""
    import thread_comm
    return thread_comm.run_ranks(P, fn, abort=False, timeout=timeout)


def test_far_offset_channels_are_combined_as_accurately_as_in_one_process():
    """Rank means exchanged as (pivot, mean less it): with |mean| = 1e7 std the
    combined variance is as accurate as the single-process one (the absolute
    means' rounding put it 2e-11 away)."""
    import thread_comm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)) + np.array([1e3, 1e7, 1e9])
    exact = 1.0 / np.sqrt(np.var(x.astype(np.longdouble), axis=0) + np.longdouble(1e-5))
    _, _, inv1 = bncore.batch_norm_forward(x)
    parts = np.split(x, [7, 16, 21])
    got = thread_comm.run_ranks(4, lambda c: dist.sync_batch_norm_forward(
        parts[c.Get_rank()], comm=c)[2])
    for inv in [inv1] + got:
        np.testing.assert_allclose(inv, exact.astype(np.float64), rtol=2e-15)


@pytest.mark.parametrize("row", [0, 5])
def test_an_infinite_value_on_any_rank_gives_an_infinite_mean(row):
    import thread_comm
    x = np.random.default_rng(1).standard_normal((8, 3))
    x[row, 0] = np.inf
    _, mean1, _ = bncore.batch_norm_forward(x)
    got = thread_comm.run_ranks(2, lambda c: dist.sync_batch_norm_forward(
        x[4 * c.Get_rank():4 * c.Get_rank() + 4], comm=c)[1])
    for mean in got:
        assert mean[0] == np.inf == mean1[0]
        np.testing.assert_allclose(mean[1:], mean1[1:], rtol=1e-14)


def test_layer_with_a_wrong_channel_count_on_one_rank_raises_everywhere():
    """A local check before the collective left the other ranks waiting."""
    def fn(c):
        layer = dist.SyncBatchNorm(4, comm=c)
        return layer.forward(np.ones((3, 4 if c.Get_rank() == 0 else 5)))
    out = _every_rank(2, fn)
    assert all(isinstance(e, ValueError) for e in out), out


@pytest.mark.parametrize("training", [True, False])
def test_weight_grads_must_agree_on_every_rank(training):
    x = np.random.default_rng(2).standard_normal((8, 3))
    _, mean, invstd = bncore.batch_norm_forward(x)

    def fn(c):
        wg = "global" if c.Get_rank() == 0 else "local"
        return dist.sync_batch_norm_backward(x, x, mean, invstd, comm=c, training=training,
                                             weight_grads=wg)
    out = _every_rank(2, fn)
    assert all(isinstance(e, ValueError) and "weight_grads" in str(e) for e in out), out


def test_layer_without_parameters_checks_its_channel_count_on_every_rank():
    """affine=False and no running statistics: nothing else knows num_features,
    so the layer's own check runs, and joins the collective when it fails."""
    def fn(c):
        layer = dist.SyncBatchNorm(4, affine=False, track_running_stats=False, comm=c)
        return layer.forward(np.ones((3, 5)))
    out = _every_rank(2, fn)
    assert all(isinstance(e, ValueError) and "num_features" in str(e) for e in out), out


def test_far_offset_channels_with_an_empty_first_rank():
    """An empty shard reports (pivot, mean - pivot, M2) = 0: the combination
    must take its base pivot from the first rank that has values, else the
    rank means are taken relative to 0 and |mean| = 1e7 std costs the
    variance ~1e-11 of its accuracy."""
    import thread_comm
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3)) + np.array([1e3, 1e7, 1e9])
    exact = 1.0 / np.sqrt(np.var(x.astype(np.longdouble), axis=0) + np.longdouble(1e-5))
    parts = np.split(x, [0, 16, 21])
    assert parts[0].shape == (0, 3)
    got = thread_comm.run_ranks(4, lambda c: dist.sync_batch_norm_forward(
        parts[c.Get_rank()], comm=c)[2])
    for inv in got:
        np.testing.assert_allclose(inv, exact.astype(np.float64), rtol=2e-15)


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_distributed_norms_of_tiny_gradients_do_not_underflow(p):
    """As on one process: powers below float64's normal range are summed again
    on gradients scaled by their largest magnitude (the distributed 2-norm of
    1e-170s was 0, so clip_grad_norm with eps = 0 left them unclipped)."""
    import thread_comm
    for scale in (1e-170, 5e-324):
        shards = [[np.full(4, scale)], [np.full(3, -2 * scale)], [np.zeros(2)]]
        whole = bncore.grad_norm([a for s in shards for a in s], norm_type=p)
        assert whole > 0
        got = thread_comm.run_ranks(3, lambda c: dist.grad_norm(
            shards[c.Get_rank()], norm_type=p, comm=c))
        for g in got:
            assert g == pytest.approx(whole, rel=1e-14 if scale > 1e-300 else 1.0)
    clipped = thread_comm.run_ranks(2, lambda c: [dist.clip_grad_norm(
        [np.full(4, 1e-170)], 1e-171, eps=0.0, comm=c), None][0])
    assert all(v == pytest.approx(1e-170 * np.sqrt(8), rel=1e-14) for v in clipped)


def test_a_distributed_p_norm_past_float64_is_inf_not_an_exception():
    import thread_comm
    got = thread_comm.run_ranks(2, lambda c: dist.grad_norm([np.full(10, 1e300)], 0.1,
                                                           comm=c))
    assert got == [np.inf, np.inf] and bncore.grad_norm([np.full(20, 1e300)], 0.1) == np.inf


@pytest.mark.parametrize("name, value", [("training", "False"),
                                         ("unbiased_running_var", "False")])
def test_sync_forward_on_off_arguments_must_be_bools(name, value):
    x = np.random.default_rng(2).standard_normal((6, 3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        dist.sync_batch_norm_forward(x, None, None, rm, rv, comm=COMM, **{name: value})
    assert (rm == 0).all() and (rv == 1).all()


@pytest.mark.parametrize("name", ["training", "unbiased_running_var"])
def test_a_bad_on_off_argument_on_one_rank_raises_on_every_rank(name):
    """The flags were checked before the validation exchange: the rank with the
    bad value raised alone and left the others waiting in it (an MPI hang)."""
    x = np.random.default_rng(3).standard_normal((8, 3))

    def fn(c):
        r = c.Get_rank()
        return dist.sync_batch_norm_forward(x[4 * r:4 * r + 4], None, None, np.zeros(3),
                                            np.ones(3), comm=c,
                                            **{name: "yes" if r == 1 else True})
    out = _every_rank(2, fn)
    assert all(isinstance(e, TypeError) and f"{name} must be a bool" in str(e)
               and "rank 1" in str(e) for e in out), out


def test_layer_with_a_ragged_list_on_one_rank_raises_everywhere():
    """The layer took a list's shape before its collective-aware check."""
    def fn(c):
        layer = dist.SyncBatchNorm(2, comm=c)
        x = [[1.0, 2.0], [3.0]] if c.Get_rank() == 1 else np.ones((3, 2))
        return layer.forward(x)
    out = _every_rank(2, fn)
    assert all(isinstance(e, ValueError) for e in out), out


@pytest.mark.parametrize("momentum, inf_in", [(0.0, "x"), (1.0, "running")])
def test_infinite_values_update_running_statistics_without_floating_point_errors(momentum,
                                                                                 inf_in):
    """0 * inf in the running-statistics update is NaN, as in one process: no
    FloatingPointError under np.errstate(all="raise"), no warning."""
    x = np.random.default_rng(4).standard_normal((8, 2))
    rm1, rv1 = np.zeros(2), np.ones(2)
    if inf_in == "x":
        x[1, 0] = np.inf
    else:
        rm1[0] = rv1[0] = np.inf
    bncore.batch_norm_forward(x, None, None, rm1, rv1, momentum=momentum)
    assert np.isnan(rm1[0]) and np.isnan(rv1[0])

    def fn(c):
        r = c.Get_rank()
        rm = np.zeros(2) if inf_in == "x" else np.array([np.inf, 0.0])
        rv = np.ones(2) if inf_in == "x" else np.array([np.inf, 1.0])
        with np.errstate(all="raise"):
            dist.sync_batch_norm_forward(x[4 * r:4 * r + 4], None, None, rm, rv, comm=c,
                                         momentum=momentum)
        return rm, rv
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _every_rank(2, fn)
    for got in out:
        assert not isinstance(got, BaseException), got
        # channel 0 NaN, channel 1 the combined statistics (Chan's order: within 1 ulp)
        np.testing.assert_allclose(got[0], rm1, rtol=1e-15)
        np.testing.assert_allclose(got[1], rv1, rtol=1e-15)


def test_layer_in_eval_without_running_statistics_is_local_as_in_torch():
    """torch.nn.SyncBatchNorm syncs only in training; in eval() without running
    statistics each rank normalizes with its own batch (and one rank may
    evaluate alone). bncore synced, giving every rank the whole batch's
    statistics, and a rank alone waited for the others."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 3)) * np.array([1.0, 2.0, 3.0]) + np.array([0.0, 5.0, -1.0])
    dy = rng.standard_normal((8, 3))
    shards = [x[:4], x[4:]]
    dys = [dy[:4], dy[4:]]

    def local(r):
        layer = bncore.BatchNorm(3, track_running_stats=False).eval()
        y = layer.forward(shards[r])
        return y, layer.backward(dys[r]), layer.grad_weight, layer.grad_bias

    def fn(c):
        r = c.Get_rank()
        layer = dist.SyncBatchNorm(3, track_running_stats=False, comm=c).eval()
        y = layer.forward(shards[r])
        return y, layer.backward(dys[r]), layer.grad_weight, layer.grad_bias
    out = _every_rank(2, fn)
    for r, got in enumerate(out):
        assert not isinstance(got, BaseException), got
        for a, b in zip(got, local(r)):
            np.testing.assert_array_equal(a, b)
    # one rank alone: nothing to wait for
    alone = _every_rank(2, lambda c: fn(c) if c.Get_rank() == 0 else None, timeout=3.0)
    assert not isinstance(alone[0], BaseException), alone
    # in training the same layer still spans both ranks
    train = _every_rank(2, lambda c: dist.SyncBatchNorm(
        3, track_running_stats=False, comm=c).forward(shards[c.Get_rank()]))
    y_all, _, _ = bncore.batch_norm_forward(x)
    np.testing.assert_allclose(np.concatenate(train), y_all, rtol=1e-13, atol=1e-13)


def test_torch_tensors_written_on_one_rank_tell_autograd():
    """As the local functions: running statistics, out= and clipped gradients
    that are torch tensors get their version counter bumped."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((8, 3))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    y_out = torch.empty(8, 3, dtype=torch.float64)
    y, mean, invstd = dist.sync_batch_norm_forward(x, None, None, rm, rv, comm=COMM, out=y_out)
    assert rm._version > 0 and rv._version > 0 and y_out._version > 0
    dx_out = torch.empty(8, 3, dtype=torch.float64)
    dist.sync_batch_norm_backward(np.ones((8, 3)), x, mean, invstd, comm=COMM,
                                  out=(dx_out, None, None))
    assert dx_out._version > 0
    g = torch.full((4,), 3.0, dtype=torch.float64)
    bncore.clip_grad_norm([g], 1.0, comm=COMM)
    assert g._version > 0 and abs(float(g.norm()) - 1.0) < 1e-6


def test_ranks_in_different_collective_calls_raise_everywhere():
    """Each rank's header says which operation sent it (review: rank 0 logging
    grad_norm while rank 1 clipped returned a norm on rank 0 built from the
    other call's header and left it waiting in its next collective; grad_norm
    beside a forward returned sqrt(C + dtype code) without an error)."""
    x = np.random.default_rng(3).standard_normal((6, 2))
    _, mean, invstd = bncore.batch_norm_forward(x)
    g = [np.ones(4)]
    calls = {
        "grad_norm": lambda c: dist.grad_norm([a.copy() for a in g], comm=c),
        "clip": lambda c: dist.clip_grad_norm([a.copy() for a in g], 1.0, comm=c),
        "forward": lambda c: dist.sync_batch_norm_forward(x, comm=c),
        "backward": lambda c: dist.sync_batch_norm_backward(x, x, mean, invstd, comm=c),
    }
    for first, second in (("grad_norm", "clip"), ("grad_norm", "forward"),
                          ("forward", "backward"), ("clip", "backward")):
        out = _every_rank(2, lambda c: calls[first if c.Get_rank() == 0 else second](c))
        assert all(isinstance(e, ValueError) and "different collective calls" in str(e)
                   for e in out), (first, second, out)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_a_different_channel_axis_on_one_rank_raises_everywhere(direction):
    """x of shape (3, 4, 4) with the channels on axis 1 on one rank and axis 2
    on the other has the same channel count: the statistics mixed channels
    with positions on both ranks, silently (review)."""
    x = np.random.default_rng(4).standard_normal((3, 4, 4))
    _, mean, invstd = bncore.batch_norm_forward(x)

    def fn(c):
        axis = 1 if c.Get_rank() == 0 else 2
        if direction == "forward":
            return dist.sync_batch_norm_forward(x, comm=c, axis=axis)
        return dist.sync_batch_norm_backward(x, x, mean, invstd, comm=c, axis=axis)
    out = _every_rank(2, fn)
    assert all(isinstance(e, ValueError) and "channel axis of x is axis 2 of 3" in str(e)
               for e in out), out


def test_ranks_with_different_numbers_of_dimensions_combine_their_channels():
    """(N, C) on one rank and (N, C, L) on another, channels on axis 1: the
    layout check refuses only different axes among ranks of one ndim (review:
    the first version refused this, which worked before)."""
    rng = np.random.default_rng(5)
    parts = [rng.standard_normal((6, 3)), rng.standard_normal((4, 3, 5))]

    def fn(c):
        return dist.sync_batch_norm_forward(parts[c.Get_rank()], comm=c, axis=1)[1]
    out = _every_rank(2, fn)
    pooled = np.concatenate([parts[0], parts[1].transpose(0, 2, 1).reshape(-1, 3)])
    for mean in out:
        np.testing.assert_allclose(mean, pooled.mean(axis=0), rtol=1e-13, atol=1e-15)

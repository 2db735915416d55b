"""bncore_gpu.distributed on a device, with threads playing the ranks
(tests/thread_comm.py), so that it runs where MPI is not installed (the GPU
machine; tests/test_distributed.py runs the same engine under mpiexec, on the
emulated device in CI). The cases and tolerances are those of the MPI tests
(tests/mpi_cases.py): each rank's shard goes through the GPU collectives and
the reassembled result is compared with single-process CPU bncore on the
whole batch; what must be identical on every rank is compared bit for bit.
Skipped (with the reason) without CuPy or a CUDA device.
"""
import numpy as np
import pytest

import bncore
from bncore.testing.reference import normwise_relative_error as rel_err
from mpi_cases import (BN_CASES, CLIP_CASES, TOL, bn_data, clip_data, clip_shard, clip_unshard,
                       shard, split)
from thread_comm import run_ranks

try:
    import cupy
    import bncore_gpu
    import bncore_gpu.distributed as gdist
    _REASON = None
except (ImportError, RuntimeError) as exc:     # no CuPy, or no device
    cupy = bncore_gpu = gdist = None
    _REASON = f"no usable GPU: {exc}"

pytestmark = pytest.mark.skipif(cupy is None, reason=_REASON or "")

RANKS = (2, 3)


def _host(d):
    return {k: cupy.asnumpy(v) for k, v in d.items()}


def _close(got, want, tol, what):
    err = rel_err(got, want, floor=1e-300)
    assert err <= tol, f"{what}: {err:.3e} > {tol:.0e}"


def _same_on_every_rank(ranks, key):
    for r in range(1, len(ranks)):
        assert ranks[r][key].tobytes() == ranks[0][key].tobytes(), f"{key}: rank {r} differs"


@pytest.mark.parametrize("P", RANKS)
@pytest.mark.parametrize("case", list(BN_CASES))
def test_sync_batch_norm_on_device_equals_single_process(case, P):
    c = BN_CASES[case]
    x, dy, w, b, rm, rv = bn_data(case)
    sizes = split(x.shape[0], P, c["rule"])

    def rank(comm):
        r = comm.Get_rank()
        xs, dys = cupy.asarray(shard(x, sizes, r)), cupy.asarray(shard(dy, sizes, r))
        wd, rmd, rvd = cupy.asarray(w), cupy.asarray(rm), cupy.asarray(rv)
        y, mean, invstd = gdist.sync_batch_norm_forward(xs, wd, cupy.asarray(b), rmd, rvd,
                                                        comm=comm, momentum=0.3, axis=c["axis"])
        dx, dw, db = gdist.sync_batch_norm_backward(dys, xs, mean, invstd, wd, comm=comm,
                                                    axis=c["axis"])
        return _host(dict(y=y, mean=mean, invstd=invstd, rm=rmd, rv=rvd, dx=dx, dw=dw, db=db))

    ranks = run_ranks(P, rank)
    y, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, momentum=0.3, axis=c["axis"])
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=c["axis"])
    tol = TOL[c["dtype"]]
    _close(np.concatenate([g["y"] for g in ranks]), y, tol, "y")
    _close(np.concatenate([g["dx"] for g in ranks]), dx, tol, "dx")
    _close(ranks[0]["mean"], mean, 1e-12, "mean")
    _close(ranks[0]["invstd"], invstd, 1e-12, "invstd")
    for key, want in (("rm", rm), ("rv", rv), ("dw", dw), ("db", db)):
        _close(ranks[0][key], want, tol, key)
    for key in ("mean", "invstd", "rm", "rv", "dw", "db"):
        _same_on_every_rank(ranks, key)


@pytest.mark.parametrize("P", RANKS)
@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_distributed_clipping_on_device_equals_single_process(case, P):
    c = CLIP_CASES[case]
    grads = clip_data(case)

    def rank(comm):
        mine = [cupy.asarray(g) for g in clip_shard(grads, P, comm.Get_rank(), c["rule"])]
        norm = bncore_gpu.grad_norm(mine, c["p"], comm=comm)
        total = bncore_gpu.clip_grad_norm(mine, c["max_norm"], norm_type=c["p"], eps=c["eps"],
                                          comm=comm)
        flat = (np.concatenate([cupy.asnumpy(g).ravel() for g in mine]) if mine
                else np.zeros(0, grads[0].dtype))
        return {"norm": np.array([float(norm), float(total)]), "clipped": flat}

    ranks = run_ranks(P, rank)
    want = bncore.clip_grad_norm(grads, c["max_norm"], norm_type=c["p"], eps=c["eps"])
    _same_on_every_rank(ranks, "norm")
    for v in ranks[0]["norm"]:
        assert (np.isnan(v) and np.isnan(want)) or abs(v - want) <= 1e-12 * abs(want), (v, want)
    got = clip_unshard(case, [g["clipped"] for g in ranks])
    for k, (a, b) in enumerate(zip(got, grads)):
        scale = np.max(np.abs(b[np.isfinite(b)]), initial=1.0)
        _close(a / scale, b / scale, TOL[c["dtype"]], f"clipped grads[{k}]")


def test_a_failing_rank_makes_every_rank_raise():
    def rank(comm):
        C = 5 if comm.Get_rank() == 1 else 4
        x = cupy.asarray(np.random.default_rng(comm.Get_rank()).standard_normal((3, C, 5)))
        try:
            gdist.sync_batch_norm_forward(x, comm=comm)
        except ValueError as exc:
            return str(exc)
        return None

    messages = run_ranks(3, rank)
    assert all(m is not None and "channel count of x is 5 on rank 1 but 4" in m
               for m in messages), messages
    assert len(set(messages)) == 1


def test_sync_batch_norm_layer_on_device():
    """SyncBatchNorm over 2 thread-ranks for 2 steps equals BatchNorm on the whole batch."""
    rng = np.random.default_rng(5)
    xs = [(2.0 + rng.standard_normal((6, 3, 4, 4))) for _ in range(2)]
    dys = [rng.standard_normal((6, 3, 4, 4)) for _ in range(2)]

    def rank(comm):
        r = comm.Get_rank()
        bn = gdist.SyncBatchNorm(3, comm=comm, dtype=np.float64)
        out = []
        for x, dy in zip(xs, dys):
            y = bn.forward(cupy.asarray(x[r * 3:(r + 1) * 3]))
            dx = bn.backward(cupy.asarray(dy[r * 3:(r + 1) * 3]))
            out.append((cupy.asnumpy(y), cupy.asnumpy(dx), cupy.asnumpy(bn.grad_weight)))
        return out, cupy.asnumpy(bn.running_var)

    (out0, rv0), (out1, rv1) = run_ranks(2, rank)
    ref = bncore.BatchNorm(3, dtype=np.float64)
    for k, (x, dy) in enumerate(zip(xs, dys)):
        y = ref.forward(x)
        dx = ref.backward(dy)
        _close(np.concatenate([out0[k][0], out1[k][0]]), y, 1e-12, f"y step {k}")
        _close(np.concatenate([out0[k][1], out1[k][1]]), dx, 1e-12, f"dx step {k}")
        _close(out0[k][2], ref.grad_weight, 1e-12, f"grad_weight step {k}")
    assert rv0.tobytes() == rv1.tobytes()
    _close(rv0, ref.running_var, 1e-12, "running_var")


def test_sync_statistics_with_an_outlier_as_pivot():
    """Each rank's statistics pivot on its shard's first value; an outlier there
    (1e4 std) is summed again against the shard's mean, as in one process."""
    rng = np.random.default_rng(5)
    x = 10.0 + 1e-5 * rng.standard_normal((12, 3, 60, 60))
    x[::4, :, 0, 0] += 0.1                       # the first value of every rank's shard

    def rank(comm):
        r = comm.Get_rank()
        xs = cupy.asarray(x[4 * r:4 * r + 4])
        _, mean, invstd = gdist.sync_batch_norm_forward(xs, comm=comm, eps=1e-30)
        return _host(dict(mean=mean, invstd=invstd))

    ranks = run_ranks(3, rank)
    xl = x.astype(np.longdouble)
    var = xl.var(axis=(0, 2, 3))
    got = 1.0 / ranks[0]["invstd"].astype(np.longdouble) ** 2
    assert np.max(np.abs(got / var - 1)) < 1e-13


def test_sync_layer_in_eval_without_running_statistics_is_local_on_device():
    """As torch.nn.SyncBatchNorm: eval() without running statistics normalizes
    each rank with its own batch, on the device, with no collective."""
    rng = np.random.default_rng(6)
    shards = [rng.standard_normal((4, 3)) + 3.0 for _ in range(2)]

    def rank(comm):
        layer = gdist.SyncBatchNorm(3, track_running_stats=False, comm=comm,
                                    dtype=np.float64).eval()
        y = layer.forward(cupy.asarray(shards[comm.Get_rank()]))
        assert isinstance(y, cupy.ndarray)
        return cupy.asnumpy(y)

    for r, y in enumerate(run_ranks(2, rank)):
        want = bncore.BatchNorm(3, track_running_stats=False, dtype=np.float64).eval()
        _close(y, want.forward(shards[r]), 1e-12, f"rank {r}")

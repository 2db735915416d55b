"""One MPI job of the distributed tests: ``mpiexec -n P python tests/mpi_worker.py JOB OUTDIR``.

Every rank builds the global data of each case (tests/mpi_cases.py), works on
its own shard with bncore.distributed and writes what it got to
``OUTDIR/<job>-<case>-rank<r>.npz`` (errors: ``.json``); tests/test_distributed.py
compares them with single-process bncore on the whole batch. Jobs:

  bn      sync_batch_norm_forward / backward on every BN case
  layer   SyncBatchNorm over several steps, then eval
  clip    distributed grad_norm / clip_grad_norm on every clip case
  errors  a rank fails (or the ranks disagree): every rank must raise, none may hang

BNCORE_MPI_ENGINE=gpu runs the same jobs with bncore_gpu.distributed on CuPy
arrays (a real GPU, or tests/gpu_emulator when that is on PYTHONPATH); the
saved results are host arrays either way.
"""
import json
import os
import sys
import traceback

import numpy as np
from mpi4py import MPI

import bncore
from mpi_cases import (BN_CASES, CLIP_CASES, LAYER, bn_data, clip_data, clip_shard,
                       layer_data, shard, split)

comm = MPI.COMM_WORLD
rank, P = comm.Get_rank(), comm.Get_size()

if os.environ.get("BNCORE_MPI_ENGINE", "cpu") == "gpu":
    import cupy
    import bncore_gpu as engine
    import bncore_gpu.distributed as dist

    def dev(a):
        return None if a is None else cupy.asarray(a)

    def host(a):
        return cupy.asnumpy(a)
else:
    import bncore.distributed as dist
    engine = bncore

    def dev(a):
        return a

    def host(a):
        return np.asarray(a)


def save(outdir, job, case, **arrays):
    arrays = {k: host(v) for k, v in arrays.items()}
    np.savez(os.path.join(outdir, f"{job}-{case}-rank{rank}.npz"), **arrays)


def job_bn(outdir):
    for name, c in BN_CASES.items():
        x, dy, w, b, rm, rv = (dev(a) for a in bn_data(name))
        sizes = split(x.shape[0], P, c["rule"])
        xs, dys = shard(x, sizes, rank), shard(dy, sizes, rank)
        dist.reset_traffic()
        y, mean, invstd = dist.sync_batch_norm_forward(xs, w, b, rm, rv, comm=comm,
                                                       momentum=0.3, axis=c["axis"])
        t_fwd = dist.traffic()
        dist.reset_traffic()
        dx, dw, db = dist.sync_batch_norm_backward(dys, xs, mean, invstd, w, comm=comm,
                                                   axis=c["axis"])
        t_bwd = dist.traffic()
        _, dw_local, db_local = dist.sync_batch_norm_backward(
            dys, xs, mean, invstd, w, comm=comm, axis=c["axis"], weight_grads="local")
        # inference with the updated running statistics: no communication
        dist.reset_traffic()
        y_eval, _, _ = dist.sync_batch_norm_forward(xs, w, b, rm, rv, comm=comm, training=False,
                                                    axis=c["axis"])
        t_eval = dist.traffic()
        save(outdir, "bn", name, y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, dx=dx, dw=dw,
             db=db, dw_local=dw_local, db_local=db_local, y_eval=y_eval,
             traffic=np.array([t_fwd["collectives"], t_fwd["bytes_sent"],
                               t_bwd["collectives"], t_bwd["bytes_sent"],
                               t_eval["collectives"]]))


def job_layer(outdir):
    for momentum in (0.1, None):
        tag = "cma" if momentum is None else "ema"
        bn = dist.SyncBatchNorm(LAYER["C"], momentum=momentum, comm=comm, dtype=np.float64)
        rng = np.random.default_rng(7)
        bn.weight[...] = dev(rng.normal(1, 0.2, LAYER["C"]))
        bn.bias[...] = dev(rng.normal(0, 0.2, LAYER["C"]))
        out = {}
        for step in range(LAYER["steps"]):
            x, dy = (dev(a) for a in layer_data(step))
            sizes = split(x.shape[0], P, LAYER["rule"] if step != 1 else "empty")
            out[f"y{step}"] = bn.forward(shard(x, sizes, rank))
            out[f"dx{step}"] = bn.backward(shard(dy, sizes, rank))
            out[f"gw{step}"] = bn.grad_weight
            out[f"gb{step}"] = bn.grad_bias
        bn.eval()
        x = dev(layer_data(99)[0])
        sizes = split(x.shape[0], P, "equal")
        out["y_eval"] = bn.forward(shard(x, sizes, rank))
        for k, v in bn.state_dict().items():
            out["state_" + k] = v
        save(outdir, "layer", tag, **out)


def job_clip(outdir):
    for name, c in CLIP_CASES.items():
        grads = clip_data(name)
        mine = [dev(g) for g in clip_shard(grads, P, rank, c["rule"])]
        norm = dist.grad_norm(mine, c["p"], comm=comm)
        norm_top = engine.grad_norm(mine, c["p"], comm=comm)      # the comm= route
        dist.reset_traffic()
        total = engine.clip_grad_norm(mine, c["max_norm"], norm_type=c["p"], eps=c["eps"],
                                      comm=comm)
        t = dist.traffic()
        clipped = (np.concatenate([host(g).ravel() for g in mine]) if mine
                   else np.zeros(0, grads[0].dtype))
        save(outdir, "clip", name, norm=np.array([float(norm), float(norm_top), float(total)]),
             clipped=clipped,
             traffic=np.array([t["collectives"], t["bytes_sent"]]))


# ---- errors: each case runs on every rank; rank `bad` misbehaves -------------------

def _bn_args(C=4, n=3, dtype=np.float64):
    rng = np.random.default_rng(rank)
    return dev(rng.standard_normal((n, C, 5)).astype(dtype))


def err_bad_weight():
    x = _bn_args()
    w = dev(np.ones(5 if rank == 1 else 4))
    dist.sync_batch_norm_forward(x, w, comm=comm)


def err_channel_mismatch():
    dist.sync_batch_norm_forward(_bn_args(C=5 if rank == P - 1 else 4), comm=comm)


def err_dtype_mismatch():
    dist.sync_batch_norm_forward(_bn_args(dtype=np.float32 if rank == P - 1 else np.float64),
                                 comm=comm)


def err_int_input():
    x = _bn_args()
    dist.sync_batch_norm_forward(x.astype(np.int64) if rank == 1 else x, comm=comm)


def err_too_few_values():
    # one value per channel in total: rank 0 holds it, the others hold nothing
    dist.sync_batch_norm_forward(_bn_args(n=1 if rank == 0 else 0)[:, :, :1], comm=comm)


def err_eps_differs():
    dist.sync_batch_norm_forward(_bn_args(), comm=comm, eps=1e-3 if rank == 1 else 1e-5)


def err_backward_bad_dy():
    x = _bn_args()
    y, mean, invstd = dist.sync_batch_norm_forward(x, comm=comm)
    dy = dev(np.ones(x.shape) if rank != 0 else np.ones((x.shape[0], 4, 6)))
    dist.sync_batch_norm_backward(dy, x, mean, invstd, comm=comm)


def err_backward_local_stats():
    x = _bn_args()
    y, mean, invstd = dist.sync_batch_norm_forward(x, comm=comm)
    if rank == 1:   # its own statistics instead of the synchronized ones
        _, mean, invstd = engine.batch_norm_forward(x)
    dist.sync_batch_norm_backward(dev(np.ones(x.shape)), x, mean, invstd, comm=comm)


def err_layer_backward_first():
    bn = dist.SyncBatchNorm(4, comm=comm, dtype=np.float64)
    x = _bn_args()
    if rank != 1:
        bn.forward(x)
    bn.backward(dev(np.ones(x.shape)))


def err_clip_max_norm():
    g = [dev(np.ones(10))]
    dist.clip_grad_norm(g, -1.0 if rank == 1 else 1.0, comm=comm)


def err_clip_norm_type():
    dist.grad_norm([dev(np.ones(10))], 2.0 if rank != P - 1 else 1.0, comm=comm)


def err_clip_nonfinite():
    g = np.ones(10)
    if rank == 1:
        g[3] = np.inf
    before, g = g.copy(), dev(g)
    try:
        dist.clip_grad_norm([g], 1.0, comm=comm, error_if_nonfinite=True)
    finally:
        assert np.array_equal(host(g), before), "a gradient was modified"


ERROR_CASES = [err_bad_weight, err_channel_mismatch, err_dtype_mismatch, err_int_input,
               err_too_few_values, err_eps_differs, err_backward_bad_dy,
               err_backward_local_stats, err_layer_backward_first, err_clip_max_norm,
               err_clip_norm_type, err_clip_nonfinite]


def job_errors(outdir):
    results = {}
    for case in ERROR_CASES:
        try:
            case()
            results[case.__name__] = {"raised": None, "message": ""}
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            results[case.__name__] = {"raised": type(exc).__name__, "message": str(exc)}
    # the communicator is still usable afterwards: a collective that succeeds
    results["after"] = {"norm": float(dist.grad_norm([dev(np.ones(4))], comm=comm))}
    with open(os.path.join(outdir, f"errors-rank{rank}.json"), "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    job, outdir = sys.argv[1], sys.argv[2]
    try:
        {"bn": job_bn, "layer": job_layer, "clip": job_clip, "errors": job_errors}[job](outdir)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.Abort(1)     # never leave the other ranks waiting in a collective

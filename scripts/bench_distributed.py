"""Time per step and bytes communicated by bncore.distributed on 1, 2, 4 ranks.

    python scripts/bench_distributed.py                 # runs mpiexec -n 1, 2, 4 itself
    python scripts/bench_distributed.py --ranks 1 2 --reps 10 --threads 2

Strong scaling of one global batch: SyncBatchNorm forward + backward on a
float32 (32, 64, 56, 56) batch split along N across the ranks, and the
distributed clip_grad_norm of 10M float32 parameters split across the ranks.
For each it reports the median step time (slowest rank), the same step
without communication (bncore's single-process function on the rank's
shard: what synchronization costs on top), and the bytes this rank sent per
step (bncore.distributed.traffic()). It also times bare Allgathers of 64 B
and of 16 C B, the latency term of the cost model in the README.

Threads: one OpenMP thread per rank by default (``--threads N`` to change),
so every P runs the same kernels and only the split and the communication
differ; P = 4 on a 2-core machine is oversubscribed twice (as the tests are).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

SHAPE = (32, 64, 56, 56)
CLIP_PARAMS = 10_000_000


def _median_time(fn, reps, comm):
    return _median_times([fn], reps, comm)[0]


def _median_times(fns, reps, comm):
    """Median over reps of each function's time on the slowest rank; the
    functions alternate within every rep, so machine noise hits them alike."""
    ts = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            ts[i].append(comm.allreduce(t, op=_max()))   # the slowest rank sets the pace
    return [float(np.median(t)) for t in ts]


def _max():
    from mpi4py import MPI
    return MPI.MAX


def worker(reps: int, out: str) -> None:
    from mpi4py import MPI

    import bncore
    import bncore.distributed as dist
    from bncore import _collective as col

    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    N, C = SHAPE[0], SHAPE[1]
    sizes = [N // P + (1 if r < N % P else 0) for r in range(P)]
    rng = np.random.default_rng(rank)
    x = (rng.standard_normal((sizes[rank],) + SHAPE[1:]) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = dist.SyncBatchNorm(C, comm=comm)
    local_bn = bncore.BatchNorm(C)

    def sync_step():
        bn.forward(x)
        bn.backward(dy)

    def local_step():
        local_bn.forward(x)
        local_bn.backward(dy)

    sync_step(); local_step()          # warm-up: page in the outputs, start the threads
    dist.reset_traffic()
    sync_step()
    bn_traffic = dist.traffic()
    t_bn, t_bn_local = _median_times([sync_step, local_step], reps, comm)

    n_mine = CLIP_PARAMS // P + (1 if rank < CLIP_PARAMS % P else 0)
    grads = [rng.standard_normal(n_mine).astype(np.float32)]

    def clip_step():
        dist.clip_grad_norm(grads, 1e9, comm=comm)     # max_norm large: norm + no-op scale

    def clip_local():
        bncore.clip_grad_norm(grads, 1e9)

    clip_step(); clip_local()
    dist.reset_traffic()
    clip_step()
    clip_traffic = dist.traffic()
    t_clip, t_clip_local = _median_times([clip_step, clip_local], reps, comm)

    small, stats = np.zeros(8), np.zeros(2 * C)
    t_ag64 = _median_time(lambda: [col.gather_rows(comm, small) for _ in range(100)],
                          max(3, reps // 2), comm) / 100
    t_ag_c = _median_time(lambda: [col.gather_rows(comm, stats) for _ in range(100)],
                          max(3, reps // 2), comm) / 100
    if rank == 0:
        with open(out, "w") as fh:
            json.dump(dict(P=P, threads=bncore.get_num_threads(),
                           bn=t_bn, bn_local=t_bn_local, bn_traffic=bn_traffic,
                           clip=t_clip, clip_local=t_clip_local, clip_traffic=clip_traffic,
                           allgather_64B=t_ag64, allgather_16C=t_ag_c), fh)


def _mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads per rank")
    ap.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.reps, args.worker)
        return
    mpiexec = _mpiexec()
    if mpiexec is None:
        sys.exit("no mpiexec: pip install mpich mpi4py")
    cores = os.cpu_count() or 1
    rows = []
    for P in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            subprocess.run([mpiexec, "-n", str(P), sys.executable, os.path.abspath(__file__),
                            "--reps", str(args.reps), "--worker", out], check=True, env=env,
                           timeout=1800)
            with open(out) as fh:
                rows.append(json.load(fh))
    C = SHAPE[1]
    print(f"\nSyncBatchNorm forward+backward, float32 {SHAPE} split over P ranks "
          f"(C = {C}); clip_grad_norm of {CLIP_PARAMS / 1e6:g}M float32 params split over P; "
          f"{cores} cores\n")
    print("| P | threads/rank | BN step (ms) | BN step, no sync (ms) | BN bytes sent/rank/step "
          "| BN collectives/step | clip step (ms) | clip, no sync (ms) | clip bytes sent/rank "
          "| Allgather 64 B (us) | Allgather 16C B (us) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['P']} | {r['threads']} | {r['bn'] * 1e3:.1f} | {r['bn_local'] * 1e3:.1f} "
              f"| {r['bn_traffic']['bytes_sent']} | {r['bn_traffic']['collectives']} "
              f"| {r['clip'] * 1e3:.2f} | {r['clip_local'] * 1e3:.2f} "
              f"| {r['clip_traffic']['bytes_sent']} | {r['allgather_64B'] * 1e6:.1f} "
              f"| {r['allgather_16C'] * 1e6:.1f} |")


if __name__ == "__main__":
    main()

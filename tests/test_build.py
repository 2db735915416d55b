"""The build: OpenMP really present (or deliberately absent), config reporting."""
import os

import pytest

import bncore
from bncore import _openmp


def test_openmp_not_silently_lost():
    info = bncore.build_info()
    if not info["openmp_requested"]:
        pytest.skip("built serial on purpose (BNCORE_NO_OPENMP=1)")
    assert info["openmp"], (
        "bncore was built without OpenMP although it was not asked to be: "
        f"{info['openmp_note'] or 'the compiler probe failed'}; compile flags: "
        f"{info['compile_flags']}")
    assert "-fopenmp" in info["compile_flags"] or "/openmp" in info["compile_flags"]


def test_parallel_regions_really_run_threads():
    if not _openmp.openmp_enabled():
        pytest.skip("serial build")
    # asking for 3 threads must give 3, even on a 2-core machine
    assert _openmp.threads_in_parallel_region(3) == 3


def test_show_config_reports_everything(capsys):
    bncore.show_config()
    out = capsys.readouterr().out
    assert bncore.__version__ in out
    assert "OpenMP" in out and "compile flags" in out and "default threads" in out
    n = bncore.get_num_threads()
    assert f"default threads {n}" in out


def test_thread_default_follows_openmp_and_override():
    try:
        bncore.set_num_threads(3)
        assert bncore.get_num_threads() == 3
    finally:
        bncore.set_num_threads(None)
    assert bncore.get_num_threads() == max(1, min(_openmp.max_threads(), _openmp.thread_limit()))
    with pytest.raises(ValueError, match="num_threads"):
        bncore.set_num_threads(0)


@pytest.mark.skipif(os.environ.get("OMP_NUM_THREADS") is not None,
                    reason="OMP_NUM_THREADS already set by the environment")
def test_threadpoolctl_controls_default_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not _openmp.openmp_enabled():
        pytest.skip("serial build")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert bncore.get_num_threads() == 1


def _run_python(code: str, **env) -> str:
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], env=e, check=True, timeout=120,
                          capture_output=True, text=True).stdout


@pytest.mark.skipif(not _openmp.openmp_enabled(), reason="serial build")
def test_default_threads_respect_omp_thread_limit():
    """Found by review: get_num_threads() (and show_config) said 2 where
    OMP_THREAD_LIMIT=1 let every call run 1."""
    out = _run_python("import bncore; print(bncore.get_num_threads())",
                      OMP_NUM_THREADS="3", OMP_THREAD_LIMIT="2")
    assert out.split() == ["2"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.skipif(not _openmp.openmp_enabled(), reason="serial build")
def test_a_forked_child_runs_calls_instead_of_hanging():
    """Found by review: after the parent had run a parallel region, a child of
    os.fork (multiprocessing's default on Linux) waited forever in its first
    call with 2 or more threads: GNU OpenMP's pool does not survive fork. The
    child now runs every call on one thread (same bits: the thread count never
    changes a result); set_num_threads in the child lifts the cap."""
    code = r"""
import os, signal, time, numpy as np, bncore
x = np.random.default_rng(0).standard_normal((64, 8, 512))
bncore.set_num_threads(2)       # (review: the cap once came after a set default)
ref = bncore.batch_norm_forward(x)[0]
g = [np.ones(100000)]
gn = bncore.grad_norm(g, num_threads=2)
for nt in (None, 2):
    pid = os.fork()
    if pid == 0:
        ok = (bncore.batch_norm_forward(x, num_threads=nt)[0].tobytes() == ref.tobytes()
              and bncore.grad_norm(g, num_threads=nt) == gn and bncore.get_num_threads() == 1)
        bncore.set_num_threads(None)         # restores the default: the cap stays
        ok = ok and bncore.get_num_threads() == 1
        bncore.set_num_threads(3)            # a number lifts it
        ok = ok and bncore.get_num_threads() == 3
        os._exit(0 if ok else 3)
    for _ in range(300):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print(nt, os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(nt, "hung")
bncore.set_num_threads(None)
print("parent", bncore.get_num_threads() == max(1, min(bncore._openmp.max_threads(),
                                                         bncore._openmp.thread_limit())))
"""
    assert _run_python(code, OMP_NUM_THREADS="2").split("\n")[:3] == ["None 0", "2 0",
                                                                          "parent True"]


def test_ci_runs_the_readme_test_command_verbatim():
    """.ci/run must end with exactly the README's test command (the second line
    of the README's first code block)."""
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    command = block[1].split("#", 1)[0].strip()
    ci = [ln.strip() for ln in open(os.path.join(root, ".ci", "run")) if ln.strip()]
    assert ci[-1] == command
    assert "pytest" in command


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_portable_build_passes_the_batch_norm_tests(tmp_path):
    """Where the build targets AVX-512 (-march=native on such a CPU), float32
    and float16 take intrinsic loops (_float_rows.h, _half_fast.h) and the
    generic loops are left to the switches' off setting; a build without it
    (BNCORE_PORTABLE=1: plain x86-64, no FMA) takes the generic loops with the
    switches on, a combination the native build never runs. (It once left
    the narrow schedule's y and dx unwritten.) Build this checkout that way
    in a temporary copy and run the batch-norm tests against it."""
    import shutil
    import subprocess
    import sys
    if not shutil.which(os.environ.get("CC", "gcc")):
        pytest.skip("no C compiler to build a second copy with")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.so", "*.c", "__pycache__", ".hypothesis", ".pytest_cache",
        "*.egg-info", "shared"))
    env = dict(os.environ, BNCORE_PORTABLE="1", PYTHONPATH=str(src))
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-j", "2"],
                           cwd=src, env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    probe = subprocess.run([sys.executable, "-c", "import bncore, bncore._bn_kernels as k; "
                            "print(bncore.__file__, k.float_rows(True)[1], "
                            "bncore.build_info()['compile_flags'])"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.startswith(str(src)) and " False " in probe.stdout, probe.stdout
    assert "-march=native" not in probe.stdout
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/test_batch_norm.py", "tests/test_half.py",
                          "tests/test_batch_norm_fast_path.py"],
                         cwd=src, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
@pytest.mark.skipif(not _openmp.openmp_enabled(), reason="serial build")
def test_forkserver_workers_and_a_serial_parents_children_are_not_capped():
    """The cap is for children of a process that ran bncore on several threads:
    a forkserver with bncore preloaded never did (review: its workers ran on one
    thread), nor did a parent that only imported bncore."""
    code = r"""
import multiprocessing as mp, os, bncore
from bncore import _threads
def worker(_):
    return bncore.get_num_threads(), _threads._forked_child
if __name__ == "__main__":
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["bncore"])
    with ctx.Pool(1) as pool:
        print(*pool.map(worker, [0]))
    pid = os.fork()
    if pid == 0:
        os._exit(0 if not _threads._forked_child else 3)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        script = os.path.join(d, "fs.py")
        with open(script, "w") as fh:
            fh.write(code)
        out = _run_python(f"import runpy; runpy.run_path({script!r}, run_name='__main__')",
                          OMP_NUM_THREADS="2")
    assert out.split("\n")[:2] == ["(2, False)", "0"], out

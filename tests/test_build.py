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
    assert bncore.get_num_threads() == max(1, _openmp.max_threads())
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

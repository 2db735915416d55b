"""The benchmark harness (scripts/bench.py): its floors do the work they time,
and a short run prints the table it promises. Timings themselves are never
asserted: speed is measured by running the script, not by tests."""
import builtins
import os
import subprocess
import sys

import numpy as np
import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
sys.path.insert(0, SCRIPTS)

import bench  # noqa: E402


@pytest.fixture(params=["torch", "numpy threads"])
def backend(request, monkeypatch):
    if request.param == "torch":
        pytest.importorskip("torch", reason="torch not installed: the torch floor is not used")
    else:
        real_import = builtins.__import__

        def no_torch(name, *args, **kwargs):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch hidden by the test")
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(builtins, "__import__", no_torch)
    return request.param


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_copy_moves_every_byte(backend, threads):
    src = np.arange(1001 * 7, dtype=np.float32).reshape(1001, 7)
    dst = np.full_like(src, np.nan)
    bench.threaded(np.copyto, dst, src, threads=threads)()
    np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threaded_add_in_place_and_into_a_third_array(backend, threads):
    a = np.arange(10007, dtype=np.float32)
    b = np.full_like(a, 2.0)
    c = np.full_like(a, np.nan)
    bench.threaded(np.add, c, a, b, threads=threads)()
    np.testing.assert_array_equal(c, a + b)
    expected = a + b
    bench.threaded(np.add, a, a, b, threads=threads)()
    np.testing.assert_array_equal(a, expected)


def test_short_run_prints_both_floors(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench.py"), "--reps", "5",
                          "--min-time", "0.002", "--only", "(256,1024)", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "| floor Nt ms |" in run.stdout and "| bncore/floor Nt |" in run.stdout
    assert "| torch alt ms |" in run.stdout
    import json
    cases = json.loads(out.read_text())["cases"]
    assert [c["name"] for c in cases] == ["bn forward-train (256,1024)",
                                          "bn forward-eval (256,1024)", "bn backward (256,1024)"]
    for c in cases:
        assert {"bncore", "floor", "floor Nt"} <= set(c["seconds"])
        assert all(t > 0 for t in c["seconds"].values())


def test_adam_probe_compiles(tmp_path):
    """scripts/probe_adam_arith.c (the arithmetic-versus-memory probe quoted in
    BENCHMARKS.md) builds warning-free with the command its header gives."""
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this machine")
    src = os.path.join(SCRIPTS, "probe_adam_arith.c")
    run = subprocess.run(["gcc", "-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wextra",
                          "-Werror", src, "-o", str(tmp_path / "probe"), "-lm"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr

"""bncore_gpu's host code, run against an emulated device (tests/gpu_emulator):
argument checking, layouts, work decomposition and every kernel launch's
arguments checked against the kernel's C signature. Runs in a subprocess so
the emulated cupy never leaks into this process. The CUDA code itself is
tested on a real GPU by scripts/gpu_check.sh."""
import importlib.util
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_gpu_package_on_emulated_device():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "gpu_emulator"), ROOT,
                                         env.get("PYTHONPATH", "")])
    # the emulated-device suite, the real-GPU tests (tests/test_gpu.py, the
    # registry's GPU-against-oracle-and-CPU test and the thread-ranked
    # distributed ones) and the worked example's GPU run (CuPy arrays end to
    # end) on the emulation
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           os.path.join(HERE, "gpu_emulator", "test_emulated_suite.py"),
                           os.path.join(HERE, "test_gpu.py"),
                           os.path.join(HERE, "test_registry_ops.py")
                           + "::test_gpu_matches_oracle_and_cpu",
                           os.path.join(HERE, "test_gpu_distributed.py"),
                           os.path.join(HERE, "test_example_cnn.py") + "::test_gpu_matches_cpu"],
                          cwd=os.path.join(HERE, "gpu_emulator"), env=env,
                          capture_output=True, text=True, timeout=900)
    # every GPU test must have run: none skipped for want of a device, and
    # none at all where the optional peers (torch, ...) are installed, as in CI
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    reasons = [line.split(": ", 1)[-1] for line in proc.stdout.splitlines()
               if line.startswith("SKIPPED")]
    optional = [r for r in reasons if re.match(r"could not import '(\w+)'", r)
                and importlib.util.find_spec(re.match(r"could not import '(\w+)'", r)[1]) is None]
    assert reasons == optional, proc.stdout[-3000:]
    assert ("skipped" not in proc.stdout.splitlines()[-1]) == (not reasons), proc.stdout[-2000:]

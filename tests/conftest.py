"""Shared test configuration: Hypothesis profiles and registry strategies.

Profiles (select with BNCORE_HYPOTHESIS_PROFILE):
  ci        (default) a few dozen examples per property, no deadline: CI-fast
  thorough  hundreds of examples per property, for a local soak
  dev       a handful, for quick iteration
"""
import os
import sys
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# the emulated-device suite runs in its own subprocess (tests/test_gpu_emulated.py)
collect_ignore = ["gpu_emulator"]

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=8, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("BNCORE_HYPOTHESIS_PROFILE", "ci"))


def params_strategy(space):
    """A Hypothesis strategy drawing one value from each domain of a spec's space."""
    items = {}
    for key, dom in space.items():
        if isinstance(dom, range):
            items[key] = st.integers(dom.start, dom.stop - 1)
        else:
            items[key] = st.sampled_from(list(dom))
    return st.fixed_dictionaries(items)


@pytest.fixture(scope="session")
def gpu_backend():
    from bncore.testing.registry import gpu_backend as make

    backend = make()
    if backend is None:
        pytest.skip("no usable GPU: bncore_gpu needs CuPy and a CUDA device")
    return backend


def assert_unchanged(before: dict, after: dict):
    """Every array in `after` is bitwise equal to its copy in `before`."""
    for key, old in before.items():
        new = after[key]
        if old is None:
            continue
        assert np.array_equal(np.asarray(new), old, equal_nan=True) and \
            np.asarray(new).tobytes() == old.tobytes(), f"{key} was modified"


def pytest_terminal_summary(terminalreporter):
    """With BNCORE_MPI_REPORT=1: the largest differences tests/test_distributed.py
    measured between the distributed engines and single-process bncore."""
    if not os.environ.get("BNCORE_MPI_REPORT"):
        return
    measured = next((getattr(m, "MEASURED") for name, m in list(sys.modules.items())
                     if name.endswith("test_distributed") and hasattr(m, "MEASURED")), None)
    if not measured:
        return
    terminalreporter.write_line("max normwise relative difference to single-process bncore:")
    for label in sorted(measured):
        items = ", ".join(f"{k} {v:.1e}" for k, v in measured[label].items())
        terminalreporter.write_line(f"  {label}: {items}")


def calls_before_main_ran(call, max_calls: int) -> list:
    """Run call() in a worker thread until the main thread has run once (at
    most max_calls times); return, after each call, whether it had.

    Forced GIL switches are off meanwhile (a 100 s switch interval), so the
    main thread, woken as the worker starts, can only take the GIL when the
    worker gives it up of its own accord: inside a call that releases it, or
    when the worker ends. So a call that holds the GIL always gives False,
    whatever the load. A call that releases it gives True once the main
    thread is scheduled inside one of its GIL-free stretches: certain in
    practice over many calls of a few milliseconds, not for one short call.
    (The switch interval is process-wide: other Python threads would wait
    too. The test process has none; the old value is restored.) An exception
    in the worker is raised here."""
    ran = []
    seen = []
    failed = []
    started = threading.Event()

    def work():
        started.set()
        try:
            while not ran and len(seen) < max_calls:
                call()
                seen.append(bool(ran))
        except BaseException as e:      # reported in the main thread below
            failed.append(e)

    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        worker = threading.Thread(target=work)
        worker.start()
        started.wait()
        ran.append(True)
        worker.join()
    finally:
        sys.setswitchinterval(old)
    if failed:
        raise failed[0]
    return seen

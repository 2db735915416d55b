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
    result = json.loads(out.read_text())
    cases = result["cases"]
    # the core check ran before and after the cases, and says so above the table
    assert len(result["env"]["core_check"]) == 2
    assert all(r > 0 for r in result["env"]["core_check"])
    assert "core check (before, after the cases)" in run.stdout
    assert [c["name"] for c in cases] == ["bn forward-train (256,1024)",
                                          "bn forward-eval (256,1024)", "bn backward (256,1024)"]
    for c in cases:
        assert {"bncore", "floor", "floor Nt"} <= set(c["seconds"])
        assert all(t > 0 for t in c["seconds"].values())
    # the issue targets of the timed cases, and only those, under the table
    targets = result["targets"]
    assert {r["case"] for r in targets} == {"bn forward-train (256,1024)",
                                            "bn forward-eval (256,1024)",
                                            "bn backward (256,1024)"}
    assert "Issue targets" in run.stdout and "issue 2: " in run.stdout
    assert "issue 3: " not in run.stdout


def test_targets_are_met_by_the_limits_and_missed_past_them(monkeypatch):
    """bench_targets: each target's verdict from the run's seconds; a missing
    column is not met, an untimed case not listed."""
    import bench_targets as bt
    case = "bn backward (32,64,56,56) channels-last"     # >= 1.25 torch, <= 1.8 floor
    at = {case: {"bncore": 1.0, "torch": 1.25, "floor": 1 / 1.8}}
    rows = bt.verdicts(at)
    assert [(r["measure"], r["met"]) for r in rows] == [("torch/bncore", True),
                                                       ("bncore/floor", True)]
    past = {case: {"bncore": 1.0, "torch": 1.24, "floor": 1 / 1.81}}
    assert [r["met"] for r in bt.verdicts(past)] == [False, False]
    no_torch = {case: {"bncore": 1.0, "floor": 1.0}}
    rows = bt.verdicts(no_torch)
    assert rows[0]["value"] is None and not rows[0]["met"] and rows[1]["met"]
    over = {"bn per-call overhead (4,8)": {"bncore": 11e-6}}
    assert [r["met"] for r in bt.verdicts(over)] == [False]
    assert bt.verdicts({"bn forward-train (8192,1024)": {"bncore": 1.0}}) == []
    text = bt.report(bt.verdicts({**past, **over}), 2)
    assert "issue 2: 0 of 3 targets met" in text and text.count("MISSED") == 3
    # every target names a case bench.py times (the optimizer cases built
    # small: their names do not depend on the size)
    names = {f"bn {call} {shape[0]}" for shape in bench.BN_SHAPES
             for call in ("forward-train", "forward-eval", "backward")}
    names.add("bn per-call overhead (4,8)")
    import bench_optim
    monkeypatch.setattr(bench_optim, "N", 4000)
    monkeypatch.setattr(bench_optim, "_floors", lambda nbytes, threads: {})   # (96 MiB each)
    names |= {c.name for c in bench_optim.optim_cases(1)}
    assert {t.case for t in bt.TARGETS} <= names


@pytest.mark.parametrize("probe, flags", [("probe_adam_arith.c", ["-O3", "-fno-math-errno",
                                                                   "-fopenmp"]),
                                          ("probe_adam_traj.c", ["-O2", "-ffp-contract=off"])])
def test_adam_probes_compile(tmp_path, probe, flags):
    """The Adam probes quoted in BENCHMARKS.md (arithmetic against memory; the
    float32 trajectories' distance from float64) build warning-free with the
    flags their headers give."""
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("no gcc on this machine")
    src = os.path.join(SCRIPTS, probe)
    run = subprocess.run(["gcc", *flags, "-Wall", "-Wextra", "-Werror", src,
                          "-o", str(tmp_path / "probe"), "-lm"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def _recorder(calls, name, fn, bound_arg):
    """fn wrapped to log (case-visible name, number of tensors, whether the call
    had anything to clip) before running it."""
    def wrapped(tensors, *args, **kwargs):
        tensors = list(tensors)
        # torch clips the .grad of the parameters it is handed
        values = [np.asarray(getattr(t, "grad", None) if getattr(t, "grad", None) is not None
                             else t) for t in tensors]
        clips = None
        if bound_arg is not None:
            bound = args[0] if args else kwargs[bound_arg]
            if name.endswith("clip_grad_norm"):
                total = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum())
                                          for v in values)))
                clips = total > bound
            else:
                clips = any(bool((np.abs(v) > bound).any()) for v in values)
        calls.append((name, len(tensors), clips))
        return fn(tensors, *args, **kwargs)
    return wrapped


def test_optim_cases_each_time_their_own_tensors_and_clip_every_call(monkeypatch):
    """Every optimizer case's calls receive that case's tensors (1 or 200), run in
    the bench's order: case after case, each impl many times. A closure that
    looked its list up late once had the 1-tensor clip row clip the 200
    tensors, leaving them below the 200-tensor row's bound, so that row timed
    the norm pass alone. Every clipping call must have something to clip."""
    import bncore
    import bench_optim
    # N large enough that torch's clip eps (1e-6 / norm) shrinks the norm less
    # than the bound's 1e-5 per call, as at the bench's 10M
    monkeypatch.setattr(bench_optim, "N", 400_000)
    monkeypatch.setattr(bench_optim, "_floors", lambda nbytes, threads: {})
    calls = []
    for name, bound_arg in [("adam_step", None), ("sgd_step", None), ("rmsprop_step", None),
                            ("found_inf", None), ("clip_grad_norm", "max_norm"),
                            ("clip_grad_value", "clip_value")]:
        monkeypatch.setattr(bncore, name, _recorder(calls, "bncore " + name,
                                                    getattr(bncore, name), bound_arg))
    try:
        import torch
        utils = torch.nn.utils
        monkeypatch.setattr(utils, "clip_grad_norm_", _recorder(
            calls, "torch clip_grad_norm", utils.clip_grad_norm_, "max_norm"))
        monkeypatch.setattr(utils, "clip_grad_value_", _recorder(
            calls, "torch clip_grad_value", utils.clip_grad_value_, "clip_value"))
    except ImportError:
        pass
    try:
        import torch
        # optim_cases sets torch's thread count, a process-wide setting that
        # later tests comparing against torch's float32 reductions would inherit
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    except ImportError:
        pass
    cases = bench_optim.optim_cases(threads=1)
    assert {c.name.split(" 10M")[0] for c in cases} >= {
        "adam", "sgd momentum", "clip_grad_norm", "rmsprop", "clip_grad_value", "found_inf"}
    for case in cases:
        n_tensors = int(case.name.split(" as ")[1].split()[0])
        for impl_name, impl in case.impls.items():
            del calls[:]
            for _ in range(30):
                impl()
            recorded = [c for c in calls if c[0].split()[0] == impl_name.split()[0]]
            if impl_name == "bncore":
                assert recorded, case.name
            for who, count, clips in recorded:
                assert count == n_tensors, (case.name, impl_name, who, count)
                assert clips in (None, True), (case.name, impl_name, who)


def test_strips_bench_times_both_schedules_and_leaves_strips_on(monkeypatch, capsys):
    """scripts/bench_strips.py on one shape that takes channel strips: a row
    with both schedules' times and "yes" for both passes, and the strips
    switch left on afterwards (its A/B toggling must not leak)."""
    import bench_strips
    from bncore import _bn_kernels as kernels
    monkeypatch.setattr(bench_strips, "SHAPES", [(32, 2048)])
    monkeypatch.setattr(sys, "argv", ["bench_strips.py", "--reps", "1"])
    bench_strips.main()
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (32,2048)")]
    assert len(row) == 1
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert cells[4] == "yes" and cells[8] == "yes", cells
    assert all(float(c) > 0 for c in (cells[1], cells[2], cells[5], cells[6]))
    assert kernels.channel_strips(True) is True          # was on


def test_half_fast_bench_times_both_paths_and_leaves_the_path_on(monkeypatch, capsys):
    """scripts/bench_half_fast.py on one small shape: three rows (forward-train,
    forward-eval, backward) with both paths' times, and the switch left on."""
    import bench_half_fast
    from bncore import _bn_kernels as kernels
    monkeypatch.setattr(bench_half_fast, "SHAPES", [(2, 8, 64)])
    monkeypatch.setattr(sys, "argv", ["bench_half_fast.py", "--reps", "1"])
    bench_half_fast.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
            and "float16" in line]
    assert [r.split(" (")[0] for r in rows] == ["| forward-train", "| forward-eval",
                                               "| backward"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0
    assert kernels.half_fast(True)[0] is True


@pytest.mark.parametrize("switch", ["float_rows", "channel_strips", "tile_groups", "half_fast"])
def test_switch_bench_times_both_settings_and_leaves_the_switch_on(switch, monkeypatch, capsys):
    """scripts/bench_switch.py on two small shapes (one channels-last): three
    rows each (forward-train, forward-eval, backward) with both settings'
    times, and the switch left on afterwards."""
    import bench_switch
    from bncore import _bn_kernels as kernels
    dtype = "float16" if switch == "half_fast" else "float32"
    monkeypatch.setattr(sys, "argv", ["bench_switch.py", switch, "--shapes", "16x40,2x8x4x4:cl",
                                      "--dtype", dtype, "--reps", "1"])
    bench_switch.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert [r.split("|")[2].strip() for r in rows] == ["forward-train", "forward-eval",
                                                      "backward"] * 2
    assert rows[3].startswith("| (2,8,4,4) channels-last")
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0
    was = getattr(kernels, switch)(True)
    assert (was[0] if isinstance(was, tuple) else was) is True


def test_cold_cache_cases_rotate_over_more_than_the_l3():
    """Review: every call reused one x, which a cache-bypassing writer (bncore's
    streaming y) found in L3 on the next call and torch did not. Large inputs
    now rotate over copies spanning 64 MiB; small ones (in cache in a real
    network too) and --cache warm keep one."""
    for nbytes in (8 << 20, 25 << 20, 33 << 20, 100 << 20):
        k = bench._rotation(nbytes, "cold")
        assert k >= 2 and (k - 1) * nbytes >= bench.ROTATE_SPAN_BYTES
    assert bench._rotation(1 << 20, "cold") == 1
    assert bench._rotation(25 << 20, "warm") == 1
    calls = []
    run = bench._cycled([lambda i=i: calls.append(i) for i in range(3)])
    for _ in range(6):
        run()
    assert sorted(calls) == [0, 0, 1, 1, 2, 2] and calls[:3] != calls[3:4] * 3

"""The command line: exit codes, JSON schemas, gradcheck catching a wrong gradient."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import bncore
from bncore import cli, selfcheck
from bncore.testing import registry as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "bncore", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_names_every_command():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("check", "gradcheck", "validate", "config", "exit status"):
        assert word in out.stdout
    out = run_cli()
    assert out.returncode == 2 and "usage" in out.stdout


@pytest.mark.parametrize("cmd", ["check", "gradcheck", "validate"])
def test_subcommand_help(cmd):
    out = run_cli(cmd, "--help")
    assert out.returncode == 0 and len(out.stdout) > 400


# ---------------------------------------------------------------- check

@pytest.mark.skipif(not bncore.build_info().get("openmp"), reason="built without OpenMP")
def test_check_says_when_the_threads_rows_could_not_use_their_threads():
    """Found in review: under OMP_THREAD_LIMIT=1 every threads row compared one
    thread with itself and passed, and the report said nothing."""
    env = dict(os.environ, OMP_THREAD_LIMIT="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "bncore", "check", "--op", "sgd_step",
                          "--samples", "2", "--no-gpu"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compared one thread with itself" in out.stdout
    normal = run_cli("check", "--op", "sgd_step", "--samples", "2", "--no-gpu")
    assert "compared one thread" not in normal.stdout


def test_check_json_schema(tmp_path):
    path = tmp_path / "check.json"
    code = cli.main(["check", "--op", "adam_step", "--op", "batch_norm_backward", "--samples",
                     "2", "--fd-samples", "1", "--quiet", "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["schema"] == "bncore-check/1"
    assert doc["ok"] is True and isinstance(doc["seconds"], float)
    assert set(doc["bncore"]) == {"version", "openmp", "num_threads"}
    assert doc["bncore"]["version"] == bncore.__version__
    assert set(doc["gpu"]) == {"used", "reason"}
    assert doc["settings"]["ops"] == ["adam_step", "batch_norm_backward"]
    kinds = set()
    for row in doc["summary"]:
        assert set(row) == {"op", "check", "dtype", "layout", "worst_error", "tolerance", "ok",
                            "cases", "layouts"}
        assert row["check"] in selfcheck.CHECK_KINDS and row["ok"] is True
        kinds.add((row["op"], row["check"]))
    assert ("batch_norm_backward", "gradient") in kinds
    assert ("adam_step", "threads") in kinds
    assert {r["dtype"] for r in doc["summary"] if r["op"] == "batch_norm_backward"
            and r["check"] == "oracle"} == {"float16", "float32", "float64"}
    for c in doc["checks"]:
        assert set(c) == {"op", "check", "output", "dtype", "layout", "case", "error",
                          "tolerance", "ok", "message"}
        assert isinstance(c["ok"], bool) and (c["error"] is None or c["error"] >= 0)
    # every layout of the batch-norm space was drawn
    layouts = {c["case"].get("layout") for c in doc["checks"] if c["op"] == "batch_norm_backward"
               and c["check"] == "oracle"}
    assert layouts == {"c", "permuted", "fortran", "strided"}


def test_check_schema_flag_prints_the_schema():
    out = run_cli("check", "--schema")
    assert out.returncode == 0 and "bncore-check/1" in out.stdout


def test_check_unknown_op_is_a_usage_error():
    out = run_cli("check", "--op", "no_such_op")
    assert out.returncode == 2 and "batch_norm_forward" in out.stderr


def test_check_gpu_flag_without_a_gpu_says_why():
    backend, reason = selfcheck.gpu_status(True)
    if backend is not None:
        pytest.skip("a GPU is usable here")
    out = run_cli("check", "--gpu", "--op", "sgd_step")
    assert out.returncode == 2 and "no GPU check possible" in out.stderr and reason in out.stderr


def test_check_fails_with_status_1_on_a_wrong_kernel(monkeypatch, tmp_path, capsys):
    """A kernel off by 1e-4 in one parameter is caught, with the case in the report."""
    def sgd_step(params, *args, **kw):
        bncore.sgd_step(params, *args, **kw)
        p = params[0] if isinstance(params, list) else params
        p.reshape(-1)[0] *= 1 + 1e-4

    wrong = R.cpu_backend_with(sgd_step=sgd_step)
    monkeypatch.setattr(R, "cpu_backend", lambda: wrong)
    path = tmp_path / "c.json"
    code = selfcheck.main_check(["sgd_step"], samples=2, fd_samples=0, progress=False,
                                gpu="off", json_path=str(path))
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "failures:" in out
    doc = json.loads(path.read_text())
    assert doc["ok"] is False
    assert any(not c["ok"] and c["check"] == "oracle" for c in doc["checks"])


def test_check_reports_a_crash_as_a_failure_not_a_traceback(monkeypatch, capsys):
    def found_inf(*a, **k):
        raise RuntimeError("boom")

    crashing = R.cpu_backend_with(found_inf=found_inf)
    monkeypatch.setattr(R, "cpu_backend", lambda: crashing)
    code = selfcheck.main_check(["found_inf"], samples=1, fd_samples=0, progress=False, gpu="off")
    assert code == 1
    assert "raised RuntimeError: boom" in capsys.readouterr().out


def test_a_build_without_openmp_says_its_threads_rows_checked_nothing(monkeypatch, capsys):
    """Found by review: without OpenMP the threads rows passed having compared
    one thread with itself, and the table did not say so."""
    import bncore

    selfcheck.main_check(["found_inf"], samples=1, fd_samples=0, progress=False, gpu="off")
    assert "without OpenMP" not in capsys.readouterr().out or not bncore.build_info()["openmp"]
    monkeypatch.setattr(bncore, "build_info", lambda: {"openmp": False})
    selfcheck.main_check(["found_inf"], samples=1, fd_samples=0, progress=False, gpu="off")
    assert "Built without OpenMP" in capsys.readouterr().out


def test_default_check_runs_green():
    """The README's first command (one seed; the full default sample)."""
    code = selfcheck.main_check(progress=False, gpu="off")
    assert code == 0


# ---------------------------------------------------------------- gradcheck

def _f(x, w):
    return np.tanh(x @ w)


def _f_vjp(u, x, w):
    d = u * (1 - np.tanh(x @ w) ** 2)
    return d @ w.T, x.T @ d


def _wrong_vjp(u, x, w):
    dx, dw = _f_vjp(u, x, w)
    dw = dw.copy()
    dw[1, 0] *= 1.001                 # one entry 0.1% off
    return dx, dw


def test_gradcheck_passes_a_right_gradient_in_both_modes():
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 3)), rng.standard_normal((3, 2))]
    for mode in ("random", "full"):
        report = bncore.gradcheck(_f, inputs, _f_vjp, mode=mode)
        assert isinstance(report, bncore.GradcheckReport) and report.ok, report.summary()


def test_gradcheck_catches_a_wrong_gradient_and_names_the_entry():
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 3)), rng.standard_normal((3, 2))]
    full = bncore.gradcheck(_f, inputs, _wrong_vjp, mode="full")
    assert not full
    assert full.worst_input == 1 and tuple(full.worst_index[1:]) == (1, 0)
    assert "FAIL" in full.summary() and "d input 1[1, 0]" in full.summary()
    rand = bncore.gradcheck(_f, inputs, _wrong_vjp, mode="random", n_directions=8)
    assert not rand


def test_gradcheck_catches_a_wrong_batch_norm_backward(monkeypatch):
    """bncore's own check, with batch_norm_backward's dweight scaled by 1.0001."""
    real = bncore.batch_norm_backward

    def wrong(*a, **k):
        dx, dw, db = real(*a, **k)
        return dx, dw * 1.0001, db

    backend = R.cpu_backend_with(batch_norm_backward=wrong)
    spec = R.REGISTRY["batch_norm_backward"]
    params = R.sample_params(spec, np.random.default_rng(3), spec.fd_space)
    params["training"] = True
    assert R.bn_gradcheck(params, backend=backend).ok is False
    assert R.bn_gradcheck(params).ok is True


def test_gradcheck_cli_on_a_user_function(tmp_path):
    (tmp_path / "userfn.py").write_text(textwrap.dedent("""
        import numpy as np
        def f(x, w):
            return np.tanh(x @ w)
        def f_vjp(u, x, w):
            d = u * (1 - np.tanh(x @ w) ** 2)
            return d @ w.T, x.T @ d
        def g(x, w):
            return np.tanh(x @ w)
        def g_vjp(u, x, w):
            dx, dw = f_vjp(u, x, w)
            dw[0, 1] += 1e-3
            return dx, dw
    """))
    ok = run_cli("gradcheck", "userfn:f", "--shape", "4,3", "--shape", "3,2", "--mode", "full",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout
    bad = run_cli("gradcheck", "userfn:g", "--shape", "4,3", "--shape", "3,2", "--mode", "full",
                  "--json", "g.json", cwd=tmp_path)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["schema"] == "bncore-gradcheck/1" and doc["ok"] is False
    assert doc["reports"][0]["worst_input"] == 1 and doc["reports"][0]["worst_index"][1:] == [0, 1]
    vjp = run_cli("gradcheck", "userfn:g", "--vjp", "userfn:f_vjp", "--shape", "4,3",
                  "--shape", "3,2", cwd=tmp_path)
    assert vjp.returncode == 0
    missing = run_cli("gradcheck", "nonexistent_module_xyz:f", "--shape", "3", cwd=tmp_path)
    assert missing.returncode == 2 and "cannot load" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_gradcheck_cli_on_builtin_ops(tmp_path):
    path = tmp_path / "gc.json"
    code = cli.main(["gradcheck", "--op", "batch_norm_forward", "--mode", "full", "--samples", "1",
                     "--json", str(path)])
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["ok"] and doc["reports"][0]["mode"] == "full"
    assert cli.main(["gradcheck", "--op", "sgd_step"]) == 2    # not differentiable


@pytest.mark.parametrize("kw,text", [(dict(rtol=-1.0), "rtol"), (dict(atol=-1.0), "atol"),
                                     (dict(rtol=0.0, atol=0.0), "both 0"),
                                     (dict(h=0.0), "h must"), (dict(n_directions=0), "n_directions"),
                                     (dict(scales=[0.0, 1.0]), r"scales\[0\]"),
                                     (dict(scales=[1.0, float("inf")]), r"scales\[1\]"),
                                     (dict(wrt=[]), "wrt is empty"),
                                     (dict(wrt=[1, 1]), "twice"), (dict(wrt=[2]), "2 inputs")])
def test_gradcheck_refuses_settings_that_would_pass_anything(kw, text):
    """A negative tolerance made every ratio negative (every check passed); no
    directions made zero checks (a PASS); a zero scale made zero directions
    (0 against 0, a PASS), and so did an empty wrt."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 3)), rng.standard_normal((3, 2))]
    with pytest.raises(ValueError, match=text):
        bncore.gradcheck(_f, inputs, _wrong_vjp, **kw)


@pytest.mark.parametrize("mode", ["random", "full"])
@pytest.mark.parametrize("empty", ["inputs", "output"])
def test_gradcheck_refuses_empty_inputs_or_outputs(mode, empty):
    """Empty inputs made a PASS of 0 checks (full mode) or of trivial ones
    (random mode); an empty output crashed inside NumPy (full mode)."""
    rng = np.random.default_rng(0)
    if empty == "inputs":
        inputs = [np.zeros((0, 3)), np.zeros((3, 2))]
        f, vjp, wrt = _f, _wrong_vjp, [0]
    else:
        inputs = [rng.standard_normal((4, 3))]
        f, vjp, wrt = (lambda a: a[:0]), (lambda u, a: np.zeros_like(a)), None
    with pytest.raises(ValueError, match="nothing to check"):
        bncore.gradcheck(f, inputs, vjp, mode=mode, wrt=wrt)


@pytest.mark.parametrize("mode", ["random", "full"])
def test_gradcheck_with_atol_zero_judges_zero_gradients(mode):
    """atol = 0 is allowed (rtol > 0): an analytic 0 against a numeric
    derivative fails, a constant function's 0 against 0 passes (random mode
    divided by a zero tolerance)."""
    x = [np.arange(1.0, 4.0)]
    zero = lambda u, x: [np.zeros_like(x)]  # noqa: E731
    assert not bncore.gradcheck(lambda x: x ** 2, x, zero, atol=0.0, mode=mode)
    assert bncore.gradcheck(lambda x: 0.0 * x, x, zero, atol=0.0, mode=mode)


def test_gradcheck_reports_a_nan_gradient_as_nan():
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((4, 3)), rng.standard_normal((3, 2))]
    report = bncore.gradcheck(_f, inputs, lambda u, x, w: [np.full_like(x, np.nan), w * 0])
    assert not report and "worst abs error nan" in report.summary()


def test_gradcheck_json_is_strict_and_an_infinite_error_is_not_rel_0(tmp_path):
    """Found in review: a vjp infinite at x = 0 gave '"ratio": Infinity' in the
    --json file (which strict JSON parsers refuse) and "rel 0.000e+00" (inf/inf
    is NaN, and max(0, NaN) kept 0)."""
    (tmp_path / "root.py").write_text(textwrap.dedent("""
        import numpy as np
        def f(x):
            return np.sqrt(np.abs(x)) * np.sign(x)
        def f_vjp(u, x):
            return (u * 0.5 / np.sqrt(np.abs(x)),)
    """))
    np.savez(tmp_path / "zero.npz", np.array([0.0, 1.0, 2.0]))
    out = run_cli("gradcheck", "root:f", "--inputs", "zero.npz", "--json", "r.json",
                  cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "rel 0.000e+00" not in out.stdout and "rel inf" in out.stdout

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    doc = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert doc["ok"] is False and doc["reports"][0]["ratio"] is None


def test_gradcheck_cli_inputs_and_usage_errors(tmp_path):
    (tmp_path / "sq.py").write_text("def f(x):\n    return x ** 2\n\n"
                                    "def f_vjp(u, x):\n    return [2 * u * x]\n")
    np.savez(tmp_path / "kw.npz", x=np.linspace(1, 2, 3))
    np.savez(tmp_path / "pos.npz", np.linspace(1, 2, 3))
    for name in ("kw.npz", "pos.npz"):
        out = run_cli("gradcheck", "sq:f", "--inputs", name, cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
    for args, text in [(("--inputs", "missing.npz"), "cannot read --inputs"),
                       (("--shape", "3", "--rtol", "-1"), "--rtol"),
                       (("--shape", "3", "--directions", "0"), "--directions"),
                       # a check that cannot run is a usage error (2), not a failed one (1)
                       (("--shape", "70,70", "--mode", "full"), "max_full_size"),
                       (("--shape", "3", "--shape", "2"), "cannot take the 2 inputs")]:
        out = run_cli("gradcheck", "sq:f", *args, cwd=tmp_path)
        assert out.returncode == 2 and text in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    out = run_cli("gradcheck", "--samples", "0", cwd=tmp_path)
    assert out.returncode == 2 and "--samples" in out.stderr
    # options of the other form were silently dropped (found by review)
    for args, text in [(("sq:f", "--inputs", "kw.npz", "--op", "batch_norm_backward"), "--op"),
                       (("sq:f", "--inputs", "kw.npz", "--samples", "2"), "--samples"),
                       (("sq:f", "--inputs", "kw.npz", "--shape", "3"), "--shape"),
                       (("--shape", "3"), "only with MODULE:FUNCTION"),
                       (("--vjp", "sq:f_vjp"), "--vjp")]:
        out = run_cli("gradcheck", *args, cwd=tmp_path)
        assert out.returncode == 2 and text in out.stderr, (args, out.stderr)


def test_thread_checks_draw_cases_that_really_use_threads():
    """A case below the kernels' one-thread cutoff (32768 elements) would compare
    the single-threaded code with itself."""
    import bncore.testing.optim_specs  # noqa: F401  (registers the optimizer specs)
    rng = np.random.default_rng(0)
    for spec in R.all_specs():
        for _ in range(5):
            case = spec.make_case(R.sample_params(spec, rng, R.threads_space(spec)))
            data = case.arrays.get("x")
            if data is None:
                data = case.arrays["grads"]
                while isinstance(data[0], list):      # one list per step: the first
                    data = data[0]
            total = sum(np.asarray(a).size for a in (data if isinstance(data, list) else [data]))
            assert total > 32768, (spec.name, total)


def test_json_targets_and_sample_counts_are_checked_before_the_run(tmp_path):
    for args in (["check", "--json", str(tmp_path / "no" / "x.json")],
                 ["check", "--samples", "0"],
                 ["validate", "onnx", "--quick", "--json", str(tmp_path / "no" / "x.json")],
                 ["gradcheck", "--json", str(tmp_path)]):
        out = run_cli(*args)
        assert out.returncode == 2, (args, out.stdout[-500:], out.stderr[-500:])
        assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["check --samples 1 --fd-samples 0 --op sgd_step",
                                     "gradcheck --samples 2"])
def test_json_is_written_even_when_stdout_closes_early(tmp_path, command):
    """`bncore check --json f | head -1` (gradcheck too): the JSON is written
    before the report is printed, and the status is the verdict's, not the
    broken pipe's."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "c.json"
    proc = subprocess.run(
        f"{sys.executable} -m bncore {command} --json {path} | head -1; "
        f"exit ${{PIPESTATUS[0]}}", shell=True, capture_output=True, text=True, env=env,
        executable="/bin/bash", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(path.read_text())["ok"] is True
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- found by review (2026-11-28)

def test_gradcheck_tolerances_apply_to_builtin_ops(tmp_path):
    """--rtol/--atol/--h/--directions reach the built-in ops' checks (they were
    silently replaced by the registry's own values): the report says the
    tolerances used, and --directions sets the number of checks."""
    path = tmp_path / "g.json"
    out = run_cli("gradcheck", "--op", "BatchNorm", "--samples", "1", "--rtol", "1e-3",
                  "--atol", "1e-7", "--directions", "3", "--json", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    rep = json.loads(path.read_text())["reports"][0]
    assert rep["rtol"] == 1e-3 and rep["atol"] == 1e-7 and rep["checks"] == 3 and rep["ok"]
    loose = rep["ratio"]
    out = run_cli("gradcheck", "--op", "BatchNorm", "--samples", "1", "--json", str(path))
    assert out.returncode == 0
    rep = json.loads(path.read_text())["reports"][0]
    assert rep["rtol"] == 1e-6 and rep["atol"] == 0 and rep["checks"] == 6   # the registry's
    # and the verdict was made with them: error / tolerance far smaller under the
    # loose ones (a report that only echoed them would judge alike)
    assert 0 < loose < 1e-2 * rep["ratio"], (loose, rep["ratio"])


def test_bad_seeds_shapes_and_input_files_are_usage_errors(tmp_path):
    (tmp_path / "sq.py").write_text("def f(x):\n    return x ** 2\n\n"
                                    "def f_vjp(u, x):\n    return [2 * u * x]\n")
    np.save(tmp_path / "one.npy", np.ones(3))
    for args, text in [(("check", "--seed", "-1"), "seed"),
                       (("gradcheck", "--seed", "-1"), "seed"),
                       (("gradcheck", "sq:f", "--shape", "4,-3"), ">= 0"),
                       (("gradcheck", "sq:f", "--inputs", "one.npy"), "not an .npz"),
                       (("gradcheck", "sq:f", "--shape", "0"), "nothing to check")]:
        out = run_cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and text in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_a_rows_worst_case_is_its_worst_failure():
    """Every failure used to rank equal (inf), so the row showed the last one."""
    def res(err, layout, ok):
        return selfcheck.CheckResult("op", "oracle", "float32", layout, err, 1e-6, ok)
    rows = selfcheck.summarize([res(1e-3, "A", False), res(2e-6, "B", False),
                                res(1e-7, "C", True)])
    assert rows[0]["layout"] == "A" and rows[0]["worst_error"] == 1e-3 and not rows[0]["ok"]
    rows = selfcheck.summarize([res(float("nan"), "N", False), res(1e-3, "A", False)])
    assert rows[0]["layout"] == "N"


def test_check_json_summary_follows_by_layout(tmp_path):
    path = tmp_path / "c.json"
    assert cli.main(["check", "--op", "batch_norm_forward", "--samples", "1", "--fd-samples",
                     "0", "--dtype", "float32", "--by-layout", "--no-gpu", "--quiet",
                     "--json", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert doc["settings"]["by_layout"] is True
    layouts = {(r["check"], r["layout"]) for r in doc["summary"]}
    assert len(doc["summary"]) > 2 and len(layouts) == len(doc["summary"])


def test_json_reports_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch, capsys):
    """A write that fails midway (a full disk, a size limit) leaves the old
    report as it was and is a usage error with a message, not a traceback
    with the status of a failed check."""
    path = tmp_path / "c.json"
    path.write_text('{"old": true}')

    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    status = cli.main(["check", "--op", "sgd_step", "--samples", "1", "--fd-samples", "0",
                       "--no-gpu", "--quiet", "--json", str(path)])
    assert status == 2 and "cannot write --json" in capsys.readouterr().err
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]   # no temporary left


def test_a_narrower_check_draws_the_same_cases_for_the_cells_it_keeps():
    """--op, --dtype and fewer --samples reproduce a wider run's cases (a
    prefix of each cell's), so a failure can be re-checked on its own."""
    def oracle_cases(**kw):
        cases = {}
        for kind, spec, params in selfcheck.plan(**kw).jobs:
            if kind == "oracle":
                cases.setdefault((spec.name, params["dtype"], params.get("layout")),
                                 []).append(repr(sorted(params.items())))
        return cases
    wide = oracle_cases(samples=4, fd_samples=0)
    narrow = oracle_cases(ops=["batch_norm_forward"], dtypes=["float32"], samples=2,
                          fd_samples=0)
    assert narrow and all(k[0] == "batch_norm_forward" and k[1] == "float32" for k in narrow)
    for key, cases in narrow.items():
        assert cases == wide[key][:2]
    assert oracle_cases(samples=4, fd_samples=0, seed=5) != wide


def test_a_failed_gpu_check_says_what_differs(monkeypatch):
    """bncore check --gpu: a failing comparison had an empty message (found by
    review), so the failures list said nothing. The CPU backend stands in for
    the GPU here; the comparison is made to fail."""
    from bncore import selfcheck
    from bncore.testing import registry as R

    spec = next(s for s in R.all_specs() if s.name == "grad_norm")
    params = R.sample_params(spec, np.random.default_rng(0), spec.space)
    case = spec.make_case(params)
    cpu = R.cpu_backend()
    monkeypatch.setattr(R, "errors_between_backends",
                        lambda *a: {"norm": (3e-3, 1e-12), "other": (0.0, 1e-12)})
    r = selfcheck._gpu_check(spec, cpu, cpu, case)
    assert not r.ok and "norm: GPU 3.00e-03 from the CPU" in r.message
    assert "other" not in r.message


_USERFN = textwrap.dedent("""
    import numpy as np
    import sys
    def f(x):
        return np.sin(x)
    def f_vjp(u, x):
        return (u * np.cos(x),)
    def raises(x):
        raise RuntimeError("broken")
    def raises_vjp(u, x):
        return (u,)
    def exits(x):
        sys.exit(0)
    def exits_vjp(u, x):
        return (u,)
""")


def test_gradcheck_json_to_this_process_stdout(tmp_path):
    """--json /dev/stdout writes through stdout (review: into a pipe it failed
    after the whole run, trying a temporary file in /proc/PID/fd; into a
    redirected file it replaced the file, and the table printed afterwards went
    to the unlinked old one)."""
    (tmp_path / "userfn.py").write_text(_USERFN)
    piped = run_cli("gradcheck", "userfn:f", "--shape", "3", "--json", "/dev/stdout",
                    cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr
    doc, end = json.JSONDecoder().raw_decode(piped.stdout)
    assert doc["ok"] is True and "1 gradient checks, 0 failed" in piped.stdout[end:]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(tmp_path / "out.txt", "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "bncore", "gradcheck", "userfn:f", "--shape",
                             "3", "--json", "/dev/stdout"], stdout=fh, cwd=tmp_path, env=env,
                            timeout=300).returncode
    text = (tmp_path / "out.txt").read_text()
    assert rc == 0 and text.startswith("{") and "1 gradient checks, 0 failed" in text


def test_gradcheck_failures_of_the_users_code(tmp_path):
    """A function that raises replaces an earlier --json report with a failed
    one (a passing report was left in place); sys.exit() in it is a failure,
    not a silent exit 0; an impossible --shape is a usage error, not a
    traceback; a file spec imports its sibling modules (review)."""
    (tmp_path / "userfn.py").write_text(_USERFN)
    assert run_cli("gradcheck", "userfn:f", "--shape", "3", "--json", "r.json",
                   cwd=tmp_path).returncode == 0
    bad = run_cli("gradcheck", "userfn:raises", "--shape", "3", "--json", "r.json", cwd=tmp_path)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert bad.returncode == 1 and doc["ok"] is False and "broken" in doc["error"]
    assert run_cli("gradcheck", "userfn:f", "--shape", "3", "--json", "r.json",
                   cwd=tmp_path).returncode == 0
    gone = run_cli("gradcheck", "userfn:nosuch", "--shape", "3", "--json", "r.json",
                   cwd=tmp_path)                        # the user's module, not loadable
    doc = json.loads((tmp_path / "r.json").read_text())
    assert gone.returncode == 2 and doc["ok"] is False and "cannot load" in doc["error"]
    out = run_cli("gradcheck", "userfn:exits", "--shape", "3", cwd=tmp_path)
    assert out.returncode == 1 and "SystemExit" in out.stderr
    big = run_cli("gradcheck", "userfn:f", "--shape", "99999999999,99999999", cwd=tmp_path)
    assert big.returncode == 2 and "Traceback" not in big.stderr and "--shape" in big.stderr
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "helpers.py").write_text("import numpy as np\nscale = 2.0\n")
    (sub / "usesib.py").write_text(textwrap.dedent("""
        import numpy as np
        import helpers
        def f(x):
            return helpers.scale * x
        def f_vjp(u, x):
            return (helpers.scale * u,)
    """))
    sib = run_cli("gradcheck", "sub/usesib.py:f", "--shape", "3", cwd=tmp_path)
    assert sib.returncode == 0, sib.stderr


def test_json_to_stdout_needs_no_write_access_to_dev(tmp_path):
    """The check made before a run asked whether /dev was writable, which only
    root's is: --json /dev/stdout stopped with 'not writable' for every other
    user (review). Here os.access answers for /dev as for a non-root user."""
    (tmp_path / "userfn.py").write_text(_USERFN)
    code = ("import os, runpy, sys\n"
            "real = os.access\n"
            "os.access = lambda p, m, *a, **k: False if os.path.abspath(p) == '/dev' "
            "else real(p, m, *a, **k)\n"
            "sys.argv = ['bncore', 'gradcheck', 'userfn:f', '--shape', '3', "
            "'--json', '/dev/stdout']\n"
            "runpy.run_module('bncore', run_name='__main__', alter_sys=True)\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.lstrip().startswith("{") and "0 failed" in out.stdout


def test_gradcheck_names_what_failed_to_load_and_refuses_empty_sizes(tmp_path):
    """A bad --vjp is named as the --vjp (it was reported against the
    function); a missing FILE.py is 'no file' (was 'No module named'); a shape
    with an empty size ('4,,3') is refused (it was read as (4, 3)); '4,' is the
    1-tuple (review)."""
    (tmp_path / "userfn.py").write_text(_USERFN)
    vjp = run_cli("gradcheck", "userfn:f", "--vjp", "userfn:nosuch", "--shape", "3",
                  cwd=tmp_path)
    assert vjp.returncode == 2 and "cannot load --vjp userfn:nosuch" in vjp.stderr
    nofile = run_cli("gradcheck", "nosuchfile.py:f", "--shape", "3", cwd=tmp_path)
    assert nofile.returncode == 2 and "no file nosuchfile.py" in nofile.stderr
    empty = run_cli("gradcheck", "userfn:f", "--shape", "4,,3", cwd=tmp_path)
    assert empty.returncode == 2 and "'4,,3'" in empty.stderr
    assert run_cli("gradcheck", "userfn:f", "--shape", "4,", cwd=tmp_path).returncode == 0

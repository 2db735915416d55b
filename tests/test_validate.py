"""bncore validate: verdicts, diagnostics, missing frameworks, and each framework's run.

The framework runs use --quick; CI installs torch, keras, jax/optax/flax, onnx and
onnxruntime, so they run there; a framework that is absent here skips its test.
"""
import json
import re
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bncore import validate as V
from bncore.validate.report import Check, Report, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the machinery

def _synthetic(fw_fn, bn_fn, **kw):
    """A check whose framework and bncore outputs are given functions of (dtype, centered)."""
    def run(dtype, centered=False):
        return fw_fn(dtype, centered), bn_fn(dtype, centered)
    return Check("op", "synthetic", run, **kw)


def _x(dtype, centered=False):
    return {"y": np.linspace(-1, 1, 50).astype(dtype)}


def test_exact_and_rounding_verdicts():
    row = evaluate("t", _synthetic(_x, _x))
    assert row.verdict == "exact" and row.max_abs == 0

    def fw(dtype, centered=False):
        y = _x(dtype)["y"]
        return {"y": (y * (1 + 3e-7)).astype(dtype) if dtype == "float32" else y}
    row = evaluate("t", _synthetic(fw, _x))
    assert row.verdict == "rounding" and row.diff64 == 0


def test_a_real_difference_is_DIFFERS_unless_a_diagnostic_explains_it():
    def off(dtype, centered=False):
        return {"y": _x(dtype)["y"] + 1e-3}
    row = evaluate("t", _synthetic(off, _x))
    assert row.verdict == "DIFFERS" and "UNEXPLAINED" in row.note

    # the same error in float32 only, and it vanishes when the data are centred:
    # a cancellation
    def offset_only(dtype, centered=False):
        return {"y": _x(dtype)["y"] + (0.0 if centered or dtype == "float64" else 1e-3)}
    row = evaluate("t", _synthetic(offset_only, _x, centered=True, condition=1e4))
    assert row.verdict == "explained" and "cancellation" in row.note

    # an error that does *not* vanish on centred data is not called a cancellation
    row = evaluate("t", _synthetic(off, _x, centered=True))
    assert row.verdict == "DIFFERS" and "cancellation:" not in row.note

    # a documented framework quirk that bncore reproduces explains the row
    row = evaluate("t", _synthetic(off, _x, quirks={"the +1e-3 quirk": off}))
    assert row.verdict == "explained" and "+1e-3 quirk" in row.note

    # another bncore convention that reproduces the framework, where the preset
    # does not, is the preset's error: named, and DIFFERS (it was "explained")
    row = evaluate("t", _synthetic(off, _x, alternatives={"the +1e-3 convention": off}))
    assert row.verdict == "DIFFERS" and "+1e-3 convention" in row.note
    assert "preset is wrong" in row.note


def test_a_cancellation_needs_bncores_reference_and_the_float64_run_to_hold():
    """Found by review: a bncore wrong on offset data (in float32 and float64
    alike) made the framework look wrong, and the row was "explained" as the
    framework's cancellation with exit status 0. The reference must not move
    when the offset is removed (the outputs are shift-invariant), and the
    framework's float64 run must be near it."""
    def fw(dtype, centered=False):
        return _x(dtype)
    def bad_bn(dtype, centered=False):                  # wrong on offset data only
        return {"y": _x(dtype)["y"] + (0.0 if centered else 0.5)}
    row = evaluate("t", _synthetic(fw, bad_bn, centered=True, condition=1e4))
    assert row.verdict == "DIFFERS" and "bncore's own float64 result moves" in row.note

    # the framework off in float64 too, by more than a cancellation leaves
    def fw64_off(dtype, centered=False):
        return {"y": _x(dtype)["y"] + (0.0 if centered else 1e-3)}
    row = evaluate("t", _synthetic(fw64_off, _x, centered=True, condition=10.0))
    assert row.verdict == "DIFFERS" and "more than a float32 cancellation leaves" in row.note


def test_a_formula_difference_that_stays_without_the_offset_is_not_a_cancellation():
    """Found by review: an eps 30 % off torch's gave "explained: cancellation"
    on the |mean|/std = 1e4 rows. Its float32 error on the centred data (4.5e-6)
    sat below the float32 tolerance and its float64 one below (1e4)^2 x 1e-13;
    a cancellation is gone in a float64 run without the offset, this was not."""
    def fw(dtype, centered=False):
        y = _x(dtype)["y"]
        # 4.5e-6 everywhere (the formula), 7e-5 more in float32 with the offset
        extra = 7e-5 if (dtype == "float32" and not centered) else 0.0
        return {"y": (y * (1 + 4.5e-6) + extra).astype(dtype)}
    row = evaluate("t", _synthetic(fw, _x, centered=True, condition=1e4))
    assert row.verdict == "DIFFERS" and "not a cancellation" in row.note


def _off_in_float32(dtype, centered=False):
    """_x, 1e-4 off in float32 only (the same formula in float64)."""
    y = _x(dtype)["y"]
    return {"y": y + 1e-4} if dtype == "float32" else {"y": y}


def test_precision_diagnostic_needs_the_float64_run_to_agree():
    # on data of |mean|/std 1e3, float32 arithmetic can leave 1e-4
    row = evaluate("t", _synthetic(_off_in_float32, _x, condition=1e3))
    assert row.verdict == "explained" and "precision" in row.note


def test_precision_never_explains_a_float32_gap_that_float32_arithmetic_cannot_make():
    """Found in review: a framework whose float32 path alone used another eps
    (as tf's fused kernel does for float16/float32) was "explained" as float32
    arithmetic on well-conditioned data, whatever the size of the gap."""
    row = evaluate("t", _synthetic(_off_in_float32, _x))
    assert row.verdict == "DIFFERS" and "more than float32 arithmetic leaves" in row.note


@pytest.mark.parametrize("gap", [1e-9, 1e-10])
def test_exact_needs_the_float64_runs_to_agree_too(gap):
    """Found in review: float32 results bitwise equal gave "exact" while the
    float64 runs showed a different formula (clipping with eps 1e-6 against an
    exact clip: the float32 rounding hid it). The agreement needed is 1e-12: a
    1e-10 formula difference is DIFFERS too (mutation testing: the threshold
    could loosen to 1e-9 unnoticed)."""
    def fw(dtype, centered=False):
        y = _x(dtype)["y"]
        return {"y": y} if dtype == "float32" else {"y": y * (1 + gap)}
    row = evaluate("t", _synthetic(fw, _x))
    assert row.verdict == "DIFFERS" and "the float64 runs differ" in row.note


def test_a_quirk_matched_in_float64_must_also_account_for_the_float32_gap():
    """Found in review: a quirk that reproduces the framework's float64 run
    explained a float32 result 1e-3 away."""
    def fw(dtype, centered=False):
        y = _x(dtype)["y"]
        return {"y": y + (1e-3 if dtype == "float32" else 1e-9)}

    def quirk(dtype, centered=False):
        return {"y": _x(dtype)["y"] + 1e-9}
    row = evaluate("t", _synthetic(fw, _x, quirks={"the 1e-9 quirk": quirk}))
    assert row.verdict == "DIFFERS" and "more than float32 arithmetic leaves" in row.note


def test_without_a_float64_run_rounding_means_float32_arithmetic_not_the_tolerance():
    """Found in review: Keras computes float64 inputs in float32, so its rows
    have no float64 check, and a preset eps 1% off (7e-6) passed as rounding
    under the 1e-5 tolerance; on offset data it was called a cancellation."""
    def fw(dtype, centered=False):
        return {"y": (_x(dtype)["y"] * (1 + 7e-6)).astype(np.float32)}   # no float64 run
    row = evaluate("t", _synthetic(fw, _x))
    assert row.diff64 is None and row.verdict == "DIFFERS", row
    # on offset data (5e-5 more, gone without the offset) it is not a cancellation:
    # the 7e-6 stays on the centred data
    def fw_offset(dtype, centered=False):
        return {"y": (_x(dtype)["y"] * (1 + 7e-6) + (0.0 if centered else 5e-5)
                      ).astype(np.float32)}
    row = evaluate("t", _synthetic(fw_offset, _x, centered=True, condition=1e3))
    assert row.verdict == "DIFFERS" and "cancellation:" not in row.note
    # float32 rounding itself still passes
    def close(dtype, centered=False):
        return {"y": (_x(dtype)["y"] * (1 + 3e-7)).astype(np.float32)}
    assert evaluate("t", _synthetic(close, _x)).verdict == "rounding"


def test_precision_diagnostic_never_explains_bncore_being_the_worse_one():
    """Same formula in float64, a float32 gap, but bncore's float32 result is
    the one far from the exact result: bncore's error, DIFFERS (it was called
    the framework's float32 arithmetic, exit status 0)."""
    row = evaluate("t", _synthetic(_x, _off_in_float32))
    assert row.verdict == "DIFFERS" and "bncore's error" in row.note


def test_a_raising_row_is_reported_not_fatal():
    def boom(dtype, centered=False):
        raise RuntimeError("no such kernel")
    report = Report("t")
    row = report.add(_synthetic(boom, _x))
    assert row.verdict == "DIFFERS" and "no such kernel" in row.note and not report.ok


def test_exit_status_1_when_a_row_differs(monkeypatch, capsys):
    pytest.importorskip("onnx")
    from bncore.validate import onnx as vonnx

    def checks(report, quick):
        report.add(_synthetic(lambda d, c=False: {"y": _x(d)["y"] + 1}, _x))
    monkeypatch.setattr(vonnx, "checks", checks)
    assert V.main_validate("onnx") == 1
    assert "DIFFERS" in capsys.readouterr().out


def test_missing_framework_is_one_line_and_a_skip(tmp_path):
    """A framework that cannot be imported: one clear line, exit status 0, no traceback."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("keras", "flax"):
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None
        sys.meta_path.insert(0, Block())
        sys.path.insert(0, {ROOT!r})
        from bncore.cli import main
        code = main(["validate", sys.argv[1], "--json", "out.json"])
        print("EXIT", code)
    """)
    for fw, pkg in (("keras", "keras"), ("jax", "flax")):
        out = subprocess.run([sys.executable, "-c", script, fw], capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        lines = [l for l in out.stdout.splitlines() if l.strip()]
        assert lines[-1] == "EXIT 0", out.stdout + out.stderr
        # the blocked package is named, with any other one this machine lacks
        # (a fresh `pip install -e ".[test]"` has no jax either)
        missing = re.fullmatch(rf'{fw}: (.+) not installed \(pip install '
                               r'"bncore\[validate\]"\); skipped', lines[0])
        assert missing and re.search(rf"\b{pkg}\b", missing.group(1)), lines[0]
        assert len(lines) == 2
        assert "Traceback" not in out.stderr
        doc = json.loads((tmp_path / "out.json").read_text())
        assert doc["ok"] is True and doc["reports"][0]["rows"] == []
        assert "not installed" in doc["reports"][0]["skipped"][0]


# ---------------------------------------------------------------- each framework

def _validate(framework, tmp_path):
    path = tmp_path / f"{framework}.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "bncore", "validate", framework, "--quick",
                          "--json", str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(path.read_text())
    assert doc["schema"] == "bncore-validate/1" and doc["ok"] is True
    rep = doc["reports"][0]
    assert rep["framework"] == framework and rep["rows"], rep
    for row in rep["rows"]:
        assert set(row) >= {"op", "config", "max_abs", "max_rel", "fw_err", "bn_err", "diff64",
                            "verdict", "note"}
        assert row["verdict"] in ("exact", "rounding", "explained"), row
        if row["verdict"] == "explained":
            assert row["note"], row
    assert "max abs" in out.stdout and "verdict" in out.stdout
    return rep["rows"]


def _find(rows, op_part, config_part):
    hits = [r for r in rows if op_part in r["op"] and config_part in r["config"]]
    assert hits, f"no row {op_part!r} / {config_part!r}"
    return hits[0]


def test_validate_torch(tmp_path):
    pytest.importorskip("torch")
    rows = _validate("torch", tmp_path)
    # offset data: torch's error is a cancellation (measured on centred data)
    for layout in ("NCHW", "channels_last"):
        r = _find(rows, "F.batch_norm", f"{layout}, |mean|/std")
        assert r["verdict"] == "explained" and "cancellation" in r["note"]
        assert r["bn_err"] < 1e-6 < r["fw_err"]
    # running variance: unbiased, measured
    r = _find(rows, "F.batch_norm", "train 8x4x6x6 NCHW")
    assert "biased running var" in r["note"]
    # the non-exact clip on small gradients: eps=0 is measurably different
    r = _find(rows, "clip_grad_norm_", "norm 1.6e-04")
    assert r["verdict"] in ("exact", "rounding") and "eps=0" in r["note"]
    assert _find(rows, "torch.optim.Adam", "defaults")["diff64"] < 1e-12


def test_validate_keras(tmp_path):
    import importlib.util

    pytest.importorskip("jax")
    # not imported here: without KERAS_BACKEND=jax (which bncore validate sets) Keras
    # would look for TensorFlow
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras not installed")
    rows = _validate("keras", tmp_path)
    r = _find(rows, "BatchNormalization", "|mean|/std")
    assert r["verdict"] == "explained" and "cancellation" in r["note"]
    r = _find(rows, "BatchNormalization", "train 8x6x5x4")
    assert "unbiased running var" in r["note"]
    assert _find(rows, "keras.optimizers.Adam", "defaults")["diff64"] < 1e-12


def test_validate_jax(tmp_path):
    for mod in ("jax", "optax", "flax"):
        pytest.importorskip(mod)
    rows = _validate("jax", tmp_path)
    r = _find(rows, "flax.linen.BatchNorm", "|mean|/std")
    assert r["verdict"] == "explained" and "cancellation" in r["note"]
    assert "use_fast_variance=False" in r["note"]
    r = _find(rows, "optax.rmsprop", "momentum=0.5")
    assert r["verdict"] == "rounding" and r["diff64"] < 1e-12


def test_validate_onnx(tmp_path):
    pytest.importorskip("onnx")
    rows = _validate("onnx", tmp_path)
    r = _find(rows, "Adam", "1 tensor")
    assert r["verdict"] == "explained" and "norm_coefficient_post" in r["note"]
    assert _find(rows, "Momentum", "nesterov")["diff64"] < 1e-12
    r = _find(rows, "BatchNormalization", "reference, training_mode=1 8x4x6x6")
    assert "unbiased running var" in r["note"]


def test_a_nan_in_one_result_is_never_rounding():
    """compare() kept whichever output came last once a NaN was held (NaN
    compares false both ways): a framework NaN could come out as rounding."""
    from bncore.validate.report import compare
    fw = {"y": np.array([np.nan, 1.0]), "rv": np.array([1.0, 2.0])}
    bn = {"y": np.array([0.5, 1.0]), "rv": np.array([1.0, 2.0])}
    for order in (("y", "rv"), ("rv", "y")):
        a, r, k = compare({k: fw[k] for k in order}, {k: bn[k] for k in order})
        assert np.isnan(r) and k == "y"


def test_a_broken_framework_install_is_a_skip_not_a_traceback(tmp_path):
    """jax or onnxruntime that raises something other than ImportError on import
    counts as missing (one line, exit 0), as a broken onnx already did."""
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "__init__.py").write_text("raise RuntimeError('broken jax')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path) + os.pathsep + ROOT)
    out = subprocess.run([sys.executable, "-m", "bncore", "validate", "jax", "--json",
                          str(tmp_path / "v.json")], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and "broken jax" in out.stdout


@pytest.mark.parametrize("framework,module,preset", [
    ("torch", "torch", "PRESET"), ("keras", "keras", "PRESET"), ("jax", "jax", "FLAX"),
    ("onnx", "onnx", "PRESET")])
def test_a_wrong_batch_norm_preset_makes_validate_fail(framework, module, preset, monkeypatch):
    """Found by review: the batch-norm rows passed eps, momentum and the
    variance rule as literals, so a wrong preset in bncore.conventions went
    unnoticed. bncore's side now takes the preset (the framework's side its own
    defaults): a wrong eps, or the other variance rule, fails the run."""
    import dataclasses
    import importlib

    needs = {"torch": ("torch",), "keras": ("jax", "keras"), "jax": ("jax", "optax", "flax"),
             "onnx": ("onnx",)}[framework]
    for mod in needs:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} not installed")
    if framework == "keras":
        monkeypatch.setenv("KERAS_BACKEND", "jax")
    vmod = importlib.import_module(f"bncore.validate.{module}")
    good = getattr(vmod, preset)
    out = open(os.devnull, "w")
    for bad in (dataclasses.replace(good, eps=good.eps * 10),
                dataclasses.replace(good, unbiased_running_var=not good.unbiased_running_var)):
        monkeypatch.setattr(vmod, preset, bad)
        assert V.main_validate(framework, quick=True, out=out) == 1, bad
    monkeypatch.setattr(vmod, preset, good)
    assert V.main_validate(framework, quick=True, out=out) == 0


def test_a_float32_only_gap_under_the_tolerance_is_not_rounding():
    """Found in review: a framework 6e-6 off in float32 only (an eps it changes
    for float32; the float64 runs agree) was "rounding" (under tol = 1e-5),
    30-300x what float32 arithmetic leaves (3e-8 to 8e-7 measured); the row's
    tolerance reported in JSON is the one applied."""
    def fw(dtype, centered=False):
        y = _x(dtype)["y"]
        return {"y": (y * (1 + 6e-6)).astype(dtype) if dtype == "float32" else y}
    row = evaluate("t", _synthetic(fw, _x))
    assert row.verdict == "DIFFERS" and "float32 path alone" in row.note
    assert row.tol < 6e-6


def test_a_float32_only_gap_that_stays_without_the_offset_is_neither_cancellation_nor_precision():
    """Found in review: F.batch_norm with eps x1.5 for float32 only was
    "explained: cancellation" on the |mean|/std 1e4 row (7.5e-6 on the centred
    data, under tol), and with eps x100 "explained: precision" (1.5e-3 with the
    offset and without it: the error did not go with the offset)."""
    for gap in (6e-6, 1.5e-3):
        def fw(dtype, centered=False, gap=gap):
            y = _x(dtype)["y"]
            if dtype == "float64":
                return {"y": y}
            extra = 0.0 if centered else 5e-5      # what the offset adds in float32
            return {"y": (y * (1 + gap) + extra).astype(dtype)}
        row = evaluate("t", _synthetic(fw, _x, centered=True, condition=1e4))
        assert row.verdict == "DIFFERS", (gap, row.note)
        assert "cancellation:" not in row.note and "precision:" not in row.note
        assert "float32 path alone" in row.note


def test_nan_in_the_exact_reference_is_never_agreement():
    """Matching NaNs are left out of a comparison, so a row whose outputs were
    NaN on both sides (the float64 reference included) was "exact" (review).
    Rows run on finite data: a NaN reference is bncore's error."""
    def nan_y(dtype, centered=False):
        y = np.arange(10, dtype=dtype)
        y[3:] = np.nan
        return {"y": y}
    row = evaluate("t", _synthetic(nan_y, nan_y))
    assert row.verdict == "DIFFERS" and "holds NaN" in row.note

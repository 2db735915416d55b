"""``bncore validate``: run a framework's own implementation next to bncore.

    bncore validate torch    torch.nn.functional.batch_norm, nn.BatchNorm*d (autograd for
                             the backward), torch.optim.*, clip_grad_norm_/clip_grad_value_
    bncore validate keras    Keras 3 (JAX backend) BatchNormalization, optimizers, clipping
    bncore validate jax      flax.linen.BatchNorm (jax.grad for the backward), optax
    bncore validate onnx     onnx.reference.ReferenceEvaluator and onnxruntime:
                             BatchNormalization, Adam, Momentum, Adagrad

Each framework module exposes ``REQUIRES`` (the import names it needs) and
``checks(report, quick)``, which adds rows to a :class:`report.Report`. The
frameworks are imported only here, lazily: a missing one gives one line and
a skip. Python use::

    from bncore.validate import run
    report = run("torch")          # a Report: .rows, .ok, .table(), .notes()
"""
from __future__ import annotations

import importlib
import sys
import time
from typing import List, Optional

from bncore.selfcheck import silence_stdout
from bncore._atomic_write import write_json_or_say
from bncore.validate.report import Check, Report, Row  # noqa: F401

FRAMEWORKS = ("torch", "keras", "jax", "onnx")
INSTALL_HINT = 'pip install "bncore[validate]"'


LEGEND = """\
columns: max abs, max rel = framework vs bncore in the framework's convention, float32
  (rel: relative to the largest |value| of the worst output); f64 rel = the same in a float64
  run on the same inputs (the formula check); fw err, bn err = each float32 result against
  the exact result (bncore in float64 on the same inputs). Optimizers run 5 steps with a
  changing learning rate. verdicts: exact = bitwise (and f64 rel <= 1e-12); rounding = max
  rel within 64 float32 units x |mean|/std (3.8e-6 on centred data; at most 1e-5) and f64
  rel <= 1e-12 (same formula, float32 rounding); explained = larger, with the cause measured
  in the note; DIFFERS = unexplained (exit status 1). * = see the note."""


def missing(framework: str) -> List[str]:
    """The packages a framework's validation needs that are not installed."""
    mod = importlib.import_module(f"bncore.validate.{framework}")
    absent = []
    for name in mod.REQUIRES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            # "keras" may be installed while its backend is not: say which
            missing_name = getattr(exc, "name", None)
            absent.append(name if missing_name in (None, name) or missing_name.startswith(name + ".")
                          else f"{name} (needs {missing_name}: {exc})")
        except Exception as exc:  # noqa: BLE001 - installed but broken counts as missing
            absent.append(f"{name} ({type(exc).__name__}: {exc})")
    return absent


def run(framework: str, quick: bool = False) -> Report:
    """Validate one framework; a Report with ``skipped`` set when it is absent."""
    if framework not in FRAMEWORKS:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}")
    mod = importlib.import_module(f"bncore.validate.{framework}")
    report = Report(framework)
    if hasattr(mod, "prepare"):
        try:
            mod.prepare()             # environment a framework needs before import (Keras backend)
        except Exception:  # noqa: BLE001 - a broken install: missing() names it below
            pass
    absent = missing(framework)
    if absent:
        report.skip(f"{framework}: {', '.join(absent)} not installed ({INSTALL_HINT}); skipped")
        return report
    t0 = time.perf_counter()
    report.versions = mod.versions()
    mod.checks(report, quick)
    report.seconds = time.perf_counter() - t0
    return report


def print_report(report: Report, out=None) -> None:
    out = out or sys.stdout
    if report.skipped and not report.rows:
        for line in report.skipped:
            print(line, file=out)
        return
    vers = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    print(f"bncore validate {report.framework} ({vers})", file=out)
    print(report.table(), file=out)
    notes = report.notes()
    if notes:
        print("\nnotes (measured on this run):", file=out)
        print(notes, file=out)
    for line in report.skipped:
        print(f"skipped: {line}", file=out)
    counts = {}
    for r in report.rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    print(f"\n{len(report.rows)} rows: {summary}; {report.seconds:.1f} s.", file=out)
    print(LEGEND, file=out)


def main_validate(framework: str, json_path: Optional[str] = None, quick: bool = False,
                  out=None) -> int:
    """The body of ``bncore validate``: 0 when nothing DIFFERS (or the framework is
    absent: one line, skipped), 1 when a row differs without explanation."""
    names = FRAMEWORKS if framework == "all" else (framework,)
    reports = []
    printing = True
    for name in names:
        report = run(name, quick)
        reports.append(report)
        if printing:
            try:
                print_report(report, out)
                if len(names) > 1:
                    print(file=out or sys.stdout)
            except BrokenPipeError:   # `| head`: keep running, for the JSON and the status
                printing = False
                silence_stdout()
    if json_path:
        doc = {"schema": "bncore-validate/1", "ok": all(r.ok for r in reports),
               "reports": [r.as_dict() for r in reports]}
        problem = write_json_or_say("validate", json_path, doc)
        if problem:
            return problem
    return 0 if all(r.ok for r in reports) else 1

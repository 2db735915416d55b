"""``bncore check``: the self-check behind the command line.

For every op in the registry (``bncore.testing.registry``) it runs, on a fixed
random sample of the op's parameter space (so two runs check the same cases,
and a narrower run (--op, --dtype, fewer --samples) the same cases of the cells it keeps):

* **oracle**: each output of the kernel (float16, float32 and float64 inputs,
  every memory layout) against the float64 NumPy oracle, as a normwise
  relative error with the op's tolerance;
* **threads**: the same call with 1, 2 and 3 OpenMP threads, bitwise equal;
* **gradient** (differentiable ops): the analytic backward against central
  finite differences in float64, in random-direction mode on several draws
  and once as a full Jacobian on a small input;
* **gpu** (when ``bncore_gpu`` can run here, or ``--gpu``): CPU against GPU.

Every check becomes a :class:`CheckResult`; :func:`summarize` folds them
into the table ``bncore check`` prints, and :func:`to_json` gives the
``--json`` document (schema ``bncore-check/1``, described in
:data:`JSON_SCHEMA_DOC`).
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from bncore import _threads
from bncore._atomic_write import write_json_or_say

SCHEMA = "bncore-check/1"

JSON_SCHEMA_DOC = """\
bncore check --json FILE writes one JSON object (schema "bncore-check/1"):

  schema        "bncore-check/1"
  ok            true when every check passed (the exit status is 0 exactly then)
  seconds       wall time of the run
  bncore        {"version", "openmp", "num_threads"}
  gpu           {"used": bool, "reason": str or null}   why the GPU was not used
  settings      {"ops": [...], "dtypes": [...] or null, "samples", "fd_samples", "seed",
                "by_layout"}
  summary       one entry per table row (per layout too with --by-layout): {"op",
                "check", "dtype", "layout", "worst_error", "tolerance", "ok", "cases",
                "layouts" (how many layouts the row's cases span)}
  checks        every individual check: {"op", "check", "output", "dtype",
                "layout", "case", "error", "tolerance", "ok", "message"}

"check" is one of "oracle", "threads", "gradient", "gpu". Errors and
tolerances are normwise relative errors (threads: 0 when bitwise equal, else
1, tolerance 0); a non-finite error is written as null with ok false;
"message" says what went wrong when a check raised or failed.
"""

CHECK_KINDS = ("oracle", "threads", "gradient", "gpu")
THREAD_COUNTS = (1, 2, 3)


@dataclass
class CheckResult:
    op: str
    check: str                 # one of CHECK_KINDS
    dtype: str
    layout: str
    error: float               # normwise relative error (threads: 0 or 1)
    tolerance: float
    ok: bool
    output: str = "-"          # which output was worst (oracle / gpu checks)
    case: Dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def severity(self) -> Tuple[bool, float]:
        """How bad the check is, to pick a row's worst case: failures first,
        then error over tolerance (a failure's own, so that the worst failure
        is the one shown); a NaN or infinite error counts as infinitely bad."""
        e, t = self.error, self.tolerance
        if not math.isfinite(e):
            ratio = math.inf
        elif t > 0:
            ratio = e / t
        else:
            ratio = math.inf if e > 0 else 0.0
        return (not self.ok, ratio)


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def gpu_status(force: bool) -> Tuple[Optional[Any], Optional[str]]:
    """(GPU backend or None, reason it is not usable)."""
    from bncore.testing import registry as R

    try:
        import bncore_gpu  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return None, f"bncore_gpu cannot be imported ({type(exc).__name__}: {exc})"
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return None, "CuPy sees no CUDA device"
    except Exception as exc:  # noqa: BLE001
        return None, f"no usable CUDA device ({type(exc).__name__}: {exc})"
    backend = R.gpu_backend()
    if backend is None:
        return None, "bncore_gpu is installed but its backend did not load"
    return backend, None


def _layout(params: Dict[str, Any]) -> str:
    layout = params.get("layout")
    if layout is None:
        return "-"
    axis = params.get("axis")
    ndim = params.get("ndim")
    if axis is None:
        return str(layout)
    ax = {"1": "C@1", "-1": "C@-1", "any": "C@any"}.get(str(axis), str(axis))
    return f"{ndim}d {ax} {layout}"


def _case_dict(params: Dict[str, Any]) -> Dict[str, Any]:
    keep = {}
    for k, v in params.items():
        if isinstance(v, (int, float, str, bool, type(None), np.integer, np.floating, tuple)):
            keep[k] = v
    return _jsonable(keep)


def _progress(items: Sequence, desc: str, enabled: bool) -> Iterable:
    """tqdm when it is installed, a one-line counter on stderr otherwise."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(items, total=len(items), desc=desc, file=sys.stderr, leave=False,
                        unit="check")
        return
    total = len(items)
    for i, item in enumerate(items, 1):
        if i == 1 or i == total or i % 5 == 0:
            sys.stderr.write(f"\r{desc}: {i}/{total} ({100 * i // total}%)")
            sys.stderr.flush()
        yield item
    sys.stderr.write("\r" + " " * (len(desc) + 24) + "\r")
    sys.stderr.flush()


# --------------------------------------------------------------------------
# the individual checks

def _oracle_check(spec, cpu, case) -> CheckResult:
    from bncore.testing import registry as R

    errs = R.errors_against_oracle(spec, cpu, case)
    key, (err, tol) = max(errs.items(), key=lambda kv: _ratio(*kv[1]))
    ok = all(e <= t for e, t in errs.values())
    bad = [f"{k}: {e:.3e} > {t:.1e}" for k, (e, t) in errs.items() if not e <= t]
    return CheckResult(spec.name, "oracle", str(case.params["dtype"]), _layout(case.params),
                       float(err), float(tol), bool(ok), output=key,
                       case=_case_dict(case.params),
                       message="; ".join(bad) + (f" ({case.describe()})" if bad else ""))


def _ratio(err: float, tol: float) -> float:
    if not err <= err:        # NaN
        return math.inf
    if tol > 0:
        return err / tol
    return 0.0 if err == 0 else math.inf


def _threads_check(spec, cpu, case) -> CheckResult:
    outs = [spec.call(cpu, case, n) for n in THREAD_COUNTS]
    base = outs[0]
    differ = []
    for n, other in zip(THREAD_COUNTS[1:], outs[1:]):
        for k in base:
            if base[k].tobytes() != other[k].tobytes():
                differ.append(f"{k} differs between 1 and {n} threads")
    return CheckResult(spec.name, "threads", str(case.params["dtype"]), _layout(case.params),
                       0.0 if not differ else 1.0, 0.0, not differ,
                       output="all", case=_case_dict(case.params), message="; ".join(differ))


def _gpu_check(spec, cpu, gpu, case) -> CheckResult:
    from bncore.testing import registry as R

    one = spec.call(cpu, case, None)
    g = spec.call(gpu, case, None)
    worst_key, worst, worst_tol = "-", 0.0, 0.0
    ok = True
    bad = []
    for k, (err, tol) in R.errors_between_backends(spec, case, one, g).items():
        if _ratio(err, tol) >= _ratio(worst, worst_tol):
            worst_key, worst, worst_tol = k, err, tol
        if not err <= tol:
            ok = False
            bad.append(f"{k}: GPU {err:.2e} from the CPU (tolerance {tol:.0e})")
    return CheckResult(spec.name, "gpu", str(case.params["dtype"]), _layout(case.params),
                       float(worst), float(worst_tol), bool(ok), output=worst_key,
                       case=_case_dict(case.params),
                       message="; ".join(bad) + (f" ({case.describe()})" if bad else ""))


def _gradient_check(spec, params, mode: str) -> CheckResult:
    report = spec.gradcheck(params, mode=mode)
    where = ("" if report.worst_input is None else
             f" worst at input {report.worst_input} element {report.worst_index}")
    # the error in units of its tolerance (atol + rtol * scale + the finite
    # differences' own error: bncore.gradcheck), so that error <= tolerance is
    # the verdict; an unresolved comparison fails whatever its error
    ratio = float(report.ratio) if not report.unresolved else float("inf")
    return CheckResult(spec.name, "gradient", "float64", _layout(dict(params, layout="c")),
                       ratio, 1.0, bool(report.ok),
                       output=f"{mode} ({report.checks} comparisons; error / tolerance)",
                       case=_case_dict(params),
                       message="" if report.ok else report.summary() + where)


def _full_jacobian_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """A small draw, so the full Jacobian stays a few thousand entries."""
    return dict(params, ndim=3, batch=3, channels=2, axis="1")


# --------------------------------------------------------------------------

@dataclass
class Plan:
    jobs: List[Tuple[str, Any, Any]]
    gpu_used: bool
    gpu_reason: Optional[str]


def _cell_rng(seed: int, *cell) -> np.random.Generator:
    """The random stream of one cell of the sample (op, check, dtype, layout):
    seeded by the cell itself, so that a narrower run (--op, --dtype, fewer
    --samples) draws the same cases for the cells it keeps, a prefix of them."""
    key = zlib.crc32("|".join(map(str, cell)).encode())
    return np.random.default_rng([seed, key])


def plan(ops: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None,
         samples: int = 24, fd_samples: int = 8, seed: int = 1234, gpu: Optional[Any] = None,
         gpu_reason: Optional[str] = None) -> Plan:
    """The list of checks to run: (kind, spec, params).

    Stratified, so every dtype and memory layout of an op is covered whatever
    the sample size: ``samples`` oracle cases (and one thread-determinism case)
    per (dtype, layout) cell, each cell's other parameters drawn at random;
    ``fd_samples`` random-direction gradient checks plus one full-Jacobian
    check per differentiable op.
    """
    from bncore.testing import registry as R

    specs = [s for s in R.all_specs() if not ops or s.name in ops]
    jobs = []
    for spec in specs:
        space = dict(spec.space)
        op_dtypes = tuple(space.get("dtype", ("-",)))
        if dtypes:
            op_dtypes = tuple(d for d in op_dtypes
                              if d in dtypes or (d == "float16_grads" and "float16" in dtypes))
            if not op_dtypes:
                continue
        layouts = tuple(dict.fromkeys(space.get("layout", (None,))))
        for dt in dict.fromkeys(op_dtypes):
            for layout in layouts:
                cell = dict(space, dtype=(dt,))
                if layout is not None:
                    cell["layout"] = (layout,)
                rng = _cell_rng(seed, spec.name, "oracle", dt, layout)
                for _ in range(samples):
                    params = R.sample_params(spec, rng, cell)
                    jobs.append(("oracle", spec, params))
                    if gpu is not None and spec.gpu:
                        jobs.append(("gpu", spec, params))
                jobs.append(("threads", spec, R.sample_params(
                    spec, _cell_rng(seed, spec.name, "threads", dt, layout),
                    dict(R.threads_space(spec), **{k: v for k, v in cell.items()
                                                   if k in ("dtype", "layout")}))))
        if spec.gradcheck is not None and (not dtypes or "float64" in dtypes):
            rng = _cell_rng(seed, spec.name, "gradient")
            for _ in range(fd_samples):
                jobs.append(("gradient-random", spec, R.sample_params(spec, rng, spec.fd_space)))
            jobs.append(("gradient-full", spec, _full_jacobian_params(R.sample_params(
                spec, _cell_rng(seed, spec.name, "gradient-full"), spec.fd_space))))
    return Plan(jobs, gpu is not None, gpu_reason)


def run(the_plan: Plan, gpu: Optional[Any] = None, progress: bool = True) -> List[CheckResult]:
    from bncore.testing import registry as R

    cpu = R.cpu_backend()
    results = []
    for kind, spec, params in _progress(the_plan.jobs, "bncore check", progress):
        try:
            if kind.startswith("gradient"):
                results.append(_gradient_check(spec, params, kind.split("-")[1]))
                continue
            case = spec.make_case(params)
            with np.errstate(all="ignore"):
                if kind == "oracle":
                    results.append(_oracle_check(spec, cpu, case))
                elif kind == "threads":
                    results.append(_threads_check(spec, cpu, case))
                elif kind == "gpu":
                    results.append(_gpu_check(spec, cpu, gpu, case))
        except Exception as exc:  # noqa: BLE001 - a crash is a failed check, not a traceback
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            results.append(CheckResult(
                spec.name, kind.split("-")[0], str(params.get("dtype", "-")),
                _layout(params), math.nan, 0.0, False, case=_case_dict(params),
                message=f"raised {tb}"))
    return results


def summarize(results: Sequence[CheckResult], by_layout: bool = False) -> List[Dict[str, Any]]:
    """One row per (op, check, dtype): the worst case, its layout, how many cases.

    Thread-determinism checks fold into one row per op (dtype "all");
    ``by_layout`` splits the rows further by memory layout (c, permuted, ...)."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    order: List[tuple] = []
    for r in results:
        dtype = "all" if r.check == "threads" else r.dtype
        key = (r.op, r.check, dtype)
        if by_layout:
            key += (r.case.get("layout", "-"),)
        g = groups.get(key)
        if g is None:
            order.append(key)
            groups[key] = g = dict(op=r.op, check=r.check, dtype=dtype, layout=r.layout,
                                   worst_error=r.error, tolerance=r.tolerance, ok=r.ok,
                                   cases=0, _rank=r.severity, _layouts=set())
        g["cases"] += 1
        g["_layouts"].add(r.layout)
        if r.severity > g["_rank"]:
            g.update(layout=r.layout, worst_error=r.error, tolerance=r.tolerance,
                     _rank=r.severity)
        g["ok"] = g["ok"] and r.ok
    dtype_rank = {"float16": 0, "float16_grads": 0, "float32": 1, "float64": 2, "all": 3}
    op_rank = {}
    for key in order:
        op_rank.setdefault(key[0], len(op_rank))
    order.sort(key=lambda k: (op_rank[k[0]], CHECK_KINDS.index(k[1]) if k[1] in CHECK_KINDS
                              else 9, dtype_rank.get(k[2], 4), k[3:]))
    rows = []
    for key in order:
        g = groups[key]
        g["layouts"] = len(g.pop("_layouts"))
        g.pop("_rank")
        rows.append(g)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = (f"{'op':<20} {'check':<9} {'dtype':<14} {'worst layout':<18} {'worst error':>11} "
            f"{'tolerance':>9}  {'result':<6} cases")
    lines = [head, "-" * len(head)]
    for r in rows:
        err = r["worst_error"]
        err_s = "-" if err is None or not math.isfinite(err) else f"{err:.2e}"
        if r["check"] == "threads":
            err_s = "bitwise" if r["ok"] else "differ"
            tol_s = "equal"
        else:
            tol_s = f"{r['tolerance']:.0e}"
        layout = r["layout"] if len(r["layout"]) <= 18 else r["layout"][:17] + "~"
        lines.append(f"{r['op']:<20} {r['check']:<9} {r['dtype']:<14} {layout:<18} {err_s:>11} "
                     f"{tol_s:>9}  {'pass' if r['ok'] else 'FAIL':<6} {r['cases']}")
    return "\n".join(lines)


def to_json(results: Sequence[CheckResult], seconds: float, settings: Dict[str, Any],
            the_plan: Plan, rows: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, Any]:
    import bncore

    info = bncore.build_info()
    return _jsonable({
        "schema": SCHEMA,
        "ok": all(r.ok for r in results),
        "seconds": seconds,
        "bncore": {"version": bncore.__version__, "openmp": bool(info.get("openmp")),
                   "num_threads": bncore.get_num_threads()},
        "gpu": {"used": the_plan.gpu_used, "reason": the_plan.gpu_reason},
        "settings": settings,
        "summary": summarize(results) if rows is None else list(rows),
        "checks": [asdict(r) for r in results],
    })


def main_check(ops=None, dtypes=None, samples=24, fd_samples=8, seed=1234, gpu="auto",
               json_path=None, progress=True, by_layout=False, out=None) -> int:
    """The body of ``bncore check``; returns the exit status (0 pass, 1 fail, 2 usage)."""
    from bncore.testing import registry as R

    names = [s.name for s in R.all_specs()]
    unknown = [o for o in (ops or []) if o not in names]
    if unknown:
        print(f"bncore check: unknown op {', '.join(unknown)}; the registry has: "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    backend, reason = (None, "disabled with --no-gpu") if gpu == "off" else gpu_status(gpu == "on")
    if gpu == "on" and backend is None:
        print(f"bncore check --gpu: no GPU check possible: {reason}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    the_plan = plan(ops, dtypes, samples, fd_samples, seed, backend, reason)
    results = run(the_plan, backend, progress)
    seconds = time.perf_counter() - t0
    rows = summarize(results, by_layout)
    if json_path:
        # written before the report is printed: `bncore check --json f | head`
        # must still leave f
        settings = dict(ops=list(ops or names), dtypes=list(dtypes) if dtypes else None,
                        samples=samples, fd_samples=fd_samples, seed=seed, by_layout=by_layout)
        problem = write_json_or_say("check", json_path,
                                    to_json(results, seconds, settings, the_plan, rows))
        if problem:
            return problem
    failed = [r for r in results if not r.ok]
    try:
        _print_check_report(rows, failed, results, seconds, backend, reason, out or sys.stdout)
    except BrokenPipeError:          # the reader went away: the status still tells
        silence_stdout()
    return 1 if failed else 0


def silence_stdout() -> None:
    """Point stdout at /dev/null after its reader went away (`bncore check | head`),
    so that the rest of a run (its JSON, its exit status) goes on without raising."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def _print_check_report(rows, failed, results, seconds, backend, reason, out) -> None:
    print(format_table(rows), file=out)
    if failed:
        print("\nfailures:", file=out)
        for r in failed[:20]:
            print(f"  {r.op} {r.check} {r.dtype} [{r.layout}] {r.output}: {r.message} "
                  f"case={r.case}", file=out)
        if len(failed) > 20:
            print(f"  ... and {len(failed) - 20} more (see --json)", file=out)
    import bncore

    gpu_line = "GPU: compared with bncore_gpu" if backend is not None else f"GPU: not checked ({reason})"
    # a build without OpenMP runs every thread count on one thread: its
    # threads rows compare the serial code with itself
    serial = ("" if bncore.build_info().get("openmp") else
              " Built without OpenMP: the threads rows compared one thread with itself.")
    if not serial and _threads._forked_child:
        serial = (" In a child of os.fork every call runs on one thread (bncore.set_num_threads "
                  "docs): the threads rows compared one thread with itself.")
    if not serial:
        # an OpenMP runtime may give fewer threads than asked (OMP_THREAD_LIMIT,
        # OMP_DYNAMIC): the threads rows then compared fewer counts than they name
        from bncore import _openmp

        most = _openmp.threads_in_parallel_region(_threads.note_parallel(max(THREAD_COUNTS)))
        if most < max(THREAD_COUNTS):
            serial = (f" OpenMP gave a parallel region that asked for {max(THREAD_COUNTS)} "
                      f"threads only {most} (OMP_THREAD_LIMIT?): the threads rows compared "
                      f"{'one thread with itself' if most == 1 else f'at most {most} threads'}.")
    print(f"\n{len(results)} checks on {len(rows)} rows, {len(failed)} failed, "
          f"{seconds:.1f} s, {bncore.get_num_threads()} threads. {gpu_line}{serial}", file=out)
    print("PASS" if not failed else "FAIL", file=out)

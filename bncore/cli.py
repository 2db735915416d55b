"""The ``bncore`` command line (also ``python -m bncore``).

    bncore check       self-check every op: float64 oracle, finite differences,
                       thread determinism (and CPU vs GPU when a GPU is usable)
    bncore gradcheck   finite-difference gradient check of a built-in op or of
                       your own function (module:function)
    bncore validate    run PyTorch / Keras / JAX / ONNX next to bncore on the same
                       inputs and explain every difference
    bncore config      print version, OpenMP, threads and compile flags

Exit status: 0 when everything passed, 1 when a check failed, 2 on a usage
error (unknown op, --gpu without a GPU, a function that cannot be loaded).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import sys
import textwrap
from typing import List, Optional

import numpy as np

from bncore._atomic_write import write_json_or_say

EPILOG_CHECK = """\
examples:
  bncore check                          everything, a few seconds on 2 cores
  bncore check --op batch_norm_forward --dtype float32
  bncore check --json report.json       machine-readable (schema below)

""" 

EPILOG_GRADCHECK = """\
examples:
  bncore gradcheck --op batch_norm_backward --mode full
  bncore gradcheck mymodule:f --shape 4,3 --shape 3,2 --mode full

your function: f(*inputs) -> array (or tuple of arrays), float64 NumPy in and out;
its vector-Jacobian product vjp(cotangent, *inputs) -> one gradient per input,
found as --vjp MODULE:NAME, else as f.vjp, else as NAME_vjp in f's module.
Inputs are standard-normal float64 arrays of the --shape's (seeded), or the
arrays of an .npz file (--inputs, in the order arr_0, arr_1, ...).
"""

EPILOG_VALIDATE = """\
each framework's own implementation and bncore (in that framework's
convention: eps, momentum form, biased or unbiased variance, ...) run on the
same inputs. The table gives the largest absolute and relative difference
and a verdict:
  exact       bitwise identical
  rounding    within float rounding; a float64 rerun shows the gap closing
  explained   a larger difference whose cause was measured (the note below
              the table gives the numbers: a cancellation error that vanishes
              on centred data, a non-exact clip, a variance convention, ...)
  DIFFERS     a difference no diagnostic explains (exit status 1)
A framework that is not installed is reported in one line and skipped (exit 0).
"""


def _csv_shape(text: str):
    text = text.strip().strip("()")
    if not text:
        return ()
    parts = text.split(",")
    if parts[-1].strip() == "" and len(parts) > 1:
        parts = parts[:-1]                  # "4," as Python writes a 1-tuple
    try:
        # ("4,,3" is refused: an empty size is a typo, not a dimension to drop)
        shape = tuple(int(s) for s in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is comma-separated integers, got {text!r}")
    if any(d < 0 for d in shape):
        raise argparse.ArgumentTypeError(f"a shape's sizes are >= 0, got {text!r}")
    return shape


def _seed(text: str) -> int:
    """A random seed: an integer >= 0 (NumPy's generators take no negative seed)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {text!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"a seed is an integer >= 0, got {v}")
    return v


# --------------------------------------------------------------------------
# check

def _json_path_problem(path: Optional[str]) -> str:
    """Why --json PATH could not be written ('' when it can), checked before a
    run of minutes rather than after it."""
    if not path:
        return ""
    from bncore._atomic_write import _own_stream

    if _own_stream(path) is not None:
        return ""                 # /dev/stdout and the like: written through the stream
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        return f"--json {path}: directory {directory} does not exist"
    if os.path.isdir(path):
        return f"--json {path} is a directory"
    if not os.access(directory, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"--json {path}: not writable"
    return ""


def _usage_error(command: str, problem: str) -> int:
    print(f"bncore {command}: {problem}", file=sys.stderr)
    return 2


def cmd_check(args) -> int:
    from bncore import selfcheck

    if args.schema:
        print(selfcheck.JSON_SCHEMA_DOC)
        return 0
    if args.samples < 1 or args.fd_samples < 0:
        return _usage_error("check", "--samples must be >= 1 and --fd-samples >= 0 "
                                     "(no samples would check nothing and pass)")
    problem = _json_path_problem(args.json)
    if problem:
        return _usage_error("check", problem)
    gpu = "on" if args.gpu else ("off" if args.no_gpu else "auto")
    progress = args.progress or (not args.quiet and sys.stderr.isatty())
    return selfcheck.main_check(args.op, args.dtype, args.samples, args.fd_samples, args.seed,
                                gpu, args.json, progress, args.by_layout)


# --------------------------------------------------------------------------
# gradcheck

def _load_object(spec: str):
    if ":" not in spec:
        raise ValueError(f"expected MODULE:NAME, got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    if mod_name.endswith(".py") and not os.path.exists(mod_name):
        raise FileNotFoundError(f"no file {mod_name}")
    if mod_name.endswith(".py"):
        name = os.path.splitext(os.path.basename(mod_name))[0]
        # as `python path/to/file.py` does: the file's own folder first, so its
        # sibling modules import (review: 'No module named helpers')
        folder = os.path.dirname(os.path.abspath(mod_name))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        s = importlib.util.spec_from_file_location(name, mod_name)
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj, module, attr


def _report_dict(report, label: str) -> dict:
    from dataclasses import asdict

    d = asdict(report)
    d["label"] = label
    d["worst_index"] = None if report.worst_index is None else list(report.worst_index)
    for k in ("max_abs_error", "max_rel_error", "analytic", "numeric"):
        v = d[k]
        d[k] = v if np.isfinite(v) else None
    return d


def _load_inputs(path: str) -> list:
    """The arrays of an .npz file, in order: arr_0, arr_1, ... as np.savez(f, *arrays)
    names them, else the order they were saved in (np.savez(f, x=..., w=...))."""
    data = np.load(path, allow_pickle=False)
    if not hasattr(data, "files"):           # an .npy file: one array, no archive
        raise ValueError("not an .npz archive (save the inputs with np.savez(FILE, x, w, ...))")
    with data:
        names = list(data.files)
        positional = [f"arr_{i}" for i in range(len(names))]
        if sorted(names) == sorted(positional):
            names = positional
        return [data[k] for k in names]


def _failed_report(path: Optional[str], text: str) -> None:
    """Where the user's code failed (on import or in the check), a report saying
    so replaces an earlier one: left in place, it said "ok": true for a run that
    did not happen (review). Usage errors found before any user code ran leave
    the file as it was."""
    if path:
        write_json_or_say("gradcheck", path, {"schema": "bncore-gradcheck/1", "ok": False,
                                              "error": text, "reports": []})


def cmd_gradcheck(args) -> int:
    from bncore.gradcheck import GradcheckSetupError, check_settings, gradcheck

    given = dict(h=args.h, rtol=args.rtol, atol=args.atol, n_directions=args.directions)
    # unset options: gradcheck's defaults for your function, the registry's for built-in ops
    user = dict(h=1e-6, rtol=1e-6, atol=0.0, n_directions=6)
    user.update({k: v for k, v in given.items() if v is not None})
    # options that belong to the other form are refused, not silently dropped
    if args.function:
        stray = [o for o, v in (("--op", args.op), ("--samples", args.samples)) if v is not None]
        if args.shape and args.inputs is not None:
            stray.append("--shape (with --inputs)")
        if stray:
            return _usage_error("gradcheck", f"{', '.join(stray)}: not with MODULE:FUNCTION "
                                             f"(--op and --samples are for the built-in ops; "
                                             f"give --shape or --inputs, not both)")
    else:
        stray = [o for o, v in (("--vjp", args.vjp), ("--shape", args.shape),
                                ("--inputs", args.inputs)) if v is not None]
        if stray:
            return _usage_error("gradcheck", f"{', '.join(stray)}: only with MODULE:FUNCTION "
                                             f"(the built-in ops make their own inputs)")
    samples = 3 if args.samples is None else args.samples
    try:
        check_settings(args.mode, user["rtol"], user["atol"], user["h"], user["n_directions"],
                       names=("--rtol", "--atol", "--h", "--directions"))
        if samples < 1:
            raise ValueError("--samples must be >= 1 (0 would check nothing and pass)")
    except (TypeError, ValueError) as exc:
        return _usage_error("gradcheck", str(exc))
    problem = _json_path_problem(args.json)
    if problem:
        return _usage_error("gradcheck", problem)
    reports = []
    if args.function:
        loading = args.function          # what a failure below names
        try:
            f, module, attr = _load_object(args.function)
            if args.vjp:
                loading = f"--vjp {args.vjp}"
                vjp = _load_object(args.vjp)[0]
            elif hasattr(f, "vjp"):
                vjp = f.vjp
            elif hasattr(module, attr.split(".")[-1] + "_vjp"):
                vjp = getattr(module, attr.split(".")[-1] + "_vjp")
            else:
                raise ValueError(f"no vector-Jacobian product for {args.function}: pass --vjp "
                                 f"MODULE:NAME, or define {attr}.vjp or {attr}_vjp")
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            text = f"cannot load {loading}: {exc}"
            print(f"bncore gradcheck: {text}", file=sys.stderr)
            _failed_report(args.json, text)
            return 2
        if args.inputs:
            try:
                inputs = _load_inputs(args.inputs)
            except (OSError, ValueError, EOFError) as exc:
                print(f"bncore gradcheck: cannot read --inputs {args.inputs}: {exc}",
                      file=sys.stderr)
                return 2
        elif args.shape:
            rng = np.random.default_rng(args.seed)
            try:
                inputs = [rng.standard_normal(s) for s in args.shape]
            except (ValueError, MemoryError) as exc:
                return _usage_error("gradcheck", f"--shape {args.shape}: cannot make inputs of "
                                                 f"these shapes ({type(exc).__name__}: {exc})")
        else:
            print("bncore gradcheck: give the input shapes (--shape 4,3 --shape 3,2) or --inputs "
                  "FILE.npz", file=sys.stderr)
            return 2
        if not sum(np.size(a) for a in inputs):
            return _usage_error("gradcheck", "the inputs are empty: nothing to check "
                                             "(a check of nothing would pass)")
        try:
            inspect.signature(f).bind(*inputs)
        except TypeError as exc:
            return _usage_error("gradcheck", f"{args.function} cannot take the {len(inputs)} "
                                             f"inputs given ({exc})")
        except ValueError:
            pass                            # (no signature to inspect: a builtin, a ufunc)
        try:
            report = gradcheck(f, inputs, vjp, mode=args.mode, seed=args.seed, **user)
        except GradcheckSetupError as exc:
            return _usage_error("gradcheck", str(exc))
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            # (SystemExit too: a function calling sys.exit(0) made the check exit 0
            # with no report)
            text = f"{args.function} raised {type(exc).__name__}: {exc}"
            print(f"bncore gradcheck: {text}", file=sys.stderr)
            _failed_report(args.json, text)
            return 1
        reports.append((args.function, report))
    else:
        from bncore.testing import registry as R

        specs = [s for s in R.all_specs() if s.gradcheck is not None]
        names = [s.name for s in specs]
        chosen = args.op or names
        unknown = [o for o in chosen if o not in names]
        if unknown:
            print(f"bncore gradcheck: no gradient for {', '.join(unknown)}; differentiable "
                  f"ops: {', '.join(names)}", file=sys.stderr)
            return 2
        from bncore.selfcheck import _full_jacobian_params

        seen = {}
        for spec in specs:
            if spec.name in chosen:
                # one check per gradient implementation (forward and backward share one)
                seen.setdefault(spec.gradcheck, []).append(spec)
        for fn, group in seen.items():
            spec = group[0]
            rng = np.random.default_rng(args.seed)
            for _ in range(samples):
                params = R.sample_params(spec, rng, spec.fd_space)
                if args.mode == "full":
                    params = _full_jacobian_params(params)
                case = spec.make_case(dict(params, dtype="float64", layout="c"))
                label = f"{' / '.join(s.name for s in group)} [{case.describe()}]"
                reports.append((label, fn(params, mode=args.mode, **given)))
    failed = sum(not r.ok for _, r in reports)
    if args.json:
        # written before the report is printed: `bncore gradcheck --json f | head`
        # must still leave f
        problem = write_json_or_say(
            "gradcheck", args.json, {"schema": "bncore-gradcheck/1", "ok": failed == 0,
                                     "reports": [_report_dict(r, label) for label, r in reports]})
        if problem:
            return problem
    try:
        for label, report in reports:
            print(f"{label}\n  {report.summary()}")
        print(f"\n{len(reports)} gradient checks, {failed} failed")
    except BrokenPipeError:           # the reader went away: the status still tells
        from bncore.selfcheck import silence_stdout
        silence_stdout()
    return 1 if failed else 0


# --------------------------------------------------------------------------
# validate

def cmd_validate(args) -> int:
    from bncore.validate import main_validate

    problem = _json_path_problem(args.json)
    if problem:
        return _usage_error("validate", problem)
    return main_validate(args.framework, json_path=args.json, quick=args.quick)


def cmd_config(args) -> int:
    from bncore import show_config

    show_config()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bncore",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            bncore: reference numerics for batch normalization, gradient clipping and
            optimizer updates (float64 accumulation, deterministic, every framework's
            conventions).

            start here:  bncore check              is this install computing correctly?
                         bncore validate torch     how does PyTorch differ, and why?"""),
        epilog="exit status: 0 all passed, 1 a check failed, 2 usage error.\n"
               "run 'bncore COMMAND --help' for each command's options.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser(
        "check", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="self-check every op (oracle, gradients, threads, GPU)",
        description=textwrap.dedent("""\
            Self-check of this installation. For every op in bncore's registry, on a
            fixed random sample of shapes, memory layouts, dtypes and flags:
              oracle    float16/float32/float64 results against a float64 NumPy oracle
              gradient  analytic gradients against central finite differences (float64)
              threads   1, 2 and 3 OpenMP threads give bitwise identical results
              gpu       CPU against bncore_gpu (automatic when a GPU is usable)
            Prints a progress bar, then one row per (op, check, dtype) with the worst
            case's layout, its error and the tolerance. Exit status 1 on any failure."""),
        epilog=EPILOG_CHECK + "JSON output (--json):\n" + textwrap.indent(
            __import__("bncore.selfcheck", fromlist=["x"]).JSON_SCHEMA_DOC, "  "))
    c.add_argument("--op", action="append", metavar="NAME",
                   help="check only this op (repeatable), e.g. batch_norm_forward, adam_step")
    c.add_argument("--dtype", action="append", choices=["float16", "float32", "float64"],
                   help="check only this input dtype (repeatable)")
    c.add_argument("--samples", type=int, default=24, metavar="N",
                   help="oracle cases per (op, dtype, memory layout) cell (default 24)")
    c.add_argument("--fd-samples", type=int, default=8, metavar="N",
                   help="random-direction gradient checks per differentiable op (default 8; "
                        "one full-Jacobian check is always added)")
    c.add_argument("--by-layout", action="store_true",
                   help="one table row per memory layout (c, permuted, fortran, strided)")
    c.add_argument("--seed", type=_seed, default=1234,
                   help="seed of the case sample, >= 0 (default 1234)")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--gpu", action="store_true",
                   help="require the CPU-vs-GPU comparison (exit 2 if no GPU is usable)")
    g.add_argument("--no-gpu", action="store_true", help="skip the GPU even when one is usable")
    c.add_argument("--json", metavar="FILE", help="write every check as JSON (see below)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")
    c.add_argument("--schema", action="store_true", help="print the JSON schema and exit")
    c.set_defaults(func=cmd_check)

    gc = sub.add_parser(
        "gradcheck", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="finite-difference gradient check of an op or of your function",
        description=textwrap.dedent("""\
            Compare an analytic gradient (vector-Jacobian product) with central finite
            differences in float64. Without FUNCTION: bncore's differentiable ops.
            mode random: <vjp(u), v> against (<u, f(x+hv)> - <u, f(x-hv)>) / 2h for random
                         u, v (cheap, any size);
            mode full:   the whole Jacobian, entry by entry (small inputs).
            The report names the worst entry: input, element, analytic and numeric value.
            Python: bncore.gradcheck(f, inputs, vjp, mode=...) -> GradcheckReport."""),
        epilog=EPILOG_GRADCHECK)
    gc.add_argument("function", nargs="?", metavar="MODULE:FUNCTION",
                    help="your function (module name or path/to/file.py, then :name)")
    gc.add_argument("--vjp", metavar="MODULE:NAME", help="its vector-Jacobian product")
    gc.add_argument("--shape", action="append", type=_csv_shape, metavar="D1,D2,...",
                    help="shape of each input, in order (repeatable)")
    gc.add_argument("--inputs", metavar="FILE.npz", help="the inputs, instead of --shape")
    gc.add_argument("--op", action="append", metavar="NAME",
                    help="built-in op to check (repeatable; default: every differentiable op)")
    gc.add_argument("--mode", choices=["random", "full"], default="random",
                    help="random directions (default) or the full Jacobian")
    gc.add_argument("--samples", type=int, default=None, metavar="N",
                    help="random draws per built-in op (default 3)")
    gc.add_argument("--directions", type=int, default=None, metavar="N",
                    help="random directions per check in random mode (default 6)")
    gc.add_argument("--h", type=float, default=None,
                    help="finite-difference step (default 1e-6; built-in ops 1e-5)")
    gc.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e-6)")
    gc.add_argument("--atol", type=float, default=None,
                    help="absolute tolerance (default 0: the finite differences' own "
                         "rounding and truncation error is allowed for)")
    gc.add_argument("--seed", type=_seed, default=0, help="seed of inputs and directions, >= 0")
    gc.add_argument("--json", metavar="FILE", help="write the reports as JSON")
    gc.set_defaults(func=cmd_gradcheck)

    v = sub.add_parser(
        "validate", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compare PyTorch, Keras, JAX/optax/flax or ONNX with bncore",
        description="Run a framework's batch norm, optimizers and clipping next to bncore "
                    "on the same inputs and explain every difference.",
        epilog=EPILOG_VALIDATE + "\ninstall the frameworks with: pip install \"bncore[validate]\"")
    v.add_argument("framework", choices=["torch", "keras", "jax", "onnx", "all"],
                   help="torch (F.batch_norm, nn.BatchNorm*d, torch.optim, clip_grad_*), "
                        "keras (Keras 3 on the JAX backend), jax (flax BatchNorm, optax), "
                        "onnx (ReferenceEvaluator and onnxruntime), or all")
    v.add_argument("--json", metavar="FILE", help="write the rows and notes as JSON")
    v.add_argument("--quick", action="store_true", help="fewer configurations (for tests)")
    v.set_defaults(func=cmd_validate)

    cf = sub.add_parser("config", help="print version, OpenMP, threads and compile flags")
    cf.set_defaults(func=cmd_config)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:           # `bncore config | head`: stop quietly
        from bncore.selfcheck import silence_stdout
        silence_stdout()
        return 1


if __name__ == "__main__":
    sys.exit(main())

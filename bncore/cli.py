"""The ``bncore`` command line (also ``python -m bncore``).

    bncore check      self-check every registered op: oracle, threads, gradients
    bncore config     print the build configuration
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import numpy as np


def _progress(iterable, total: int, desc: str, enabled: bool):
    """tqdm when installed, a one-line counter on stderr otherwise."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False)
        return
    for i, item in enumerate(iterable, 1):
        sys.stderr.write(f"\r{desc}: {i}/{total}")
        sys.stderr.flush()
        yield item
    sys.stderr.write("\r" + " " * (len(desc) + 24) + "\r")


def _check_rows(ops: Optional[List[str]], dtypes: Optional[List[str]], samples: int,
                use_gpu: bool, show_progress: bool):
    from bncore.testing import registry as R

    cpu = R.cpu_backend()
    gpu = R.gpu_backend() if use_gpu else None
    specs = [s for s in R.all_specs() if not ops or s.name in ops]
    rows = []
    jobs = []
    for spec in specs:
        rng = np.random.default_rng(1234)
        space = dict(spec.space)
        if dtypes:
            space["dtype"] = tuple(d for d in space.get("dtype", ()) if d in dtypes) or space["dtype"]
        for _ in range(samples):
            jobs.append((spec, R.sample_params(spec, rng, space)))
        if spec.gradcheck is not None:
            jobs.append((spec, ("fd", R.sample_params(spec, rng, spec.fd_space))))
    for spec, params in _progress(jobs, len(jobs), "bncore check", show_progress):
        if isinstance(params, tuple) and params[0] == "fd":
            report = spec.gradcheck(params[1])
            rows.append(dict(op=spec.name, check="gradient vs finite differences", dtype="float64",
                             layout=params[1].get("layout", "-"), error=report.max_rel_error,
                             tolerance=report.rtol, ok=bool(report.ok)))
            continue
        case = spec.make_case(params)
        errs = R.errors_against_oracle(spec, cpu, case)
        worst = max(errs.items(), key=lambda kv: kv[1][0] / kv[1][1])
        rows.append(dict(op=spec.name, check=f"oracle ({worst[0]})", dtype=case.params["dtype"],
                         layout=case.params.get("layout", "-"), error=worst[1][0],
                         tolerance=worst[1][1], ok=all(e <= t for e, t in errs.values())))
        one = spec.call(cpu, case, 1)
        three = spec.call(cpu, case, 3)
        same = all(one[k].tobytes() == three[k].tobytes() for k in one)
        rows.append(dict(op=spec.name, check="threads 1 vs 3 bitwise", dtype=case.params["dtype"],
                         layout=case.params.get("layout", "-"), error=0.0 if same else 1.0,
                         tolerance=0.0, ok=same))
        if gpu is not None and spec.gpu:
            g = spec.call(gpu, case, None)
            err = max(R.ref.normwise_relative_error(g[k], one[k], floor=1e-30) for k in one)
            tol = min(spec.tolerance(case, k) for k in one)
            rows.append(dict(op=spec.name, check="GPU vs CPU", dtype=case.params["dtype"],
                             layout=case.params.get("layout", "-"), error=err, tolerance=tol,
                             ok=err <= tol))
    return rows


def _summarize(rows):
    """Worst row per (op, check, dtype), for the table."""
    groups = {}
    for r in rows:
        key = (r["op"], r["check"].split(" (")[0], r["dtype"])
        ratio = r["error"] / r["tolerance"] if r["tolerance"] else (0.0 if r["ok"] else np.inf)
        cur = groups.get(key)
        if cur is None or not r["ok"] or (cur["ok"] and ratio > cur["_ratio"]):
            if cur is None or cur["ok"] or not r["ok"]:
                groups[key] = dict(r, _ratio=ratio, n=(cur["n"] + 1) if cur else 1)
                continue
        groups[key]["n"] += 1
    return list(groups.values())


def cmd_check(args) -> int:
    t0 = time.perf_counter()
    rows = _check_rows(args.op, args.dtype, args.samples, args.gpu, not args.quiet)
    table = _summarize(rows)
    print(f"{'op':<22} {'check':<32} {'dtype':<8} {'worst error':>12} {'tolerance':>10}  result")
    for r in table:
        print(f"{r['op']:<22} {r['check'].split(' (')[0]:<32} {r['dtype']:<8} "
              f"{r['error']:>12.2e} {r['tolerance']:>10.0e}  {'pass' if r['ok'] else 'FAIL'}"
              f"  ({r['n']} cases)")
    failed = [r for r in rows if not r["ok"]]
    dt = time.perf_counter() - t0
    print(f"\n{len(rows)} checks, {len(failed)} failed, {dt:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"ok": not failed, "seconds": dt, "checks": rows}, fh, indent=2)
    return 1 if failed else 0


def cmd_config(args) -> int:
    from bncore import show_config

    show_config()
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bncore",
        description="bncore: reference numerics for batch normalization, clipping and optimizers.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="self-check every op against the float64 oracle, "
                                     "finite differences and across thread counts")
    c.add_argument("--op", action="append", help="check only this op (repeatable)")
    c.add_argument("--dtype", action="append", choices=["float16", "float32", "float64"],
                   help="check only this dtype (repeatable)")
    c.add_argument("--samples", type=int, default=12, help="random cases per op (default 12)")
    c.add_argument("--gpu", action="store_true", help="also compare bncore_gpu with the CPU")
    c.add_argument("--json", metavar="FILE", help="write every check as JSON")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_check)
    g = sub.add_parser("config", help="print version, OpenMP, threads and compile flags")
    g.set_defaults(func=cmd_config)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

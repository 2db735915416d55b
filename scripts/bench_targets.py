"""The issues' CPU speed targets, and which of them one bench run met.

Issue 2 (batch normalization) and issue 3 (optimizers and clipping) state
their targets as ratios from one run of scripts/bench.py, float32 on 2
threads: bncore against torch 2.13 (torch/bncore >= a limit) and against the
one-thread floor of the same run (bncore/floor <= a limit), plus an absolute
bound on the per-call overhead. bench.py prints this table under its own, so
a run says at once what it met; a case the run did not time (--only) is left
out, not counted as met.
"""
from typing import Dict, List, NamedTuple, Optional

__all__ = ["Target", "TARGETS", "verdicts", "report"]


class Target(NamedTuple):
    issue: int
    case: str          # the bench case's name
    measure: str       # "torch/bncore", "bncore/floor" or "bncore" (seconds)
    limit: float
    at_least: bool     # the measure must be >= limit (else <= limit)


def _pair(issue: int, case: str, vs_torch: Optional[float], vs_floor: Optional[float]
          ) -> List[Target]:
    out = []
    if vs_torch is not None:
        out.append(Target(issue, case, "torch/bncore", vs_torch, True))
    if vs_floor is not None:
        out.append(Target(issue, case, "bncore/floor", vs_floor, False))
    return out


_BN = "bn {} {}"
_ISSUE2_EVAL = ("(32,64,56,56) NCHW", "(32,64,56,56) channels-last", "(256,1024)",
                "(8,256,14,14) NCHW")

TARGETS: List[Target] = (
    _pair(2, _BN.format("forward-train", "(32,64,56,56) NCHW"), 3.0, 1.3)
    + _pair(2, _BN.format("forward-train", "(32,64,56,56) channels-last"), 1.2, 1.3)
    + _pair(2, _BN.format("backward", "(32,64,56,56) NCHW"), 1.25, 1.8)
    + _pair(2, _BN.format("backward", "(32,64,56,56) channels-last"), 1.25, 1.8)
    + [t for shape in _ISSUE2_EVAL for t in _pair(2, _BN.format("forward-eval", shape), 1.0, 1.2)]
    + _pair(2, _BN.format("forward-train", "(256,1024)"), 1.0, None)
    + _pair(2, _BN.format("backward", "(256,1024)"), 1.0, None)
    + [Target(2, "bn per-call overhead (4,8)", "bncore", 10e-6, False)]
    + _pair(3, "adam 10M as 1 tensor", 1.0, 1.3)
    + _pair(3, "adam 10M as 200 tensors", 1.3, 1.3)
    + _pair(3, "sgd momentum 10M as 200 tensors", 1.2, 1.3)
    + _pair(3, "clip_grad_norm 10M as 200 tensors", 1.3, 1.3)
)


def _value(measure: str, r: Dict[str, float]) -> Optional[float]:
    b = r.get("bncore")
    if measure == "bncore":
        return b
    other = r.get("torch" if measure == "torch/bncore" else "floor")
    if b is None or other is None or b <= 0 or other <= 0:
        return None
    return other / b if measure == "torch/bncore" else b / other


def verdicts(results: Dict[str, Dict[str, float]]) -> List[dict]:
    """One row per target whose case is in `results` (case name -> seconds by
    column, as bench.py's Case.results): the measured value (None where a
    column is missing, which is not met) and whether it meets the limit."""
    rows = []
    for t in TARGETS:
        if t.case not in results:
            continue
        v = _value(t.measure, results[t.case])
        met = v is not None and (v >= t.limit if t.at_least else v <= t.limit)
        rows.append({"issue": t.issue, "case": t.case, "measure": t.measure,
                     "target": (">= " if t.at_least else "<= ") + _fmt(t.measure, t.limit),
                     "value": v, "met": met})
    return rows


def _fmt(measure: str, v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v * 1e6:.1f} us" if measure == "bncore" else f"{v:.2f}"


def report(rows: List[dict], threads: int) -> str:
    """The targets table and a line per issue: how many of its targets this run met."""
    if not rows:
        return ""
    lines = ["", "Issue targets (float32; stated for 2 threads"
             + ("" if threads == 2 else f", this run used {threads}") + "):", "",
             "| issue | case | measure | target | this run | |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['issue']} | {r['case']} | {r['measure']} | {r['target']} | "
                     f"{_fmt(r['measure'], r['value'])} | {'met' if r['met'] else 'MISSED'} |")
    lines.append("")
    for issue in sorted({r["issue"] for r in rows}):
        mine = [r for r in rows if r["issue"] == issue]
        missed = [f"{r['case']} {r['measure']}" for r in mine if not r["met"]]
        lines.append(f"issue {issue}: {len(mine) - len(missed)} of {len(mine)} targets met"
                     + (f"; missed: {'; '.join(missed)}" if missed else ""))
    return "\n".join(lines)

"""Rows, verdicts and diagnostics shared by the framework validators.

A :class:`Check` runs one configuration through a framework and through
bncore in that framework's convention, on the same inputs (drawn in float32;
the float64 run uses the same values, so it solves exactly the same problem).
:func:`evaluate` turns it into a :class:`Row`:

* ``max_abs`` / ``max_rel``: the largest difference between the framework's
  float32 result and bncore's, absolute and relative to the largest |value|
  of that output (the worst output is named);
* ``fw_err`` / ``bn_err``: each one's float32 result against the exact result
  (bncore in float64 on the same float32 inputs; bncore's float64 kernels
  agree with the independent oracle to ~1e-15, see ``bncore check``);
* the verdict: ``exact`` (bitwise in float32 and, where the framework runs
  in float64, within 1e-12 there), ``rounding`` (within ``tol`` in float32
  and within 1e-12 in float64: same formula, different rounding; where the
  framework has no float64 run, within what float32 arithmetic leaves,
  :func:`float32_limit` of bncore's own float32 error, since nothing else
  then confirms the formula), ``explained`` (a larger difference that a
  diagnostic attributes, with the measured numbers in the note) or
  ``DIFFERS``.

Diagnostics, run for every row that is not exact or rounding:

* **cancellation**: the same data with the per-channel offset removed; if the
  framework's error against the exact math falls to rounding, and its float64
  run stays within what a float32 cancellation leaves, the difference came
  from the offset, not from a convention. The reference itself is checked
  first: bncore's float64 outputs must not move when the offset is removed
  (they are invariant under it), or the row DIFFERS as bncore's error;
* **quirk**: bncore reproducing a documented framework behaviour (``quirks``,
  e.g. onnx.reference's float32 attributes); a match explains the row (a
  float64 match only where bncore with the quirk also meets the framework's
  float32 result within float32 arithmetic);
* **convention**: bncore under its other conventions (``alternatives``); a
  framework that matches one of them and not the preset makes the row
  DIFFERS (the preset is wrong), with the convention it follows named;
* **framework variant**: the framework under another setting
  (``fw_variants``, e.g. flax's ``use_fast_variance=False``);
* **precision**: the float64 run; when the two agree to 1e-12 there, the
  float32 gap is arithmetic precision (the framework's float32 arithmetic,
  amplified by the formula), not a different formula, if float32 arithmetic
  can make a gap that large (:func:`float32_limit`): a larger one is a
  float32-only difference (an eps the framework changes for float32).

Rows with ``show_alternatives`` always measure and report the alternatives
(running-variance convention, clip eps), also when they match.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

Outputs = Dict[str, np.ndarray]
Runner = Callable[..., Tuple[Optional[Outputs], Outputs]]

TOL = {"float32": 1e-5, "float64": 1e-12}
TOL64 = 1e-12
# float32 units (2^-24) of relative error that float32 arithmetic can leave in
# the validators' small problems (a few hundred values per channel), per unit of
# |mean|/std: the measured rows sit at 1-6 units (backward through jax.grad 6),
# an eps 1% off its preset at 100 or more
F32_UNITS = 32
# a row is "rounding" within twice that (64 units, 3.8e-6 on well-conditioned
# data): the tightest honest rows (flax's backward dweight 8.3e-7, torch's
# clip_grad_norm_ with norm_type 1 at 7.5e-7) then keep a 4.5x margin for a
# framework that sums in another order on another machine (at 32 units a
# simulation put 1.6-4.6% of random summation orders past it), and an eps x1.5
# in float32 alone (6.6e-6) still does not pass
ROUNDING_FACTOR = 2.0


def float32_limit(condition: Optional[float], bn_err: Optional[float] = None) -> float:
    """The largest relative difference that float32 arithmetic explains on data
    of this |mean|/std (None: 1): F32_UNITS x 2^-24 x condition, or 8x bncore's
    own float32 error where that is larger."""
    k = condition or 1.0
    return max(F32_UNITS * k * 2.0 ** -24, 8.0 * (bn_err or 0.0))


@dataclass
class Check:
    op: str
    config: str
    run: Runner                         # run(dtype, centered=False) -> (framework, bncore)
    dtype: str = "float32"
    float64: bool = True                # the framework can run this in float64
    centered: bool = False              # run(dtype, centered=True) is meaningful
    condition: Optional[float] = None   # |mean| / std of the data, for the notes
    # bncore under its other conventions: shown beside a match; a framework
    # that matches one of them and not the preset shows the preset is wrong
    alternatives: Dict[str, Callable[[str], Outputs]] = field(default_factory=dict)
    # bncore reproducing a documented framework quirk (e.g. onnx.reference's
    # float32 attributes): a match explains the difference
    quirks: Dict[str, Callable[[str], Outputs]] = field(default_factory=dict)
    show_alternatives: bool = False
    alt_keys: Optional[Tuple[str, ...]] = None   # outputs the alternatives differ in
    fw_variants: Dict[str, Callable[[str], Outputs]] = field(default_factory=dict)
    # NumPy re-enactments of the framework's formula as its source writes it
    # (float32 arithmetic, exact inputs): if one lands where the framework does,
    # it names the step that loses the accuracy
    emulations: Dict[str, Callable[[str], Outputs]] = field(default_factory=dict)
    tol: Optional[float] = None
    note: str = ""                      # a fixed remark (what the row is about)


@dataclass
class Row:
    framework: str
    op: str
    config: str
    dtype: str
    max_abs: Optional[float]
    max_rel: Optional[float]
    worst_output: str
    tol: float
    fw_err: Optional[float]
    bn_err: Optional[float]
    diff64: Optional[float]
    verdict: str
    note: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def _np(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):
        a = a.detach()
    if hasattr(a, "numpy") and not hasattr(a, "__array_namespace__"):
        try:
            return np.asarray(a.numpy())
        except Exception:  # noqa: BLE001
            pass
    return np.asarray(a)


def rel_diff(a, b) -> Tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64; NaN where NaNs differ."""
    a = _np(a).astype(np.float64)
    b = _np(b).astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0, 0.0
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.nan, math.nan
    ok = ~np.isnan(a)
    d = np.abs(a[ok] - b[ok])
    mx = float(d.max()) if d.size else 0.0
    scale = float(np.abs(b[ok]).max()) if d.size else 0.0
    if scale == 0.0:
        return mx, (0.0 if mx == 0.0 else math.inf)
    return mx, mx / scale


def compare(fw: Outputs, bn: Outputs, keys=None) -> Tuple[float, float, str]:
    """Worst (abs, rel, output name) over the outputs both have."""
    worst = (0.0, 0.0, "-")
    for k in (keys or bn.keys()):
        if k not in fw or fw[k] is None or bn.get(k) is None:
            continue
        a, r = rel_diff(fw[k], bn[k])
        # a NaN difference is the worst there is: once it is held, nothing replaces
        # it (NaN compares false both ways, so the order of the outputs decided)
        if math.isnan(worst[1]) and worst[2] != "-":
            continue
        if math.isnan(r) or r > worst[1] or worst[2] == "-":
            worst = (a, r, k)
    return worst


def bitwise_equal(fw: Outputs, bn: Outputs) -> bool:
    for k in bn:
        if k not in fw:
            continue
        a, b = _np(fw[k]), _np(bn[k])
        if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
            return False
    return True


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def evaluate(framework: str, check: Check) -> Row:
    tol = check.tol if check.tol is not None else TOL[check.dtype]
    fw32, bn32 = check.run(check.dtype)
    fw64, bn64 = check.run("float64")
    if not check.float64:
        fw64 = None
    ab, rl, key = compare(fw32, bn32)
    fw_err = compare(fw32, bn64)[1]
    bn_err = compare(bn32, bn64)[1]
    diff64 = compare(fw64, bn64)[1] if fw64 is not None else None
    notes: List[str] = [check.note] if (check.note and not check.show_alternatives) else []
    odd = sorted(f"{k} as {_np(fw32[k]).dtype}" for k in fw32
                 if k in bn32 and _np(fw32[k]).dtype != _np(bn32[k]).dtype
                 and _np(fw32[k]).dtype.kind == "f")
    if odd and check.dtype == "float32":
        notes.append(f"the framework returned {', '.join(odd)} for float32 inputs.")
    if fw64 is not None:
        low = sorted(k for k in fw64 if k in bn64 and _np(fw64[k]).dtype.kind == "f"
                     and _np(fw64[k]).dtype.itemsize < 8)
        if low:
            notes.append(f"the framework returned {', '.join(low)} as "
                         f"{_np(fw64[low[0]]).dtype} for float64 inputs, so there is no float64 "
                         f"formula check for this row.")
            fw64, diff64 = None, None
    if diff64 is not None and diff64 > TOL64:
        # does the framework compute its "float64" run in float32? (Keras 3 does)
        self32 = compare(fw64, fw32)[1]
        # a real float64 computation lands ~1e-7 (float32 rounding) from the float32 one
        if self32 <= 1e-9:
            notes.append(f"the framework computes float64 inputs in float32 (its float64 result "
                         f"is {_fmt(self32)} from its float32 one and {_fmt(diff64)} from the "
                         f"exact result), so there is no float64 formula check for this row.")
            fw64, diff64 = None, None
    same64 = diff64 is None or diff64 <= TOL64
    nan_ref = sorted(k for k, v in bn64.items() if v is not None
                     and _np(v).dtype.kind == "f" and np.isnan(_np(v)).any())
    if nan_ref:
        # every row runs on finite data: a NaN in the exact result is no
        # reference, and NaNs in the same places in both results are no agreement
        # (rel_diff leaves matching NaNs out; review: all-NaN on both sides was "exact")
        return Row(framework, check.op, check.config, check.dtype, ab, rl, key, tol, fw_err,
                   bn_err, diff64, "DIFFERS",
                   f"UNEXPLAINED: bncore's float64 result, the exact reference, holds NaN in "
                   f"{', '.join(nan_ref)} on finite inputs.")
    # "rounding" means as close as float32 arithmetic leaves, not merely within
    # tol: an eps 1% off its preset moves these rows by ~7e-6, under tol, and a
    # float64 run does not see an eps the framework changes for float32 alone
    # (review: F.batch_norm with eps x1.5 in float32 only was 6.6e-6, "rounding")
    tol_row = min(tol, ROUNDING_FACTOR * float32_limit(check.condition, bn_err))
    if bitwise_equal(fw32, bn32) and same64:
        verdict = "exact"
    elif rl <= tol_row and same64:
        verdict = "rounding"
        if diff64 is None and not notes:
            notes.append("within float32 rounding; the framework has no float64 run here, so "
                         "the formula is confirmed only to float32 precision.")
    else:
        verdict, why = _diagnose(check, tol_row, fw32, bn32, fw64, bn64, rl, key, fw_err,
                                 bn_err, diff64)
        notes.extend(why)
    if check.show_alternatives and check.alternatives and verdict in ("exact", "rounding"):
        notes.append(_alternatives_note(check, fw64 if fw64 is not None else fw32,
                                        "float64" if fw64 is not None else check.dtype, bn64))
    return Row(framework, check.op, check.config, check.dtype, ab, rl, key, tol_row, fw_err,
               bn_err, diff64, verdict, " ".join(n for n in notes if n))


def _alternatives_note(check: Check, fw: Outputs, dtype: str, bn64: Outputs) -> str:
    keys = check.alt_keys
    base = compare(fw, bn64 if dtype == "float64" else check.run(dtype)[1], keys)
    parts = [f"bncore's preset {_fmt(base[1])}"]
    for name, alt in check.alternatives.items():
        r = compare(fw, alt(dtype), keys)
        parts.append(f"bncore with {name} {_fmt(r[1])}")
    what = "/".join(keys) if keys else "the outputs"
    lead = check.note + " " if check.note else ""
    return (f"{lead}Measured on {what} ({dtype} run), the framework's distance to "
            + ", to ".join(parts) + ".")


def _diagnose(check: Check, tol, fw32, bn32, fw64, bn64, rl, key, fw_err, bn_err, diff64):
    why: List[str] = []
    explained = False
    if math.isnan(rl):
        # no diagnostic explains NaNs in one result where the other has numbers
        return "DIFFERS", [f"{key}: NaN in one result where the other has a number."]
    tol_exact = max(tol, 10 * (bn_err or 0.0))
    # 1. cancellation: does the framework's error vanish when the offset is removed?
    if check.centered:
        fw_c, bn_c = check.run(check.dtype, centered=True)
        fw_c64, bn_c64 = check.run("float64", centered=True)
        fw_c_err = compare(fw_c, bn_c64)[1]
        bn_c_err = compare(bn_c, bn_c64)[1]
        cond = f" (|mean|/std up to {check.condition:.0e})" if check.condition else ""
        # "exact" is bncore in float64, so first bncore itself: the centered data
        # are the offset data minus a per-channel constant (exactly), and every
        # output but the running mean is invariant under that shift; a float64
        # computation keeps it to about |mean|/std x 1e-17
        shift_keys = [k for k in bn64 if k != "running_mean"]
        shift = compare(bn64, bn_c64, shift_keys)[1]
        k = check.condition or 1.0
        if not shift <= max(TOL64, k * 1e-15):
            return "DIFFERS", [
                f"UNEXPLAINED: bncore's own float64 result moves by {_fmt(shift)} when the "
                f"per-channel offset is removed{cond}, which changes none of these outputs: "
                f"bncore's error on offset data, the exact reference of this row is wrong "
                f"(framework {_fmt(fw_err)} from it, {_fmt(fw_c_err)} without the offset)."]
        # a cancellation leaves the framework's float64 run within about
        # (|mean|/std)^2 x 2^-52 of the exact result, times the growth of a
        # sequential sum (flax's one-pass variance: 1.5e-11 at |mean|/std = 1e2);
        # an error of a different kind (a wrong formula, or a wrong reference)
        # is far larger
        f64_ok = diff64 is None or diff64 <= max(TOL64, k * k * 1e-13)
        # and a cancellation is gone without the offset: the framework's float64
        # run on the centred data agrees with bncore's. A different formula (an
        # eps 30% off) still differs there, by more than TOL64, though its float32
        # error on those data can sit below the float32 tolerance (4.5e-6 < 1e-5)
        # and its float64 one below k^2 x 1e-13 (1e-5 at k = 1e4). (Not where the
        # framework has no float64 run, diff64 None: Keras on JAX computes
        # float64 inputs in float32.)
        diff64_c = compare(fw_c64, bn_c64)[1]
        f64_c_ok = diff64 is None or diff64_c <= TOL64
        # the centred float32 result must be as close to exact as float32
        # arithmetic leaves on centred data: without a float64 run it is all that
        # tells a cancellation from a formula difference, and with one, a float64
        # run cannot see a difference of the float32 path alone (an eps 1% off its
        # preset is 7e-6 there, under tol; review: eps x1.5 for float32 only was
        # "explained: cancellation" at 7.5e-6 on centred data)
        c_lim = min(tol, float32_limit(None, bn_c_err))
        if fw_err > tol_exact and fw_c_err <= c_lim and f64_ok and f64_c_ok:
            explained = True
            why.append(f"cancellation: on this offset data{cond} the framework is {_fmt(fw_err)} "
                       f"from the exact result (bncore {_fmt(bn_err)}); on the same data with "
                       f"the offset removed it is {_fmt(fw_c_err)} (bncore {_fmt(bn_c_err)}). "
                       f"The error grows with the offset: a cancellation in the framework, "
                       f"not a convention.")
        else:
            why.append(f"offset removed: framework {_fmt(fw_c_err)} from exact (with offset "
                       f"{_fmt(fw_err)}); bncore {_fmt(bn_c_err)}"
                       + ("" if f64_ok else f"; in float64 they still differ by "
                                              f"{_fmt(diff64)}, more than a float32 "
                                              f"cancellation leaves")
                       + ("." if f64_c_ok else f"; in float64 without the offset they differ "
                                                f"by {_fmt(diff64_c)}: not a cancellation."))
    # 1b. re-enactments of the framework's formula
    for name, emu in check.emulations.items():
        out = emu(check.dtype)
        err = compare(out, bn64)[1]
        close = 0.2 <= (err / fw_err if fw_err else 0.0) <= 5.0
        why.append(f"re-enacting {name} in NumPy {check.dtype} gives {_fmt(err)} from the exact "
                   f"result ({'the same size as' if close else 'unlike'} the framework's "
                   f"{_fmt(fw_err)}).")
    # 2. a framework setting that removes the difference
    for name, variant in check.fw_variants.items():
        out = variant(check.dtype)
        err = compare(out, bn64)[1]
        why.append(f"with {name} the framework is {_fmt(err)} from the exact result.")
        if err <= tol and fw_err > tol_exact:
            explained = True
    # 3. a documented framework quirk that bncore can reproduce explains the
    # difference; another bncore convention that the framework follows instead
    # of the preset does not: it says the preset is wrong (or the framework
    # changed its default)
    ref_fw, ref_dtype = (fw64, "float64") if fw64 is not None else (fw32, check.dtype)
    lim = TOL64 if ref_dtype == "float64" else tol
    preset = _fmt(diff64 if ref_dtype == "float64" else rl)
    f32_lim = max(tol, float32_limit(check.condition, bn_err))
    for name, alt in check.quirks.items():
        r = compare(ref_fw, alt(ref_dtype))[1]
        if r <= lim:
            # a float64 match explains the float32 row only where the quirk
            # brings bncore's float32 result to the framework's as well
            r32 = compare(fw32, alt(check.dtype))[1] if ref_dtype == "float64" else r
            if r32 <= f32_lim:
                explained = True
                why.append(f"attributed: the framework matches bncore with {name} to "
                           f"{_fmt(r)} ({ref_dtype}); bncore's preset differs by {preset}.")
            else:
                why.append(f"the framework matches bncore with {name} to {_fmt(r)} in "
                           f"{ref_dtype}, but in {check.dtype} it is {_fmt(r32)} from it, more "
                           f"than float32 arithmetic leaves ({_fmt(f32_lim)}).")
    for name, alt in check.alternatives.items():
        r = compare(ref_fw, alt(ref_dtype))[1]
        if r <= lim:
            return "DIFFERS", [
                f"UNEXPLAINED: the framework matches bncore with {name} to {_fmt(r)} "
                f"({ref_dtype}), not bncore's preset for it ({preset}): the preset is wrong "
                f"for this framework (or its default changed)."] + why
    # 4. precision: same formula in float64? On offset data, only where the
    # framework's float32 error goes with the offset: without it, a gap that is
    # as large is the float32 path's own (review: eps x100 for float32 only was
    # "explained: precision" at |mean|/std 1e4, 1.5e-3 with or without the offset)
    centred_gap = None
    if check.centered and fw_c_err > c_lim:
        centred_gap = fw_c_err
    if diff64 is not None and not explained:
        if diff64 <= TOL64 and centred_gap is not None:
            why.append(f"in float64 they agree to {_fmt(diff64)}, but without the offset the "
                       f"framework's {check.dtype} result is still {_fmt(centred_gap)} from "
                       f"the exact one (float32 arithmetic leaves {_fmt(c_lim)} there): a "
                       f"difference of the framework's {check.dtype} path alone (an eps or "
                       f"formula it changes for {check.dtype}).")
        elif diff64 <= TOL64 and fw_err >= bn_err and rl > f32_lim:
            why.append(f"in float64 they agree to {_fmt(diff64)}, but the {check.dtype} gap "
                       f"({_fmt(rl)} in {key}) is more than float32 arithmetic leaves here "
                       f"({_fmt(f32_lim)}): a difference of the framework's {check.dtype} "
                       f"path alone (an eps or formula it changes for {check.dtype}).")
        elif diff64 <= TOL64 and fw_err >= bn_err:
            explained = True
            why.append(f"precision: in float64 the framework and bncore agree to {_fmt(diff64)}, "
                       f"so the formula is the same; the float32 gap ({_fmt(rl)} in {key}) is "
                       f"the framework's float32 arithmetic: it is {_fmt(fw_err)} from the "
                       f"exact result, bncore {_fmt(bn_err)}.")
        elif diff64 <= TOL64:
            # the same formula, but bncore's float32 result is the worse one:
            # that is bncore's error to fix, never the framework's to explain
            why.append(f"in float64 they agree to {_fmt(diff64)}, but in {check.dtype} bncore "
                       f"is the farther from the exact result ({_fmt(bn_err)} against the "
                       f"framework's {_fmt(fw_err)}): bncore's error.")
        else:
            why.append(f"in float64 they still differ by {_fmt(diff64)}.")
    if not explained:
        if rl <= tol and diff64 is not None and diff64 > TOL64:
            why.insert(0, f"UNEXPLAINED: the {check.dtype} results agree "
                          f"({'bitwise' if rl == 0 else 'to ' + _fmt(rl)}), but the float64 "
                          f"runs differ by {_fmt(diff64)}: a different formula, which "
                          f"{check.dtype} rounding hides on these data.")
        else:
            why.insert(0, f"UNEXPLAINED: {key} differs by {_fmt(rl)} (tolerance {_fmt(tol)}); "
                          f"framework {_fmt(fw_err)} from exact, bncore {_fmt(bn_err)}.")
    return ("explained" if explained else "DIFFERS"), why


# --------------------------------------------------------------------------
# the report

@dataclass
class Report:
    framework: str
    rows: List[Row] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)    # whole framework or single parts
    versions: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.verdict != "DIFFERS" for r in self.rows)

    def add(self, check: Check) -> Row:
        try:
            row = evaluate(self.framework, check)
        except Exception as exc:  # noqa: BLE001 - a row that raised is reported, not fatal
            row = Row(self.framework, check.op, check.config, check.dtype, None, None, "-",
                      check.tol or TOL[check.dtype], None, None, None, "DIFFERS",
                      f"raised {type(exc).__name__}: {exc}")
        self.rows.append(row)
        return row

    def skip(self, what: str) -> None:
        self.skipped.append(what)

    def table(self) -> str:
        ow = max([len("op")] + [len(r.op) for r in self.rows])
        cw = max([len("configuration")] + [len(r.config) for r in self.rows])
        head = (f"{'#':>3} {'op':<{ow}} {'configuration':<{cw}} {'max abs':>8} {'max rel':>8} "
                f"{'f64 rel':>8} {'fw err':>8} {'bn err':>8}  verdict")
        lines = [head, "-" * len(head)]
        for i, r in enumerate(self.rows, 1):
            mark = " *" if r.note else ""
            lines.append(f"{i:>3} {r.op:<{ow}} {r.config:<{cw}} {_fmt(r.max_abs):>8} "
                         f"{_fmt(r.max_rel):>8} {_fmt(r.diff64):>8} {_fmt(r.fw_err):>8} "
                         f"{_fmt(r.bn_err):>8}  {r.verdict}{mark}")
        return "\n".join(lines)

    def notes(self, width: int = 100) -> str:
        import textwrap

        return "\n".join(textwrap.fill(f"[{i}] {r.op}, {r.config}: {r.note}", width,
                                        subsequent_indent="     ")
                         for i, r in enumerate(self.rows, 1) if r.note)

    def as_dict(self) -> dict:
        return {"framework": self.framework, "ok": self.ok, "seconds": self.seconds,
                "versions": self.versions, "skipped": self.skipped,
                "rows": [r.as_dict() for r in self.rows]}

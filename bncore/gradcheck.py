"""Finite-difference gradient checking, for bncore's ops and for yours.

``gradcheck(f, inputs, vjp)`` compares an analytic vector-Jacobian product
with central differences of ``f`` in float64:

* ``mode="random"``: for random cotangents u and random directions v, each
  moving one input (in turn),
  ``<vjp(u), v>`` against ``(<u, f(x + h v)> - <u, f(x - h v)>) / 2h``
  (cheap: four evaluations of f per direction, at steps h and 2h: their
  difference bounds the truncation error);
* ``mode="full"``: the whole Jacobian, one column per input element by
  central differences and one row per output element through ``vjp``
  (exact comparison entry by entry; for small inputs), and ``vjp`` of random
  cotangents against the rows it gave for unit ones (a vjp must be linear in
  its cotangent: one that clips or squares it agrees on 0 and 1).

Every difference is divided by the step actually taken (``(x + s) - (x - s)``
as rounded, not ``2 s``), and the tolerance of each comparison adds the
rounding noise of the difference, ``f_accuracy * (|f(x + s)| + |f(x - s)|) / 2s``
entry by entry (random mode: four standard deviations of its inner product
with the random cotangent, 4 f_accuracy (||f(x + s)|| + ||f(x - s)||) / 2s;
f_accuracy: f's relative accuracy, a few float64 roundings by default),
to ``atol + rtol * scale``: a function whose values carry a large constant
cannot be differentiated more accurately than that, whatever the gradient.

The report names the worst entry (which input, which element, analytic and
numeric values) so a wrong gradient can be found, not just detected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from bncore import _checks as chk

__all__ = ["gradcheck", "GradcheckReport", "GradcheckSetupError"]


class GradcheckSetupError(ValueError):
    """The check as asked cannot run (a full Jacobian too large, settings that
    do not match the inputs, nothing to compare): not a verdict on the
    gradient. (`bncore gradcheck` exits 2 on it, 1 on a failed check.)"""


#: rounding noise of f's values in a finite difference, per unit of |f| (a few
#: float64 roundings in f: 8 u)
NOISE = 8 * float(np.finfo(np.float64).eps)
#: finite differences at steps h and 2h that disagree by more than this
#: fraction of the largest value compared for their input (plus atol) cannot
#: check anything: the check fails (unresolved) rather than pass on a
#: tolerance that large
RESOLUTION = 1e-3


@dataclass
class GradcheckReport:
    """Outcome of :func:`gradcheck`. ``ok`` is the verdict."""

    ok: bool
    mode: str
    max_abs_error: float
    max_rel_error: float
    worst_input: Optional[int]      # which input (random mode: the one the direction moved)
    worst_index: Optional[tuple]    # full mode: (flat output index,) + input element
    analytic: float
    numeric: float
    rtol: float
    atol: float
    checks: int
    details: List[str] = field(default_factory=list)
    #: the worst |analytic - numeric| / tolerance
    ratio: float = 0.0
    #: comparisons whose finite differences could not resolve the gradient
    #: (steps h and 2h disagreeing by more than RESOLUTION of the largest value
    #: compared for that input, plus atol): the verdict is ratio <= 1 and none
    #: unresolved
    unresolved: int = 0

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        if self.worst_input is None:
            where = ""
        elif self.mode == "full" and self.worst_index[0] is None:
            where = (f" at vjp(random cotangent) / d input {self.worst_input}"
                     f"{list(self.worst_index[1:])} (against the unit cotangents' rows)")
        elif self.mode == "full":
            out_flat, elem = self.worst_index[0], tuple(self.worst_index[1:])
            where = (f" at d output[{out_flat}] (flat index) / d input {self.worst_input}"
                     f"{list(elem)}")
        else:
            where = f" along a random direction in input {self.worst_input}"
        text = (f"gradcheck {verdict} ({self.mode}, {self.checks} checks): worst abs error "
                f"{self.max_abs_error:.3e}, rel {self.max_rel_error:.3e}{where}: analytic "
                f"{self.analytic:.10g} vs numeric {self.numeric:.10g} "
                f"(rtol={self.rtol:g}, atol={self.atol:g}; error / tolerance {self.ratio:.3g})")
        if self.unresolved:
            text += (f"; {self.unresolved} comparisons unresolved: the finite differences at "
                     f"steps h and 2h disagree by more than {RESOLUTION:g} of the largest value "
                     f"compared for their input (rounding of f, truncation), so they cannot "
                     f"check the gradient; choose another h (or scales: the size over which f "
                     f"varies; or an atol, where the gradient is 0)")
        return text

    __str__ = summary


def _as_list(v) -> List[np.ndarray]:
    if isinstance(v, (tuple, list)):
        return [np.asarray(a, dtype=np.float64) for a in v]
    return [np.asarray(v, dtype=np.float64)]


def check_settings(mode: str, rtol: float, atol: float, h: float, n_directions: int,
                   names: Sequence[str] = ("rtol", "atol", "h", "n_directions")):
    """(rtol, atol, h, n_directions) validated, or ValueError/TypeError naming the
    setting (`names`: how the caller spells them, e.g. the command line's
    options): settings under which a check would pass whatever the gradient
    are refused (a negative tolerance makes every ratio negative; no
    directions make no checks)."""
    if mode not in ("random", "full"):
        raise ValueError(f"mode must be 'random' or 'full', got {mode!r}")
    rtol = chk.non_negative(names[0], rtol)
    atol = chk.non_negative(names[1], atol)
    if rtol == 0.0 and atol == 0.0:
        raise ValueError(f"{names[0]} and {names[1]} are both 0: no finite difference can pass")
    h = chk.positive(names[2], h)
    if mode == "random":
        n_directions = chk.count(names[3], n_directions, 1)
    return rtol, atol, h, n_directions


def _check_wrt(wrt, n_inputs: int) -> List[int]:
    """The indices of the inputs to differentiate: all by default; else
    distinct, in range, and at least one (with none, every check would pass)."""
    if wrt is None:
        return list(range(n_inputs))
    out = []
    for k in list(wrt):
        i = chk.count("wrt", k)
        if i >= n_inputs:
            raise ValueError(f"wrt names input {i}, but there are {n_inputs} inputs")
        if i in out:
            raise ValueError(f"wrt names input {i} twice")
        out.append(i)
    if not out:
        raise ValueError("wrt is empty: nothing to differentiate, every check would pass")
    return out


def gradcheck(f: Callable[..., np.ndarray], inputs: Sequence[np.ndarray],
              vjp: Callable[..., Sequence[np.ndarray]], *, mode: str = "random",
              n_directions: int = 6, h: float = 1e-6, rtol: float = 1e-6,
              atol: float = 0.0, seed: int = 0, wrt: Optional[Sequence[int]] = None,
              scales: Optional[Sequence[float]] = None,
              f_accuracy: Union[float, Sequence[float]] = NOISE,
              max_full_size: int = 4096) -> GradcheckReport:
    """Check ``vjp`` against central differences of ``f``.

    Parameters
    ----------
    f : ``f(*inputs) -> array`` (or a tuple of arrays, concatenated).
    inputs : the point to check at; converted to float64 copies.
    vjp : ``vjp(cotangent, *inputs) -> sequence of arrays``, one per input in
        ``wrt`` (same shapes): the analytic gradient of ``<cotangent, f(inputs)>``.
    mode : "random" (random directions) or "full" (the whole Jacobian).
    h : finite-difference step, relative to each input element's scale.
    scales : the scale of each input in ``wrt`` (default: each element's own,
        max(1, |x_k|)): directions and steps are drawn with this size, so pass
        the size over which the function varies (e.g. the standard deviation
        of data with a large offset).
    rtol, atol : a comparison passes when ``|analytic - numeric| <= atol +
        rtol * scale + noise``, scale being the largest |value| of the compared
        quantity (full mode: of the Jacobian column; random mode: the 2-norm of
        the terms of <vjp(u), v>, or either side if larger) and noise the
        finite difference's own error: its rounding (f_accuracy * |f| / step)
        and its truncation (the difference between the steps h and 2h).
        atol is absolute: the default 0 leaves tiny gradients to rtol.
    f_accuracy : the relative error of f's values when an input moves (default
        NOISE, a few float64 roundings), one number or one per input in
        ``wrt``: the rounding noise of a difference is f_accuracy * |f| / step.
        A function that cancels is less accurate where the cancelling input
        moves (batch norm of data whose offset is K times its spread, when x
        moves; not when its weight does).
    wrt : indices of the inputs to differentiate (default: all).

    Returns a :class:`GradcheckReport`; it is falsy when the check failed.
    """
    rtol, atol, h, n_directions = check_settings(mode, rtol, atol, h, n_directions)
    xs = [np.array(a, dtype=np.float64) for a in inputs]
    wrt = _check_wrt(wrt, len(xs))
    if np.ndim(f_accuracy) == 0:
        accuracy = [chk.non_negative("f_accuracy", f_accuracy)] * len(wrt)
    else:
        accuracy = list(f_accuracy)
        if len(accuracy) != len(wrt):
            raise GradcheckSetupError(f"f_accuracy has {len(accuracy)} entries for {len(wrt)} inputs")
        accuracy = [chk.non_negative(f"f_accuracy[{k}]", v) for k, v in enumerate(accuracy)]
    rng = np.random.default_rng(seed)
    # per-input scale (an array: per element), so the step is relative to the
    # size of the values
    if scales is None:
        scales = [np.maximum(1.0, np.abs(xs[i])) for i in wrt]
    else:
        scales = list(scales)
        if len(scales) != len(wrt):
            raise GradcheckSetupError(f"scales has {len(scales)} entries for {len(wrt)} inputs")
        # a zero scale makes zero directions and steps: every check would
        # compare 0 with 0 and pass whatever the gradient
        scales = [chk.positive(f"scales[{k}]", v) for k, v in enumerate(scales)]

    def evaluate(args) -> np.ndarray:
        out = f(*args)
        return np.concatenate([o.reshape(-1) for o in _as_list(out)])

    structure = []     # (f returns a sequence, its outputs' shapes): one call of f, once

    def analytic(u_flat: np.ndarray) -> List[np.ndarray]:
        if not structure:
            out0 = f(*xs)
            structure.append((isinstance(out0, (tuple, list)),
                              [np.shape(o) for o in _as_list(out0)]))
        sequence, shapes = structure[0]
        parts, k = [], 0
        for shape in shapes:
            size = int(np.prod(shape, dtype=np.int64))
            parts.append(u_flat[k:k + size].reshape(shape))
            k += size
        cot = tuple(parts) if sequence else parts[0]
        grads = _as_list(vjp(cot, *xs))
        if len(grads) != len(wrt):
            raise ValueError(f"vjp returned {len(grads)} gradients for {len(wrt)} inputs")
        for g, i in zip(grads, wrt):
            if g.shape != xs[i].shape:
                raise ValueError(f"vjp's gradient {i} has shape {g.shape}, expected {xs[i].shape}")
        return grads

    def exact_steps(x: np.ndarray, s: np.ndarray) -> np.ndarray:
        """s rounded to a multiple of twice the spacing of the floats around
        x +- 2s: then x +- s and x +- 2s are exact, the displacements taken
        are exactly 2s and 4s, and the two differences of a direction lie
        along exactly the same vector (a rounding of x +- s passed for
        truncation error otherwise)."""
        q = 2.0 * np.spacing(np.abs(x) + 2.0 * np.abs(s))
        return np.round(s / q) * q

    def norm2(v) -> float:
        """The 2-norm, scaled first (no overflow of the squares)."""
        v = np.abs(np.asarray(v, dtype=np.float64)).reshape(-1)
        m = float(v.max(initial=0.0))
        if m == 0.0 or not np.isfinite(m):
            return m
        return m * float(np.sqrt(np.sum((v / m) ** 2)))

    y0 = evaluate(xs)
    # nothing to compare would make a report that passes whatever the gradient
    if y0.size == 0:
        raise GradcheckSetupError("f returned no values: nothing to check, every check would pass")
    empty = [i for i in wrt if xs[i].size == 0]
    if len(empty) == len(wrt):
        raise GradcheckSetupError(f"the inputs to differentiate ({', '.join(map(str, wrt))}) "
                                  f"are empty: nothing to check, every check would pass")
    worst = dict(ratio=-1.0, input=None, index=None, a=0.0, n=0.0)
    stats = dict(abs=0.0, rel=0.0, checks=0)
    # per input: the largest value compared, and the finite differences' own
    # error estimates (resolution is judged input by input: a gradient small
    # beside another input's is not resolved by the other's size)
    largest = {i: 0.0 for i in wrt}
    fd_errors = {i: [] for i in wrt}

    def record(a_val, n_val, scale, fd_err, input_idx, index, spread=None):
        """One comparison; fd_err, the finite difference's estimated error, joins
        the tolerance; spread, its measured part (the distance between the
        steps h and 2h; fd_err when not given), decides resolution."""
        err = abs(a_val - n_val)
        tol = atol + rtol * scale + fd_err
        for v in (scale, abs(n_val)):       # (an analytic NaN leaves the numeric side)
            if np.isfinite(v):
                largest[input_idx] = max(largest[input_idx], v)
        fd_errors[input_idx].append(fd_err if spread is None else spread)
        if not (np.isfinite(a_val) and np.isfinite(n_val)):
            ratio = float("inf")
            err = float("nan") if (a_val != a_val or n_val != n_val) else float("inf")
        elif not np.isfinite(tol):
            # an overflowing scale or noise must not make a tolerance that
            # passes anything (a wrong entry of 1e200 overflowed its own norm)
            ratio = float("inf")
        else:
            # atol = 0 and both values 0 (a constant function): no error, no tolerance
            ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
        stats["checks"] += 1
        if err != err:                 # NaN: max() would keep the old value
            stats["abs"] = stats["rel"] = float("nan")
        elif stats["abs"] == stats["abs"]:
            stats["abs"] = max(stats["abs"], err)
            if scale > 0:
                r = err / scale
                # an infinite error over an infinite scale is no small relative error
                stats["rel"] = max(stats["rel"], r if r == r else float("inf"))
            elif err > 0:
                stats["rel"] = float("inf")
        if ratio > worst["ratio"]:
            worst.update(ratio=ratio, input=input_idx, index=index, a=a_val, n=n_val)

    def finite_max(v) -> float:
        v = np.abs(np.asarray(v, dtype=np.float64))
        v = v[np.isfinite(v)]
        return float(v.max()) if v.size else 0.0

    def at_steps(i: int, where, step):
        """f with input i's flat elements `where` (a slice or an index) moved by
        +-step and +-2 step (exact: exact_steps), every other value as it is:
        [(m, f(x + m step), f(x - m step)) for m in 1, 2]."""
        out = []
        for mult in (1.0, 2.0):
            plus = [x.copy() for x in xs]
            minus = [x.copy() for x in xs]
            plus[i].reshape(-1)[where] += mult * step
            minus[i].reshape(-1)[where] -= mult * step
            out.append((mult, evaluate(plus), evaluate(minus)))
        return out

    def element(i: int, flat: int) -> tuple:
        return tuple(int(k) for k in np.unravel_index(flat, xs[i].shape))

    if mode == "random":
        # each direction moves one input (in turn): a gradient small beside
        # another's (a weight's beside the data's) is judged against its own
        # size and its own differences, not lost in the larger one's noise
        moved = [j for j, i in enumerate(wrt) if xs[i].size]
        for k in range(max(n_directions, len(moved))):
            slot = moved[k % len(moved)]
            i = wrt[slot]
            u = rng.standard_normal(y0.size)
            grads = analytic(u)
            step = exact_steps(xs[i], h * rng.standard_normal(xs[i].shape) * scales[slot])
            if not np.any(step):
                # every element too large for its step: nothing moved, nothing
                # checked (unresolved, not a pass of 0 against 0)
                record(0.0, 0.0, 0.0, float("inf"), i, None)
                continue
            # directional derivative of <u, f> along the displacement 2 step,
            # and along twice it: 2h * d, 4h * d for d = step / h
            results = []
            for mult, fp, fm in at_steps(i, slice(None), step.reshape(-1)):
                numeric = float(u @ (fp - fm)) / (2.0 * mult * h)
                # <u, e> for f's rounding errors e (each within accuracy |f|)
                # has, over the random u, a standard deviation of |e|_2: four
                # of it, over the outputs that moved (as full mode does per
                # entry): one that did not adds exactly 0 to <u, fp - fm>, and
                # counting a large unmoved output (another input's) let its
                # size pass a wrong gradient
                moved_out = fp != fm
                noise = 4.0 * accuracy[slot] * (norm2(fp[moved_out]) + norm2(fm[moved_out])) / (
                    2.0 * mult * h)
                results.append((numeric, noise))
            (numeric, noise), (numeric2, noise2) = results
            terms = grads[slot] * step / h
            a_val = float(np.sum(terms))
            # the step-h difference's truncation error is a third of its
            # distance from the step-2h one (central differences err as h^2);
            # the whole distance is taken (it also carries the noise)
            trunc = abs(numeric - numeric2)
            trunc = trunc if np.isfinite(trunc) else float("inf")
            scale = max(norm2(terms), finite_max([numeric, a_val]))
            record(a_val, numeric, scale, noise + noise2 + trunc, i, None, spread=trunc)
    else:
        total = sum(xs[i].size for i in wrt)
        if total > max_full_size or y0.size > max_full_size:
            raise GradcheckSetupError(f"full Jacobian of {y0.size} x {total} entries exceeds "
                                      f"max_full_size={max_full_size}; use mode='random'")
        rows = [analytic(e) for e in np.eye(y0.size)]
        # the analytic Jacobian of each input, (outputs, input elements)
        jac = [np.stack([row[slot].reshape(-1) for row in rows]) for slot in range(len(wrt))]
        for slot, (i, sc) in enumerate(zip(wrt, scales)):
            steps = exact_steps(xs[i], np.broadcast_to(h * np.asarray(sc, dtype=np.float64),
                                                       xs[i].shape))
            for flat in range(xs[i].size):
                s = float(steps.reshape(-1)[flat])
                if s == 0.0:
                    # an element too large for its step: unresolved, not skipped
                    record(0.0, 0.0, 0.0, float("inf"), i, (0,) + element(i, flat))
                    continue
                cols = []
                for mult, fp, fm in at_steps(i, flat, s):       # as in random mode
                    noise = accuracy[slot] * (np.abs(fp) + np.abs(fm)) / (2.0 * mult * s)
                    cols.append(((fp - fm) / (2.0 * mult * s), np.where(fp == fm, 0.0, noise)))
                (col, noise), (col2, noise2) = cols
                with np.errstate(invalid="ignore"):
                    trunc = np.abs(col - col2)
                trunc = np.where(np.isfinite(trunc), trunc, np.inf)
                fd_err = noise + noise2 + trunc
                ana = jac[slot][:, flat]
                scale = max(finite_max(col), finite_max(ana))
                for r in range(y0.size):
                    index = (r,) + element(i, flat)
                    record(float(ana[r]), float(col[r]), scale, float(fd_err[r]), i, index,
                           spread=float(trunc[r]))
        # vjp is linear in its cotangent: vjp(u) against the unit cotangents'
        # rows (themselves checked above against the differences)
        for _ in range(2):
            u = rng.standard_normal(y0.size)
            grads = analytic(u)
            for slot, i in enumerate(wrt):
                want = u @ jac[slot]
                scale = float(np.max(np.abs(u) @ np.abs(jac[slot]), initial=0.0))
                got = grads[slot].reshape(-1)
                for flat in range(xs[i].size):
                    index = (None,) + element(i, flat)
                    record(float(got[flat]), float(want[flat]), scale,
                           NOISE * scale, i, index)
    # a comparison whose finite differences at h and 2h differ by more than
    # RESOLUTION of its input's largest value (plus atol: the way to check
    # gradients that are 0) cannot check anything (noise or truncation that
    # large); an infinite one never can. The modelled noise only widens the
    # tolerance: an upper bound, it would call resolved differences unresolved
    unresolved = sum(not (e <= RESOLUTION * largest[i] + atol)
                     for i in wrt for e in fd_errors[i])
    return GradcheckReport(
        ok=bool(worst["ratio"] <= 1.0 and not unresolved), mode=mode,
        max_abs_error=stats["abs"],
        max_rel_error=stats["rel"], worst_input=worst["input"], worst_index=worst["index"],
        analytic=worst["a"], numeric=worst["n"], rtol=rtol, atol=atol, checks=stats["checks"],
        ratio=float(worst["ratio"]), unresolved=int(unresolved))

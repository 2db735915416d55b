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
#: float64 roundings in f, with room: 32 u)
NOISE = 32 * float(np.finfo(np.float64).eps)
#: a finite difference whose own error estimate is above this fraction of the
#: largest value a check compares cannot check anything: the check fails
#: (unresolved) rather than pass on a tolerance that large
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
    #: comparisons whose finite difference could not resolve the gradient (its
    #: own error estimate above RESOLUTION of the check's largest value): the
    #: verdict is ratio <= 1 and none unresolved
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
            text += (f"; {self.unresolved} comparisons unresolved: the finite differences' own "
                     f"error (rounding of f, truncation) exceeds {RESOLUTION:g} of the largest "
                     f"value compared, so they cannot check the gradient; choose another h (or "
                     f"scales: the size over which f varies)")
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

    def analytic(u_flat: np.ndarray) -> List[np.ndarray]:
        out0 = f(*xs)
        outs = _as_list(out0)
        parts, k = [], 0
        for o in outs:
            parts.append(u_flat[k:k + o.size].reshape(o.shape))
            k += o.size
        cot = parts[0] if not isinstance(out0, (tuple, list)) else tuple(parts)
        grads = _as_list(vjp(cot, *xs))
        if len(grads) != len(wrt):
            raise ValueError(f"vjp returned {len(grads)} gradients for {len(wrt)} inputs")
        for g, i in zip(grads, wrt):
            if g.shape != xs[i].shape:
                raise ValueError(f"vjp's gradient {i} has shape {g.shape}, expected {xs[i].shape}")
        return grads

    def displaced(steps):
        """Copies of the inputs moved by +steps and -steps, and the
        displacements actually taken ((x + s) - (x - s), as rounded)."""
        plus = [x.copy() for x in xs]
        minus = [x.copy() for x in xs]
        for st, i in zip(steps, wrt):
            plus[i] += st
            minus[i] -= st
        return plus, minus, [plus[i] - minus[i] for i in wrt]

    y0 = evaluate(xs)
    # nothing to compare would make a report that passes whatever the gradient
    if y0.size == 0:
        raise GradcheckSetupError("f returned no values: nothing to check, every check would pass")
    empty = [i for i in wrt if xs[i].size == 0]
    if len(empty) == len(wrt):
        raise GradcheckSetupError(f"the inputs to differentiate ({', '.join(map(str, wrt))}) are "
                         f"empty: nothing to check, every check would pass")
    worst = dict(ratio=-1.0, input=None, index=None, a=0.0, n=0.0)
    stats = dict(abs=0.0, rel=0.0, checks=0, scale=0.0)
    fd_errors: List[float] = []

    def record(a_val, n_val, scale, noise, input_idx, index):
        err = abs(a_val - n_val)
        tol = atol + rtol * scale + noise
        for v in (scale, abs(n_val)):       # (an analytic NaN leaves the numeric side)
            if np.isfinite(v):
                stats["scale"] = max(stats["scale"], v)
        fd_errors.append(noise)
        if not (np.isfinite(a_val) and np.isfinite(n_val)):
            ratio = float("inf")
            err = float("nan") if (a_val != a_val or n_val != n_val) else float("inf")
        else:
            # atol = 0 and both values 0 (a constant function): no error, no tolerance
            ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
        stats["checks"] += 1
        if err != err:                 # NaN: max() would keep the old value
            stats["abs"] = stats["rel"] = float("nan")
        elif stats["abs"] == stats["abs"]:
            stats["abs"] = max(stats["abs"], err)
            if scale > 0:
                stats["rel"] = max(stats["rel"], err / scale)
            elif err > 0:
                stats["rel"] = float("inf")
        if ratio > worst["ratio"]:
            worst.update(ratio=ratio, input=input_idx, index=index, a=a_val, n=n_val)

    def finite_max(v) -> float:
        v = np.abs(np.asarray(v, dtype=np.float64))
        v = v[np.isfinite(v)]
        return float(v.max()) if v.size else 0.0

    if mode == "random":
        # each direction moves one input (in turn): a gradient small beside
        # another's (a weight's beside the data's) is judged against its own
        # size and its own differences, not lost in the larger one's noise
        moved = [j for j, i in enumerate(wrt) if xs[i].size]
        for k in range(max(n_directions, len(moved))):
            slot = moved[k % len(moved)]
            u = rng.standard_normal(y0.size)
            grads = analytic(u)
            ds = [rng.standard_normal(xs[i].shape) * sc if j == slot else np.zeros(xs[i].shape)
                  for j, (i, sc) in enumerate(zip(wrt, scales))]
            # directional derivative of <u, f> along d, at steps h and 2h: each
            # side over the displacement actually taken
            results = []
            for step in (h, 2.0 * h):
                plus, minus, taken = displaced([step * d for d in ds])
                fp, fm = evaluate(plus), evaluate(minus)
                numeric = float(u @ fp - u @ fm) / (2.0 * step)
                terms = [g * t for g, t in zip(grads, taken)]
                a_val = float(sum(np.sum(t) for t in terms)) / (2.0 * step)
                norm = float(np.sqrt(sum(np.sum(t * t) for t in terms))) / (2.0 * step)
                # <u, e> for f's rounding errors e (each within accuracy |f|)
                # has, over the random u, a standard deviation of |e|_2: four of it
                noise = (4.0 * accuracy[slot] * float(np.linalg.norm(fp) + np.linalg.norm(fm))
                         / (2.0 * step))
                results.append((numeric, a_val, norm, noise))
            (numeric, a_val, norm, noise), (numeric2, _, _, noise2) = results
            # the truncation error of the step-h difference is a third of its
            # distance from the step-2h one (central differences err as h^2)
            trunc = abs(numeric - numeric2) if np.isfinite(numeric - numeric2) else 0.0
            scale = max(norm, abs(numeric), abs(a_val)) if np.isfinite(a_val) else norm
            record(a_val, numeric, scale, noise + noise2 + trunc, wrt[slot], None)
    else:
        total = sum(xs[i].size for i in wrt)
        if total > max_full_size or y0.size > max_full_size:
            raise GradcheckSetupError(f"full Jacobian of {y0.size} x {total} entries exceeds "
                             f"max_full_size={max_full_size}; use mode='random'")
        rows = [analytic(e) for e in np.eye(y0.size)]
        for slot, (i, sc) in enumerate(zip(wrt, scales)):
            steps = np.broadcast_to(h * np.asarray(sc, dtype=np.float64), xs[i].shape)
            for flat in range(xs[i].size):
                cols = []
                for mult in (1.0, 2.0):     # steps s and 2s, as in random mode
                    plus = [x.copy() for x in xs]
                    minus = [x.copy() for x in xs]
                    s = mult * float(steps.reshape(-1)[flat])
                    plus[i].reshape(-1)[flat] += s
                    minus[i].reshape(-1)[flat] -= s
                    taken = float(plus[i].reshape(-1)[flat] - minus[i].reshape(-1)[flat])
                    fp, fm = evaluate(plus), evaluate(minus)
                    cols.append(((fp - fm) / taken,
                                 accuracy[slot] * (np.abs(fp) + np.abs(fm)) / taken))
                (col, noise), (col2, noise2) = cols
                with np.errstate(invalid="ignore"):
                    trunc = np.abs(col - col2)
                fd_err = noise + noise2 + np.where(np.isfinite(trunc), trunc, 0.0)
                ana = np.array([rows[r][slot].reshape(-1)[flat] for r in range(y0.size)])
                scale = max(finite_max(col), finite_max(ana))
                for r in range(y0.size):
                    index = (r,) + tuple(int(k) for k in np.unravel_index(flat, xs[i].shape))
                    record(float(ana[r]), float(col[r]), scale, float(fd_err[r]), i, index)
        # vjp is linear in its cotangent: vjp(u) against the unit cotangents'
        # rows (themselves checked above against the differences)
        for _ in range(2):
            u = rng.standard_normal(y0.size)
            grads = analytic(u)
            for slot, i in enumerate(wrt):
                J = np.stack([rows[r][slot].reshape(-1) for r in range(y0.size)])
                want = u @ J
                scale = float(np.max(np.abs(u) @ np.abs(J), initial=0.0))
                got = grads[slot].reshape(-1)
                for flat in range(xs[i].size):
                    index = (None,) + tuple(int(k) for k in np.unravel_index(flat, xs[i].shape))
                    record(float(got[flat]), float(want[flat]), scale,
                           NOISE * scale, i, index)
    unresolved = sum(e > RESOLUTION * stats["scale"] for e in fd_errors if np.isfinite(e))
    return GradcheckReport(
        ok=bool(worst["ratio"] <= 1.0 and not unresolved), mode=mode,
        max_abs_error=stats["abs"],
        max_rel_error=stats["rel"], worst_input=worst["input"], worst_index=worst["index"],
        analytic=worst["a"], numeric=worst["n"], rtol=rtol, atol=atol, checks=stats["checks"],
        ratio=float(worst["ratio"]), unresolved=int(unresolved))

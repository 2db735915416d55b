"""Finite-difference gradient checking, for bncore's ops and for yours.

``gradcheck(f, inputs, vjp)`` compares an analytic vector-Jacobian product
with central differences of ``f`` in float64:

* ``mode="random"``: for random cotangents u and random directions v,
  ``<vjp(u), v>`` against ``(<u, f(x + h v)> - <u, f(x - h v)>) / 2h``
  (cheap: two evaluations of f per direction);
* ``mode="full"``: the whole Jacobian, one column per input element by
  central differences and one row per output element through ``vjp``
  (exact comparison entry by entry; for small inputs).

The report names the worst entry (which input, which element, analytic and
numeric values) so a wrong gradient can be found, not just detected.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import numpy as np

from bncore import _checks as chk

__all__ = ["gradcheck", "GradcheckReport"]


@dataclass
class GradcheckReport:
    """Outcome of :func:`gradcheck`. ``ok`` is the verdict."""

    ok: bool
    mode: str
    max_abs_error: float
    max_rel_error: float
    worst_input: Optional[int]      # full mode: which input (None in random mode)
    worst_index: Optional[tuple]    # full mode: (flat output index,) + input element
    analytic: float
    numeric: float
    rtol: float
    atol: float
    checks: int
    details: List[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        if self.worst_input is None:
            where = ""
        elif self.mode == "full":
            out_flat, elem = self.worst_index[0], tuple(self.worst_index[1:])
            where = (f" at d output[{out_flat}] (flat index) / d input {self.worst_input}"
                     f"{list(elem)}")
        else:
            where = f" at input {self.worst_input}, element {self.worst_index}"
        return (f"gradcheck {verdict} ({self.mode}, {self.checks} checks): worst abs error "
                f"{self.max_abs_error:.3e}, rel {self.max_rel_error:.3e}{where}: analytic "
                f"{self.analytic:.10g} vs numeric {self.numeric:.10g} "
                f"(rtol={self.rtol:g}, atol={self.atol:g})")

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
              atol: float = 1e-8, seed: int = 0, wrt: Optional[Sequence[int]] = None,
              scales: Optional[Sequence[float]] = None,
              max_full_size: int = 4096) -> GradcheckReport:
    """Check ``vjp`` against central differences of ``f``.

    Parameters
    ----------
    f : ``f(*inputs) -> array`` (or a tuple of arrays, concatenated).
    inputs : the point to check at; converted to float64 copies.
    vjp : ``vjp(cotangent, *inputs) -> sequence of arrays``, one per input in
        ``wrt`` (same shapes): the analytic gradient of ``<cotangent, f(inputs)>``.
    mode : "random" (random directions) or "full" (the whole Jacobian).
    h : finite-difference step, relative to each input's scale.
    scales : the scale of each input in ``wrt`` (default max(1, max |x|)):
        directions are drawn with this size, so pass the size over which the
        function varies (e.g. the standard deviation of data with a large offset).
    rtol, atol : an entry passes when ``|analytic - numeric| <= atol + rtol * scale``,
        scale being the largest |value| of the compared quantity.
    wrt : indices of the inputs to differentiate (default: all).

    Returns a :class:`GradcheckReport`; it is falsy when the check failed.
    """
    rtol, atol, h, n_directions = check_settings(mode, rtol, atol, h, n_directions)
    xs = [np.array(a, dtype=np.float64) for a in inputs]
    wrt = _check_wrt(wrt, len(xs))
    rng = np.random.default_rng(seed)
    # per-input scale, so the step is relative to the size of the values
    if scales is None:
        scales = [max(1.0, float(np.max(np.abs(xs[i])))) if xs[i].size else 1.0 for i in wrt]
    else:
        scales = list(scales)
        if len(scales) != len(wrt):
            raise ValueError(f"scales has {len(scales)} entries for {len(wrt)} inputs")
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

    y0 = evaluate(xs)
    # nothing to compare would make a report that passes whatever the gradient
    if y0.size == 0:
        raise ValueError("f returned no values: nothing to check, every check would pass")
    empty = [i for i in wrt if xs[i].size == 0]
    if len(empty) == len(wrt):
        raise ValueError(f"the inputs to differentiate ({', '.join(map(str, wrt))}) are "
                         f"empty: nothing to check, every check would pass")
    worst = dict(ratio=-1.0, input=None, index=None, a=0.0, n=0.0)
    stats = dict(abs=0.0, rel=0.0, checks=0)

    def record(a_val, n_val, scale, input_idx, index):
        err = abs(a_val - n_val)
        tol = atol + rtol * scale
        # atol = 0 and both values 0 (a constant function): no error, no tolerance
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else float("inf"))
        if not (np.isfinite(a_val) and np.isfinite(n_val)):
            ratio = float("inf")
        stats["checks"] += 1
        if err != err:                 # NaN: max() would keep the old value
            stats["abs"] = stats["rel"] = float("nan")
        elif stats["abs"] == stats["abs"]:
            stats["abs"] = max(stats["abs"], err)
            if scale > 0:
                stats["rel"] = max(stats["rel"], err / scale)
        if ratio > worst["ratio"]:
            worst.update(ratio=ratio, input=input_idx, index=index, a=a_val, n=n_val)

    if mode == "random":
        for _ in range(n_directions):
            u = rng.standard_normal(y0.size)
            grads = analytic(u)
            ds = [rng.standard_normal(xs[i].shape) * sc for i, sc in zip(wrt, scales)]
            plus = [x.copy() for x in xs]
            minus = [x.copy() for x in xs]
            for d, i in zip(ds, wrt):
                plus[i] += h * d
                minus[i] -= h * d
            # directional derivative of <u, f> along d, both ways
            numeric = (u @ evaluate(plus) - u @ evaluate(minus)) / (2.0 * h)
            a_val = float(sum(np.sum(g * d) for g, d in zip(grads, ds)))
            # the numeric side counts too (as in full mode): an analytic 0
            # against a numeric derivative must not leave rtol nothing to scale
            scale = max(float(sum(np.sum(np.abs(g * d)) for g, d in zip(grads, ds))),
                        abs(float(numeric)))
            record(a_val, float(numeric), scale, None, None)
    else:
        total = sum(xs[i].size for i in wrt)
        if total > max_full_size or y0.size > max_full_size:
            raise ValueError(f"full Jacobian of {y0.size} x {total} entries exceeds "
                             f"max_full_size={max_full_size}; use mode='random'")
        rows = [analytic(e) for e in np.eye(y0.size)]
        for slot, (i, sc) in enumerate(zip(wrt, scales)):
            s = h * sc
            for flat in range(xs[i].size):
                plus = [x.copy() for x in xs]
                minus = [x.copy() for x in xs]
                plus[i].reshape(-1)[flat] += s
                minus[i].reshape(-1)[flat] -= s
                col = (evaluate(plus) - evaluate(minus)) / (2 * s)
                ana = np.array([rows[r][slot].reshape(-1)[flat] for r in range(y0.size)])
                scale = max(float(np.max(np.abs(col))), float(np.max(np.abs(ana))), 1e-300)
                for r in range(y0.size):
                    index = (r,) + tuple(int(k) for k in np.unravel_index(flat, xs[i].shape))
                    record(float(ana[r]), float(col[r]), scale, i, index)
    return GradcheckReport(
        ok=bool(worst["ratio"] <= 1.0), mode=mode, max_abs_error=stats["abs"],
        max_rel_error=stats["rel"], worst_input=worst["input"], worst_index=worst["index"],
        analytic=worst["a"], numeric=worst["n"], rtol=rtol, atol=atol, checks=stats["checks"])

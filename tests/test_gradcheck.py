"""bncore.gradcheck's verdicts where finite differences are delicate: tiny and
large gradients, large offsets in x and in f, steps that do not survive
rounding, cotangents other than 0 and 1, and many elements. Each case was a
wrong verdict found by review (2026-11-28, tenth session)."""
import numpy as np
import pytest

import bncore
from bncore.testing import registry as R

MODES = ("random", "full")


def _sin_scaled(c):
    return (lambda x: c * np.sin(x)), (lambda u, x: [c * np.cos(x) * u])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", ["sign", "zero", "tenfold"])
def test_a_wrong_gradient_of_a_small_function_fails(mode, bug):
    """An absolute default tolerance (1e-8) passed any gradient of a function
    whose gradient is below it: here 1e-9 * sin(x)."""
    f, vjp = _sin_scaled(1e-9)
    wrong = {"sign": lambda u, x: [-vjp(u, x)[0]],
             "zero": lambda u, x: [0 * x],
             "tenfold": lambda u, x: [10 * vjp(u, x)[0]]}[bug]
    x = [np.random.default_rng(0).standard_normal(5)]
    assert bncore.gradcheck(f, x, vjp, mode=mode)
    assert not bncore.gradcheck(f, x, wrong, mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fn", ["identity", "sin"])
def test_steps_are_the_ones_taken(mode, fn):
    """At x ~ 1e6 a step of 1e-6 is rounded ((x + s) - (x - s) = 2.0000152e-6):
    dividing by the nominal 2s made the identity's derivative 1 - 7.6e-6."""
    f, vjp = {"identity": (lambda x: x - 1e6, lambda u, x: [u]),
              "sin": (np.sin, lambda u, x: [np.cos(x) * u])}[fn]
    x = [1e6 + np.random.default_rng(1).standard_normal(5)]
    assert bncore.gradcheck(f, x, vjp, mode=mode, scales=[1.0])


@pytest.mark.parametrize("nonlinear", ["clip", "abs", "square"])
def test_full_mode_catches_a_vjp_that_is_not_linear_in_its_cotangent(nonlinear):
    """With only unit cotangents (entries 0 and 1), clip(u), |u| and u^2 are u."""
    rng = np.random.default_rng(2)
    A = rng.standard_normal((4, 3))
    g = {"clip": lambda u: np.clip(u, -1, 1), "abs": np.abs, "square": lambda u: u * u}[nonlinear]
    x = [rng.standard_normal(3)]
    assert bncore.gradcheck(lambda x: A @ x, x, lambda u, x: [A.T @ u], mode="full")
    report = bncore.gradcheck(lambda x: A @ x, x, lambda u, x: [A.T @ g(u)], mode="full")
    assert not report and "random cotangent" in report.summary()


def test_random_mode_does_not_weaken_with_size():
    """The tolerance scaled with sum |g d| (~ N), the signal with sqrt(N): a
    gradient 1e-4 too large passed from N = 3e5 on."""
    n = 300_000
    x = [np.random.default_rng(3).standard_normal(n)]
    f = lambda x: np.array([np.sum(np.sin(x))])             # noqa: E731
    right = lambda u, x: [u[0] * np.cos(x)]                   # noqa: E731
    wrong = lambda u, x: [u[0] * np.cos(x) * (1 + 1e-4)]      # noqa: E731
    assert bncore.gradcheck(f, x, right, n_directions=2)
    assert not bncore.gradcheck(f, x, wrong, n_directions=2)


@pytest.mark.parametrize("mode", MODES)
def test_each_element_takes_a_step_of_its_own_size(mode):
    """One element of 1e4 made the step 1e-2 for every element (h * max |x|):
    x^3 at 0.1 then differs from its derivative by more than rtol."""
    x = [np.array([1e4, 0.1, -0.2, 0.3])]
    assert bncore.gradcheck(lambda x: x ** 3, x, lambda u, x: [3 * x * x * u], mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_constant_in_f_is_allowed_for_then_refused_when_it_hides_the_gradient(mode):
    """f = x^2 + c: the difference's rounding is about u c / step. Up to where
    it hides the gradient it is part of the tolerance (a right gradient
    passed as a false alarm at c = 1e5); beyond, the check says it cannot
    judge (unresolved) instead of passing anything."""
    x = [np.random.default_rng(4).standard_normal(6)]
    vjp = lambda u, x: [2 * x * u]                      # noqa: E731
    assert bncore.gradcheck(lambda x: x ** 2 + 1e3, x, vjp, mode=mode)
    report = bncore.gradcheck(lambda x: x ** 2 + 1e8, x, vjp, mode=mode)
    assert not report and report.unresolved > 0 and "unresolved" in report.summary()
    # a larger step resolves it
    assert bncore.gradcheck(lambda x: x ** 2 + 1e8, x, vjp, mode=mode, h=1e-2)


@pytest.mark.parametrize("mode", MODES)
def test_a_step_too_coarse_for_the_function_is_unresolved_not_a_wrong_gradient(mode):
    """sin at x ~ 1e6 with the default relative step (1e-6 * 1e6 = 1): the
    difference quotient is not the derivative; say so instead of blaming the
    gradient (or passing a tolerance as large as the difference)."""
    x = [1e6 + np.random.default_rng(5).standard_normal(5)]
    report = bncore.gradcheck(np.sin, x, lambda u, x: [np.cos(x) * u], mode=mode)
    assert not report and report.unresolved > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("values", ["offset", "near_constant"])
def test_batch_norm_gradients_check_on_offset_and_near_constant_data(mode, values):
    """The registry's finite differences left these out (they false-alarmed:
    nominal steps, and directions the size of a near-constant channel's
    spread, below y's rounding); they are in fd_space again."""
    assert values in R.BN_FD_SPACE["values"]
    for seed in range(4):
        p = dict(seed=seed, ndim=3, batch=3, channels=2, axis="1", layout="c",
                 dtype="float64", values=values, training=bool(seed % 2), affine=True,
                 running=True)
        report = R.bn_gradcheck(p, mode=mode)
        assert report.ok, report.summary()


def test_float64_tolerance_stays_bounded_for_a_channel_of_one_value():
    """Eval mode with one value per channel: the data condition |mean|/std was
    ~1e300 and the float64 tolerance ~1e285, so any result passed."""
    p = dict(seed=7, ndim=2, batch=1, channels=2, axis="1", layout="c", dtype="float64",
             values="normal", training=False, affine=True, running=True)
    case = R.make_bn_forward_case(p)
    assert case.arrays["x"].shape[0] == 1
    assert R._data_tolerance(case) <= 1e-7


# ---------------------------------------------------------------- second review (same session)

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bug", ["tenfold", "zero"])
def test_a_small_gradient_beside_a_large_one_is_judged_on_its_own(mode, bug):
    """f = 1e8 + 1e4 a + 0.1 b: b's differences carry noise larger than its
    gradient; judged against a's size they counted as resolved, and that noise
    became b's tolerance (a wrong d/db passed)."""
    f = lambda a, b: 1e8 + 1e4 * a + 0.1 * b                     # noqa: E731
    wrong = {"tenfold": 1.0, "zero": 0.0}[bug]
    vjp = lambda u, a, b: [1e4 * u, wrong * u]                    # noqa: E731
    x = [np.random.default_rng(6).standard_normal(5) for _ in range(2)]
    assert not bncore.gradcheck(f, x, vjp, mode=mode)
    # at the default h the right d/db is unresolved, not passed (nor called wrong);
    # at a step b's differences resolve, the right one passes and the wrong one fails
    right = lambda u, a, b: [1e4 * u, 0.1 * u]                    # noqa: E731
    assert bncore.gradcheck(f, x, right, mode=mode).unresolved > 0
    assert bncore.gradcheck(f, x, right, mode=mode, h=1e-2)
    report = bncore.gradcheck(f, x, vjp, mode=mode, h=1e-2)
    assert not report and report.unresolved == 0


@pytest.mark.parametrize("mode", MODES)
def test_overflowing_values_do_not_make_a_tolerance_that_passes_anything(mode):
    """f = 1e160 x: |f|'s norm overflowed to inf, and so did the tolerance."""
    x = [np.random.default_rng(7).standard_normal(4)]
    f = lambda x: 1e160 * x                                       # noqa: E731
    assert bncore.gradcheck(f, x, lambda u, x: [1e160 * u], mode=mode)
    assert not bncore.gradcheck(f, x, lambda u, x: [0 * u], mode=mode)
    assert not bncore.gradcheck(f, x, lambda u, x: [-1e160 * u], mode=mode)


def test_a_wrong_entry_cannot_overflow_its_own_tolerance():
    """One garbage entry of 1e200 overflowed the 2-norm of <vjp(u), v>'s terms,
    which made the scale, and the tolerance, infinite."""
    x = [np.random.default_rng(8).standard_normal(6)]

    def vjp(u, x):
        g = np.cos(x) * u
        g[2] = 1e200
        return [g]
    assert not bncore.gradcheck(np.sin, x, vjp)
    assert bncore.gradcheck(np.sin, x, lambda u, x: [np.cos(x) * u])


@pytest.mark.parametrize("mode", MODES)
def test_offset_data_with_the_spread_as_scale_resolves(mode):
    """x ~ 1e8 + N(0, 1) with scales=[1] (as the docstring advises): the
    rounding of x +- s came back as fake truncation (random mode, unresolved);
    the steps are now exact multiples of the spacing of x."""
    x = [1e8 + np.random.default_rng(9).standard_normal(50)]
    A = np.random.default_rng(10).standard_normal((3, 50))
    # (f removes the offset, as batch norm does: its values are O(1))
    report = bncore.gradcheck(lambda x: A @ (x - 1e8), x, lambda u, x: [A.T @ u], mode=mode,
                              scales=[1.0])
    assert report, report.summary()


@pytest.mark.parametrize("mode", MODES)
def test_a_right_gradient_at_a_stationary_point_passes(mode):
    """At 0, 1 + sum x^2 has gradient 0: nothing to be relative to (it failed
    as unresolved whatever the settings)."""
    x = [np.zeros(4)]
    assert bncore.gradcheck(lambda x: 1.0 + x * x, x, lambda u, x: [2 * x * u], mode=mode)
    assert bncore.gradcheck(np.cos, x, lambda u, x: [-np.sin(x) * u], mode=mode, atol=1e-9)


# ---------------------------------------------------------------- thirteenth session review

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("factor", [1.1, 1.5])
def test_a_large_output_that_one_input_does_not_move_lends_it_no_tolerance(mode, factor):
    """f = (sin x, 1e8 b): moving x leaves the second output exactly as it was,
    so it adds nothing to the difference; random mode counted its size in the
    rounding noise anyway, and a 10-50 % wrong d/dx passed (error / tolerance
    0.09-0.3)."""
    f = lambda x, b: (np.sin(x), 1e8 * b)                           # noqa: E731
    rng = np.random.default_rng(12)
    inputs = [rng.standard_normal(20), rng.standard_normal(100 if mode == "full" else 20000)]
    right = lambda u, x, b: [u[0] * np.cos(x), 1e8 * u[1]]          # noqa: E731
    wrong = lambda u, x, b: [factor * u[0] * np.cos(x), 1e8 * u[1]]  # noqa: E731
    assert bncore.gradcheck(f, inputs, right, mode=mode)
    report = bncore.gradcheck(f, inputs, wrong, mode=mode)
    assert not report and report.unresolved == 0


def test_random_mode_costs_four_evaluations_of_f_per_direction():
    """As the module docstring says (found in review: the vjp side called f
    again for every direction, five in all; the full mode once per row)."""
    calls = [0]

    def f(x):
        calls[0] += 1
        return np.sin(x)
    x = np.linspace(0.0, 1.0, 5)
    assert bncore.gradcheck(f, [x], lambda u, x: [u * np.cos(x)], mode="random", n_directions=6)
    assert calls[0] <= 2 + 4 * 6


def test_a_gradient_half_wrong_beside_a_large_constant_is_caught():
    """The noise allowance for f = x - 1e7 (rounding of the large constant)
    must not swallow a VJP 50% off (mutation testing: a 10x looser allowance
    passed every other test, which use gross errors)."""
    x = np.random.default_rng(0).standard_normal(50)
    assert bncore.gradcheck(lambda x: x - 1e7, [x], lambda u, x: [u], mode="random",
                            scales=[1.0])
    assert not bncore.gradcheck(lambda x: x - 1e7, [x], lambda u, x: [1.5 * u],
                                mode="random", scales=[1.0])

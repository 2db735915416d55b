"""The convention presets reproduce each framework's update rule.

Each rule below is written the way that framework's own source writes it
(Keras 3 ``keras/src/optimizers``, optax ``optax/_src/transform.py`` and
``alias.py``, ONNX's training operators and their reference implementation),
independently of bncore's kernels and of bncore.testing.reference, and run
for 25 float64 steps with a changing learning rate.
"""
import numpy as np
import pytest

import bncore

STEPS = 25


def problem(seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(6,), (4, 3), (300,)]
    params = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) * 0.5 + 0.1 for s in shapes] for _ in range(STEPS)]
    return params, grads


def lr_at(lr0, k):
    return lr0 * (1.0 - 0.02 * k)


def run_bncore(cls, lr0, **kw):
    params, grads = problem()
    opt = cls(params, lr=lr0, **kw)
    for k in range(STEPS):
        bncore.optim.set_lr(opt, lr_at(lr0, k))
        opt.step(grads[k])
    return params


def run_rule(update, init, lr0):
    """update(p, g, state, lr, t) -> (p, state), t counting from 1."""
    params, grads = problem()
    states = [init(p) for p in params]
    for k in range(STEPS):
        for i in range(len(params)):
            params[i], states[i] = update(params[i], grads[k][i], states[i], lr_at(lr0, k), k + 1)
    return params


def close(a, b):
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-13)


# ---------------------------------------------------------------- Keras 3

def keras_sgd(momentum, nesterov, wd):
    def update(p, g, m, lr, t):
        p = p - p * wd * lr                       # _apply_weight_decay
        m = momentum * m - lr * g
        p = p + (momentum * m - lr * g if nesterov else m)
        return p, m
    return update


def keras_adam(beta1, beta2, eps, amsgrad, wd):
    def update(p, g, s, lr, t):
        m, v, vhat = s
        p = p - p * wd * lr
        alpha = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        m = m + (g - m) * (1 - beta1)
        v = v + (g * g - v) * (1 - beta2)
        if amsgrad:
            vhat = np.maximum(vhat, v)
            denom_v = vhat
        else:
            denom_v = v
        return p - alpha * m / (np.sqrt(denom_v) + eps), (m, v, vhat)
    return update


def keras_rmsprop(rho, eps, momentum, centered):
    def update(p, g, s, lr, t):
        vel, avg, mom = s
        vel = rho * vel + (1 - rho) * g * g
        if centered:
            avg = rho * avg + (1 - rho) * g
            denominator = vel - avg * avg + eps
        else:
            denominator = vel + eps
        increment = lr * g / np.sqrt(denominator)
        if momentum > 0:
            mom = momentum * mom + increment
            p = p - mom
        else:
            p = p - increment
        return p, (vel, avg, mom)
    return update


def keras_adagrad(eps):
    def update(p, g, acc, lr, t):
        acc = acc + g * g
        return p - lr * g / np.sqrt(acc + eps), acc
    return update


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_keras_sgd(momentum, nesterov, wd):
    ours = run_bncore(bncore.optim.SGD, 0.05, convention="keras", momentum=momentum,
                      nesterov=nesterov, weight_decay=wd)
    theirs = run_rule(keras_sgd(momentum, nesterov, wd), np.zeros_like, 0.05)
    close(ours, theirs)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_keras_adam(amsgrad, wd):
    ours = run_bncore(bncore.optim.Adam, 0.01, convention="keras", amsgrad=amsgrad, weight_decay=wd)
    theirs = run_rule(keras_adam(0.9, 0.999, 1e-7, amsgrad, wd),
                      lambda p: (np.zeros_like(p),) * 3, 0.01)
    close(ours, theirs)


@pytest.mark.parametrize("momentum,centered", [(0.0, False), (0.5, False), (0.0, True), (0.5, True)])
def test_keras_rmsprop(momentum, centered):
    ours = run_bncore(bncore.optim.RMSprop, 0.005, convention="keras", momentum=momentum,
                      centered=centered)
    theirs = run_rule(keras_rmsprop(0.9, 1e-7, momentum, centered),
                      lambda p: (np.zeros_like(p),) * 3, 0.005)
    close(ours, theirs)


def test_keras_adagrad():
    ours = run_bncore(bncore.optim.Adagrad, 0.05, convention="keras")
    theirs = run_rule(keras_adagrad(1e-7), lambda p: np.full_like(p, 0.1), 0.05)
    close(ours, theirs)


# ---------------------------------------------------------------- optax

def optax_sgd(momentum, nesterov):
    def update(p, g, trace, lr, t):
        trace = g + momentum * trace
        u = g + momentum * trace if nesterov else trace
        return p - lr * u, trace
    return update


def optax_adam(b1, b2, eps, eps_root, amsgrad, wd):
    def update(p, g, s, lr, t):
        mu, nu, nu_max = s
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        mu_hat = mu / (1 - b1 ** t)
        nu_hat = nu / (1 - b2 ** t)
        if amsgrad:
            nu_max = np.maximum(nu_max, nu_hat)
            nu_hat = nu_max
        u = mu_hat / (np.sqrt(nu_hat + eps_root) + eps) + wd * p      # add_decayed_weights
        return p - lr * u, (mu, nu, nu_max)
    return update


def optax_rmsprop(decay, eps, centered, momentum):
    def update(p, g, s, lr, t):
        nu, mu, trace = s
        nu = decay * nu + (1 - decay) * g * g
        if centered:
            mu = decay * mu + (1 - decay) * g
            u = g / np.sqrt(nu - mu * mu + eps)
        else:
            u = g / np.sqrt(nu + eps)
        u = lr * u                               # scale_by_learning_rate comes first,
        if momentum:                             # then trace(decay=momentum)
            trace = u + momentum * trace
            u = trace
        return p - u, (nu, mu, trace)
    return update


def optax_adagrad(eps):
    def update(p, g, ss, lr, t):
        ss = g * g + ss
        inv = np.where(ss > 0, 1 / np.sqrt(ss + eps), 0.0)
        return p - lr * inv * g, ss
    return update


@pytest.mark.parametrize("momentum,nesterov", [(0.9, False), (0.9, True)])
def test_optax_sgd(momentum, nesterov):
    ours = run_bncore(bncore.optim.SGD, 0.05, convention="optax", momentum=momentum,
                      nesterov=nesterov)
    close(ours, run_rule(optax_sgd(momentum, nesterov), np.zeros_like, 0.05))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("eps_root", [0.0, 1e-8])
def test_optax_adam_and_amsgrad(amsgrad, eps_root):
    ours = run_bncore(bncore.optim.Adam, 0.01, convention="optax", amsgrad=amsgrad,
                      eps_root=eps_root)
    theirs = run_rule(optax_adam(0.9, 0.999, 1e-8, eps_root, amsgrad, 0.0),
                      lambda p: (np.zeros_like(p),) * 3, 0.01)
    close(ours, theirs)


def test_optax_adamw():
    ours = run_bncore(bncore.optim.AdamW, 0.01, convention="optax", weight_decay=0.05)
    theirs = run_rule(optax_adam(0.9, 0.999, 1e-8, 0.0, False, 0.05),
                      lambda p: (np.zeros_like(p),) * 3, 0.01)
    close(ours, theirs)


@pytest.mark.parametrize("centered,momentum", [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_optax_rmsprop(centered, momentum):
    ours = run_bncore(bncore.optim.RMSprop, 0.005, convention="optax", centered=centered,
                      momentum=momentum)
    theirs = run_rule(optax_rmsprop(0.9, 1e-8, centered, momentum),
                      lambda p: (np.zeros_like(p),) * 3, 0.005)
    close(ours, theirs)


def test_optax_adagrad():
    ours = run_bncore(bncore.optim.Adagrad, 0.05, convention="optax")
    close(ours, run_rule(optax_adagrad(1e-7), lambda p: np.full_like(p, 0.1), 0.05))


# ---------------------------------------------------------------- ONNX

def onnx_adam(alpha, beta, eps, norm_coefficient, norm_coefficient_post):
    def update(x, g, s, r, step):
        v, h = s
        T = step - 1                              # ONNX's update count: 0 at the first step
        g_reg = norm_coefficient * x + g
        v = alpha * v + (1 - alpha) * g_reg
        h = beta * h + (1 - beta) * g_reg * g_reg
        h_sqrt = np.sqrt(h) + eps
        r_adj = r * np.sqrt(1 - beta ** T) / (1 - alpha ** T) if T > 0 else r
        x = x - r_adj * (v / h_sqrt)
        return (1 - norm_coefficient_post) * x, (v, h)
    return update


def onnx_momentum(alpha, beta, norm_coefficient, nesterov):
    def update(x, g, v, r, step):
        T = step - 1
        g_reg = norm_coefficient * x + g
        b = beta if T > 0 else 1.0
        v = alpha * v + b * g_reg
        x = x - r * (g_reg + alpha * v if nesterov else v)
        return x, v
    return update


def onnx_adagrad(eps, decay, norm_coefficient):
    def update(x, g, h, r, step):
        T = step - 1
        r_ = r / (1 + T * decay)
        g_reg = norm_coefficient * x + g
        h = h + g_reg * g_reg
        return x - r_ * g_reg / (np.sqrt(h) + eps), h
    return update


def F32(v):
    return float(np.float32(v))


@pytest.mark.parametrize("nc,post", [(0.0, 0.0), (0.01, 0.0), (0.0, 0.001)])
def test_onnx_adam(nc, post):
    ours = run_bncore(bncore.optim.Adam, 0.01, convention="onnx", weight_decay=nc,
                      weight_decay_post=post)
    # ONNX's defaults are float32 attributes: 0.9 is 0.89999997615814209
    theirs = run_rule(onnx_adam(F32(0.9), F32(0.999), F32(1e-6), nc, post),
                      lambda p: (np.zeros_like(p),) * 2, 0.01)
    close(ours, theirs)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("nc", [0.0, 0.01])
def test_onnx_momentum(nesterov, nc):
    # alpha = momentum, beta = 1 - dampening
    ours = run_bncore(bncore.optim.SGD, 0.05, convention="onnx", momentum=0.9, dampening=0.2,
                      nesterov=nesterov, weight_decay=nc)
    close(ours, run_rule(onnx_momentum(0.9, 0.8, nc, nesterov), np.zeros_like, 0.05))


def test_onnx_adagrad():
    ours = run_bncore(bncore.optim.Adagrad, 0.05, convention="onnx", lr_decay=0.01,
                      weight_decay=0.01)
    close(ours, run_rule(onnx_adagrad(F32(1e-6), 0.01, 0.01), np.zeros_like, 0.05))


def test_tutorial_momentum_is_the_keras_style():
    """v = beta * v + lr * g; W -= v (the formulation many tutorials give)."""
    params, grads = problem()
    bufs = [np.zeros_like(p) for p in params]
    w = [p.copy() for p in params]
    v = [np.zeros_like(p) for p in params]
    for k in range(STEPS):
        lr = lr_at(0.05, k)
        bncore.sgd_step(params, grads[k], bufs, lr=lr, momentum=0.9, style="keras",
                        first_step=k == 0)
        for i in range(len(w)):
            v[i] = 0.9 * v[i] + lr * grads[k][i]
            w[i] = w[i] - v[i]
    close(params, w)


@pytest.mark.parametrize("nesterov", [False, True])
def test_onnx_momentum_reads_a_nonzero_velocity_at_the_first_update(nesterov):
    """ONNX Momentum takes V as an input: at T == 0 it is still read (only beta
    is replaced by 1), so a carried-over velocity counts from the first update."""
    params, grads = problem()
    rng = np.random.default_rng(1)
    v0 = [rng.standard_normal(p.shape) for p in params]
    ours, bufs = [p.copy() for p in params], [v.copy() for v in v0]
    theirs, vs = [p.copy() for p in params], [v.copy() for v in v0]
    rule = onnx_momentum(0.9, 0.8, 0.01, nesterov)
    for k in range(3):
        bncore.sgd_step(ours, grads[k], bufs, lr=lr_at(0.05, k), momentum=0.9, dampening=0.2,
                        nesterov=nesterov, weight_decay=0.01, style="onnx", first_step=k == 0)
        for i in range(len(theirs)):
            theirs[i], vs[i] = rule(theirs[i], grads[k][i], vs[i], lr_at(0.05, k), k + 1)
    close(ours, theirs)
    close(bufs, vs)


def keras_decayed(update, wd):
    """Keras 3 decays every variable before the update, in apply():
    ``_apply_weight_decay``: ``variable.assign(variable - variable * wd * lr)``."""
    def decayed(p, g, s, lr, t):
        return update(p - p * wd * lr, g, s, lr, t)
    return decayed


def test_keras_rmsprop_weight_decay_is_decoupled():
    ours = run_bncore(bncore.optim.RMSprop, 0.005, convention="keras", momentum=0.5,
                      weight_decay=0.05)
    theirs = run_rule(keras_decayed(keras_rmsprop(0.9, 1e-7, 0.5, False), 0.05),
                      lambda p: (np.zeros_like(p),) * 3, 0.005)
    close(ours, theirs)


def test_keras_adagrad_weight_decay_is_decoupled():
    ours = run_bncore(bncore.optim.Adagrad, 0.05, convention="keras", weight_decay=0.05)
    theirs = run_rule(keras_decayed(keras_adagrad(1e-7), 0.05),
                      lambda p: np.full_like(p, 0.1), 0.05)
    close(ours, theirs)


@pytest.mark.parametrize("style", ["torch", "optax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_amsgrad_max_keeps_a_nan(style, dtype):
    """AMSGrad's running max takes a NaN v as torch.maximum does, without
    torch installed to compare with (mutation testing: a max dropping NaN was
    caught only by test_optim_torch)."""
    p = np.ones(8, dtype)
    g = np.full(8, 0.5, dtype)
    g[3] = np.nan
    m, v, vm = (np.zeros(8, dtype) for _ in range(3))
    vm[:] = 0.25
    bncore.adam_step([p], [g], [m], [v], step=2, amsgrad=True, max_exp_avg_sqs=[vm],
                     eps_style=style)
    assert np.isnan(vm[3]) and np.isnan(p[3])
    assert np.isfinite(np.delete(vm, 3)).all() and np.isfinite(np.delete(p, 3)).all()


def test_adam_at_onnx_t_zero_takes_a_step():
    """step=0 is allowed beside bias_correction_step=0 (ONNX's T = 0 passed as
    both counters), and the step is taken (mutation testing: a minimum of 1
    for step raised ValueError, unnoticed)."""
    p = np.ones(4)
    g = np.full(4, 0.1)
    m, v = np.zeros(4), np.zeros(4)
    bncore.adam_step([p], [g], [m], [v], step=0, bias_correction_step=0, eps_style="hat")
    assert np.all(p < 1) and np.all(m > 0) and np.all(v > 0)


def normwise(got, want):
    """Norm-wise relative difference (0 where both are all zeros: a float32 s
    that underflowed entirely)."""
    want = want.astype(np.float64)       # (float32 squares of 1e-27 underflow)
    diff = np.linalg.norm(got.astype(np.float64) - want)
    return float(diff / np.linalg.norm(want)) if diff else 0.0


def _centered_rmsprop_expected(p, g, sq, ga, lr, alpha, eps):
    """The float64 formula on the stored float32 values, rounded once per
    stored value, with d clamped at 0 (bncore.rmsprop_step's docstring)."""
    g = g.astype(np.float64)
    s = alpha * sq.astype(np.float64) + (1 - alpha) * g * g
    a = alpha * ga.astype(np.float64) + (1 - alpha) * g
    d = np.maximum(s - a * a, 0.0)
    new_p = p.astype(np.float64) - lr * g / (np.sqrt(d) + eps)
    return new_p.astype(np.float32), s.astype(np.float32), a.astype(np.float32)


@pytest.mark.parametrize("alpha, scale", [(0.99, 1e-25), (0.9, 1e-23)])
def test_centered_rmsprop_stays_finite_where_rounding_makes_the_variance_negative(alpha, scale):
    """Exactly, s >= a^2; stored rounded they can cross: a float32 s underflows
    for tiny gradients while a keeps its bits, d = s - a^2 went negative and p
    NaN for good (an adversarial review; torch float32 stays finite there).
    Each step must give the float64 formula on the stored values with d
    clamped at 0: p to the ulp that fused multiply-adds may move (README,
    Numerics guarantees), the state norm-wise (ga cancels, where a fused and
    an unfused alpha*ga + (1-alpha)*g differ by more than an ulp)."""
    rng = np.random.default_rng(5)
    p = np.ones(2000, np.float32)
    sq = np.zeros(2000, np.float32)
    ga = np.zeros(2000, np.float32)
    lr, eps = 1e-2, 1e-8
    for _ in range(6):
        g = (scale * rng.standard_normal(2000)).astype(np.float32)
        want = _centered_rmsprop_expected(p, g, sq, ga, lr, alpha, eps)
        bncore.rmsprop_step([p], [g], [sq], grad_avgs=[ga], lr=lr, alpha=alpha, eps=eps,
                            centered=True)
        assert np.isfinite(p).all()
        np.testing.assert_array_max_ulp(p, want[0], maxulp=1)
        for got, exp in zip((sq, ga), want[1:]):
            assert normwise(got, exp) < 1e-6


def test_centered_rmsprop_at_alpha_zero_stays_finite():
    """At alpha = 0, d = g^2 - g^2 is 0 exactly, but the fused s - a*a takes
    the exact square minus the rounded one: negative for about half of all g
    in float64, which made p NaN. Clamped, every p is finite. (Only builds that
    fuse, the default -march=native one, went NaN: unfused, d is 0 exactly.)"""
    rng = np.random.default_rng(1)
    p, sq, ga = np.ones(2000), np.zeros(2000), np.zeros(2000)
    g = rng.standard_normal(2000)
    bncore.rmsprop_step([p], [g], [sq], grad_avgs=[ga], lr=1e-2, alpha=0.0, centered=True)
    assert np.isfinite(p).all()
    np.testing.assert_array_equal(ga, g)


def test_centered_rmsprop_keeps_a_nan_variance_nan():
    """The clamp at 0 is for rounding only: a NaN in the state (the gradient
    finite) still makes d, and so p, NaN. A max() that drops NaN (fmax) would
    give a finite p here (review: with the NaN in the gradient instead, p was
    NaN whatever the clamp did, so the test could not fail)."""
    for dtype in (np.float32, np.float64):
        p = np.ones(4, dtype)
        g = np.array([0.1, 0.2, 0.3, 0.4], dtype)
        sq = np.array([0.0, np.nan, 0.0, 0.0], dtype)
        ga = np.zeros(4, dtype)
        bncore.rmsprop_step([p], [g], [sq], grad_avgs=[ga], lr=0.1, centered=True)
        assert np.isnan(p[1]) and np.isfinite(np.delete(p, 1)).all()

"""NumPy emulations of the CUDA kernels, written from the kernels' specification
(the comments in bncore_gpu/*.cu): same arguments, same partial layouts, same
formulas. Registered into the emulated cupy.RawModule."""
import numpy as np

from cupy._core import RawModule

E = RawModule.emulations


def _null(p):
    return isinstance(p, np.uint64) and p == 0


def _a(p):
    return p.view(np.ndarray)


def _f64(p):
    return _a(p).astype(np.float64)


def _store(dst, values):
    # dev_st: float64 rounded once to the storage type (binary16 included)
    d = _a(dst)
    d[...] = values.astype(d.dtype).reshape(d.shape)


def _expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


# ---------------------------------------------------------------- batch norm

def _values_per_element():
    """Values per storage element of the planes kernels: 4 for <float4>."""
    return 4 if RawModule.current_targs == ["float4"] else 1


def _pivot(v):
    """bn_pivot: a pivot from the data, 0 where that value is Inf or NaN."""
    return np.where(np.isfinite(v), v, 0.0)


def stats_planes(grid, block, x, outer, C, inner, G, s1, s2):
    inner = int(inner) * _values_per_element()
    _expect(grid[:2] == (C, G) and block[0] == 256, f"stats_planes launch {grid} {block}")
    X = _f64(x).reshape(int(outer), int(C), inner)
    D = X - _pivot(X[0, :, 0])[None, :, None]
    a1 = _a(s1).reshape(int(C), int(G))
    a2 = _a(s2).reshape(int(C), int(G))
    for g in range(int(G)):
        a1[:, g] = D[g::int(G)].sum(axis=(0, 2))
        a2[:, g] = (D[g::int(G)] ** 2).sum(axis=(0, 2))


E["bn_stats_planes"] = stats_planes


def stats_rows(grid, block, x, outer, C, inner, R, nRB, s1, s2):
    outer, C, inner, R, nRB = int(outer), int(C), int(inner), int(R), int(nRB)
    P = C * inner
    _expect(grid[:2] == (-(-P // 32), nRB) and block[:2] == (32, 8), "stats_rows launch")
    _expect((nRB - 1) * R < outer <= nRB * R, "stats_rows row blocks")
    X = _f64(x).reshape(outer, P)
    K = _pivot(X[0, (np.arange(P) // inner) * inner])  # pivot of each column's channel
    D = X - K
    a1 = _a(s1).reshape(P, nRB)
    a2 = _a(s2).reshape(P, nRB)
    for rb in range(nRB):
        rows = D[rb * R: min((rb + 1) * R, outer)]
        a1[:, rb] = rows.sum(axis=0)
        a2[:, rb] = (rows ** 2).sum(axis=0)


E["bn_stats_rows"] = stats_rows


def finalize_train(grid, block, x, C, inner, outer, M, s1, s2, N, eps, w, b, rm, rv, momentum,
                   unbiased, mean, invstd, scale, shift):
    C, inner, outer, M = int(C), int(inner), int(outer), int(M)
    _expect(grid[0] == C, "finalize_train grid")
    S1 = _a(s1).reshape(C, M).sum(axis=1)
    S2 = _a(s2).reshape(C, M).sum(axis=1)
    K = _pivot(_f64(x)[np.arange(C) * inner])
    d = S1 / N
    m2 = S2 - S1 * d
    # a pivot far from its channel's mean: the channel's sums again against K + d
    # (not where K + d is Inf or NaN)
    with np.errstate(invalid="ignore"):
        far = ~(S2 <= 16.0 * m2) & np.isfinite(K + d)
    if far.any():
        X = _f64(x)[: outer * C * inner].reshape(outer, C, inner)
        for c in np.flatnonzero(far):
            P = K[c] + d[c]
            v = X[:, c, :] - P
            t1, t2 = v.sum(), (v * v).sum()
            K[c], d[c], m2[c], S2[c] = P, t1 / N, t2 - t1 * (t1 / N), t2
    # squares past float64's range around a finite mean: M2 Inf, not Inf - Inf
    m2 = np.where(np.isnan(m2) & (S2 == np.inf) & np.isfinite(K + d), np.inf, m2)
    m2 = np.maximum(m2, 0.0)
    mu = K + d
    var = m2 / N
    inv = 1.0 / np.sqrt(var + eps)
    _a(mean)[:] = mu
    _a(invstd)[:] = inv
    _a(scale)[:] = inv * (1.0 if _null(w) else _a(w))
    _a(shift)[:] = 0.0 if _null(b) else _a(b)
    if not _null(rm):
        vr = m2 / (N - 1.0) if unbiased else var
        _store(rm, (1 - momentum) * _f64(rm) + momentum * mu)
        _store(rv, (1 - momentum) * _f64(rv) + momentum * vr)


E["bn_finalize_train"] = finalize_train


def forward_cluster(grid, block, x, y, outer, C, inner4, N, eps, w, b, rm, rv, momentum,
                    unbiased, mean, invstd):
    """bn_forward_cluster (_bn_cluster_kernels.cu): one cluster of 8 CTAs per
    channel, each holding ceil(outer / 8) planes in shared memory; exact
    two-pass statistics, then y, mean, invstd and the running statistics."""
    outer, C, inner = int(outer), int(C), int(inner4) * 4
    _expect(grid == (8 * C, 1, 1) and block == (256, 1, 1), f"forward_cluster launch {grid}")
    smem = RawModule.current_launch.get("shared_mem", 0)
    _expect(smem == -(-outer // 8) * inner * 4, f"forward_cluster shared memory {smem}")
    X = _f64(x)[: outer * C * inner].reshape(outer, C, inner)
    mu = X.sum(axis=(0, 2)) / N
    m2 = ((X - mu[None, :, None]) ** 2).sum(axis=(0, 2))
    var = m2 / N
    inv = 1.0 / np.sqrt(var + eps)
    sc = inv * (1.0 if _null(w) else _f64(w))
    sh = 0.0 if _null(b) else _f64(b)
    _store(y, (X - mu[None, :, None]) * sc[None, :, None] + np.broadcast_to(sh, (C,))[None, :, None])
    _a(mean)[:] = mu
    _a(invstd)[:] = inv
    if not _null(rm):
        vr = m2 / (N - 1.0) if unbiased else var
        _store(rm, (1 - momentum) * _f64(rm) + momentum * mu)
        _store(rv, (1 - momentum) * _f64(rv) + momentum * vr)


E["bn_forward_cluster"] = forward_cluster


def backward_cluster(grid, block, dy, x, dx, outer, C, inner4, N, training, mean, invstd, w,
                     dweight, dbias):
    """bn_backward_cluster: dy and x of a channel held by a cluster of 8 CTAs;
    sum(dy), sum(dy (x - mean)), the parameter gradients and dx."""
    outer, C, inner = int(outer), int(C), int(inner4) * 4
    _expect(grid == (8 * C, 1, 1) and block == (256, 1, 1), f"backward_cluster launch {grid}")
    smem = RawModule.current_launch.get("shared_mem", 0)
    _expect(smem == 2 * -(-outer // 8) * inner * 4, f"backward_cluster shared memory {smem}")
    D = _f64(dy)[: outer * C * inner].reshape(outer, C, inner)
    X = _f64(x)[: outer * C * inner].reshape(outer, C, inner)
    m = _a(mean)
    inv = _a(invstd)
    xm = X - m[None, :, None]
    s1 = D.sum(axis=(0, 2))
    s2 = (D * xm).sum(axis=(0, 2))
    _store(dweight, s2 * inv)
    _store(dbias, s1)
    g = inv * (1.0 if _null(w) else _f64(w))
    a = s1 / N if training else np.zeros(C)
    k = inv * inv * s2 / N if training else np.zeros(C)
    if training:
        _store(dx, g[None, :, None] * ((D - a[None, :, None]) - xm * k[None, :, None]))
    else:                       # inference: dx = g dy, x not read
        _store(dx, g[None, :, None] * D)


E["bn_backward_cluster"] = backward_cluster


def prepare_eval(grid, block, C, rm, rv, eps, w, b, mean, invstd, scale, shift):
    _expect(grid[0] * block[0] >= C, "prepare_eval covers the channels")
    inv = 1.0 / np.sqrt(_f64(rv) + eps)
    _a(mean)[:] = _f64(rm)
    _a(invstd)[:] = inv
    _a(scale)[:] = inv * (1.0 if _null(w) else _a(w))
    _a(shift)[:] = 0.0 if _null(b) else _a(b)


E["bn_prepare_eval"] = prepare_eval


def store_rounded(grid, block, src, dst, n):
    """bn_store_rounded: float64 values rounded once into the storage type."""
    n = int(n)
    _expect(n > 0 and _a(dst).size == n, "store_rounded size")
    _store(dst, _f64(src)[:n])


E["bn_store_rounded"] = store_rounded


def apply_planes(grid, block, x, y, nplanes, C, inner, mean, scale, shift):
    inner = int(inner) * _values_per_element()
    X = _f64(x).reshape(int(nplanes), inner)
    c = np.arange(int(nplanes)) % int(C)
    m, s, h = _a(mean)[c, None], _a(scale)[c, None], _a(shift)[c, None]
    _store(y, (X - m) * s + h)


E["bn_apply_planes"] = apply_planes


def apply_rows(grid, block, x, y, outer, P, inner, mean, scale, shift):
    outer, P, inner = int(outer), int(P), int(inner)
    _expect(grid[0] == -(-P // 32), "apply_rows grid")
    X = _f64(x).reshape(outer, P)
    c = np.arange(P) // inner
    _store(y, (X - _a(mean)[c]) * _a(scale)[c] + _a(shift)[c])


E["bn_apply_rows"] = apply_rows


def dy_sums_planes(grid, block, dy, x, outer, C, inner, G, mean, pa, pb):
    inner = int(inner) * _values_per_element()
    outer, C, G = int(outer), int(C), int(G)
    _expect(grid[:2] == (C, G) and block[0] == 256, f"dy_sums_planes launch {grid} {block}")
    DY = _f64(dy).reshape(outer, C, inner)
    XC = _f64(x).reshape(outer, C, inner) - _a(mean)[None, :, None]
    a1 = _a(pa).reshape(C, G)
    a2 = _a(pb).reshape(C, G)
    for g in range(G):
        a1[:, g] = DY[g::G].sum(axis=(0, 2))
        a2[:, g] = (DY[g::G] * XC[g::G]).sum(axis=(0, 2))


E["bn_dy_sums_planes"] = dy_sums_planes


def dy_sums_rows(grid, block, dy, x, outer, C, inner, R, nRB, mean, pa, pb):
    outer, C, inner, R, nRB = int(outer), int(C), int(inner), int(R), int(nRB)
    P = C * inner
    DY = _f64(dy).reshape(outer, P)
    XC = _f64(x).reshape(outer, P) - _a(mean)[np.arange(P) // inner]
    a1 = _a(pa).reshape(P, nRB)
    a2 = _a(pb).reshape(P, nRB)
    for rb in range(nRB):
        sl = slice(rb * R, min((rb + 1) * R, outer))
        a1[:, rb] = DY[sl].sum(axis=0)
        a2[:, rb] = (DY[sl] * XC[sl]).sum(axis=0)


E["bn_dy_sums_rows"] = dy_sums_rows


def finalize_backward(grid, block, C, M, pa, pb, N, training, invstd, w, dweight, dbias, g, a,
                      k):
    C, M = int(C), int(M)
    S1 = _a(pa).reshape(C, M).sum(axis=1)
    S2 = _a(pb).reshape(C, M).sum(axis=1)
    inv = _a(invstd)
    _store(dweight, S2 * inv)
    _store(dbias, S1)
    _a(g)[:] = inv * (1.0 if _null(w) else _f64(w))
    _a(a)[:] = S1 / N if training else 0.0
    _a(k)[:] = inv * inv * S2 / N if training else 0.0


E["bn_finalize_backward"] = finalize_backward


def dx_planes(grid, block, dy, x, dx, nplanes, C, inner, mean, g, a, k):
    inner = int(inner) * _values_per_element()
    nplanes = int(nplanes)
    c = np.arange(nplanes) % int(C)
    DY = _f64(dy).reshape(nplanes, inner)
    X = _f64(x).reshape(nplanes, inner)
    m, gg, aa, kk = (_a(v)[c, None] for v in (mean, g, a, k))
    _store(dx, gg * ((DY - aa) - (X - m) * kk))


E["bn_dx_planes"] = dx_planes


def dx_rows(grid, block, dy, x, dx, outer, P, inner, mean, g, a, k):
    outer, P, inner = int(outer), int(P), int(inner)
    c = np.arange(P) // inner
    DY = _f64(dy).reshape(outer, P)
    X = _f64(x).reshape(outer, P)
    m, gg, aa, kk = (_a(v)[c] for v in (mean, g, a, k))
    _store(dx, gg * ((DY - aa) - (X - m) * kk))


E["bn_dx_rows"] = dx_rows


# ---------------------------------------------------------------- multi-tensor

import ctypes  # noqa: E402

_CT = {"float": np.float32, "double": np.float64, "unsigned short": np.float16}
CHUNK = 16384


def _targs():
    return [_CT[t] for t in RawModule.current_targs]


def _view(addr, n, dtype):
    if addr == 0:
        return None
    dtype = np.dtype(dtype)
    buf = (ctypes.c_char * (n * dtype.itemsize)).from_address(int(addr))
    return np.frombuffer(buf, dtype=dtype, count=n)


def _table(table, nops, n, nchunks, dtypes):
    """{op: [arrays per tensor]} and the chunk list, from the packed table."""
    t = _a(table)
    nops, n, nchunks = int(nops), int(n), int(nchunks)
    sizes = t[nops * n: nops * n + n]
    chunks = t[nops * n + n:].reshape(-1, 2)
    _expect(len(chunks) == nchunks, "chunk count")
    for c, (ti, off) in enumerate(chunks):
        _expect(off % CHUNK == 0 and off < max(sizes[ti], 1), f"chunk {c} offset")
    # the kernels walk the chunks, not the tensors: a table that misses or
    # repeats a chunk would skip or repeat elements on a device, where the
    # whole-tensor emulations below would not show it
    for i in range(n):
        offs = sorted(int(off) for ti, off in chunks if int(ti) == i)
        _expect(offs == list(range(0, int(sizes[i]), CHUNK)),
                f"the chunk table covers tensor {i} ({int(sizes[i])} elements) at {offs}")
    arrays = {}
    for op in range(nops):
        arrays[op] = [_view(t[op * n + i], int(sizes[i]), dtypes[op]) for i in range(n)]
    return arrays, sizes, chunks


def _mt_launch(name, grid, block, threads=256):
    """The multi-tensor kernels stride by MT_THREADS (256) and size their shared
    trees for it: any other block size would skip or repeat elements."""
    _expect(block == (threads, 1, 1) and grid[0] >= 1 and grid[1:] == (1, 1),
            f"{name} launch {grid} {block}")


def _amp(inv_scale, grad_scale, found_inf):
    if not _null(found_inf) and float(_a(found_inf)) != 0.0:
        return None
    return 1.0 / float(_a(grad_scale)) if not _null(grad_scale) else float(inv_scale)


def _step(step, host):
    return float(_a(step)) if not _null(step) else float(host)


def _put(arr, values):
    arr[...] = values.astype(arr.dtype)


def _l2(gr, wd, x):
    # mt_grad: the L2 term only where weight decay is on (0 * inf would be NaN)
    return gr + wd * x if wd != 0.0 else gr


def mt_sgd(grid, block, table, nops, n, nchunks, lr, momentum, dampening, nesterov, style,
           weight_decay, decoupled, sign, inv_scale, grad_scale, found_inf, step, first_host):
    _expect(grid[0] == nchunks and block[0] == 256, "mt_sgd launch")
    inv = _amp(inv_scale, grad_scale, found_inf)
    if inv is None:
        return
    P, G = _targs()
    arr, _, _ = _table(table, nops, n, nchunks, [P, G, P])
    first = _step(step, 0.0) <= 1.0 if not _null(step) else bool(first_host)
    read_buf = True if style == 2 else not first
    B = lr if style == 1 else (1.0 if first else 1.0 - dampening)
    L = 1.0 if style == 1 else lr
    Na = (lr if style == 1 else 1.0) if nesterov else 0.0
    Nb = momentum if nesterov else 1.0
    wd = 0.0 if decoupled else weight_decay
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    for t in range(int(n)):
        p, g, b = arr[0][t], arr[1][t], arr[2][t]
        x = p.astype(np.float64)
        gr = _l2(g.astype(np.float64) * inv * sign, wd, x)
        if b is not None:
            v = b.astype(np.float64) if read_buf else np.full_like(x, -0.0)
            v = momentum * v + B * gr
            _put(b, v)
            _put(p, x * decay - L * (Na * gr + Nb * v if nesterov else v))
        else:
            _put(p, x * decay - lr * ((B if style == 2 and not nesterov else 1.0) * gr))


E["mt_sgd"] = mt_sgd


def mt_adam(grid, block, table, nops, n, nchunks, lr, beta1, beta2, eps, eps_root, weight_decay,
            decoupled, post, amsgrad, amsgrad_corrected, eps_mode, sign, inv_scale, grad_scale,
            found_inf, step, step_host, bias_offset, vec4):
    _mt_launch("mt_adam", grid, block)
    inv = _amp(inv_scale, grad_scale, found_inf)
    if inv is None:
        return
    P, G = _targs()
    arr, _, _ = _table(table, nops, n, nchunks, [P, G, P, P, P])
    if vec4 and P == np.float32 and G == np.float32 and not amsgrad:
        # the float4 loads and stores (the kernel ignores vec4 elsewhere)
        for k in range(4):
            for a in arr[k]:
                _expect(a is None or a.ctypes.data % 16 == 0, "mt_adam vec4 on an unaligned tensor")
    t_ = _step(step, step_host) + bias_offset
    bc1 = 1.0 - beta1 ** t_ if t_ > 0 else 1.0
    bc2 = 1.0 - beta2 ** t_ if t_ > 0 else 1.0
    if eps_mode == 2:
        ss, c_in, c_out = lr * np.sqrt(bc2) / bc1, 1.0, 1.0
    elif amsgrad and amsgrad_corrected:
        ss, c_in, c_out = lr / bc1, 1.0 / bc2, 1.0
    else:
        ss, c_in, c_out = lr / bc1, 1.0, 1.0 / bc2
    wd = 0.0 if decoupled else weight_decay
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    for t in range(int(n)):
        p, g, m, v, vmax = (arr[k][t] for k in range(5))
        x = p.astype(np.float64)
        gr = _l2(g.astype(np.float64) * inv * sign, wd, x)
        mm = beta1 * m.astype(np.float64) + (1 - beta1) * gr
        vv = beta2 * v.astype(np.float64) + (1 - beta2) * gr * gr
        _put(m, mm)
        _put(v, vv)
        vm = vv * c_in
        if amsgrad:
            vm = np.where((vm > vmax.astype(np.float64)) | np.isnan(vm), vm,
                          vmax.astype(np.float64))
            _put(vmax, vm)
        _put(p, (x * decay - ss * mm / (np.sqrt(vm * c_out + eps_root) + eps)) * post)


E["mt_adam"] = mt_adam


def mt_rmsprop(grid, block, table, nops, n, nchunks, lr, alpha, e_in, e_out, weight_decay,
               decoupled, momentum, keras_style, sign, inv_scale, grad_scale, found_inf):
    _mt_launch("mt_rmsprop", grid, block)
    inv = _amp(inv_scale, grad_scale, found_inf)
    if inv is None:
        return
    P, G = _targs()
    arr, _, _ = _table(table, nops, n, nchunks, [P, G, P, P, P])
    wd = 0.0 if decoupled else weight_decay
    decay = 1.0 - lr * weight_decay if decoupled else 1.0
    k, L = (lr, 1.0) if keras_style else (1.0, lr)
    for t in range(int(n)):
        p, g, sq, ga, buf = (arr[j][t] for j in range(5))
        x = p.astype(np.float64)
        gr = _l2(g.astype(np.float64) * inv * sign, wd, x)
        s = alpha * sq.astype(np.float64) + (1 - alpha) * gr * gr
        _put(sq, s)
        if ga is not None:
            a = alpha * ga.astype(np.float64) + (1 - alpha) * gr
            _put(ga, a)
            s = s - a * a
            s = np.where(s < 0, 0.0, s)
        u = gr / (np.sqrt(s + e_in) + e_out)
        if buf is not None:
            b = momentum * buf.astype(np.float64) + k * u
            _put(buf, b)
            _put(p, x * decay - L * b)
        else:
            _put(p, x * decay - lr * u)


E["mt_rmsprop"] = mt_rmsprop


def mt_adagrad(grid, block, table, nops, n, nchunks, lr, lr_decay, e_in, e_out, weight_decay,
               decoupled, sign, inv_scale, grad_scale, found_inf, step, step_host):
    _mt_launch("mt_adagrad", grid, block)
    inv = _amp(inv_scale, grad_scale, found_inf)
    if inv is None:
        return
    P, G = _targs()
    arr, _, _ = _table(table, nops, n, nchunks, [P, G, P])
    clr = lr / (1.0 + (_step(step, step_host) - 1.0) * lr_decay)
    wd = 0.0 if decoupled else weight_decay
    decay = 1.0 - clr * weight_decay if decoupled else 1.0
    for t in range(int(n)):
        p, g, h = (arr[j][t] for j in range(3))
        x = p.astype(np.float64)
        gr = _l2(g.astype(np.float64) * inv * sign, wd, x)
        s = h.astype(np.float64) + gr * gr
        _put(h, s)
        _put(p, x * decay - clr * gr / (np.sqrt(s + e_in) + e_out))


E["mt_adagrad"] = mt_adagrad


def mt_step_increment(grid, block, step, found_inf):
    if _null(found_inf) or float(_a(found_inf)) == 0.0:
        _a(step)[...] += 1.0


E["mt_step_increment"] = mt_step_increment


def mt_norm_partials(grid, block, table, nops, n, nchunks, kind, p, part_s, part_q, gate,
                     scale):
    _mt_launch("mt_norm_partials", grid, block)
    (G,) = _targs()
    if not _null(gate) and float(_a(gate)) == 0.0:
        return
    sc = 1.0 if _null(scale) else float(_a(scale))
    arr, sizes, chunks = _table(table, nops, n, nchunks, [G])
    ps, pq = _a(part_s), _a(part_q)
    for c, (ti, off) in enumerate(chunks):
        g = np.abs(arr[0][ti][off:off + CHUNK].astype(np.float64))
        if kind == 2 and G == np.float64:
            s = np.max(g) if g.size else 0.0
            if np.isnan(g).any():
                ps[c] = pq[c] = np.nan
                continue
            ps[c] = s
            pq[c] = np.sum((g / s) ** 2) if s > 0 and np.isfinite(s) else (1.0 if s > 0 else 0.0)
        elif kind == 2:
            ps[c], pq[c] = np.sum(g * g), 0.0
        elif kind == 1:
            ps[c], pq[c] = np.sum(g), 0.0
        elif kind == 3:
            ps[c], pq[c] = (np.nan if np.isnan(g).any() else np.max(g)), 0.0
        else:
            ps[c], pq[c] = np.sum((g / sc) ** p), 0.0


E["mt_norm_partials"] = mt_norm_partials


def mt_norm_finalize(grid, block, nchunks, kind, p, scaled, part_s, part_q, max_norm, eps,
                     total, coef, gate):
    _mt_launch("mt_norm_finalize", grid, block)
    _expect(grid[0] == 1, "finalize is one block")
    if not _null(gate) and float(_a(gate)) == 0.0:
        return
    s, q = _a(part_s), _a(part_q)
    if kind == 3:
        t = np.nan if np.isnan(s).any() else np.max(s)
    elif scaled:
        big = np.max(s)
        t = np.nan if np.isnan(s).any() else (
            big * np.sqrt(np.sum(q * (s / big) ** 2)) if big > 0 and np.isfinite(big) else big)
    elif kind == 2:
        t = np.sqrt(np.sum(s))
    elif kind == 1:
        t = np.sum(s)
    else:
        t = np.sum(s) ** (1.0 / p)
    _a(total)[...] = t
    with np.errstate(divide="ignore", invalid="ignore"):
        _a(coef)[...] = max_norm / (t + eps) if t + eps != 0 else np.inf


E["mt_norm_finalize"] = mt_norm_finalize


def mt_norm_rescue(grid, block, stage, p, max_norm, eps, total, coef, gate, top, rel):
    _expect(grid[0] == 1, "the rescue's bookkeeping is one block")
    t, g = _a(total), _a(gate)
    if stage == 0:
        v = float(t)
        g[...] = 0.0 if v != v else float(v < 2.0 ** (-1000.0 / p) or np.isinf(v))
    elif stage == 1:
        m = float(_a(top))
        g[...] = float(float(g) != 0.0 and m > 0.0 and not np.isinf(m))
    elif float(g) != 0.0:
        v = float(_a(top)) * float(_a(rel))
        t[...] = v
        with np.errstate(divide="ignore", invalid="ignore"):
            _a(coef)[...] = max_norm / (v + eps) if v + eps != 0 else np.inf


E["mt_norm_rescue"] = mt_norm_rescue


def mt_scale(grid, block, table, nops, n, nchunks, coef):
    _mt_launch("mt_scale", grid, block)
    (G,) = _targs()
    s = float(_a(coef))
    if s >= 1.0:
        return
    arr, _, _ = _table(table, nops, n, nchunks, [G])
    for g in arr[0]:
        _put(g, g.astype(np.float64) * s)


E["mt_scale"] = mt_scale


def mt_clamp(grid, block, table, nops, n, nchunks, lo, hi):
    _mt_launch("mt_clamp", grid, block)
    (G,) = _targs()
    arr, _, _ = _table(table, nops, n, nchunks, [G])
    for g in arr[0]:
        a = g.astype(np.float64)
        _put(g, np.where(a < lo, lo, np.where(a > hi, hi, a)))


E["mt_clamp"] = mt_clamp


def mt_nonfinite_partials(grid, block, table, nops, n, nchunks, part):
    _mt_launch("mt_nonfinite_partials", grid, block)
    (G,) = _targs()
    arr, sizes, chunks = _table(table, nops, n, nchunks, [G])
    for c, (ti, off) in enumerate(chunks):
        _a(part)[c] = float(not np.isfinite(arr[0][ti][off:off + CHUNK]).all())


E["mt_nonfinite_partials"] = mt_nonfinite_partials


def mt_any(grid, block, nchunks, part, found):
    _mt_launch("mt_any", grid, block)
    _a(found)[...] = float((_a(part) != 0).any())


E["mt_any"] = mt_any


# ---- rows, float4 (the same results as the scalar rows kernels, by construction)

def _rows_vec4_check(grid, block, P4, TC):
    _expect(block[0] == 256 and (TC == 256 or 256 % TC == 0), "rows_vec4 block/tile")
    _expect(TC == 256 or TC == P4, "rows_vec4 tile must be 256 or P4")
    _expect(grid[0] == -(-P4 // TC), "rows_vec4 grid.x")


def stats_rows_vec4(grid, block, x, outer, inner, P4, TC, R, nRB, s1, s2):
    _rows_vec4_check(grid, block, int(P4), int(TC))
    P = 4 * int(P4)
    stats_rows((-(-P // 32), int(nRB), 1), (32, 8, 1), x, outer, np.int32(P // int(inner)), inner,
               R, nRB, s1, s2)


def dy_sums_rows_vec4(grid, block, dy, x, outer, inner, P4, TC, R, nRB, mean, pa, pb):
    _rows_vec4_check(grid, block, int(P4), int(TC))
    P = 4 * int(P4)
    dy_sums_rows(grid, block, dy, x, outer, np.int32(P // int(inner)), inner, R, nRB, mean, pa, pb)


def _rows_walk_check(grid, outer, R):
    # R > 0: block y walks rows [y R, (y + 1) R): the grid must cover the rows
    # exactly as the reduction's tiles do
    if int(R):
        _expect(grid[1] == -(-int(outer) // int(R)), "rows_vec4 walk: grid.y * R must cover outer")


def apply_rows_vec4(grid, block, x, y, outer, P4, inner, TC, R, mean, scale, shift):
    _rows_vec4_check(grid, block, int(P4), int(TC))
    _rows_walk_check(grid, outer, R)
    P = 4 * int(P4)
    apply_rows((-(-P // 32), 1, 1), (32, 8, 1), x, y, outer, P, inner, mean, scale, shift)


def dx_rows_vec4(grid, block, dy, x, dx, outer, P4, inner, TC, R, mean, g, a, k):
    _rows_vec4_check(grid, block, int(P4), int(TC))
    _rows_walk_check(grid, outer, R)
    dx_rows(grid, block, dy, x, dx, outer, 4 * int(P4), inner, mean, g, a, k)


E["bn_stats_rows_vec4"] = stats_rows_vec4
E["bn_dy_sums_rows_vec4"] = dy_sums_rows_vec4
E["bn_apply_rows_vec4"] = apply_rows_vec4
E["bn_dx_rows_vec4"] = dx_rows_vec4


# ---- the cooperative rows kernels: the three tile kernels' work in one launch

def _coop_parts(grid, block, P4, TC, nRB, C, work, bar, nconst):
    _expect(RawModule.cooperative, "a cooperative kernel launched without cuLaunchCooperativeKernel")
    _expect(block == (256, 1, 1) and grid[1:] == (1, 1), f"rows_coop launch {grid} {block}")
    ntile = -(-int(P4) // int(TC))
    _expect(1 <= grid[0] <= ntile * int(nRB), f"rows_coop grid {grid} for {ntile * int(nRB)} tiles")
    word = _a(bar)
    _expect(word.dtype == np.uint32 and word.size == 1 and int(word[0]) & 0x7FFFFFFF == 0,
            "rows_coop barrier word: low 31 bits must be zero between launches")
    npart = 4 * int(P4) * int(nRB)
    W = _a(work)
    _expect(W.size == 2 * npart + nconst * int(C), "rows_coop work size")
    return ntile, npart, W


def forward_rows_coop(grid, block, x, y, outer, inner, P4, TC, R, nRB, C, N, eps, w, b, rm, rv,
                      momentum, unbiased, mean, invstd, work, bar):
    ntile, npart, W = _coop_parts(grid, block, P4, TC, nRB, C, work, bar, 2)
    s1, s2 = W[:npart], W[npart:2 * npart]
    scale, shift = W[2 * npart:2 * npart + int(C)], W[2 * npart + int(C):]
    tiles = (ntile, int(nRB), 1)
    stats_rows_vec4(tiles, (256, 1, 1), x, outer, inner, P4, TC, R, nRB, s1, s2)
    finalize_train((int(C), 1, 1), (256, 1, 1), x, C, inner, outer, np.int32(int(inner) * int(nRB)),
                   s1, s2, N, eps, w, b, rm, rv, momentum, unbiased, mean, invstd, scale, shift)
    apply_rows_vec4(tiles, (256, 1, 1), x, y, outer, P4, inner, TC, R, mean, scale, shift)


def backward_rows_coop(grid, block, dy, x, dx, outer, inner, P4, TC, R, nRB, C, N, training,
                       mean, invstd, w, dweight, dbias, work, bar):
    ntile, npart, W = _coop_parts(grid, block, P4, TC, nRB, C, work, bar, 3)
    pa, pb = W[:npart], W[npart:2 * npart]
    C = int(C)
    g, a, k = W[2 * npart:2 * npart + C], W[2 * npart + C:2 * npart + 2 * C], W[2 * npart + 2 * C:]
    tiles = (ntile, int(nRB), 1)
    dy_sums_rows_vec4(tiles, (256, 1, 1), dy, x, outer, inner, P4, TC, R, nRB, mean, pa, pb)
    finalize_backward((C, 1, 1), (256, 1, 1), np.int32(C), np.int32(int(inner) * int(nRB)), pa, pb,
                      N, training, invstd, w, dweight, dbias, g, a, k)
    if training:
        dx_rows_vec4(tiles, (256, 1, 1), dy, x, dx, outer, P4, inner, TC, R, mean, g, a, k)
    else:                       # inference: dx = g dy, x not read (bn_dx_walk4)
        P = 4 * int(P4)
        DY = _f64(dy).reshape(int(outer), P)
        _store(dx, _a(g)[np.arange(P) // int(inner)] * DY)


E["bn_forward_rows_coop"] = forward_rows_coop
E["bn_backward_rows_coop"] = backward_rows_coop


def bench_spin(grid, block, ns):
    """scripts/bench_gpu.py's spin kernel: it only waits, which takes no time here."""
    _expect(int(ns) >= 0, "bench_spin: negative time")


E["bench_spin"] = bench_spin

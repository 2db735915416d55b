# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""Multi-tensor optimizer and clipping kernels for the CPU (one templated source).

A call gathers its lists of arrays (params, grads, optimizer state) into a
table of raw pointers, cuts every tensor into chunks of CHUNK elements and
runs one OpenMP loop over all chunks of all tensors: 200 small tensors cost
one parallel region, not 200. Updates are elementwise, computed in float64
and rounded once when stored, so results do not depend on the thread count.
Reductions (norms) keep one partial per chunk and combine them in chunk
order, with explicit summation lanes inside a chunk.

Parameter and state dtypes: float32 or float64 (the same for a whole call);
gradients: the parameters' dtype, or float16 with float32 parameters.

`gather` validates everything (lengths, dtypes, shapes, layouts, writability,
aliasing) before any kernel runs; the kernels themselves check nothing.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport INFINITY, fabs, fabsf, frexp, pow, sqrt
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, qsort
from libc.string cimport memcpy
from bncore._openmp_helpers cimport omp_get_thread_num

import numpy as np

from bncore._checks import READ_ONLY_HINT, viewable_in_place

try:                                 # NumPy 2
    from numpy.lib.array_utils import byte_bounds
except ImportError:                  # NumPy 1.x
    from numpy import byte_bounds

cnp.import_array()

cdef extern from "_half.h" nogil:
    double bncore_half_load(const uint16_t* p)
    void bncore_half_store(uint16_t* p, double v)
    void bncore_half_to_float_n(const uint16_t* src, float* dst, Py_ssize_t n)
    void bncore_half_to_double_n(const uint16_t* src, double* dst, Py_ssize_t n)
    void bncore_half_from_double_n(const double* src, uint16_t* dst, Py_ssize_t n)

ctypedef fused ptype:
    float
    double

ctypedef fused gtype:
    float
    double
    uint16_t          # IEEE binary16 gradients (with float32 parameters)

cdef enum:
    CHUNK = 16384        # elements per work item
    CLAMP_BLOCK = 64     # elements clip_grad_value tests before writing any
    LANES = 16           # summation lanes inside a chunk (norms)
    SMALL_WORK = 32768   # below this many elements, one thread
    GPIECE = 512         # float16 gradients: elements staged at a time (below)

# dtype codes
cdef enum:
    F16 = 0
    F32 = 1
    F64 = 2


cdef inline double gload(const gtype* g, Py_ssize_t i) noexcept nogil:
    if gtype is uint16_t:
        return bncore_half_load(&g[i])
    else:
        return <double>g[i]


cdef inline void gstore(gtype* g, Py_ssize_t i, double v) noexcept nogil:
    if gtype is uint16_t:
        bncore_half_store(&g[i], v)
    else:
        g[i] = <gtype>v


# float16 gradients are staged: a piece (or, for the norms, the chunk) is
# converted to float32 by _half.h's whole-run conversions (F16C's, where the
# build targets it; exact) and the float32-gradient kernels run on it. Their
# arithmetic is float64 on the same values as gload's, so the results are the
# same bits as reading each element through gload, whose bit-level
# conversion GCC vectorizes but which costs more than the update itself in
# the cheap kernels (grad_norm 0.44 -> 0.15 ns per element in cache). The
# updates are elementwise, so pieces change nothing; a norm's lanes run over
# the whole chunk, which is staged whole.


# --------------------------------------------------------------------------
# Gathering lists of arrays into a table of pointers

cdef int _code(cnp.ndarray a):
    cdef int t = cnp.PyArray_TYPE(a)
    if t == cnp.NPY_FLOAT32:
        return F32
    if t == cnp.NPY_FLOAT64:
        return F64
    if t == cnp.NPY_FLOAT16:
        return F16
    return -1


_DTYPE_NAMES = {F16: "float16", F32: "float32", F64: "float64"}


cdef class Table:
    """Validated operands of one multi-tensor call: pointers, sizes, chunks."""

    cdef public list arrays          # keeps every array alive while pointers are used
    cdef public bint foreign         # some operand came in as another kind of array (torch?)
    cdef readonly int nops
    cdef readonly Py_ssize_t ntensors, nchunks, total
    cdef readonly int pcode, gcode   # dtype codes of operand 0 and of the gradient operand
    cdef void** ptr                  # ptr[op * ntensors + t]
    cdef Py_ssize_t* chunk_t
    cdef Py_ssize_t* chunk_off
    cdef Py_ssize_t* chunk_len

    def __cinit__(self):
        self.ptr = NULL
        self.chunk_t = NULL
        self.chunk_off = NULL
        self.chunk_len = NULL

    def __dealloc__(self):
        free(self.ptr)
        free(self.chunk_t)
        free(self.chunk_off)
        free(self.chunk_len)


cdef inline Py_ssize_t _nbytes(cnp.ndarray a):
    return cnp.PyArray_SIZE(a) * cnp.PyArray_ITEMSIZE(a)


def gather(list lists, tuple names, tuple writes, int grad_op, as_array,
           bint half_first=False):
    """Validate lists of arrays and build the pointer table.

    lists[k] is a list of arrays (operand k, e.g. params, grads, exp_avgs),
    or None for an operand the call does not use (its pointers are NULL).
    Operand 0 sets the dtype of every operand except grad_op, which must have
    operand 0's dtype or float16 with float32 (half_first: operand 0 may be
    float16 itself, for gradient-only calls). writes[k] says whether the
    kernel writes operand k. `as_array(name, obj)` converts non-ndarrays
    (DLPack objects). Raises TypeError / ValueError naming the argument.
    """
    cdef int nops = len(lists), k, code, pcode = -1, gcode = -1
    cdef Py_ssize_t n = len(lists[0]), i, j, c, nchunks = 0, total = 0, size
    cdef cnp.ndarray a, ref
    cdef list arrays = []
    cdef list row
    cdef dict extents = {}       # (k, i) -> the caller's byte range, for inputs copied here
    cdef bint foreign = False
    for k in range(nops):
        if lists[k] is not None and len(lists[k]) != n:
            raise ValueError(f"{names[k]} has {len(lists[k])} entries but {names[0]} has {n}")
    for k in range(nops):
        row = []
        if lists[k] is None:
            arrays.append(None)
            continue
        for i in range(n):
            obj = lists[k][i]
            if type(obj) is not np.ndarray:
                foreign = True
                if writes[k] and not viewable_in_place(obj):
                    # np.asarray would make a temporary copy: the update would be lost
                    raise TypeError(f"{names[k]}[{i}] is updated in place, so it must be an "
                                    f"array (or a tensor shared through DLPack or the buffer "
                                    f"protocol), got {type(obj).__name__}")
                obj = as_array(f"{names[k]}[{i}]", obj)
            a = <cnp.ndarray>obj
            if not cnp.PyArray_ISNOTSWAPPED(a):
                # the kernels read native float32/float64/float16 bits (a '>f4' has
                # float32's type number, so _code alone would take it as one)
                native = (<object>a).dtype.newbyteorder("=")
                raise TypeError(f"{names[k]}[{i}] has dtype {(<object>a).dtype.str}, {native} in "
                                f"the opposite byte order; bncore reads native-endian arrays: "
                                f"pass {names[k]}[{i}].astype({native.name!r})")
            if not cnp.PyArray_ISALIGNED(a):
                # the kernels' typed loads and stores need aligned elements: an
                # input is read from an aligned copy (kept alive in the table),
                # an output cannot be (the update would go to the copy)
                if writes[k]:
                    raise ValueError(f"{names[k]}[{i}] is not aligned to its {a.itemsize}-byte "
                                     f"elements (np.frombuffer at an odd offset?); bncore "
                                     f"updates it in place, so pass an aligned array")
                # (the aliasing check below looks at the caller's memory, not the copy's)
                lo, hi = byte_bounds(a)
                extents[(k, i)] = (lo, hi)
                a = <cnp.ndarray>np.array(a, copy=True, order="K")
            code = _code(a)
            if k == 0 and i == 0:
                if code != F32 and code != F64 and not (half_first and code == F16):
                    raise TypeError(f"{names[0]}[0] must be float32 or float64"
                                    f"{' or float16' if half_first else ''}, got {(<object>a).dtype}")
                pcode = code
            if k == grad_op:
                if i == 0:
                    if code != pcode and not (code == F16 and pcode == F32):
                        raise TypeError(
                            f"{names[k]}[0] has dtype {(<object>a).dtype}; gradients must have the "
                            f"parameters' dtype ({_DTYPE_NAMES[pcode]}) or float16 with float32")
                    gcode = code
                elif code != gcode:
                    raise TypeError(f"{names[k]}[{i}] has dtype {(<object>a).dtype}, but {names[k]}[0] "
                                    f"has {_DTYPE_NAMES[gcode]}: one dtype per list")
            elif code != pcode:
                raise TypeError(f"{names[k]}[{i}] has dtype {(<object>a).dtype}, expected "
                                f"{_DTYPE_NAMES[pcode]} (as {names[0]}[0])")
            if k > 0:
                ref = <cnp.ndarray>arrays[0][i]
                if not _same_shape(a, ref):
                    raise ValueError(f"{names[k]}[{i}] has shape {(<object>a).shape}, but "
                                     f"{names[0]}[{i}] has shape {(<object>ref).shape}")
            if not _dense(a):
                if writes[k]:
                    # a contiguous copy would take the update, not the caller's array
                    raise ValueError(f"{names[k]}[{i}] is not contiguous: it does not fill one "
                                     f"block of memory (a strided view with gaps, or negative "
                                     f"strides); "
                                     f"bncore updates it in place, so pass the array itself "
                                     f"(any axis order: C, Fortran, channels-last)")
                raise ValueError(f"{names[k]}[{i}] is not contiguous: it does not fill one block "
                                 f"of memory (a strided view with gaps, or negative strides); pass "
                                 f"np.ascontiguousarray({names[k]}[{i}])")
            if k > 0 and cnp.PyArray_SIZE(a) > 1 and not _same_layout(a, <cnp.ndarray>arrays[0][i]):
                raise ValueError(f"{names[k]}[{i}] is stored in a different order (C, "
                                 f"Fortran, channels-last: strides {(<object>a).strides}) from "
                                 f"{names[0]}[{i}] (strides {(<object>arrays[0][i]).strides}): "
                                 f"the update pairs their elements in memory order")
            if writes[k] and not cnp.PyArray_ISWRITEABLE(a):
                raise ValueError(f"{names[k]}[{i}] is read-only; bncore updates it in place "
                                 f"({READ_ONLY_HINT})")
            row.append(a)
        arrays.append(row)
    _check_aliasing(arrays, names, writes, extents)

    cdef Table t = Table()
    t.arrays = arrays
    t.foreign = foreign
    t.nops = nops
    t.ntensors = n
    t.pcode = pcode
    t.gcode = gcode if grad_op >= 0 else pcode
    t.ptr = <void**>malloc(sizeof(void*) * (nops * n + 1))
    if t.ptr == NULL:
        raise MemoryError()
    for k in range(nops):
        row = arrays[k]
        for i in range(n):
            t.ptr[k * n + i] = NULL if row is None else cnp.PyArray_DATA(<cnp.ndarray>row[i])
    for i in range(n):
        size = cnp.PyArray_SIZE(<cnp.ndarray>arrays[0][i])
        total += size
        nchunks += (size + CHUNK - 1) // CHUNK
    t.total = total
    t.nchunks = nchunks
    t.chunk_t = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nchunks + 1))
    t.chunk_off = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nchunks + 1))
    t.chunk_len = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nchunks + 1))
    if t.chunk_t == NULL or t.chunk_off == NULL or t.chunk_len == NULL:
        raise MemoryError()
    c = 0
    for i in range(n):
        size = cnp.PyArray_SIZE(<cnp.ndarray>arrays[0][i])
        j = 0
        while j < size:
            t.chunk_t[c] = i
            t.chunk_off[c] = j
            t.chunk_len[c] = CHUNK if size - j > CHUNK else size - j
            j += CHUNK
            c += 1
    return t


cdef bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int d, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    for d in range(nd):
        if cnp.PyArray_DIMS(a)[d] != cnp.PyArray_DIMS(b)[d]:
            return False
    return True


cdef bint _dense(cnp.ndarray a):
    """Whether a's elements fill one block of memory that starts at its data
    pointer (positive strides, no gaps, no overlap), in any axis order: the
    kernels walk such an array as a flat run of elements (C, Fortran, torch's
    channels-last)."""
    if cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_IS_F_CONTIGUOUS(a):
        return True
    cdef int d, e, nd = cnp.PyArray_NDIM(a), m = 0
    cdef Py_ssize_t want = cnp.PyArray_ITEMSIZE(a), best
    cdef Py_ssize_t strides[64]
    cdef Py_ssize_t dims[64]
    for d in range(nd):
        if cnp.PyArray_DIMS(a)[d] == 0:
            return True
        if cnp.PyArray_DIMS(a)[d] > 1:
            if cnp.PyArray_STRIDES(a)[d] <= 0:
                return False
            strides[m] = cnp.PyArray_STRIDES(a)[d]
            dims[m] = cnp.PyArray_DIMS(a)[d]
            m += 1
    # the axes by increasing stride must each step over the ones before exactly
    for d in range(m):
        best = d
        for e in range(d + 1, m):
            if strides[e] < strides[best]:
                best = e
        strides[d], strides[best] = strides[best], strides[d]
        dims[d], dims[best] = dims[best], dims[d]
        if strides[d] != want:
            return False
        want *= dims[d]
    return True


cdef bint _same_layout(cnp.ndarray a, cnp.ndarray b):
    # the same element strides on every axis longer than 1 (dtypes may differ:
    # float16 gradients with float32 parameters): the flat memory orders agree
    cdef int d
    cdef Py_ssize_t ia = cnp.PyArray_ITEMSIZE(a), ib = cnp.PyArray_ITEMSIZE(b)
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] > 1 and (cnp.PyArray_STRIDES(a)[d] // ia
                                           != cnp.PyArray_STRIDES(b)[d] // ib):
            return False
    return True


cdef struct Span:
    Py_ssize_t start, end
    Py_ssize_t k, i


cdef int _span_order(const void* pa, const void* pb) noexcept nogil:
    # (start, end, k, i), lexicographic
    cdef const Span* a = <const Span*>pa
    cdef const Span* b = <const Span*>pb
    if a.start != b.start:
        return -1 if a.start < b.start else 1
    if a.end != b.end:
        return -1 if a.end < b.end else 1
    if a.k != b.k:
        return -1 if a.k < b.k else 1
    if a.i != b.i:
        return -1 if a.i < b.i else 1
    return 0


def _check_aliasing(list arrays, tuple names, tuple writes, dict extents=None):
    """No written array may overlap any other array of the call (the same
    array passed twice included): sort the byte ranges and sweep. The ranges
    live in a C array sorted by qsort (Python tuples and list.sort cost about
    0.15 us an array, 120 us for Adam over 200 tensors). extents: the byte
    range (lo, hi) of the caller's array where gather read a copy of it."""
    cdef Py_ssize_t k, i, n = 0, m = 0
    cdef cnp.ndarray a
    for k in range(len(arrays)):
        if arrays[k] is not None:
            n += len(arrays[k])
    cdef Span* spans = <Span*>malloc(sizeof(Span) * (n + 1))
    if spans == NULL:
        raise MemoryError()
    cdef bint* wr = <bint*>malloc(sizeof(bint) * (len(arrays) + 1))
    if wr == NULL:
        free(spans)
        raise MemoryError()
    cdef Py_ssize_t end_any = -1, end_w = -1, any_at = -1, w_at = -1, j
    cdef Py_ssize_t bad_a = -1, bad_b = -1
    try:
        for k in range(len(arrays)):
            wr[k] = bool(writes[k])
            if arrays[k] is None:
                continue
            for i in range(len(arrays[k])):
                a = <cnp.ndarray>arrays[k][i]
                if cnp.PyArray_SIZE(a) == 0:
                    continue
                if extents and (k, i) in extents:
                    spans[m].start, spans[m].end = extents[(k, i)]
                else:
                    spans[m].start = <Py_ssize_t>cnp.PyArray_DATA(a)
                    spans[m].end = spans[m].start + _nbytes(a)
                spans[m].k = k
                spans[m].i = i
                m += 1
        qsort(spans, m, sizeof(Span), _span_order)
        # track the furthest-reaching span seen so far of each kind
        for j in range(m):
            if w_at >= 0 and spans[j].start < end_w:
                bad_a, bad_b = w_at, j
                break
            if wr[spans[j].k] and any_at >= 0 and spans[j].start < end_any:
                bad_a, bad_b = any_at, j
                break
            if spans[j].end > end_any:
                end_any, any_at = spans[j].end, j
            if wr[spans[j].k] and spans[j].end > end_w:
                end_w, w_at = spans[j].end, j
        if bad_a >= 0:
            _alias_error(names, (spans[bad_a].start, spans[bad_a].end, spans[bad_a].k,
                                 spans[bad_a].i),
                         (spans[bad_b].start, spans[bad_b].end, spans[bad_b].k, spans[bad_b].i))
    finally:
        free(spans)
        free(wr)


def _alias_error(tuple names, a, b):
    raise ValueError(f"{names[a[2]]}[{a[3]}] and {names[b[2]]}[{b[3]}] share memory; "
                     f"every array of an in-place update must be distinct")


cdef inline int _threads(Table t, int nthreads):
    # no more threads than chunks: the others would only be created to idle
    if t.total < SMALL_WORK:
        return 1
    return <int>t.nchunks if t.nchunks < nthreads else nthreads


# --------------------------------------------------------------------------
# Hyperparameters, precomputed per call in float64

cdef struct Hyper:
    double lr            # learning rate (Adam: lr / bias_correction1, or Keras' alpha)
    double inv_scale     # 1 / grad_scale, times -1 when maximizing
    double wd            # L2 weight decay, added to the gradient ...
    bint l2              # ... where it is not 0 (_grad)
    double decay         # decoupled: p *= decay (1 - lr * wd), applied first
    double post          # ONNX norm_coefficient_post: p *= post after the Adam update
    # SGD: v = A v + B g;  p -= L (Na g + Nb v); without a buffer p -= lr (B0 g)
    double A, B, L, Na, Nb, B0
    bint read_buf        # the momentum buffer holds a previous value
    # Adam: vm = max(vmax, v * c_in); den = sqrt(vm * c_out + eps_root) + eps
    double beta1, beta2, eps, eps_root, c_in, c_out
    # RMSprop / Adagrad: den = sqrt(d + e_in) + e_out;  momentum: b = mu b + k u, p -= L b
    double alpha, e_in, e_out, mu, k
    bint has_momentum, centered
    bint nesterov        # SGD: p takes the gradient's term too (Na g); else p -= L v


cdef inline void _weight_decay(Hyper* h, double lr, double weight_decay,
                               bint decoupled) noexcept nogil:
    """wd, l2 and decay of h: L2 weight decay into the gradient, or decoupled
    (p *= 1 - lr * weight_decay first). Off, wd is -0.0 (see _grad)."""
    h.wd = 0.0 if decoupled else weight_decay
    h.l2 = h.wd != 0.0
    if not h.l2:
        h.wd = -0.0
    h.decay = 1.0 - lr * weight_decay if decoupled else 1.0


cdef inline double _grad(const gtype* g, Py_ssize_t i, double x, const Hyper* h) noexcept nogil:
    # the L2 term only where weight decay is on: 0 * x would turn an infinite
    # parameter's step into NaN (inf - lr g stays inf, as IEEE and torch say);
    # off, wd is -0.0 (_weight_decay) and the term -0.0, which keeps a -0
    # gradient -0 as torch and the GPU do (+0.0 made it +0, so p = -0 - lr * g
    # stayed -0 where theirs is +0)
    return gload(g, i) * h.inv_scale + h.wd * (x if h.l2 else 0.0)


# --------------------------------------------------------------------------
# SGD (with momentum, Nesterov, every style)

# Every chunk function is branch-free in its inner loop (the variants differ
# by coefficients, see Hyper), so the compiler vectorizes it; operands that a
# configuration does not use get their own loop rather than a branch.

cdef inline void _sgd_momentum(ptype* p, const gtype* g, ptype* b, Py_ssize_t n,
                               const Hyper* h, const bint nesterov) noexcept nogil:
    # one body for both updates, called with a constant `nesterov`, so that
    # each inlined copy has a branch-free loop (the note above); without
    # Nesterov no g term at all, not Na = 0: 0 * g is NaN for an infinite g,
    # where p -= L v takes the infinite v (as torch, Keras and ONNX do)
    cdef Py_ssize_t i
    cdef double x, gr, v
    for i in range(n):
        x = <double>p[i]
        gr = _grad(g, i, x, h)
        # an unread buffer starts at -0.0, so that v = A v + B g is B g exactly,
        # the sign of a zero included (torch's first buffer is a copy of g)
        v = <double>b[i] if h.read_buf else -0.0
        v = h.A * v + h.B * gr
        b[i] = <ptype>v
        p[i] = <ptype>(x * h.decay - h.L * ((h.Na * gr + h.Nb * v) if nesterov else v))


cdef inline void _sgd_chunk(ptype* p, const gtype* g, ptype* b, Py_ssize_t n,
                            const Hyper* h) noexcept nogil:
    cdef Py_ssize_t i
    cdef double x, gr
    if b == NULL:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            p[i] = <ptype>(x * h.decay - h.lr * (h.B0 * gr))
    elif h.nesterov:
        _sgd_momentum(p, g, b, n, h, True)
    else:
        _sgd_momentum(p, g, b, n, h, False)


cdef void _sgd_chunk_h(float* p, const uint16_t* g, float* b, Py_ssize_t n,
                       const Hyper* h) noexcept nogil:
    cdef float buf[GPIECE]
    cdef Py_ssize_t j = 0, k
    while j < n:
        k = n - j if n - j < GPIECE else GPIECE
        bncore_half_to_float_n(g + j, buf, k)
        _sgd_chunk(p + j, <const float*>buf, b + j if b != NULL else NULL, k, h)
        j += k


cdef void _sgd(Table t, const Hyper* h, int nt) noexcept nogil:
    cdef Py_ssize_t c, ti, off, n = t.ntensors
    cdef bint mom = h.has_momentum
    for c in prange(t.nchunks, schedule='static', num_threads=nt):
        ti = t.chunk_t[c]
        off = t.chunk_off[c]
        if t.pcode == F64:
            _sgd_chunk((<double*>t.ptr[ti]) + off, (<double*>t.ptr[n + ti]) + off,
                       (<double*>t.ptr[2 * n + ti]) + off if mom else NULL, t.chunk_len[c], h)
        elif t.gcode == F16:
            _sgd_chunk_h((<float*>t.ptr[ti]) + off, (<uint16_t*>t.ptr[n + ti]) + off,
                         (<float*>t.ptr[2 * n + ti]) + off if mom else NULL, t.chunk_len[c], h)
        else:
            _sgd_chunk((<float*>t.ptr[ti]) + off, (<float*>t.ptr[n + ti]) + off,
                       (<float*>t.ptr[2 * n + ti]) + off if mom else NULL, t.chunk_len[c], h)


def sgd(Table t, double lr, double momentum, double dampening, bint nesterov,
        double weight_decay, bint decoupled, bint maximize, bint first_step, int style,
        double inv_scale, int nthreads, bint use_buffers):
    """One SGD step over every tensor of t (params, grads[, momentum_buffers]).

    torch:  v = mu v + (1 - dampening) g (first step: v = g, buffer not read)
            p -= lr (g + mu v if nesterov else v)
    keras:  v = mu v + lr g;  p -= (mu v + lr g if nesterov else v)
    onnx:   v = alpha v + beta g (first step: beta = 1);  p -= lr (g + alpha v | v)
    use_buffers: t holds momentum_buffers (momentum > 0; onnx also with alpha = 0).
    Without them: p -= lr g (onnx: p -= lr (beta g), the buffer formula at alpha = 0)
    """
    cdef Hyper h
    h.lr = lr
    h.inv_scale = -inv_scale if maximize else inv_scale
    _weight_decay(&h, lr, weight_decay, decoupled)
    h.has_momentum = use_buffers
    h.nesterov = nesterov
    h.A = momentum
    h.Nb = momentum if nesterov else 1.0
    if style == 1:            # Keras: lr inside the buffer
        h.read_buf = not first_step
        h.B = lr
        h.L = 1.0
        h.Na = lr if nesterov else 0.0
    else:
        # torch: the first step copies g (buffer not read); ONNX reads the
        # buffer at T == 0 too but weights g by 1 instead of beta
        h.read_buf = (not first_step) or style == 2
        h.B = 1.0 if first_step else 1.0 - dampening
        h.L = lr
        h.Na = 1.0 if nesterov else 0.0
    # no buffer: p -= lr (Na g + Nb B g) at alpha = 0, i.e. lr B g (ONNX standard)
    # or lr g (ONNX Nesterov, torch, Keras)
    h.B0 = h.B if style == 2 and not nesterov else 1.0
    cdef int nt = _threads(t, nthreads)
    with nogil:
        _sgd(t, &h, nt)


# --------------------------------------------------------------------------
# Adam / AdamW / AMSGrad, in the torch, Keras ("hat"), optax and ONNX forms

cdef inline void _adam_chunk(ptype* p, const gtype* g, ptype* m, ptype* v, ptype* vmax,
                             Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef Py_ssize_t i
    cdef double x, gr, mm, vv, vm, a
    if vmax == NULL:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            mm = h.beta1 * <double>m[i] + (1.0 - h.beta1) * gr
            vv = h.beta2 * <double>v[i] + (1.0 - h.beta2) * gr * gr
            m[i] = <ptype>mm
            v[i] = <ptype>vv
            p[i] = <ptype>((x * h.decay - h.lr * mm / (sqrt(vv * h.c_out + h.eps_root) + h.eps))
                           * h.post)
        return
    for i in range(n):
        x = <double>p[i]
        gr = _grad(g, i, x, h)
        mm = h.beta1 * <double>m[i] + (1.0 - h.beta1) * gr
        vv = h.beta2 * <double>v[i] + (1.0 - h.beta2) * gr * gr
        m[i] = <ptype>mm
        v[i] = <ptype>vv
        # AMSGrad: the running max of v (torch, Keras: c_in = 1) or of the
        # bias-corrected v (optax: c_in = 1 / bc2)
        a = <double>vmax[i]
        vm = vv * h.c_in
        vm = vm if (vm > a or vm != vm) else a     # NaN-propagating, as torch.maximum
        vmax[i] = <ptype>vm
        p[i] = <ptype>((x * h.decay - h.lr * mm / (sqrt(vm * h.c_out + h.eps_root) + h.eps))
                       * h.post)


cdef void _adam_chunk_h(float* p, const uint16_t* g, float* m, float* v, float* vmax,
                        Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef float buf[GPIECE]
    cdef Py_ssize_t j = 0, k
    while j < n:
        k = n - j if n - j < GPIECE else GPIECE
        bncore_half_to_float_n(g + j, buf, k)
        _adam_chunk(p + j, <const float*>buf, m + j, v + j, vmax + j if vmax != NULL else NULL,
                    k, h)
        j += k


cdef void _adam(Table t, const Hyper* h, bint ams, int nt) noexcept nogil:
    cdef Py_ssize_t c, ti, off, n = t.ntensors
    for c in prange(t.nchunks, schedule='static', num_threads=nt):
        ti = t.chunk_t[c]
        off = t.chunk_off[c]
        if t.pcode == F64:
            _adam_chunk((<double*>t.ptr[ti]) + off, (<double*>t.ptr[n + ti]) + off,
                        (<double*>t.ptr[2 * n + ti]) + off, (<double*>t.ptr[3 * n + ti]) + off,
                        (<double*>t.ptr[4 * n + ti]) + off if ams else NULL,
                        t.chunk_len[c], h)
        elif t.gcode == F16:
            _adam_chunk_h((<float*>t.ptr[ti]) + off, (<uint16_t*>t.ptr[n + ti]) + off,
                        (<float*>t.ptr[2 * n + ti]) + off, (<float*>t.ptr[3 * n + ti]) + off,
                        (<float*>t.ptr[4 * n + ti]) + off if ams else NULL,
                        t.chunk_len[c], h)
        else:
            _adam_chunk((<float*>t.ptr[ti]) + off, (<float*>t.ptr[n + ti]) + off,
                        (<float*>t.ptr[2 * n + ti]) + off, (<float*>t.ptr[3 * n + ti]) + off,
                        (<float*>t.ptr[4 * n + ti]) + off if ams else NULL,
                        t.chunk_len[c], h)


def adam(Table t, Py_ssize_t bias_step, double lr, double beta1, double beta2, double eps,
         double weight_decay, bint decoupled, bint amsgrad, bint maximize, int eps_mode,
         bint amsgrad_corrected, double eps_root, double weight_decay_post,
         double inv_scale, int nthreads):
    """One Adam step over (params, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs]).

    bias_step: exponent t of the bias corrections 1 - beta^t (0: none).
    eps_mode: 0 eps after sqrt of the bias-corrected v (torch, optax),
    2 eps after sqrt of the raw v with sqrt(1 - beta2^t) in the step (Keras, ONNX).
    """
    cdef Hyper h
    cdef double bc1 = 1.0 - pow(beta1, <double>bias_step) if bias_step > 0 else 1.0
    cdef double bc2 = 1.0 - pow(beta2, <double>bias_step) if bias_step > 0 else 1.0
    h.inv_scale = -inv_scale if maximize else inv_scale
    _weight_decay(&h, lr, weight_decay, decoupled)
    h.post = 1.0 - weight_decay_post
    h.beta1 = beta1
    h.beta2 = beta2
    h.eps = eps
    h.eps_root = eps_root
    if eps_mode == 2:
        # Keras / ONNX: eps added to sqrt of the raw v; sqrt(bc2) in the step
        h.lr = lr * sqrt(bc2) / bc1
        h.c_in = 1.0
        h.c_out = 1.0
    elif amsgrad and amsgrad_corrected:
        h.lr = lr / bc1
        h.c_in = 1.0 / bc2
        h.c_out = 1.0
    else:
        h.lr = lr / bc1
        h.c_in = 1.0
        h.c_out = 1.0 / bc2
    cdef int nt = _threads(t, nthreads)
    with nogil:
        _adam(t, &h, amsgrad, nt)


# --------------------------------------------------------------------------
# RMSprop (centered, momentum; eps outside or inside the sqrt)

# One loop per (centered, momentum) configuration, as in _sgd_chunk: a test of
# ga or buf inside the loop kept GCC from vectorizing it (a scalar division per
# element, 3.8-4.0 ns in cache against 0.9-1.2 vectorized). The helpers hold
# the formulas once; each is inlined into every loop.

cdef inline double _rms_sq(ptype* sq, Py_ssize_t i, double gr, const Hyper* h) noexcept nogil:
    # sq = alpha sq + (1 - alpha) g^2, stored; returns the unrounded value
    cdef double s = h.alpha * <double>sq[i] + (1.0 - h.alpha) * gr * gr
    sq[i] = <ptype>s
    return s


cdef inline double _rms_centered(ptype* ga, Py_ssize_t i, double gr, double s,
                                 const Hyper* h) noexcept nogil:
    # centered: ga = alpha ga + (1 - alpha) g, stored; returns max(s - ga^2, 0).
    # Exactly, s >= ga^2 (an average of squares against the square of the same
    # average), but rounding can cross them: float32 s (stored) loses its bits
    # to underflow for |g| below about 1e-18 while ga does not, and at alpha = 0
    # the fused s - a*a is g^2 rounded minus g^2 exact, negative for about half
    # of all g. A negative d made sqrt NaN and the parameter NaN for good
    # (torch's float32 a*a underflows with s and stays >= 0 there). The test
    # keeps a NaN d NaN.
    cdef double a = h.alpha * <double>ga[i] + (1.0 - h.alpha) * gr
    cdef double d
    ga[i] = <ptype>a
    d = s - a * a
    return 0.0 if d < 0.0 else d


cdef inline double _rms_step(double gr, double s, const Hyper* h) noexcept nogil:
    return gr / (sqrt(s + h.e_in) + h.e_out)


cdef inline double _rms_momentum(ptype* buf, Py_ssize_t i, double u, const Hyper* h) noexcept nogil:
    # torch: b = mu b + u, p -= lr b;  Keras: b = mu b + lr u, p -= b
    cdef double b = h.mu * <double>buf[i] + h.k * u
    buf[i] = <ptype>b
    return b


cdef inline void _rmsprop_chunk(ptype* p, const gtype* g, ptype* sq, ptype* ga, ptype* buf,
                                Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef Py_ssize_t i
    cdef double x, gr, s, b
    if ga == NULL and buf == NULL:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            s = _rms_sq(sq, i, gr, h)
            p[i] = <ptype>(x * h.decay - h.lr * _rms_step(gr, s, h))
    elif ga == NULL:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            s = _rms_sq(sq, i, gr, h)
            b = _rms_momentum(buf, i, _rms_step(gr, s, h), h)
            p[i] = <ptype>(x * h.decay - h.L * b)
    elif buf == NULL:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            s = _rms_centered(ga, i, gr, _rms_sq(sq, i, gr, h), h)
            p[i] = <ptype>(x * h.decay - h.lr * _rms_step(gr, s, h))
    else:
        for i in range(n):
            x = <double>p[i]
            gr = _grad(g, i, x, h)
            s = _rms_centered(ga, i, gr, _rms_sq(sq, i, gr, h), h)
            b = _rms_momentum(buf, i, _rms_step(gr, s, h), h)
            p[i] = <ptype>(x * h.decay - h.L * b)


cdef void _rmsprop_chunk_h(float* p, const uint16_t* g, float* sq, float* ga, float* mb,
                           Py_ssize_t n, const Hyper* h) noexcept nogil:
    cdef float buf[GPIECE]
    cdef Py_ssize_t j = 0, k
    while j < n:
        k = n - j if n - j < GPIECE else GPIECE
        bncore_half_to_float_n(g + j, buf, k)
        _rmsprop_chunk(p + j, <const float*>buf, sq + j, ga + j if ga != NULL else NULL,
                       mb + j if mb != NULL else NULL, k, h)
        j += k


cdef void _rmsprop(Table t, const Hyper* h, int nt) noexcept nogil:
    cdef Py_ssize_t c, ti, off, n = t.ntensors
    # operands: params, grads, square_avgs, grad_avgs (centered), momentum_buffers
    for c in prange(t.nchunks, schedule='static', num_threads=nt):
        ti = t.chunk_t[c]
        off = t.chunk_off[c]
        if t.pcode == F64:
            _rmsprop_chunk((<double*>t.ptr[ti]) + off, (<double*>t.ptr[n + ti]) + off,
                           (<double*>t.ptr[2 * n + ti]) + off,
                           (<double*>t.ptr[3 * n + ti]) + off if h.centered else NULL,
                           (<double*>t.ptr[4 * n + ti]) + off if h.has_momentum else NULL,
                           t.chunk_len[c], h)
        elif t.gcode == F16:
            _rmsprop_chunk_h((<float*>t.ptr[ti]) + off, (<uint16_t*>t.ptr[n + ti]) + off,
                             (<float*>t.ptr[2 * n + ti]) + off,
                             (<float*>t.ptr[3 * n + ti]) + off if h.centered else NULL,
                             (<float*>t.ptr[4 * n + ti]) + off if h.has_momentum else NULL,
                             t.chunk_len[c], h)
        else:
            _rmsprop_chunk((<float*>t.ptr[ti]) + off, (<float*>t.ptr[n + ti]) + off,
                           (<float*>t.ptr[2 * n + ti]) + off,
                           (<float*>t.ptr[3 * n + ti]) + off if h.centered else NULL,
                           (<float*>t.ptr[4 * n + ti]) + off if h.has_momentum else NULL,
                           t.chunk_len[c], h)


def rmsprop(Table t, double lr, double alpha, double eps, double weight_decay, bint decoupled,
            double momentum, bint centered, bint maximize, bint eps_inside_sqrt, int style,
            double inv_scale, int nthreads):
    """One RMSprop step over (params, grads, square_avgs, grad_avgs, momentum_buffers);
    absent operands (not centered, no momentum) are passed as the params list
    and never touched."""
    cdef Hyper h
    h.lr = lr
    h.inv_scale = -inv_scale if maximize else inv_scale
    _weight_decay(&h, lr, weight_decay, decoupled)
    h.alpha = alpha
    h.e_in = eps if eps_inside_sqrt else 0.0
    h.e_out = 0.0 if eps_inside_sqrt else eps
    h.mu = momentum
    h.has_momentum = momentum != 0.0
    h.centered = centered
    h.k = lr if style == 1 else 1.0
    h.L = 1.0 if style == 1 else lr
    cdef int nt = _threads(t, nthreads)
    with nogil:
        _rmsprop(t, &h, nt)


# --------------------------------------------------------------------------
# Adagrad

cdef inline void _adagrad_chunk(ptype* p, const gtype* g, ptype* ss, Py_ssize_t n,
                                const Hyper* h) noexcept nogil:
    cdef Py_ssize_t i
    cdef double x, gr, s
    for i in range(n):
        x = <double>p[i]
        gr = _grad(g, i, x, h)
        s = <double>ss[i] + gr * gr
        ss[i] = <ptype>s
        p[i] = <ptype>(x * h.decay - h.lr * gr / (sqrt(s + h.e_in) + h.e_out))


cdef void _adagrad_chunk_h(float* p, const uint16_t* g, float* ss, Py_ssize_t n,
                           const Hyper* h) noexcept nogil:
    cdef float buf[GPIECE]
    cdef Py_ssize_t j = 0, k
    while j < n:
        k = n - j if n - j < GPIECE else GPIECE
        bncore_half_to_float_n(g + j, buf, k)
        _adagrad_chunk(p + j, <const float*>buf, ss + j, k, h)
        j += k


cdef void _adagrad(Table t, const Hyper* h, int nt) noexcept nogil:
    cdef Py_ssize_t c, ti, off, n = t.ntensors
    for c in prange(t.nchunks, schedule='static', num_threads=nt):
        ti = t.chunk_t[c]
        off = t.chunk_off[c]
        if t.pcode == F64:
            _adagrad_chunk((<double*>t.ptr[ti]) + off, (<double*>t.ptr[n + ti]) + off,
                           (<double*>t.ptr[2 * n + ti]) + off, t.chunk_len[c], h)
        elif t.gcode == F16:
            _adagrad_chunk_h((<float*>t.ptr[ti]) + off, (<uint16_t*>t.ptr[n + ti]) + off,
                             (<float*>t.ptr[2 * n + ti]) + off, t.chunk_len[c], h)
        else:
            _adagrad_chunk((<float*>t.ptr[ti]) + off, (<float*>t.ptr[n + ti]) + off,
                           (<float*>t.ptr[2 * n + ti]) + off, t.chunk_len[c], h)


def adagrad(Table t, double clr, double weight_decay, bint decoupled, bint maximize,
            double eps, bint eps_inside_sqrt, double inv_scale, int nthreads):
    """One Adagrad step over (params, grads, state_sums) with learning rate clr."""
    cdef Hyper h
    h.lr = clr
    h.inv_scale = -inv_scale if maximize else inv_scale
    _weight_decay(&h, clr, weight_decay, decoupled)
    h.e_in = eps if eps_inside_sqrt else 0.0
    h.e_out = 0.0 if eps_inside_sqrt else eps
    cdef int nt = _threads(t, nthreads)
    with nogil:
        _adagrad(t, &h, nt)


# --------------------------------------------------------------------------
# Gradient norms, scaling, clamping, the non-finite check (operand 0 = grads)

cdef enum:
    NORM_1 = 1
    NORM_2 = 2
    NORM_INF = 3
    NORM_P = 4


cdef inline double _nanmax(double acc, double a) noexcept nogil:
    # a NaN on either side wins (and then stays)
    return a if (a > acc or a != a) else acc


cdef inline bint _max_abs_f32(const float* g, Py_ssize_t n, double* out) noexcept nogil:
    """max |g| over float32 data, in float32 and 32 lanes: exact, since |.| and
    widening to float64 are exact and keep the order, and without a NaN the
    max does not depend on the order. False when a NaN is present (the caller
    then takes the NaN-propagating path)."""
    cdef float m[32]
    cdef float a
    cdef int k, nan = 0
    cdef Py_ssize_t i, nb = n - n % 32
    for k in range(32):
        m[k] = 0.0
    for i in range(0, nb, 32):
        for k in range(32):
            a = fabsf(g[i + k])
            nan |= a != a
            m[k] = a if a > m[k] else m[k]
    for i in range(nb, n):
        a = fabsf(g[i])
        nan |= a != a
        m[0] = a if a > m[0] else m[0]
    if nan:
        return False
    a = m[0]
    for k in range(1, 32):
        a = m[k] if m[k] > a else a
    out[0] = <double>a
    return True


cdef inline double _chunk_norm(const gtype* g, Py_ssize_t n, int kind, double p,
                               double scale, double inv) noexcept nogil:
    """Sum of |g / scale|^p over the chunk (the max of |g| for inf), 16 lanes.
    Squares and magnitudes multiply by inv = 1 / scale, scale a power of two,
    so g * inv is g / scale exactly (not a division the divide unit would
    serialize); the general p divides (pow costs far more), so that |g| /
    scale is exactly 1 where |g| = scale, as the p-norm rescue needs."""
    cdef double acc[LANES]
    cdef Py_ssize_t i, nb = n - n % LANES
    cdef int k
    cdef double a
    for k in range(LANES):
        acc[k] = 0.0
    if kind == NORM_2:
        for i in range(0, nb, 16):   # 16 == LANES
            for k in range(LANES):
                a = gload(g, i + k) * inv
                acc[k] += a * a
        for k in range(n - nb):
            a = gload(g, nb + k) * inv
            acc[k] += a * a
    elif kind == NORM_1:
        for i in range(0, nb, 16):
            for k in range(LANES):
                acc[k] += fabs(gload(g, i + k) * inv)
        for k in range(n - nb):
            acc[k] += fabs(gload(g, nb + k) * inv)
    elif kind == NORM_INF:
        if gtype is float:
            if _max_abs_f32(g, n, &a):
                return a
        # NaN-propagating max: a NaN gradient makes the norm NaN, as in torch
        for i in range(0, nb, 16):
            for k in range(LANES):
                acc[k] = _nanmax(acc[k], fabs(gload(g, i + k)))
        for k in range(n - nb):
            acc[k] = _nanmax(acc[k], fabs(gload(g, nb + k)))
        a = acc[0]
        for k in range(1, LANES):
            a = _nanmax(a, acc[k])
        return a
    else:
        for i in range(n):
            acc[i % LANES] += pow(fabs(gload(g, i)) / scale, p)
    for k in range(8):
        acc[k] = acc[k] + acc[k + 8]
    for k in range(4):
        acc[k] = acc[k] + acc[k + 4]
    return (acc[0] + acc[2]) + (acc[1] + acc[3])


cdef void _norm_partials(Table t, int kind, double p, double scale, double* part,
                         float* stage, int nt) noexcept nogil:
    # stage: CHUNK floats per thread (float16 gradients only)
    cdef Py_ssize_t c, ti, off
    cdef float* mine
    cdef double inv = 1.0 / scale
    for c in prange(t.nchunks, schedule='static', num_threads=nt):
        ti = t.chunk_t[c]
        off = t.chunk_off[c]
        if t.pcode == F64:
            part[c] = _chunk_norm((<double*>t.ptr[ti]) + off, t.chunk_len[c], kind, p, scale,
                                  inv)
        elif t.pcode == F16:
            mine = stage + omp_get_thread_num() * CHUNK
            bncore_half_to_float_n((<uint16_t*>t.ptr[ti]) + off, mine, t.chunk_len[c])
            part[c] = _chunk_norm(<const float*>mine, t.chunk_len[c], kind, p, scale, inv)
        else:
            part[c] = _chunk_norm((<float*>t.ptr[ti]) + off, t.chunk_len[c], kind, p, scale, inv)


def norm_sum(Table t, int kind, double p, double scale, int nthreads) -> float:
    """Sum over all elements of |g / scale|^p (kind NORM_1/2/P), or max |g| (NORM_INF);
    chunk partials combined in chunk order. scale is 1 but in the overflow and
    underflow rescues (clipping._power_sum): a power of two for NORM_1/2 (an
    exact multiply), any positive finite value for NORM_P (a division)."""
    cdef int e
    if kind == NORM_P:
        if not (scale > 0.0 and scale < INFINITY):
            raise ValueError(f"scale must be positive and finite, got {scale!r}")
    elif frexp(scale, &e) != 0.5:
        raise ValueError(f"scale must be a power of two, got {scale!r}")
    cdef double* part = <double*>malloc(sizeof(double) * (t.nchunks + 1))
    cdef double total = 0.0
    cdef Py_ssize_t c
    cdef int nt = _threads(t, nthreads)
    cdef float* stage = NULL
    if part == NULL:
        raise MemoryError()
    if t.pcode == F16:
        stage = <float*>malloc(sizeof(float) * CHUNK * nt)
        if stage == NULL:
            free(part)
            raise MemoryError()
    with nogil:
        _norm_partials(t, kind, p, scale, part, stage, nt)
        if kind == NORM_INF:
            for c in range(t.nchunks):
                total = _nanmax(total, part[c])
        else:
            for c in range(t.nchunks):
                total = total + part[c]
    free(part)
    free(stage)
    return total


cdef inline void _scale_chunk(gtype* g, Py_ssize_t n, double s) noexcept nogil:
    cdef Py_ssize_t i, j = 0, k
    cdef double buf[GPIECE]
    if gtype is uint16_t:
        # staged both ways (float64 pieces), each product rounded once
        while j < n:
            k = n - j if n - j < GPIECE else GPIECE
            bncore_half_to_double_n(g + j, buf, k)
            for i in range(k):
                buf[i] = buf[i] * s
            bncore_half_from_double_n(buf, g + j, k)
            j += k
    else:
        for i in range(n):
            gstore(g, i, gload(g, i) * s)


# float32 gradients compare in float32, against the bounds rounded as they
# are stored (glo, ghi): the only float32 value whose comparison that rounding
# can change is the rounded bound itself, which the clamp would store
# unchanged, so the result is the float64 comparison's, bit for bit, without
# a conversion per element. float16 and float64 gradients compare in float64.

cdef inline bint _any_outside(const gtype* g, Py_ssize_t n, double lo, double hi, float lo32,
                              float hi32) noexcept nogil:
    cdef Py_ssize_t i
    cdef int out = 0
    cdef double a
    if gtype is float:
        for i in range(n):
            out |= (g[i] < lo32) | (g[i] > hi32)
    else:
        for i in range(n):
            a = gload(g, i)
            out |= (a < lo) | (a > hi)
    return out != 0


cdef inline void _clamp_block(gtype* g, Py_ssize_t n, double lo, double hi, float lo32,
                              float hi32, gtype glo, gtype ghi) noexcept nogil:
    # selects, not branches, so it vectorizes; in-range values and NaN
    # (false both ways, kept as torch.clamp does) are stored back bit for bit,
    # lo wins over hi as the comparisons are applied last-first
    cdef Py_ssize_t i
    cdef double a
    cdef gtype v
    if gtype is float:
        for i in range(n):
            v = g[i]
            v = ghi if g[i] > hi32 else v
            v = glo if g[i] < lo32 else v
            g[i] = v
    else:
        for i in range(n):
            a = gload(g, i)
            v = g[i]
            v = ghi if a > hi else v
            v = glo if a < lo else v
            g[i] = v


cdef inline void _clamp_chunk(gtype* g, Py_ssize_t n, double lo, double hi) noexcept nogil:
    # blocks of CLAMP_BLOCK: a block with nothing to clamp is only read, so a
    # gradient already in range costs one read pass, not a read and a write
    cdef Py_ssize_t j = 0, m
    cdef gtype glo, ghi
    cdef float lo32 = <float>lo, hi32 = <float>hi
    gstore(&glo, 0, lo)           # the bounds rounded once, as a store would
    gstore(&ghi, 0, hi)
    while j < n:
        m = n - j if n - j < CLAMP_BLOCK else CLAMP_BLOCK
        if _any_outside(g + j, m, lo, hi, lo32, hi32):
            _clamp_block(g + j, m, lo, hi, lo32, hi32, glo, ghi)
        j += m


def scale(Table t, double s, int nthreads):
    """g *= s for every gradient (operand 0), rounded once."""
    cdef Py_ssize_t c, ti, off
    cdef int nt = _threads(t, nthreads)
    with nogil:
        for c in prange(t.nchunks, schedule='static', num_threads=nt):
            ti = t.chunk_t[c]
            off = t.chunk_off[c]
            if t.pcode == F64:
                _scale_chunk((<double*>t.ptr[ti]) + off, t.chunk_len[c], s)
            elif t.pcode == F16:
                _scale_chunk((<uint16_t*>t.ptr[ti]) + off, t.chunk_len[c], s)
            else:
                _scale_chunk((<float*>t.ptr[ti]) + off, t.chunk_len[c], s)


def clamp(Table t, double lo, double hi, int nthreads):
    """g = clamp(g, lo, hi) for every gradient (operand 0); NaN kept."""
    cdef Py_ssize_t c, ti, off
    cdef int nt = _threads(t, nthreads)
    with nogil:
        for c in prange(t.nchunks, schedule='static', num_threads=nt):
            ti = t.chunk_t[c]
            off = t.chunk_off[c]
            if t.pcode == F64:
                _clamp_chunk((<double*>t.ptr[ti]) + off, t.chunk_len[c], lo, hi)
            elif t.pcode == F16:
                _clamp_chunk((<uint16_t*>t.ptr[ti]) + off, t.chunk_len[c], lo, hi)
            else:
                _clamp_chunk((<float*>t.ptr[ti]) + off, t.chunk_len[c], lo, hi)


cdef inline int _chunk_nonfinite(const gtype* g, Py_ssize_t n) noexcept nogil:
    # Inf or NaN <=> every exponent bit set: an integer OR over the chunk,
    # which vectorizes (a float sum of g * 0 is one serial add chain). The bits
    # are read with memcpy, not through an integer pointer (strict aliasing);
    # GCC turns each memcpy into a plain load.
    cdef Py_ssize_t i
    cdef unsigned int bad = 0
    cdef uint32_t u32
    cdef uint64_t u64
    cdef uint16_t u16
    if gtype is float:
        for i in range(n):
            memcpy(&u32, &g[i], 4)
            bad |= (u32 & 0x7f800000u) == 0x7f800000u
    elif gtype is double:
        for i in range(n):
            memcpy(&u64, &g[i], 8)
            bad |= (u64 & 0x7ff0000000000000u) == 0x7ff0000000000000u
    else:
        for i in range(n):
            u16 = g[i]
            bad |= (u16 & 0x7c00u) == 0x7c00u
    return 1 if bad else 0


def nonfinite(Table t, int nthreads) -> bool:
    """True when any gradient (operand 0) holds an Inf or a NaN."""
    cdef Py_ssize_t c, ti, off
    cdef int found = 0, nt = _threads(t, nthreads)
    with nogil:
        for c in prange(t.nchunks, schedule='static', num_threads=nt):
            ti = t.chunk_t[c]
            off = t.chunk_off[c]
            if t.pcode == F64:
                found |= _chunk_nonfinite((<double*>t.ptr[ti]) + off, t.chunk_len[c])
            elif t.pcode == F16:
                found |= _chunk_nonfinite((<uint16_t*>t.ptr[ti]) + off, t.chunk_len[c])
            else:
                found |= _chunk_nonfinite((<float*>t.ptr[ti]) + off, t.chunk_len[c])
    return found != 0

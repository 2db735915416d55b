"""ndarray, array functions and RawModule of the emulated CuPy (see ../README.md)."""
import re
import weakref

import numpy as _np

float16, float32, float64, int32, int64 = (_np.float16, _np.float32, _np.float64, _np.int32,
                                           _np.int64)


class _Mem:
    """cupy.cuda.MemoryPointer: the address, and (.mem) the allocation it is in."""

    def __init__(self, ptr, mem):
        self.ptr = ptr
        self.mem = mem


class ndarray(_np.ndarray):  # noqa: N801 - CuPy's name
    """A NumPy array that says it lives on the (emulated) device."""

    @property
    def data(self):
        return _Mem(self.__array_interface__["data"][0], _allocation(self))

    def get(self):
        return _np.asarray(self).view(_np.ndarray).copy()


_allocations = {}      # id(an allocation's NumPy array) -> (weak reference to it, its memory)


def _allocation(a):
    """CuPy's .data.mem for `a`, one per emulated allocation: the chain of
    bases (NumPy views, as_strided's helper objects) ends at the allocation's
    NumPy array, whose memory is a PooledMemory; memory imported through
    DLPack ends past it, at the exporter's object, and the array the import
    made gets a DLPackMemory of its own, as every DLPack import does in CuPy.
    Entries go with their arrays (weak references), imports' included."""
    from .cuda import memory
    holder, owner = a, a
    while getattr(owner, "base", None) is not None:
        owner = owner.base
        if isinstance(owner, _np.ndarray):
            holder = owner
    entry = _allocations.get(id(holder))
    if entry is None or entry[0]() is not holder:
        kind = memory.PooledMemory if isinstance(owner, _np.ndarray) else memory.DLPackMemory
        entry = _allocations[id(holder)] = (weakref.ref(holder), kind())
        # (dropped when the array goes, before its id can be reused)
        weakref.finalize(holder, _allocations.pop, id(holder), None)
    return entry[1]


def _wrap(a):
    if isinstance(a, _np.ndarray) and not isinstance(a, ndarray):
        return a.view(ndarray)
    if isinstance(a, _np.generic):
        return a
    return a


def asarray(a, dtype=None):
    if isinstance(a, ndarray) and (dtype is None or a.dtype == dtype):
        return a
    return _wrap(_np.array(a, dtype=dtype, copy=True) if not isinstance(a, ndarray)
                 else _np.asarray(a, dtype=dtype))


def array(a, dtype=None, copy=True, order="K"):
    return _wrap(_np.array(a, dtype=dtype, copy=True, order=order))


def asnumpy(a):
    return _np.array(a).view(_np.ndarray)


def _garbage(a):
    """Fill a new 'uninitialized' array as device memory might be: NaN for
    floating dtypes, a byte pattern otherwise, so that code relying on fresh
    memory being zero fails here as it could on a GPU."""
    if a.dtype.kind in "fc":
        a.fill(_np.nan)
    else:
        a.view(_np.uint8)[...] = 0x5A
    return a


def empty(shape, dtype=float64, order="C"):
    return _wrap(_garbage(_np.empty(shape, dtype=dtype, order=order)))


def zeros(shape, dtype=float64):
    return _wrap(_np.zeros(shape, dtype=dtype))


def ones(shape, dtype=float64):
    return _wrap(_np.ones(shape, dtype=dtype))


def full(shape, v, dtype=None):
    return _wrap(_np.full(shape, v, dtype=dtype))


def empty_like(a, dtype=None):
    return _wrap(_garbage(_np.empty_like(a, dtype=dtype)))


def zeros_like(a, dtype=None):
    return _wrap(_np.zeros_like(a, dtype=dtype))


def ones_like(a, dtype=None):
    return _wrap(_np.ones_like(a, dtype=dtype))


def full_like(a, v, dtype=None):
    return _wrap(_np.full_like(a, v, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    return _wrap(_np.ascontiguousarray(a, dtype=dtype))


def copyto(dst, src, casting="same_kind"):
    _np.copyto(dst, src, casting=casting)


def from_dlpack(a):
    return _wrap(_np.from_dlpack(a))


def broadcast_to(a, shape):
    """A view with stride 0 along the broadcast axes (writeable, as CuPy's);
    shapes that do not broadcast raise, as in CuPy (NumPy's check)."""
    v = _np.broadcast_to(a, shape)
    return _wrap(_np.lib.stride_tricks.as_strided(a, v.shape, v.strides))


def concatenate(arrs, axis=0):
    return _wrap(_np.concatenate(arrs, axis=axis))


def sqrt(a):
    return _wrap(_np.sqrt(a))


def isfinite(a):
    return _wrap(_np.isfinite(a))


def where(cond, a, b):
    return _wrap(_np.where(cond, a, b))


def maximum(a, b):
    return _wrap(_np.maximum(a, b))


def flatnonzero(a):
    return _wrap(_np.flatnonzero(a))


def abs(a):  # noqa: A001 - CuPy's name
    return _wrap(_np.abs(a))


def exp(a):
    return _wrap(_np.exp(a))


def log(a):
    return _wrap(_np.log(a))


def arange(*args, **kw):
    return _wrap(_np.arange(*args, **kw))


def pad(a, pad_width, mode="constant", **kw):
    return _wrap(_np.pad(a, pad_width, mode=mode, **kw))


def get_array_module(*args):
    import cupy
    return cupy


# ---------------------------------------------------------------- RawModule

_PARAM_TYPES = {"float": _np.float32, "double": _np.float64, "unsigned short": _np.float16,
                "float4": _np.float32, "long long": _np.int64, "int": _np.int32,
                "unsigned long long": _np.uint64, "unsigned int": _np.uint32}


def _parse_kernels(code):
    """{name: (template parameter names, [(C type, is_pointer), ...])}."""
    out = {}
    pattern = re.compile(r"(template\s*<([^>]*)>\s*)?__global__\s+void\s+"
                         r"(?:(?:__cluster_dims__|__launch_bounds__)\s*\([^)]*\)\s*)?"
                         r"(\w+)\s*\(([^)]*)\)", re.S)
    for m in pattern.finditer(code):
        tparams = [p.split()[-1] for p in m.group(2).split(",")] if m.group(2) else []
        params = []
        for raw in m.group(4).split(","):
            raw = " ".join(raw.replace("__restrict__", "").replace("const", "").split())
            ptr = "*" in raw
            ctype = raw.replace("*", " ").split()
            ctype = " ".join(ctype[:-1])        # drop the parameter name
            params.append((ctype, ptr))
        out.setdefault(m.group(3), (tparams, params))
    return out


class RawKernel:
    def __init__(self, name, targs, sig, emulation):
        self.name = name
        self.targs = targs
        self.sig = sig
        self.emulation = emulation
        # CUDA's default cap on dynamic shared memory; a launch above it fails
        self._max_dynamic = 48 * 1024

    OPTIN_SMEM = 232448       # an H100's shared memory per block, opted in

    @property
    def max_dynamic_shared_size_bytes(self):
        return self._max_dynamic

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value):
        if value > self.OPTIN_SMEM:       # cuFuncSetAttribute: CUDA_ERROR_INVALID_VALUE
            raise RuntimeError(f"{self.name}: {value} bytes of dynamic shared memory "
                               f"exceed the device's {self.OPTIN_SMEM}")
        self._max_dynamic = value

    def _check(self, args):
        tparams, params = self.sig
        subst = dict(zip(tparams, self.targs))
        if len(args) != len(params):
            raise TypeError(f"{self.name}: {len(args)} arguments for {len(params)} parameters")
        for i, (a, (ctype, ptr)) in enumerate(zip(args, params)):
            ctype = subst.get(ctype, ctype)
            want = _PARAM_TYPES[ctype]
            if ptr:
                if isinstance(a, _np.uint64) and a == 0:
                    continue                              # NULL
                if not isinstance(a, ndarray):
                    raise TypeError(f"{self.name} argument {i}: a device array for "
                                    f"{ctype}*, got {type(a).__name__}")
                if a.dtype != want:
                    raise TypeError(f"{self.name} argument {i}: {ctype}* needs {want}, "
                                    f"got {a.dtype}")
                if not a.flags.c_contiguous:
                    raise TypeError(f"{self.name} argument {i} is not contiguous")
                if a.size and a.data.ptr % a.itemsize:
                    # a real device faults (CUDA_ERROR_MISALIGNED_ADDRESS)
                    raise RuntimeError(f"{self.name} argument {i}: misaligned address")
                if ctype == "float4" and a.data.ptr % 16:
                    raise TypeError(f"{self.name} argument {i}: float4 needs 16-byte alignment")
            else:
                if type(a) is not want:
                    raise TypeError(f"{self.name} argument {i}: {ctype} needs {want.__name__}, "
                                    f"got {type(a).__name__}")

    @property
    def kernel(self):
        """CuPy's Function object of the kernel (what a cooperative launch goes through)."""
        return _Function(self)

    def __call__(self, grid, block, args, **kw):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if (any(g < 1 for g in grid) or grid[0] > 2 ** 31 - 1 or grid[1] > 65535
                or grid[2] > 65535):
            raise ValueError(f"{self.name}: bad grid {grid}")
        if _np.prod(block) > 1024 or any(b < 1 for b in block):
            raise ValueError(f"{self.name}: bad block {block}")
        self._check(args)
        if kw.get("shared_mem", 0) > self.max_dynamic_shared_size_bytes:
            raise RuntimeError(f"{self.name}: {kw['shared_mem']} bytes of dynamic shared memory "
                               f"above the kernel's cap {self.max_dynamic_shared_size_bytes}")
        if self.emulation is None:
            raise NotImplementedError(f"no emulation for kernel {self.name}")
        RawModule.current_targs = self.targs     # the template arguments, for emulations
        RawModule.current_launch = dict(kw)      # shared_mem and the like, for emulations
        self.emulation(grid, block, *args)


class _Function:
    """cupy.cuda.function.Function: grid and block must be tuples (a Cython
    signature); a cooperative launch larger than what is resident at once
    fails as cuLaunchCooperativeKernel does."""
    ptr = 0x1000

    def __init__(self, raw):
        self.raw = raw

    def __call__(self, grid, block, args, shared_mem=0, stream=None,
                 enable_cooperative_groups=False):
        if not isinstance(grid, tuple) or not isinstance(block, tuple):
            raise TypeError("Function(): grid and block must be tuples")
        if enable_cooperative_groups:
            from .cuda import driver, runtime
            per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(
                self.ptr, int(_np.prod(block)), shared_mem)
            cap = per_sm * runtime.deviceGetAttribute(runtime.cudaDevAttrMultiProcessorCount, 0)
            if int(_np.prod(grid)) > cap:
                raise RuntimeError("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: "
                                   f"{int(_np.prod(grid))} blocks, {cap} resident")
        RawModule.cooperative = enable_cooperative_groups
        try:
            self.raw(grid, block, args, shared_mem=shared_mem)
        finally:
            RawModule.cooperative = False


def raw_kernel(code, name, options=(), **kw):
    """cupy.RawKernel(code, name): a kernel compiled from source by a script
    (scripts/bench_gpu.py's spin kernel), checked and emulated as the
    package's kernels are (its emulation registered under its name)."""
    sigs = _parse_kernels(code)
    if name not in sigs:
        raise ValueError(f"no kernel {name} in the source")
    return RawKernel(name, [], sigs[name], RawModule.emulations.get(name))


class RawModule:
    cooperative = False      # whether the launch in progress is cooperative
    emulations = {}          # kernel name -> emulation(grid, block, *args)
    current_targs = []
    current_launch = {}

    def __init__(self, code=None, options=(), name_expressions=()):
        if not code.startswith("#line"):
            raise ValueError("sources should start with a #line directive")
        self.sigs = _parse_kernels(code)
        self.names = tuple(name_expressions)

    def get_function(self, name):
        if name not in self.names:
            raise ValueError(f"{name} was not in name_expressions")
        base, _, rest = name.partition("<")
        targs = [t.strip() for t in rest.rstrip(">").split(",")] if rest else []
        if base not in self.sigs:
            raise ValueError(f"no kernel {base} in the module")
        return RawKernel(name, targs, self.sigs[base], self.emulations.get(base))

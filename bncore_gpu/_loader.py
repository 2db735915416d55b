"""Loading the .cu kernel files through CuPy's RawModule (NVRTC).

One RawModule per .cu file and device, compiled on first use and memoized;
templates are instantiated through ``name_expressions``. Each source gets a
``#line`` directive so a compile error names the file and line. Kernels are
launched with every scalar wrapped in an explicit NumPy dtype (see
``bncore_gpu`` callers), so the bytes CuPy packs match the C parameter types.
"""
from __future__ import annotations

import functools
import os
import re
import threading
from typing import Dict, Sequence, Tuple

import cupy

_DIR = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_modules: Dict[Tuple[int, str], "cupy.RawModule"] = {}
_functions: Dict[Tuple[int, str, str], "cupy.RawKernel"] = {}
OPTIONS = ("-std=c++17",)


_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.M)


def _read(filename: str) -> str:
    with open(os.path.join(_DIR, filename), encoding="utf-8") as fh:
        return fh.read()


@functools.lru_cache(maxsize=None)
def source(filename: str) -> str:
    """The file's text, prefixed with a #line directive pointing at it, with
    each `#include "X"` of a file of this package pasted in place (between
    #line directives): NVRTC then needs no include path, and CuPy's cache,
    keyed by the source text, sees the included file too."""
    path = os.path.join(_DIR, filename)
    text = _read(filename)

    def paste(m):
        after = text.count("\n", 0, m.end()) + 2       # the line after the #include
        return (f'#line 1 "{os.path.join(_DIR, m.group(1))}"\n{_read(m.group(1))}\n'
                f'#line {after} "{path}"')

    return f'#line 1 "{path}"\n' + _INCLUDE.sub(paste, text)


def module(filename: str, names: Sequence[str]) -> "cupy.RawModule":
    """The compiled module of `filename` on the current device."""
    key = (cupy.cuda.runtime.getDevice(), filename)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cupy.RawModule(code=source(filename), options=OPTIONS,
                                     name_expressions=tuple(names))
                _modules[key] = mod
    return mod


def kernel(filename: str, names: Sequence[str], name: str) -> "cupy.RawKernel":
    """Kernel `name` (a plain or templated name listed in `names`)."""
    dev = cupy.cuda.runtime.getDevice()
    key = (dev, filename, name)
    fn = _functions.get(key)
    if fn is None:
        fn = module(filename, names).get_function(name)
        _functions[key] = fn
    return fn


_sms: Dict[int, int] = {}


def sm_count() -> int:
    """Streaming multiprocessors of the current device (for grid sizes that
    never change a result); read once per device (the attribute query is slow)."""
    dev = cupy.cuda.runtime.getDevice()
    n = _sms.get(dev)
    if n is None:
        n = _sms[dev] = int(cupy.cuda.runtime.deviceGetAttribute(
            cupy.cuda.runtime.cudaDevAttrMultiProcessorCount, dev))
    return n

"""Every kernel bncore_gpu launches compiles, template arguments included.

Each .cu file ends with explicit instantiations of its templates, so that
`nvcc --ptx` of the file (what `.ci/run` does) compiles every kernel body;
here, every name the package asks its RawModule for (the name lists of
bncore_gpu, read with the emulated CuPy) must be among them, and the file
must compile with nvcc for sm_90 as on an H100 (skipped without nvcc) and
with NVRTC exactly as CuPy will compile it (below).
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NVCC = shutil.which("nvcc")


@functools.lru_cache(maxsize=None)
def modules():
    """{.cu file: {"names": kernel names, "source": the text _loader hands to
    CuPy, "options": its compile options}}, from bncore_gpu itself."""
    code = textwrap.dedent("""
        import json
        from bncore_gpu import _loader, batch_norm as b, optimizers as o
        names = {b.FILE: b.NAMES, b.CLUSTER_FILE: b.CLUSTER_NAMES, o.FILE: o.NAMES}
        print(json.dumps({f: {"names": n, "source": _loader.source(f),
                              "options": list(_loader.OPTIONS)} for f, n in names.items()}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(HERE, "gpu_emulator"), ROOT]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_file_has_its_names():
    mods = modules()
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "bncore_gpu")) if f.endswith(".cu"))
    assert sorted(mods) == files
    assert all(m["names"] for m in mods.values())


@pytest.mark.parametrize("cu", sorted(modules()))
def test_every_launched_template_is_instantiated_in_its_file(cu):
    with open(os.path.join(ROOT, "bncore_gpu", cu), encoding="utf-8") as fh:
        text = fh.read()
    for name in modules()[cu]["names"]:
        if "<" in name:
            assert f"template __global__ void {name}(" in text, f"{name} not instantiated in {cu}"


def test_every_included_file_is_installed():
    """_loader pastes each `#include "X"` from the installed package: X must
    be in the package data of pyproject.toml, or an installed bncore_gpu fails
    at its first kernel launch."""
    import fnmatch
    try:
        import tomllib
    except ImportError:           # Python < 3.11
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib "
                                      "(Python 3.11+) or tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        patterns = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["bncore_gpu"]
    d = os.path.join(ROOT, "bncore_gpu")
    for cu in modules():
        with open(os.path.join(d, cu), encoding="utf-8") as fh:
            for inc in re.findall(r'^#include "([\w.]+)"', fh.read(), re.M):
                assert os.path.exists(os.path.join(d, inc))
                assert any(fnmatch.fnmatch(inc, pat) for pat in patterns), inc
        assert any(fnmatch.fnmatch(cu, pat) for pat in patterns), cu


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA compile check")
@pytest.mark.parametrize("cu", sorted(modules()))
def test_every_file_compiles_with_nvcc(cu, tmp_path):
    ptx = tmp_path / "out.ptx"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "--ptx",
                           os.path.join(ROOT, "bncore_gpu", cu), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx.read_text(), re.M)
    names = modules()[cu]["names"]
    for base in {n.partition("<")[0] for n in names}:
        assert any(base in e for e in entries), f"{base} not in the PTX"
    assert len(entries) >= len(names)


# CuPy appends -ftz=true to every RawModule's options (after the caller's: it
# cannot be overridden), and under it a plain float <-> double cast compiles to
# cvt.ftz: a subnormal float32 was read as 0 and a result below 2^-126 stored
# as 0, on the GPU only (found by review; grad_norm of float32 gradients of
# 1e-40 was 0). The kernels convert through _common.cuh's f2d / d2f (PTX
# without .ftz); here no conversion of any kernel flushes.
@pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA compile check")
@pytest.mark.parametrize("cu", sorted(modules()))
def test_no_conversion_flushes_subnormals_under_cupys_ftz(cu, tmp_path):
    ptx = tmp_path / "out.ptx"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "--ptx", "-ftz=true",
                           os.path.join(ROOT, "bncore_gpu", cu), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = ptx.read_text()
    flushing = sorted(set(re.findall(r"\bcvt(?:\.\w+)*\.ftz(?:\.\w+)*", text)))
    assert not flushing, f"{cu}: {flushing}"
    assert "cvt.f64.f32" in text or "f32" not in text      # the IEEE form is there


# ---------------------------------------------------------------- NVRTC
#
# CuPy compiles the same sources with NVRTC at run time, which has no host
# headers and its own front end: a kernel that nvcc accepts may still fail
# there. Where libnvrtc can be loaded (CI installs the nvidia-cuda-nvrtc
# wheel), each module is compiled exactly as bncore_gpu/_loader.py asks
# CuPy to: _loader.source() (the #line-prefixed text with _common.cuh pasted
# in), its options, every name expression.

def _find_nvrtc():
    import ctypes
    import ctypes.util
    import glob
    candidates = []
    try:
        import nvidia
        for d in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(d, "cu*", "lib", "libnvrtc.so*")))
            candidates += sorted(glob.glob(os.path.join(d, "cuda_nvrtc", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    name = ctypes.util.find_library("nvrtc")
    if name:
        candidates.append(name)
    for path in candidates:
        if "builtins" in path or ".alt." in path:
            continue
        try:
            # libnvrtc dlopens its builtins library by name: load it first
            for b in sorted(glob.glob(os.path.join(os.path.dirname(path),
                                                   "libnvrtc-builtins.so*"))):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


NVRTC = _find_nvrtc()


def nvrtc_compile(source: str, name: str, names, options):
    """(ok, log, {name expression: lowered name})."""
    import ctypes
    lib = NVRTC
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    try:
        for n in names:
            assert lib.nvrtcAddNameExpression(prog, n.encode()) == 0
        opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
        rc = lib.nvrtcCompileProgram(prog, len(options), opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        lowered = {}
        if rc == 0:
            for n in names:
                out = ctypes.c_char_p()
                assert lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)) == 0
                lowered[n] = out.value.decode()
        return rc == 0, log.value.decode(errors="replace"), lowered
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


# CI sets BNCORE_REQUIRE_NVRTC=1 after installing the wheel: a missing
# libnvrtc then fails instead of skipping
_NO_NVRTC = NVRTC is None and os.environ.get("BNCORE_REQUIRE_NVRTC") != "1"


def test_nvrtc_found_where_required():
    if os.environ.get("BNCORE_REQUIRE_NVRTC") == "1":
        assert NVRTC is not None, "BNCORE_REQUIRE_NVRTC=1 but libnvrtc could not be loaded"
    else:
        pytest.skip("BNCORE_REQUIRE_NVRTC not set")


@pytest.mark.skipif(_NO_NVRTC, reason="libnvrtc not found (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("cu", sorted(modules()))
def test_every_module_compiles_with_nvrtc_as_cupy_would(cu):
    mod = modules()[cu]
    names = mod["names"]
    # CuPy appends -ftz=true last (cupy.cuda.compiler._compile_with_cache_cuda)
    ok, log, lowered = nvrtc_compile(mod["source"], cu, names,
                                     mod["options"] + ["-arch=compute_90", "-ftz=true"])
    assert ok, log[-4000:]
    assert set(lowered) == set(names) and all(lowered.values())

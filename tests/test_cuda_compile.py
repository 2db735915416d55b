"""Every kernel bncore_gpu launches compiles, template arguments included.

`.ci/run` compiles each .cu file with `nvcc --ptx`, but a template kernel is
only parsed there, never instantiated, so an error in a template body (most
of the kernels) would first show on a GPU machine, at NVRTC time. Here each
file is compiled together with an instantiation of every name the package
asks its RawModule for (the name lists of bncore_gpu, read with the emulated
CuPy), for sm_90 as on an H100. Skipped without nvcc.
"""
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

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found: no CUDA compile check")


def kernel_names():
    """{.cu file: kernel names} as bncore_gpu's modules list them."""
    code = textwrap.dedent("""
        import json
        from bncore_gpu import batch_norm as b, optimizers as o
        print(json.dumps({b.FILE: b.NAMES, b.CLUSTER_FILE: b.CLUSTER_NAMES, o.FILE: o.NAMES}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(HERE, "gpu_emulator"), ROOT]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_every_file_has_its_names():
    names = kernel_names()
    files = sorted(f for f in os.listdir(os.path.join(ROOT, "bncore_gpu")) if f.endswith(".cu"))
    assert sorted(names) == files
    assert all(names.values())


@pytest.mark.parametrize("cu", sorted(kernel_names()))
def test_every_instantiated_kernel_compiles(cu, tmp_path):
    names = kernel_names()[cu]
    src = tmp_path / "instances.cu"
    # naming a specialization in host code instantiates its device code
    src.write_text(f'#include "{os.path.join(ROOT, "bncore_gpu", cu)}"\n'
                   "void* bncore_instances[] = {\n"
                   + "".join(f"    (void*)&{n},\n" for n in names) + "};\n")
    ptx = tmp_path / "instances.ptx"
    proc = subprocess.run([NVCC, "-std=c++17", "-arch=sm_90", "--ptx", str(src), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = re.findall(r"^\.visible \.entry (\w+)\(", ptx.read_text(), re.M)
    bases = {n.partition("<")[0] for n in names}
    for base in bases:
        assert any(base in e for e in entries), f"{base} not in the PTX"
    assert len(entries) >= len(names)


# ---------------------------------------------------------------- NVRTC
#
# CuPy compiles the same sources with NVRTC at run time, which has no host
# headers and its own front end: a kernel that nvcc accepts may still fail
# there. Where libnvrtc can be loaded (CI installs the nvidia-cuda-nvrtc
# wheel), each module is compiled exactly as bncore_gpu/_loader.py asks
# CuPy to: the #line-prefixed source, -std=c++17, every name expression.

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
@pytest.mark.parametrize("cu", sorted(kernel_names()))
def test_every_module_compiles_with_nvrtc_as_cupy_would(cu):
    names = kernel_names()[cu]
    path = os.path.join(ROOT, "bncore_gpu", cu)
    with open(path, encoding="utf-8") as fh:
        source = f'#line 1 "{path}"\n' + fh.read()      # as _loader.source()
    ok, log, lowered = nvrtc_compile(source, cu, names, ["-std=c++17", "-arch=compute_90"])
    assert ok, log[-4000:]
    assert set(lowered) == set(names) and all(lowered.values())

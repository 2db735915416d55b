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


@pytest.mark.parametrize("cu", sorted(kernel_names()) if NVCC else [])
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

"""Importing bncore_gpu without CuPy or without a device fails loudly and
clearly; it never falls back to NumPy. (Runs everywhere, GPU or not.)"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_without_cupy_import_error_names_cupy():
    proc = run("""
        import sys
        sys.modules["cupy"] = None          # as if CuPy were not installed
        try:
            import bncore_gpu
        except ImportError as exc:
            assert "CuPy" in str(exc) and "bncore" in str(exc), exc
            print("ok")
        else:
            raise SystemExit("imported without CuPy")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr


def test_without_device_runtime_error():
    proc = run("""
        import sys, types
        fake = types.ModuleType("cupy")
        class _Runtime:
            @staticmethod
            def getDeviceCount():
                raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        fake.cuda = types.SimpleNamespace(runtime=_Runtime())
        sys.modules["cupy"] = fake
        try:
            import bncore_gpu
        except RuntimeError as exc:
            assert "no usable CUDA device" in str(exc), exc
            print("ok")
        else:
            raise SystemExit("imported without a device")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr

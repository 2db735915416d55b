"""bncore_gpu's host code on the emulated device: every registry spec with a
GPU twin, GPU against the float64 oracle and against the CPU engine."""
import _setup  # noqa: F401,I001  (the emulated cupy, before anything imports cupy)
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bncore.testing import registry

CPU = registry.cpu_backend()
GPU = registry.gpu_backend()
SPECS = [s for s in registry.REGISTRY.values() if s.gpu]


def params_strategy(space):
    items = {}
    for key, dom in space.items():
        items[key] = (st.integers(dom.start, dom.stop - 1) if isinstance(dom, range)
                      else st.sampled_from(list(dom)))
    return st.fixed_dictionaries(items)


def test_the_backend_is_emulated():
    import cupy
    assert GPU is not None and cupy.EMULATED


@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=st.data())
def test_emulated_gpu_matches_oracle_and_cpu(spec, data):
    # @given on the parametrized test: Hypothesis keys its database per spec
    case = spec.make_case(data.draw(params_strategy(spec.space), label="params"))
    for key, (err, tol) in registry.errors_against_oracle(spec, GPU, case).items():
        assert err <= tol, f"{spec.name}.{key}: {err:.3e} > {tol:.1e} for {case.describe()}"
    cpu = spec.call(CPU, case, None)
    gpu = spec.call(GPU, case, None)
    for key, (err, tol) in registry.errors_between_backends(spec, case, cpu, gpu).items():
        assert err <= tol, f"{spec.name}.{key} GPU vs CPU {err:.3e}"


def test_host_arrays_are_refused():
    import bncore_gpu
    with pytest.raises(TypeError, match="host array"):
        bncore_gpu.batch_norm_forward(np.ones((4, 3), np.float32))


class _TensorRequiringGrad:
    """Behaves like a torch CUDA tensor with requires_grad=True: its CUDA
    array interface raises instead of being absent."""

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires "
                           "grad. If gradients aren't required, use var.detach() to get "
                           "Variable that doesn't require gradient.")


def test_tensor_requiring_grad_is_refused_with_the_fix():
    import bncore_gpu
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore_gpu.clip_grad_norm([_TensorRequiringGrad()], 1.0)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore_gpu.optim.SGD([_TensorRequiringGrad()], lr=0.1)
    with pytest.raises(TypeError, match=r"detach\(\)"):
        bncore_gpu.batch_norm_forward(_TensorRequiringGrad())


def test_gpu_host_profile_script_runs_end_to_end(monkeypatch, capsys):
    """scripts/gpu_host_profile.py (a step of scripts/gpu_check.sh, which only a
    device run reaches) on the emulated device: every part it times, the GPU-only
    rows (bench_gpu.gpu_only_us with its spin kernel and events) and the rows
    kernels' TARGET_BLOCKS sweep on the 2-D shape. The figures mean nothing here;
    that the script gets through, and names each row, is what a device run needs."""
    import os
    import sys
    scripts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts")
    monkeypatch.syspath_prepend(scripts)
    import bench_gpu
    import gpu_host_profile
    from bncore_gpu import batch_norm as gbn
    real = bench_gpu.gpu_only_us
    monkeypatch.setattr(gpu_host_profile, "gpu_only_us", lambda fn: real(fn, calls=2))
    monkeypatch.setattr(sys, "argv", ["gpu_host_profile.py", "--calls", "2", "--top", "2"])
    target = gbn.TARGET_BLOCKS
    assert gpu_host_profile.main() == 0
    assert gbn.TARGET_BLOCKS == target               # the sweep put it back
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    names = {tuple(c.strip() for c in line.strip("|").split("|")[:2]) for line in rows}
    for shape in ("(16,64,8,8)", "(256,1024)"):
        for part in ("forward (default path)", "backward (3-kernel path)",
                     "GPU only: forward (default path)", "GPU only: backward (3-kernel path)"):
            assert (shape, part) in names, (shape, part)
    # the sweep: each TARGET_BLOCKS that changes (256,1024)'s row blocks (one
    # column tile: 256 blocks of one row by default, so / 4 = 256 does not)
    swept = {p for s, p in names if s == "(256,1024)" and "TARGET_BLOCKS" in p}
    want = {f"GPU only: {kind} (default path), TARGET_BLOCKS {cap}"
            for cap in (target // 4, target // 16, target // 64) if 1 <= cap < min(target, 256)
            for kind in ("forward", "backward")}
    assert want and swept == want, swept
    # the planes shape takes the cluster kernels: no rows sweep there
    assert not any(s == "(16,64,8,8)" and "TARGET_BLOCKS" in p for s, p in names)
    assert all(float(line.strip("|").split("|")[2]) >= 0 for line in rows)


def test_the_emulated_multi_tensor_kernels_refuse_what_a_device_would_get_wrong(monkeypatch):
    """The emulations update whole tensors, where the CUDA kernels walk the
    chunk table with 256 threads a block and float4 loads when vec4 is set; a
    host bug in any of these would pass unseen (found in review). They now
    check the table's cover, the block size and vec4's alignment."""
    import cupy
    import emulations
    import bncore_gpu
    from bncore_gpu import _tables

    def adam(p):
        bncore_gpu.adam_step([p], [cupy.ones_like(p)], [cupy.zeros_like(p)],
                             [cupy.zeros_like(p)], step=1)
    adam(cupy.ones(40000, np.float32))                  # the real host code passes
    # a table whose chunks miss the last 7232 elements of a 40000-element tensor
    buf = np.zeros(40000, np.float32)
    table = np.array([buf.ctypes.data, 40000, 0, 0, 0, 16384], np.int64)
    with pytest.raises(AssertionError, match="covers tensor 0"):
        emulations._table(table, 1, 1, 2, [np.float32])
    table = np.array([buf.ctypes.data, 40000, 0, 0, 0, 16384, 0, 32768], np.int64)
    assert emulations._table(table, 1, 1, 3, [np.float32])[0][0][0].size == 40000
    with pytest.raises(AssertionError, match="launch"):
        emulations._mt_launch("mt_scale", (3, 1, 1), (128, 1, 1))
    # vec4 on a tensor 4 bytes past a 16-byte boundary
    monkeypatch.setattr(_tables.Table, "aligned16", lambda self, nops: True)
    with pytest.raises(AssertionError, match="unaligned"):
        adam(cupy.ones(20001, np.float32)[1:])

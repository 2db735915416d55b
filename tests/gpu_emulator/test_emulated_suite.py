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

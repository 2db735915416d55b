"""torch's side of arrays shared through DLPack (or the CUDA array interface).

DLPack shares a tensor's memory, not what torch keeps beside it: autograd's
version counter, the rule that an inference tensor is written only in
inference mode, and flags that change what the memory means (a lazy
negation; a ZeroTensor has none of its own). bncore and bncore_gpu honour
them here.
Nothing imports torch: a process without it pays nothing.
"""
from __future__ import annotations

import sys
from typing import Any

READ_ONLY_HINT = ("JAX arrays are immutable, and torch inference tensors may be written "
                  "only in inference mode: update NumPy arrays or torch tensors")


def refuse_misleading_export(name: str, a: Any) -> None:
    """Refuse torch tensors whose exported memory does not hold their values.

    A tensor whose negative bit is set: torch keeps a lazy negation
    (``z.conj().imag``, ``torch._neg_view``) as a flag over memory that holds
    the opposite values, and DLPack and the CUDA array interface export that
    memory without the flag, so every value would be read with the wrong sign
    (torch's own ``.numpy()`` refuses such tensors). A ZeroTensor: its export
    points at memory that is not its zeros."""
    is_neg = getattr(a, "is_neg", None)
    if callable(is_neg) and is_neg():
        raise TypeError(f"{name} is a torch tensor with its negative bit set (a lazy "
                        f"negation, such as z.conj().imag): its memory holds the opposite "
                        f"values; pass {name}.resolve_neg()")
    is_zero = getattr(a, "_is_zerotensor", None)
    if callable(is_zero) and is_zero():
        # torch's ZeroTensor: immutable zeros with no memory of their own, whose
        # DLPack export points at whatever lies there
        raise TypeError(f"{name} is a torch ZeroTensor (immutable zeros without memory "
                        f"of their own); pass torch.zeros_like({name}) or {name}.clone()")


def _torch_tensor_type():
    """torch.Tensor where torch is imported (none of its tensors exist otherwise)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "Tensor", None)


def is_torch_tensor(a: Any) -> bool:
    tensor = _torch_tensor_type()
    return tensor is not None and isinstance(a, tensor)


def inference_tensors_refused() -> bool:
    """Whether writes to torch inference tensors are refused now (torch
    imported and not in inference mode)."""
    torch = sys.modules.get("torch")
    return torch is not None and not torch.is_inference_mode_enabled()


def refuse_inference_writes(name: str, operand: Any) -> None:
    """Refuse torch inference tensors among arrays about to be written, outside
    inference mode (torch refuses such in-place updates). For backends whose
    arrays carry no read-only flag (CuPy); `operand`: a list or one object."""
    tensor = _torch_tensor_type()
    if tensor is None or not inference_tensors_refused():
        return
    seq = operand if isinstance(operand, (list, tuple)) else (operand,)
    if not any(issubclass(t, tensor) for t in set(map(type, seq))):
        return
    for i, a in enumerate(seq):
        if isinstance(a, tensor) and a.is_inference():
            where = f"{name}[{i}]" if seq is operand else name
            raise ValueError(f"{where} is read-only; bncore writes it in place ({READ_ONLY_HINT})")


def inference_outside_mode(a: Any) -> bool:
    """Whether `a` is a torch inference tensor and inference mode is off."""
    tensor = _torch_tensor_type()
    if tensor is None or not isinstance(a, tensor) or not a.is_inference():
        return False
    return not sys.modules["torch"].is_inference_mode_enabled()


def bump_versions(*operands: Any) -> None:
    """Tell torch's autograd that bncore wrote these tensors in place.

    DLPack shares memory, not autograd's version counter: a write through it
    left the counter as it was, so a backward that had saved the tensor (a
    parameter in a graph built before the optimizer step) used the new values
    silently, where torch's own in-place updates make it raise. Each operand is
    a list of arrays (or one array, or None); only torch tensors are touched,
    and a process without torch pays nothing."""
    tensor = _torch_tensor_type()
    if tensor is None:
        return
    for op in operands:
        seq = op if isinstance(op, (list, tuple)) else (op,)
        # the few distinct types of a list, at C speed (NumPy or CuPy arrays: none)
        if not any(issubclass(t, tensor) for t in set(map(type, seq))):
            continue
        for a in seq:
            if isinstance(a, tensor) and not a.is_inference():
                _increment_version(a)


def _increment_version(t: Any) -> None:
    torch = sys.modules["torch"]
    inc = getattr(getattr(torch.autograd, "graph", None), "increment_version", None)
    if inc is not None:
        inc(t)
    else:                                   # torch before 2.1
        torch._C._autograd._increment_version(t)

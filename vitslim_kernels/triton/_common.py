"""Host-side helpers shared by the Triton ops: buffer allocation and the interpreter/compiled checks."""
from __future__ import annotations

import torch
import triton.language as tl


def alloc(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every buffer a kernel writes comes from here (tests swap in a NaN-filled one to prove full coverage)."""
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)


def interpreted(kernel) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(kernel, InterpretedFunction)


def interpreter_agrees(kernel, module: str) -> bool:
    """Whether `kernel` is interpreted; ImportError if Triton's own library was imported the other way.

    Triton decides once, at import, whether @triton.jit gives interpreted or compiled functions
    (TRITON_INTERPRET): its library (tl.max, tl.cdiv, ...) and our kernels must agree, or the kernels fail deep
    inside Triton. Dispatch checks the same before loading a Triton op.
    """
    ours, triton_lib = interpreted(kernel), interpreted(tl.cdiv)
    if ours != triton_lib:
        raise ImportError(f"TRITON_INTERPRET changed between importing triton ({'=1' if triton_lib else 'unset'}) "
                          f"and {module} ({'=1' if ours else 'unset'}); set it before anything imports triton")
    return ours


def check_device(t: torch.Tensor, op: str, is_interpreted: bool) -> None:
    if t.device.type == "cpu" and not is_interpreted:
        raise RuntimeError(f"{op}: CPU tensors run the Triton kernels only in Triton's interpreter; "
                           "set TRITON_INTERPRET=1 before anything imports triton")

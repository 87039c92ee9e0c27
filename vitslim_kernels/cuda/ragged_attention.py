"""Launcher of the CUDA C++ ragged-attention forward (csrc/kernels/ragged_attention_fwd.cuh).

Forward only, for inference: there is no backward kernel, so it refuses inputs that need a gradient (dispatch
sends training to Triton). q, k, v: (B, N, sum(head_dims)), any strides (views of one (B, N, 3D) qkv
tensor are fine); output (B, N, D), contiguous.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _ext
from ..ops.ragged_attention import check_ragged_args

FORWARD_ONLY = "the CUDA kernel is forward-only; training uses triton"


def _alloc(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Every buffer the kernel writes comes from here (tests swap in a NaN-filled one to prove full coverage)."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float
         ) -> torch.Tensor:
    out = _alloc(q.shape, q)
    _ext.load().ragged_attention_fwd(q, k, v, out, [int(w) for w in head_dims], float(scale))
    return out


@torch.library.custom_op("vitslim::ragged_attention_fwd_cuda", mutates_args=())
def ragged_attention_fwd_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: list[int],
                              scale: float) -> torch.Tensor:
    """o (B, N, D), contiguous, like q. The op torch.compile and torch.export see."""
    return _fwd(q, k, v, head_dims, scale)


@ragged_attention_fwd_cuda.register_fake
def _(q, k, v, head_dims, scale):
    return q.new_empty(q.shape)


def _plain(*tensors: torch.Tensor) -> bool:
    """True in plain eager mode: real tensors, no tracing, no dispatch mode (fake, proxy, ...) active."""
    return (all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def ragged_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                          scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """CUDA implementation of vitslim_kernels.ragged_attention (forward only).
    q, k, v, output: (B, N, sum(head_dims))."""
    dims = check_ragged_args(q, k, v, head_dims)
    if dropout_p > 0.0:
        raise ValueError(f"ragged_attention: the CUDA implementation has no attention dropout, got "
                         f"dropout_p={dropout_p}; use dropout_p=0.0 or implementation='reference'")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(f"ragged_attention: {FORWARD_ONLY} (run under torch.no_grad() or "
                           f"torch.inference_mode(), or use implementation='triton')")
    if _plain(q, k, v):
        # Eager inference calls the extension directly: going through the custom op cost 70 us more per call
        # than the bare allocation (11 us) in a CPU-tensor micro-benchmark on the 2-core build machine, about
        # a whole bs-1 attention launch; the latency is what this kernel is for.
        return _fwd(q, k, v, dims, scale)
    return ragged_attention_fwd_cuda(q, k, v, list(dims), float(scale))

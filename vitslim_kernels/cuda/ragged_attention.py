"""Launcher of the CUDA C++ ragged-attention forward (csrc/kernels/ragged_attention_fwd.cuh).

Forward only, for inference: there is no backward kernel, so the launcher refuses inputs that need a gradient
(dispatch sends training to Triton); the custom op itself has a backward, the Triton one. q, k, v:
(B, N, sum(head_dims)), any strides (views of one (B, N, 3D) qkv tensor are fine); output (B, N, D), contiguous.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _ext
from ..dispatch import fail_safe
from ..ops.ragged_attention import check_ragged_args, ragged_attention_ref

FORWARD_ONLY = "the CUDA kernel is forward-only; training uses triton"


def _alloc(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Every buffer the kernel writes comes from here (tests swap in a NaN-filled one to prove full coverage)."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


@fail_safe("ragged_attention_fwd_cuda", ragged_attention_ref)
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


def _setup_context(ctx, inputs, output):
    q, k, v, head_dims, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.head_dims, ctx.scale = list(head_dims), scale


def _backward(ctx, do):
    """The Triton backward (the same math): the CUDA kernel keeps no logsumexp, so the Triton forward recomputes
    o and lse first. Both are differentiable ops, so this backward is differentiable again. Triton is imported
    here, not before: inference through this op never needs it."""
    from ..triton.ragged_attention import ragged_attention_bwd, ragged_attention_fwd
    q, k, v = ctx.saved_tensors
    o, lse = ragged_attention_fwd(q, k, v, ctx.head_dims, ctx.scale)
    dq, dk, dv = ragged_attention_bwd(do, q, k, v, o, lse, ctx.head_dims, ctx.scale)
    return dq, dk, dv, None, None


# The launcher below still refuses inputs that need a gradient (training belongs to the Triton path, which keeps
# lse instead of recomputing the forward); the op itself is differentiable, as torch.library expects.
ragged_attention_fwd_cuda.register_autograd(_backward, setup_context=_setup_context)


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

"""Ragged-width multi-head attention: every head has its own width (DESIGN.md section 5).

q, k, v are (B, N, sum(head_dims)) with the heads packed in order; head h occupies columns
[offset_h, offset_h + head_dims[h]). A zero-width head contributes nothing (its output slice is empty).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..dispatch import select


def check_ragged_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int]) -> tuple[int, ...]:
    """Validate the arguments of ragged_attention; returns head_dims as a tuple of ints."""
    dims = tuple(int(w) for w in head_dims)
    if any(w < 0 for w in dims):
        raise ValueError(f"head_dims must be non-negative, got {list(dims)}")
    if q.dim() != 3:
        raise ValueError(f"q must be (B, N, sum(head_dims)), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k and v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[-1] != sum(dims):
        raise ValueError(f"last dim of q is {q.shape[-1]} but sum(head_dims) = {sum(dims)} for {list(dims)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    return dims


def ragged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                         scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """The specification: one explicit softmax attention per head, in the input dtype
    (softmax in float32 for half types). q, k, v, output: (B, N, sum(head_dims))."""
    dims = check_ragged_args(q, k, v, head_dims)
    out = torch.empty_like(q)
    softmax_dtype = torch.float32 if q.element_size() < 4 else q.dtype  # fp16/bf16 softmax in fp32
    offset = 0
    for w in dims:
        if w > 0:
            cols = slice(offset, offset + w)
            scores = (q[..., cols] @ k[..., cols].transpose(-2, -1)) * scale            # (B, N, N)
            probs = scores.softmax(dim=-1, dtype=softmax_dtype).to(q.dtype)
            if dropout_p > 0.0:
                probs = F.dropout(probs, p=dropout_p)
            out[..., cols] = probs @ v[..., cols]
        offset += w
    return out


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                     scale: float, dropout_p: float = 0.0, *, implementation: str | None = None
                     ) -> torch.Tensor:
    """Multi-head attention whose heads have different widths, all heads in one call.

    Args:
        q, k, v: (B, N, sum(head_dims)), heads packed in order.
        head_dims: width of each head; 0 is allowed.
        scale: softmax scale (for a pruned head, the original head width's ** -0.5).
        dropout_p: attention-probability dropout (training only).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (B, N, sum(head_dims)).
    """
    if dropout_p > 0.0 and implementation is None:
        implementation = "reference"  # only the reference has attention dropout (the kernels have no RNG)
    impl = select("ragged_attention", q, forced=implementation)
    return impl(q, k, v, head_dims, scale, dropout_p)

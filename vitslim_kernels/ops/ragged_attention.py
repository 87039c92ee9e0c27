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


def _head_slices(head_dims: Sequence[int]) -> list[slice]:
    """The columns of every head of non-zero width, in order."""
    slices, offset = [], 0
    for w in head_dims:
        if w > 0:
            slices.append(slice(offset, offset + w))
        offset += w
    return slices


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.element_size() < 4 else t.dtype  # fp16/bf16 math in fp32, as the kernels do


def _cat_heads(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The per-head (B, N, w) pieces packed back into (B, N, D) like `like` (zero-width heads own no column)."""
    if not parts:
        return like.new_zeros(like.shape)
    return torch.cat(parts, dim=-1).to(like.dtype)


def ragged_attention_fwd_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the op vitslim::ragged_attention_fwd returns, in plain PyTorch: (o, lse).

    o: (B, N, D) like q. lse: (B, H_kept, N) float32, the natural logsumexp over keys of the scaled scores
    q_h k_h^T * scale of each query row, one row per head of non-zero width (the saved statistic of the
    backward). Math in float32 for fp16/bf16 inputs, else in the input dtype.
    """
    dtype = _compute_dtype(q)
    outs, lses = [], []
    for cols in _head_slices(head_dims):
        qh, kh, vh = (t[..., cols].to(dtype) for t in (q, k, v))
        scores = (qh @ kh.transpose(-2, -1)) * scale                                        # (B, N, N)
        lse = torch.logsumexp(scores, dim=-1)                                               # (B, N)
        outs.append(torch.exp(scores - lse.unsqueeze(-1)) @ vh)
        lses.append(lse.to(torch.float32))
    B, N, _ = q.shape
    lse = torch.stack(lses, dim=1) if lses else q.new_zeros((B, 0, N), dtype=torch.float32)
    return _cat_heads(outs, q), lse


def ragged_attention_bwd_ref(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             o: torch.Tensor, lse: torch.Tensor, head_dims: Sequence[int], scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::ragged_attention_bwd returns, as an explicit function of ALL its inputs:
    (dq, dk, dv), each (B, N, D) like q.

    Per kept head h, with S = q_h k_h^T * scale: P = exp(S - lse_h), delta = rowsum(dO_h * O_h),
    dS = P * (dO_h v_h^T - delta), dq_h = dS k_h * scale, dk_h = dS^T q_h * scale, dv_h = P^T dO_h.
    At o and lse of the forward this is the gradient of attention; as a function of o and lse too it is what
    the kernel computes, so its derivatives are those of the op (double backward).
    """
    dtype = _compute_dtype(q)
    dqs, dks, dvs = [], [], []
    for h, cols in enumerate(_head_slices(head_dims)):
        doh, qh, kh, vh, oh = (t[..., cols].to(dtype) for t in (do, q, k, v, o))
        p = torch.exp((qh @ kh.transpose(-2, -1)) * scale - lse[:, h].to(dtype).unsqueeze(-1))  # (B, N, N)
        delta = (doh * oh).sum(-1, keepdim=True)                                             # (B, N, 1)
        ds = p * (doh @ vh.transpose(-2, -1) - delta)
        dqs.append((ds @ kh) * scale)
        dks.append((ds.transpose(-2, -1) @ qh) * scale)
        dvs.append(p.transpose(-2, -1) @ doh)
    return _cat_heads(dqs, q), _cat_heads(dks, q), _cat_heads(dvs, q)


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


def ragged_attention_fwd_op() -> torch._ops.OpOverload:
    """torch.ops.vitslim.ragged_attention_fwd.default, the op an exported fused slim model holds (and what a
    loaded fused .pt2 program calls). Registered by importing the Triton module that defines it, so it needs
    triton installed; the op itself also runs on CPU tensors, in plain PyTorch."""
    if not hasattr(torch.ops.vitslim, "ragged_attention_fwd"):
        try:
            from ..triton import ragged_attention as _  # noqa: F401
        except ImportError as e:
            raise ImportError(f"the op vitslim::ragged_attention_fwd is defined with the Triton kernels, which "
                              f"cannot be imported here ({e}); export with fused=False instead") from None
    return torch.ops.vitslim.ragged_attention_fwd.default

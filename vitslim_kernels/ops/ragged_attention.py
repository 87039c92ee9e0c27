"""Ragged-width multi-head attention: every head has its own width (docs/design.md section 5).

q, k, v are (B, N, sum(head_dims)) with the heads packed in order; head h occupies columns
[offset_h, offset_h + head_dims[h]). A zero-width head contributes nothing (its output slice is empty).

In this file, in order: the argument checks; the references (the functional's, and those of each op below);
the torch.library ops with their fake implementations and autograd, vitslim::ragged_attention_fwd -> (o, lse)
and vitslim::ragged_attention_bwd -> (dq, dk, dv), the packed ones on one (B, N, 3D) qkv
(vitslim::ragged_attention_qkv_fwd / _qkv_bwd), and vitslim::ragged_attention_fwd_cuda, the CUDA C++ forward for
inference; the public functional `ragged_attention`; its implementations registered with dispatch (cuda, triton,
reference) with their refusal rules; `sample_inputs`. The ops launch the Triton kernels of triton/ragged_attention.py
(the CUDA one: cuda/ragged_attention.py) and compute the reference math on CPU tensors without the interpreter,
so they run, and torch.export of a fused model traces them, anywhere.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import List, Optional  # TorchScript reads attention_per_head's annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .. import _ext
from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import reference_on, register_fallback, triton_refusals
from ._library import define_op, formula_vjp, math_dtype, refuse_dropout, sample_tensors

_REFERENCE_FOR_DROPOUT = "use dropout_p=0.0 or implementation='reference'"


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
                         scale: float, dropout_p: float = 0.0, attn_mask: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """The specification: one explicit softmax attention per head, in the input dtype
    (softmax in float32 for half types). q, k, v, output: (B, N, sum(head_dims)).

    attn_mask: as torch.nn.functional.scaled_dot_product_attention takes it (timm's blocks pass it on): boolean
    (True: the key takes part) or added to the scores, broadcastable to (B, heads, N, N), head h of it for head h."""
    dims = check_ragged_args(q, k, v, head_dims)
    if attn_mask is not None:
        check_attn_mask(attn_mask, q, len(dims))
    return attention_per_head(q, k, v, list(dims), float(scale), attn_mask, dropout_p)


def check_attn_mask(attn_mask: torch.Tensor, q: torch.Tensor, heads: int) -> None:
    """ValueError unless attn_mask is a boolean or floating mask broadcastable to (B, heads, N, N)."""
    B, N = q.shape[0], q.shape[1]
    if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        what = getattr(attn_mask, "dtype", type(attn_mask).__name__)
        raise ValueError(f"attn_mask must be a boolean or floating tensor, got {what}")
    target = (B, heads, N, N)
    try:
        fits = 2 <= attn_mask.dim() <= 4 and torch.broadcast_shapes(tuple(attn_mask.shape), target) == target
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, heads, N, N) = "
                         f"{target}; accepted: 2 to 4 dimensions, each 1 or the target's")


def attention_per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: List[int], scale: float,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The arithmetic of ragged_attention_ref on checked arguments, TorchScript-compatible (slim models script with
    it). attn_mask: broadcastable to (B, heads, N, N), as scaled_dot_product_attention takes it."""
    out = torch.empty_like(q)
    softmax_dtype = torch.float32 if q.element_size() < 4 else q.dtype  # fp16/bf16 softmax in fp32
    offset = 0
    for h, w in enumerate(head_dims):
        if w > 0:
            scores = (q[..., offset:offset + w] @ k[..., offset:offset + w].transpose(-2, -1)) * scale  # (B, N, N)
            if attn_mask is not None:
                mask = attn_mask
                if mask.dim() == 4:  # (B or 1, heads or 1, N, N): this head's
                    mask = mask[:, h if mask.shape[1] > 1 else 0]
                elif mask.dim() == 3:  # (heads or 1, N, N): broadcast from the right, as SDPA does
                    mask = mask[h if mask.shape[0] > 1 else 0]
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(torch.logical_not(mask), float("-inf"))
                else:
                    scores = scores + mask
            probs = scores.softmax(dim=-1, dtype=softmax_dtype).to(q.dtype)
            if attn_mask is not None:  # a query that may see no key gets 0, as scaled_dot_product_attention gives
                probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
            if dropout_p > 0.0:
                probs = F.dropout(probs, p=dropout_p)
            out[..., offset:offset + w] = probs @ v[..., offset:offset + w]
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
    dtype = math_dtype(q)
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
    dtype = math_dtype(q)
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


def _bwd_reference(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                   lse: torch.Tensor, head_dims: Sequence[int], scale: float,
                   out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, bias_sum: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """What _bwd computes, in plain PyTorch (ragged_attention_bwd_ref), written into `out` when given."""
    grads = ragged_attention_bwd_ref(do, q, k, v, o, lse, head_dims, scale)
    dbias = torch.cat([g.sum((0, 1), dtype=torch.float32) for g in grads]) if bias_sum else None
    if out is not None:
        for buffer, g in zip(out, grads):
            buffer.copy_(g)
        grads = out
    return (*grads, dbias)




# ---------------------------------------------------------------------------------------------------------
# The torch.library ops (triton_op or custom_op: see ops/_library.py) and their autograd
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from ..triton import ragged_attention as kernels  # optional: needs triton; imported when a kernel first runs
    return kernels


def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) by the Triton kernel, or by the reference on CPU tensors without the interpreter."""
    if reference_on(q):
        return ragged_attention_fwd_ref(q, k, v, head_dims, scale)
    return _kernels()._fwd(q, k, v, head_dims, scale)


def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
         head_dims: Sequence[int], scale: float, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
         bias_sum: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias) by the Triton kernel (written into `out` when given; see its launcher), or by the
    reference on CPU tensors without the interpreter."""
    if reference_on(q):
        return _bwd_reference(do, q, k, v, o, lse, head_dims, scale, out, bias_sum)
    return _kernels()._bwd(do, q, k, v, o, lse, head_dims, scale, out=out, bias_sum=bias_sum)


def _ragged_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, N, D) like q; lse (B, H_kept, N) float32, one row per head of non-zero width."""
    return _fwd(q, k, v, head_dims, scale)


def _ragged_attention_fwd_fake(q, k, v, head_dims, scale):
    B, N, D = q.shape
    H = sum(1 for w in head_dims if w > 0)
    return q.new_empty((B, N, D)), q.new_empty((B, H, N), dtype=torch.float32)


def _ragged_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, head_dims: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, N, D) like q."""
    return _bwd(do, q, k, v, o, lse, head_dims, scale)[:3]


def _ragged_attention_bwd_fake(do, q, k, v, o, lse, head_dims, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


ragged_attention_fwd = define_op("vitslim::ragged_attention_fwd", _ragged_attention_fwd,
                                 _ragged_attention_fwd_fake)
ragged_attention_bwd = define_op("vitslim::ragged_attention_bwd", _ragged_attention_bwd,
                                 _ragged_attention_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, head_dims, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)  # q, k, v may be views of one qkv tensor: nothing is copied
    ctx.head_dims, ctx.scale = list(head_dims), scale
    ctx.set_materialize_grads(False)  # an unused lse gets None, not a zero tensor to add


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None and dlse is None:
        return None, None, None, None, None
    dq, dk, dv = torch.ops.vitslim.ragged_attention_bwd(do if do is not None else torch.zeros_like(o),
                                                        q, k, v, o, lse, ctx.head_dims, ctx.scale)
    if dlse is not None:
        # lse is a differentiable output (the backward op reads it, so second derivatives flow through it);
        # only a double backward or a caller of the op itself gives it a gradient: plain PyTorch then.
        dq2, dk2, dv2, _, _ = formula_vjp(ragged_attention_fwd_ref, (q, k, v, ctx.head_dims, ctx.scale),
                                          (None, dlse), ctx.needs_input_grad)
        dq, dk, dv = dq + dq2, dk + dk2, dv + dv2
    return dq, dk, dv, None, None


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.head_dims, ctx.scale = list(inputs[6]), inputs[7]
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, ddq, ddk, ddv):
    """Double backward: the derivatives of ragged_attention_bwd_ref, the backward as a function of do, q, k, v,
    o and lse, in plain PyTorch (materialises each head's (B, N, N) scores: second derivatives only)."""
    args = (*ctx.saved_tensors, ctx.head_dims, ctx.scale)
    return formula_vjp(ragged_attention_bwd_ref, args, (ddq, ddk, ddv), ctx.needs_input_grad)


ragged_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
ragged_attention_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# The packed ops: q, k, v as the three (B, N, D) column blocks of one (B, N, 3D) qkv tensor, as a fused qkv
# projection gives them. The backward writes dq, dk, dv into one (B, N, 3D) dqkv that the projection's weight
# gradient reads directly: with separate q, k, v inputs, autograd's backward of qkv.split concatenates three
# gradients instead (one more write and read of (B, N, 3D): ~232 MB per block at DeiT-S batch 256, bf16).

def _split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = qkv.shape[-1] // 3
    return qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]


def _ragged_attention_qkv_fwd(qkv: torch.Tensor, head_dims: list[int], scale: float
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of q, k, v = the column thirds of qkv (B, N, 3D): o (B, N, D), lse (B, H_kept, N) float32."""
    return _fwd(*_split_qkv(qkv), head_dims, scale)


def _ragged_attention_qkv_fwd_fake(qkv, head_dims, scale):
    B, N, D3 = qkv.shape
    H = sum(1 for w in head_dims if w > 0)
    return qkv.new_empty((B, N, D3 // 3)), qkv.new_empty((B, H, N), dtype=torch.float32)


def _ragged_attention_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              head_dims: list[int], scale: float, bias_grad: bool
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dqkv (B, N, 3D) like qkv, dbias): with bias_grad, dbias is the (3D,) fp32 sum of dqkv over B and N (the
    gradient of a bias added to qkv), summed by the kernel as it writes dqkv, so no pass reads dqkv for it;
    otherwise an empty (0,) tensor."""
    dqkv = (torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if reference_on(qkv)
            else _kernels()._alloc(qkv.shape, qkv))
    *_, dbias = _bwd(do, *_split_qkv(qkv), o, lse, head_dims, scale, out=_split_qkv(dqkv), bias_sum=bias_grad)
    return dqkv, dbias if bias_grad else qkv.new_empty((0,), dtype=torch.float32)


def _ragged_attention_qkv_bwd_fake(do, qkv, o, lse, head_dims, scale, bias_grad):
    return qkv.new_empty(qkv.shape), qkv.new_empty((qkv.shape[2] if bias_grad else 0,), dtype=torch.float32)


def ragged_attention_qkv_bwd_ref(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                 head_dims: Sequence[int], scale: float, bias_grad: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed backward in plain PyTorch: ragged_attention_bwd_ref on the thirds, concatenated, and with
    bias_grad their column sums (in fp32, or fp64 for fp64 inputs), else an empty (0,) tensor."""
    grads = ragged_attention_bwd_ref(do, *_split_qkv(qkv), o, lse, head_dims, scale)
    dqkv = torch.cat(grads, dim=-1)
    sum_dtype = math_dtype(dqkv)
    if not bias_grad:
        return dqkv, dqkv.new_empty((0,), dtype=sum_dtype)
    return dqkv, torch.cat([g.sum((0, 1), dtype=sum_dtype) for g in grads])


def _qkv_fwd_ref(qkv, head_dims, scale):
    return ragged_attention_fwd_ref(*_split_qkv(qkv), head_dims, scale)


ragged_attention_qkv_fwd = define_op("vitslim::ragged_attention_qkv_fwd", _ragged_attention_qkv_fwd,
                                     _ragged_attention_qkv_fwd_fake)
ragged_attention_qkv_bwd = define_op("vitslim::ragged_attention_qkv_bwd", _ragged_attention_qkv_bwd,
                                     _ragged_attention_qkv_bwd_fake)


def _qkv_fwd_setup_context(ctx, inputs, output):
    qkv, head_dims, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.head_dims, ctx.scale = list(head_dims), scale
    ctx.set_materialize_grads(False)


def _qkv_fwd_backward(ctx, do, dlse):
    qkv, o, lse = ctx.saved_tensors
    if do is None and dlse is None:
        return None, None, None
    dqkv, _ = torch.ops.vitslim.ragged_attention_qkv_bwd(do if do is not None else torch.zeros_like(o), qkv, o,
                                                         lse, ctx.head_dims, ctx.scale, False)
    if dlse is not None:  # as in _fwd_backward: only a double backward or a direct caller gives lse a gradient
        dqkv = dqkv + formula_vjp(_qkv_fwd_ref, (qkv, ctx.head_dims, ctx.scale), (None, dlse),
                                  ctx.needs_input_grad)[0]
    return dqkv, None, None


def _qkv_bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.head_dims, ctx.scale, ctx.bias_grad = list(inputs[4]), inputs[5], inputs[6]
    ctx.set_materialize_grads(False)


def _qkv_bwd_backward(ctx, ddqkv, ddbias):
    args = (*ctx.saved_tensors, ctx.head_dims, ctx.scale, ctx.bias_grad)
    return formula_vjp(ragged_attention_qkv_bwd_ref, args, (ddqkv, ddbias), ctx.needs_input_grad)


ragged_attention_qkv_fwd.register_autograd(_qkv_fwd_backward, setup_context=_qkv_fwd_setup_context)
ragged_attention_qkv_bwd.register_autograd(_qkv_bwd_backward, setup_context=_qkv_bwd_setup_context)


# The CUDA C++ forward (inference): vitslim::ragged_attention_fwd_cuda -> o. Forward only: there is no backward
# kernel, so the functional refuses inputs that need a gradient (dispatch sends training to Triton); the op itself
# has a backward, the Triton one, as torch.library expects.

CUDA_FORWARD_ONLY = "the CUDA kernel is forward-only; training uses triton"
CUDA_MAX_WIDTH, CUDA_MAX_HEADS = 256, 128  # csrc/kernels/ragged_attention_fwd.h: kMaxWidth, kMaxHeads
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda():
    from ..cuda import ragged_attention as launcher  # optional: the extension loads when the kernel first runs
    return launcher


@torch.library.custom_op("vitslim::ragged_attention_fwd_cuda", mutates_args=())
def ragged_attention_fwd_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: list[int],
                              scale: float) -> torch.Tensor:
    """o (B, N, D), contiguous, like q. The op torch.compile and torch.export see."""
    return _cuda()._fwd(q, k, v, head_dims, scale)


@ragged_attention_fwd_cuda.register_fake
def _(q, k, v, head_dims, scale):
    return q.new_empty(q.shape)


def _cuda_setup_context(ctx, inputs, output):
    q, k, v, head_dims, scale = inputs
    ctx.save_for_backward(q, k, v)
    ctx.head_dims, ctx.scale = list(head_dims), scale


def _cuda_backward(ctx, do):
    """The Triton backward (the same math): the CUDA kernel keeps no logsumexp, so the Triton forward recomputes
    o and lse first. Both are differentiable ops, so this backward is differentiable again."""
    q, k, v = ctx.saved_tensors
    o, lse = ragged_attention_fwd(q, k, v, ctx.head_dims, ctx.scale)
    dq, dk, dv = ragged_attention_bwd(do, q, k, v, o, lse, ctx.head_dims, ctx.scale)
    return dq, dk, dv, None, None


ragged_attention_fwd_cuda.register_autograd(_cuda_backward, setup_context=_cuda_setup_context)


def _plain(*tensors: torch.Tensor) -> bool:
    """True in plain eager mode: real tensors, no tracing, no dispatch mode (fake, proxy, ...) active."""
    return (all(type(t) is torch.Tensor for t in tensors) and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None)


def ragged_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                          scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """CUDA implementation of vitslim_kernels.ragged_attention (forward only).
    q, k, v, output: (B, N, sum(head_dims))."""
    dims = check_ragged_args(q, k, v, head_dims)
    refuse_dropout("ragged_attention: the CUDA implementation", _REFERENCE_FOR_DROPOUT, "attention dropout",
                   dropout_p=dropout_p)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(f"ragged_attention: {CUDA_FORWARD_ONLY} (run under torch.no_grad() or "
                           f"torch.inference_mode(), or use implementation='triton')")
    if _plain(q, k, v):
        # Eager inference calls the extension directly: going through the custom op cost 70 us more per call
        # than the bare allocation (11 us) in a CPU-tensor micro-benchmark on the 2-core build machine, about
        # a whole bs-1 attention launch; the latency is what this kernel is for.
        return _cuda()._fwd(q, k, v, dims, scale)
    return ragged_attention_fwd_cuda(q, k, v, list(dims), float(scale))


def ragged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                            scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Triton implementation of vitslim_kernels.ragged_attention. q, k, v, output: (B, N, sum(head_dims))."""
    dims = check_ragged_args(q, k, v, head_dims)
    refuse_dropout("ragged_attention: the Triton implementation", _REFERENCE_FOR_DROPOUT, "attention dropout",
                   dropout_p=dropout_p)
    o, _ = torch.ops.vitslim.ragged_attention_fwd(q, k, v, list(dims), float(scale))
    return o


def ragged_attention_qkv_triton(qkv: torch.Tensor, head_dims: Sequence[int], scale: float) -> torch.Tensor:
    """Triton ragged attention of a packed qkv (B, N, 3 * sum(head_dims)) -> (B, N, sum(head_dims)); its
    gradient comes back as one (B, N, 3D) tensor (see the packed ops)."""
    D = sum(int(w) for w in head_dims)
    if qkv.dim() != 3 or qkv.shape[-1] != 3 * D:
        raise ValueError(f"ragged_attention_qkv: qkv must be (B, N, 3 * sum(head_dims) = {3 * D}), got shape "
                         f"{tuple(qkv.shape)}")
    check_ragged_args(*_split_qkv(qkv), head_dims)
    o, _ = torch.ops.vitslim.ragged_attention_qkv_fwd(qkv, [int(w) for w in head_dims], float(scale))
    return o


def ragged_attention_fwd_op() -> torch._ops.OpOverload:
    """torch.ops.vitslim.ragged_attention_fwd.default, the op an exported fused slim model holds (and what a
    loaded fused .pt2 program calls). Defined with this module, Triton or not; it runs on CPU tensors in plain
    PyTorch."""
    return torch.ops.vitslim.ragged_attention_fwd.default


def ragged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                     scale: float, dropout_p: float = 0.0, *, attn_mask: torch.Tensor | None = None,
                     implementation: str | None = None) -> torch.Tensor:
    """Multi-head attention whose heads have different widths, all heads in one call.

    Args:
        q, k, v: (B, N, sum(head_dims)), heads packed in order.
        head_dims: width of each head; 0 is allowed.
        scale: softmax scale (for a pruned head, the original head width's ** -0.5).
        dropout_p: attention-probability dropout (training only).
        attn_mask: boolean (True: the key takes part) or added to the scores, broadcastable to
            (B, len(head_dims), N, N) as scaled_dot_product_attention takes it; the kernels take none (dispatch
            refuses them, and the reference runs).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (B, N, sum(head_dims)).
    """
    if dropout_p > 0.0 and implementation is None:
        implementation = "reference"  # only the reference has attention dropout (the kernels have no RNG)
    impl = select("ragged_attention", q, k, v, head_dims, scale, dropout_p, attn_mask=attn_mask,
                  forced=implementation)
    if attn_mask is not None:  # only the reference takes one: dispatch refused the kernels
        return impl(q, k, v, head_dims, scale, dropout_p, attn_mask)
    return impl(q, k, v, head_dims, scale, dropout_p)


def _mask_refusal(attn_mask: torch.Tensor | None) -> list[str]:
    return [] if attn_mask is None else ["the kernels take no attention mask (attn_mask): the reference applies it"]


def triton_ragged_refusals(q: torch.Tensor, *args, attn_mask: torch.Tensor | None = None, **kwargs) -> list[str]:
    """Every reason the Triton kernels cannot run this call: an attention mask, and runtime.triton_refusals."""
    return _mask_refusal(attn_mask) + triton_refusals(q, *args, **kwargs)


# -- implementations, in order of preference, with their refusal rules -------------------------------------------
# CUDA before Triton for inference at small sizes (RAGGED_CUDA_MAX_WORK): UNMEASURED (no GPU where this was
# written). The CUDA kernel is plain fp32 SIMT with a cheaper launch; Triton's uses tensor cores.
# benchmarks/run_slim_benchmarks.py decides the order and the limit once it has run on the H100.

# ESTIMATE, not measured: the CUDA ragged-attention kernel is plain fp32 SIMT (tens of TFLOP/s at best on an
# H100) while Triton's uses tensor cores; the CUDA kernel only wins where Triton's launch cost (tens of
# microseconds) outweighs that, i.e. small inference batches. Taken as B * N * N * sum(head_dims) <= 2**27
# (DeiT-S at 70%, N = 197: batch <= ~12). Set from benchmarks/run_slim_benchmarks.py (ragged_attention.json has
# both kernels at batch 1 and 256).
RAGGED_CUDA_MAX_WORK = 2 ** 27


def cuda_refusals(q: torch.Tensor, k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                  head_dims: Sequence[int] | None = None, *_, attn_mask: torch.Tensor | None = None, **__) -> list[str]:
    """Every reason the CUDA forward kernel cannot run this call: an attention mask, device, dtype, a gradient needed
    (of any of q, k, v), the extension or the GPU, the widest head and the head count it takes, and the size above which Triton
    is expected faster (RAGGED_CUDA_MAX_WORK). Works on a stand-in without a shape (vitslim_kernels.info)."""
    reasons = _mask_refusal(attn_mask)
    on_cuda = q.device.type == "cuda"
    if not on_cuda:
        reasons.append(f"{'CPU' if q.device.type == 'cpu' else q.device.type} tensor: the CUDA kernel runs on CUDA "
                       f"tensors")
    if q.dtype not in CUDA_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported by the CUDA kernel (float32, float16, bfloat16 are)")
    if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (q, k, v)):
        reasons.append(CUDA_FORWARD_ONLY)
    if on_cuda and not reasons:
        why = _ext.device_unavailable(q.device)
        if why is not None:
            reasons.append(why)
    if head_dims is not None:
        dims = [int(w) for w in head_dims]
        if dims and max(dims) > CUDA_MAX_WIDTH:
            reasons.append(f"the CUDA kernel takes heads up to {CUDA_MAX_WIDTH} wide, got a head of width "
                           f"{max(dims)} in {dims}")
        if sum(1 for w in dims if w > 0) > CUDA_MAX_HEADS:
            reasons.append(f"the CUDA kernel takes at most {CUDA_MAX_HEADS} heads of non-zero width, got "
                           f"{sum(1 for w in dims if w > 0)}")
    shape = getattr(q, "shape", None)  # info's stand-ins have no shape
    if shape is not None and len(shape) == 3:
        B, N, D = shape
        if B * N * N * D > RAGGED_CUDA_MAX_WORK:
            reasons.append(f"B * N^2 * sum(head_dims) = {B * N * N * D} > {RAGGED_CUDA_MAX_WORK}: Triton's "
                           f"tensor-core kernel is expected faster than the CUDA SIMT kernel there (estimate, not "
                           f"yet measured)")
    return reasons


register("ragged_attention", "cuda", lambda: ragged_attention_cuda, cuda_refusals, forward_only=True)
register("ragged_attention", "triton", lambda: ragged_attention_triton, triton_ragged_refusals)
register("ragged_attention", "reference", lambda: ragged_attention_ref, no_refusals)
register_fallback("ragged_attention_fwd", ragged_attention_fwd_ref)
register_fallback("ragged_attention_bwd", _bwd_reference)
register_fallback("ragged_attention_fwd_cuda", ragged_attention_ref)


SAMPLE_HEAD_DIMS = (17, 0, 64, 41)  # odd widths, a pruned head, the full width


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of ragged_attention: heads 17, 0, 64 and 41 wide, N = 50, batch 2."""
    D = sum(SAMPLE_HEAD_DIMS)
    q, k, v = sample_tensors((2, 50, D), (2, 50, D), (2, 50, D), device=device, dtype=dtype,
                             requires_grad=requires_grad)
    return [((q, k, v, SAMPLE_HEAD_DIMS, 64 ** -0.5), {})]


def library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck of this module's ops: odd
    widths and a fully pruned head (17, 0, 1) at N = 17, every head pruned at N = 5, batch 2; q/k/v as views of one
    packed qkv, as a model gives them. A backward op's saved tensors come from its forward op, run when the args are made.
    (The CUDA op: test_ragged_attention_cuda.py.)"""
    heads, scale = [17, 0, 1], 64 ** -0.5

    def packed(dtype: torch.dtype, head_dims: list[int], n: int = 17) -> torch.Tensor:
        (qkv,) = sample_tensors((2, n, 3 * sum(head_dims)), device="cpu", dtype=dtype, scale=1.5)
        return qkv

    def split(qkv: torch.Tensor, head_dims: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = sum(head_dims)
        return qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]

    def forward(head_dims: list[int], n: int) -> tuple:
        return (*split(packed(torch.float32, head_dims, n), head_dims), head_dims, scale)

    def backward(dtype: torch.dtype) -> tuple:
        q, k, v = split(packed(dtype, heads), heads)
        o, lse = torch.ops.vitslim.ragged_attention_fwd(q, k, v, heads, scale)
        (grad,) = sample_tensors(tuple(o.shape), device="cpu", dtype=dtype, seed=1)
        return (grad, q, k, v, o, lse, heads, scale)

    def packed_backward(bias_grad: bool) -> tuple:
        qkv = packed(torch.float32, heads)
        o, lse = torch.ops.vitslim.ragged_attention_qkv_fwd(qkv, heads, scale)
        (grad,) = sample_tensors(tuple(o.shape), device="cpu", dtype=torch.float32, seed=1)
        return (grad, qkv, o, lse, heads, scale, bias_grad)

    return [("fp32", "ragged_attention_fwd", lambda: forward(heads, 17)),
            ("all pruned", "ragged_attention_fwd", lambda: forward([0, 0], 5)),
            ("fp32", "ragged_attention_bwd", lambda: backward(torch.float32)),
            ("fp16", "ragged_attention_bwd", lambda: backward(torch.float16)),
            ("fp32", "ragged_attention_qkv_fwd", lambda: (packed(torch.float32, heads), heads, scale)),
            ("fp32", "ragged_attention_qkv_bwd", lambda: packed_backward(False)),
            ("fp32 bias grad", "ragged_attention_qkv_bwd", lambda: packed_backward(True))]


describe_op(OpInfo("ragged_attention", ragged_attention, ragged_attention_ref, sample_inputs,
                   library_ops=("ragged_attention_fwd", "ragged_attention_bwd", "ragged_attention_qkv_fwd",
                                "ragged_attention_qkv_bwd", "ragged_attention_fwd_cuda"),
                   kernels=("ragged_attention_fwd", "ragged_attention_bwd", "ragged_attention_fwd_cuda"),
                   kernel_modules=("vitslim_kernels.triton.ragged_attention", "vitslim_kernels.cuda.ragged_attention"),
                   library_samples=library_samples, uses_dot=True))

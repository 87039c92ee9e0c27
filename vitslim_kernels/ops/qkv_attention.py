"""The qkv projection and the ragged attention of one block as one op (docs/design.md sections 2, 4 and 5).

    qkv = x @ W'^T + b',   o = ragged_attention(q, k, v = the column thirds of qkv)

W' = g*W and b' = g*b with the attention gate g on row r % R (the search branch: gated_linear's fold), or W
and b themselves (gate None: a slim model's q/k/v projection, its heads padded "ragged but aligned").

Why one op and not gated_linear followed by the packed attention: the bias gradient. db' is the column sum of
dqkv over all B*N rows. Apart, the projection's backward reads dqkv once more for it (dy.sum(0): at DeiT-S
batch 256 in bf16 one read of (50432, 1152), 116 MB per block). Here the attention backward kernel sums the
columns of dq, dk and dv as it writes them (per image, fp32, before rounding) and one torch.sum over the batch
finishes db' from a (B, 3D) buffer (1.2 MB). The projection's backward then reads dqkv twice, for dx = dqkv @ W'
and dW' = dqkv^T @ x (cuBLAS). It also makes one custom op and one autograd node per block where there were two.

Op: vitslim::qkv_attention(x, weight, bias, gate, head_dims, scale) -> (o, qkv, lse), with register_autograd; the
public functional qkv_attention, its implementations registered with dispatch (triton: the op; reference: plain
PyTorch), `sample_inputs`. The op launches gated_linear's fold and the ragged attention kernels (through their
ops' modules) and computes the reference math on CPU tensors without the interpreter.
qkv is returned because the backward reads it (a custom op saves outputs, not intermediates); a gradient that
reaches it is added to dqkv. Double backward: the backward is made of differentiable ops (the packed attention
backward, the fold and its backward, matmuls), each with its own backward.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import torch.nn.functional as F

from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import triton_refusals
from ._library import define_op, formula_vjp, matmul_dtype, sample_tensors
from .gated_linear import _fold, check_gated_linear_args, gated_linear_ref, mm_out
from .ragged_attention import _fwd, _qkv_fwd_ref, _split_qkv, ragged_attention_ref


def check_qkv_attention_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             gate: torch.Tensor | None, head_dims: Sequence[int]) -> list[int]:
    """Validate the arguments of qkv_attention; returns head_dims as a list of ints."""
    dims = [int(w) for w in head_dims]
    if any(w < 0 for w in dims):
        raise ValueError(f"qkv_attention: head_dims must be >= 0, got {dims}")
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"qkv_attention: x must be a floating (B, N, C) tensor, got {x.dtype} of shape "
                         f"{tuple(x.shape)}")
    if weight.shape != (3 * sum(dims), x.shape[-1]):
        raise ValueError(f"qkv_attention: weight must be (3 * sum(head_dims), C) = ({3 * sum(dims)}, "
                         f"{x.shape[-1]}), got {tuple(weight.shape)}")
    if gate is not None:
        check_gated_linear_args(x, weight, bias, gate.reshape(-1))
    elif bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"qkv_attention: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    return dims


def qkv_attention_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None,
                      head_dims: Sequence[int], scale: float) -> torch.Tensor:
    """The specification, in plain PyTorch (float64-capable). Shapes as in qkv_attention."""
    dims = check_qkv_attention_args(x, weight, bias, gate, head_dims)
    qkv = gated_linear_ref(x, weight, bias, gate.reshape(-1)) if gate is not None else F.linear(x, weight, bias)
    return ragged_attention_ref(*_split_qkv(qkv), dims, scale)


def _project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor]
             ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(W', b') in x's dtype: folded with the gate (the Triton fold kernel), or W and b cast."""
    if gate is not None:
        wf, bf = _fold(weight, bias, gate, x.dtype)  # (ops/gated_linear.py: the kernel, or the reference)
        return wf, bf if bias is not None else None
    return weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None


def _qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: Optional[torch.Tensor],
                   head_dims: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o (B, N, D) in x's dtype, qkv (B, N, 3D) contiguous in x's dtype, lse (B, H_kept, N) fp32) for x (B, N, C),
    weight (3D, C), bias (3D,) or None, gate (R,) with 3D % R == 0 or None. One cuBLAS addmm (the bias in its
    epilogue), then the ragged attention kernel on the thirds of qkv."""
    B, N, C = x.shape
    wf, bf = _project(x, weight, bias, gate)
    x2 = x.reshape(B * N, C)
    qkv = (torch.addmm(bf, x2, wf.t()) if bf is not None else torch.mm(x2, wf.t())).view(B, N, weight.shape[0])
    o, lse = _fwd(*_split_qkv(qkv), head_dims, scale)
    return o, qkv, lse


def _qkv_attention_fake(x, weight, bias, gate, head_dims, scale):
    B, N, _ = x.shape
    H = sum(1 for w in head_dims if w > 0)
    return (x.new_empty((B, N, weight.shape[0] // 3)), x.new_empty((B, N, weight.shape[0])),
            x.new_empty((B, H, N), dtype=torch.float32))


qkv_attention_op = define_op("vitslim::qkv_attention", _qkv_attention, _qkv_attention_fake)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, head_dims, scale = inputs
    o, qkv, lse = output
    ctx.save_for_backward(x, weight, bias, gate, qkv, o, lse)
    ctx.head_dims, ctx.scale = list(head_dims), scale
    ctx.set_materialize_grads(False)  # unused qkv and lse outputs get None, not zero tensors to add


def _backward(ctx, do, dqkv_out, dlse):
    x, weight, bias, gate, qkv, o, lse = ctx.saved_tensors
    if do is None and dqkv_out is None and dlse is None:
        return (None,) * 6
    # The kernel's column sums are db' only when dqkv is the attention's gradient alone.
    sums_in_kernel = bias is not None and dqkv_out is None and dlse is None
    dqkv, dbf = torch.ops.vitslim.ragged_attention_qkv_bwd(do if do is not None else torch.zeros_like(o), qkv, o,
                                                           lse, ctx.head_dims, ctx.scale, sums_in_kernel)
    if dlse is not None:  # only a double backward or a direct caller gives lse a gradient
        dqkv = dqkv + formula_vjp(_qkv_fwd_ref, (qkv, ctx.head_dims, ctx.scale), (None, dlse), (True,))[0]
    if dqkv_out is not None:
        dqkv = dqkv + dqkv_out
    if bias is not None and not sums_in_kernel:
        dbf = dqkv.sum((0, 1), dtype=torch.float32)
    return (*projection_backward(ctx.needs_input_grad[:4], x, weight, bias, gate, dqkv, dbf), None, None)


def projection_backward(needs_input_grad: Sequence[bool], x: torch.Tensor, weight: torch.Tensor,
                        bias: Optional[torch.Tensor], gate: Optional[torch.Tensor], dqkv: torch.Tensor,
                        dbf: Optional[torch.Tensor]) -> tuple:
    """(dx, dweight, dbias, dgate) of qkv = x @ W'^T + b' (W' = g*W, b' = g*b, or W and b without a gate) from dqkv
    and dbf, the column sums of dqkv in fp32 (None without a bias); None for what needs no gradient. Shared by the
    ops that fuse a projection with an attention (this one, window_qkv_attention)."""
    d2 = dqkv.reshape(-1, dqkv.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx = dw = db = dg = None
    if needs_input_grad[0]:
        wf = (torch.ops.vitslim.gated_linear_fold(weight, bias, gate, x.dtype)[0] if gate is not None
              else weight.to(x.dtype))
        dx = torch.mm(d2, wf).view(x.shape)
    if gate is not None and any(needs_input_grad[1:4]):
        dwf = mm_out(d2.t(), x2, torch.float32)  # fp32 dW' for dW and dgate (see gated_linear)
        dw, db, dg = torch.ops.vitslim.gated_linear_fold_bwd(dwf, dbf, weight, bias, gate)
    elif gate is None:
        if needs_input_grad[1]:
            dw = mm_out(d2.t(), x2, weight.dtype)
        if bias is not None and needs_input_grad[2]:
            db = dbf.to(bias.dtype)
    return dx, dw, db if bias is not None else None, dg


qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)


def qkv_attention_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None,
                         head_dims: Sequence[int], scale: float) -> torch.Tensor:
    """The op vitslim::qkv_attention (Triton fold + cuBLAS qkv + Triton ragged attention). Shapes as in
    qkv_attention."""
    dims = check_qkv_attention_args(x, weight, bias, gate, head_dims)
    dtype = matmul_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the matmul runs in `dtype` explicitly
        o, _, _ = torch.ops.vitslim.qkv_attention(x.to(dtype), weight, bias,
                                                  gate.reshape(-1) if gate is not None else None, dims, float(scale))
    return o


def qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None,
                  head_dims: Sequence[int], scale: float, *, implementation: str | None = None) -> torch.Tensor:
    """ragged_attention(split(x @ W'^T + b')): a block's qkv projection and its ragged attention as one op.

    Args:
        x: (B, N, C).
        weight: (3D, C) with D = sum(head_dims), rows q | k | v, heads packed in order; bias: (3D,) or None.
        gate: (R,) or None: W' = g*W and b' = g*b, row r scaled by gate[r % R] (the search's attention gate per
            head dim); None: W' = W (a slim model's projection).
        head_dims: width of each head; 0 is allowed.
        scale: softmax scale (the original head width's ** -0.5).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        o (B, N, D). Under autocast the matmul and the attention run in the autocast dtype.
    Gradients: x, weight, bias, gate.
    """
    impl = select("qkv_attention", x, weight, bias, gate, head_dims, scale, forced=implementation)
    return impl(x, weight, bias, gate, head_dims, scale)


register("qkv_attention", "triton", lambda: qkv_attention_triton, triton_refusals)
register("qkv_attention", "reference", lambda: qkv_attention_ref, no_refusals)


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of qkv_attention: the search (3 heads of 32, gated, with a bias: the qkv bias
    gradient summed by the attention kernel) and a slim model (heads 17, 0 and 41 wide, no gate, no bias); C = 48,
    N = 50, batch 2."""
    x, weight, bias, gate = sample_tensors((2, 50, 48), (288, 48), (288,), (96,), device=device, dtype=dtype,
                                           scale=0.5, requires_grad=requires_grad)
    (slim_weight,) = sample_tensors((174, 48), device=device, dtype=dtype, seed=1, scale=0.5,
                                    requires_grad=requires_grad)
    return [((x, weight, bias, gate, (32, 32, 32), 32 ** -0.5), {}),
            ((x, slim_weight, None, None, (17, 0, 41), 64 ** -0.5), {})]


def library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck of qkv_attention: x (2, 17, 24), heads 17, 0 and
    1 wide, with a gate and a bias, without the gate, and in fp16 without the bias."""
    def args(dtype: torch.dtype, gated: bool, bias: bool) -> tuple:
        heads, width = [17, 0, 1], 18
        x, weight, b, gate = sample_tensors((2, 17, 24), (3 * width, 24), (3 * width,), (width,), device="cpu",
                                            dtype=dtype)
        return (x, weight * 1.5 / 24 ** 0.5, b if bias else None, 1 + 0.5 * gate if gated else None, heads,
                64 ** -0.5)

    return [("fp32 gated", "qkv_attention", lambda: args(torch.float32, True, True)),
            ("fp32 no gate", "qkv_attention", lambda: args(torch.float32, False, True)),
            ("fp16 gated no bias", "qkv_attention", lambda: args(torch.float16, True, False))]


describe_op(OpInfo("qkv_attention", qkv_attention, qkv_attention_ref, sample_inputs, library_ops=("qkv_attention",),
                   kernels=("gated_linear_fold", "gated_linear_fold_bwd", "ragged_attention_fwd",
                            "ragged_attention_bwd"),
                   kernel_modules=("vitslim_kernels.triton.gated_linear", "vitslim_kernels.triton.ragged_attention"),
                   library_samples=library_samples, uses_dot=True))

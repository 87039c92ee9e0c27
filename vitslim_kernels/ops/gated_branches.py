"""The two gated branches of a search block (docs/design.md section 2), composed from the gated ops.

gated_attention_branch:  proj(attention(split_heads((u @ Wqkv^T + bqkv) * attn_gate)))
gated_mlp_branch:        fc2(GELU(w @ W1^T + b1) * mlp_gate)

u and w are the already normalised and token-scaled inputs (see layernorm_token_scale); the residual, layer
scale and drop path stay with the caller. The "triton" implementation is qkv_attention (Triton fold + cuBLAS
qkv + Triton ragged attention, all heads of width d, in one op) -> proj (cuBLAS), and gated_gelu_linear
(cuBLAS + Triton epilogue) -> fc2 (cuBLAS). Neither branch has dropout: the search recipe uses attn_drop = proj_drop = 0 and
the kernels have no RNG, so a non-zero rate is refused with an error rather than silently ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import triton_refusals
from ._library import refuse_dropout, sample_tensors

_UNFUSED = "the search recipe uses 0; for dropout use an unfused path (plain PyTorch layers)"
from .gated_linear import gated_gelu_linear_ref, gated_gelu_linear_triton, gated_linear_ref
from .qkv_attention import qkv_attention_triton
from .ragged_attention import ragged_attention_ref


def check_gated_attention_branch_args(u: torch.Tensor, qkv_weight: torch.Tensor, attn_gate: torch.Tensor,
                                      proj_weight: torch.Tensor, num_heads: int) -> tuple[int, int]:
    """Validate the shapes of gated_attention_branch; returns (H, d)."""
    if attn_gate.dim() != 2 or attn_gate.shape[0] != num_heads:
        raise ValueError(f"attn_gate must be (num_heads={num_heads}, head_dim), one gate per head dim (expand "
                         f"an (H, 1) or (1, d) gate first), got shape {tuple(attn_gate.shape)}")
    H, d = attn_gate.shape
    if u.dim() != 3:
        raise ValueError(f"u_scaled must be (B, N, C), got shape {tuple(u.shape)}")
    if qkv_weight.shape != (3 * H * d, u.shape[-1]):
        raise ValueError(f"qkv_weight must be (3*H*d, C) = ({3 * H * d}, {u.shape[-1]}), got "
                         f"{tuple(qkv_weight.shape)}")
    if proj_weight.dim() != 2 or proj_weight.shape[1] != H * d:
        raise ValueError(f"proj_weight must be (C_out, H*d = {H * d}), got {tuple(proj_weight.shape)}")
    return H, d


def gated_attention_branch_ref(u_scaled: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                               attn_gate: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                               num_heads: int, scale: float) -> torch.Tensor:
    """The specification, in plain PyTorch (float64-capable). Shapes as in gated_attention_branch."""
    H, d = check_gated_attention_branch_args(u_scaled, qkv_weight, attn_gate, proj_weight, num_heads)
    qkv = gated_linear_ref(u_scaled, qkv_weight, qkv_bias, attn_gate.reshape(-1))
    q, k, v = qkv.split(H * d, dim=-1)
    o = ragged_attention_ref(q, k, v, (d,) * H, scale)
    return F.linear(o, proj_weight, proj_bias)


def gated_attention_branch_triton(u_scaled: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                                  attn_gate: torch.Tensor, proj_weight: torch.Tensor,
                                  proj_bias: torch.Tensor | None, num_heads: int, scale: float) -> torch.Tensor:
    """qkv_attention (the Triton fold + cuBLAS qkv + Triton attention, one op whose backward takes the qkv bias
    gradient from the attention kernel) -> proj (cuBLAS)."""
    H, d = check_gated_attention_branch_args(u_scaled, qkv_weight, attn_gate, proj_weight, num_heads)
    o = qkv_attention_triton(u_scaled, qkv_weight, qkv_bias, attn_gate.reshape(-1), (d,) * H, scale)
    return F.linear(o, proj_weight, proj_bias)


def gated_mlp_branch_ref(w_scaled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                         mlp_gate: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                         approximate: str = "none") -> torch.Tensor:
    """The specification, in plain PyTorch (float64-capable). Shapes as in gated_mlp_branch."""
    h = gated_gelu_linear_ref(w_scaled, fc1_weight, fc1_bias, mlp_gate, approximate)
    return F.linear(h, fc2_weight, fc2_bias)


def gated_mlp_branch_triton(w_scaled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                            mlp_gate: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                            approximate: str = "none") -> torch.Tensor:
    """gated_gelu_linear (cuBLAS + Triton epilogue) -> fc2 (cuBLAS)."""
    h = gated_gelu_linear_triton(w_scaled, fc1_weight, fc1_bias, mlp_gate, approximate)
    return F.linear(h, fc2_weight, fc2_bias)


def gated_attention_branch(u_scaled: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None,
                           attn_gate: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor | None,
                           num_heads: int, scale: float, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                           implementation: str | None = None) -> torch.Tensor:
    """The gated attention branch of a search block, without the residual.

    Args:
        u_scaled: (B, N, C), LN1(x) with the token scale applied (layernorm_token_scale).
        qkv_weight: (3*H*d, C) and qkv_bias: (3*H*d,) or None, timm's rows in (3, H, d) order.
        attn_gate: (H, d), the attention gate per head dim (for search="heads"/"uniform", the (H, 1) or (1, d)
            gate expanded to (H, d)); the same gate multiplies q, k and v after the bias.
        proj_weight: (C_out, H*d) and proj_bias: (C_out,) or None.
        num_heads: H.
        scale: softmax scale, the ORIGINAL head width's d ** -0.5.
        attn_drop, proj_drop: must be 0 (the branch has no dropout; a ValueError says so otherwise).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (B, N, C_out). Under autocast the matmuls and the attention run in the autocast dtype.
    Gradients: u_scaled, every weight and bias, attn_gate.
    """
    refuse_dropout("gated_attention_branch", _UNFUSED, attn_drop=attn_drop, proj_drop=proj_drop)
    impl = select("gated_attention_branch", u_scaled, qkv_weight, qkv_bias, attn_gate, proj_weight, proj_bias,
                  num_heads, scale, forced=implementation)
    return impl(u_scaled, qkv_weight, qkv_bias, attn_gate, proj_weight, proj_bias, num_heads, scale)


def gated_mlp_branch(w_scaled: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None,
                     mlp_gate: torch.Tensor, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
                     approximate: str = "none", *, drop: float = 0.0, implementation: str | None = None
                     ) -> torch.Tensor:
    """The gated MLP branch of a search block, without the residual: fc2(GELU(fc1(w)) * mlp_gate).

    Args:
        w_scaled: (B, N, C), LN2(x) with the token scale applied (layernorm_token_scale).
        fc1_weight: (M, C) and fc1_bias: (M,) or None.
        mlp_gate: (M,), the MLP gate.
        fc2_weight: (C_out, M) and fc2_bias: (C_out,) or None.
        approximate: GELU form, "none" (exact erf, timm's nn.GELU) or "tanh".
        drop: must be 0 (the branch has no dropout; a ValueError says so otherwise).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (B, N, C_out). Under autocast the matmuls run in the autocast dtype.
    Gradients: w_scaled, every weight and bias, mlp_gate.
    """
    refuse_dropout("gated_mlp_branch", _UNFUSED, drop=drop)
    impl = select("gated_mlp_branch", w_scaled, fc1_weight, fc1_bias, mlp_gate, fc2_weight, fc2_bias, approximate,
                  forced=implementation)
    return impl(w_scaled, fc1_weight, fc1_bias, mlp_gate, fc2_weight, fc2_bias, approximate)


register("gated_attention_branch", "triton", lambda: gated_attention_branch_triton, triton_refusals)
register("gated_attention_branch", "reference", lambda: gated_attention_branch_ref, no_refusals)
register("gated_mlp_branch", "triton", lambda: gated_mlp_branch_triton, triton_refusals)
register("gated_mlp_branch", "reference", lambda: gated_mlp_branch_ref, no_refusals)


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of gated_attention_branch: 3 heads of 16, C = 48, N = 50, batch 2."""
    t = sample_tensors((2, 50, 48), (144, 48), (144,), (3, 16), (48, 48), (48,), device=device, dtype=dtype,
                       scale=0.5, requires_grad=requires_grad)
    return [((*t, 3, 16 ** -0.5), {})]


def gated_mlp_branch_sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                                   requires_grad: bool = False) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of gated_mlp_branch: C = 48, M = 96, N = 50, batch 2."""
    t = sample_tensors((2, 50, 48), (96, 48), (96,), (96,), (48, 96), (48,), device=device, dtype=dtype,
                       scale=0.5, requires_grad=requires_grad)
    return [((*t, "none"), {})]


describe_op(OpInfo("gated_attention_branch", gated_attention_branch, gated_attention_branch_ref, sample_inputs,
                   kernels=("gated_linear_fold", "gated_linear_fold_bwd", "ragged_attention_fwd",
                            "ragged_attention_bwd"), uses_dot=True, composite=True))
describe_op(OpInfo("gated_mlp_branch", gated_mlp_branch, gated_mlp_branch_ref, gated_mlp_branch_sample_inputs,
                   kernels=("gated_gelu_fwd", "gated_gelu_bwd"), composite=True))

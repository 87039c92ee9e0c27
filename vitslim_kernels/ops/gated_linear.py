"""Gated linear maps of the search model (DESIGN.md section 2): the qkv projection with the attention gate and
fc1 with bias, GELU and the MLP gate.

gated_linear:       y = (x @ W^T + b) * gate[r % R] on output column r   (the qkv projection, R = H*d, the
                    same gate on the q, k and v rows)
gated_gelu_linear:  h = GELU(x @ W^T + b) * gate                            (fc1 of the MLP)

The important algebra (DESIGN.md section 5): a gate on an output row of a linear map is a scaling of that
row of the weight and bias, so y = x @ (g*W)^T + g*b exactly, and with W' = g*W, b' = g*b:
dW = g * dW', db = g * db', dg[r] = sum_c dW'[r, c] * W[r, c] + db'[r] * b[r]: O(C^2) work, no activation pass.
The MLP gate sits after the GELU, so it cannot be folded into fc1; its gradient is a column sum of
dh * GELU(pre) over all rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import select

GELU_APPROXIMATIONS = ("none", "tanh")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: the autocast dtype where autocast is on for x's device, else x.dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def check_gated_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            gate: torch.Tensor) -> int:
    """Validate the arguments of gated_linear; returns the number of gate repeats (3 for qkv)."""
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (..., K) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    if gate.dim() != 1 or gate.numel() == 0 or out_features % gate.numel() != 0:
        raise ValueError(f"gate must be 1-D with a length dividing out_features = {out_features}, got shape "
                         f"{tuple(gate.shape)}")
    return out_features // gate.numel()


def check_gated_gelu_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 gate: torch.Tensor, approximate: str) -> None:
    """Validate the arguments of gated_gelu_linear."""
    check_gated_linear_args(x, weight, bias, gate)
    if gate.shape != (weight.shape[0],):
        raise ValueError(f"gate must be ({weight.shape[0]},), one per hidden unit, got {tuple(gate.shape)}")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def gated_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                     ) -> torch.Tensor:
    """The specification: the gate multiplies the activations after the bias. Shapes as in gated_linear."""
    repeats = check_gated_linear_args(x, weight, bias, gate)
    y = F.linear(x, weight, bias)
    return y * gate.repeat(repeats).to(y.dtype)


def gated_gelu_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                          approximate: str = "none") -> torch.Tensor:
    """The specification: GELU(x @ W^T + b) * gate. Shapes as in gated_gelu_linear."""
    check_gated_gelu_linear_args(x, weight, bias, gate, approximate)
    h = F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return h * gate.to(h.dtype)


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, *,
                 implementation: str | None = None) -> torch.Tensor:
    """y = (x @ weight^T + bias) * gate.repeat(out_features // R): a row-gated linear map (the gated qkv).

    Args:
        x: (..., K); for qkv, (B, N, C).
        weight: (O, K); for qkv (3*H*d, C), rows in timm's (3, H, d) order.
        bias: (O,) or None.
        gate: (R,) with O % R == 0; output column r is scaled by gate[r % R]. For qkv, the attention gate
            per dim, (H, d) flattened to (H*d,): the same gate on q, k and v.
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (..., O) in the matmul dtype (the autocast dtype under autocast, else x.dtype). For qkv this is the
        natural (B, N, 3, H, d) layout: q, k, v = y.split(H*d, -1) are strided (B, N, H*d) views that
        vitslim_kernels.ragged_attention reads without a copy.
    Gradients: x, weight, bias, gate.
    """
    impl = select("gated_linear", x, forced=implementation)
    return impl(x, weight, bias, gate)


def gated_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                      approximate: str = "none", *, implementation: str | None = None) -> torch.Tensor:
    """h = GELU(x @ weight^T + bias) * gate: fc1 of the MLP with its activation and the MLP gate.

    Args:
        x: (..., C).
        weight: (M, C); bias: (M,) or None.
        gate: (M,), the MLP gate (effective value = the raw value).
        approximate: "none" (exact erf GELU, timm's default) or "tanh".
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (..., M) in the matmul dtype (the autocast dtype under autocast, else x.dtype).
    Gradients: x, weight, bias, gate.
    """
    impl = select("gated_gelu_linear", x, forced=implementation)
    return impl(x, weight, bias, gate, approximate)

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

import math

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


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # fp16/bf16/fp32 in fp32 as the kernels do; fp64 stays


def gated_linear_fold_bwd_ref(dweight_folded: torch.Tensor, dbias_folded: torch.Tensor | None,
                              weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::gated_linear_fold_bwd returns, in plain PyTorch: (dW like weight, db like bias or
    (0,) without one, dgate like gate) from the gradients dW' (O, K) and db' (O,) of W' = g*W and b' = g*b.

    dW = g * dW', db = g * db', dg[j] = sum over rows r = j mod R of (sum_c dW'[r, c] * W[r, c] + db'[r] * b[r]).
    """
    O, R = weight.shape[0], gate.numel()
    dtype = _math_dtype(weight)
    g = gate.reshape(-1).to(dtype).repeat(O // R)                                       # (O,)
    dwf = dweight_folded.to(dtype)
    per_row = (dwf * weight.to(dtype)).sum(1)                                           # (O,)
    if bias is not None:
        dbf = dbias_folded.to(dtype)
        db = (dbf * g).to(bias.dtype)
        per_row = per_row + dbf * bias.to(dtype)
    else:
        db = weight.new_empty((0,))
    dg = per_row.view(O // R, R).sum(0).to(gate.dtype).view(gate.shape)
    return (dwf * g[:, None]).to(weight.dtype), db, dg


def _gelu_and_grad(a: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(a), GELU'(a)), written out (differentiable again), exact erf form or the tanh approximation."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (a + 0.044715 * a * a * a))
        return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * a * a)
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))


def gated_gelu_bwd_ref(dh: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::gated_gelu_bwd returns, in plain PyTorch: (dpre (T, M) like pre, dbias (M,) like
    bias or (0,) without one, dgate (M,) like gate) for h = GELU(pre + bias) * gate and its gradient dh.

    dpre = dh * gate * GELU'(pre + bias), dbias = sum_rows dpre (before rounding to pre's dtype),
    dgate = sum_rows dh * GELU(pre + bias).
    """
    dtype = _math_dtype(pre)
    a = pre.to(dtype) + bias.to(dtype) if bias is not None else pre.to(dtype)
    gelu, dgelu = _gelu_and_grad(a, approximate)
    dh = dh.to(dtype)
    da = dh * gate.to(dtype) * dgelu
    db = da.sum(0).to(bias.dtype) if bias is not None else pre.new_empty((0,))
    return da.to(pre.dtype), db, (dh * gelu).sum(0).to(gate.dtype)


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

"""LayerNorm fused with the token gate scaling and an optional static token gather (DESIGN.md sections 2, 5).

Output row i of every image is the LayerNorm of input row src(i) times a per-position scale:

    out[:, i] = LN(x[:, src(i)]) * (1 if i < num_prefix else tanh(token_raw[i - num_prefix]))

with src(i) = gather_index[i] when a gather is given (the kept positions, the same for every image: prefix
first, then the kept patches), else src(i) = i. Prefix tokens (class, distillation, register) are never scaled.
Input rows left out by the gather get a zero gradient.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..dispatch import select

GatherIndex = torch.Tensor | Sequence[int]


def _validate_gather_values(values: Sequence[int], n_in: int) -> None:
    if any(not 0 <= i < n_in for i in values):
        raise ValueError(f"gather_index must lie in [0, {n_in}), got {list(values)}")
    if any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"gather_index must be strictly increasing (sorted, no repeats), got {list(values)}")


@functools.lru_cache(maxsize=256)
def _cached_index(values: tuple[int, ...], n_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    _validate_gather_values(values, n_in)
    gather = torch.tensor(values, dtype=torch.int64, device=device)
    return gather, inverse_index(gather, n_in)


def inverse_index(gather: torch.Tensor, n_in: int) -> torch.Tensor:
    """(N_in,) int32: the output row of each input row, -1 for a row the gather leaves out."""
    inverse = torch.full((n_in,), -1, dtype=torch.int32, device=gather.device)
    inverse[gather] = torch.arange(gather.numel(), dtype=torch.int32, device=gather.device)
    return inverse


def gather_tensors(gather_index: GatherIndex | None, n_in: int, device: torch.device
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gather (N_out,) int64, inverse (N_in,) int32) on `device`, or (None, None) without a gather.

    A sequence of ints is validated once and cached per device (pass a tuple on the hot path); a CPU tensor is
    validated on every call; a CUDA tensor is trusted (validating it would synchronise the device).
    """
    if gather_index is None:
        return None, None
    if not isinstance(gather_index, torch.Tensor):
        return _cached_index(tuple(int(i) for i in gather_index), n_in, device)
    if gather_index.dim() != 1 or gather_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"gather_index must be a 1-D int32/int64 tensor, got {gather_index.dtype} of shape "
                         f"{tuple(gather_index.shape)}")
    if gather_index.device.type == "cpu":
        _validate_gather_values(gather_index.tolist(), n_in)
    gather = gather_index.to(device=device, dtype=torch.int64)
    return gather, inverse_index(gather, n_in)


def check_layernorm_token_scale_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                     token_raw: torch.Tensor, num_prefix: int,
                                     gather_index: GatherIndex | None) -> int:
    """Validate the arguments of layernorm_token_scale; returns N_out."""
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (B, N, C) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    C = x.shape[-1]
    if C == 0:
        raise ValueError("x has C = 0 features: LayerNorm needs at least one")
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"weight and bias must be ({C},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if token_raw.dim() != 1:
        raise ValueError(f"token_raw must be 1-D (one raw gate per kept patch), got shape {tuple(token_raw.shape)}")
    if num_prefix < 0:
        raise ValueError(f"num_prefix must be >= 0, got {num_prefix}")
    n_out = num_prefix + token_raw.shape[0]
    n_gather = x.shape[1] if gather_index is None else len(gather_index)
    if n_gather != n_out:
        what = "x has" if gather_index is None else "gather_index has"
        raise ValueError(f"{what} {n_gather} rows but num_prefix + len(token_raw) = {num_prefix} + "
                         f"{token_raw.shape[0]} = {n_out}")
    return n_out


def layernorm_token_scale_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                              token_raw: torch.Tensor, num_prefix: int, gather_index: GatherIndex | None = None,
                              *, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The specification, in plain PyTorch (float64-capable). Shapes as in layernorm_token_scale."""
    check_layernorm_token_scale_args(x, weight, bias, token_raw, num_prefix, gather_index)
    gather, _ = gather_tensors(gather_index, x.shape[1], x.device)
    if gather is not None:
        x = x[:, gather]
    y = F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), eps)
    scale = torch.cat([token_raw.new_ones(num_prefix), torch.tanh(token_raw)]).to(y.dtype)
    y = y * scale.unsqueeze(-1)
    return y if out_dtype is None else y.to(out_dtype)


def layernorm_token_scale_fwd_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  token_raw: torch.Tensor, gather: torch.Tensor | None, num_prefix: int, eps: float,
                                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::layernorm_token_scale_fwd returns, in plain PyTorch: (y (B, N_out, C) in out_dtype,
    mean (B, N_out) and rstd = 1 / sqrt(var + eps) (B, N_out) float32, the statistics of each output row)."""
    rows = x if gather is None else x[:, gather]
    dtype = torch.promote_types(x.dtype, torch.float32)
    xs = rows.to(dtype)
    mean = xs.mean(-1)
    rstd = torch.rsqrt((xs - mean.unsqueeze(-1)).square().mean(-1) + eps)
    y = F.layer_norm(xs, (x.shape[-1],), weight.to(dtype), bias.to(dtype), eps)
    scale = torch.cat([token_raw.new_ones(num_prefix), torch.tanh(token_raw)]).to(dtype)
    return (y * scale.unsqueeze(-1)).to(out_dtype), mean.to(torch.float32), rstd.to(torch.float32)


def layernorm_token_scale_bwd_ref(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                  token_raw: torch.Tensor, inverse: torch.Tensor | None, mean: torch.Tensor,
                                  rstd: torch.Tensor, num_prefix: int
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::layernorm_token_scale_bwd returns, as an explicit function of ALL its inputs (mean
    and rstd too): (dx like x, dweight like weight, dbias like bias, dtoken_raw like token_raw).

    Input row n of an image feeds output row j = inverse[n] (-1: dropped, zero gradient). With
    xhat = (x - mean_j) * rstd_j, s_j = 1 (prefix) or tanh(token_raw[j - R]) and g = dy_j * s_j:
    dweight = sum g * xhat, dbias = sum g, dx = (g*w - xhat * mean_c(g*w*xhat) - mean_c(g*w)) * rstd_j, and
    dtoken_raw[j - R] = (1 - s_j^2) * sum over images and c of dy_j * (xhat * w + bias).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    B, N_in, C = x.shape
    N_out = mean.shape[1]
    scale = torch.cat([token_raw.new_ones(num_prefix), torch.tanh(token_raw)]).to(dtype)     # (N_out,)
    if inverse is None:
        dy_in, mean_in, rstd_in, s_in = dy.to(dtype), mean, rstd, scale
    else:  # everything in input-row space: static shapes, dropped rows masked to zero
        kept = (inverse >= 0).to(dtype)
        rows = inverse.clamp(min=0).long()
        dy_in = dy[:, rows].to(dtype) * kept[None, :, None]
        mean_in, rstd_in, s_in = mean[:, rows], rstd[:, rows], scale[rows]
    mean_in, rstd_in = mean_in.to(dtype).unsqueeze(-1), rstd_in.to(dtype).unsqueeze(-1)
    w, b = weight.to(dtype), bias.to(dtype)
    xhat = (x.to(dtype) - mean_in) * rstd_in
    g = dy_in * s_in[None, :, None]
    dxhat = g * w
    dx = (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True) - dxhat.mean(-1, keepdim=True)) * rstd_in
    per_row = (dy_in * (xhat * w + b)).sum(-1)                                                  # (B, N_in)
    if inverse is not None:
        per_row = per_row.new_zeros((B, N_out)).index_add(1, rows, per_row)
    dtoken = (per_row[:, num_prefix:] * (1 - scale[num_prefix:].square())).sum(0)
    return (dx.to(x.dtype), (g * xhat).sum((0, 1)).to(weight.dtype), g.sum((0, 1)).to(bias.dtype),
            dtoken.to(token_raw.dtype))


def layernorm_token_scale(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                          token_raw: torch.Tensor, num_prefix: int, gather_index: GatherIndex | None = None,
                          *, out_dtype: torch.dtype | None = None, implementation: str | None = None
                          ) -> torch.Tensor:
    """LayerNorm over the last dim, then prefix rows scaled by 1 and patch rows by tanh(token_raw).

    Args:
        x: (B, N_in, C).
        weight, bias: (C,) LayerNorm affine parameters (any float dtype; the kernel computes in float32).
        eps: LayerNorm epsilon.
        token_raw: (P_kept,) raw token gates of the output's patch rows (effective scale tanh(raw)).
        num_prefix: R, the number of leading prefix rows of the output (scale 1).
        gather_index: None (N_out = N_in), or (N_out,) strictly increasing input rows to keep, prefix rows first;
            a tuple of ints is validated once and cached, a CUDA tensor is trusted as is.
        out_dtype: dtype of the output (default x.dtype); under autocast pass the autocast dtype so the next
            matmul reads it without a cast.
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (B, N_out, C) with N_out = num_prefix + P_kept.
    Gradients: x, weight, bias and token_raw.
    """
    impl = select("layernorm_token_scale", x, forced=implementation)
    return impl(x, weight, bias, eps, token_raw, num_prefix, gather_index, out_dtype=out_dtype)

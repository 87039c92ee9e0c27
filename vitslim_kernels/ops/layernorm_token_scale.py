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

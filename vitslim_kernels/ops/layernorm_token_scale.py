"""LayerNorm fused with the token gate scaling and an optional static token gather (docs/design.md sections 2, 5).

Output row i of every image is the LayerNorm of input row src(i) times a per-position scale:

    out[:, i] = LN(x[:, src(i)]) * (1 if i < num_prefix else tanh(token_raw[i - num_prefix]))

with src(i) = gather_index[i] when a gather is given (the kept positions, the same for every image: prefix
first, then the kept patches), else src(i) = i. Prefix tokens (class, distillation, register) are never scaled.
Input rows left out by the gather get a zero gradient.

In this file, in order: the gather index helpers and argument checks; the references; the torch.library ops
vitslim::layernorm_token_scale_fwd -> (y, mean, rstd) and vitslim::layernorm_token_scale_bwd with their fake
implementations and autograd; the public functional; its implementations registered with dispatch;
`sample_inputs`. The ops launch the Triton kernels of triton/layernorm_token_scale.py and compute the reference
math on CPU tensors without the interpreter.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import torch.nn.functional as F

from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import reference_on, register_fallback, triton_refusals
from ._library import define_op, formula_vjp, math_dtype, sample_tensors

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
    dtype = math_dtype(x)
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
    dtype = math_dtype(x)
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


# ---------------------------------------------------------------------------------------------------------
# The torch.library ops (triton_op or custom_op: see ops/_library.py) and their autograd
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from ..triton import layernorm_token_scale as kernels  # optional: needs triton; imported when a kernel runs
    return kernels


def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_raw: torch.Tensor,
         gather: torch.Tensor | None, num_prefix: int, eps: float, out_dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reference_on(x):
        return layernorm_token_scale_fwd_ref(x, weight, bias, token_raw, gather, num_prefix, eps, out_dtype)
    return _kernels()._fwd(x, weight, bias, token_raw, gather, num_prefix, eps, out_dtype)


def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_raw: torch.Tensor,
         inverse: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_prefix: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if reference_on(x):
        return layernorm_token_scale_bwd_ref(dy, x, weight, bias, token_raw, inverse, mean, rstd, num_prefix)
    return _kernels()._bwd(dy, x, weight, bias, token_raw, inverse, mean, rstd, num_prefix)


def _layernorm_token_scale_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_raw: torch.Tensor,
                               gather: Optional[torch.Tensor], inverse: Optional[torch.Tensor], num_prefix: int,
                               eps: float, out_dtype: torch.dtype
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (B, N_out, C) in out_dtype, mean (B, N_out) fp32, rstd (B, N_out) fp32).

    gather: (N_out,) int64 input row of each output row, or None; inverse: its inverse map (N_in,) int32
    (inverse_index), read only by the backward (passed in so it is built once per gather, not per step), or None
    to have the backward build it.
    """
    return _fwd(x, weight, bias, token_raw, gather, num_prefix, eps, out_dtype)


def _layernorm_token_scale_fwd_fake(x, weight, bias, token_raw, gather, inverse, num_prefix, eps, out_dtype):
    B, N_in, C = x.shape
    N_out = N_in if gather is None else gather.shape[0]
    return (x.new_empty((B, N_out, C), dtype=out_dtype), x.new_empty((B, N_out), dtype=torch.float32),
            x.new_empty((B, N_out), dtype=torch.float32))


def _layernorm_token_scale_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               token_raw: torch.Tensor, inverse: Optional[torch.Tensor], mean: torch.Tensor,
                               rstd: torch.Tensor, num_prefix: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, dweight like weight, dbias like bias, dtoken_raw like token_raw)."""
    return _bwd(dy, x, weight, bias, token_raw, inverse, mean, rstd, num_prefix)


def _layernorm_token_scale_bwd_fake(dy, x, weight, bias, token_raw, inverse, mean, rstd, num_prefix):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape), \
        token_raw.new_empty(token_raw.shape)


layernorm_token_scale_fwd = define_op("vitslim::layernorm_token_scale_fwd", _layernorm_token_scale_fwd,
                                      _layernorm_token_scale_fwd_fake)
layernorm_token_scale_bwd = define_op("vitslim::layernorm_token_scale_bwd", _layernorm_token_scale_bwd,
                                      _layernorm_token_scale_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    x, weight, bias, token_raw, gather, inverse, num_prefix, eps, out_dtype = inputs
    _, mean, rstd = output
    if gather is not None and inverse is None:
        inverse = inverse_index(gather, x.shape[1])
    ctx.save_for_backward(x, weight, bias, token_raw, gather, inverse, mean, rstd)
    ctx.num_prefix, ctx.eps, ctx.out_dtype = num_prefix, eps, out_dtype
    ctx.set_materialize_grads(False)  # unused mean and rstd get None, not zero tensors to add


def _fwd_backward(ctx, dy, dmean, drstd):
    x, weight, bias, token_raw, gather, inverse, mean, rstd = ctx.saved_tensors
    if dy is None and dmean is None and drstd is None:
        return (None,) * 9
    if dy is None:
        dy = x.new_zeros((*mean.shape, x.shape[-1]), dtype=ctx.out_dtype)
    dx, dweight, dbias, dtoken = torch.ops.vitslim.layernorm_token_scale_bwd(
        dy, x, weight, bias, token_raw, inverse, mean, rstd, ctx.num_prefix)
    if dmean is not None or drstd is not None:
        # mean and rstd are differentiable outputs (the backward op reads them, so second derivatives flow
        # through them); only a double backward or a caller of the op itself gives them a gradient.
        args = (x, weight, bias, token_raw, gather, ctx.num_prefix, ctx.eps, ctx.out_dtype)
        dx_stats = formula_vjp(layernorm_token_scale_fwd_ref, args, (None, dmean, drstd),
                               (True,) + (False,) * 7)[0]
        dx = dx + dx_stats
    return dx, dweight, dbias, dtoken, None, None, None, None, None


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.num_prefix = inputs[8]
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, ddx, ddweight, ddbias, ddtoken):
    """Double backward: the VJP of layernorm_token_scale_bwd_ref, the backward as a function of dy, x, the
    parameters, mean and rstd."""
    args = (*ctx.saved_tensors, ctx.num_prefix)
    return formula_vjp(layernorm_token_scale_bwd_ref, args, (ddx, ddweight, ddbias, ddtoken), ctx.needs_input_grad)


layernorm_token_scale_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
layernorm_token_scale_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


def layernorm_token_scale_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                                 token_raw: torch.Tensor, num_prefix: int, gather_index=None, *,
                                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Triton implementation of vitslim_kernels.layernorm_token_scale: (B, N_in, C) -> (B, N_out, C)."""
    check_layernorm_token_scale_args(x, weight, bias, token_raw, num_prefix, gather_index)
    gather, inverse = gather_tensors(gather_index, x.shape[1], x.device)
    y, _, _ = torch.ops.vitslim.layernorm_token_scale_fwd(x, weight, bias, token_raw, gather, inverse,
                                                          int(num_prefix), float(eps), out_dtype or x.dtype)
    return y


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
    impl = select("layernorm_token_scale", x, weight, bias, eps, token_raw, num_prefix, gather_index,
                  out_dtype=out_dtype, forced=implementation)
    return impl(x, weight, bias, eps, token_raw, num_prefix, gather_index, out_dtype=out_dtype)


register("layernorm_token_scale", "triton", lambda: layernorm_token_scale_triton, triton_refusals)
register("layernorm_token_scale", "reference", lambda: layernorm_token_scale_ref, no_refusals)
register_fallback("layernorm_token_scale_fwd", layernorm_token_scale_fwd_ref)
register_fallback("layernorm_token_scale_bwd", layernorm_token_scale_bwd_ref)


SAMPLE_GATHER = tuple([0] + list(range(1, 50, 2)))  # the prefix row and every other patch of 50 rows


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of layernorm_token_scale: C = 48, N = 50, a class token, a gather that keeps every
    other patch, batch 2."""
    x, token_raw = sample_tensors((2, 50, 48), (len(SAMPLE_GATHER) - 1,), device=device, dtype=dtype,
                                  requires_grad=requires_grad)
    weight, bias = sample_tensors((48,), (48,), device=device, dtype=dtype, seed=2, requires_grad=requires_grad)
    return [((x, weight, bias, 1e-6, token_raw, 1, SAMPLE_GATHER), {})]


def library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck of this module's ops: C = 24,
    17 input rows, a gather of the prefix row and 3 patches (the last row too) or none, a prefix row or none, a bf16
    output. A backward op's saved tensors come from its forward op, run when the args are made."""
    eps = 1e-6

    def forward_args(dtype: torch.dtype, gather_index, num_prefix: int = 1, out_dtype=None) -> tuple:
        (x,) = sample_tensors((3, 17, 24), device="cpu", dtype=dtype, scale=2.0)
        gather, inverse = gather_tensors(gather_index, 17, x.device)
        rows = 17 if gather is None else gather.numel()
        weight, bias, raw = sample_tensors((24,), (24,), (rows - num_prefix,), device="cpu", dtype=torch.float32,
                                           seed=1)
        return (x + 0.5, 1 + 0.5 * weight, 0.5 * bias, 1.5 * raw, gather, inverse, num_prefix, eps,
                out_dtype or dtype)

    def backward_args(dtype: torch.dtype, out_dtype=None, num_prefix: int = 1) -> tuple:
        x, weight, bias, raw, gather, inverse, num_prefix, _, out_dtype = forward_args(
            dtype, (0, 2, 3, 16), num_prefix, out_dtype)
        y, mean, rstd = torch.ops.vitslim.layernorm_token_scale_fwd(x, weight, bias, raw, gather, inverse, num_prefix,
                                                                    eps, out_dtype)
        (grad,) = sample_tensors(tuple(y.shape), device="cpu", dtype=y.dtype, seed=4)
        return (grad, x, weight, bias, raw, inverse, mean, rstd, num_prefix)

    return [("fp32 gather", "layernorm_token_scale_fwd", lambda: forward_args(torch.float32, (0, 2, 3, 16))),
            ("fp16 no gather", "layernorm_token_scale_fwd", lambda: forward_args(torch.float16, None)),
            ("fp32 gather", "layernorm_token_scale_bwd", lambda: backward_args(torch.float32)),
            ("fp32->bf16 no prefix", "layernorm_token_scale_bwd",
             lambda: backward_args(torch.float32, torch.bfloat16, 0))]


describe_op(OpInfo("layernorm_token_scale", layernorm_token_scale, layernorm_token_scale_ref, sample_inputs,
                   library_ops=("layernorm_token_scale_fwd", "layernorm_token_scale_bwd"),
                   kernels=("layernorm_token_scale_fwd", "layernorm_token_scale_bwd"),
                   kernel_modules=("vitslim_kernels.triton.layernorm_token_scale",),
                   library_samples=library_samples))

"""Triton LayerNorm + token gate scale + static token gather (docs/design.md sections 2 and 5).

out[b, i] = (xhat(x[b, src(i)]) * w + bias) * s_i,   s_i = 1 (prefix rows) or tanh(token_raw[i - R]).

Kernels:
- `_layernorm_token_scale_fwd_kernel`: one program per BLOCK_R output rows, full rows of C in registers as two
  power-of-two column slices A + B (384 = 256 + 128: no idle lanes, where next_power_of_2(C) = 512 idled a
  quarter), statistics in fp32; the gather is a row-index load, so the gathered copy of
  x is never materialised. Writes the output and the per-row mean and 1/std (fp32) for the backward.
- `_layernorm_token_scale_bwd_kernel`: one program per chunk of INPUT rows (tiles of BLOCK_R rows, in order).
  Each input row finds its output row through the inverse map (-1 when the gather left it out, which gives
  a zero dx row), so every dx element is written exactly once, with no scatter and no zero-fill pass. The same
  pass produces per-program partial sums of dweight and dbias ((programs, C) fp32 buffers, summed afterwards
  by one torch.sum over dim 0: a fixed order, no atomics) and, per output row, (1 - s^2) * sum_c dy * LN(x),
  whose sum over the batch (again one torch.sum) is the gradient of the raw token gate.

Deterministic: no atomics anywhere; the partition of rows into programs depends only on the shape and the
device's SM count.

Launchers (each fail_safe; their PyTorch fallbacks are registered by the ops): `_fwd` and `_bwd`. The ops that
call them (vitslim::layernorm_token_scale_fwd / _bwd), their checks and references are in
ops/layernorm_token_scale.py.
"""
import torch
import triton
import triton.language as tl

from ..runtime import alloc as _alloc
from ..runtime import fail_safe
from ._launch import check_device, interpreter_agrees, kernel_wrapper, sm_count


@triton.jit
def _tanh(z):
    # tl has no tanh. Written with exp(-2|z|) <= 1 so nothing overflows; absolute error ~1 ulp of 1.0.
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _load_rows(ptr_rows, cols, stride_c, mask_r, C):
    """A (rows, len(cols)) fp32 tile of rows at ptr_rows (one pointer per row), masked to columns < C."""
    mask = mask_r[:, None] & (cols < C)[None, :]
    return tl.load(ptr_rows[:, None] + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _layernorm_token_scale_fwd_kernel(
    X,                                      # (B, N_in, C) input, any strides
    W, BIAS,                                # (C,) LayerNorm weight and bias, contiguous
    TOKEN_RAW,                              # (N_out - NUM_PREFIX,) raw token gates (a dummy when empty)
    GATHER,                                 # (N_out,) int64: input row of each output row (read if HAS_GATHER)
    Y,                                      # (B, N_out, C) out
    MEAN, RSTD,                             # (B * N_out,) fp32 out: statistics of each output row
    stride_xb, stride_xn, stride_xc,        # strides of x
    stride_yb, stride_yn, stride_yc,        # strides of y
    num_rows,                               # B * N_out
    N_OUT,                                  # output rows per image
    C,                                      # features
    NUM_PREFIX,                             # leading output rows with scale 1
    eps,                                    # LayerNorm epsilon
    HAS_GATHER: tl.constexpr,               # whether output row i reads input row GATHER[i] (else row i)
    BLOCK_R: tl.constexpr,                  # rows per program
    BLOCK_A: tl.constexpr,                  # columns [0, BLOCK_A): the largest power of two <= C
    BLOCK_B: tl.constexpr,                  # columns [BLOCK_A, BLOCK_A + BLOCK_B) (masked to C), or 0
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < num_rows
    b = (rows // N_OUT).to(tl.int64)  # int64: b * stride_xb can pass 2**31 for large batches
    i = rows % N_OUT
    if HAS_GATHER:
        src = tl.load(GATHER + i, mask=mask_r, other=0)
    else:
        src = i.to(tl.int64)
    x_rows = X + b * stride_xb + src * stride_xn
    y_rows = Y + b * stride_yb + i * stride_yn
    is_patch = i >= NUM_PREFIX
    raw = tl.load(TOKEN_RAW + tl.where(is_patch, i - NUM_PREFIX, 0), mask=mask_r & is_patch, other=0.0)
    s = tl.where(is_patch, _tanh(raw.to(tl.float32)), 1.0)

    # A row is held as two power-of-two slices, A + B: C = 384 is 256 + 128 and C = 768 is 512 + 256, with no
    # idle lane, where one tile of next_power_of_2(C) leaves a quarter of them masked.
    cols_a = tl.arange(0, BLOCK_A)
    x_a, mask_a = _load_rows(x_rows, cols_a, stride_xc, mask_r, C)
    total = tl.sum(x_a, 1)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        x_b, mask_b = _load_rows(x_rows, cols_b, stride_xc, mask_r, C)
        total += tl.sum(x_b, 1)
    mean = total / C
    xc_a = tl.where(mask_a, x_a - mean[:, None], 0.0)
    var = tl.sum(xc_a * xc_a, 1)
    if BLOCK_B > 0:
        xc_b = tl.where(mask_b, x_b - mean[:, None], 0.0)
        var += tl.sum(xc_b * xc_b, 1)
    rstd = 1.0 / tl.sqrt(var / C + eps)

    w_a = tl.load(W + cols_a, mask=cols_a < C, other=0.0).to(tl.float32)
    bias_a = tl.load(BIAS + cols_a, mask=cols_a < C, other=0.0).to(tl.float32)
    y_a = (xc_a * rstd[:, None] * w_a[None, :] + bias_a[None, :]) * s[:, None]
    tl.store(y_rows[:, None] + cols_a[None, :] * stride_yc, y_a.to(Y.dtype.element_ty), mask=mask_a)
    if BLOCK_B > 0:
        w_b = tl.load(W + cols_b, mask=cols_b < C, other=0.0).to(tl.float32)
        bias_b = tl.load(BIAS + cols_b, mask=cols_b < C, other=0.0).to(tl.float32)
        y_b = (xc_b * rstd[:, None] * w_b[None, :] + bias_b[None, :]) * s[:, None]
        tl.store(y_rows[:, None] + cols_b[None, :] * stride_yc, y_b.to(Y.dtype.element_ty), mask=mask_b)
    tl.store(MEAN + rows, mean, mask=mask_r)
    tl.store(RSTD + rows, rstd, mask=mask_r)


@triton.jit
def _ln_bwd_slice(x_rows, dy_rows, dx_rows, cols, stride_xc, stride_dyc, stride_dxc, kept, mask_r, C, W, BIAS,
                  mean, rstd, s):
    """One column slice of a backward tile: (xhat, g = dy * s, dxhat = g * w, dy * LN(x), dx's pointers and
    store mask), all (rows, len(cols)); 0 outside the real columns and on rows the gather dropped."""
    x, mask = _load_rows(x_rows, cols, stride_xc, kept, C)
    dy, _ = _load_rows(dy_rows, cols, stride_dyc, kept, C)
    w = tl.load(W + cols, mask=cols < C, other=0.0).to(tl.float32)
    bias = tl.load(BIAS + cols, mask=cols < C, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * s[:, None]                                  # gradient of the LayerNorm output (0 if dropped)
    dxhat = g * w[None, :]
    dy_ln = tl.where(mask, dy * (xhat * w[None, :] + bias[None, :]), 0.0)
    dx_ptrs = dx_rows[:, None] + cols[None, :] * stride_dxc
    return xhat, g, dxhat, dy_ln, dx_ptrs, mask_r[:, None] & (cols < C)[None, :]


@triton.jit
def _layernorm_token_scale_bwd_kernel(
    X,                                      # (B, N_in, C) forward input, any strides
    W, BIAS,                                # (C,) LayerNorm weight and bias, contiguous
    TOKEN_RAW,                              # (N_out - NUM_PREFIX,) raw token gates (a dummy when empty)
    INVERSE,                                # (N_in,) int32: output row of each input row, -1 if dropped
    DY,                                     # (B, N_out, C) gradient of the output, any strides
    MEAN, RSTD,                             # (B * N_out,) fp32 forward statistics
    DX,                                     # (B, N_in, C) out
    DW_PARTIAL, DB_PARTIAL,                 # (programs, C) fp32 out: this program's sums of dweight, dbias
    DSCALE,                                 # (B * N_out,) fp32 out: (1 - s^2) * sum_c dy * LN(x) per out row
    stride_xb, stride_xn, stride_xc,        # strides of x
    stride_dyb, stride_dyn, stride_dyc,     # strides of dy
    stride_dxb, stride_dxn, stride_dxc,     # strides of dx
    stride_partial,                         # row stride of the partial-sum buffers
    num_rows,                               # B * N_in (input rows: every dx row is written)
    tiles_per_program,                      # BLOCK_R-row tiles each program handles, in order
    N_IN,                                   # input rows per image
    N_OUT,                                  # output rows per image
    C,                                      # features
    NUM_PREFIX,                             # leading output rows with scale 1
    HAS_GATHER: tl.constexpr,               # whether INVERSE maps input rows to output rows (else identity)
    BLOCK_R: tl.constexpr,                  # rows per tile
    BLOCK_A: tl.constexpr,                  # columns [0, BLOCK_A): the largest power of two <= C
    BLOCK_B: tl.constexpr,                  # columns [BLOCK_A, BLOCK_A + BLOCK_B) (masked to C), or 0
):
    pid = tl.program_id(0)
    cols_a = tl.arange(0, BLOCK_A)
    dw_a = tl.zeros([BLOCK_A], tl.float32)
    db_a = tl.zeros([BLOCK_A], tl.float32)
    if BLOCK_B > 0:
        cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
        dw_b = tl.zeros([BLOCK_B], tl.float32)
        db_b = tl.zeros([BLOCK_B], tl.float32)
    for t in range(tiles_per_program):
        rows = (pid * tiles_per_program + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = rows < num_rows
        b = (rows // N_IN).to(tl.int64)
        n = rows % N_IN
        if HAS_GATHER:
            j = tl.load(INVERSE + n, mask=mask_r, other=-1)
        else:
            j = n
        kept = mask_r & (j >= 0)
        out_row = b * N_OUT + j
        mean = tl.load(MEAN + out_row, mask=kept, other=0.0)
        rstd = tl.load(RSTD + out_row, mask=kept, other=0.0)
        is_patch = j >= NUM_PREFIX
        raw = tl.load(TOKEN_RAW + tl.where(is_patch, j - NUM_PREFIX, 0), mask=kept & is_patch, other=0.0)
        s = tl.where(is_patch, _tanh(raw.to(tl.float32)), 1.0)
        x_rows = X + b * stride_xb + n * stride_xn
        dy_rows = DY + b * stride_dyb + j * stride_dyn
        dx_rows = DX + b * stride_dxb + n * stride_dxn

        xhat_a, g_a, dxhat_a, dyln_a, dx_ptrs_a, store_a = _ln_bwd_slice(
            x_rows, dy_rows, dx_rows, cols_a, stride_xc, stride_dyc, stride_dxc, kept, mask_r, C, W, BIAS,
            mean, rstd, s)
        dw_a += tl.sum(g_a * xhat_a, 0)
        db_a += tl.sum(g_a, 0)
        c1 = tl.sum(dxhat_a * xhat_a, 1)
        c2 = tl.sum(dxhat_a, 1)
        dot_ln = tl.sum(dyln_a, 1)
        if BLOCK_B > 0:
            xhat_b, g_b, dxhat_b, dyln_b, dx_ptrs_b, store_b = _ln_bwd_slice(
                x_rows, dy_rows, dx_rows, cols_b, stride_xc, stride_dyc, stride_dxc, kept, mask_r, C, W, BIAS,
                mean, rstd, s)
            dw_b += tl.sum(g_b * xhat_b, 0)
            db_b += tl.sum(g_b, 0)
            c1 += tl.sum(dxhat_b * xhat_b, 1)
            c2 += tl.sum(dxhat_b, 1)
            dot_ln += tl.sum(dyln_b, 1)
        c1 = c1 / C
        c2 = c2 / C
        dx_a = (dxhat_a - xhat_a * c1[:, None] - c2[:, None]) * rstd[:, None]  # exactly 0 on dropped rows
        tl.store(dx_ptrs_a, dx_a.to(DX.dtype.element_ty), mask=store_a)
        if BLOCK_B > 0:
            dx_b = (dxhat_b - xhat_b * c1[:, None] - c2[:, None]) * rstd[:, None]
            tl.store(dx_ptrs_b, dx_b.to(DX.dtype.element_ty), mask=store_b)
        tl.store(DSCALE + out_row, dot_ln * (1.0 - s * s), mask=kept)  # d/draw of tanh(raw) = 1 - tanh^2
    tl.store(DW_PARTIAL + pid * stride_partial + cols_a, dw_a, mask=cols_a < C)
    tl.store(DB_PARTIAL + pid * stride_partial + cols_a, db_a, mask=cols_a < C)
    if BLOCK_B > 0:
        tl.store(DW_PARTIAL + pid * stride_partial + cols_b, dw_b, mask=cols_b < C)
        tl.store(DB_PARTIAL + pid * stride_partial + cols_b, db_b, mask=cols_b < C)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------

_INTERPRETED = interpreter_agrees(_layernorm_token_scale_fwd_kernel, __name__)
wrap_triton = kernel_wrapper(_INTERPRETED)


def _check_device(t: torch.Tensor) -> None:
    check_device(t, "layernorm_token_scale", _INTERPRETED)


def _column_slices(C: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): a row of C features as power-of-two slices A + B >= C, A the largest power of two
    <= C and B the next power of two >= C - A (0 if none is left): 384 -> (256, 128), 768 -> (512, 256), 192 ->
    (128, 64), 1024 -> (1024, 0), 44 -> (32, 16). Where B would equal A, one slice of 2A."""
    a = 1 << (C.bit_length() - 1)
    rest = C - a
    if rest == 0:
        return a, 0
    b = triton.next_power_of_2(rest)
    return (2 * a, 0) if b == a else (a, b)


def _config(C: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_A, BLOCK_B, num_warps)."""
    block_a, block_b = _column_slices(C)
    if _INTERPRETED:
        return 8, block_a, block_b, 1  # 8-row tiles: N = 17 or 50 gives several programs and a partial last tile
    # Not yet measured (no GPU in the session that wrote this): ~4K fp32 elements per tile, 4 warps
    # (C = 384: 8 rows of 256 + 128; C = 768: 4 rows of 512 + 256). To be tuned with benchmark P1.
    width = triton.next_power_of_2(block_a + block_b)
    return max(1, 4096 // width), block_a, block_b, 4 if width <= 1024 else 8


def _bwd_programs(num_tiles: int, device: torch.device) -> int:
    if _INTERPRETED:
        return triton.cdiv(num_tiles, 2)  # 2 tiles per program: the in-program accumulation is exercised
    # Not yet measured: 4 programs per SM keep every SM busy while the (programs, C) partial buffers stay
    # small (528 x 384 fp32 = 0.8 MB for DeiT-S on an H100) next to dx itself.
    return min(num_tiles, 4 * sm_count(device))


@fail_safe("layernorm_token_scale_fwd")  # its fallback: ops/layernorm_token_scale.py registers it
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_raw: torch.Tensor,
         gather: torch.Tensor | None, num_prefix: int, eps: float, out_dtype: torch.dtype
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N_in, C = x.shape
    N_out = N_in if gather is None else gather.shape[0]
    y = _alloc((B, N_out, C), x, out_dtype)
    mean = _alloc((B, N_out), x, torch.float32)
    rstd = _alloc((B, N_out), x, torch.float32)
    if B * N_out == 0:
        return y, mean, rstd
    _check_device(x)
    block_r, block_a, block_b, num_warps = _config(C, x.device)
    weight, bias, token_raw = weight.contiguous(), bias.contiguous(), token_raw.contiguous()
    gather = gather.contiguous() if gather is not None else None
    grid = (triton.cdiv(B * N_out, block_r),)
    wrap_triton(_layernorm_token_scale_fwd_kernel)[grid](
        x, weight, bias,
        token_raw if token_raw.numel() > 0 else weight,  # never read when there is no patch row
        gather if gather is not None else mean,          # never read without a gather
        y, mean, rstd,
        x.stride(0), x.stride(1), x.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        B * N_out, N_out, C, num_prefix, eps,
        HAS_GATHER=gather is not None, BLOCK_R=block_r, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=num_warps)
    return y, mean, rstd


@fail_safe("layernorm_token_scale_bwd")  # its fallback: ops/layernorm_token_scale.py registers it
def _bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token_raw: torch.Tensor,
         inverse: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, num_prefix: int
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    B, N_in, C = x.shape
    N_out = mean.shape[1]
    dx = _alloc((B, N_in, C), x)
    if B * N_in == 0:
        zero = torch.zeros((C,), dtype=torch.float32, device=x.device)
        return dx, zero.to(weight.dtype), zero.to(bias.dtype), token_raw.new_zeros(token_raw.shape)
    _check_device(x)
    block_r, block_a, block_b, num_warps = _config(C, x.device)
    num_tiles = triton.cdiv(B * N_in, block_r)
    programs = _bwd_programs(num_tiles, x.device)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)
    dw_partial = _alloc((programs, C), x, torch.float32)
    db_partial = _alloc((programs, C), x, torch.float32)
    dscale = _alloc((B, N_out), x, torch.float32)
    weight, bias, token_raw = weight.contiguous(), bias.contiguous(), token_raw.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()  # read as flat (B * N_out,) vectors
    inverse = inverse.contiguous() if inverse is not None else None
    wrap_triton(_layernorm_token_scale_bwd_kernel)[(programs,)](
        x, weight, bias,
        token_raw if token_raw.numel() > 0 else weight,
        inverse if inverse is not None else mean,
        dy, mean, rstd, dx, dw_partial, db_partial, dscale,
        x.stride(0), x.stride(1), x.stride(2),
        dy.stride(0), dy.stride(1), dy.stride(2),
        dx.stride(0), dx.stride(1), dx.stride(2),
        dw_partial.stride(0),
        B * N_in, tiles_per_program, N_in, N_out, C, num_prefix,
        HAS_GATHER=inverse is not None, BLOCK_R=block_r, BLOCK_A=block_a, BLOCK_B=block_b, num_warps=num_warps)
    # Fixed-order reductions (torch.sum has no atomics): over programs, and over the batch for the token gate.
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(bias.dtype)
    dtoken = dscale[:, num_prefix:].sum(0).to(token_raw.dtype)
    return dx, dweight, dbias, dtoken

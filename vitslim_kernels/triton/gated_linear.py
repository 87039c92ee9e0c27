"""Triton epilogues of the gated linear maps (DESIGN.md sections 2 and 5); the GEMMs themselves are cuBLAS.

What is Triton and what is cuBLAS, and why:

- gated_linear (qkv + attention gate). The gate scales output rows, so it is folded into the weight:
  y = x @ (g*W)^T + g*b exactly. Forward: `_gated_linear_fwd_kernel` writes W' = g*W and b' = g*b in the
  matmul dtype (the cast of fp32 master weights to bf16 under autocast is fused into it), then ONE cuBLAS
  addmm (bias in cuBLAS's epilogue) writes y in the natural (B, N, 3, H, d) layout. The gate thus costs
  O(3C*C) instead of a pass over the (B*N, 3C) activation, which no GEMM epilogue can beat. Backward:
  cuBLAS dx = dy @ W' and dW' = dy^T @ x (written in fp32 straight from cuBLAS's fp32 accumulator, so dgate
  sums C unrounded products), torch's column sum db' = sum_rows dy (fp32), then
  `_gated_linear_bwd_kernel` turns (dW', db') into dW = g*dW', db = g*db' and
  dg[j] = sum_{r = j mod R} (sum_c dW'[r, c] * W[r, c] + db'[r] * b[r]) in one pass over the weight.
- gated_gelu_linear (fc1 + GELU + MLP gate). The gate sits after the GELU and cannot be folded into fc1.
  Forward: cuBLAS pre = x @ W^T (no bias), then `_gated_gelu_linear_fwd_kernel`: h = GELU(pre + b) * g in one
  elementwise pass. pre (the matmul dtype) is saved. Backward: `_gated_gelu_linear_bwd_kernel` reads dh and
  pre once and writes dpre = dh * g * GELU'(pre + b) together with the column sums db = sum_rows dpre and
  dg = sum_rows dh * GELU(pre + b) (per-program partial sums); cuBLAS then gives dx = dpre @ W and
  dW = dpre^T @ x. Against autograd of the unfused layers this saves the separate bias-gradient and
  gate-gradient passes over the (B*N, M) activation.

Why the GEMMs are cuBLAS: at ViT shapes (K = 384/768) cuBLAS runs the GEMMs near the bf16 peak and Triton's
matmul is at best on par; the epilogues are what unfused PyTorch pays extra activation passes for.
Not yet measured (no GPU in the session that wrote this): whether a Triton GEMM with the GELU epilogue in
registers would beat cuBLAS + one elementwise pass; benchmark P1 decides.

Deterministic: no atomics. Every column reduction over rows is a per-program partial sum in a fixed tile
order written to a (programs, M) buffer, then one torch.sum over dim 0; cuBLAS GEMMs and torch.sum are
deterministic for a fixed shape on a fixed device.
"""
import functools
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import triton
import triton.language as tl

from ._common import alloc as _alloc
from ._common import check_device, interpreter_agrees

from ..ops.gated_linear import check_gated_gelu_linear_args, check_gated_linear_args, compute_dtype


@triton.jit
def _gelu_and_grad(a, APPROX_TANH: tl.constexpr):
    """(GELU(a), GELU'(a)) in fp32; exact erf form or the tanh approximation."""
    if APPROX_TANH:
        # 0.5 * a * (1 + tanh(u)) = a * sigmoid(2u), u = sqrt(2/pi) * (a + 0.044715 a^3); sigmoid written with
        # t = exp(-2|u|) <= 1 so nothing overflows, and sigmoid(2u) * (1 - sigmoid(2u)) = t / (1 + t)^2.
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        t = tl.exp(-2.0 * tl.abs(u))
        r = 1.0 / (1.0 + t)
        sig = tl.where(u >= 0, r, t * r)
        gelu = a * sig
        dgelu = sig + a * 2.0 * t * r * r * 0.7978845608028654 * (1.0 + 0.134145 * a * a)
    else:
        cdf = 0.5 * (1.0 + tl.erf(a * 0.7071067811865476))
        gelu = a * cdf
        dgelu = cdf + a * tl.exp(-0.5 * a * a) * 0.3989422804014327  # pdf = exp(-a^2/2) / sqrt(2 pi)
    return gelu, dgelu


@triton.jit
def _gated_linear_fwd_kernel(
    W, BIAS,                                # (O, K) weight, any strides; (O,) bias (read if HAS_BIAS)
    GATE,                                   # (R,) gate, contiguous; row r is scaled by GATE[r % R]
    WF, BF,                                 # out: (O, K) folded weight, contiguous; (O,) folded bias
    stride_wo, stride_wk,                   # strides of w
    O,                                      # output features (rows of w)
    K,                                      # input features
    R,                                      # gate length
    HAS_BIAS: tl.constexpr,                 # whether there is a bias to fold
    BLOCK_O: tl.constexpr,                  # weight rows per program
    BLOCK_K: tl.constexpr,                  # weight columns per inner-loop step
):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = rows < O
    g = tl.load(GATE + rows % R, mask=mask_o, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = mask_o[:, None] & (cols < K)[None, :]
        w = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wk, mask=mask, other=0.0)
        tl.store(WF + rows[:, None] * K + cols[None, :], (w.to(tl.float32) * g[:, None]).to(WF.dtype.element_ty),
                 mask=mask)
    if HAS_BIAS:
        bias = tl.load(BIAS + rows, mask=mask_o, other=0.0).to(tl.float32)
        tl.store(BF + rows, (bias * g).to(BF.dtype.element_ty), mask=mask_o)


@triton.jit
def _gated_linear_bwd_kernel(
    DWF,                                    # (O, K) gradient of the folded weight, dy^T @ x, any strides
    DBF,                                    # (O,) fp32 gradient of the folded bias (read if HAS_BIAS)
    W, BIAS,                                # (O, K) weight, any strides; (O,) bias (read if HAS_BIAS)
    GATE,                                   # (R,) gate, contiguous
    DW, DB, DG,                             # out: (O, K) like w, contiguous; (O,) like bias; (R,) like gate
    stride_dwfo, stride_dwfk,               # strides of dwf
    stride_wo, stride_wk,                   # strides of w
    K,                                      # input features
    R,                                      # gate length
    REPEATS,                                # O // R: rows sharing one gate (3 for q, k, v)
    HAS_BIAS: tl.constexpr,                 # whether there is a bias
    BLOCK_J: tl.constexpr,                  # gate entries per program
    BLOCK_K: tl.constexpr,                  # weight columns per inner-loop step
):
    # One program owns BLOCK_J gate entries and every weight row they scale, so dg is summed in one fixed
    # order (repeat by repeat, column block by column block) and written once.
    j = tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_j = j < R
    g = tl.load(GATE + j, mask=mask_j, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_J], tl.float32)
    for rep in range(REPEATS):
        rows = rep * R + j
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = mask_j[:, None] & (cols < K)[None, :]
            dwf = tl.load(DWF + rows[:, None] * stride_dwfo + cols[None, :] * stride_dwfk,
                          mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + rows[:, None] * stride_wo + cols[None, :] * stride_wk, mask=mask, other=0.0)
            dg += tl.sum(dwf * w.to(tl.float32), 1)
            tl.store(DW + rows[:, None] * K + cols[None, :], (dwf * g[:, None]).to(DW.dtype.element_ty),
                     mask=mask)
        if HAS_BIAS:
            dbf = tl.load(DBF + rows, mask=mask_j, other=0.0)
            bias = tl.load(BIAS + rows, mask=mask_j, other=0.0).to(tl.float32)
            dg += dbf * bias
            tl.store(DB + rows, (dbf * g).to(DB.dtype.element_ty), mask=mask_j)
    tl.store(DG + j, dg.to(DG.dtype.element_ty), mask=mask_j)


@triton.jit
def _gated_gelu_linear_fwd_kernel(
    PRE,                                    # (T, M) x @ W^T without bias, any strides
    BIAS,                                   # (M,) bias (read if HAS_BIAS)
    GATE,                                   # (M,) MLP gate
    H,                                      # (T, M) out: GELU(pre + bias) * gate, contiguous
    stride_pret, stride_prem,               # strides of pre
    T,                                      # rows (tokens of all images)
    M,                                      # hidden units
    HAS_BIAS: tl.constexpr,                 # whether to add a bias
    APPROX_TANH: tl.constexpr,              # tanh approximation of the GELU (else exact erf)
    BLOCK_T: tl.constexpr,                  # rows per program
    BLOCK_M: tl.constexpr,                  # columns per program
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = cols < M
    mask = (rows < T)[:, None] & mask_m[None, :]
    rows = rows.to(tl.int64)  # rows * stride can pass 2**31 (T = 50K tokens x M = 3072)
    a = tl.load(PRE + rows[:, None] * stride_pret + cols[None, :] * stride_prem, mask=mask, other=0.0)
    a = a.to(tl.float32)
    if HAS_BIAS:
        a += tl.load(BIAS + cols, mask=mask_m, other=0.0).to(tl.float32)[None, :]
    g = tl.load(GATE + cols, mask=mask_m, other=0.0).to(tl.float32)
    gelu, _ = _gelu_and_grad(a, APPROX_TANH)
    tl.store(H + rows[:, None] * M + cols[None, :], (gelu * g[None, :]).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _gated_gelu_linear_bwd_kernel(
    DH,                                     # (T, M) gradient of h, any strides
    PRE,                                    # (T, M) forward x @ W^T without bias, any strides
    BIAS,                                   # (M,) bias (read if HAS_BIAS)
    GATE,                                   # (M,) MLP gate
    DPRE,                                   # (T, M) out: gradient of pre (= of pre + bias), contiguous
    DB_PARTIAL, DG_PARTIAL,                 # (row programs, M) fp32 out: this program's column sums
    stride_dht, stride_dhm,                 # strides of dh
    stride_pret, stride_prem,               # strides of pre
    stride_partial,                         # row stride of the partial-sum buffers
    T,                                      # rows
    M,                                      # hidden units
    tiles_per_program,                      # BLOCK_T-row tiles each program handles, in order
    HAS_BIAS: tl.constexpr,                 # whether there is a bias
    APPROX_TANH: tl.constexpr,              # tanh approximation of the GELU (else exact erf)
    BLOCK_T: tl.constexpr,                  # rows per tile
    BLOCK_M: tl.constexpr,                  # columns per program
):
    pid_t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = cols < M
    g = tl.load(GATE + cols, mask=mask_m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=mask_m, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M], tl.float32)
    dg_acc = tl.zeros([BLOCK_M], tl.float32)
    for t in range(tiles_per_program):
        rows = (pid_t * tiles_per_program + t) * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (rows < T)[:, None] & mask_m[None, :]
        rows = rows.to(tl.int64)
        a = tl.load(PRE + rows[:, None] * stride_pret + cols[None, :] * stride_prem, mask=mask, other=0.0)
        a = a.to(tl.float32)
        if HAS_BIAS:
            a += bias[None, :]
        dh = tl.load(DH + rows[:, None] * stride_dht + cols[None, :] * stride_dhm, mask=mask, other=0.0)
        dh = dh.to(tl.float32)
        gelu, dgelu = _gelu_and_grad(a, APPROX_TANH)
        dg_acc += tl.sum(dh * gelu, 0)                  # masked elements: dh = 0
        da = dh * g[None, :] * dgelu
        db_acc += tl.sum(da, 0)
        tl.store(DPRE + rows[:, None] * M + cols[None, :], da.to(DPRE.dtype.element_ty), mask=mask)
    tl.store(DB_PARTIAL + pid_t * stride_partial + cols, db_acc, mask=mask_m)
    tl.store(DG_PARTIAL + pid_t * stride_partial + cols, dg_acc, mask=mask_m)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------

_INTERPRETED = interpreter_agrees(_gated_linear_fwd_kernel, __name__)


def _check_device(t: torch.Tensor) -> None:
    check_device(t, "gated linear epilogues", _INTERPRETED)


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _weight_blocks() -> dict:
    if _INTERPRETED:
        return dict(BLOCK_K=32)  # K = 48 gives a full and a partial column block
    # Not yet measured: 32 x 128 tiles, 4 warps; the weight pass is O(3C * C) (1.3 MB in bf16 for DeiT-S).
    return dict(BLOCK_K=128, num_warps=4)


def _gelu_blocks() -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_M, num_warps)."""
    if _INTERPRETED:
        return 16, 64, 1  # T = 51 or 150 rows, M = 96 or 192: partial row tiles and column blocks
    # Not yet measured: 32 x 128 tiles (4K elements, 16 B vector loads of bf16 along M), 4 warps.
    return 32, 128, 4


def _row_programs(num_tiles: int, col_blocks: int, device: torch.device) -> int:
    if _INTERPRETED:
        return triton.cdiv(num_tiles, 2)  # 2 tiles per program: the in-program accumulation is exercised
    # Not yet measured: about 4 programs per SM over the whole grid; the (programs, M) partial buffers stay
    # small (for DeiT-S on an H100: 44 x 1536 fp32).
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(num_tiles, triton.cdiv(4 * sms, col_blocks)))


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    O, K = weight.shape
    wf = _alloc((O, K), weight, dtype)
    bf = _alloc((O,) if bias is not None else (0,), weight, dtype)
    if O == 0:
        return wf, bf
    _check_device(weight)
    gate = gate.contiguous()
    bias = bias.contiguous() if bias is not None else None
    blocks = _weight_blocks()
    block_o = 16 if _INTERPRETED else 32
    _gated_linear_fwd_kernel[(triton.cdiv(O, block_o),)](
        weight, bias if bias is not None else gate, gate, wf, bf,
        weight.stride(0), weight.stride(1), O, K, gate.numel(),
        HAS_BIAS=bias is not None, BLOCK_O=block_o, **blocks)
    return wf, bf


def _fold_bwd(dwf: torch.Tensor, dbf: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
              gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    O, K = weight.shape
    R = gate.numel()
    dw = _alloc((O, K), weight)
    db = _alloc((O,), bias) if bias is not None else weight.new_empty((0,))
    dg = _alloc((R,), gate)
    _check_device(weight)
    gate = gate.contiguous()
    bias = bias.contiguous() if bias is not None else None
    blocks = _weight_blocks()
    block_j = 16 if _INTERPRETED else 32
    _gated_linear_bwd_kernel[(triton.cdiv(R, block_j),)](
        dwf, dbf if dbf is not None else gate, weight, bias if bias is not None else gate, gate, dw, db, dg,
        dwf.stride(0), dwf.stride(1), weight.stride(0), weight.stride(1),
        K, R, O // R,
        HAS_BIAS=bias is not None, BLOCK_J=block_j, **blocks)
    return dw, db, dg.view(gate.shape)


def _gelu_fwd(pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str) -> torch.Tensor:
    T, M = pre.shape
    h = _alloc((T, M), pre)
    if T * M == 0:
        return h
    _check_device(pre)
    gate = gate.contiguous()
    bias = bias.contiguous() if bias is not None else None
    block_t, block_m, num_warps = _gelu_blocks()
    grid = (triton.cdiv(T, block_t), triton.cdiv(M, block_m))
    _gated_gelu_linear_fwd_kernel[grid](
        pre, bias if bias is not None else gate, gate, h,
        pre.stride(0), pre.stride(1), T, M,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BLOCK_T=block_t, BLOCK_M=block_m,
        num_warps=num_warps)
    return h


def _gelu_bwd(dh: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T, M = pre.shape
    dpre = _alloc((T, M), pre)
    if T * M == 0:
        db = bias.new_zeros((M,)) if bias is not None else pre.new_empty((0,))
        return dpre, db, gate.new_zeros((M,))
    _check_device(pre)
    gate = gate.contiguous()
    bias = bias.contiguous() if bias is not None else None
    block_t, block_m, num_warps = _gelu_blocks()
    col_blocks = triton.cdiv(M, block_m)
    num_tiles = triton.cdiv(T, block_t)
    programs = _row_programs(num_tiles, col_blocks, pre.device)
    tiles_per_program = triton.cdiv(num_tiles, programs)
    programs = triton.cdiv(num_tiles, tiles_per_program)
    db_partial = _alloc((programs, M), pre, torch.float32)
    dg_partial = _alloc((programs, M), pre, torch.float32)
    _gated_gelu_linear_bwd_kernel[(programs, col_blocks)](
        dh, pre, bias if bias is not None else gate, gate, dpre, db_partial, dg_partial,
        dh.stride(0), dh.stride(1), pre.stride(0), pre.stride(1), db_partial.stride(0),
        T, M, tiles_per_program,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BLOCK_T=block_t, BLOCK_M=block_m,
        num_warps=num_warps)
    # Fixed-order reductions over the row programs (torch.sum has no atomics).
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else pre.new_empty((0,))
    return dpre, db, dg_partial.sum(0).to(gate.dtype)


# torch.library custom ops with fake implementations (see triton/ragged_attention.py for why not triton_op).
# An absent bias comes back as an empty tensor (a custom op returns tensors, not None).

@torch.library.custom_op("vitslim::gated_linear_fold", mutates_args=())
def gated_linear_fold(weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g*W (O, K) contiguous, g*b (O,) or (0,) without a bias), both in `dtype`; row r uses gate[r % R]."""
    return _fold(weight, bias, gate, dtype)


@gated_linear_fold.register_fake
def _(weight, bias, gate, dtype):
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty((weight.shape[0] if bias is not None
                                                                           else 0,), dtype=dtype)


@torch.library.custom_op("vitslim::gated_linear_fold_bwd", mutates_args=())
def gated_linear_fold_bwd(dweight_folded: torch.Tensor, dbias_folded: Optional[torch.Tensor], weight: torch.Tensor,
                          bias: Optional[torch.Tensor], gate: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dW like weight, db like bias or (0,), dgate like gate) from the gradients of g*W and g*b (fp32)."""
    return _fold_bwd(dweight_folded, dbias_folded, weight, bias, gate)


@gated_linear_fold_bwd.register_fake
def _(dweight_folded, dbias_folded, weight, bias, gate):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return weight.new_empty(weight.shape), db, gate.new_empty(gate.shape)


@torch.library.custom_op("vitslim::gated_gelu_fwd", mutates_args=())
def gated_gelu_fwd(pre: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor, approximate: str
                   ) -> torch.Tensor:
    """GELU(pre + bias) * gate: (T, M) like pre."""
    return _gelu_fwd(pre, bias, gate, approximate)


@gated_gelu_fwd.register_fake
def _(pre, bias, gate, approximate):
    return pre.new_empty(pre.shape)


@torch.library.custom_op("vitslim::gated_gelu_bwd", mutates_args=())
def gated_gelu_bwd(dh: torch.Tensor, pre: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
                   approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dpre (T, M) like pre, dbias (M,) like bias or (0,), dgate (M,) like gate)."""
    return _gelu_bwd(dh, pre, bias, gate, approximate)


@gated_gelu_bwd.register_fake
def _(dh, pre, bias, gate, approximate):
    db = bias.new_empty(bias.shape) if bias is not None else pre.new_empty((0,))
    return pre.new_empty(pre.shape), db, gate.new_empty(gate.shape)


def _mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b written in `dtype`: a weight gradient from half-precision activations straight into fp32, with no
    rounding to the half type in between (the rounding would enter dgate = sum_c dW' * W, C terms deep)."""
    if dtype == a.dtype:
        return torch.mm(a, b)
    if dtype != torch.float32 or a.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(a, b).to(dtype)
    if a.is_cuda:
        if _HAS_MM_OUT_DTYPE:
            return torch.mm(a, b, out_dtype=dtype)  # cuBLAS: half inputs, fp32 accumulation and output
        return torch.mm(a, b).to(dtype)
    return torch.mm(a.to(dtype), b.to(dtype))  # CPU: the same product (half -> fp32 is exact)


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # aten::mm.dtype (torch >= 2.8; CUDA only)


class GatedLinearTriton(torch.autograd.Function):
    """Folded-gate linear map: Triton fold + cuBLAS addmm; backward cuBLAS + the Triton weight epilogue.

    Saves x, the folded weight (O(O*K)), and the raw weight, bias and gate.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, gate):
        wf, bf = torch.ops.vitslim.gated_linear_fold(weight, bias, gate, x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.addmm(bf, x2, wf.t()) if bias is not None else torch.mm(x2, wf.t())
        ctx.save_for_backward(x, wf, weight, bias, gate)
        return y.view(*x.shape[:-1], wf.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, wf, weight, bias, gate = ctx.saved_tensors
        dy2 = dy.reshape(-1, wf.shape[0])
        dx = dw = db = dg = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, wf).view(x.shape)
        if any(ctx.needs_input_grad[1:4]):
            dwf = _mm_out(dy2.t(), x.reshape(-1, x.shape[-1]), torch.float32)  # fp32 dW' for dW and dgate
            dbf = dy2.sum(0, dtype=torch.float32) if bias is not None else None
            dw, db, dg = torch.ops.vitslim.gated_linear_fold_bwd(dwf, dbf, weight, bias, gate)
            db = db if bias is not None else None
        return dx, dw, db, dg


class GatedGeluLinearTriton(torch.autograd.Function):
    """cuBLAS fc1 without bias + the Triton bias/GELU/gate epilogue; saves x, the weight in the matmul dtype
    and the pre-activation (T, M) in the matmul dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, gate, approximate: str):
        w = weight.to(x.dtype)
        pre = torch.mm(x.reshape(-1, x.shape[-1]), w.t())
        h = torch.ops.vitslim.gated_gelu_fwd(pre, bias, gate, approximate)
        ctx.save_for_backward(x, w, pre, bias, gate)
        ctx.approximate = approximate
        ctx.weight_dtype = weight.dtype
        return h.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):
        x, w, pre, bias, gate = ctx.saved_tensors
        dpre, db, dg = torch.ops.vitslim.gated_gelu_bwd(dh.reshape(pre.shape), pre, bias, gate, ctx.approximate)
        dx = torch.mm(dpre, w).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = _mm_out(dpre.t(), x.reshape(-1, x.shape[-1]), ctx.weight_dtype)
        return dx, dw, db if bias is not None else None, dg, None


def gated_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                        ) -> torch.Tensor:
    """Triton (+ cuBLAS) implementation of vitslim_kernels.gated_linear: (..., K) -> (..., O)."""
    check_gated_linear_args(x, weight, bias, gate)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in `dtype` explicitly
        return GatedLinearTriton.apply(x.to(dtype), weight, bias, gate.reshape(-1))


def gated_gelu_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                             approximate: str = "none") -> torch.Tensor:
    """Triton (+ cuBLAS) implementation of vitslim_kernels.gated_gelu_linear: (..., C) -> (..., M)."""
    check_gated_gelu_linear_args(x, weight, bias, gate, approximate)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return GatedGeluLinearTriton.apply(x.to(dtype), weight, bias, gate, approximate)

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
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import triton
import triton.language as tl

from ..dispatch import compile_only_target, fail_safe
from ._common import alloc as _alloc
from ._common import check_device, define_op, formula_vjp, interpreter_agrees, kernel_wrapper, sm_count

from ..ops.gated_linear import (check_gated_gelu_linear_args, check_gated_linear_args, compute_dtype,
                                gated_gelu_bwd_ref, gated_linear_fold_bwd_ref)


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
wrap_triton = kernel_wrapper(_INTERPRETED)


def _check_device(t: torch.Tensor) -> None:
    check_device(t, "gated linear epilogues", _INTERPRETED)


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
    return max(1, min(num_tiles, triton.cdiv(4 * sm_count(device), col_blocks)))


def _fold_reference(weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What _fold computes, in plain PyTorch: (g*W, g*b or (0,)) in `dtype`, row r scaled by gate[r % R]."""
    O = weight.shape[0]
    math_dtype = torch.promote_types(weight.dtype, torch.float32)
    g = gate.reshape(-1).to(math_dtype).repeat(O // gate.numel())
    wf = (weight.to(math_dtype) * g[:, None]).to(dtype).contiguous()
    bf = (bias.to(math_dtype) * g).to(dtype) if bias is not None else weight.new_empty((0,), dtype=dtype)
    return wf, bf


def _gelu_fwd_reference(pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str
                        ) -> torch.Tensor:
    """What _gelu_fwd computes, in plain PyTorch: GELU(pre + bias) * gate in fp32, rounded to pre's dtype."""
    math_dtype = torch.promote_types(pre.dtype, torch.float32)
    a = pre.to(math_dtype) + bias.to(math_dtype) if bias is not None else pre.to(math_dtype)
    return (torch.nn.functional.gelu(a, approximate=approximate) * gate.to(math_dtype)).to(pre.dtype)


@fail_safe("gated_linear_fold", _fold_reference)
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
    wrap_triton(_gated_linear_fwd_kernel)[(triton.cdiv(O, block_o),)](
        weight, bias if bias is not None else gate, gate, wf, bf,
        weight.stride(0), weight.stride(1), O, K, gate.numel(),
        HAS_BIAS=bias is not None, BLOCK_O=block_o, **blocks)
    return wf, bf


@fail_safe("gated_linear_fold_bwd", gated_linear_fold_bwd_ref)
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
    dbf = dbf.contiguous() if dbf is not None else None  # read as a plain (O,) vector
    blocks = _weight_blocks()
    # More programs for the SMs: 32 gate entries per program gave DeiT-S (R = 384) 12 programs on an H100's
    # 132 SMs; 8 give 48 (DeiT-B: 96). 4 spilled 8 bytes on sm_90 (compile_only). Not yet measured on a GPU.
    block_j = 16 if _INTERPRETED else max(8, min(32, triton.next_power_of_2(triton.cdiv(R, sm_count(weight.device)))))
    wrap_triton(_gated_linear_bwd_kernel)[(triton.cdiv(R, block_j),)](
        dwf, dbf if dbf is not None else gate, weight, bias if bias is not None else gate, gate, dw, db, dg,
        dwf.stride(0), dwf.stride(1), weight.stride(0), weight.stride(1),
        K, R, O // R,
        HAS_BIAS=bias is not None, BLOCK_J=block_j, **blocks)
    return dw, db, dg.view(gate.shape)


@fail_safe("gated_gelu_fwd", _gelu_fwd_reference)
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
    wrap_triton(_gated_gelu_linear_fwd_kernel)[grid](
        pre, bias if bias is not None else gate, gate, h,
        pre.stride(0), pre.stride(1), T, M,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BLOCK_T=block_t, BLOCK_M=block_m,
        num_warps=num_warps)
    return h


@fail_safe("gated_gelu_bwd", gated_gelu_bwd_ref)
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
    wrap_triton(_gated_gelu_linear_bwd_kernel)[(programs, col_blocks)](
        dh, pre, bias if bias is not None else gate, gate, dpre, db_partial, dg_partial,
        dh.stride(0), dh.stride(1), pre.stride(0), pre.stride(1), db_partial.stride(0),
        T, M, tiles_per_program,
        HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh", BLOCK_T=block_t, BLOCK_M=block_m,
        num_warps=num_warps)
    # Fixed-order reductions over the row programs (torch.sum has no atomics).
    db = db_partial.sum(0).to(bias.dtype) if bias is not None else pre.new_empty((0,))
    return dpre, db, dg_partial.sum(0).to(gate.dtype)


# ---------------------------------------------------------------------------------------------------------
# The torch.library ops (triton_op or custom_op: see _common.uses_triton_op) and their autograd
#
# The public functions are gated_linear and gated_gelu_linear, each one op over the whole layer (Triton +
# cuBLAS). Not the fold (or epilogue) op plus an aten matmul with autograd in between: the folded weight's
# gradient dW' = dy^T @ x would then reach the fold's backward rounded to the half-precision matmul dtype, and
# dgate sums C of its products (module docstring). The fold and epilogue ops keep their own autograd too.
# An absent bias comes back as an empty tensor (a custom op returns tensors, not None).
# ---------------------------------------------------------------------------------------------------------

def _gated_linear_fold(weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g*W (O, K) contiguous, g*b (O,) or (0,) without a bias), both in `dtype`; row r uses gate[r % R]."""
    return _fold(weight, bias, gate, dtype)


def _gated_linear_fold_fake(weight, bias, gate, dtype):
    return weight.new_empty(weight.shape, dtype=dtype), weight.new_empty((weight.shape[0] if bias is not None
                                                                           else 0,), dtype=dtype)


def _gated_linear_fold_bwd(dweight_folded: torch.Tensor, dbias_folded: Optional[torch.Tensor], weight: torch.Tensor,
                           bias: Optional[torch.Tensor], gate: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dW like weight, db like bias or (0,), dgate like gate) from the gradients of g*W and g*b (fp32); the
    bias gradient db' is given exactly when there is a bias."""
    return _fold_bwd(dweight_folded, dbias_folded, weight, bias, gate)


def _gated_linear_fold_bwd_fake(dweight_folded, dbias_folded, weight, bias, gate):
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty((0,))
    return weight.new_empty(weight.shape), db, gate.new_empty(gate.shape)


def _gated_gelu_fwd(pre: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor, approximate: str
                    ) -> torch.Tensor:
    """GELU(pre + bias) * gate: (T, M) like pre."""
    return _gelu_fwd(pre, bias, gate, approximate)


def _gated_gelu_fwd_fake(pre, bias, gate, approximate):
    return pre.new_empty(pre.shape)


def _gated_gelu_bwd(dh: torch.Tensor, pre: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
                    approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dpre (T, M) like pre, dbias (M,) like bias or (0,), dgate (M,) like gate)."""
    return _gelu_bwd(dh, pre, bias, gate, approximate)


def _gated_gelu_bwd_fake(dh, pre, bias, gate, approximate):
    db = bias.new_empty(bias.shape) if bias is not None else pre.new_empty((0,))
    return pre.new_empty(pre.shape), db, gate.new_empty(gate.shape)


def _gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor
                  ) -> torch.Tensor:
    """y = x @ (g*W)^T + g*b: (T, O) contiguous in x's dtype, for x (T, K): the Triton fold, then one cuBLAS
    addmm (the bias in its epilogue)."""
    wf, bf = _fold(weight, bias, gate, x.dtype)
    return torch.addmm(bf, x, wf.t()) if bias is not None else torch.mm(x, wf.t())


def _gated_linear_fake(x, weight, bias, gate):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _gated_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], gate: torch.Tensor,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, pre), both (T, M) contiguous in x's dtype, for x (T, C): pre = x @ W^T (cuBLAS, no bias) and
    h = GELU(pre + bias) * gate (the Triton epilogue). pre is what the backward reads."""
    pre = torch.mm(x, weight.to(x.dtype).t())
    return _gelu_fwd(pre, bias, gate, approximate), pre


def _gated_gelu_linear_fake(x, weight, bias, gate, approximate):
    shape = (x.shape[0], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


gated_linear_fold = define_op("vitslim::gated_linear_fold", _gated_linear_fold, _gated_linear_fold_fake,
                              _INTERPRETED)
gated_linear_fold_bwd = define_op("vitslim::gated_linear_fold_bwd", _gated_linear_fold_bwd,
                                  _gated_linear_fold_bwd_fake, _INTERPRETED)
gated_gelu_fwd = define_op("vitslim::gated_gelu_fwd", _gated_gelu_fwd, _gated_gelu_fwd_fake, _INTERPRETED)
gated_gelu_bwd = define_op("vitslim::gated_gelu_bwd", _gated_gelu_bwd, _gated_gelu_bwd_fake, _INTERPRETED)
gated_linear_op = define_op("vitslim::gated_linear", _gated_linear, _gated_linear_fake, _INTERPRETED)
gated_gelu_linear_op = define_op("vitslim::gated_gelu_linear", _gated_gelu_linear, _gated_gelu_linear_fake,
                                 _INTERPRETED)


def _mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b written in `dtype`: a weight gradient from half-precision activations straight into fp32, with no
    rounding to the half type in between (the rounding would enter dgate = sum_c dW' * W, C terms deep)."""
    if dtype == a.dtype:
        return torch.mm(a, b)
    if dtype != torch.float32 or a.dtype not in (torch.float16, torch.bfloat16):
        return torch.mm(a, b).to(dtype)
    on_gpu = a.is_cuda or compile_only_target() is not None  # compile_only: record what a GPU would run
    if on_gpu and not torch.is_grad_enabled():  # (grad enabled: a double backward differentiates this)
        if _HAS_MM_OUT_DTYPE and a.is_cuda:
            return torch.mm(a, b, out_dtype=dtype)  # cuBLAS: half inputs, fp32 accumulation and output
        return torch.mm(a, b).to(dtype)
    return torch.mm(a.to(dtype), b.to(dtype))  # the same product (half -> fp32 is exact), differentiable


_HAS_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # aten::mm.dtype (torch >= 2.8; CUDA only)


def _fold_setup_context(ctx, inputs, output):
    weight, bias, gate, _ = inputs
    ctx.save_for_backward(weight, bias, gate)
    ctx.set_materialize_grads(False)


def _fold_backward(ctx, dwf, dbf):
    weight, bias, gate = ctx.saved_tensors
    if (dwf is None and dbf is None) or not any(ctx.needs_input_grad[:3]):
        return None, None, None, None
    dwf = dwf if dwf is not None else weight.new_zeros(weight.shape, dtype=torch.float32)
    if bias is not None:
        dbf = dbf.to(torch.float32) if dbf is not None else bias.new_zeros(bias.shape, dtype=torch.float32)
    else:
        dbf = None
    dw, db, dg = torch.ops.vitslim.gated_linear_fold_bwd(dwf, dbf, weight, bias, gate)
    return dw, db if bias is not None else None, dg, None


def _formula_setup_context(ctx, inputs, output):
    """For the backward ops: their backward is the VJP of their formula (the ops/ reference), on saved inputs."""
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor) or t is None))
    ctx.rest = tuple(a for a in inputs if not (isinstance(a, torch.Tensor) or a is None))
    ctx.set_materialize_grads(False)


def _fold_bwd_backward(ctx, ddw, ddb, ddg):
    """Double backward: the VJP of gated_linear_fold_bwd_ref (bilinear in (dW', db') and (W, b, gate))."""
    return formula_vjp(gated_linear_fold_bwd_ref, ctx.saved_tensors, (ddw, ddb, ddg), ctx.needs_input_grad)


def _gelu_fwd_setup_context(ctx, inputs, output):
    pre, bias, gate, approximate = inputs
    ctx.save_for_backward(pre, bias, gate)
    ctx.approximate = approximate


def _gelu_fwd_backward(ctx, dh):
    pre, bias, gate = ctx.saved_tensors
    dpre, db, dg = torch.ops.vitslim.gated_gelu_bwd(dh, pre, bias, gate, ctx.approximate)
    return dpre, db if bias is not None else None, dg, None


def _gelu_bwd_backward(ctx, ddpre, ddb, ddg):
    """Double backward: the VJP of gated_gelu_bwd_ref."""
    args = (*ctx.saved_tensors, *ctx.rest)
    return formula_vjp(gated_gelu_bwd_ref, args, (ddpre, ddb, ddg), ctx.needs_input_grad)


def _gated_linear_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)  # x, weight, bias, gate; the folded weight is recomputed (O(O*K))


def _gated_linear_backward(ctx, dy):
    """cuBLAS dx = dy @ W' and dW' = dy^T @ x (fp32), column sum db' (fp32), then the Triton weight epilogue."""
    x, weight, bias, gate = ctx.saved_tensors
    dx = dw = db = dg = None
    if ctx.needs_input_grad[0]:
        wf, _ = torch.ops.vitslim.gated_linear_fold(weight, bias, gate, x.dtype)
        dx = torch.mm(dy, wf)
    if any(ctx.needs_input_grad[1:4]):
        dwf = _mm_out(dy.t(), x, torch.float32)  # fp32 dW' for dW and dgate
        dbf = dy.sum(0, dtype=torch.float32) if bias is not None else None
        dw, db, dg = torch.ops.vitslim.gated_linear_fold_bwd(dwf, dbf, weight, bias, gate)
    return dx, dw, db if bias is not None else None, dg


def _gated_gelu_linear_setup_context(ctx, inputs, output):
    x, weight, bias, gate, approximate = inputs
    ctx.save_for_backward(x, weight, bias, gate, output[1])  # pre, in the matmul dtype
    ctx.approximate = approximate
    ctx.set_materialize_grads(False)  # pre is an output too; its gradient is None unless someone used it


def _gated_gelu_linear_backward(ctx, dh, dpre_out):
    """The Triton epilogue's backward (dpre, db, dgate in one pass), then cuBLAS dx = dpre @ W, dW = dpre^T @ x."""
    x, weight, bias, gate, pre = ctx.saved_tensors
    if dh is None and dpre_out is None:
        return None, None, None, None, None
    if dh is None:
        dh = torch.zeros_like(pre)
    dpre, db, dg = torch.ops.vitslim.gated_gelu_bwd(dh, pre, bias, gate, ctx.approximate)
    if dpre_out is not None:
        dpre = dpre + dpre_out
    dx = torch.mm(dpre, weight.to(x.dtype)) if ctx.needs_input_grad[0] else None
    dw = _mm_out(dpre.t(), x, weight.dtype) if ctx.needs_input_grad[1] else None
    return dx, dw, db if bias is not None else None, dg, None


gated_linear_fold.register_autograd(_fold_backward, setup_context=_fold_setup_context)
gated_linear_fold_bwd.register_autograd(_fold_bwd_backward, setup_context=_formula_setup_context)
gated_gelu_fwd.register_autograd(_gelu_fwd_backward, setup_context=_gelu_fwd_setup_context)
gated_gelu_bwd.register_autograd(_gelu_bwd_backward, setup_context=_formula_setup_context)
gated_linear_op.register_autograd(_gated_linear_backward, setup_context=_gated_linear_setup_context)
gated_gelu_linear_op.register_autograd(_gated_gelu_linear_backward, setup_context=_gated_gelu_linear_setup_context)


def gated_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                        ) -> torch.Tensor:
    """Triton (+ cuBLAS) implementation of vitslim_kernels.gated_linear: (..., K) -> (..., O)."""
    check_gated_linear_args(x, weight, bias, gate)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in `dtype` explicitly
        y = torch.ops.vitslim.gated_linear(x.to(dtype).reshape(-1, x.shape[-1]), weight, bias, gate.reshape(-1))
    return y.view(*x.shape[:-1], weight.shape[0])


def gated_gelu_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                             approximate: str = "none") -> torch.Tensor:
    """Triton (+ cuBLAS) implementation of vitslim_kernels.gated_gelu_linear: (..., C) -> (..., M)."""
    check_gated_gelu_linear_args(x, weight, bias, gate, approximate)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        h, _ = torch.ops.vitslim.gated_gelu_linear(x.to(dtype).reshape(-1, x.shape[-1]), weight, bias, gate,
                                                   approximate)
    return h.view(*x.shape[:-1], weight.shape[0])

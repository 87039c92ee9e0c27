"""Triton epilogues of the gated linear maps (docs/design.md sections 2 and 5); the GEMMs themselves are cuBLAS.

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

Launchers (each fail_safe; their PyTorch fallbacks are registered by the ops): `_fold`, `_fold_bwd`, `_gelu_fwd`,
`_gelu_bwd`. The ops that call them (vitslim::gated_linear, gated_gelu_linear and the fold and epilogue ops),
their checks and references are in ops/gated_linear.py.
"""
import torch
import triton
import triton.language as tl

from ..runtime import alloc as _alloc
from ..runtime import fail_safe
from ._launch import check_device, interpreter_agrees, kernel_wrapper, sm_count


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


def _gelu_blocks(backward: bool = False) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_M, num_warps)."""
    if _INTERPRETED:
        return 16, 64, 1  # T = 51 or 150 rows, M = 96 or 192: partial row tiles and column blocks
    # Not yet measured: 32 x 128 tiles (4K elements, 16 B vector loads of bf16 along M), 4 warps; the backward holds
    # pre, dh, the GELU and its derivative per element: 8 warps, or the tanh GELU with a bias spills on sm_80 (fp32).
    return 32, 128, 8 if backward else 4


def _row_programs(num_tiles: int, col_blocks: int, device: torch.device) -> int:
    if _INTERPRETED:
        return triton.cdiv(num_tiles, 2)  # 2 tiles per program: the in-program accumulation is exercised
    # Not yet measured: about 4 programs per SM over the whole grid; the (programs, M) partial buffers stay
    # small (for DeiT-S on an H100: 44 x 1536 fp32).
    return max(1, min(num_tiles, triton.cdiv(4 * sm_count(device), col_blocks)))


@fail_safe("gated_linear_fold")  # its fallback: ops/gated_linear.py registers it
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


@fail_safe("gated_linear_fold_bwd")  # its fallback: ops/gated_linear.py registers it
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


@fail_safe("gated_gelu_fwd")  # its fallback: ops/gated_linear.py registers it
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


@fail_safe("gated_gelu_bwd")  # its fallback: ops/gated_linear.py registers it
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
    block_t, block_m, num_warps = _gelu_blocks(backward=True)
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

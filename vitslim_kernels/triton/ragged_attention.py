"""Triton ragged-width attention (docs/design.md section 5): heads of different widths, all heads in one launch.

q, k, v, o: (B, N, D) with D = sum(head_dims) and head h in columns [offset_h, offset_h + w_h).

How raggedness is handled: the host keeps a (3, H) int32 table (column offset, width, split tile) of the
heads with w_h > 0 (zero-width heads own no column, so they are simply left out). Every program works on one
(batch, head) pair; it reads its head's row of the table and runs the flash-attention loop in the branch
compiled for its tile: one or two power-of-two column slices (tl.dot needs >= 16) covering w_h rounded up to 16
(16, 32, 48 = 32 + 16, 64, 80 = 64 + 16, ...), in the forward and the backward alike. All
loads and stores are masked to the w_h real columns, so nothing padded is ever materialised in memory and the
register work of a head scales with its own width, not the widest one.

Kernels:
- `_ragged_attention_fwd_kernel`: one program per (query block, batch*head); online softmax over key blocks,
  fp32 accumulation, writes o and the natural logsumexp of each query row (B, H, N) for the backward.
- `_ragged_attention_bwd_preprocess_kernel`: delta = rowsum(dO * O) per head, (B, H, N) fp32.
- `_ragged_attention_bwd_kernel`: one program per batch*head, FlashAttention-2's loop (dk, dv in registers per
  key block, dq summed across key blocks in an fp32 buffer only that program touches). Every gradient element
  is written by exactly one program, summed in a fixed order: deterministic, no atomics. Optionally it also
  writes per-block column sums of dq, dk, dv: the qkv bias gradient (vitslim::qkv_attention).

Launchers: `_fwd(q, k, v, head_dims, scale) -> (o, lse)` and `_bwd(do, q, k, v, o, lse, head_dims, scale, out,
bias_sum) -> (dq, dk, dv, dbias)`, each fail_safe (their PyTorch fallbacks are registered by the op). The ops
that call them (vitslim::ragged_attention_fwd/bwd and the packed ones), their checks and references are in
ops/ragged_attention.py; this module imports Triton, and the ops import it when a kernel first runs.
"""
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..runtime import alloc as _alloc
from ..runtime import fail_safe
from ._launch import arch, check_device, interpreter_agrees, kernel_wrapper, tracing, tuned, tuning_possible

_MIN_BLOCK_D = 16  # tl.dot needs every dimension >= 16 on NVIDIA GPUs


@triton.jit
def _head_columns(HEAD_OFFSET, HEAD_WIDTH, HEAD_SPLIT, h, HEAD_D: tl.constexpr, VEC: tl.constexpr):
    """(first column, width, split tile width) of kept head h: from the table, or h * HEAD_D when uniform."""
    if HEAD_D > 0:
        return h * HEAD_D, HEAD_D, 0
    else:
        # The host proved every offset and width a multiple of VEC (_alignment): 16-byte vector loads.
        return (tl.multiple_of(tl.load(HEAD_OFFSET + h), VEC), tl.multiple_of(tl.load(HEAD_WIDTH + h), VEC),
                tl.load(HEAD_SPLIT + h))


@triton.jit
def _attn_fwd_head(q_base, k_base, v_base, o_base, lse_ptrs, offs_m, mask_m, width, N, qk_scale,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
                   BLOCK_N: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax attention of BLOCK_M query rows of one head over all N keys.

    The head's columns are tiled as two power-of-two slices, [0, D_A) and [D_A, D_A + D_B) (D_B = 0: one),
    so a head 41 wide (48 in 16-wide slices) contracts over 32 + 16 columns, not 64: the split-D of ROCm
    aiter's and vLLM's encoder attention. Columns past `width` are masked, never read."""
    offs_a = tl.arange(0, D_A)
    mask_a = offs_a < width
    q_a = tl.load(q_base + offs_m[:, None] * stride_qn + offs_a[None, :] * stride_qd,
                  mask=mask_m[:, None] & mask_a[None, :], other=0.0)
    acc_a = tl.zeros([offs_m.shape[0], D_A], tl.float32)
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        mask_b = offs_b < width
        q_b = tl.load(q_base + offs_m[:, None] * stride_qn + offs_b[None, :] * stride_qd,
                      mask=mask_m[:, None] & mask_b[None, :], other=0.0)
        acc_b = tl.zeros([offs_m.shape[0], D_B], tl.float32)
    m_i = tl.full([offs_m.shape[0]], float("-inf"), tl.float32)
    l_i = tl.zeros([offs_m.shape[0]], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kt_a = tl.load(k_base + offs_n[None, :] * stride_kn + offs_a[:, None] * stride_kd,
                       mask=mask_a[:, None] & mask_n[None, :], other=0.0)                  # (D_A, BLOCK_N)
        s = tl.dot(q_a, kt_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            kt_b = tl.load(k_base + offs_n[None, :] * stride_kn + offs_b[:, None] * stride_kd,
                           mask=mask_b[:, None] & mask_n[None, :], other=0.0)
            s += tl.dot(q_b, kt_b, input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds a valid key
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a = tl.load(v_base + offs_n[:, None] * stride_vn + offs_a[None, :] * stride_vd,
                      mask=mask_n[:, None] & mask_a[None, :], other=0.0)
        p = p.to(v_a.dtype)
        acc_a = acc_a * alpha[:, None] + tl.dot(p, v_a, input_precision=DOT_PRECISION)
        if D_B > 0:
            v_b = tl.load(v_base + offs_n[:, None] * stride_vn + offs_b[None, :] * stride_vd,
                          mask=mask_n[:, None] & mask_b[None, :], other=0.0)
            acc_b = acc_b * alpha[:, None] + tl.dot(p, v_b, input_precision=DOT_PRECISION)
        m_i = m_new
    tl.store(o_base + offs_m[:, None] * stride_on + offs_a[None, :] * stride_od,
             (acc_a / l_i[:, None]).to(o_base.dtype.element_ty), mask=mask_m[:, None] & mask_a[None, :])
    if D_B > 0:
        tl.store(o_base + offs_m[:, None] * stride_on + offs_b[None, :] * stride_od,
                 (acc_b / l_i[:, None]).to(o_base.dtype.element_ty), mask=mask_m[:, None] & mask_b[None, :])
    tl.store(lse_ptrs, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=mask_m)  # natural log


@triton.jit
def _ragged_attention_fwd_kernel(
    Q, K, V,                                # (B, N, D) inputs, any strides
    O,                                      # (B, N, D) output
    LSE,                                    # (B, H, N) fp32 out: logsumexp of the scaled scores of each row
    HEAD_OFFSET, HEAD_WIDTH, HEAD_SPLIT,    # (H,) int32: first column, width, split tile width of each head
    stride_qb, stride_qn, stride_qd,        # strides of q (b and n ones divided by VEC)
    stride_kb, stride_kn, stride_kd,        # strides of k (b and n ones divided by VEC)
    stride_vb, stride_vn, stride_vd,        # strides of v (b and n ones divided by VEC)
    stride_ob, stride_on, stride_od,        # strides of o (b and n ones divided by VEC)
    stride_lseb, stride_lseh,               # strides of lse (its last dim is contiguous)
    N,                                      # sequence length
    H,                                      # number of kept (non-zero-width) heads
    scale,                                  # softmax scale applied to q k^T
    BLOCK_M: tl.constexpr,                  # query rows per program
    BLOCK_N: tl.constexpr,                  # keys per inner-loop step
    HEAD_D: tl.constexpr,                   # width of every kept head when all are equal (the search), else 0
    UNIFORM_A: tl.constexpr,                # with HEAD_D: its tile slices (see _attn_fwd_head; B may be 0)
    UNIFORM_B: tl.constexpr,
    VEC: tl.constexpr,                      # the host proved offsets, widths and row strides multiples of this
    LOG2_DMAX: tl.constexpr,                # log2 of the largest power-of-two tile (>= 4)
    DOT_PRECISION: tl.constexpr,            # tl.dot input_precision for fp32 inputs ("ieee" or "tf32")
):
    # Flattened 1-D grid: query blocks of one (batch, head) are neighbours (they share k and v in L2), and
    # B*H is not bounded by the 65535 limit of grid axis 1.
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = (pid_bh // H).to(tl.int64)  # int64: b * stride_b can pass 2**31 for large batches
    h = pid_bh % H
    col0, width, pad = _head_columns(HEAD_OFFSET, HEAD_WIDTH, HEAD_SPLIT, h, HEAD_D, VEC)
    qk_scale = scale * 1.4426950408889634  # softmax in base 2: exp(x * scale) = exp2(x * scale * log2(e))

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    # Batch and row strides arrive divided by VEC: multiplied back by the constexpr, Triton knows they are
    # multiples of VEC (tl.multiple_of does nothing on a kernel argument itself).
    stride_qb, stride_qn = stride_qb * VEC, stride_qn * VEC
    stride_kb, stride_kn = stride_kb * VEC, stride_kn * VEC
    stride_vb, stride_vn = stride_vb * VEC, stride_vn * VEC
    stride_ob, stride_on = stride_ob * VEC, stride_on * VEC
    q_base = Q + b * stride_qb + col0 * stride_qd
    k_base = K + b * stride_kb + col0 * stride_kd
    v_base = V + b * stride_vb + col0 * stride_vd
    o_base = O + b * stride_ob + col0 * stride_od
    lse_ptrs = LSE + b * stride_lseb + h * stride_lseh + offs_m
    if HEAD_D > 0:
        _attn_fwd_head(q_base, k_base, v_base, o_base, lse_ptrs, offs_m, mask_m, width, N, qk_scale,
                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on, stride_od,
                       BLOCK_N, UNIFORM_A, UNIFORM_B, DOT_PRECISION)
    else:
        # One branch per tile class 2^A or 2^A + 2^B (B < A); a program takes exactly one (its head's).
        # (2 ** LOG2_A is written out, not assigned: the interpreter turns assigned ints into tensors.)
        for LOG2_A in tl.static_range(4, LOG2_DMAX + 1):
            if pad == 2 ** LOG2_A:
                _attn_fwd_head(q_base, k_base, v_base, o_base, lse_ptrs, offs_m, mask_m, width, N, qk_scale,
                               stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_on,
                               stride_od, BLOCK_N, 2 ** LOG2_A, 0, DOT_PRECISION)
            for LOG2_B in tl.static_range(4, LOG2_A):
                if 2 ** LOG2_A + 2 ** LOG2_B <= 2 ** LOG2_DMAX:
                    if pad == 2 ** LOG2_A + 2 ** LOG2_B:
                        _attn_fwd_head(q_base, k_base, v_base, o_base, lse_ptrs, offs_m, mask_m, width, N,
                                       qk_scale, stride_qn, stride_qd, stride_kn, stride_kd, stride_vn,
                                       stride_vd, stride_on, stride_od, BLOCK_N, 2 ** LOG2_A, 2 ** LOG2_B,
                                       DOT_PRECISION)


@triton.jit
def _ragged_attention_bwd_preprocess_kernel(
    O, DO,                                  # (B, N, D) forward output and its gradient
    DELTA,                                  # (B, H, N) fp32 out: rowsum(dO * O) per head
    HEAD_OFFSET, HEAD_WIDTH, HEAD_SPLIT,    # (H,) int32: first column, width, split tile width of each head
    stride_ob, stride_on, stride_od,        # strides of o (b and n ones divided by VEC)
    stride_dob, stride_don, stride_dod,     # strides of do (b and n ones divided by VEC)
    stride_deltab, stride_deltah,           # strides of delta (its last dim is contiguous)
    N,                                      # sequence length
    H,                                      # number of kept heads
    BLOCK_M: tl.constexpr,                  # rows per program
    BLOCK_D: tl.constexpr,                  # largest padded head width (loads are masked to the real width)
    HEAD_D: tl.constexpr,                   # uniform head width, or 0 (see the forward kernel)
    VEC: tl.constexpr,                      # proven alignment of offsets, widths and row strides
):
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    col0, width, pad = _head_columns(HEAD_OFFSET, HEAD_WIDTH, HEAD_SPLIT, h, HEAD_D, VEC)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N)[:, None] & (offs_d < width)[None, :]
    # Batch and row strides arrive divided by VEC (see the forward kernel).
    o_rows = b * (stride_ob * VEC) + offs_m[:, None] * (stride_on * VEC)
    do_rows = b * (stride_dob * VEC) + offs_m[:, None] * (stride_don * VEC)
    o = tl.load(O + o_rows + (col0 + offs_d)[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + do_rows + (col0 + offs_d)[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_deltab + h * stride_deltah + offs_m, delta, mask=offs_m < N)


@triton.jit
def _attn_bwd_head(q_base, k_base, v_base, do_base, dq_base, dk_base, dv_base, acc_base, lse_base, delta_base,
                   db_base, width, N, scale, qk_scale,
                   stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                   stride_gn, stride_gd, stride_an, stride_dbk, stride_dbt,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_A: tl.constexpr, D_B: tl.constexpr,
                   HAS_DB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq, dk, dv of one head over all N rows, FlashAttention-2's five matmuls per tile, in a fixed order.

    Outer loop over key blocks (dk, dv accumulate in registers), inner loop over query blocks. Each tile adds
    its dq contribution to an fp32 accumulator in global memory that only this program touches (read-add-
    write in key-block order, a CTA barrier between key blocks): FlashAttention-2's dq without its atomics,
    so the sums are deterministic. The last key block writes dq itself.

    The head's columns are two power-of-two slices [0, D_A) and [D_A, D_A + D_B) (D_B = 0: one), as in the
    forward: a 41-wide head computes over 32 + 16 columns, not 64. Each of the five matmuls then runs once per
    slice (the two contractions over the width add their slices' products).

    HAS_DB: also write the column sums of each block of dq, dk and dv (fp32, before rounding) at db_base +
    block * stride_dbk (+ stride_dbt for dk, + 2 * stride_dbt for dv): this image's share of the qkv bias
    gradient, so the projection's backward need not read dqkv once more for it. Stored per block, not carried
    across the loops: three loop-carried sums made the sm_80 bf16 kernel spill (80 B per thread, compile_only).
    """
    offs_a = tl.arange(0, D_A)
    mask_a = offs_a < width
    if D_B > 0:
        offs_b = D_A + tl.arange(0, D_B)
        mask_b = offs_b < width
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_na = mask_n[:, None] & mask_a[None, :]
        k_a = tl.load(k_base + offs_n[:, None] * stride_kn + offs_a[None, :] * stride_kd, mask=mask_na, other=0.0)
        v_a = tl.load(v_base + offs_n[:, None] * stride_vn + offs_a[None, :] * stride_vd, mask=mask_na, other=0.0)
        dk_a = tl.zeros([BLOCK_N, D_A], tl.float32)
        dv_a = tl.zeros([BLOCK_N, D_A], tl.float32)
        if D_B > 0:
            mask_nb = mask_n[:, None] & mask_b[None, :]
            k_b = tl.load(k_base + offs_n[:, None] * stride_kn + offs_b[None, :] * stride_kd, mask=mask_nb,
                          other=0.0)
            v_b = tl.load(v_base + offs_n[:, None] * stride_vn + offs_b[None, :] * stride_vd, mask=mask_nb,
                          other=0.0)
            dk_b = tl.zeros([BLOCK_N, D_B], tl.float32)
            dv_b = tl.zeros([BLOCK_N, D_B], tl.float32)
        last_key_block = start_n + BLOCK_N >= N
        for start_m in range(0, N, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            mask_m = offs_m < N
            mask_ma = mask_m[:, None] & mask_a[None, :]
            q_a = tl.load(q_base + offs_m[:, None] * stride_qn + offs_a[None, :] * stride_qd, mask=mask_ma,
                          other=0.0)
            do_a = tl.load(do_base + offs_m[:, None] * stride_don + offs_a[None, :] * stride_dod, mask=mask_ma,
                           other=0.0)
            st = tl.dot(k_a, tl.trans(q_a), input_precision=DOT_PRECISION)                     # (BLOCK_N, BLOCK_M)
            if D_B > 0:
                mask_mb = mask_m[:, None] & mask_b[None, :]
                q_b = tl.load(q_base + offs_m[:, None] * stride_qn + offs_b[None, :] * stride_qd, mask=mask_mb,
                              other=0.0)
                do_b = tl.load(do_base + offs_m[:, None] * stride_don + offs_b[None, :] * stride_dod,
                               mask=mask_mb, other=0.0)
                st += tl.dot(k_b, tl.trans(q_b), input_precision=DOT_PRECISION)
            lse = tl.load(lse_base + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=mask_m, other=0.0)
            pt = tl.exp2(st * qk_scale - lse[None, :] * 1.4426950408889634)
            pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
            dv_a += tl.dot(pt.to(do_a.dtype), do_a, input_precision=DOT_PRECISION)
            dpt = tl.dot(v_a, tl.trans(do_a), input_precision=DOT_PRECISION)
            if D_B > 0:
                dv_b += tl.dot(pt.to(do_b.dtype), do_b, input_precision=DOT_PRECISION)
                dpt += tl.dot(v_b, tl.trans(do_b), input_precision=DOT_PRECISION)
            dst = (pt * (dpt - delta[None, :])).to(q_a.dtype)
            dk_a += tl.dot(dst, q_a, input_precision=DOT_PRECISION)
            db_m = db_base + (start_m // BLOCK_M) * stride_dbk
            _bwd_dq_slice(dst, k_a, acc_base, dq_base, db_m, offs_m, offs_a, mask_m, mask_a, start_n,
                          last_key_block, scale, stride_an, stride_gn, stride_gd, HAS_DB, DOT_PRECISION)
            if D_B > 0:
                dk_b += tl.dot(dst, q_b, input_precision=DOT_PRECISION)
                _bwd_dq_slice(dst, k_b, acc_base, dq_base, db_m, offs_m, offs_b, mask_m, mask_b, start_n,
                              last_key_block, scale, stride_an, stride_gn, stride_gd, HAS_DB, DOT_PRECISION)
        db_n = db_base + (start_n // BLOCK_N) * stride_dbk
        _bwd_store_kv_slice(dk_a, dv_a, dk_base, dv_base, db_n, offs_n, offs_a, mask_n, mask_a, scale, stride_gn,
                            stride_gd, stride_dbt, HAS_DB)
        if D_B > 0:
            _bwd_store_kv_slice(dk_b, dv_b, dk_base, dv_base, db_n, offs_n, offs_b, mask_n, mask_b, scale,
                                stride_gn, stride_gd, stride_dbt, HAS_DB)
        tl.debug_barrier()  # this key block's dq partial sums are visible to every thread of the next one


@triton.jit
def _bwd_dq_slice(dst, k, acc_base, dq_base, db_ptr, offs_m, offs_d, mask_m, mask_d, start_n, last_key_block,
                  scale, stride_an, stride_gn, stride_gd, HAS_DB: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One column slice of dq for a block of query rows: this key block's dst^T @ k, added to the fp32 partial
    sums of the earlier key blocks; the last key block writes dq itself (and, HAS_DB, its column sums)."""
    mask_md = mask_m[:, None] & mask_d[None, :]
    dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION)                               # (BLOCK_M, D)
    acc_ptrs = acc_base + offs_m[:, None] * stride_an + offs_d[None, :]
    if start_n > 0:
        dq += tl.load(acc_ptrs, mask=mask_md, other=0.0)
    if last_key_block:
        tl.store(dq_base + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
                 (dq * scale).to(dq_base.dtype.element_ty), mask=mask_md)
        if HAS_DB:  # rows past N are 0 (their p is masked to 0)
            tl.store(db_ptr + offs_d, tl.sum(dq, 0) * scale, mask=mask_d)
    else:
        tl.store(acc_ptrs, dq, mask=mask_md)


@triton.jit
def _bwd_store_kv_slice(dk, dv, dk_base, dv_base, db_ptr, offs_n, offs_d, mask_n, mask_d, scale, stride_gn,
                        stride_gd, stride_dbt, HAS_DB: tl.constexpr):
    """Write one column slice of dk (scaled) and dv for a key block, and with HAS_DB their column sums."""
    mask_nd = mask_n[:, None] & mask_d[None, :]
    g_ptrs = offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(dk_base + g_ptrs, (dk * scale).to(dk_base.dtype.element_ty), mask=mask_nd)
    tl.store(dv_base + g_ptrs, dv.to(dv_base.dtype.element_ty), mask=mask_nd)
    if HAS_DB:  # keys past N: 0 likewise
        tl.store(db_ptr + stride_dbt + offs_d, tl.sum(dk, 0) * scale, mask=mask_d)
        tl.store(db_ptr + 2 * stride_dbt + offs_d, tl.sum(dv, 0), mask=mask_d)


@triton.jit
def _ragged_attention_bwd_kernel(
    Q, K, V,                                # (B, N, D) forward inputs, any strides
    DO,                                     # (B, N, D) gradient of the output, any strides
    DQ, DK, DV,                             # (B, N, D) out: gradients, allocated alike (one set of strides)
    DQ_ACC,                                 # (B, N, D) fp32 scratch: dq partial sums (when N > BLOCK_N)
    LSE, DELTA,                             # (B, H, N) fp32: forward logsumexp and rowsum(dO * O)
    DB,                                     # (B, blocks, 3D) fp32 out: column sums of dq | dk | dv blocks (HAS_DB)
    HEAD_OFFSET, HEAD_WIDTH, HEAD_TILE,     # (H,) int32: first column, width, tile width (SPLIT_D's) of each head
    stride_qb, stride_qn, stride_qd,        # strides of q (b and n ones divided by VEC, as below)
    stride_kb, stride_kn, stride_kd,        # strides of k
    stride_vb, stride_vn, stride_vd,        # strides of v
    stride_dob, stride_don, stride_dod,     # strides of do
    stride_gb, stride_gn, stride_gd,        # strides of dq, dk and dv
    stride_ab, stride_an,                   # strides of dq_acc (its last dim is contiguous)
    stride_lseb, stride_lseh,               # strides of lse and delta (last dim contiguous)
    stride_dbb, stride_dbk,                 # strides of DB's dims 0 and 1 (its q | k | v thirds are D apart)
    N,                                      # sequence length
    H,                                      # number of kept heads
    D,                                      # total width (the distance between DB's thirds)
    scale,                                  # softmax scale applied to q k^T
    BLOCK_M: tl.constexpr,                  # query rows per inner-loop step
    BLOCK_N: tl.constexpr,                  # keys per outer-loop step
    HEAD_D: tl.constexpr,                   # uniform head width, or 0 (see the forward kernel)
    UNIFORM_A: tl.constexpr,                # with HEAD_D: its tile slices (see _attn_bwd_head; B may be 0)
    UNIFORM_B: tl.constexpr,
    VEC: tl.constexpr,                      # proven alignment of offsets, widths and row strides
    LOG2_DMAX: tl.constexpr,                # log2 of the largest power-of-two tile (>= 4)
    SPLIT_D: tl.constexpr,                  # whether ragged heads take split tiles (else powers of two)
    HAS_DB: tl.constexpr,                   # whether to write DB (the qkv bias gradient's partial sums)
    DOT_PRECISION: tl.constexpr,            # tl.dot input_precision for fp32 inputs ("ieee" or "tf32")
):
    # One program per (batch, head): it owns every gradient element of its head, so nothing is shared.
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    col0, width, pad = _head_columns(HEAD_OFFSET, HEAD_WIDTH, HEAD_TILE, h, HEAD_D, VEC)
    qk_scale = scale * 1.4426950408889634
    # Batch and row strides of q, k, v, do and the gradients arrive divided by VEC (see the forward kernel).
    stride_qb, stride_qn = stride_qb * VEC, stride_qn * VEC
    stride_kb, stride_kn = stride_kb * VEC, stride_kn * VEC
    stride_vb, stride_vn = stride_vb * VEC, stride_vn * VEC
    stride_dob, stride_don = stride_dob * VEC, stride_don * VEC
    stride_gb, stride_gn = stride_gb * VEC, stride_gn * VEC
    q_base = Q + b * stride_qb + col0 * stride_qd
    k_base = K + b * stride_kb + col0 * stride_kd
    v_base = V + b * stride_vb + col0 * stride_vd
    do_base = DO + b * stride_dob + col0 * stride_dod
    g_off = b * stride_gb + col0 * stride_gd
    acc_base = DQ_ACC + b * stride_ab + col0
    lse_base = LSE + b * stride_lseb + h * stride_lseh
    delta_base = DELTA + b * stride_lseb + h * stride_lseh
    db_base = DB + b * stride_dbb + col0
    if HEAD_D > 0:
        _attn_bwd_head(q_base, k_base, v_base, do_base, DQ + g_off, DK + g_off, DV + g_off, acc_base, lse_base,
                       delta_base, db_base, width, N, scale, qk_scale,
                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don, stride_dod,
                       stride_gn, stride_gd, stride_an, stride_dbk, D, BLOCK_M, BLOCK_N, UNIFORM_A, UNIFORM_B,
                       HAS_DB, DOT_PRECISION)
    else:
        # One branch per tile class 2^A or 2^A + 2^B (B < A), as in the forward; a program takes its head's.
        # (2 ** LOG2_A is written out, not assigned: the interpreter turns assigned ints into tensors.)
        for LOG2_A in tl.static_range(4, LOG2_DMAX + 1):
            if pad == 2 ** LOG2_A:
                _attn_bwd_head(q_base, k_base, v_base, do_base, DQ + g_off, DK + g_off, DV + g_off, acc_base,
                               lse_base, delta_base, db_base, width, N, scale, qk_scale,
                               stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, stride_don,
                               stride_dod, stride_gn, stride_gd, stride_an, stride_dbk, D, BLOCK_M, BLOCK_N,
                               2 ** LOG2_A, 0, HAS_DB, DOT_PRECISION)
            for LOG2_B in tl.static_range(4, LOG2_A):
                if SPLIT_D and 2 ** LOG2_A + 2 ** LOG2_B <= 2 ** LOG2_DMAX:
                    if pad == 2 ** LOG2_A + 2 ** LOG2_B:
                        _attn_bwd_head(q_base, k_base, v_base, do_base, DQ + g_off, DK + g_off, DV + g_off,
                                       acc_base, lse_base, delta_base, db_base, width, N, scale, qk_scale,
                                       stride_qn, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                       stride_don, stride_dod, stride_gn, stride_gd, stride_an, stride_dbk, D,
                                       BLOCK_M, BLOCK_N, 2 ** LOG2_A, 2 ** LOG2_B, HAS_DB, DOT_PRECISION)


# ---------------------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------------------

def _head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(4, H) int32 on `device`: column offset, width, split tile (_tile_slices) and power-of-two tile of every
    head with width > 0."""
    if tracing():  # a tensor made under torch.compile's tracing must not enter the eager cache
        return _build_head_table(head_dims, device)
    return _cached_head_table(head_dims, device)


@functools.lru_cache(maxsize=256)
def _cached_head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _build_head_table(head_dims, device)


def _build_head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows: list[list[int]] = [[], [], [], []]
    offset = 0
    for w in head_dims:
        if w > 0:
            rows[0].append(offset)
            rows[1].append(w)
            rows[2].append(sum(_tile_slices(w)))                           # the split tile
            rows[3].append(max(_MIN_BLOCK_D, triton.next_power_of_2(w)))  # the power-of-two tile
        offset += w
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _tile_slices(width: int) -> tuple[int, int]:
    """(A, B): the forward's tile of a head `width` wide as power-of-two slices A + B (B = 0 or B < A), at
    least round_up(width, 16): 41 -> (32, 16), 64 -> (64, 0), 80 -> (64, 16), 112 -> (128, 0)."""
    w16 = max(_MIN_BLOCK_D, -(-width // 16) * 16)
    a = 1 << (w16.bit_length() - 1)
    rest = w16 - a
    if rest == 0:
        return a, 0
    b = max(_MIN_BLOCK_D, triton.next_power_of_2(rest))
    return (2 * a, 0) if b == a else (a, b)


def _log2_dmax(head_dims: Sequence[int]) -> int:
    return max(_MIN_BLOCK_D, triton.next_power_of_2(max(head_dims))).bit_length() - 1


_INTERPRETED = interpreter_agrees(_ragged_attention_fwd_kernel, __name__)
wrap_triton = kernel_wrapper(_INTERPRETED)


def _check_device(t: torch.Tensor) -> None:
    check_device(t, "ragged_attention", _INTERPRETED)


def _dot_precision(t: torch.Tensor) -> str:
    # fp32 inputs follow torch's matmul setting (TF32 off by default), as the reference's matmuls do; fp16/bf16
    # keep Triton's default (the precision only applies to fp32 operands).
    return "ieee" if t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _uniform_width(head_dims: tuple[int, ...]) -> int:
    """The width of every kept head when all are equal (the search path: every head d wide), else 0."""
    kept = {w for w in head_dims if w > 0}
    return kept.pop() if len(kept) == 1 else 0


def _alignment(head_dims: tuple[int, ...], tensors: Sequence[torch.Tensor]) -> int:
    """VEC: the largest power of two <= 16 bytes of elements dividing every head offset and width and the batch
    and row strides of `tensors`. The kernels hand it to tl.multiple_of, which lets Triton prove 16-byte
    alignment (pointers it checks itself) and emit vector loads and cp.async: with every offset a runtime table
    entry it cannot, and a DeiT-S head then loads element by element (168 scalar ld.global.b16 in the
    forward's PTX for sm_90, against 7 ld.global.v4 + 28 cp.async of 16 bytes with the hint: compile_only)."""
    numbers, offset = [], 0
    for w in head_dims:
        if w > 0:
            numbers += [offset, w]
        offset += w
    for t in tensors:
        numbers += [t.stride(0), t.stride(1)]
    vec = 16 // tensors[0].element_size()
    while vec > 1 and any(n % vec for n in numbers):
        vec //= 2
    return vec


def _strides(t: torch.Tensor, vec: int) -> tuple[int, int, int]:
    """t's strides as the kernels take them: those of dims 0 and 1 divided by VEC (exact: _alignment)."""
    return t.stride(0) // vec, t.stride(1) // vec, t.stride(2)


def _fwd_config(interpret: bool, dtype: torch.dtype) -> tuple[dict, dict]:
    if interpret:
        # Smallest tl.dot tile: cheap in the interpreter, and N = 17 or 50 still spans several blocks, so the
        # online softmax across key blocks and the partial last block are both exercised.
        return dict(BLOCK_M=16, BLOCK_N=16), {}
    # Not yet measured on a GPU; chosen from the compiled code (benchmarks.kernel_resources, triton 3.8):
    if dtype == torch.float32:
        # fp32 tl.dot in "ieee" is FMA code: 64 x 64 tiles with 4 warps spilled 2.7 KB per thread on sm_90 and
        # 24.8 KB on sm_80; 64 x 32 with 8 warps spilled 72 B on sm_90 for unaligned heads (VEC = 1, an
        # address register per scalar load); 64 x 16 with 8 warps spilled 8 B on sm_80 with triton 3.6 for uniform
        # 32-wide heads (qkv_attention's own samples; 16 B with one stage, and no cp.async); 32 x 16 with 4 warps
        # compiles without spills on both targets with triton 3.6 and 3.8.
        return dict(BLOCK_M=32, BLOCK_N=16), dict(num_warps=4, num_stages=2)
    # bf16/fp16: the Triton tutorial's tile for head width <= 64; N = 197 gives 4 query blocks of 64 (last one
    # 5 rows): 256 rows and keys computed for 197 (77%); N = 50: 64 (78%); N = 577: 640 (90%). sm_90: 137-142
    # registers, wgmma, cp.async of 16 bytes; sm_80: 168-181, mma.sync; no spills.
    return dict(BLOCK_M=64, BLOCK_N=64), dict(num_warps=4, num_stages=2)


def _bwd_config(interpret: bool, dtype: torch.dtype, aligned: bool, arch: int = 90, bias_sum: bool = False,
                ragged: bool = False) -> tuple[dict, dict]:
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=16), {}
    # Not yet measured on a GPU; from the compiled code as above. 64 keys held (k, v, dk, dv) against query
    # steps of BLOCK_M rows.
    if dtype == torch.float32:
        # 32-row steps spilled (sm_80: 1.9 KB per thread); 16-row steps: 148-198 registers on sm_90. On sm_80
        # ptxas stopped at 168 registers and spilled 8 B for a 41/63/64-wide slim plan; allowed 255 (maxnreg)
        # it spills nothing there (and on sm_90 the cap made unaligned heads spill, so it is sm_80 only).
        launch = dict(num_warps=4, num_stages=2, **(dict(maxnreg=255) if arch < 90 else {}))
        if bias_sum and arch < 90:
            return dict(BLOCK_M=16, BLOCK_N=16), launch  # with the bias sums 32 keys spilled 8 B on sm_80
        return dict(BLOCK_M=16, BLOCK_N=32), launch
    if not aligned:
        # Scalar loads need an address register each: 32-row steps spilled 16 B on sm_80; 16-row ones do not.
        return dict(BLOCK_M=16, BLOCK_N=64), dict(num_warps=4, num_stages=2)
    if bias_sum and arch < 90:
        # sm_80 has no room for the bias sums at 32-row steps: 255 registers already, and with them it spilled
        # 24-32 B per thread (DeiT-S search and slim plans, compile_only); 16-row steps do not spill.
        return dict(BLOCK_M=16, BLOCK_N=64), dict(num_warps=4, num_stages=2)
    if ragged:
        # Ragged heads in split tiles (one branch per tile class): 32-row steps fit triton 3.8 (248-252 registers
        # on sm_90) but spilled 96-204 B per thread with triton 3.6, the GPU image's; 16-row steps spill on neither.
        return dict(BLOCK_M=16, BLOCK_N=64), dict(num_warps=4, num_stages=2)
    # bf16/fp16, aligned: 218-233 registers on sm_90, 255 on sm_80, no spills.
    return dict(BLOCK_M=32, BLOCK_N=64), dict(num_warps=4, num_stages=2)


def _fwd_candidates(interpret: bool, dtype: torch.dtype) -> list[tuple[dict, dict]]:
    """The forward's autotune list (VITSLIM_AUTOTUNE=1), the default first. Short, as docs/conventions.md asks, and
    every entry passes the compile gate (kernel_resources compiles them all): for 16-bit, the default 64 x 64,
    FlashAttention-2's 128-row tile for head widths <= 64 with 8 warps, and 64 x 32 with 3 stages. One config
    under the interpreter and for fp32 (FMA code, tiles bounded by spills)."""
    default = _fwd_config(interpret, dtype)
    if interpret or dtype == torch.float32:
        return [default]
    return [default, (dict(BLOCK_M=128, BLOCK_N=64), dict(num_warps=8, num_stages=2)),
            (dict(BLOCK_M=64, BLOCK_N=32), dict(num_warps=4, num_stages=3))]


def _bwd_candidates(interpret: bool, dtype: torch.dtype, aligned: bool, arch: int = 90, bias_sum: bool = False,
                    ragged: bool = False) -> list[tuple[dict, dict]]:
    """The backward's autotune list, the default first: 16-bit aligned heads also try 16-row query steps (and on
    sm_80 32-key blocks); everything else (interpreter, fp32, scalar loads) has one config, set by spills. Left
    out, from the compiled code: 16 x 32 on sm_90 (no wgmma: the tile is below its 64-row warpgroup shape) and
    32 x 32 on sm_80 (spilled 32 B per thread for the slim plan); for ragged split tiles, every alternative to
    16 x 64 (with triton 3.6: 32 x 64 spilled 96-204 B on sm_90, 16 x 32 24 B on sm_80)."""
    default = _bwd_config(interpret, dtype, aligned, arch, bias_sum, ragged)
    if interpret or dtype == torch.float32 or not aligned or ragged:
        return [default]
    others = [dict(BLOCK_M=16, BLOCK_N=64)] + ([dict(BLOCK_M=16, BLOCK_N=32)] if arch < 90 else [])
    return [default] + [(blocks, default[1]) for blocks in others if blocks != default[0]]


@fail_safe("ragged_attention_fwd")  # its fallback: ops/ragged_attention.py registers it
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, D = q.shape
    dims = tuple(int(w) for w in head_dims)
    table = _head_table(dims, q.device)
    H = table.shape[1]
    o = _alloc((B, N, D), q)
    lse = _alloc((B, H, N), q, torch.float32)
    if B * N * H == 0:
        return o, lse
    _check_device(q)
    vec = _alignment(dims, (q, k, v, o))
    head_d, log2_dmax = _uniform_width(dims), _log2_dmax(dims)
    uniform_a, uniform_b = _tile_slices(head_d) if head_d else (0, 0)

    def run(config: tuple[dict, dict]) -> None:
        blocks, launch = config
        grid = (triton.cdiv(N, blocks["BLOCK_M"]) * B * H,)
        wrap_triton(_ragged_attention_fwd_kernel)[grid](
            q, k, v, o, lse, table[0], table[1], table[2],
            *_strides(q, vec), *_strides(k, vec), *_strides(v, vec), *_strides(o, vec),
            lse.stride(0), lse.stride(1),
            N, H, scale,
            HEAD_D=head_d, UNIFORM_A=uniform_a, UNIFORM_B=uniform_b, VEC=vec, LOG2_DMAX=log2_dmax,
            DOT_PRECISION=_dot_precision(q), **blocks, **launch)

    # Autotune key: (N, widest head, dtype) and what else changes the compiled kernel.
    key = (N, log2_dmax, head_d, q.dtype, vec, _dot_precision(q), q.device)
    run(tuned("ragged_attention_fwd", key, _fwd_candidates(_INTERPRETED, q.dtype), run, q.device))
    return o, lse


@fail_safe("ragged_attention_bwd")  # its fallback: ops/ragged_attention.py registers it
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
         lse: torch.Tensor, head_dims: Sequence[int], scale: float,
         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, bias_sum: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias), the gradients written into `out` when given: three (B, N, D) tensors with one set of
    strides (the views of one (B, N, 3D) buffer: the packed op's dqkv, which the qkv projection's backward reads
    without a cat). With bias_sum, dbias is the (3D,) fp32 sum of dq | dk | dv over B and N, the gradient of a
    bias added to q | k | v, summed by the kernel as it writes them (else None)."""
    B, N, D = q.shape
    dims = tuple(int(w) for w in head_dims)
    table = _head_table(dims, q.device)
    H = table.shape[1]
    dq, dk, dv = out if out is not None else tuple(_alloc((B, N, D), q) for _ in range(3))
    if B * N * H == 0:
        for buffer in out or ():
            buffer.zero_()
        return dq, dk, dv, q.new_zeros((3 * D,), dtype=torch.float32) if bias_sum else None
    _check_device(q)
    lse = lse.contiguous()  # its strides are given for dims 0 and 1 only; delta shares them
    delta = _alloc((B, H, N), q, torch.float32)
    head_d, log2_dmax = _uniform_width(dims), _log2_dmax(dims)
    fwd_blocks, _ = _fwd_config(_INTERPRETED, q.dtype)
    grid = (triton.cdiv(N, fwd_blocks["BLOCK_M"]) * B * H,)
    vec = _alignment(dims, (o, do))
    wrap_triton(_ragged_attention_bwd_preprocess_kernel)[grid](
        o, do, delta, table[0], table[1], table[2],
        *_strides(o, vec), *_strides(do, vec),
        delta.stride(0), delta.stride(1),
        N, H, BLOCK_M=fwd_blocks["BLOCK_M"], BLOCK_D=2 ** log2_dmax, HEAD_D=head_d, VEC=vec)
    vec = _alignment(dims, (q, k, v, do, dq))
    # Split tiles (a 41-wide head over 32 + 16 columns, not 64) for 16-bit aligned heads only: with fp32 or
    # unaligned (scalar) loads the extra branches spilled 8-48 B per thread on sm_90/sm_80 (compile_only, slim
    # plan 0/1/17/41/63/64 and the unaligned direct call), so those keep power-of-two tiles, uniform widths too.
    split_d = q.dtype != torch.float32 and vec * q.element_size() == 16
    candidates = _bwd_candidates(_INTERPRETED, q.dtype, aligned=vec * q.element_size() == 16,
                                 arch=90 if _INTERPRETED else arch(q.device), bias_sum=bias_sum,
                                 ragged=split_d and not head_d)
    # Buffers sized for every candidate only where another may launch (tuning, or the gate compiling them all):
    # else for the default, so the lists cost nothing when autotuning is off.
    sized_for = candidates if tuning_possible() else candidates[:1]
    min_m = min(blocks["BLOCK_M"] for blocks, _ in sized_for)
    min_n = min(blocks["BLOCK_N"] for blocks, _ in sized_for)
    # dq partial sums between key blocks, fp32; one key block needs none (a 1-element stand-in is passed).
    dq_acc = _alloc((B, N, D) if N > min_n else (1, 1, 1), q, torch.float32)
    # Bias sums, fp32, per image and block of rows: the q third per query block, k and v per key block (zeroed:
    # a third has fewer blocks than the buffer when BLOCK_M < BLOCK_N). DeiT-S batch 256: (256, 7, 1152), 8 MB.
    db = torch.empty((B, triton.cdiv(N, min_m), 3 * D), dtype=torch.float32, device=q.device) if bias_sum else None
    uniform_a, uniform_b = _tile_slices(head_d) if head_d else (0, 0)
    if head_d and not split_d:
        uniform_a, uniform_b = max(_MIN_BLOCK_D, triton.next_power_of_2(head_d)), 0

    def run(config: tuple[dict, dict]) -> None:
        blocks, launch = config
        if db is not None:
            db.zero_()  # candidates fill different block slots: none may keep another's sums
        wrap_triton(_ragged_attention_bwd_kernel)[(B * H,)](
            q, k, v, do, dq, dk, dv, dq_acc, lse, delta, db if db is not None else delta, table[0], table[1],
            table[2] if split_d else table[3],
            *_strides(q, vec), *_strides(k, vec), *_strides(v, vec), *_strides(do, vec), *_strides(dq, vec),
            dq_acc.stride(0), dq_acc.stride(1),
            lse.stride(0), lse.stride(1), *(db.stride()[:2] if db is not None else (0, 0)),
            N, H, D, scale,
            HEAD_D=head_d, UNIFORM_A=uniform_a, UNIFORM_B=uniform_b, VEC=vec, LOG2_DMAX=log2_dmax,
            SPLIT_D=split_d, HAS_DB=db is not None, DOT_PRECISION=_dot_precision(q), **blocks, **launch)

    key = (N, log2_dmax, head_d, q.dtype, vec, _dot_precision(q), bias_sum, q.device)
    run(tuned("ragged_attention_bwd", key, candidates, run, q.device))
    # One fixed-order sum (no atomics) over images and blocks.
    return dq, dk, dv, db.sum((0, 1)) if db is not None else None

"""Triton window attention (docs/design.md section 8): Swin's ragged-width attention with the per-head relative
position bias gathered from its table inside the kernel and the shift mask of each window, all heads of all
windows in one launch.

q, k, v, o: (BW, N, D), BW = B * nW windows of N tokens, D = sum(head_dims), head h in columns
[offset_h, offset_h + w_h). table: (R, heads) the bias table, index: (N, N) its row for each (query, key) pair,
mask: (nW, N, N) or None, window w taking mask[w % nW] (timm's partition order). Scores of head h:
q_h k_h^T * scale + table[index, column_h] + mask[w % nW].

Tiles. A window is short (N = 49 at window 7, 144 at 12) and windows are many (B * 64 in Swin-T's first stage).
Every program takes WINDOWS consecutive windows of one head (and, for N > BLOCK_N, one block of query rows): its
bias tile is gathered once and reused for all of them when a window fits one block, and the launch has B * nW *
heads / WINDOWS programs rather than one per window and head. A window of 49 is padded to a 64 x 64 tile in
registers (never in memory): 59% of the tile is real. Packing windows into one tile is worse: two windows of 49 in
a 128-row tile need a block-diagonal 128 x 128 score tile, 29% real, and a 64-row tile spans up to three windows'
keys. N = 144 takes 64-row blocks (3 x 3 tiles, 75% real per axis).

Heads of different widths: a (4, H) int32 table (column offset, width, power-of-two tile, bias-table column) of
the heads with w_h > 0; a program runs the branch compiled for its head's tile (16, 32, 64, ...), loads and stores
masked to the real w_h columns.

Kernels:
- `_window_attention_fwd_kernel`: online softmax (one key block at N <= BLOCK_N), fp32 accumulation, writes o and
  the natural logsumexp of each query row (BW, H, N).
- `_window_attention_bwd_kernel`: one program per (window group, head), every gradient element written by exactly
  one program. One block (N <= BLOCK): FlashAttention-2's five matmuls on the whole window. More blocks: a key-
  block pass (dk, dv in registers) and a query-block pass (dq in registers), 7 matmuls per tile, no atomics and
  no dq scratch. The bias gradient: dS summed over the program's windows in a fixed order (in registers for one
  block, else read-add-write of the program's own fp32 slab), one (N, N) slab per program and head; the op sums
  the slabs over programs and scatters them into the table rows deterministically (ops/window_attention.py).
  Optionally the column sums of dq, dk, dv (the qkv bias gradient of the packed op), per program.

Launchers `_fwd(q, k, v, table, index, mask, head_dims, scale) -> (o, lse)` and `_bwd(...) -> (dq, dk, dv, dbias,
dqkv_bias)`, fail_safe (their fallbacks are registered by the op).
"""
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..runtime import alloc as _alloc
from ..runtime import fail_safe
from ._launch import arch, check_device, interpreter_agrees, kernel_wrapper, tracing
from .ragged_attention import _alignment, _dot_precision, _strides

_MIN_BLOCK_D = 16   # tl.dot needs every dimension >= 16
_LOG2E = tl.constexpr(1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * log2(e))


@triton.jit
def _bias_tile(TABLE, INDEX, column, offs_m, offs_n, N, stride_tr, stride_th):
    """(BLOCK_M, BLOCK_N) fp32: table[index[m, n], column], 0 outside the window."""
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    row = tl.load(INDEX + offs_m[:, None] * N + offs_n[None, :], mask=valid, other=0)
    return tl.load(TABLE + row * stride_tr + column * stride_th, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _mask_tile(MASK, w, NW, offs_m, offs_n, N):
    """(BLOCK_M, BLOCK_N) fp32: the shift mask of window w (mask[w % nW]), 0 outside the window."""
    valid = (offs_m < N)[:, None] & (offs_n < N)[None, :]
    base = MASK + (w % NW) * N * N
    return tl.load(base + offs_m[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _fwd_windows(Q, K, V, O, LSE, TABLE, INDEX, MASK, col0, width, column, g, h,
                 stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd,
                 stride_ob, stride_on, stride_od, stride_lseb, stride_lseh, stride_tr, stride_th,
                 BW, N, NW, WINDOWS, pid_m, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_T: tl.constexpr, ONE_BLOCK: tl.constexpr,
                 HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attention of one block of query rows of head h in each of the windows of group g."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, D_T)
    mask_d = offs_d < width
    if ONE_BLOCK:  # the head's bias, in base 2, once for all the program's windows
        bias = _bias_tile(TABLE, INDEX, column, offs_m, tl.arange(0, BLOCK_N), N, stride_tr, stride_th) * _LOG2E
    w_first = g * WINDOWS
    # Runtime bounds, not a guard inside the loop: the loads stay in the loop body, where Triton pipelines them.
    for i in range(0, tl.minimum(WINDOWS, BW - w_first)):
        w64 = w_first.to(tl.int64) + i  # w * stride can pass 2**31
        q_base = Q + w64 * stride_qb + col0 * stride_qd
        k_base = K + w64 * stride_kb + col0 * stride_kd
        v_base = V + w64 * stride_vb + col0 * stride_vd
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        acc = tl.zeros([BLOCK_M, D_T], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                         mask=mask_d[:, None] & mask_n[None, :], other=0.0)              # (D_T, BLOCK_N)
            s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale
            if ONE_BLOCK:
                s += bias
                if HAS_MASK:
                    s += _mask_tile(MASK, w64, NW, offs_m, offs_n, N) * _LOG2E
            else:
                s += _score_add(TABLE, INDEX, MASK, column, w64, NW, offs_m, offs_n, N, stride_tr, stride_th, HAS_MASK)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block holds a valid key
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        o_ptrs = O + w64 * stride_ob + col0 * stride_od + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
        tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(LSE + w64 * stride_lseb + h * stride_lseh + offs_m, (m_i + tl.log2(l_i)) / _LOG2E, mask=mask_m)


@triton.jit
def _window_attention_fwd_kernel(
    Q, K, V,                                # (BW, N, D) inputs, any strides
    O,                                      # (BW, N, D) output
    LSE,                                    # (BW, H, N) fp32 out: logsumexp of each row's scores
    TABLE,                                  # (R, heads) relative-position bias table, any float dtype
    INDEX,                                  # (N, N) int, contiguous: the table row of each (query, key)
    MASK,                                   # (nW, N, N) float, contiguous: shift masks (HAS_MASK)
    HEADS,                                  # (4, H) int32: column offset, width, tile, table column per kept head
    stride_qb, stride_qn, stride_qd,        # strides of q (b and n ones divided by VEC)
    stride_kb, stride_kn, stride_kd,        # strides of k (b and n ones divided by VEC)
    stride_vb, stride_vn, stride_vd,        # strides of v (b and n ones divided by VEC)
    stride_ob, stride_on, stride_od,        # strides of o (b and n ones divided by VEC)
    stride_lseb, stride_lseh,               # strides of lse (last dim contiguous)
    stride_tr, stride_th,                   # strides of the table
    BW,                                     # number of windows (B * nW)
    N,                                      # tokens per window
    H,                                      # number of kept heads
    NW,                                     # windows per image (the mask's first dim)
    WINDOWS,                                # windows per program
    scale,                                  # softmax scale applied to q k^T
    BLOCK_M: tl.constexpr,                  # query rows per program
    BLOCK_N: tl.constexpr,                  # keys per inner step
    ONE_BLOCK: tl.constexpr,                # N <= BLOCK_N: one key block, the bias gathered once per program
    HAS_MASK: tl.constexpr,                 # a shifted block: add mask[w % NW]
    VEC: tl.constexpr,                      # the host proved offsets, widths and row strides multiples of this
    LOG2_DMAX: tl.constexpr,                # log2 of the largest tile (>= 4)
    DOT_PRECISION: tl.constexpr,            # tl.dot input_precision for fp32 inputs
):
    num_m_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    h = (pid // num_m_blocks) % H
    g = pid // (num_m_blocks * H)
    col0 = tl.multiple_of(tl.load(HEADS + h), VEC)
    width = tl.multiple_of(tl.load(HEADS + H + h), VEC)
    tile = tl.load(HEADS + 2 * H + h)
    column = tl.load(HEADS + 3 * H + h)
    qk_scale = scale * _LOG2E
    for LOG2_D in tl.static_range(4, LOG2_DMAX + 1):
        if tile == 2 ** LOG2_D:
            _fwd_windows(Q, K, V, O, LSE, TABLE, INDEX, MASK, col0, width, column, g, h,
                         stride_qb * VEC, stride_qn * VEC, stride_qd, stride_kb * VEC, stride_kn * VEC, stride_kd,
                         stride_vb * VEC, stride_vn * VEC, stride_vd, stride_ob * VEC, stride_on * VEC, stride_od,
                         stride_lseb, stride_lseh, stride_tr, stride_th, BW, N, NW, WINDOWS, pid_m, qk_scale,
                         BLOCK_M, BLOCK_N, 2 ** LOG2_D, ONE_BLOCK, HAS_MASK, DOT_PRECISION)


@triton.jit
def _bwd_tile(q, k, v, do, lse, delta, bias, offs_m, offs_n, mask_m, mask_n, qk_scale,
              DOT_PRECISION: tl.constexpr):
    """p and dS of one (query block, key block) tile: p = exp(S - lse), dS = p * (dO v^T - delta), fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias
    p = tl.exp2(s - lse[:, None] * _LOG2E)
    p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _load_rows(base, offs, mask_rows, offs_d, mask_d, stride_n, stride_d):
    return tl.load(base + offs[:, None] * stride_n + offs_d[None, :] * stride_d,
                   mask=mask_rows[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _score_add(TABLE, INDEX, MASK, column, w, NW, offs_m, offs_n, N, stride_tr, stride_th, HAS_MASK: tl.constexpr):
    """What a (query block, key block) tile adds to its scores, in base 2: the head's bias and window w's mask."""
    add = _bias_tile(TABLE, INDEX, column, offs_m, offs_n, N, stride_tr, stride_th) * _LOG2E
    if HAS_MASK:
        add += _mask_tile(MASK, w, NW, offs_m, offs_n, N) * _LOG2E
    return add


@triton.jit
def _query_rows(q_base, do_base, o_base, lse_base, offs_m, mask_m, offs_d, mask_d, stride_qn, stride_qd, stride_don,
                stride_dod, stride_on, stride_od):
    """q, dO, delta = rowsum(dO * O) (fp32) and the logsumexp of a block of query rows."""
    q = _load_rows(q_base, offs_m, mask_m, offs_d, mask_d, stride_qn, stride_qd)
    do = _load_rows(do_base, offs_m, mask_m, offs_d, mask_d, stride_don, stride_dod)
    o = _load_rows(o_base, offs_m, mask_m, offs_d, mask_d, stride_on, stride_od)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    return q, do, delta, tl.load(lse_base + offs_m, mask=mask_m, other=0.0)


@triton.jit
def _bwd_windows(Q, K, V, O, DO, DQ, DK, DV, LSE, TABLE, INDEX, MASK, DBIAS, DQKV_BIAS,
                 col0, width, column, g, h,
                 stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd,
                 stride_ob, stride_on, stride_od, stride_dob, stride_don, stride_dod, stride_gb, stride_gn, stride_gd,
                 stride_lseb, stride_lseh, stride_tr, stride_th, stride_dbg, stride_dbh, stride_qbg,
                 BW, N, NW, WINDOWS, D, scale, qk_scale,
                 BLOCK: tl.constexpr, D_T: tl.constexpr, ONE_BLOCK: tl.constexpr, HAS_MASK: tl.constexpr,
                 HAS_QKV_BIAS: tl.constexpr, HOIST_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq, dk, dv of head h in the windows of group g, this program's share of the bias gradient and, with
    HAS_QKV_BIAS, of the qkv bias gradient."""
    offs_d = tl.arange(0, D_T)
    mask_d = offs_d < width
    db_base = DBIAS + g.to(tl.int64) * stride_dbg + h * stride_dbh
    dq_sum = tl.zeros([D_T], tl.float32)
    dk_sum = tl.zeros([D_T], tl.float32)
    dv_sum = tl.zeros([D_T], tl.float32)
    if ONE_BLOCK:
        offs = tl.arange(0, BLOCK)
        mask_r = offs < N
        if HOIST_BIAS:
            bias = _bias_tile(TABLE, INDEX, column, offs, offs, N, stride_tr, stride_th) * _LOG2E
        dbias = tl.zeros([BLOCK, BLOCK], tl.float32)
    w_first = g * WINDOWS
    for i in range(0, tl.minimum(WINDOWS, BW - w_first)):
        w64 = w_first.to(tl.int64) + i
        q_base = Q + w64 * stride_qb + col0 * stride_qd
        k_base = K + w64 * stride_kb + col0 * stride_kd
        v_base = V + w64 * stride_vb + col0 * stride_vd
        o_base = O + w64 * stride_ob + col0 * stride_od
        do_base = DO + w64 * stride_dob + col0 * stride_dod
        lse_base = LSE + w64 * stride_lseb + h * stride_lseh
        g_off = w64 * stride_gb + col0 * stride_gd
        if ONE_BLOCK:
            q, do, delta, lse = _query_rows(q_base, do_base, o_base, lse_base, offs, mask_r, offs_d, mask_d,
                                            stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od)
            k = _load_rows(k_base, offs, mask_r, offs_d, mask_d, stride_kn, stride_kd)
            v = _load_rows(v_base, offs, mask_r, offs_d, mask_d, stride_vn, stride_vd)
            if HOIST_BIAS:
                add = bias
                if HAS_MASK:
                    add += _mask_tile(MASK, w64, NW, offs, offs, N) * _LOG2E
            else:  # gathered again per window (L1/L2 hits): 16 fewer registers per thread
                add = _score_add(TABLE, INDEX, MASK, column, w64, NW, offs, offs, N, stride_tr, stride_th, HAS_MASK)
            p, ds = _bwd_tile(q, k, v, do, lse, delta, add, offs, offs, mask_r, mask_r, qk_scale, DOT_PRECISION)
            dbias += ds
            dsl = ds.to(q.dtype)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dk = tl.dot(tl.trans(dsl), q, input_precision=DOT_PRECISION) * scale
            dq = tl.dot(dsl, k, input_precision=DOT_PRECISION) * scale
            g_ptrs = offs[:, None] * stride_gn + offs_d[None, :] * stride_gd
            mask_rd = mask_r[:, None] & mask_d[None, :]
            tl.store(DQ + g_off + g_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_rd)
            tl.store(DK + g_off + g_ptrs, dk.to(DK.dtype.element_ty), mask=mask_rd)
            tl.store(DV + g_off + g_ptrs, dv.to(DV.dtype.element_ty), mask=mask_rd)
            if HAS_QKV_BIAS:  # rows past N are 0 (their p and dS are)
                dq_sum += tl.sum(dq, 0)
                dk_sum += tl.sum(dk, 0)
                dv_sum += tl.sum(dv, 0)
        else:
            # Key-block pass: dk, dv of each key block over all query blocks; dS into the bias slab.
            for start_n in range(0, N, BLOCK):
                offs_n = start_n + tl.arange(0, BLOCK)
                mask_n = offs_n < N
                k = _load_rows(k_base, offs_n, mask_n, offs_d, mask_d, stride_kn, stride_kd)
                v = _load_rows(v_base, offs_n, mask_n, offs_d, mask_d, stride_vn, stride_vd)
                dk = tl.zeros([BLOCK, D_T], tl.float32)
                dv = tl.zeros([BLOCK, D_T], tl.float32)
                for start_m in range(0, N, BLOCK):
                    offs_m = start_m + tl.arange(0, BLOCK)
                    mask_m = offs_m < N
                    q, do, delta, lse = _query_rows(q_base, do_base, o_base, lse_base, offs_m, mask_m, offs_d,
                                                    mask_d, stride_qn, stride_qd, stride_don, stride_dod, stride_on,
                                                    stride_od)
                    add = _score_add(TABLE, INDEX, MASK, column, w64, NW, offs_m, offs_n, N, stride_tr, stride_th,
                                     HAS_MASK)
                    p, ds = _bwd_tile(q, k, v, do, lse, delta, add, offs_m, offs_n, mask_m, mask_n, qk_scale,
                                      DOT_PRECISION)
                    db_ptrs = db_base + offs_m[:, None] * N + offs_n[None, :]
                    mask_mn = mask_m[:, None] & mask_n[None, :]
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=mask_mn, other=0.0) + ds, mask=mask_mn)
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
                    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
                dk = dk * scale
                g_ptrs = offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
                mask_nd = mask_n[:, None] & mask_d[None, :]
                tl.store(DK + g_off + g_ptrs, dk.to(DK.dtype.element_ty), mask=mask_nd)
                tl.store(DV + g_off + g_ptrs, dv.to(DV.dtype.element_ty), mask=mask_nd)
                if HAS_QKV_BIAS:
                    dk_sum += tl.sum(dk, 0)
                    dv_sum += tl.sum(dv, 0)
            # Query-block pass: dq of each query block over all key blocks (p and dS recomputed).
            for start_m in range(0, N, BLOCK):
                offs_m = start_m + tl.arange(0, BLOCK)
                mask_m = offs_m < N
                q, do, delta, lse = _query_rows(q_base, do_base, o_base, lse_base, offs_m, mask_m, offs_d, mask_d,
                                                stride_qn, stride_qd, stride_don, stride_dod, stride_on, stride_od)
                dq = tl.zeros([BLOCK, D_T], tl.float32)
                for start_n in range(0, N, BLOCK):
                    offs_n = start_n + tl.arange(0, BLOCK)
                    mask_n = offs_n < N
                    k = _load_rows(k_base, offs_n, mask_n, offs_d, mask_d, stride_kn, stride_kd)
                    v = _load_rows(v_base, offs_n, mask_n, offs_d, mask_d, stride_vn, stride_vd)
                    add = _score_add(TABLE, INDEX, MASK, column, w64, NW, offs_m, offs_n, N, stride_tr, stride_th,
                                     HAS_MASK)
                    p, ds = _bwd_tile(q, k, v, do, lse, delta, add, offs_m, offs_n, mask_m, mask_n, qk_scale,
                                      DOT_PRECISION)
                    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
                dq = dq * scale
                g_ptrs = offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
                tl.store(DQ + g_off + g_ptrs, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
                if HAS_QKV_BIAS:
                    dq_sum += tl.sum(dq, 0)
            tl.debug_barrier()  # this window's bias sums are visible to every thread before the next adds
    if ONE_BLOCK:
        tl.store(db_base + offs[:, None] * N + offs[None, :], dbias, mask=mask_r[:, None] & mask_r[None, :])
    if HAS_QKV_BIAS:
        qb_base = DQKV_BIAS + g.to(tl.int64) * stride_qbg + col0
        tl.store(qb_base + offs_d, dq_sum, mask=mask_d)
        tl.store(qb_base + D + offs_d, dk_sum, mask=mask_d)
        tl.store(qb_base + 2 * D + offs_d, dv_sum, mask=mask_d)


@triton.jit
def _window_attention_bwd_kernel(
    Q, K, V, O, DO,                         # (BW, N, D) forward inputs, output and its gradient, any strides
    DQ, DK, DV,                             # (BW, N, D) out: gradients, one set of strides
    LSE,                                    # (BW, H, N) fp32: the forward's logsumexp
    TABLE, INDEX, MASK,                     # as in the forward
    DBIAS,                                  # (G, H, N, N) fp32 out: dS summed over each program's windows
    DQKV_BIAS,                              # (G, 3D) fp32 out: column sums of dq | dk | dv (HAS_QKV_BIAS)
    HEADS,                                  # (4, H) int32: column offset, width, tile, table column
    stride_qb, stride_qn, stride_qd,        # strides of q (b and n ones divided by VEC)
    stride_kb, stride_kn, stride_kd,        # strides of k
    stride_vb, stride_vn, stride_vd,        # strides of v
    stride_ob, stride_on, stride_od,        # strides of o
    stride_dob, stride_don, stride_dod,     # strides of do
    stride_gb, stride_gn, stride_gd,        # strides of dq, dk and dv
    stride_lseb, stride_lseh,               # strides of lse (last dim contiguous)
    stride_tr, stride_th,                   # strides of the table
    stride_dbg, stride_dbh,                 # strides of DBIAS's dims 0 and 1 (the (N, N) slab is contiguous)
    stride_qbg,                             # stride of DQKV_BIAS's dim 0
    BW, N, H, NW,                           # windows, tokens per window, kept heads, windows per image
    WINDOWS,                                # windows per program
    D,                                      # total width (the distance between DQKV_BIAS's thirds)
    scale,                                  # softmax scale
    BLOCK: tl.constexpr,                    # rows and keys per tile
    ONE_BLOCK: tl.constexpr,                # N <= BLOCK
    HAS_MASK: tl.constexpr,
    HAS_QKV_BIAS: tl.constexpr,
    HOIST_BIAS: tl.constexpr,               # one block: gather the bias once per program (else once per window)
    VEC: tl.constexpr,                      # proven alignment of offsets, widths and row strides
    LOG2_DMAX: tl.constexpr,                # log2 of the largest tile (>= 4)
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = pid % H
    g = pid // H
    col0 = tl.multiple_of(tl.load(HEADS + h), VEC)
    width = tl.multiple_of(tl.load(HEADS + H + h), VEC)
    tile = tl.load(HEADS + 2 * H + h)
    column = tl.load(HEADS + 3 * H + h)
    for LOG2_D in tl.static_range(4, LOG2_DMAX + 1):
        if tile == 2 ** LOG2_D:
            _bwd_windows(Q, K, V, O, DO, DQ, DK, DV, LSE, TABLE, INDEX, MASK, DBIAS, DQKV_BIAS, col0, width, column,
                         g, h, stride_qb * VEC, stride_qn * VEC, stride_qd, stride_kb * VEC, stride_kn * VEC,
                         stride_kd, stride_vb * VEC, stride_vn * VEC, stride_vd, stride_ob * VEC, stride_on * VEC,
                         stride_od, stride_dob * VEC, stride_don * VEC, stride_dod, stride_gb * VEC,
                         stride_gn * VEC, stride_gd, stride_lseb, stride_lseh, stride_tr, stride_th, stride_dbg,
                         stride_dbh, stride_qbg, BW, N, NW, WINDOWS, D, scale, scale * _LOG2E,
                         BLOCK, 2 ** LOG2_D, ONE_BLOCK, HAS_MASK, HAS_QKV_BIAS, HOIST_BIAS, DOT_PRECISION)


# -- launchers -------------------------------------------------------------------------------------------------
_INTERPRETED = interpreter_agrees(_window_attention_fwd_kernel, __name__)
wrap_triton = kernel_wrapper(_INTERPRETED)


def head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(4, H_kept) int32 on `device`: column offset, width, power-of-two tile and bias-table column of each head of
    non-zero width (a zero-width head owns no column and has no program). Cached per (widths, device), as the ragged
    kernels' table is: building it is a host-to-device copy, twice per block and step otherwise."""
    if tracing():  # a tensor made under torch.compile's tracing must not enter the eager cache
        return _build_head_table(head_dims, device)
    return _cached_head_table(head_dims, device)


@functools.lru_cache(maxsize=256)
def _cached_head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return _build_head_table(head_dims, device)


def _build_head_table(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    rows: list[list[int]] = [[], [], [], []]
    offset = 0
    for column, w in enumerate(head_dims):
        if w > 0:
            for row, value in zip(rows, (offset, w, max(_MIN_BLOCK_D, triton.next_power_of_2(w)), column)):
                row.append(value)
        offset += w
    return torch.tensor(rows, dtype=torch.int32).to(device)


def _log2_dmax(head_dims: Sequence[int]) -> int:
    return max(_MIN_BLOCK_D, triton.next_power_of_2(max(head_dims))).bit_length() - 1


def block_size(N: int, interpret: bool, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(query rows, keys) per tile. 16-bit: the whole window when it fits 64 (49 -> 64, one block), else 32 x 32
    blocks (144 -> 5 x 5, 90% real). fp32 ("ieee" dots are FMA code): 16 x 16 (one block up to 16). Chosen from
    the compiled code (benchmarks.kernel_resources; not yet measured on a GPU): 64 x 64 one-block tiles compile
    without spills in 16-bit (the backward with 8 warps, below) but spilled 12-3428 B per thread in fp32; 64-row
    blocks at N = 144 spilled 116-244 B in the bf16 backward; in fp32 32 x 32 backward blocks spilled 780-1280 B,
    the forward 8 B at 32 x 32 (sm_90, triton 3.6) and at 32 x 16 (sm_80, triton 3.8). Under the interpreter
    windows above 16 take 32 x 32 blocks, so N = 49 and 144 run the multi-block passes and N = 16 the one-block
    path."""
    one = max(_MIN_BLOCK_D, triton.next_power_of_2(N))
    if interpret:
        return (one, one) if N <= 16 else (32, 32)
    if dtype != torch.float32:
        return (one, one) if one <= 64 else (32, 32)
    return (one, one) if one <= 16 else (16, 16)


def windows_per_program(BW: int, heads: int, interpret: bool) -> int:
    """Windows per program: enough programs to fill a GPU (~2048: 16 per SM of an H100), at most 16 windows each.
    Swin-T at batch 128: 12 windows in stage 1 (8192 windows, 3 heads), 1 in stage 4 (128 windows, 24 heads).
    Under the interpreter 2, so a group and a partial last group are both exercised."""
    if interpret:
        return 2
    return max(1, min(16, BW * heads // 2048))


def _config(interpret: bool, backward: bool, block: int, arch: int) -> dict:
    if interpret:
        return dict(HOIST_BIAS=True) if backward else {}
    # Not measured on a GPU (none lent yet); from the compiled code (benchmarks.kernel_resources): the one-block
    # 64 x 64 backward with the shift mask spilled 52-60 B per thread with 4 warps (255 registers) on sm_90/sm_80;
    # with 8 warps still 8 B on sm_80 (one stage: no spill, but no cp.async either), unless the bias tile is
    # gathered per window instead of held (HOIST_BIAS False: 16 registers of 64 x 64 fp32 over 256 threads).
    if backward and block == 64:
        return dict(num_warps=8, num_stages=2, HOIST_BIAS=arch >= 90)
    return dict(num_warps=4, num_stages=2, **(dict(HOIST_BIAS=True) if backward else {}))


@fail_safe("window_attention_fwd")  # its fallback: ops/window_attention.py registers it
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, index: torch.Tensor,
         mask: torch.Tensor | None, head_dims: Sequence[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    BW, N, D = q.shape
    dims = tuple(int(w) for w in head_dims)
    heads = head_table(dims, q.device)
    H = heads.shape[1]
    o = _alloc((BW, N, D), q)
    lse = _alloc((BW, H, N), q, torch.float32)
    if BW * N * H == 0:
        return o, lse
    check_device(q, "window_attention", _INTERPRETED)
    vec = _alignment(dims, (q, k, v, o))
    block_m, block_n = block_size(N, _INTERPRETED, q.dtype)
    windows = windows_per_program(BW, H, _INTERPRETED)
    index = index.contiguous()
    mask_arg = mask.contiguous() if mask is not None else index
    grid = (triton.cdiv(N, block_m) * H * triton.cdiv(BW, windows),)
    wrap_triton(_window_attention_fwd_kernel)[grid](
        q, k, v, o, lse, table, index, mask_arg, heads,
        *_strides(q, vec), *_strides(k, vec), *_strides(v, vec), *_strides(o, vec),
        lse.stride(0), lse.stride(1), table.stride(0), table.stride(1),
        BW, N, H, mask.shape[0] if mask is not None else 1, windows, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=N <= block_n, HAS_MASK=mask is not None, VEC=vec,
        LOG2_DMAX=_log2_dmax(dims), DOT_PRECISION=_dot_precision(q), **_config(_INTERPRETED, False, block_m, 90))
    return o, lse


@fail_safe("window_attention_bwd")  # its fallback: ops/window_attention.py registers it
def _bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
         table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None, head_dims: Sequence[int], scale: float,
         out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, qkv_bias: bool = False
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(dq, dk, dv, dbias, dqkv_bias): the gradients (written into `out` when given: three (BW, N, D) tensors
    with one set of strides, the thirds of one dqkv), dbias (H_kept, N, N) fp32 the score gradient of each kept
    head summed over all windows (fixed order: per program in the kernel, then over programs here), and with
    qkv_bias the (3D,) fp32 column sums of dq | dk | dv (else None)."""
    BW, N, D = q.shape
    dims = tuple(int(w) for w in head_dims)
    heads = head_table(dims, q.device)
    H = heads.shape[1]
    dq, dk, dv = out if out is not None else tuple(_alloc((BW, N, D), q) for _ in range(3))
    if BW * N * H == 0:
        for buffer in (dq, dk, dv):
            buffer.zero_()
        return (dq, dk, dv, q.new_zeros((H, N, N), dtype=torch.float32),
                q.new_zeros((3 * D,), dtype=torch.float32) if qkv_bias else None)
    check_device(q, "window_attention", _INTERPRETED)
    lse = lse.contiguous()
    vec = _alignment(dims, (q, k, v, o, do, dq))
    block, _ = block_size(N, _INTERPRETED, q.dtype)  # square
    windows = windows_per_program(BW, H, _INTERPRETED)
    groups = triton.cdiv(BW, windows)
    one_block = N <= block
    # One (N, N) slab per program: written once (one block), or read-add-written per window (so zeroed).
    dbias = (torch.empty if one_block else torch.zeros)((groups, H, N, N), dtype=torch.float32, device=q.device)
    # Column sums per group; zero-width heads own no column, so every column is written.
    dqkv_bias = torch.zeros((groups, 3 * D), dtype=torch.float32, device=q.device) if qkv_bias else None
    index = index.contiguous()
    mask_arg = mask.contiguous() if mask is not None else index
    if len({t.stride() for t in (dq, dk, dv)}) != 1:
        raise ValueError("dq, dk and dv must share one set of strides")
    wrap_triton(_window_attention_bwd_kernel)[(groups * H,)](
        q, k, v, o, do, dq, dk, dv, lse, table, index, mask_arg, dbias,
        dqkv_bias if dqkv_bias is not None else dbias, heads,
        *_strides(q, vec), *_strides(k, vec), *_strides(v, vec), *_strides(o, vec), *_strides(do, vec),
        *_strides(dq, vec), lse.stride(0), lse.stride(1), table.stride(0), table.stride(1),
        dbias.stride(0), dbias.stride(1), dqkv_bias.stride(0) if dqkv_bias is not None else 0,
        BW, N, H, mask.shape[0] if mask is not None else 1, windows, D, scale,
        BLOCK=block, ONE_BLOCK=one_block, HAS_MASK=mask is not None, HAS_QKV_BIAS=qkv_bias, VEC=vec,
        LOG2_DMAX=_log2_dmax(dims), DOT_PRECISION=_dot_precision(q), **_config(_INTERPRETED, True, block, 90 if _INTERPRETED else arch(q.device)))
    # The second stage of both sums: over programs, one fixed-order reduction each (no atomics).
    return dq, dk, dv, dbias.sum(0), dqkv_bias.sum(0) if dqkv_bias is not None else None

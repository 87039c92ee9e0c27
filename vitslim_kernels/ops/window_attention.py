"""Window attention: Swin's attention with ragged heads, the relative-position bias and the shift mask
(docs/design.md section 8), every head of every window in one launch.

q, k, v: (BW, N, D), BW = B * nW windows of N tokens, D = sum(head_dims), head h in columns [offset_h,
offset_h + head_dims[h]). table: (R, len(head_dims)) the relative-position bias table, column h for head h; index:
(N, N) integer, the table row of each (query, key) pair; mask: None or (nW, N, N), window w adding mask[w % nW] (as
timm partitions a batch: window w of image b is row b * nW + w). Head h computes

    softmax(q_h k_h^T * scale + table[index, h] + mask[w % nW]) v_h

A zero-width head contributes nothing and its table column gets a zero gradient. The mask is a constant (it gets
no gradient), finite (timm's is 0 / -100).

In this file, in order: the argument checks; the references (the functional's, and what each op computes); the
deterministic table-gradient scatter; the torch.library ops with fake implementations and autograd
(vitslim::window_attention_fwd -> (o, lse), vitslim::window_attention_bwd -> (dq, dk, dv, dtable), and the packed
vitslim::window_qkv_attention -> (o, qkv, lse): the qkv projection and this attention as one op, its backward
vitslim::window_attention_qkv_bwd taking the qkv bias gradient from the kernel, as qkv_attention does for ViT); the
public functionals `window_attention` and `window_qkv_attention`; their implementations registered with dispatch;
`sample_inputs`. The ops launch triton/window_attention.py's kernels, and compute the reference on CPU tensors
without the interpreter, so they run (and torch.export traces them) anywhere.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import torch.nn.functional as F

from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import reference_on, register_fallback, tracing, triton_refusals
from ._library import define_op, formula_vjp, math_dtype, matmul_dtype, sample_tensors
from .qkv_attention import _project, check_qkv_attention_args, projection_backward
from .ragged_attention import _cat_heads, _split_qkv, check_ragged_args


def check_window_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int],
                      table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None) -> tuple[int, ...]:
    """Validate the arguments of window_attention; returns head_dims as a tuple of ints."""
    dims = check_ragged_args(q, k, v, head_dims)
    check_window_extras(q.shape[0], q.shape[1], len(dims), table, index, mask)
    return dims


def check_window_extras(BW: int, N: int, heads: int, table: torch.Tensor, index: torch.Tensor,
                        mask: torch.Tensor | None) -> None:
    """Validate what window attention takes beyond q, k, v: for BW windows of N tokens and `heads` heads, the table,
    the index and the mask. (The index's range is checked on CPU tensors only: elsewhere it is a device sync.)"""
    if table.dim() != 2 or table.shape[1] != heads or not table.is_floating_point():
        raise ValueError(f"window_attention: table must be a floating (rows, heads = {heads}) tensor, one column "
                         f"per head of head_dims, got {table.dtype} of shape {tuple(table.shape)}")
    if index.shape != (N, N) or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"window_attention: index must be an integer (N, N) = ({N}, {N}) tensor of table rows, "
                         f"got {index.dtype} of shape {tuple(index.shape)}")
    if mask is not None:
        if mask.dim() != 3 or mask.shape[1:] != (N, N) or not mask.is_floating_point():
            raise ValueError(f"window_attention: mask must be a floating (nW, N, N) tensor with N = {N}, got "
                             f"{mask.dtype} of shape {tuple(mask.shape)}")
        if mask.shape[0] == 0 or BW % mask.shape[0]:
            raise ValueError(f"window_attention: the number of windows {BW} must be a multiple of the mask's nW = "
                             f"{mask.shape[0]} (q is (B * nW, N, D))")
    if index.device.type == "cpu" and index.numel() and not torch.compiler.is_compiling():
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= table.shape[0]:
            raise ValueError(f"window_attention: index holds rows {low}..{high}, the table has {table.shape[0]}")


def _scores_add(table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None, BW: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bias (heads, N, N), mask (BW, N, N) or None) in `dtype`: what each head and each window add to the scores."""
    N = index.shape[0]
    bias = table.to(dtype)[index.reshape(-1).long()].view(N, N, -1).permute(2, 0, 1)
    per_window = mask.to(dtype).repeat(BW // mask.shape[0], 1, 1) if mask is not None else None  # row w: w % nW
    return bias, per_window


def _head_slices(head_dims: Sequence[int]) -> list[tuple[int, slice]]:
    """(head, its columns) of every head of non-zero width, in order."""
    out, offset = [], 0
    for h, w in enumerate(head_dims):
        if w > 0:
            out.append((h, slice(offset, offset + w)))
        offset += w
    return out


def window_attention_fwd_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                             index: torch.Tensor, mask: Optional[torch.Tensor], head_dims: Sequence[int], scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """What vitslim::window_attention_fwd returns, in plain PyTorch: (o (BW, N, D) like q, lse (BW, H_kept, N)
    float32: the natural logsumexp of each query row's scores, one row per head of non-zero width). Math in float32
    for fp16/bf16 inputs, else in the input dtype."""
    dtype = math_dtype(q)
    bias, per_window = _scores_add(table, index, mask, q.shape[0], dtype)
    outs, lses = [], []
    for h, cols in _head_slices(head_dims):
        qh, kh, vh = (t[..., cols].to(dtype) for t in (q, k, v))
        s = (qh @ kh.transpose(-2, -1)) * scale + bias[h]                                   # (BW, N, N)
        if per_window is not None:
            s = s + per_window
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.exp(s - lse.unsqueeze(-1)) @ vh)
        lses.append(lse.to(torch.float32))
    BW, N, _ = q.shape
    lse = torch.stack(lses, dim=1) if lses else q.new_zeros((BW, 0, N), dtype=torch.float32)
    return _cat_heads(outs, q), lse


def window_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float,
                         table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The specification: one explicit softmax attention per head with its bias and the window's mask, in plain
    PyTorch (float64-capable; autograd gives every gradient). Shapes as in window_attention."""
    dims = check_window_args(q, k, v, head_dims, table, index, mask)
    return window_attention_fwd_ref(q, k, v, table, index, mask, dims, scale)[0]


def _bwd_math(do, q, k, v, o, lse, table, index, mask, head_dims, scale):
    """(dq, dk, dv, dbias): the gradients of q, k, v and dbias (H_kept, N, N), the score gradient of each kept head
    summed over the windows, in the math dtype; explicit formulas (FlashAttention's) of all the inputs."""
    dtype = math_dtype(q)
    bias, per_window = _scores_add(table, index, mask, q.shape[0], dtype)
    dqs, dks, dvs, dbias = [], [], [], []
    for i, (h, cols) in enumerate(_head_slices(head_dims)):
        doh, qh, kh, vh, oh = (t[..., cols].to(dtype) for t in (do, q, k, v, o))
        s = (qh @ kh.transpose(-2, -1)) * scale + bias[h]
        if per_window is not None:
            s = s + per_window
        p = torch.exp(s - lse[:, i].to(dtype).unsqueeze(-1))
        ds = p * (doh @ vh.transpose(-2, -1) - (doh * oh).sum(-1, keepdim=True))
        dqs.append((ds @ kh) * scale)
        dks.append((ds.transpose(-2, -1) @ qh) * scale)
        dvs.append(p.transpose(-2, -1) @ doh)
        dbias.append(ds.sum(0))
    N = q.shape[1]
    dbias = torch.stack(dbias) if dbias else q.new_zeros((0, N, N), dtype=dtype)
    return _cat_heads(dqs, q), _cat_heads(dks, q), _cat_heads(dvs, q), dbias


def _kept_columns(head_dims: Sequence[int], device: torch.device) -> torch.Tensor:
    """The table columns of the heads of non-zero width, on `device`; cached (a host-to-device copy otherwise, per
    block and step), except while tracing (such a tensor must not enter the eager cache)."""
    dims = tuple(int(w) for w in head_dims)
    return _build_kept_columns(dims, device) if tracing() else _cached_kept_columns(dims, device)


def _build_kept_columns(head_dims: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([h for h, _ in _head_slices(head_dims)], dtype=torch.long, device=device)


_cached_kept_columns = functools.lru_cache(maxsize=256)(_build_kept_columns)


def table_grad(dbias: torch.Tensor, index: torch.Tensor, table: torch.Tensor, head_dims: Sequence[int]
               ) -> torch.Tensor:
    """The table's gradient from the kept heads' score gradients dbias (H_kept, N, N): row r of column h sums
    dbias[h] over the pairs with index r. Deterministic (no atomics): the pairs sorted by row (stable), their values
    summed in that order by a float64 prefix sum, each row's sum the difference at its ends (searchsorted). In
    table.dtype; columns of zero-width heads are 0."""
    rows, kept = table.shape[0], dbias.shape[0]
    flat = index.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    bounds = torch.searchsorted(flat.index_select(0, order),
                                torch.arange(rows + 1, device=flat.device, dtype=torch.long))
    prefix = F.pad(dbias.reshape(kept, -1).index_select(1, order).double().cumsum(1), (1, 0))
    per_row = prefix.index_select(1, bounds[1:]) - prefix.index_select(1, bounds[:-1])          # (H_kept, rows)
    dtable = torch.zeros((rows, table.shape[1]), dtype=torch.float64, device=table.device)
    dtable.index_copy_(1, _kept_columns(head_dims, table.device), per_row.t())
    return dtable.to(table.dtype)


def _table_scatter(dbias: torch.Tensor, index: torch.Tensor, table: torch.Tensor, head_dims: Sequence[int]
                   ) -> torch.Tensor:
    """table_grad as a differentiable formula (index_add): the double backward's."""
    rows, kept = table.shape[0], dbias.shape[0]
    flat = index.reshape(-1).long()
    per_row = dbias.new_zeros((rows, kept)).index_add(0, flat, dbias.reshape(kept, -1).t())
    dtable = dbias.new_zeros((rows, table.shape[1]))
    return dtable.index_copy(1, _kept_columns(head_dims, table.device), per_row).to(table.dtype)


def window_attention_bwd_ref(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
                             head_dims: Sequence[int], scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What vitslim::window_attention_bwd returns, as an explicit function of all its inputs: (dq, dk, dv like q,
    dtable like table). At o and lse of the forward it is the gradient; as a formula of them too it is what the
    kernel computes, so its derivatives are the op's (double backward)."""
    dq, dk, dv, dbias = _bwd_math(do, q, k, v, o, lse, table, index, mask, head_dims, scale)
    return dq, dk, dv, _table_scatter(dbias, index, table, head_dims)


def _bwd_reference(do, q, k, v, o, lse, table, index, mask, head_dims, scale, out=None, qkv_bias=False):
    """What the backward launcher computes, in plain PyTorch: (dq, dk, dv, dbias (H_kept, N, N) fp32, the (3D,)
    column sums of dq | dk | dv or None), the gradients written into `out` when given."""
    dq, dk, dv, dbias = _bwd_math(do, q, k, v, o, lse, table, index, mask, head_dims, scale)
    sums = torch.cat([g.sum((0, 1), dtype=torch.float32) for g in (dq, dk, dv)]) if qkv_bias else None
    if out is not None:
        for buffer, g in zip(out, (dq, dk, dv)):
            buffer.copy_(g)
        dq, dk, dv = out
    return dq, dk, dv, dbias.to(torch.float32), sums


# ---------------------------------------------------------------------------------------------------------
# The torch.library ops and their autograd
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from ..triton import window_attention as kernels  # optional: needs triton; imported when a kernel first runs
    return kernels


def _fwd(q, k, v, table, index, mask, head_dims, scale):
    if reference_on(q):
        return window_attention_fwd_ref(q, k, v, table, index, mask, head_dims, scale)
    return _kernels()._fwd(q, k, v, table, index, mask, head_dims, scale)


def _bwd(do, q, k, v, o, lse, table, index, mask, head_dims, scale, out=None, qkv_bias=False):
    if reference_on(q):
        return _bwd_reference(do, q, k, v, o, lse, table, index, mask, head_dims, scale, out, qkv_bias)
    return _kernels()._bwd(do, q, k, v, o, lse, table, index, mask, head_dims, scale, out=out, qkv_bias=qkv_bias)


def _window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                          index: torch.Tensor, mask: Optional[torch.Tensor], head_dims: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (BW, N, D) like q, lse (BW, H_kept, N) float32)."""
    return _fwd(q, k, v, table, index, mask, head_dims, scale)


def _window_attention_fwd_fake(q, k, v, table, index, mask, head_dims, scale):
    BW, N, D = q.shape
    H = sum(1 for w in head_dims if w > 0)
    return q.new_empty((BW, N, D)), q.new_empty((BW, H, N), dtype=torch.float32)


def _window_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
                          head_dims: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv like q, dtable like table)."""
    dq, dk, dv, dbias, _ = _bwd(do, q, k, v, o, lse, table, index, mask, head_dims, scale)
    return dq, dk, dv, table_grad(dbias, index, table, head_dims)


def _window_attention_bwd_fake(do, q, k, v, o, lse, table, index, mask, head_dims, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), table.new_empty(table.shape)


window_attention_fwd = define_op("vitslim::window_attention_fwd", _window_attention_fwd, _window_attention_fwd_fake)
window_attention_bwd = define_op("vitslim::window_attention_bwd", _window_attention_bwd, _window_attention_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, table, index, mask, head_dims, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, table, index, mask)
    ctx.head_dims, ctx.scale = list(head_dims), scale
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, do, dlse):
    q, k, v, o, lse, table, index, mask = ctx.saved_tensors
    if do is None and dlse is None:
        return (None,) * 8
    dq, dk, dv, dtable = torch.ops.vitslim.window_attention_bwd(do if do is not None else torch.zeros_like(o), q, k,
                                                                v, o, lse, table, index, mask, ctx.head_dims,
                                                                ctx.scale)
    if dlse is not None:  # only a double backward or a direct caller of the op gives lse a gradient
        extra = formula_vjp(window_attention_fwd_ref, (q, k, v, table, index, mask, ctx.head_dims, ctx.scale),
                            (None, dlse), ctx.needs_input_grad)
        dq, dk, dv, dtable = (a + b if b is not None else a for a, b in zip((dq, dk, dv, dtable), extra[:4]))
    return dq, dk, dv, dtable, None, None, None, None


def _bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9])
    ctx.head_dims, ctx.scale = list(inputs[9]), inputs[10]
    ctx.set_materialize_grads(False)


def _bwd_backward(ctx, ddq, ddk, ddv, ddtable):
    args = (*ctx.saved_tensors, ctx.head_dims, ctx.scale)
    return formula_vjp(window_attention_bwd_ref, args, (ddq, ddk, ddv, ddtable), ctx.needs_input_grad)


window_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
window_attention_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup_context)


# The packed ops: the qkv projection and the window attention as one op (see qkv_attention.py for why: the qkv bias
# gradient is summed by the attention kernel as it writes dqkv, and dqkv is one buffer the projection reads).

def window_attention_qkv_bwd_ref(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                 table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
                                 head_dims: Sequence[int], scale: float, bias_grad: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The packed backward in plain PyTorch: (dqkv like qkv, dtable like table, the (3D,) column sums of dqkv with
    bias_grad, else an empty (0,) tensor), in the math dtype."""
    dq, dk, dv, dtable = window_attention_bwd_ref(do, *_split_qkv(qkv), o, lse, table, index, mask, head_dims, scale)
    dqkv = torch.cat((dq, dk, dv), dim=-1)
    sum_dtype = math_dtype(dqkv)
    sums = dqkv.sum((0, 1), dtype=sum_dtype) if bias_grad else dqkv.new_empty((0,), dtype=sum_dtype)
    return dqkv, dtable, sums


def _window_attention_qkv_bwd(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                              table: torch.Tensor, index: torch.Tensor, mask: Optional[torch.Tensor],
                              head_dims: list[int], scale: float, bias_grad: bool
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dqkv (BW, N, 3D) like qkv, dtable like table, dbias): with bias_grad the (3D,) fp32 column sums of dqkv,
    summed by the kernel; otherwise an empty (0,) tensor."""
    dqkv = (torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device) if reference_on(qkv)
            else _kernels()._alloc(qkv.shape, qkv))
    *_, dbias, sums = _bwd(do, *_split_qkv(qkv), o, lse, table, index, mask, head_dims, scale,
                           out=_split_qkv(dqkv), qkv_bias=bias_grad)
    return (dqkv, table_grad(dbias, index, table, head_dims),
            sums if bias_grad else qkv.new_empty((0,), dtype=torch.float32))


def _window_attention_qkv_bwd_fake(do, qkv, o, lse, table, index, mask, head_dims, scale, bias_grad):
    return (qkv.new_empty(qkv.shape), table.new_empty(table.shape),
            qkv.new_empty((qkv.shape[2] if bias_grad else 0,), dtype=torch.float32))


def _window_qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          gate: Optional[torch.Tensor], table: torch.Tensor, index: torch.Tensor,
                          mask: Optional[torch.Tensor], head_dims: list[int], scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o (BW, N, D), qkv (BW, N, 3D) contiguous, lse (BW, H_kept, N) fp32), in x's dtype: one cuBLAS addmm with the
    folded gate, then the window attention kernel on the thirds of qkv."""
    BW, N, C = x.shape
    wf, bf = _project(x, weight, bias, gate)
    x2 = x.reshape(BW * N, C)
    qkv = (torch.addmm(bf, x2, wf.t()) if bf is not None else torch.mm(x2, wf.t())).view(BW, N, weight.shape[0])
    o, lse = _fwd(*_split_qkv(qkv), table, index, mask, head_dims, scale)
    return o, qkv, lse


def _window_qkv_attention_fake(x, weight, bias, gate, table, index, mask, head_dims, scale):
    BW, N, _ = x.shape
    H = sum(1 for w in head_dims if w > 0)
    return (x.new_empty((BW, N, weight.shape[0] // 3)), x.new_empty((BW, N, weight.shape[0])),
            x.new_empty((BW, H, N), dtype=torch.float32))


def _qkv_fwd_ref(qkv, table, index, mask, head_dims, scale):
    return window_attention_fwd_ref(*_split_qkv(qkv), table, index, mask, head_dims, scale)


window_attention_qkv_bwd = define_op("vitslim::window_attention_qkv_bwd", _window_attention_qkv_bwd,
                                     _window_attention_qkv_bwd_fake)
window_qkv_attention_op = define_op("vitslim::window_qkv_attention", _window_qkv_attention,
                                    _window_qkv_attention_fake)


def _qkv_bwd_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.head_dims, ctx.scale, ctx.bias_grad = list(inputs[7]), inputs[8], inputs[9]
    ctx.set_materialize_grads(False)


def _qkv_bwd_backward(ctx, ddqkv, ddtable, ddbias):
    args = (*ctx.saved_tensors, ctx.head_dims, ctx.scale, ctx.bias_grad)
    return formula_vjp(window_attention_qkv_bwd_ref, args, (ddqkv, ddtable, ddbias), ctx.needs_input_grad)


window_attention_qkv_bwd.register_autograd(_qkv_bwd_backward, setup_context=_qkv_bwd_setup_context)


def _setup_context(ctx, inputs, output):
    x, weight, bias, gate, table, index, mask, head_dims, scale = inputs
    o, qkv, lse = output
    ctx.save_for_backward(x, weight, bias, gate, table, index, mask, qkv, o, lse)
    ctx.head_dims, ctx.scale = list(head_dims), scale
    ctx.set_materialize_grads(False)


def _backward(ctx, do, dqkv_out, dlse):
    x, weight, bias, gate, table, index, mask, qkv, o, lse = ctx.saved_tensors
    if do is None and dqkv_out is None and dlse is None:
        return (None,) * 9
    sums_in_kernel = bias is not None and dqkv_out is None and dlse is None  # else dqkv changes below
    dqkv, dtable, dbf = torch.ops.vitslim.window_attention_qkv_bwd(
        do if do is not None else torch.zeros_like(o), qkv, o, lse, table, index, mask, ctx.head_dims, ctx.scale,
        sums_in_kernel)
    if dlse is not None:  # only a double backward or a direct caller gives lse a gradient
        dqkv2, dtable2, *_ = formula_vjp(_qkv_fwd_ref, (qkv, table, index, mask, ctx.head_dims, ctx.scale),
                                         (None, dlse), (True, True, False, False, False, False))
        dqkv, dtable = dqkv + dqkv2, dtable + dtable2
    if dqkv_out is not None:
        dqkv = dqkv + dqkv_out
    if bias is not None and not sums_in_kernel:
        dbf = dqkv.sum((0, 1), dtype=torch.float32)
    dx, dw, db, dg = projection_backward(ctx.needs_input_grad[:4], x, weight, bias, gate, dqkv, dbf)
    return dx, dw, db, dg, dtable if ctx.needs_input_grad[4] else None, None, None, None, None


window_qkv_attention_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------
# The public functionals and their implementations
# ---------------------------------------------------------------------------------------------------------

def window_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float,
                            table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """The op vitslim::window_attention_fwd (Triton kernels). Shapes as in window_attention."""
    dims = check_window_args(q, k, v, head_dims, table, index, mask)
    o, _ = torch.ops.vitslim.window_attention_fwd(q, k, v, table, index, mask, list(dims), float(scale))
    return o


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dims: Sequence[int], scale: float,
                     table: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None = None, *,
                     implementation: str | None = None) -> torch.Tensor:
    """Swin window attention with ragged heads, its relative-position bias and shift mask, all heads of all windows
    in one call.

    Args:
        q, k, v: (BW, N, sum(head_dims)), BW = B * nW windows of N tokens, heads packed in order.
        head_dims: width of each head; 0 is allowed.
        scale: softmax scale (the original head width's ** -0.5).
        table: (R, len(head_dims)) relative-position bias table, column h for head h.
        index: (N, N) integer: the table row added to the score of each (query, key) pair.
        mask: None or (nW, N, N) float, added to window w's scores as mask[w % nW] (timm's shift mask; no gradient).
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (BW, N, sum(head_dims)).
    Gradients: q, k, v, table.
    """
    impl = select("window_attention", q, k, v, head_dims, scale, table, index, mask, forced=implementation)
    return impl(q, k, v, head_dims, scale, table, index, mask)


def window_qkv_attention_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                gate: torch.Tensor | None, head_dims: Sequence[int], scale: float, table: torch.Tensor,
                                index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The op vitslim::window_qkv_attention (Triton fold + cuBLAS qkv + Triton window attention). Shapes as in
    window_qkv_attention."""
    dims = check_qkv_attention_args(x, weight, bias, gate, head_dims)
    check_window_extras(x.shape[0], x.shape[1], len(dims), table, index, mask)
    dtype = matmul_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the matmul runs in `dtype` explicitly
        o, _, _ = torch.ops.vitslim.window_qkv_attention(x.to(dtype), weight, bias,
                                                         gate.reshape(-1) if gate is not None else None, table,
                                                         index, mask, dims, float(scale))
    return o


def window_qkv_attention_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             gate: torch.Tensor | None, head_dims: Sequence[int], scale: float, table: torch.Tensor,
                             index: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The specification, in plain PyTorch (float64-capable). Shapes as in window_qkv_attention."""
    dims = check_qkv_attention_args(x, weight, bias, gate, head_dims)
    if gate is not None:
        rows = gate.reshape(-1).repeat(3 * sum(dims) // gate.numel())
        qkv = F.linear(x, weight * rows.unsqueeze(1), bias * rows if bias is not None else None)
    else:
        qkv = F.linear(x, weight, bias)
    return window_attention_ref(*_split_qkv(qkv), dims, scale, table, index, mask)


def window_qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor | None,
                         head_dims: Sequence[int], scale: float, table: torch.Tensor, index: torch.Tensor,
                         mask: torch.Tensor | None = None, *, implementation: str | None = None) -> torch.Tensor:
    """window_attention(split(x @ W'^T + b')): a Swin block's qkv projection and its window attention as one op.

    Args:
        x: (BW, N, C), the windows of a block's normalised input.
        weight: (3D, C) with D = sum(head_dims), rows q | k | v, heads packed in order; bias: (3D,) or None.
        gate: (R,) or None: W' = g*W and b' = g*b, row r scaled by gate[r % R] (the search's attention gate per head
            dim); None: a slim model's projection.
        head_dims, scale, table, index, mask: as in window_attention.
        implementation: force one implementation by name; default: dispatch.
    Returns:
        o (BW, N, D). Under autocast the matmul and the attention run in the autocast dtype.
    Gradients: x, weight, bias, gate, table.
    """
    impl = select("window_qkv_attention", x, weight, bias, gate, head_dims, scale, table, index, mask,
                  forced=implementation)
    return impl(x, weight, bias, gate, head_dims, scale, table, index, mask)


def window_attention_fwd_op() -> torch._ops.OpOverload:
    """torch.ops.vitslim.window_attention_fwd.default, the op an exported fused slim Swin holds."""
    return torch.ops.vitslim.window_attention_fwd.default


register("window_attention", "triton", lambda: window_attention_triton, triton_refusals)
register("window_attention", "reference", lambda: window_attention_ref, no_refusals)
register("window_qkv_attention", "triton", lambda: window_qkv_attention_triton, triton_refusals)
register("window_qkv_attention", "reference", lambda: window_qkv_attention_ref, no_refusals)
register_fallback("window_attention_fwd", window_attention_fwd_ref)
register_fallback("window_attention_bwd", _bwd_reference)


def _sample(window: int, head_dims: Sequence[int], batch: int, n_windows: int, shifted: bool, *, device, dtype,
            requires_grad: bool, seed: int = 0) -> tuple:
    """(q, k, v, head_dims, scale, table, index, mask) of a Swin-like block: q, k, v views of one packed qkv, the
    table drawn like a trained one (std 0.5), timm's relative-position index, and for a shifted block a 0 / -100
    mask on half of each window's pairs."""
    N, D, H = window * window, sum(head_dims), len(head_dims)
    R = (2 * window - 1) ** 2
    qkv, table = sample_tensors((batch * n_windows, N, 3 * D), (R, H), device=device, dtype=dtype, seed=seed)
    table = (0.5 * table).to(torch.float32 if dtype != torch.float64 else dtype).detach()
    qkv = qkv.detach().requires_grad_(requires_grad)
    table.requires_grad_(requires_grad)
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
    index = (rel[..., 0] * (2 * window - 1) + rel[..., 1]).to(device)
    mask = None
    if shifted:
        g = torch.Generator().manual_seed(seed + 1)
        regions = torch.randint(0, 3, (n_windows, N), generator=g)
        mask = torch.where(regions[:, :, None] == regions[:, None, :], 0.0, -100.0).to(device=device,
                                                                                       dtype=table.dtype)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    return q, k, v, tuple(head_dims), 32 ** -0.5, table, index, mask


SAMPLE_HEAD_DIMS = (17, 0, 32, 1)  # odd widths, a pruned head, Swin's full width


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of window_attention: window 7 (N = 49), heads 17, 0, 32 and 1 wide, 2 images of 2
    windows, shifted (a mask) and unshifted."""
    return [(_sample(7, SAMPLE_HEAD_DIMS, 2, 2, shifted, device=device, dtype=dtype, requires_grad=requires_grad), {})
            for shifted in (False, True)]


def qkv_sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      requires_grad: bool = False) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of window_qkv_attention: C = 24, window 4, 3 windows; the search (2 heads of 8, gated,
    a bias, shifted) and a slim block (heads 5, 0, 8, no gate, no bias)."""
    x, weight, bias, gate = sample_tensors((3, 16, 24), (48, 24), (48,), (16,), device=device, dtype=dtype, scale=0.5)
    gate = (1 + gate).detach()  # gates around 1, as a search's
    (slim_weight,) = sample_tensors((39, 24), device=device, dtype=dtype, seed=2, scale=0.5)
    for t in (x, weight, bias, gate, slim_weight):
        t.requires_grad_(requires_grad)
    *_, table, index, mask = _sample(4, (8, 8), 1, 3, True, device=device, dtype=dtype, requires_grad=requires_grad)
    *_, slim_table, _, _ = _sample(4, (5, 0, 8), 1, 3, False, device=device, dtype=dtype, seed=3,
                                   requires_grad=requires_grad)
    return [((x, weight, bias, gate, (8, 8), 8 ** -0.5, table, index, mask), {}),
            ((x, slim_weight, None, None, (5, 0, 8), 8 ** -0.5, slim_table, index, None), {})]


def library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck: window 4 (N = 16), heads 5,
    0 and 8 wide, 2 images of 2 windows, with and without a shift mask, fp32 and fp16."""
    def forward(shifted: bool, dtype: torch.dtype = torch.float32) -> tuple:
        q, k, v, dims, scale, table, index, mask = _sample(4, (5, 0, 8), 2, 2, shifted, device="cpu", dtype=dtype,
                                                           requires_grad=False)
        return q, k, v, table, index, mask, list(dims), scale

    def backward(shifted: bool, dtype: torch.dtype = torch.float32) -> tuple:
        q, k, v, table, index, mask, dims, scale = forward(shifted, dtype)
        o, lse = torch.ops.vitslim.window_attention_fwd(q, k, v, table, index, mask, dims, scale)
        (grad,) = sample_tensors(tuple(o.shape), device="cpu", dtype=dtype, seed=5)
        return grad, q, k, v, o, lse, table, index, mask, dims, scale

    def packed_backward(bias_grad: bool) -> tuple:
        q, k, v, table, index, mask, dims, scale = forward(True)
        qkv = q._base if q._base is not None else torch.cat((q, k, v), -1)
        o, lse = torch.ops.vitslim.window_attention_fwd(*_split_qkv(qkv), table, index, mask, dims, scale)
        (grad,) = sample_tensors(tuple(o.shape), device="cpu", dtype=torch.float32, seed=5)
        return grad, qkv, o, lse, table, index, mask, dims, scale, bias_grad

    def packed(gated: bool) -> tuple:
        x, weight, bias, gate = sample_tensors((4, 16, 24), (39, 24), (39,), (13,), device="cpu", dtype=torch.float32,
                                               scale=0.5)
        *_, table, index, mask = _sample(4, (5, 0, 8), 2, 2, True, device="cpu", dtype=torch.float32,
                                         requires_grad=False)
        return (x, weight, bias, 1 + 0.5 * gate if gated else None, table, index, mask, [5, 0, 8], 8 ** -0.5)

    return [("fp32", "window_attention_fwd", lambda: forward(False)),
            ("fp32 shifted", "window_attention_fwd", lambda: forward(True)),
            ("fp32", "window_attention_bwd", lambda: backward(False)),
            ("fp16 shifted", "window_attention_bwd", lambda: backward(True, torch.float16)),
            ("fp32", "window_attention_qkv_bwd", lambda: packed_backward(False)),
            ("fp32 bias grad", "window_attention_qkv_bwd", lambda: packed_backward(True)),
            ("fp32 gated", "window_qkv_attention", lambda: packed(True)),
            ("fp32 no gate", "window_qkv_attention", lambda: packed(False))]


describe_op(OpInfo("window_attention", window_attention, window_attention_ref, sample_inputs,
                   library_ops=("window_attention_fwd", "window_attention_bwd", "window_attention_qkv_bwd",
                                "window_qkv_attention"),
                   kernels=("window_attention_fwd", "window_attention_bwd"),
                   kernel_modules=("vitslim_kernels.triton.window_attention",),
                   library_samples=library_samples, uses_dot=True))
describe_op(OpInfo("window_qkv_attention", window_qkv_attention, window_qkv_attention_ref, qkv_sample_inputs,
                   kernels=("gated_linear_fold", "gated_linear_fold_bwd", "window_attention_fwd",
                            "window_attention_bwd"),
                   kernel_modules=("vitslim_kernels.triton.gated_linear", "vitslim_kernels.triton.window_attention"),
                   uses_dot=True))

"""ONNX translations of the vitslim custom ops, for `torch.onnx.export(..., dynamo=True)`.

    torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=vitslim_kernels.onnx.translation_table())

The inference ops have one: `vitslim::ragged_attention_fwd` becomes per-head attention in standard ONNX
ops (opset 18: Slice, MatMul, Mul, Softmax, ReduceLogSumExp, Concat), so any ONNX runtime runs the model;
zero-width heads produce no node. `vitslim::window_attention_fwd` (a slim Swin) likewise, with each head's
relative-position bias gathered from its table column (Gather) and the shift mask added per window (Reshape to
(B, nW, N, N), Add). onnxscript (which torch's exporter needs too) is imported when a table is
asked for, not when this module is imported.
"""
from __future__ import annotations

from collections.abc import Callable

from .ops.ragged_attention import ragged_attention_fwd_op
from .ops.window_attention import window_attention_fwd_op


def _onnxscript():
    try:
        import onnxscript  # optional (vitslim[export]): imported when a table is asked for
        from onnxscript import ir  # (optional, as above)
        from onnxscript.onnx_opset import opset18  # (optional, as above)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript (pip install onnx onnxscript): {e}") from None
    return onnxscript, ir, opset18


def _ragged_attention_fwd(q, k, v, head_dims: list[int], scale: float):
    """ONNX graph of vitslim::ragged_attention_fwd: (o (B, N, D) like q, lse (B, H_kept, N) float32).

    Traced by torch's exporter: q, k, v are graph values, head_dims and scale plain Python values. Scores,
    softmax and lse are computed in float32 for float16/bfloat16 inputs, in the input dtype otherwise (as the
    reference, vitslim_kernels.ragged_attention_ref, does).
    """
    return _attention_per_head(q, k, v, head_dims, scale, None)


def _window_attention_fwd(q, k, v, table, index, mask, head_dims: list[int], scale: float):
    """ONNX graph of vitslim::window_attention_fwd: as _ragged_attention_fwd, each head's scores plus its bias,
    table[index, h] (one Gather of all heads' columns, then the head's), and in a shifted block plus the window's
    mask (the scores reshaped to (B, nW, N, N), the (nW, N, N) mask added by broadcasting)."""
    _, ir, op = _onnxscript()
    half = q.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    bias = op.Transpose(op.Gather(table, index, axis=0), perm=[2, 0, 1])                   # (heads, N, N)
    bias = op.Cast(bias, to=ir.DataType.FLOAT) if half else op.CastLike(bias, q)

    def add(scores, h):
        scores = op.Add(scores, op.Gather(bias, op.Constant(value_int=h), axis=0))
        if mask is None:
            return scores
        windows = op.Concat(op.Constant(value_ints=[-1]), op.Shape(mask), axis=0)        # (-1, nW, N, N)
        shifted = op.Add(op.Reshape(scores, windows), op.CastLike(mask, scores))
        return op.Reshape(shifted, op.Shape(scores))

    return _attention_per_head(q, k, v, head_dims, scale, add)


def _attention_per_head(q, k, v, head_dims: list[int], scale: float, add):
    """(o, lse) of per-head attention; add(scores, h), if given, returns head h's scores with what it adds."""
    _, ir, op = _onnxscript()
    half = q.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    outputs, lses, offset = [], [], 0
    for h, w in enumerate(head_dims):
        if w > 0:
            start, end, axis = (op.Constant(value_ints=[c]) for c in (offset, offset + w, -1))
            qh, kh, vh = (op.Slice(t, start, end, axis) for t in (q, k, v))              # (B, N, w)
            scores = op.MatMul(qh, op.Transpose(kh, perm=[0, 2, 1]))                      # (B, N, N)
            scores = op.Cast(scores, to=ir.DataType.FLOAT) if half else scores
            scores = op.Mul(scores, op.CastLike(op.Constant(value_float=float(scale)), scores))
            if add is not None:
                scores = add(scores, h)
            probs = op.CastLike(op.Softmax(scores, axis=-1), q)
            outputs.append(op.MatMul(probs, vh))                                          # (B, N, w)
            lse = op.ReduceLogSumExp(scores, op.Constant(value_ints=[-1]), keepdims=1)    # (B, N, 1)
            lses.append(op.Cast(op.Transpose(lse, perm=[0, 2, 1]), to=ir.DataType.FLOAT))  # (B, 1, N)
        offset += w
    if not outputs:  # every head pruned: o is q's empty (B, N, 0), lse an empty (B, 0, N)
        return op.Identity(q), op.Cast(op.Transpose(q, perm=[0, 2, 1]), to=ir.DataType.FLOAT)
    o = outputs[0] if len(outputs) == 1 else op.Concat(*outputs, axis=-1)
    lse = lses[0] if len(lses) == 1 else op.Concat(*lses, axis=1)
    return o, lse


def translation_table() -> dict[Callable, Callable]:
    """The `custom_translation_table` of torch.onnx.export(dynamo=True) for the vitslim ops."""
    _onnxscript()  # the clear error, here, rather than deep inside the exporter
    try:
        return {ragged_attention_fwd_op(): _ragged_attention_fwd, window_attention_fwd_op(): _window_attention_fwd}
    except ImportError:  # then no graph can hold the op: plain models export without it
        return {}

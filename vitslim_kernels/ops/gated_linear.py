"""Gated linear maps of the search model (docs/design.md section 2): the qkv projection with the attention gate and
fc1 with bias, GELU and the MLP gate.

gated_linear:       y = (x @ W^T + b) * gate[r % R] on output column r   (the qkv projection, R = H*d, the
                    same gate on the q, k and v rows)
gated_gelu_linear:  h = GELU(x @ W^T + b) * gate                            (fc1 of the MLP)

The important algebra (docs/design.md section 5): a gate on an output row of a linear map is a scaling of that
row of the weight and bias, so y = x @ (g*W)^T + g*b exactly, and with W' = g*W, b' = g*b:
dW = g * dW', db = g * db', dg[r] = sum_c dW'[r, c] * W[r, c] + db'[r] * b[r]: O(C^2) work, no activation pass.
The MLP gate sits after the GELU, so it cannot be folded into fc1; its gradient is a column sum of
dh * GELU(pre) over all rows.

In this file, in order: the argument checks; the references; the torch.library ops with their fake
implementations and autograd (vitslim::gated_linear and vitslim::gated_gelu_linear, each one op over the whole
layer, and the fold and epilogue ops their backwards call); the public functionals; their implementations
registered with dispatch; `sample_inputs`. The ops launch the Triton epilogues of triton/gated_linear.py and
compute the reference math on CPU tensors without the interpreter.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional  # custom_op schemas are inferred from typing.Optional on every torch we support

import torch
import torch.nn.functional as F

from ..dispatch import OpInfo, describe_op, no_refusals, register, select
from ..runtime import compile_only_target, reference_on, register_fallback, triton_refusals
from ._library import define_op, formula_vjp, math_dtype, matmul_dtype, sample_tensors

GELU_APPROXIMATIONS = ("none", "tanh")


def check_gated_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            gate: torch.Tensor) -> int:
    """Validate the arguments of gated_linear; returns the number of gate repeats (3 for qkv)."""
    if x.dim() < 1 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (..., K) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, {x.shape[-1]}), got {tuple(weight.shape)}")
    out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    if gate.dim() != 1 or gate.numel() == 0 or out_features % gate.numel() != 0:
        raise ValueError(f"gate must be 1-D with a length dividing out_features = {out_features}, got shape "
                         f"{tuple(gate.shape)}")
    return out_features // gate.numel()


def check_gated_gelu_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 gate: torch.Tensor, approximate: str) -> None:
    """Validate the arguments of gated_gelu_linear."""
    check_gated_linear_args(x, weight, bias, gate)
    if gate.shape != (weight.shape[0],):
        raise ValueError(f"gate must be ({weight.shape[0]},), one per hidden unit, got {tuple(gate.shape)}")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")


def gated_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                     ) -> torch.Tensor:
    """The specification: the gate multiplies the activations after the bias. Shapes as in gated_linear."""
    repeats = check_gated_linear_args(x, weight, bias, gate)
    y = F.linear(x, weight, bias)
    return y * gate.repeat(repeats).to(y.dtype)


def gated_gelu_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                          approximate: str = "none") -> torch.Tensor:
    """The specification: GELU(x @ W^T + b) * gate. Shapes as in gated_gelu_linear."""
    check_gated_gelu_linear_args(x, weight, bias, gate, approximate)
    h = F.gelu(F.linear(x, weight, bias), approximate=approximate)
    return h * gate.to(h.dtype)


def gated_linear_fold_bwd_ref(dweight_folded: torch.Tensor, dbias_folded: torch.Tensor | None,
                              weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::gated_linear_fold_bwd returns, in plain PyTorch: (dW like weight, db like bias or
    (0,) without one, dgate like gate) from the gradients dW' (O, K) and db' (O,) of W' = g*W and b' = g*b.

    dW = g * dW', db = g * db', dg[j] = sum over rows r = j mod R of (sum_c dW'[r, c] * W[r, c] + db'[r] * b[r]).
    """
    O, R = weight.shape[0], gate.numel()
    dtype = math_dtype(weight)
    g = gate.reshape(-1).to(dtype).repeat(O // R)                                       # (O,)
    dwf = dweight_folded.to(dtype)
    per_row = (dwf * weight.to(dtype)).sum(1)                                           # (O,)
    if bias is not None:
        dbf = dbias_folded.to(dtype)
        db = (dbf * g).to(bias.dtype)
        per_row = per_row + dbf * bias.to(dtype)
    else:
        db = weight.new_empty((0,))
    dg = per_row.view(O // R, R).sum(0).to(gate.dtype).view(gate.shape)
    return (dwf * g[:, None]).to(weight.dtype), db, dg


def _gelu_and_grad(a: torch.Tensor, approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(a), GELU'(a)), written out (differentiable again), exact erf form or the tanh approximation."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = torch.tanh(k * (a + 0.044715 * a * a * a))
        return 0.5 * a * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * a * a)
    cdf = 0.5 * (1.0 + torch.erf(a * (1.0 / math.sqrt(2.0))))
    return a * cdf, cdf + a * torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))


def gated_gelu_bwd_ref(dh: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                       approximate: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the op vitslim::gated_gelu_bwd returns, in plain PyTorch: (dpre (T, M) like pre, dbias (M,) like
    bias or (0,) without one, dgate (M,) like gate) for h = GELU(pre + bias) * gate and its gradient dh.

    dpre = dh * gate * GELU'(pre + bias), dbias = sum_rows dpre (before rounding to pre's dtype),
    dgate = sum_rows dh * GELU(pre + bias).
    """
    dtype = math_dtype(pre)
    a = pre.to(dtype) + bias.to(dtype) if bias is not None else pre.to(dtype)
    gelu, dgelu = _gelu_and_grad(a, approximate)
    dh = dh.to(dtype)
    da = dh * gate.to(dtype) * dgelu
    db = da.sum(0).to(bias.dtype) if bias is not None else pre.new_empty((0,))
    return da.to(pre.dtype), db, (dh * gelu).sum(0).to(gate.dtype)


def _fold_reference(weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """What _fold computes, in plain PyTorch: (g*W, g*b or (0,)) in `dtype`, row r scaled by gate[r % R]."""
    O = weight.shape[0]
    compute = math_dtype(weight)
    g = gate.reshape(-1).to(compute).repeat(O // gate.numel())
    wf = (weight.to(compute) * g[:, None]).to(dtype).contiguous()
    bf = (bias.to(compute) * g).to(dtype) if bias is not None else weight.new_empty((0,), dtype=dtype)
    return wf, bf


def _gelu_fwd_reference(pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str
                        ) -> torch.Tensor:
    """What _gelu_fwd computes, in plain PyTorch: GELU(pre + bias) * gate in fp32, rounded to pre's dtype."""
    compute = math_dtype(pre)
    a = pre.to(compute) + bias.to(compute) if bias is not None else pre.to(compute)
    return (torch.nn.functional.gelu(a, approximate=approximate) * gate.to(compute)).to(pre.dtype)


# ---------------------------------------------------------------------------------------------------------
# The torch.library ops (triton_op or custom_op: see ops/_library.py) and their autograd
#
# The public functions are gated_linear and gated_gelu_linear, each one op over the whole layer (Triton +
# cuBLAS). Not the fold (or epilogue) op plus an aten matmul with autograd in between: the folded weight's
# gradient dW' = dy^T @ x would then reach the fold's backward rounded to the half-precision matmul dtype, and
# dgate sums C of its products (module docstring). The fold and epilogue ops keep their own autograd too.
# An absent bias comes back as an empty tensor (a custom op returns tensors, not None).
# ---------------------------------------------------------------------------------------------------------

def _kernels():
    from ..triton import gated_linear as kernels  # optional: needs triton; imported when a kernel first runs
    return kernels


def _fold(weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, dtype: torch.dtype
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(g*W, g*b or (0,)) in `dtype`: the Triton fold, or the reference on CPU tensors without the interpreter."""
    if reference_on(weight):
        return _fold_reference(weight, bias, gate, dtype)
    return _kernels()._fold(weight, bias, gate, dtype)


def _fold_bwd(dwf: torch.Tensor, dbf: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
              gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reference_on(weight):
        return gated_linear_fold_bwd_ref(dwf, dbf, weight, bias, gate)
    return _kernels()._fold_bwd(dwf, dbf, weight, bias, gate)


def _gelu_fwd(pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str) -> torch.Tensor:
    if reference_on(pre):
        return _gelu_fwd_reference(pre, bias, gate, approximate)
    return _kernels()._gelu_fwd(pre, bias, gate, approximate)


def _gelu_bwd(dh: torch.Tensor, pre: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, approximate: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if reference_on(pre):
        return gated_gelu_bwd_ref(dh, pre, bias, gate, approximate)
    return _kernels()._gelu_bwd(dh, pre, bias, gate, approximate)


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


gated_linear_fold = define_op("vitslim::gated_linear_fold", _gated_linear_fold, _gated_linear_fold_fake)
gated_linear_fold_bwd = define_op("vitslim::gated_linear_fold_bwd", _gated_linear_fold_bwd,
                                  _gated_linear_fold_bwd_fake)
gated_gelu_fwd = define_op("vitslim::gated_gelu_fwd", _gated_gelu_fwd, _gated_gelu_fwd_fake)
gated_gelu_bwd = define_op("vitslim::gated_gelu_bwd", _gated_gelu_bwd, _gated_gelu_bwd_fake)
gated_linear_op = define_op("vitslim::gated_linear", _gated_linear, _gated_linear_fake)
gated_gelu_linear_op = define_op("vitslim::gated_gelu_linear", _gated_gelu_linear, _gated_gelu_linear_fake)


def mm_out(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
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
        dwf = mm_out(dy.t(), x, torch.float32)  # fp32 dW' for dW and dgate
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
    dw = mm_out(dpre.t(), x, weight.dtype) if ctx.needs_input_grad[1] else None
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
    dtype = matmul_dtype(x)
    with torch.autocast(x.device.type, enabled=False):  # the matmuls run in `dtype` explicitly
        y = torch.ops.vitslim.gated_linear(x.to(dtype).reshape(-1, x.shape[-1]), weight, bias, gate.reshape(-1))
    return y.view(*x.shape[:-1], weight.shape[0])


def gated_gelu_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                             approximate: str = "none") -> torch.Tensor:
    """Triton (+ cuBLAS) implementation of vitslim_kernels.gated_gelu_linear: (..., C) -> (..., M)."""
    check_gated_gelu_linear_args(x, weight, bias, gate, approximate)
    dtype = matmul_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        h, _ = torch.ops.vitslim.gated_gelu_linear(x.to(dtype).reshape(-1, x.shape[-1]), weight, bias, gate,
                                                   approximate)
    return h.view(*x.shape[:-1], weight.shape[0])


def gated_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor, *,
                 implementation: str | None = None) -> torch.Tensor:
    """y = (x @ weight^T + bias) * gate.repeat(out_features // R): a row-gated linear map (the gated qkv).

    Args:
        x: (..., K); for qkv, (B, N, C).
        weight: (O, K); for qkv (3*H*d, C), rows in timm's (3, H, d) order.
        bias: (O,) or None.
        gate: (R,) with O % R == 0; output column r is scaled by gate[r % R]. For qkv, the attention gate
            per dim, (H, d) flattened to (H*d,): the same gate on q, k and v.
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (..., O) in the matmul dtype (the autocast dtype under autocast, else x.dtype). For qkv this is the
        natural (B, N, 3, H, d) layout: q, k, v = y.split(H*d, -1) are strided (B, N, H*d) views that
        vitslim_kernels.ragged_attention reads without a copy.
    Gradients: x, weight, bias, gate.
    """
    impl = select("gated_linear", x, weight, bias, gate, forced=implementation)
    return impl(x, weight, bias, gate)


def gated_gelu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gate: torch.Tensor,
                      approximate: str = "none", *, implementation: str | None = None) -> torch.Tensor:
    """h = GELU(x @ weight^T + bias) * gate: fc1 of the MLP with its activation and the MLP gate.

    Args:
        x: (..., C).
        weight: (M, C); bias: (M,) or None.
        gate: (M,), the MLP gate (effective value = the raw value).
        approximate: "none" (exact erf GELU, timm's default) or "tanh".
        implementation: force one implementation by name (see vitslim_kernels.explain); default: dispatch.
    Returns:
        (..., M) in the matmul dtype (the autocast dtype under autocast, else x.dtype).
    Gradients: x, weight, bias, gate.
    """
    impl = select("gated_gelu_linear", x, weight, bias, gate, approximate, forced=implementation)
    return impl(x, weight, bias, gate, approximate)


register("gated_linear", "triton", lambda: gated_linear_triton, triton_refusals)
register("gated_linear", "reference", lambda: gated_linear_ref, no_refusals)
register("gated_gelu_linear", "triton", lambda: gated_gelu_linear_triton, triton_refusals)
register("gated_gelu_linear", "reference", lambda: gated_gelu_linear_ref, no_refusals)
register_fallback("gated_linear_fold", _fold_reference)
register_fallback("gated_linear_fold_bwd", gated_linear_fold_bwd_ref)
register_fallback("gated_gelu_fwd", _gelu_fwd_reference)
register_fallback("gated_gelu_bwd", gated_gelu_bwd_ref)


def sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, requires_grad: bool = False
                  ) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of gated_linear: the qkv shape (3 heads of 16, one gate per head dim repeated for
    q, k and v), C = 48, N = 50, batch 2."""
    x, weight, bias, gate = sample_tensors((2, 50, 48), (144, 48), (144,), (48,), device=device, dtype=dtype,
                                           scale=0.5, requires_grad=requires_grad)
    return [((x, weight, bias, gate), {})]


def gated_gelu_linear_sample_inputs(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                                    requires_grad: bool = False) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of calls of gated_gelu_linear: fc1 of C = 48 to M = 96 units, N = 50, batch 2; exact and
    tanh GELU."""
    x, weight, bias, gate = sample_tensors((2, 50, 48), (96, 48), (96,), (96,), device=device, dtype=dtype,
                                           scale=0.5, requires_grad=requires_grad)
    return [((x, weight, bias, gate, "none"), {}), ((x, weight, bias, gate, "tanh"), {})]


def library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck of gated_linear's ops: the
    fold of a (48, 17) weight by a 16-entry gate (repeated for q, k, v) into fp16, with and without a bias, its
    backward, and the composite gated_linear on 17 rows of C = 24 in fp32 and fp16."""
    def fold(bias: bool) -> tuple:
        weight, b, gate = sample_tensors((48, 17), (48,), (16,), device="cpu", dtype=torch.float32)
        return weight, b if bias else None, gate, torch.float16

    def fold_backward(bias: bool) -> tuple:
        weight, b, gate, _ = fold(bias)
        grad_weight, grad_bias = sample_tensors((48, 17), (48,), device="cpu", dtype=torch.float32, seed=3)
        return grad_weight, grad_bias if bias else None, weight, b, gate

    def linear(dtype: torch.dtype, bias: bool) -> tuple:
        x, weight, b, gate = sample_tensors((17, 24), (48, 24), (48,), (16,), device="cpu", dtype=dtype)
        return x, weight / 24 ** 0.5, b if bias else None, gate

    return [("fp32->fp16", "gated_linear_fold", lambda: fold(True)),
            ("no bias", "gated_linear_fold", lambda: fold(False)),
            ("fp32", "gated_linear_fold_bwd", lambda: fold_backward(True)),
            ("no bias", "gated_linear_fold_bwd", lambda: fold_backward(False)),
            ("fp32", "gated_linear", lambda: linear(torch.float32, True)),
            ("fp16 no bias", "gated_linear", lambda: linear(torch.float16, False))]


def gated_gelu_linear_library_samples() -> list[tuple[str, str, Callable[[], tuple]]]:
    """(label, torch.library op, a function making its args) for torch.library.opcheck of gated_gelu_linear's ops:
    the gated GELU of 17 rows of 96 units (exact and tanh, with and without the fc1 bias), its backward, and the
    composite on 17 rows of C = 24 to 40 units."""
    def gelu(dtype: torch.dtype, approximate: str, bias: bool) -> tuple:
        pre, b, gate = sample_tensors((17, 96), (96,), (96,), device="cpu", dtype=dtype)
        return 2.0 * pre, b if bias else None, gate, approximate

    def gelu_backward(dtype: torch.dtype, approximate: str, bias: bool) -> tuple:
        (grad,) = sample_tensors((17, 96), device="cpu", dtype=dtype, seed=3)
        return (grad, *gelu(dtype, approximate, bias))

    def linear(dtype: torch.dtype, approximate: str, bias: bool) -> tuple:
        x, weight, b, gate = sample_tensors((17, 24), (40, 24), (40,), (40,), device="cpu", dtype=dtype)
        return x, 2.0 * weight / 24 ** 0.5, b if bias else None, gate, approximate

    return [("fp32", "gated_gelu_fwd", lambda: gelu(torch.float32, "none", True)),
            ("fp16 tanh", "gated_gelu_fwd", lambda: gelu(torch.float16, "tanh", False)),
            ("fp32 tanh", "gated_gelu_bwd", lambda: gelu_backward(torch.float32, "tanh", False)),
            ("fp16", "gated_gelu_bwd", lambda: gelu_backward(torch.float16, "none", True)),
            ("fp32", "gated_gelu_linear", lambda: linear(torch.float32, "none", True)),
            ("fp16 tanh", "gated_gelu_linear", lambda: linear(torch.float16, "tanh", False))]


describe_op(OpInfo("gated_linear", gated_linear, gated_linear_ref, sample_inputs,
                   library_ops=("gated_linear", "gated_linear_fold", "gated_linear_fold_bwd"),
                   kernels=("gated_linear_fold", "gated_linear_fold_bwd"),
                   kernel_modules=("vitslim_kernels.triton.gated_linear",),
                   library_samples=library_samples))
describe_op(OpInfo("gated_gelu_linear", gated_gelu_linear, gated_gelu_linear_ref, gated_gelu_linear_sample_inputs,
                   library_ops=("gated_gelu_linear", "gated_gelu_fwd", "gated_gelu_bwd"),
                   kernels=("gated_gelu_fwd", "gated_gelu_bwd"),
                   kernel_modules=("vitslim_kernels.triton.gated_linear",),
                   library_samples=gated_gelu_linear_library_samples))

"""The layers of a slim model that every family builds its blocks from: attention with ragged heads (each its own
width, one launch through vitslim_kernels) and a narrowed MLP (docs/design.md section 4)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Optional  # TorchScript reads SlimAttention.forward's annotations
import warnings

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

import vitslim_kernels
from vitslim_kernels.ops.qkv_attention import qkv_attention_triton
from vitslim_kernels.ops.ragged_attention import attention_per_head, ragged_attention_fwd_op


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # Weights always come from the search model or a file: no initialisation. Width 0 is valid here,
    # so torch's "zero-element tensor" init warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)


HEAD_ALIGNMENT = 8  # elements: 16 bytes of bf16/fp16, so a padded head starts where a 16-byte load can


def runs_triton(x: torch.Tensor, attention: "SlimAttention", dropout_p: float, op: str = "ragged_attention") -> bool:
    """Whether dispatch sends this block's attention (`op`: ragged_attention, or window_attention for a Swin) to the
    Triton kernel: the predicates read what q would be (device, dtype under autocast, shape, whether it needs a
    gradient)."""
    if dropout_p > 0.0:
        return False
    dev = x.device.type
    q_like = SimpleNamespace(
        device=x.device, shape=(x.shape[0], x.shape[1], attention.width),
        dtype=torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype,
        requires_grad=torch.is_grad_enabled() and (x.requires_grad or attention.qkv.weight.requires_grad))
    for name, why_not in vitslim_kernels.explain(op, q_like):
        if why_not is None:
            return name == "triton"
    return False


class _AlignedHeads:
    """A padded layout of a block's ragged heads: head h keeps its w_h columns and gets round_up(w_h, multiple) - w_h
    zero columns after them, in q, k and v alike; with `by_width`, heads of equal padded width are also made
    adjacent (ordered by padded width), so each such group is one contiguous slice (`groups`).

    Why padding at run time and not a rounded plan: the plan (and so the accuracy, the parameter count and the
    saved weights) stays what threshold chose; the cost is a gather of the qkv rows and proj columns per step
    (O(C * width), against the O(B * N * C * width) matmuls that read them) and at most multiple - 1 zero columns
    per head in those matmuls. A plan whose widths are already multiples needs none of it (needed is False).
    Exactly the same function: padded q and k columns are 0 and add nothing to the scores, padded v columns give
    output columns that meet zero proj columns.
    """

    def __init__(self, head_dims: tuple[int, ...], multiple: int = HEAD_ALIGNMENT, by_width: bool = False) -> None:
        widths = [-(-w // multiple) * multiple for w in head_dims]
        order = sorted(range(len(head_dims)), key=lambda h: widths[h]) if by_width else list(range(len(head_dims)))
        self.order = tuple(order)  # the heads in the layout, as indices of the plan's heads
        self.head_dims = tuple(widths[h] for h in order)
        self.width = sum(self.head_dims)
        self.needed = self.head_dims != tuple(head_dims)
        width = sum(head_dims)
        starts = [sum(head_dims[:h]) for h in range(len(head_dims))]
        columns = []  # source column of every padded column; `width` names the zero column
        for h in order:
            columns += list(range(starts[h], starts[h] + head_dims[h])) + [width] * (widths[h] - head_dims[h])
        # (first column, first head, heads, width) of each run of heads of one padded width, zero width left out
        self.groups: list[tuple[int, int, int, int]] = []
        column = 0
        for i, w in enumerate(self.head_dims):
            if w and self.groups and self.groups[-1][3] == w and self.groups[-1][1] + self.groups[-1][2] == i:
                first, head, count, _ = self.groups[-1]
                self.groups[-1] = (first, head, count + 1, w)
            elif w:
                self.groups.append((column, i, 1, w))
            column += w
        self._columns = torch.tensor(columns, dtype=torch.long)
        self._rows = torch.cat([torch.where(self._columns < width, self._columns + s * width,
                                            torch.full_like(self._columns, 3 * width)) for s in range(3)])
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached: tuple | None = None  # (weights' identity and versions, padded weights) for inference

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self._rows.to(device), self._columns.to(device))
        return self._on[device]

    def padded(self, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor | None, proj_weight: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """The padded qkv weight and bias and proj weight. Without autograd (inference) they are kept until a
        weight changes (its version counter moves), so an inference step gathers nothing."""
        if not self.needed:
            return qkv_weight, qkv_bias, proj_weight
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return (self.pad_rows(qkv_weight), self.pad_rows(qkv_bias) if qkv_bias is not None else None,
                    self.pad_columns(proj_weight))
        tensors = (qkv_weight, qkv_bias, proj_weight)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in tensors)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, (self.pad_rows(qkv_weight), self.pad_rows(qkv_bias) if qkv_bias is not None
                                  else None, self.pad_columns(proj_weight)))
        return self._cached[1]

    def pad_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(3 * width, ...) qkv weight or bias -> (3 * padded width, ...), zero rows in the gaps."""
        rows, _ = self._index(t.device)
        return torch.cat([t, t.new_zeros((1,) + t.shape[1:])]).index_select(0, rows)

    def pad_columns(self, t: torch.Tensor) -> torch.Tensor:
        """(C_out, width) proj weight -> (C_out, padded width), zero columns in the gaps."""
        _, columns = self._index(t.device)
        return torch.cat([t, t.new_zeros((t.shape[0], 1))], 1).index_select(1, columns)


# Heads padded to a multiple of this for the PyTorch path (one SDPA per group of equal padded width): 1, no padding,
# heads of one width grouped. benchmarks/cpu_deploy.py times 1, 8, 16, 32 and 64 (one thread, DeiT-S and Swin-T at
# 70% budgets): 1, 8 and 16 were within the 2-core machine's noise of each other (DeiT-S batch 32: 0.93-0.95 of the
# FLOPs gain for 1, 0.95-0.96 for 16), 32 and 64 slower; padding computes MACs the plan removed (+21% on a tiny ViT
# with 16-wide heads), so the unpadded grouping it is.
PYTORCH_BUCKET = 1


def bucketed_attention(qkv: torch.Tensor, layout: _AlignedHeads, scale: float,
                       attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Ragged attention without a loop over heads: one scaled_dot_product_attention per group of heads of equal padded
    width in `layout` (a by_width _AlignedHeads), each group a contiguous slice of qkv, so nothing is copied.

    qkv: (B, N, 3 * layout.width), made with the layout's padded weights; attn_mask: None, or a float mask
    broadcastable to (B, heads, N, N) with its heads in the layout's order. Returns (B, N, layout.width)."""
    B, N, _ = qkv.shape
    W = layout.width
    outs = []
    for column, head, count, width in layout.groups:
        q, k, v = (qkv[..., s * W + column: s * W + column + count * width].unflatten(-1, (count, width))
                   .transpose(1, 2) for s in range(3))  # each (B, count, N, width)
        mask = attn_mask
        if mask is not None and mask.dim() >= 3 and mask.shape[-3] > 1:
            mask = mask.narrow(-3, head, count)
        if mask is not None and torch.compiler.is_exporting() and not dropout_p:
            # torch 2.14's ONNX exporter fails on SDPA with a float mask (its decomposition's strides break the
            # reshape after it; timm's dense Swin fails alike): the same math in plain ops, still one per group
            o = ((q @ k.transpose(-2, -1)) * scale + mask).softmax(dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        outs.append(o.transpose(1, 2).reshape(B, N, count * width))
    if not outs:
        return qkv.new_zeros(B, N, 0)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def causal_mask(attn_mask: Optional[torch.Tensor], is_causal: bool, n: int, device: torch.device
                ) -> Optional[torch.Tensor]:
    """The mask scaled_dot_product_attention applies for (attn_mask, is_causal): attn_mask, or with is_causal the
    (n, n) lower triangle (a query sees itself and the keys before it); both is an error, as in SDPA."""
    if not is_causal:
        return attn_mask
    if attn_mask is not None:
        raise ValueError("give attn_mask or is_causal=True, not both (as scaled_dot_product_attention)")
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


@register_notrace_module  # timm's FX tracing (features_only, feature extraction) keeps it whole
class SlimAttention(nn.Module):
    """Attention with ragged heads. qkv rows: [q heads packed | k heads packed | v heads packed].

    implementation None (slim(..., fused=True)): dispatch picks per device; under torch.export (and so
    torch.onnx.export(dynamo=True)) the graph holds the op vitslim::ragged_attention_fwd itself, on any device,
    not what dispatch would pick on the tracing device (on CPU the reference: plain ops).
    "reference" (fused=False): plain PyTorch, also in exported graphs: heads ordered and grouped by width (padded to
    a multiple of PYTORCH_BUCKET), one scaled_dot_product_attention per group (_forward_bucketed).
    "per_head": the per-head reference of vitslim_kernels (the specification; tests and benchmarks).
    attn_mask and is_causal as timm's Attention takes them (scaled_dot_product_attention's meaning); the kernels take
    no mask, so a masked call runs the PyTorch reference. Under torch.jit.script the PyTorch reference runs.
    """

    def __init__(self, embed_dim: int, head_dims: tuple[int, ...], head_dim: int, qkv_bias: bool,
                 proj_bias: bool, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.implementation: str | None = None  # None: dispatch picks; "reference": plain PyTorch
        self.head_dims = tuple(head_dims)
        self.head_dim_list: list[int] = list(head_dims)  # the same, as TorchScript takes it
        self.width = sum(self.head_dims)
        self.scale = head_dim ** -0.5  # the ORIGINAL head width, whatever is kept
        self.qkv = _linear(embed_dim, 3 * self.width, qkv_bias)
        self.attn_drop_p = attn_drop
        self.proj = _linear(self.width, embed_dim, proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._aligned = _AlignedHeads(self.head_dims)  # the Triton kernel's layout
        self._bucketed = _AlignedHeads(self.head_dims, PYTORCH_BUCKET, by_width=True)  # the PyTorch path's

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_scripted(x, attn_mask, is_causal)
        return self._forward(x, attn_mask, is_causal)

    def _forward_scripted(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool
                          ) -> torch.Tensor:
        """The PyTorch reference, in code TorchScript compiles."""
        w = self.width
        qkv = self.qkv(x)
        o = attention_per_head(qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:], self.head_dim_list, self.scale,
                               causal_mask(attn_mask, is_causal, x.shape[1], x.device),
                               self.attn_drop_p if self.training else 0.0)
        return self.proj_drop(self.proj(o))

    @torch.jit.unused
    def _forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> torch.Tensor:
        dropout_p = self.attn_drop_p if self.training else 0.0
        mask = causal_mask(attn_mask, is_causal, x.shape[1], x.device)  # a mask takes the reference (dispatch)
        if (mask is None and self.implementation is None and torch.compiler.is_exporting()
                and not (self.training and self.attn_drop_p)):
            # The same graph whatever the tracing device; vitslim_kernels.onnx translates the op for ONNX.
            q, k, v = self._split(self.qkv(x), self.width)
            o, _ = ragged_attention_fwd_op()(q, k, v, list(self.head_dims), self.scale)
            return self.proj_drop(self.proj(o))
        if mask is None and self.implementation is None and runs_triton(x, self, dropout_p):
            return self.proj_drop(self._forward_aligned(x))
        if mask is None and self.implementation == "reference":
            return self.proj_drop(self._forward_bucketed(x, dropout_p))
        q, k, v = self._split(self.qkv(x), self.width)
        implementation = "reference" if self.implementation == "per_head" else self.implementation
        o = vitslim_kernels.ragged_attention(q, k, v, self.head_dims, self.scale, dropout_p, attn_mask=mask,
                                             implementation=implementation)
        return self.proj_drop(self.proj(o))

    @staticmethod
    def _split(qkv: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]  # each (B, N, width); width may be 0

    def _forward_bucketed(self, x: torch.Tensor, dropout_p: float, attn_mask: Optional[torch.Tensor] = None
                          ) -> torch.Tensor:
        """The PyTorch path: heads ordered by width (padded with zero weights to a multiple of PYTORCH_BUCKET) and
        grouped by it, one scaled_dot_product_attention per group (bucketed_attention), instead of a loop over heads
        with an explicit softmax. attn_mask: a float mask with the heads in the layout's order."""
        layout = self._bucketed
        qkv_weight, qkv_bias, proj_weight = layout.padded(self.qkv.weight, self.qkv.bias, self.proj.weight)
        o = bucketed_attention(F.linear(x, qkv_weight, qkv_bias), layout, self.scale, attn_mask, dropout_p)
        return F.linear(o, proj_weight, self.proj.bias)

    def _forward_aligned(self, x: torch.Tensor) -> torch.Tensor:
        """The Triton kernel on heads "ragged but aligned": each head's q/k/v columns padded to a multiple of 8
        with zero weights (see _AlignedHeads; nothing to pad when the widths already are), so that every head
        starts on a 16-byte boundary and the kernel loads 16 bytes at a time, through qkv_attention (its
        gradient is one dqkv, and the bias gradient comes with it). Exactly the same function: padded q and k
        columns are 0 and add nothing to the scores, padded v columns give output columns that meet zero proj
        columns."""
        a = self._aligned
        qkv_weight, qkv_bias, proj_weight = a.padded(self.qkv.weight, self.qkv.bias, self.proj.weight)
        # The projection and the attention as one op: its backward takes the qkv bias gradient from the
        # attention kernel instead of reading dqkv once more.
        o = qkv_attention_triton(x, qkv_weight, qkv_bias, None, a.head_dims, self.scale)
        return F.linear(o, proj_weight, self.proj.bias)

    def extra_repr(self) -> str:
        return f"head_dims={list(self.head_dims)}, scale={self.scale:.4g}"


class SlimMlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop with `hidden` kept units (0 allowed: output is fc2's bias)."""

    def __init__(self, embed_dim: int, hidden: int, act: nn.Module, bias: bool, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = _linear(embed_dim, hidden, bias)
        self.act = act
        self.drop1 = nn.Dropout(drop)
        self.fc2 = _linear(hidden, embed_dim, bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

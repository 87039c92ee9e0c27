"""The physically smaller model built from a SlimPlan (docs/design.md section 4).

A slim model is a timm VisionTransformer whose blocks are `SlimBlock`s: ragged heads (each its own width,
original scale), narrower MLPs, and a static gather of the kept tokens at the start of a block. No mask
remains: every removed weight is gone.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from types import SimpleNamespace
import warnings

import torch
import torch.nn.functional as F
from timm.layers import DropPath, to_2tuple
from torch import nn

import vitslim_kernels
from vitslim_kernels.ops.qkv_attention import qkv_attention_triton
from vitslim_kernels.ops.ragged_attention import ragged_attention_fwd_op

from .arch import ViTArch, build, describe
from .cuda_graphs import use_cuda_graphs
from .implementations import SLIM as SLIM_IMPLEMENTATIONS
from .implementations import chosen
from .intermediates import install_checked_forward_intermediates
from .plan import SlimPlan
from .searchable import describe_searchable, is_searchable, searchable_blocks


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    # Weights always come from the search model or a file: no initialisation. Width 0 is valid here,
    # so torch's "zero-element tensor" init warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias)


HEAD_ALIGNMENT = 8  # elements: 16 bytes of bf16/fp16, so a padded head starts where a 16-byte load can


def _runs_triton(x: torch.Tensor, attention: "SlimAttention", dropout_p: float) -> bool:
    """Whether dispatch sends this block's ragged attention to the Triton kernel (training on a GPU): the
    predicates read what q would be (device, dtype under autocast, shape, whether it needs a gradient)."""
    if dropout_p > 0.0:
        return False
    dev = x.device.type
    q_like = SimpleNamespace(
        device=x.device, shape=(x.shape[0], x.shape[1], attention.width),
        dtype=torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype,
        requires_grad=torch.is_grad_enabled() and (x.requires_grad or attention.qkv.weight.requires_grad))
    for name, why_not in vitslim_kernels.explain("ragged_attention", q_like):
        if why_not is None:
            return name == "triton"
    return False


class _AlignedHeads:
    """The padded layout of a block's ragged heads for the Triton kernel: head h keeps its w_h columns and gets
    round_up(w_h, 8) - w_h zero columns after them, in q, k and v alike.

    Why padding at run time and not a rounded plan: the plan (and so the accuracy, the parameter count and the
    saved weights) stays what threshold chose; the cost is a gather of the qkv rows and proj columns per step
    (O(C * width), against the O(B * N * C * width) matmuls that read them) and at most 7 zero columns per head
    in those matmuls. A plan whose widths are already multiples of 8 needs none of it (needed is False).
    """

    def __init__(self, head_dims: tuple[int, ...]) -> None:
        padded = tuple(-(-w // HEAD_ALIGNMENT) * HEAD_ALIGNMENT for w in head_dims)
        self.head_dims, self.width = padded, sum(padded)
        self.needed = padded != tuple(head_dims)
        width = sum(head_dims)
        columns, offset = [], 0  # source column of every padded column; `width` names the zero column
        for w, wp in zip(head_dims, padded):
            columns += list(range(offset, offset + w)) + [width] * (wp - w)
            offset += w
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


class SlimAttention(nn.Module):
    """Attention with ragged heads. qkv rows: [q heads packed | k heads packed | v heads packed].

    implementation None (slim(..., fused=True)): dispatch picks per device; under torch.export (and so
    torch.onnx.export(dynamo=True)) the graph holds the op vitslim::ragged_attention_fwd itself, on any device,
    not what dispatch would pick on the tracing device (on CPU the reference: plain ops).
    "reference" (fused=False): the plain PyTorch per-head loop, also in exported graphs.
    """

    def __init__(self, embed_dim: int, head_dims: tuple[int, ...], head_dim: int, qkv_bias: bool,
                 proj_bias: bool, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.implementation: str | None = None  # None: dispatch picks; "reference": plain PyTorch
        self.head_dims = tuple(head_dims)
        self.width = sum(self.head_dims)
        self.scale = head_dim ** -0.5  # the ORIGINAL head width, whatever is kept
        self.qkv = _linear(embed_dim, 3 * self.width, qkv_bias)
        self.attn_drop_p = attn_drop
        self.proj = _linear(self.width, embed_dim, proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self._aligned = _AlignedHeads(self.head_dims)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: one clear line instead of TorchScript's error with an empty first line
        raise RuntimeError("slim models do not support TorchScript (torch.jit.script); torch.export "
                           "(python -m vitslim.export --format pt2), ONNX and torch.jit.trace do")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation is None and torch.compiler.is_exporting() and not (self.training and self.attn_drop_p):
            # The same graph whatever the tracing device; vitslim_kernels.onnx translates the op for ONNX.
            q, k, v = self._split(self.qkv(x), self.width)
            o, _ = ragged_attention_fwd_op()(q, k, v, list(self.head_dims), self.scale)
            return self.proj_drop(self.proj(o))
        dropout_p = self.attn_drop_p if self.training else 0.0
        if self.implementation is None and _runs_triton(x, self, dropout_p):
            return self.proj_drop(self._forward_aligned(x))
        q, k, v = self._split(self.qkv(x), self.width)
        o = vitslim_kernels.ragged_attention(q, k, v, self.head_dims, self.scale, dropout_p=dropout_p,
                                             implementation=self.implementation)
        return self.proj_drop(self.proj(o))

    @staticmethod
    def _split(qkv: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]  # each (B, N, width); width may be 0

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


class SlimBlock(nn.Module):
    """A pre-norm block of the slim model. Input (B, N_in, C) -> output (B, R + len(tokens), C).

    gather_index: positions of the kept tokens in the input sequence (None: keep all).
    token_scale: (kept patches,) scale of the normalised patch tokens (fold_gates=True only).
    """

    def __init__(self, dense_block: nn.Module, arch: ViTArch, head_dims: tuple[int, ...], mlp_hidden: int,
                 gather_index: torch.Tensor | None, num_kept_patches: int, token_scale: bool) -> None:
        super().__init__()
        attn, mlp = dense_block.attn, dense_block.mlp
        self.norm1, self.ls1, self.drop_path1 = dense_block.norm1, dense_block.ls1, dense_block.drop_path1
        self.norm2, self.ls2, self.drop_path2 = dense_block.norm2, dense_block.ls2, dense_block.drop_path2
        self.attn = SlimAttention(arch.embed_dim, head_dims, arch.head_dim, arch.qkv_bias, arch.proj_bias,
                                  attn.attn_drop.p, attn.proj_drop.p)
        self.mlp = SlimMlp(arch.embed_dim, mlp_hidden, mlp.act, arch.proj_bias, mlp.drop1.p)
        self.num_prefix_tokens = arch.num_prefix_tokens
        self.num_patches_out = num_kept_patches
        # Derived from the plan, so not saved: load_slim rebuilds it.
        self.register_buffer("gather_index", gather_index, persistent=False)
        self.register_buffer("token_scale", torch.ones(num_kept_patches) if token_scale else None)

    def _scale(self, u: torch.Tensor) -> torch.Tensor:
        if self.token_scale is None:
            return u
        ones = self.token_scale.new_ones(self.num_prefix_tokens)
        return u * torch.cat([ones, self.token_scale]).to(u.dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("slim blocks take no attention mask (ViT self-attention is unmasked)")
        if self.gather_index is not None:
            x = x.index_select(1, self.gather_index)  # static token drop: the same positions for every image
        x = x + self.drop_path1(self.ls1(self.attn(self._scale(self.norm1(x)))))
        x = x + self.drop_path2(self.ls2(self.mlp(self._scale(self.norm2(x)))))
        return x


def _gather_indices(plan: SlimPlan) -> list[torch.Tensor | None]:
    """Per block, the positions of its kept tokens in its input sequence (None when nothing is dropped)."""
    R = plan.num_prefix_tokens
    previous = list(range(plan.num_patches))
    result = []
    for b in plan.blocks:
        if list(b.tokens) == previous:
            result.append(None)
        else:
            where = {p: i for i, p in enumerate(previous)}
            result.append(torch.tensor(list(range(R)) + [R + where[p] for p in b.tokens], dtype=torch.long))
        previous = list(b.tokens)
    return result


def build_slim(arch: ViTArch, plan: SlimPlan, token_scale: bool) -> nn.Module:
    """A slim model shaped by `plan`, weights uninitialised (load them with load_state_dict)."""
    plan.check_fits(arch)
    model = build(arch)
    for i, (b, gather) in enumerate(zip(plan.blocks, _gather_indices(plan))):
        model.blocks[i] = SlimBlock(model.blocks[i], arch, b.head_dims, len(b.mlp), gather, len(b.tokens),
                                    token_scale)
    model.slim_plan = plan
    model.slim_arch = arch
    install_checked_forward_intermediates(model)
    model.set_input_size = functools.partial(_set_input_size, model, model.set_input_size)
    return model


def _set_input_size(model: nn.Module, timm_set_input_size, img_size=None, patch_size=None, **kwargs) -> None:
    """timm's set_input_size where the plan allows it: the size the plan was made for (nothing changes), or, when
    the plan keeps every patch of every block and no token scale was folded in, any size of the same patch size
    (timm resamples the position embedding; the plan then keeps every patch of the new grid). Refused when tokens
    were dropped or scaled: those are positions of the grid the plan was searched on, which a new grid lacks."""
    arch, plan = model.slim_arch, model.slim_plan
    size = tuple(to_2tuple(img_size)) if img_size is not None else tuple(arch.img_size)
    patch = tuple(to_2tuple(patch_size)) if patch_size is not None else tuple(arch.patch_size)
    if (size, patch) == (tuple(arch.img_size), tuple(arch.patch_size)):
        return
    why = resize_refusal(model)
    if patch != tuple(arch.patch_size):
        why = f"its patches are {arch.patch_size[0]}x{arch.patch_size[1]} (its weights are for that patch size)"
    if why is not None:
        raise ValueError(f"set_input_size(img_size={img_size}, patch_size={patch_size}): this slim model's plan is "
                         f"for {arch.img_size[0]}x{arch.img_size[1]} images in {arch.patch_size[0]}x"
                         f"{arch.patch_size[1]} patches and {why}; accepted: that size only")
    timm_set_input_size(img_size=size, **kwargs)
    patches = model.patch_embed.num_patches
    model.slim_arch = dataclasses.replace(arch, img_size=size)
    model.slim_plan = dataclasses.replace(plan, num_patches=patches, blocks=tuple(
        dataclasses.replace(b, tokens=tuple(range(patches))) for b in plan.blocks))
    for block in model.blocks:
        block.num_patches_out = patches
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        set_pretrained_cfg(model, {**cfg, "input_size": (3, *size)})


def resize_refusal(model: nn.Module) -> str | None:
    """Why a slim model cannot take another image size (set_input_size), or None when it can."""
    plan = model.slim_plan
    if any(len(b.tokens) != plan.num_patches for b in plan.blocks):
        return "it drops tokens (kept tokens are positions of that grid)"
    if any(getattr(b, "token_scale", None) is not None for b in model.blocks):
        return "its token scales (fold_gates) are per position of that grid"
    return None


def set_pretrained_cfg(model: nn.Module, cfg: dict | None) -> None:
    """Give `model` timm's pretrained_cfg (and its old alias default_cfg): input size, mean/std, crop,
    interpolation, ... so timm.data.resolve_data_config(model=model) preprocesses as for the dense model."""
    if cfg is None:
        return
    model.pretrained_cfg = copy.deepcopy(dict(cfg))
    model.default_cfg = model.pretrained_cfg


def _qkv_rows(plan_heads: tuple[tuple[int, ...], ...], head_dim: int) -> tuple[list[int], list[int]]:
    """Rows of the dense qkv weight kept for q, k, v (in that order) and the proj columns kept."""
    H = len(plan_heads)
    cols = [h * head_dim + j for h, dims in enumerate(plan_heads) for j in dims]
    rows = [part * H * head_dim + c for part in range(3) for c in cols]
    return rows, cols


@torch.no_grad()
def _slim_state_dict(model: nn.Module, plan: SlimPlan, fold_gates: bool) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    searchable = is_searchable(model)
    gate_list = [b.gates for b in searchable_blocks(model)] if searchable else [None] * plan.depth
    d = plan.head_dim
    for i, (block, b, g) in enumerate(zip(model.blocks, plan.blocks, gate_list)):
        p = f"blocks.{i}."
        for name in ("norm1", "norm2", "ls1", "ls2"):
            for key, value in getattr(block, name).state_dict().items():
                state[f"{p}{name}.{key}"] = value
        rows, cols = _qkv_rows(b.heads, d)
        rows_t, cols_t = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        units = torch.tensor(b.mlp, dtype=torch.long)
        qkv, proj, fc1, fc2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
        w_qkv = qkv.weight.index_select(0, rows_t.to(qkv.weight.device))
        b_qkv = qkv.bias.index_select(0, rows_t.to(qkv.weight.device)) if qkv.bias is not None else None
        w_fc2 = fc2.weight.index_select(1, units.to(fc2.weight.device))
        if fold_gates:
            attn_gate = g.attn_per_dim().reshape(-1).repeat(3).index_select(0, rows_t.to(qkv.weight.device))
            w_qkv = w_qkv * attn_gate.unsqueeze(1)
            b_qkv = b_qkv * attn_gate if b_qkv is not None else None
            w_fc2 = w_fc2 * g.mlp.index_select(0, units.to(fc2.weight.device)).unsqueeze(0)
            state[f"{p}token_scale"] = g.token_scale().index_select(
                0, torch.tensor(b.tokens, dtype=torch.long, device=g.tokens.device))
        state[f"{p}attn.qkv.weight"] = w_qkv
        if b_qkv is not None:
            state[f"{p}attn.qkv.bias"] = b_qkv
        state[f"{p}attn.proj.weight"] = proj.weight.index_select(1, cols_t.to(proj.weight.device))
        if proj.bias is not None:
            state[f"{p}attn.proj.bias"] = proj.bias
        state[f"{p}mlp.fc1.weight"] = fc1.weight.index_select(0, units.to(fc1.weight.device))
        if fc1.bias is not None:
            state[f"{p}mlp.fc1.bias"] = fc1.bias.index_select(0, units.to(fc1.weight.device))
        state[f"{p}mlp.fc2.weight"] = w_fc2
        if fc2.bias is not None:
            state[f"{p}mlp.fc2.bias"] = fc2.bias
    return state


def slim(model: nn.Module, plan: SlimPlan, fold_gates: bool = False, fused: bool = False,
         cuda_graphs: bool = False, *, implementation: str | None = None) -> nn.Module:
    """Build the physically smaller model that `plan` describes, from a searchable (or plain) timm ViT.

    fold_gates=False: kept gates become 1 (the paper). fold_gates=True: kept attention and MLP gate values
    are multiplied into the weights and kept token scales stay as a per-position scale, so the slim model
    computes what the search model computes with pruned entries zeroed and pruned tokens removed.
    implementation: "fused" (or fused=True): dispatch picks the fastest ragged-attention implementation for the
    device (kernels where available); under torch.export the graph then holds vitslim::ragged_attention_fwd itself
    (see vitslim.deploy.export). "reference" (default) keeps the plain PyTorch reference, in exported graphs too.
    cuda_graphs: replay inference on CUDA inputs (eval, autograd off) from CUDA graphs, one per input shape,
    for small-batch latency (see vitslim.cuda_graphs; call model.forward.reset() after changing weights).
    The search model is left unchanged; the slim model is on its device and dtype, in its train/eval mode,
    and carries its timm pretrained_cfg (so timm.data.resolve_data_config gives the same preprocessing).
    """
    implementation = chosen(implementation, fused, SLIM_IMPLEMENTATIONS, "reference")
    if not isinstance(plan, SlimPlan):
        raise TypeError(f"plan must be a SlimPlan (see vitslim.threshold or SlimPlan.from_dict), "
                        f"got {type(plan).__name__}")
    searchable = is_searchable(model)
    if fold_gates and not searchable:
        raise ValueError("fold_gates=True needs a searchable model (with gates); this model has none")
    arch = describe_searchable(model) if searchable else describe(model)
    param = next(model.parameters())
    # Cast before loading: loading float64 weights into the float32 skeleton would round them.
    slim_model = build_slim(arch, plan, token_scale=fold_gates).to(device=param.device, dtype=param.dtype)
    slim_model.load_state_dict(_slim_state_dict(model, plan, fold_gates), strict=True)
    set_pretrained_cfg(slim_model, getattr(model, "pretrained_cfg", None))
    slim_model.train(model.training)
    set_fused(slim_model, implementation == "fused")
    return use_cuda_graphs(slim_model) if cuda_graphs else slim_model


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """fused=True: dispatch picks the ragged-attention kernel per device; False: the PyTorch reference."""
    for block in model.blocks:
        block.attn.implementation = None if fused else "reference"
    return model


def set_drop_path(model, rate: float) -> None:
    """Stochastic depth with DeiT's schedule: 0 at the first block, `rate` at the last."""
    depth = len(model.blocks)
    for block, r in zip(model.blocks, torch.linspace(0, rate, depth).tolist()):
        block.drop_path1 = DropPath(r) if r > 0 else torch.nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else torch.nn.Identity()

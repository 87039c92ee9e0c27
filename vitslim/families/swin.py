"""The Swin family: timm SwinTransformer (v1) models behind the seam of vitslim.families.base (docs/design.md
section 8).

A Swin's blocks stay timm's `SwinTransformerBlock`s with their window machinery as it is (roll by the shift, pad,
window partition, the shift mask, window reverse, crop, roll back; PatchMerging between stages): only a block's
`attn` and `mlp` are replaced. A searchable Swin gives each block its `gates` (a BlockGates with no token gates:
windows and patch merging need the whole grid) and a `GatedWindowAttention` (the same per-dim gate on q, k and v after
the bias, as for ViT; the per-head relative-position bias and the shift mask added to the scores at the original
scale) and a `GatedMlp`. A slim Swin's blocks get a `SlimWindowAttention` (the heads that keep a dim, each its own
width; the bias table's columns of those heads) and a `SlimMlp`. State-dict names stay timm's, so a dense checkpoint
loads into a searchable Swin; a slim checkpoint must not go through timm's checkpoint filter (it resizes tables).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import timm
import torch
import torch.nn.functional as F
from timm.layers import Mlp, to_2tuple
from timm.models.swin_transformer import PatchMerging, SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.swin_transformer import get_relative_position_index
from torch import nn

from vitslim_kernels import gated_mlp_branch, ragged_attention, window_qkv_attention
from vitslim_kernels.ops.window_attention import window_attention_fwd_op
from vitslim_kernels.runtime import triton_unavailable

from ..errors import UnsupportedModelError
from ..gates import BlockGates
from ..implementations import SEARCHABLE as IMPLEMENTATIONS
from ..implementations import fused_fallback
from ..layers import SlimAttention, SlimMlp, runs_triton
from ..plan import BlockWidths, SlimPlan
from .base import ArchRecord, Family, activation_name, block_macs, dropout_p, is_layernorm, qkv_rows

COSINE_ATTENTION = ("its cosine attention normalises q and k per head, so a gate shared by q and k cancels; vitslim "
                    "supports timm SwinTransformer (v1)")


@dataclass(frozen=True)
class SwinArch(ArchRecord):
    """Structural settings of a timm SwinTransformer, per stage where Swin's stages differ (everything needed to
    rebuild it). window_sizes: each stage's window side as its blocks use it (timm clamps it to the stage's grid);
    grids: each stage's token grid as timm builds it (timm 1.0.25 halves it rounding down, later versions up)."""

    img_size: tuple[int, int]
    patch_size: int
    in_chans: int
    num_classes: int
    global_pool: str
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    window_sizes: tuple[int, ...]
    mlp_hiddens: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    qkv_bias: bool
    always_partition: bool
    norm_eps: float
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    family: ClassVar[str] = "swin"

    @property
    def embed_dims(self) -> tuple[int, ...]:
        """Each stage's width: timm's Swin doubles it at every patch merging."""
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

    def __post_init__(self) -> None:
        """Every field checked, so a hand-edited or foreign config fails loudly instead of building another model."""
        def positive_ints(name, values, length=None):
            if (not isinstance(values, tuple) or not values or (length is not None and len(values) != length)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
                count = f"{length} " if length is not None else ""
                raise ValueError(f"{name} must be {count}positive integers, got {values!r}")

        positive_ints("img_size", self.img_size, 2)
        positive_ints("depths", self.depths)
        stages = len(self.depths)
        for name in ("num_heads", "head_dims", "window_sizes", "mlp_hiddens"):
            positive_ints(f"{name} (one per stage)", getattr(self, name), stages)
        if not isinstance(self.grids, tuple) or len(self.grids) != stages:
            raise ValueError(f"grids must be one (height, width) per stage, got {self.grids!r}")
        for grid in self.grids:
            positive_ints("each stage's grid", grid, 2)
        for name in ("patch_size", "in_chans", "num_classes", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_classes" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'num_classes' else 'positive'} "
                                 f"integer, got {value!r}")
        for name in ("qkv_bias", "always_partition"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        if not isinstance(self.global_pool, str):
            raise ValueError(f"global_pool must be a pooling name, got {self.global_pool!r}")

    def block_widths(self) -> tuple[BlockWidths, ...]:
        """Every block's dense widths, stage by stage: no prefix token, the stage's grid of tokens, its window's
        tokens as the keys per query, attention and MLP gates only."""
        widths = []
        for i, (h, w) in enumerate(self.grids):
            block = BlockWidths(self.embed_dims[i], self.num_heads[i], self.head_dims[i], self.mlp_hiddens[i], 0,
                                h * w, window=self.window_sizes[i] ** 2, gates=("attn", "mlp"))
            widths += [block] * self.depths[i]
        return tuple(widths)



# -- what a supported Swin is ----------------------------------------------------------------------------------
def _swin_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in model.layers for block in stage.blocks]


def _check_block(block: nn.Module, where: str) -> None:
    if not isinstance(block, SwinTransformerBlock):
        raise UnsupportedModelError(f"{where} is a {type(block).__name__}; vitslim supports timm's "
                                    "SwinTransformerBlock")
    if not isinstance(block.attn, WindowAttention):
        raise UnsupportedModelError(f"{where}: unsupported attention layer {type(block.attn).__name__}; vitslim "
                                    "supports timm's WindowAttention")
    if not isinstance(block.mlp, Mlp) or not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModelError(f"{where}: unsupported MLP {type(block.mlp).__name__}; vitslim supports "
                                    "timm's Mlp")
    act = block.mlp.act
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise UnsupportedModelError(f"{where}: unsupported MLP activation {type(act).__name__}; Swin blocks use "
                                    "exact GELU")
    if not is_layernorm(block.norm1) or not is_layernorm(block.norm2):
        raise UnsupportedModelError(f"{where}: block norms must be LayerNorm")
    if block.window_size[0] != block.window_size[1]:
        raise UnsupportedModelError(f"{where}: window {block.window_size[0]}x{block.window_size[1]} is not "
                                    "square; vitslim supports square windows")
    if getattr(block, "dynamic_mask", False):
        raise UnsupportedModelError("dynamic image size (strict_img_size=False) is not supported: a plan is "
                                    "for one grid per stage")


def describe(model: nn.Module) -> SwinArch:
    """Check that `model` (dense or searchable) is a supported timm Swin and return its structural settings;
    UnsupportedModelError names the first unsupported feature."""
    if type(model).__name__ in ("SwinTransformerV2", "SwinTransformerV2Cr"):
        raise UnsupportedModelError(f"{type(model).__name__} is not supported: {COSINE_ATTENTION}")
    if type(model) is not SwinTransformer:
        raise UnsupportedModelError(f"vitslim supports timm SwinTransformer (v1) models; got {type(model).__name__}")
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic image size (strict_img_size=False) is not supported: a plan is for "
                                    "one grid per stage")
    pe = model.patch_embed
    if not is_layernorm(pe.norm) or pe.patch_size[0] != pe.patch_size[1]:
        raise UnsupportedModelError("only timm's Swin patch embedding (square patches, LayerNorm) is supported")
    if not is_layernorm(model.norm):
        raise UnsupportedModelError(f"model.norm must be LayerNorm, got {type(model.norm).__name__}")
    stages = list(model.layers)
    if not stages or not all(len(stage.blocks) for stage in stages):
        raise UnsupportedModelError("every stage of the model needs at least one block")
    dims, heads, head_dims, windows, hiddens, qkv_bias, always = [], [], [], [], [], set(), set()
    grid = tuple(int(g) for g in pe.grid_size)
    for s, stage in enumerate(stages):
        if s > 0 and not isinstance(stage.downsample, PatchMerging):
            raise UnsupportedModelError(f"stage {s}: unsupported downsampling {type(stage.downsample).__name__}")
        if s > 0:
            grid = tuple((g + 1) // 2 for g in grid)  # patch merging pads an odd grid
        built = tuple(int(r) for r in stage.blocks[0].input_resolution)
        if built != grid:
            raise UnsupportedModelError(
                f"stage {s}: this timm ({timm.__version__}) builds its blocks for a {built[0]}x{built[1]} grid, but "
                f"patch merging gives {grid[0]}x{grid[1]} (an odd grid rounded down); use an image size whose grids "
                "halve evenly, or a newer timm")
        shapes = set()
        for j, block in enumerate(stage.blocks):
            _check_block(block, f"stage {s} block {j}")
            attn = block.attn
            shapes.add((attn.num_heads, attn.qkv.out_features // (3 * attn.num_heads), block.mlp.fc1.out_features,
                        block.window_size[0]))
            qkv_bias.add(attn.qkv.bias is not None)
            always.add(bool(getattr(block, "always_partition", False)))
        if len(shapes) != 1:
            raise UnsupportedModelError(f"stage {s}: blocks of different widths are not supported ({sorted(shapes)})")
        (h, d, m, w), = shapes
        dims.append(int(stage.blocks[0].norm1.normalized_shape[0]))
        heads.append(int(h))
        head_dims.append(int(d))
        hiddens.append(int(m))
        windows.append(int(w))
    if dims != [dims[0] * 2 ** i for i in range(len(dims))]:
        raise UnsupportedModelError(f"stage widths {dims} do not double at every stage as timm's Swin builds them")
    if len(qkv_bias) != 1 or len(always) != 1:
        raise UnsupportedModelError("blocks that differ in qkv_bias or always_partition are not supported")
    norm_eps = {float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(norm_eps) != 1:
        raise UnsupportedModelError(f"LayerNorms with different eps {sorted(norm_eps)} are not supported")
    blocks = _swin_blocks(model)
    attn = blocks[0].attn
    return SwinArch(
        img_size=tuple(int(s) for s in pe.img_size), patch_size=int(pe.patch_size[0]),
        in_chans=int(pe.proj.in_channels), num_classes=int(model.num_classes), global_pool=model.global_pool,
        embed_dim=dims[0], depths=tuple(len(stage.blocks) for stage in stages), num_heads=tuple(heads),
        head_dims=tuple(head_dims), window_sizes=tuple(windows), mlp_hiddens=tuple(hiddens),
        grids=tuple(tuple(int(r) for r in stage.blocks[0].input_resolution) for stage in stages),
        qkv_bias=qkv_bias.pop(), always_partition=always.pop(), norm_eps=norm_eps.pop(),
        drop_rate=dropout_p(getattr(model.head, "drop", None)),
        proj_drop_rate=dropout_p(attn.proj_drop), attn_drop_rate=dropout_p(attn.attn_drop),
        drop_path_rate=float(getattr(blocks[-1].drop_path1, "drop_prob", 0.0)),
    )


def _window_arg(arch: SwinArch):
    """timm's window_size argument that builds these per-stage windows. A stage whose window covers its whole grid
    is built alike from any window at least that large (timm clamps it, without a shift), so such stages take the
    largest window: then the windows mostly agree and are one int; else one int per stage (two stages with two
    windows stay ambiguous to older timm, which reads a pair as one (h, w) window)."""
    sizes = list(arch.window_sizes)
    if not arch.always_partition:
        sizes = [max(sizes) if (w, w) == grid else w for w, grid in zip(sizes, arch.grids)]
    return sizes[0] if len(set(sizes)) == 1 else tuple(sizes)


def build(arch: SwinArch) -> nn.Module:
    """A dense timm SwinTransformer with the structure of `arch`, weights left uninitialised, on the default device."""
    ratios = []
    for dim, hidden in zip(arch.embed_dims, arch.mlp_hiddens):
        ratio = hidden / dim
        ratios.append(ratio if int(dim * ratio) == hidden else (hidden + 0.5) / dim)  # float round trip
    # drop_path_rate: timm spreads it over all blocks, 0 at the first, the rate at the last.
    model = SwinTransformer(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans, num_classes=arch.num_classes,
        global_pool=arch.global_pool, embed_dim=arch.embed_dim, depths=arch.depths, num_heads=arch.num_heads,
        head_dim=arch.head_dims, window_size=_window_arg(arch),
        always_partition=arch.always_partition, mlp_ratio=tuple(ratios), qkv_bias=arch.qkv_bias,
        drop_rate=arch.drop_rate, proj_drop_rate=arch.proj_drop_rate, attn_drop_rate=arch.attn_drop_rate,
        drop_path_rate=arch.drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=arch.norm_eps), weight_init="skip")
    grids = tuple(tuple(stage.blocks[0].input_resolution) for stage in model.layers)
    if grids != arch.grids:
        raise UnsupportedModelError(f"this timm version builds stage grids {list(grids)} for {arch.img_size[0]}x"
                                    f"{arch.img_size[1]} images; the model was described with {list(arch.grids)} "
                                    "(another timm version): use an image size whose grids halve evenly")
    return model


# -- the searchable layers (docs/design.md sections 2 and 8) ---------------------------------------------------
def _adopt(new: nn.Module, old: nn.Module) -> None:
    """Make `new` (a subclass of type(old)) own old's parameters, buffers, submodules and settings, under the same
    names, without running timm's constructor again (it would initialise new weights)."""
    nn.Module.__init__(new)
    for name, value in vars(old).items():
        if name in ("_parameters", "_buffers", "_modules"):
            getattr(new, name).update(value)
        elif name == "_non_persistent_buffers_set":
            new._non_persistent_buffers_set.update(value)
        elif not name.startswith("_"):
            new.__dict__[name] = value


def window_scores_mask(bias: torch.Tensor, mask: torch.Tensor | None, batch_windows: int) -> torch.Tensor:
    """What Swin adds to a block's attention scores: the relative-position bias (H, N, N) and, in a shifted block,
    the shift mask (nW, N, N) of each window (window w of an image is batch row b * nW + w, as timm partitions).
    Returns (1, H, N, N), or (B * nW, H, N, N) with a mask."""
    if mask is None:
        return bias.unsqueeze(0)
    nW, N = mask.shape[0], mask.shape[-1]
    H = bias.shape[0]
    both = bias.unsqueeze(0).unsqueeze(0) + mask.to(bias.dtype).view(1, nW, 1, N, N)
    return both.expand(batch_windows // nW, nW, H, N, N).reshape(batch_windows, H, N, N)


class _Implementation:
    """The `implementation` setting of a searchable layer, checked."""

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, got {value!r}")
        self.__dict__["_implementation"] = value

    def _chosen(self, x: torch.Tensor, dropouts: tuple[float, ...]) -> str:
        """The implementation this call runs: "fused" only where the kernels can (else folded, with a warning
        saying why, once)."""
        if self._implementation != "fused":
            return self._implementation
        if self.training and any(p > 0 for p in dropouts):
            return fused_fallback("the fused kernels have no dropout (attn_drop/proj_drop/mlp drop > 0)")
        why_not = triton_unavailable(x)
        return "fused" if why_not is None else fused_fallback(why_not)


class GatedWindowAttention(_Implementation, WindowAttention):
    """timm's WindowAttention (its parameters, buffers, set_window_size) with its block's attention gate: the same
    gate on q, k and v after the bias. forward(x, mask) as timm's: x (B * nW, N, C), mask (nW, N, N) or None.

    implementation "eager": the gates multiply q, k and v, explicit softmax (the paper's way); "folded": the gate in
    the qkv rows, scaled_dot_product_attention with the bias and mask as a float mask; "fused": vitslim_kernels'
    window_qkv_attention (the gate folded into the qkv rows by the fold kernel, cuBLAS, then the window attention
    kernel with the bias gathered from the table and the shift mask; one op), then proj.
    """

    def __init__(self, attn: WindowAttention, gates: BlockGates, implementation: str) -> None:
        _adopt(self, attn)
        self.__dict__["_block_gates"] = gates  # the block's: saved there, not here
        self.implementation = implementation

    def _qkv(self, x: torch.Tensor, folded: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B_, N, _ = x.shape
        H = self.num_heads
        gate = self._block_gates.attn_per_dim()  # (H, d)
        if folded:  # exact: a gate scales a row of the linear map, its bias included
            rows = gate.reshape(-1).repeat(3)
            weight = self.qkv.weight * rows.unsqueeze(1)
            bias = self.qkv.bias * rows if self.qkv.bias is not None else None
            qkv = F.linear(x, weight, bias)
        else:
            qkv = self.qkv(x)
        q, k, v = qkv.reshape(B_, N, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)  # each (B * nW, H, N, d)
        if not folded:
            g = gate.to(x.dtype).view(1, H, 1, -1)
            q, k, v = q * g, k * g, v * g
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B_, N, _ = x.shape
        implementation = self._chosen(x, (self.attn_drop.p, self.proj_drop.p))
        if implementation == "fused":
            H = self.num_heads
            gate = self._block_gates.attn_per_dim()  # (H, d)
            o = window_qkv_attention(x, self.qkv.weight, self.qkv.bias, gate.reshape(-1), (gate.shape[1],) * H,
                                     self.scale, self.relative_position_bias_table, self.relative_position_index,
                                     mask)
            return self.proj_drop(self.proj(o))
        folded = implementation != "eager"
        q, k, v = self._qkv(x, folded)
        add = window_scores_mask(self._get_rel_pos_bias()[0], mask, B_).to(q.dtype)
        if folded:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=self.scale,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            probs = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1) + add).softmax(dim=-1))
            o = probs @ v
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B_, N, -1)))


class GatedMlp(_Implementation, Mlp):
    """timm's Mlp with its block's MLP gate on the hidden units: multiplied into the activations ("eager"), into
    fc2's columns ("folded"), or vitslim_kernels' gated_mlp_branch ("fused": cuBLAS fc1 with the gate in a Triton
    GELU epilogue, cuBLAS fc2)."""

    def __init__(self, mlp: Mlp, gates: BlockGates, implementation: str) -> None:
        _adopt(self, mlp)
        self.__dict__["_block_gates"] = gates
        self.implementation = implementation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self._block_gates.mlp
        implementation = self._chosen(x, (self.drop1.p, self.drop2.p))
        if implementation == "fused" and isinstance(self.norm, nn.Identity):
            approximate = "tanh" if activation_name(self.act) == "gelu_tanh" else "none"
            return gated_mlp_branch(x, self.fc1.weight, self.fc1.bias, gate, self.fc2.weight, self.fc2.bias,
                                    approximate=approximate)
        h = self.drop1(self.act(self.fc1(x)))
        if implementation == "eager":
            return self.drop2(self.fc2(self.norm(h) * gate.to(h.dtype)))
        return self.drop2(F.linear(self.norm(h), self.fc2.weight * gate.unsqueeze(0), self.fc2.bias))


def make_block_searchable(block: SwinTransformerBlock, search: str, implementation: str) -> None:
    attn = block.attn
    weight = attn.qkv.weight
    gates = BlockGates(search, attn.num_heads, attn.qkv.out_features // (3 * attn.num_heads),
                       block.mlp.fc1.out_features, 0, device=weight.device, dtype=weight.dtype)
    block.attn = GatedWindowAttention(attn, gates, implementation)
    block.mlp = GatedMlp(block.mlp, gates, implementation)
    block.gates = gates


# -- the slim layers (docs/design.md sections 4 and 8) ------------------------------------------------------------
class SlimWindowAttention(SlimAttention):
    """Window attention with ragged heads: the heads that keep at least one dim, each its own width, the relative
    position bias table's columns of those heads, the scale of the original head width. forward(x, mask) as timm's
    WindowAttention: x (B * nW, N, C), mask (nW, N, N) or None.

    implementation None (slim(..., fused=True)): where dispatch sends window_attention to Triton (CUDA tensors),
    window_qkv_attention on the heads padded to multiples of 8 (16-byte loads; SlimAttention._aligned), the bias
    gathered and the mask added in the kernel; under torch.export the op vitslim::window_attention_fwd itself
    (vitslim_kernels.onnx translates it); elsewhere the PyTorch path. "reference": the PyTorch path, heads ordered
    and grouped by width, one scaled_dot_product_attention per group with the bias and the shift mask as a float
    mask (SlimAttention._forward_bucketed); "per_head": the per-head reference of vitslim_kernels.
    """

    def __init__(self, embed_dim: int, head_dims: tuple[int, ...], head_dim: int, window_size: int, qkv_bias: bool,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        if not all(w > 0 for w in head_dims):
            raise ValueError(f"a slim window attention holds the heads that keep a dim, got widths {list(head_dims)}")
        super().__init__(embed_dim, head_dims, head_dim, qkv_bias, True, attn_drop, proj_drop)
        self.num_heads = len(head_dims)
        self.window_size = (window_size, window_size)
        self.window_area = window_size * window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, self.num_heads))
        self.register_buffer("relative_position_index", get_relative_position_index(window_size, window_size),
                             persistent=False)
        # the heads in the PyTorch path's layout (ordered and grouped by width): how its bias rows are gathered
        self.register_buffer("layout_order", torch.tensor(self._bucketed.order, dtype=torch.long), persistent=False)

    def relative_position_bias(self) -> torch.Tensor:
        """(heads, N, N): each kept head's bias, gathered from its table column."""
        N = self.window_area
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1).permute(2, 0, 1)

    def set_window_size(self, window_size) -> None:
        if tuple(to_2tuple(window_size)) != tuple(self.window_size):
            raise ValueError(f"set_window_size({window_size}): a slim Swin keeps the {self.window_size[0]}x"
                             f"{self.window_size[1]} windows of its plan; accepted: that size only")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        B_ = x.shape[0]
        dropout_p = self.attn_drop_p if self.training else 0.0
        if self.implementation is None and dropout_p == 0.0:
            table, index = self.relative_position_bias_table, self.relative_position_index
            if torch.compiler.is_exporting():  # the same graph whatever the tracing device
                q, k, v = self._split(self.qkv(x), self.width)
                o, _ = window_attention_fwd_op()(q, k, v, table, index, mask, list(self.head_dims), self.scale)
                return self.proj_drop(self.proj(o))
            if runs_triton(x, self, dropout_p, op="window_attention"):
                a = self._aligned  # heads padded to multiples of 8 in q, k and v alike: table columns unchanged
                qkv_weight, qkv_bias, proj_weight = a.padded(self.qkv.weight, self.qkv.bias, self.proj.weight)
                o = window_qkv_attention(x, qkv_weight, qkv_bias, None, a.head_dims, self.scale, table, index, mask)
                return self.proj_drop(F.linear(o, proj_weight, self.proj.bias))
        bias = self.relative_position_bias()
        if self.implementation == "per_head":
            q, k, v = self._split(self.qkv(x), self.width)
            add = window_scores_mask(bias, mask, B_).to(q.dtype)
            o = ragged_attention(q, k, v, self.head_dims, self.scale, dropout_p, attn_mask=add,
                                 implementation="reference")
            return self.proj_drop(self.proj(o))
        add = window_scores_mask(bias.index_select(0, self.layout_order), mask, B_).to(x.dtype)
        return self.proj_drop(self._forward_bucketed(x, dropout_p, add))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window_size[0]}"


def build_slim(arch: SwinArch, plan: SlimPlan) -> nn.Module:
    """A slim Swin shaped by `plan`, weights uninitialised (load them with load_state_dict)."""
    plan.check_fits(arch)
    model = build(arch)
    for block, b in zip(_swin_blocks(model), plan.blocks):
        attn, mlp = block.attn, block.mlp
        kept = tuple(w for w in b.head_dims if w)
        block.attn = SlimWindowAttention(attn.qkv.in_features, kept, attn.qkv.out_features // (3 * attn.num_heads),
                                         block.window_size[0], arch.qkv_bias, attn.attn_drop.p, attn.proj_drop.p)
        block.mlp = SlimMlp(mlp.fc1.in_features, len(b.mlp), mlp.act, True, mlp.drop1.p)
    model.slim_plan = plan
    model.slim_arch = arch
    model.set_input_size = functools.partial(_set_input_size, model)
    return model


def _set_input_size(model: nn.Module, img_size=None, patch_size=None, window_size=None, window_ratio=None,
                    **kwargs) -> None:
    """timm's set_input_size, refused for any change: a plan's widths and windows are those of one grid per stage."""
    arch = model.slim_arch
    same = ((img_size is None or tuple(to_2tuple(img_size)) == arch.img_size)
            and (patch_size is None or tuple(to_2tuple(patch_size)) == (arch.patch_size,) * 2)
            and window_size is None and window_ratio is None
            and kwargs.get("always_partition") in (None, arch.always_partition))
    if not same:
        raise ValueError(f"set_input_size: this slim Swin's plan is for {arch.img_size[0]}x{arch.img_size[1]} images "
                         f"in {arch.patch_size}x{arch.patch_size} patches with windows {list(arch.window_sizes)}; "
                         "accepted: that size only")


@torch.no_grad()
def slim_state_dict(model: nn.Module, plan: SlimPlan, gate_list: list | None, fold_gates: bool
                    ) -> dict[str, torch.Tensor]:
    """The slim Swin's weights sliced from a dense or searchable Swin (Family.slim_state_dict)."""
    names = {block: name for name, block in model.named_modules() if isinstance(block, SwinTransformerBlock)}
    blocks = _swin_blocks(model)
    prefixes = tuple(f"{names[block]}.{part}." for block in blocks for part in ("attn", "mlp", "gates"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    gate_list = gate_list or [None] * len(blocks)
    for block, b, g in zip(blocks, plan.blocks, gate_list):
        p = f"{names[block]}."
        attn, mlp = block.attn, block.mlp
        H = attn.num_heads
        d = attn.qkv.out_features // (3 * H)
        dev = attn.qkv.weight.device
        rows, cols = (torch.tensor(t, dtype=torch.long, device=dev) for t in qkv_rows(b.heads, d))
        units = torch.tensor(b.mlp, dtype=torch.long, device=dev)
        kept_heads = torch.tensor([h for h, dims in enumerate(b.heads) if dims], dtype=torch.long, device=dev)
        w_qkv = attn.qkv.weight.index_select(0, rows)
        b_qkv = attn.qkv.bias.index_select(0, rows) if attn.qkv.bias is not None else None
        w_fc2 = mlp.fc2.weight.index_select(1, units)
        if fold_gates:
            gate = g.attn_per_dim().reshape(-1).repeat(3).index_select(0, rows)
            w_qkv = w_qkv * gate.unsqueeze(1)
            b_qkv = b_qkv * gate if b_qkv is not None else None
            w_fc2 = w_fc2 * g.mlp.index_select(0, units).unsqueeze(0)
        state[f"{p}attn.qkv.weight"] = w_qkv
        if b_qkv is not None:
            state[f"{p}attn.qkv.bias"] = b_qkv
        state[f"{p}attn.proj.weight"] = attn.proj.weight.index_select(1, cols)
        state[f"{p}attn.proj.bias"] = attn.proj.bias
        state[f"{p}attn.relative_position_bias_table"] = attn.relative_position_bias_table.index_select(1, kept_heads)
        state[f"{p}mlp.fc1.weight"] = mlp.fc1.weight.index_select(0, units)
        state[f"{p}mlp.fc1.bias"] = mlp.fc1.bias.index_select(0, units)
        state[f"{p}mlp.fc2.weight"] = w_fc2
        state[f"{p}mlp.fc2.bias"] = mlp.fc2.bias
    return state


# -- counting and the family object -------------------------------------------------------------------------------
def count_macs(model: nn.Module) -> int:
    """MACs of one image through a dense, searchable or slim Swin: the patch embedding, each stage's patch merging
    and blocks (each block on its stage's grid, keys per query its window's tokens), the classifier. Norms and
    the padding tokens of a grid that is not a multiple of the window are not counted."""
    conv = model.patch_embed.proj
    gh, gw = model.patch_embed.grid_size
    macs = gh * gw * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for stage in model.layers:
        h, w = stage.output_resolution
        if isinstance(stage.downsample, PatchMerging):
            reduction = stage.downsample.reduction
            macs += h * w * reduction.in_features * reduction.out_features
        for block in stage.blocks:
            qkv, fc1 = block.attn.qkv, block.mlp.fc1
            macs += block_macs(qkv.in_features, qkv.out_features // 3, fc1.out_features, h * w,
                               block.window_size[0] * block.window_size[1])
    fc = getattr(model.head, "fc", None)
    if isinstance(fc, nn.Linear):
        macs += fc.in_features * fc.out_features
    return macs


class SwinFamily(Family):
    name = "swin"
    supported = "timm SwinTransformer models (Swin v1)"
    attention_op = "vitslim::window_attention_fwd"
    # Swin's ImageNet recipe (Liu et al. 2021, as the paper retrains Swin-T): stochastic depth 0.2, 20 warm-up epochs,
    # gradient clipping at 5 (weight decay 0.05 and the rest as DeiT's).
    retrain_recipe = {"drop_path": 0.2, "warmup_epochs": 20, "clip_grad": 5.0}

    def matches(self, model: nn.Module) -> bool:
        # SwinV2 matches too, so that describe refuses it with the reason.
        return type(model) is SwinTransformer or type(model).__name__ in ("SwinTransformerV2", "SwinTransformerV2Cr")

    def describe(self, model: nn.Module) -> SwinArch:
        return describe(model)

    def arch_from_dict(self, d: dict) -> SwinArch:
        return SwinArch.from_dict(d)

    def build(self, arch: SwinArch) -> nn.Module:
        return build(arch)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return _swin_blocks(model)

    def make_searchable(self, model: nn.Module, arch: SwinArch, search: str, implementation: str) -> None:
        for block in _swin_blocks(model):
            make_block_searchable(block, search, implementation)

    def build_slim(self, arch: SwinArch, plan: SlimPlan, token_scale: bool) -> nn.Module:
        return build_slim(arch, plan)

    def slim_state_dict(self, model: nn.Module, plan: SlimPlan, gates: list | None, fold_gates: bool
                        ) -> dict[str, torch.Tensor]:
        return slim_state_dict(model, plan, gates, fold_gates)

    def count_macs(self, model: nn.Module) -> int:
        return count_macs(model)

    def block_params(self, arch: SwinArch, widths: BlockWidths, attn_width: int, mlp_width: int, heads: int) -> int:
        table = (2 * math.isqrt(widths.window) - 1) ** 2  # the bias table's rows, one column per kept head
        return super().block_params(arch, widths, attn_width, mlp_width, heads) + table * heads

    def resize_refusal(self, model: nn.Module) -> str | None:
        return "a Swin plan's widths and windows are those of one grid per stage"


SWIN = SwinFamily()

"""The ViT family: timm VisionTransformer models (ViT, DeiT, distilled DeiT, register tokens), behind the seam of
vitslim.families.base.

Everything ViT-specific is here: what a supported model is (`describe` -> `ViTArch`, `build` from it), its
searchable block (`SearchableBlock`: gates on every head dim, MLP unit and patch token, docs/design.md section 2),
its slim block (`SlimBlock`: ragged heads, a narrower MLP and a static gather of the kept tokens, section 4) and the
slicing of the weights into it, its forward_intermediates on shortened sequences, and the `VIT` family object.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from functools import partial
from typing import ClassVar, Optional  # TorchScript reads SlimBlock.forward's annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, register_notrace_function, to_2tuple
from timm.models._features import feature_take_indices
from timm.models.deit import VisionTransformerDistilled
# Imported from vision_transformer, which defines them in older timm and re-exports them in newer timm.
from timm.models.vision_transformer import Attention, Block, LayerScale, Mlp, PatchEmbed, VisionTransformer
from torch import nn

from vitslim_kernels import gated_attention_branch, gated_mlp_branch, layernorm_token_scale
from vitslim_kernels.runtime import triton_unavailable

from ..errors import UnsupportedModelError
from ..gates import BlockGates
from ..implementations import SEARCHABLE as IMPLEMENTATIONS
from ..implementations import fused_fallback
from ..layers import SlimAttention, SlimMlp
from ..plan import BlockWidths, SlimPlan
from .base import (ArchRecord, Family, activation_name, block_macs, dropout_p, is_layernorm, qkv_rows,
                   set_pretrained_cfg)


SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")
_ACTIVATIONS = ("gelu", "gelu_tanh")


def _timm():
    return dict(Attention=Attention, LayerNorm=LayerNorm, LayerScale=LayerScale, Mlp=Mlp,
                PatchEmbed=PatchEmbed, VisionTransformer=VisionTransformer,
                VisionTransformerDistilled=VisionTransformerDistilled, Block=Block)


@dataclass(frozen=True)
class ViTArch(ArchRecord):
    """Structural settings of a timm VisionTransformer (everything needed to rebuild it)."""

    distilled: bool
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    in_chans: int
    num_classes: int
    global_pool: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    qkv_bias: bool
    proj_bias: bool
    patch_bias: bool
    layer_scale: bool
    class_token: bool
    reg_tokens: int
    no_embed_class: bool
    pos_embed: bool
    pre_norm: bool
    final_norm: bool
    fc_norm: bool
    pool_include_prefix: bool
    dynamic_img_pad: bool
    norm_eps: float
    act: str
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        """Every field checked, so a hand-edited or foreign config fails loudly instead of building another
        model (an unknown activation must not load as GELU)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise ValueError(f"{f.name} must be true or false, got {value!r}")
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{f.name} must be a non-negative integer, got {value!r}")
            if f.type in ("float", float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                               or not 0.0 <= value < 1.0):
                raise ValueError(f"{f.name} must be a number in [0, 1), got {value!r}")
        for name in ("img_size", "patch_size"):
            size = getattr(self, name)
            if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise ValueError(f"{name} must be two positive integers, got {list(size)}")
        for name in ("in_chans", "embed_dim", "depth", "num_heads", "mlp_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
        if self.act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {list(_ACTIVATIONS)}, got {self.act!r}")
        if self.global_pool not in SUPPORTED_POOLS:
            raise ValueError(f"global_pool must be one of {list(SUPPORTED_POOLS)}, got {self.global_pool!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    family: ClassVar[str] = "vit"

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def block_widths(self) -> tuple[BlockWidths, ...]:
        """Every block's dense widths (all alike in a ViT): what a plan of this model indexes into."""
        return (BlockWidths(self.embed_dim, self.num_heads, self.head_dim, self.mlp_hidden, self.num_prefix_tokens,
                            self.num_patches),) * self.depth

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])



def check_block(block: nn.Module, index: int, expected_block_types: tuple[type, ...]) -> None:
    """Raise UnsupportedModelError unless `block` is a plain pre-norm ViT block vitslim can gate."""
    t = _timm()
    where = f"block {index}"
    if not isinstance(block, expected_block_types):
        raise UnsupportedModelError(
            f"{where} is a {type(block).__name__}; vitslim supports timm's standard pre-norm Block only")
    attn, mlp = block.attn, block.mlp
    if type(attn) is not t["Attention"]:
        raise UnsupportedModelError(f"{where}: unsupported attention layer {type(attn).__name__}; "
                                    "vitslim supports timm's Attention")
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise UnsupportedModelError(f"{where}: qk_norm is not supported")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise UnsupportedModelError(f"{where}: scale_attn_norm is not supported")
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(f"{where}: gated attention is not supported")
    if type(mlp) is not t["Mlp"]:
        raise UnsupportedModelError(f"{where}: unsupported MLP {type(mlp).__name__} (gated MLPs such as "
                                    "GluMlp/SwiGLU are not supported); vitslim supports timm's Mlp")
    if not isinstance(mlp.norm, nn.Identity):
        raise UnsupportedModelError(f"{where}: scale_mlp_norm is not supported")
    if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.fc2, nn.Linear):
        raise UnsupportedModelError(f"{where}: convolutional MLPs are not supported")
    if not is_layernorm(block.norm1) or not is_layernorm(block.norm2):
        raise UnsupportedModelError(f"{where}: block norms must be LayerNorm, got "
                                    f"{type(block.norm1).__name__}/{type(block.norm2).__name__}")
    activation_name(mlp.act)


def describe(model: nn.Module, block_types: tuple[type, ...] | None = None) -> ViTArch:
    """Check that `model` is a supported timm ViT and return its structural settings.

    `block_types` are the block classes accepted (default: timm's Block); vitslim's own searchable
    block passes itself here. Raises UnsupportedModelError naming the first unsupported feature.
    """
    t = _timm()
    vit_types = (t["VisionTransformer"], t["VisionTransformerDistilled"])
    if not isinstance(model, nn.Module) or type(model) not in vit_types:
        raise UnsupportedModelError(
            f"vitslim supports timm VisionTransformer models (ViT, DeiT, distilled DeiT); "
            f"got {type(model).__name__}")
    distilled = type(model) is t["VisionTransformerDistilled"]
    if getattr(model, "dynamic_img_size", False):
        raise UnsupportedModelError("dynamic image size (dynamic_img_size=True) is not supported")
    if not isinstance(model.patch_drop, nn.Identity):
        raise UnsupportedModelError("patch dropout (patch_drop_rate > 0) is not supported: "
                                    "it changes the token set per step, which token gates cannot follow")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} (attention pooling) is not supported; "
                                    f"accepted: {', '.join(SUPPORTED_POOLS)}")
    if model.global_pool not in SUPPORTED_POOLS:
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} is not supported; "
                                    f"accepted: {', '.join(SUPPORTED_POOLS)}")
    pe = model.patch_embed
    if type(pe) is not t["PatchEmbed"] or not pe.flatten or not isinstance(pe.norm, nn.Identity):
        raise UnsupportedModelError("only timm's plain PatchEmbed (flattened, no norm) is supported")
    for name in ("norm_pre", "norm", "fc_norm"):
        m = getattr(model, name)
        if not isinstance(m, nn.Identity) and not is_layernorm(m):
            raise UnsupportedModelError(f"model.{name} must be LayerNorm or Identity, got {type(m).__name__}")

    blocks = list(model.blocks)
    if not blocks:
        raise UnsupportedModelError("the model has no transformer blocks")
    accepted = block_types or (t["Block"],)
    for i, block in enumerate(blocks):
        check_block(block, i, accepted)
    first = blocks[0]
    attn, mlp = first.attn, first.mlp
    embed_dim = model.embed_dim
    shapes = {(b.attn.num_heads, b.attn.head_dim, b.mlp.fc1.out_features, b.attn.qkv.bias is not None)
              for b in blocks}
    if len(shapes) != 1:
        raise UnsupportedModelError("blocks of different widths are not supported (found "
                                    f"{sorted(shapes)} as (heads, head_dim, mlp_hidden, qkv_bias))")
    if attn.num_heads * attn.head_dim != embed_dim:
        raise UnsupportedModelError(f"attention width {attn.num_heads}x{attn.head_dim} differs from "
                                    f"embed_dim {embed_dim}; not supported")
    norm_eps = {float(m.eps) for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if len(norm_eps) != 1:
        raise UnsupportedModelError(f"LayerNorms with different eps {sorted(norm_eps)} are not supported")
    last = blocks[-1]
    return ViTArch(
        distilled=distilled,
        img_size=tuple(int(s) for s in pe.img_size),
        patch_size=tuple(int(s) for s in pe.patch_size),
        in_chans=int(pe.proj.in_channels),
        num_classes=int(model.num_classes),
        global_pool=model.global_pool,
        embed_dim=int(embed_dim),
        depth=len(blocks),
        num_heads=int(attn.num_heads),
        mlp_hidden=int(mlp.fc1.out_features),
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        patch_bias=pe.proj.bias is not None,
        layer_scale=isinstance(first.ls1, t["LayerScale"]),
        class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        no_embed_class=bool(model.no_embed_class),
        pos_embed=model.pos_embed is not None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        # timm puts the final norm either before pooling (norm) or after it (fc_norm), never both.
        final_norm=not isinstance(model.norm, nn.Identity) or not isinstance(model.fc_norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_pad=bool(pe.dynamic_img_pad),
        norm_eps=norm_eps.pop(),
        act=activation_name(mlp.act),
        drop_rate=dropout_p(model.head_drop),
        pos_drop_rate=dropout_p(model.pos_drop),
        proj_drop_rate=dropout_p(attn.proj_drop),
        attn_drop_rate=dropout_p(attn.attn_drop),
        drop_path_rate=float(getattr(last.drop_path1, "drop_prob", 0.0)),
    )


def build(arch: ViTArch) -> nn.Module:
    """A dense timm model with the structure of `arch`, weights left uninitialised, on the default device."""
    t = _timm()
    cls = t["VisionTransformerDistilled"] if arch.distilled else t["VisionTransformer"]
    act = nn.GELU if arch.act == "gelu" else partial(nn.GELU, approximate="tanh")
    kwargs = dict(
        img_size=arch.img_size, patch_size=arch.patch_size, in_chans=arch.in_chans,
        num_classes=arch.num_classes, global_pool=arch.global_pool, embed_dim=arch.embed_dim,
        depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_hidden / arch.embed_dim,
        qkv_bias=arch.qkv_bias, init_values=1.0 if arch.layer_scale else None,
        class_token=arch.class_token, reg_tokens=arch.reg_tokens, no_embed_class=arch.no_embed_class,
        pre_norm=arch.pre_norm, fc_norm=arch.fc_norm, dynamic_img_pad=arch.dynamic_img_pad,
        drop_rate=arch.drop_rate, pos_drop_rate=arch.pos_drop_rate, proj_drop_rate=arch.proj_drop_rate,
        attn_drop_rate=arch.attn_drop_rate, drop_path_rate=arch.drop_path_rate,
        norm_layer=partial(t["LayerNorm"], eps=arch.norm_eps), act_layer=act, weight_init="skip",
    )
    # Settings newer timm versions added: pass them only when they differ from the old behaviour.
    optional = dict(proj_bias=(arch.proj_bias, True), final_norm=(arch.final_norm, True),
                    pool_include_prefix=(arch.pool_include_prefix, False),
                    pos_embed=("learn" if arch.pos_embed else "none", "learn"))
    accepted = inspect.signature(t["VisionTransformer"].__init__).parameters
    for name, (value, default) in optional.items():
        if value != default:
            if name not in accepted:
                raise UnsupportedModelError(f"this timm version cannot build {name}={value!r}; upgrade timm")
            kwargs[name] = value
    if not arch.patch_bias:
        kwargs["embed_layer"] = partial(t["PatchEmbed"], bias=False)
    mlp_hidden = int(arch.embed_dim * kwargs["mlp_ratio"])
    if mlp_hidden != arch.mlp_hidden:  # float round trip of the ratio
        kwargs["mlp_ratio"] = (arch.mlp_hidden + 0.5) / arch.embed_dim
    return cls(**kwargs)


# -- the searchable block (docs/design.md section 2) --------------------------------------------------------
class SearchableBlock(nn.Module):
    """A timm pre-norm ViT block with search gates. Input (B, N_in, C) -> output (B, R + kept patches, C).

    N_in = R + P until tokens are dropped; then R + the patches alive in the previous block.
    token_alive: (P,) bool, saved; the patches present in this block.
    gather_index: positions of this block's tokens in its input sequence (None: the same tokens).
    kept_patches: absolute indices of the patches present (None: all P), to index the token gate.
    """

    def __init__(self, block: nn.Module, search: str, num_prefix_tokens: int, num_patches: int,
                 implementation: str = "folded") -> None:
        super().__init__()
        # The block's own modules, under timm's names, so checkpoints load either way.
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.num_prefix_tokens, self.num_patches = num_prefix_tokens, num_patches
        weight = self.attn.qkv.weight
        self.gates = BlockGates(search, self.attn.num_heads, self.attn.head_dim, self.mlp.fc1.out_features,
                                num_patches, device=weight.device, dtype=weight.dtype)
        self.implementation = implementation
        # Fixed shape (P,) so that a checkpoint loads whatever was dropped; the rest is derived from it.
        self.register_buffer("token_alive", torch.ones(num_patches, dtype=torch.bool, device=weight.device))
        self.register_buffer("gather_index", None, persistent=False)
        self.register_buffer("kept_patches", None, persistent=False)
        self.input_tokens = num_prefix_tokens + num_patches
        self._token_input_stale = False  # token_alive loaded without the model's hook re-deriving the rest

    @torch.no_grad()
    def set_token_input(self, input_alive: torch.Tensor | None) -> None:
        """Derive gather_index, kept_patches and the input length from token_alive.

        input_alive: (P,) bool, the patches present in this block's input (the previous block's
        token_alive); None for the first block (all patches).
        """
        alive = self.token_alive
        present = torch.ones_like(alive) if input_alive is None else input_alive.to(alive.device)
        revived = alive & ~present
        if revived.any():
            raise ValueError(f"token_alive keeps patches {torch.nonzero(revived).flatten().tolist()} that are "
                             f"not in this block's input: a dropped token never returns")
        R = self.num_prefix_tokens
        self.kept_patches = None if alive.all() else torch.nonzero(alive).flatten()
        if torch.equal(alive, present):
            self.gather_index = None
        else:
            position = torch.cumsum(present.long(), 0) - 1  # of each present patch among the input's patches
            prefix = torch.arange(R, dtype=torch.long, device=alive.device)
            self.gather_index = torch.cat([prefix, R + position[alive]])
        self.input_tokens = R + int(present.sum())
        self._token_input_stale = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "token_alive"
        saved = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not saved and key in missing_keys:  # a checkpoint from before token dropping: nothing dropped
            missing_keys.remove(key)
            with torch.no_grad():
                self.token_alive.fill_(True)
        self._token_input_stale = True  # cleared by sync_token_inputs (the model's load hook)

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, "
                             f"got {value!r}")
        self._implementation = value

    def _sequence_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """Per-position scale of the normalised input: 1 for prefix tokens, tanh(gate) for patches. (N, 1)."""
        tok = self.gates.token_scale()
        if self.kept_patches is not None:
            tok = tok.index_select(0, self.kept_patches)  # the gates of the surviving patches
        ones = tok.new_ones(self.num_prefix_tokens)
        return torch.cat([ones, tok]).to(dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
                ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("searchable blocks take no attention mask (ViT self-attention is unmasked)")
        if self._token_input_stale:
            raise RuntimeError("token_alive was loaded into a block without its model: call "
                               "vitslim.searchable.sync_token_inputs(model) (model.load_state_dict does it)")
        expected = self.input_tokens
        if x.dim() != 3 or x.shape[1] != expected:
            raise ValueError(f"expected input (B, {expected}, C) for {self.num_prefix_tokens} prefix and "
                             f"{expected - self.num_prefix_tokens} patch tokens, got {tuple(x.shape)}")
        if self.gather_index is not None:
            x = x.index_select(1, self.gather_index)  # dropped tokens are gone: the same positions for every image
        impl = self.implementation
        if impl == "fused":
            why_not = self._fused_unavailable(x)
            if why_not is None:
                return self._forward_fused(x)
            impl = fused_fallback(why_not)
        scale = self._sequence_scale(x.dtype)
        attn_fn, mlp_fn = (self._attn_eager, self._mlp_eager) if impl == "eager" else \
                          (self._attn_folded, self._mlp_folded)
        x = x + self.drop_path1(self.ls1(attn_fn(self.norm1(x) * scale)))
        x = x + self.drop_path2(self.ls2(mlp_fn(self.norm2(x) * scale)))
        return x

    # -- fused path: the Triton kernels of vitslim_kernels ---------------------------------------------------
    def _fused_unavailable(self, x: torch.Tensor) -> str | None:
        if self.training and any(p > 0 for p in (self.attn.attn_drop.p, self.attn.proj_drop.p,
                                                  self.mlp.drop1.p, self.mlp.drop2.p)):
            return "the fused kernels have no dropout (attn_drop/proj_drop/mlp drop > 0)"
        return triton_unavailable(x)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        attn, mlp, R = self.attn, self.mlp, self.num_prefix_tokens
        tok = self.gates.tokens if self.kept_patches is None else self.gates.tokens.index_select(0, self.kept_patches)
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        u = layernorm_token_scale(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, tok, R, out_dtype=out_dtype)
        a = gated_attention_branch(u, attn.qkv.weight, attn.qkv.bias, self.gates.attn_per_dim(), attn.proj.weight,
                                   attn.proj.bias, attn.num_heads, attn.scale)
        x = x + self.drop_path1(self.ls1(a))
        w = layernorm_token_scale(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, tok, R, out_dtype=out_dtype)
        m = gated_mlp_branch(w, mlp.fc1.weight, mlp.fc1.bias, self.gates.mlp, mlp.fc2.weight, mlp.fc2.bias,
                             approximate="tanh" if activation_name(mlp.act) == "gelu_tanh" else "none")
        return x + self.drop_path2(self.ls2(m))

    # -- paper-style eager path: masks multiplied into activations, explicit softmax --------------------
    def _attn_eager(self, u: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        B, N, _ = u.shape
        H, d = attn.num_heads, attn.head_dim
        q, k, v = attn.qkv(u).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        g = self.gates.attn_per_dim().to(u.dtype).view(1, H, 1, d)
        q, k, v = q * g, k * g, v * g
        scores = (q * attn.scale) @ k.transpose(-2, -1)  # scale is d_original ** -0.5
        probs = attn.attn_drop(scores.softmax(dim=-1))
        o = (probs @ v).transpose(1, 2).reshape(B, N, H * d)
        return attn.proj_drop(attn.proj(o))

    def _mlp_eager(self, w: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h = mlp.drop1(mlp.act(mlp.fc1(w))) * self.gates.mlp.to(w.dtype)
        return mlp.drop2(mlp.fc2(mlp.norm(h)))

    # -- folded path: gates inside the weights, SDPA -------------------------------------------------------
    def folded_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """qkv weight (3Hd, C) and bias (3Hd,) with the attention gate multiplied into the rows."""
        qkv = self.attn.qkv
        rows = self.gates.attn_per_dim().reshape(-1).repeat(3)  # the same gate on q, k and v
        bias = qkv.bias * rows if qkv.bias is not None else None
        return qkv.weight * rows.unsqueeze(1), bias

    def folded_fc2(self) -> torch.Tensor:
        """fc2 weight (C, M) with the MLP gate multiplied into the columns."""
        return self.mlp.fc2.weight * self.gates.mlp.unsqueeze(0)

    def _attn_folded(self, u: torch.Tensor) -> torch.Tensor:
        attn = self.attn
        B, N, _ = u.shape
        H, d = attn.num_heads, attn.head_dim
        weight, bias = self.folded_qkv()
        q, k, v = F.linear(u, weight, bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if self.training else 0.0,
                                           scale=attn.scale)
        return attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, N, H * d)))

    def _mlp_folded(self, w: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        h = mlp.drop1(mlp.act(mlp.fc1(w)))
        return mlp.drop2(F.linear(h, self.folded_fc2(), mlp.fc2.bias))

    def extra_repr(self) -> str:
        kept = self.num_patches if self.kept_patches is None else self.kept_patches.numel()
        return (f"implementation={self.implementation!r}, prefix_tokens={self.num_prefix_tokens}, "
                f"patches={self.num_patches}" + (f", alive_patches={kept}" if kept != self.num_patches else ""))


# -- forward_intermediates on shortened sequences ---------------------------------------------------------
# timm reshapes every requested block output to an (H, W) grid for output_fmt="NCHW", which only a block that
# still holds every patch can fill; with dropped tokens it fails deep inside with a reshape error. The models
# vitslim makes carry their own `forward_intermediates`: "NLC" gives each block's output as it is (B, its own
# token count, C); "NCHW" gives the whole grid of every block: a patch a block no longer holds keeps the value it had
# when it was dropped (the residual stream stops updating it), as token-pruning methods give dense prediction heads.
def kept_patches(block: nn.Module) -> torch.Tensor | None:
    """The grid positions of the patches `block` outputs, in order (None: all of them)."""
    alive = getattr(block, "token_alive", None)  # a searchable block after drop_tokens
    if alive is not None:
        return None if bool(alive.all()) else torch.nonzero(alive).flatten()
    token_index = getattr(block, "token_index", None)  # a slim block after a drop: its prefix, then its patches
    return None if token_index is None else token_index[block.num_prefix_tokens:] - block.num_prefix_tokens


def checked_forward_intermediates(model: nn.Module, *args, **kwargs):
    """timm's VisionTransformer.forward_intermediates; "NCHW" on a model whose blocks dropped tokens gives every
    block's whole grid (see above)."""
    method = type(model).forward_intermediates
    bound = inspect.signature(method).bind(model, *args, **kwargs)
    bound.apply_defaults()
    options = dict(bound.arguments)
    options.pop("self")
    take, max_index = feature_take_indices(len(model.blocks), options["indices"])
    if options["output_fmt"] != "NCHW" or all(kept_patches(b) is None for b in model.blocks[:max_index + 1]):
        return method(model, *args, **kwargs)
    return _full_grid_intermediates(model, method, options, list(take), max_index)


def _full_grid_intermediates(model: nn.Module, method, options: dict, take: list[int], max_index: int):
    """forward_intermediates(output_fmt="NCHW") of a model whose blocks dropped tokens: timm's own pass gives every
    block's kept tokens (NLC, before any norm), and a (B, P, C) grid that starts as block 0's input patches (taken from
    that pass) takes each block's, in order."""
    x, R = options["x"], model.num_prefix_tokens
    passed = {k: v for k, v in options.items() if k in ("attn_mask", "is_causal")}
    first_input = []  # what block 0 takes: the grid's starting values, from the same pass (and dropout draw)
    hook = model.blocks[0].register_forward_pre_hook(lambda _, args, __: first_input.append(args[0]), with_kwargs=True)
    try:
        final, outputs = method(model, x, indices=list(range(max_index + 1)), return_prefix_tokens=True, norm=False,
                                stop_early=options["stop_early"], output_fmt="NLC", intermediates_only=False, **passed)
    finally:
        hook.remove()
    grid = first_input[0][:, R:]
    grids, prefixes = [], []
    for i, output in enumerate(outputs):
        patches, prefix = output if R else (output, None)  # timm pairs them only when there are prefix tokens
        kept = kept_patches(model.blocks[i])
        grid = patches if kept is None else grid.index_copy(1, kept.to(grid.device), patches)
        if i in take:
            grids.append(model.norm(grid) if options["norm"] else grid)
            prefixes.append(model.norm(prefix) if options["norm"] and R else prefix)
    B, _, height, width = x.shape
    H, W = (model.patch_embed.dynamic_feat_size((height, width)) if hasattr(model.patch_embed, "dynamic_feat_size")
            else model.patch_embed.grid_size)
    maps = [g.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for g in grids]
    if options.get("output_dict"):
        result = {"image_intermediates": maps}
        if R and options["return_prefix_tokens"]:
            result["image_intermediates_prefix"] = prefixes
        if not options["intermediates_only"]:
            result["image_features"] = final
        return result
    if R and options["return_prefix_tokens"]:
        maps = list(zip(maps, prefixes))
    return maps if options["intermediates_only"] else (final, maps)


def install_checked_forward_intermediates(model: nn.Module) -> None:
    """Give `model` (a timm ViT) the checked forward_intermediates; a no-op on timm without the method."""
    if hasattr(type(model), "forward_intermediates"):
        # A partial, not a bound method: it pickles and deep-copies with the model.
        model.forward_intermediates = functools.partial(checked_forward_intermediates, model)


@register_notrace_function  # timm's FX tracing calls it whole: the mask is a proxy there, None at run time
def gathered_mask(attn_mask: Optional[torch.Tensor], gather_index: Optional[torch.Tensor], token_index: torch.Tensor,
                  full_tokens: int) -> Optional[torch.Tensor]:
    """An attention mask cut to the tokens a block keeps, along its query and key dimensions: a mask over the
    model's full sequence (full_tokens long: what timm's forward_features gives every block) by the block's positions
    in it (token_index); a mask over the block's own input by gather_index. A dimension of size 1 broadcasts and
    stays."""
    if attn_mask is None:
        return None
    for dim in (-2, -1):
        size = attn_mask.shape[dim]
        if size == full_tokens:
            attn_mask = attn_mask.index_select(dim, token_index)
        elif size > 1 and gather_index is not None:
            attn_mask = attn_mask.index_select(dim, gather_index)
    return attn_mask


torch.fx.wrap("gathered_mask")  # and torch.fx's own tracing (torchvision's feature extraction)


# -- the slim block (docs/design.md section 4) -------------------------------------------------------------
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
        # When tokens were dropped here or before, from the plan: the positions of its tokens in the model's full
        # sequence (a model-level attention mask's; less the prefix, its patches' grid positions for NCHW maps).
        self.register_buffer("token_index", None, persistent=False)
        self.full_tokens = arch.num_prefix_tokens + arch.num_patches
        # Derived from the plan, so not saved: load_slim rebuilds it.
        self.register_buffer("gather_index", gather_index, persistent=False)
        self.register_buffer("token_scale", torch.ones(num_kept_patches) if token_scale else None)

    def _scale(self, u: torch.Tensor) -> torch.Tensor:
        if self.token_scale is None:
            return u
        ones = self.token_scale.new_ones(self.num_prefix_tokens)
        return u * torch.cat([ones, self.token_scale]).to(u.dtype).unsqueeze(-1)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
                ) -> torch.Tensor:
        if self.gather_index is not None:
            x = x.index_select(1, self.gather_index)  # static token drop: the same positions for every image
        if self.token_index is not None:
            attn_mask = gathered_mask(attn_mask, self.gather_index, self.token_index, self.full_tokens)
        x = x + self.drop_path1(self.ls1(self.attn(self._scale(self.norm1(x)), attn_mask=attn_mask,
                                                   is_causal=is_causal)))
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
        if len(b.tokens) != plan.num_patches:
            model.blocks[i].token_index = torch.tensor(list(range(arch.num_prefix_tokens))
                                                       + [arch.num_prefix_tokens + p for p in b.tokens])
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


@torch.no_grad()
def _slim_state_dict(model: nn.Module, plan: SlimPlan, gate_list: list | None, fold_gates: bool
                     ) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    gate_list = gate_list or [None] * plan.depth
    d = plan.head_dim
    for i, (block, b, g) in enumerate(zip(model.blocks, plan.blocks, gate_list)):
        p = f"blocks.{i}."
        for name in ("norm1", "norm2", "ls1", "ls2"):
            for key, value in getattr(block, name).state_dict().items():
                state[f"{p}{name}.{key}"] = value
        rows, cols = qkv_rows(b.heads, d)
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


# -- counting and the family object -------------------------------------------------------------------------------
def count_macs(model: nn.Module) -> int:
    """MACs of one image through a dense, searchable or slim ViT: the patch embedding, every block on the tokens it
    holds (after its gather), the classifier heads."""
    conv = model.patch_embed.proj
    patches = model.patch_embed.num_patches
    macs = patches * conv.out_channels * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    tokens = model.num_prefix_tokens + patches
    for block in model.blocks:
        gather = getattr(block, "gather_index", None)
        if gather is not None:
            tokens = gather.numel()
        qkv, fc1 = block.attn.qkv, block.mlp.fc1
        macs += block_macs(qkv.in_features, qkv.out_features // 3, fc1.out_features, tokens)
    for head in (model.head, getattr(model, "head_dist", None)):
        if isinstance(head, nn.Linear):
            macs += head.in_features * head.out_features
    return macs


class ViTFamily(Family):
    name = "vit"
    supported = "timm VisionTransformer models (ViT, DeiT, distilled DeiT)"

    def matches(self, model: nn.Module) -> bool:
        return type(model) in (VisionTransformer, VisionTransformerDistilled)

    def describe(self, model: nn.Module) -> ViTArch:
        return describe(model, block_types=(SearchableBlock, Block))

    def arch_from_dict(self, d: dict) -> ViTArch:
        return ViTArch.from_dict(d)

    def build(self, arch: ViTArch) -> nn.Module:
        return build(arch)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def make_searchable(self, model: nn.Module, arch: ViTArch, search: str, implementation: str) -> None:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = SearchableBlock(block, search, arch.num_prefix_tokens, arch.num_patches,
                                              implementation).train(block.training)  # a new module starts in train
        install_checked_forward_intermediates(model)  # drop_tokens shortens later blocks

    def build_slim(self, arch: ViTArch, plan: SlimPlan, token_scale: bool) -> nn.Module:
        return build_slim(arch, plan, token_scale)

    def slim_state_dict(self, model: nn.Module, plan: SlimPlan, gates: list | None, fold_gates: bool
                        ) -> dict[str, torch.Tensor]:
        return _slim_state_dict(model, plan, gates, fold_gates)

    def count_macs(self, model: nn.Module) -> int:
        return count_macs(model)

    def resize_refusal(self, model: nn.Module) -> str | None:
        return resize_refusal(model)


VIT = ViTFamily()

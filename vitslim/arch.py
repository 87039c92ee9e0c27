"""What a supported timm Vision Transformer is, read off an instance, and how to build one again.

`describe(model)` checks every feature vitslim relies on and returns a `ViTArch`: the structural
settings of the model. `build(arch)` constructs an equal (untrained) timm model from it, which is how
`slim` and `load_slim` create a model without needing the timm registry name or any pickle.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from functools import partial

import torch
from timm.layers import LayerNorm
from timm.models.deit import VisionTransformerDistilled
# Imported from vision_transformer, which defines them in older timm and re-exports them in newer timm.
from timm.models.vision_transformer import Attention, Block, LayerScale, Mlp, PatchEmbed, VisionTransformer
from torch import nn

from .errors import UnsupportedModelError


SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")
_ACTIVATIONS = ("gelu", "gelu_tanh")


def _timm():
    return dict(Attention=Attention, LayerNorm=LayerNorm, LayerScale=LayerScale, Mlp=Mlp,
                PatchEmbed=PatchEmbed, VisionTransformer=VisionTransformer,
                VisionTransformerDistilled=VisionTransformerDistilled, Block=Block)


@dataclass(frozen=True)
class ViTArch:
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

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def num_patches(self) -> int:
        return (self.img_size[0] // self.patch_size[0]) * (self.img_size[1] // self.patch_size[1])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ViTArch":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model settings {unknown}; accepted: {sorted(names)}")
        d = dict(d)
        d["img_size"] = tuple(d["img_size"])
        d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


def _dropout_p(module: nn.Module) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) else 0.0


def _is_layernorm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine


def activation_name(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    name = type(act).__name__
    if name in ("GELU", "GELUTanh"):  # timm's own GELU modules
        return "gelu" if name == "GELU" else "gelu_tanh"
    raise UnsupportedModelError(f"unsupported MLP activation {name}; vitslim supports GELU (exact or tanh)")


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
    if not _is_layernorm(block.norm1) or not _is_layernorm(block.norm2):
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
        if not isinstance(m, nn.Identity) and not _is_layernorm(m):
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
        drop_rate=_dropout_p(model.head_drop),
        pos_drop_rate=_dropout_p(model.pos_drop),
        proj_drop_rate=_dropout_p(attn.proj_drop),
        attn_drop_rate=_dropout_p(attn.attn_drop),
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


def build_meta(arch: ViTArch) -> nn.Module:
    """`build(arch)` on the meta device: the structure alone, for counting (no memory, no time)."""
    with torch.device("meta"):
        return build(arch)

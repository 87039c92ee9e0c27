"""Tiny real timm ViTs and Swins and gate helpers shared by the tests."""
import copy

import timm
import torch

# Tiny versions of every supported family: (timm name, overrides). Real timm classes, small sizes, so the
# whole suite runs in minutes on 2 CPU cores. Prefix tokens: 1, 2 (distilled), 5 (class + 4 registers), 0.
TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
VARIANTS = {
    "deit": ("deit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "vit_layerscale_noqkvbias": ("vit_small_patch16_224", dict(init_values=0.5, qkv_bias=False)),
    "registers": ("vit_small_patch16_224", dict(reg_tokens=4)),
    "avgpool_no_cls": ("vit_small_patch16_224", dict(class_token=False, global_pool="avg", fc_norm=True)),
    "img48_tanh_gelu": ("vit_small_patch16_224", dict(img_size=48, act_layer="gelu_tanh")),
}


def make_vit(name: str = "deit_small_patch16_224", dtype=torch.float64, fused_attn: bool = True, seed: int = 0,
             **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY, **overrides})
    for block in model.blocks:
        block.attn.fused_attn = fused_attn
    # Non-trivial norms, biases and layer scales, so that every weight matters in the comparisons.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if hasattr(m, "gamma"):
                m.gamma.uniform_(0.5, 1.5)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)
        for name_ in ("cls_token", "dist_token", "reg_token"):
            t = getattr(model, name_, None)
            if t is not None:
                t.normal_()
    return model.to(dtype).eval()


# A tiny Swin (timm's SwinTransformer): 64 px in 4 px patches, three stages on 16x16, 8x8 and 4x4 grids, windows of
# 7: stages 1 and 2 pad their grids to whole windows and have shifted blocks with their mask, stage 3 fits one window
# of 4 (timm clamps it, without a shift).
TINY_SWIN = dict(img_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), num_classes=10)


def make_swin(name: str = "swin_tiny_patch4_window7_224", dtype=torch.float64, seed: int = 0, **overrides
              ) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**TINY_SWIN, **overrides})
    with torch.no_grad():  # non-trivial norms, biases and relative-position biases: every weight matters
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.2, 0.2)
            if hasattr(m, "relative_position_bias_table"):
                m.relative_position_bias_table.normal_()
    return model.to(dtype).eval()


def images_for(model, batch: int = 3, dtype=torch.float64):
    h, w = model.patch_embed.img_size
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, h, w, generator=g).to(dtype)


def randomize_gates(model, seed: int = 2, token_range: float = 2.0) -> None:
    import vitslim
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in vitslim.gates(model):
            for p, (lo, hi) in ((gate.attn, (-1.5, 1.5)), (gate.mlp, (-1.5, 1.5)),
                                (gate.tokens, (-token_range, token_range))):
                p.copy_(torch.empty(p.shape).uniform_(lo, hi, generator=g).to(p.dtype))


def saturate_token_gates(model) -> None:
    import vitslim
    with torch.no_grad():
        for gate in vitslim.gates(model):
            gate.tokens.fill_(30.0)  # tanh(30) == 1.0 in float64


def searchable_copy(model, **kwargs):
    import vitslim
    return vitslim.make_searchable(copy.deepcopy(model), **kwargs)

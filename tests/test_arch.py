"""Which timm models vitslim accepts, and the error each refused feature gets."""
import pytest
import timm
import torch
from timm.layers import GluMlp
from timm.models.vision_transformer import ResPostBlock

import vitslim
from vitslim.errors import UnsupportedModelError
from vitslim.families.vit import build, describe

from .tiny_models import TINY, make_vit

SUPPORTED = [  # (timm name, prefix tokens, patches)
    ("deit_tiny_patch16_224", 1, 196), ("deit_small_patch16_224", 1, 196), ("deit_base_patch16_224", 1, 196),
    ("deit_small_distilled_patch16_224", 2, 196), ("deit_base_distilled_patch16_224", 2, 196),
    ("vit_small_patch16_224", 1, 196), ("vit_base_patch16_224", 1, 196),
    ("vit_base_patch16_reg4_gap_256", 4, 256), ("deit_base_patch16_384", 1, 576),
]


@pytest.mark.parametrize("name, prefix, patches", SUPPORTED)
def test_supported_models_describe_build_and_search(name, prefix, patches):
    with torch.device("meta"):
        model = timm.create_model(name)
    arch = describe(model)
    assert (arch.num_prefix_tokens, arch.num_patches) == (prefix, patches) == (model.num_prefix_tokens, patches)
    # build() reproduces the structure exactly: same parameter names and shapes.
    with torch.device("meta"):
        rebuilt = build(arch)
    assert type(rebuilt) is type(model)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert describe(rebuilt) == arch
    vitslim.make_searchable(model)
    assert vitslim.gates(model)[0].tokens.shape == (patches,)


@pytest.mark.parametrize("fused_attn", [True, False])
def test_timm_fused_attn_setting_is_accepted(fused_attn):
    model = make_vit(fused_attn=fused_attn)
    assert describe(model).num_heads == 3


def _tiny(**kw):
    return timm.create_model("vit_small_patch16_224", **{**TINY, **kw})


def _with_gated_attention():
    model = _tiny()
    model.blocks[1].attn.gate = torch.nn.Linear(48, 48)
    return model


@pytest.mark.parametrize("make, message", [
    (lambda: timm.create_model("resnet18"), "supports timm VisionTransformer models .* got ResNet"),
    (lambda: torch.nn.Linear(4, 4), "got Linear"),
    (lambda: timm.create_model("eva02_tiny_patch14_224"), "got Eva"),
    (lambda: _tiny(qk_norm=True), "qk_norm is not supported"),
    (_with_gated_attention, "block 1: gated attention is not supported"),
    (lambda: _tiny(mlp_layer=GluMlp), "unsupported MLP GluMlp"),
    (lambda: _tiny(dynamic_img_size=True), "dynamic image size"),
    (lambda: _tiny(global_pool="map"), "attention pooling"),
    (lambda: _tiny(patch_drop_rate=0.1), "patch dropout"),
    (lambda: _tiny(block_fn=ResPostBlock), "block 0 is a ResPostBlock"),
    (lambda: _tiny(act_layer="silu"), "unsupported MLP activation SiLU"),
])
def test_unsupported_models_are_refused_by_name(make, message):
    model = make()
    with pytest.raises(UnsupportedModelError, match=message):
        vitslim.make_searchable(model)
    if hasattr(model, "blocks"):
        assert not any(hasattr(b, "gates") for b in model.blocks)  # refused before anything changed

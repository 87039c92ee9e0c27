"""slim() builds the physically smaller model of docs/design.md section 4 and computes the right function."""
import pytest
import torch

import vitslim
from vitslim.plan import SlimPlan

from .reference_vit import plan_gates, reference_forward
from .tiny_models import images_for, make_vit, randomize_gates, saturate_token_gates, searchable_copy

BUDGETS = [(1.0, 1.0, 1.0), (0.5, 0.6, 0.7), (0.3, 0.2, 0.4)]


@pytest.mark.parametrize("fold", [False, True])
def test_full_budget_gives_back_the_timm_model(variant, fold):
    name, overrides = variant
    dense = make_vit(name, **overrides)
    x = images_for(dense)
    model = searchable_copy(dense)
    saturate_token_gates(model)
    plan = vitslim.threshold(model, 1.0, 1.0, 1.0)
    slim = vitslim.slim(model, plan, fold_gates=fold)
    torch.testing.assert_close(slim(x), dense(x), rtol=0, atol=1e-12)
    assert vitslim.count_params(slim) == vitslim.count_params(dense)


@pytest.mark.parametrize("search", ["dims", "heads", "uniform"])
@pytest.mark.parametrize("budgets", BUDGETS[1:])
@pytest.mark.parametrize("fold", [False, True])
def test_slim_equals_search_model_with_pruned_entries_removed(variant, search, budgets, fold):
    name, overrides = variant
    model = searchable_copy(make_vit(name, **overrides), search=search)
    randomize_gates(model)
    plan = vitslim.threshold(model, *budgets)
    slim = vitslim.slim(model, plan, fold_gates=fold)
    x = images_for(model)
    attn, mlp, tok, kept = plan_gates(plan, vitslim.gates(model), fold=fold)
    expected = reference_forward(model, x, attn, mlp, tok, kept_tokens=kept)
    torch.testing.assert_close(slim(x), expected, rtol=0, atol=1e-12)
    # Really smaller, and the tokens really go.
    assert vitslim.count_params(slim) < vitslim.count_params(model)
    assert any(b.gather_index is not None for b in slim.blocks)


def _manual_plan(model, heads, mlp, tokens):
    arch = vitslim.families.vit.describe(model)
    return SlimPlan.from_dict({
        "version": 1, "embed_dim": arch.embed_dim, "num_heads": arch.num_heads, "head_dim": arch.head_dim,
        "mlp_hidden": arch.mlp_hidden, "num_prefix_tokens": arch.num_prefix_tokens,
        "num_patches": arch.num_patches, "search": "dims", "budgets": {"attn": 0.5, "mlp": 0.5, "tokens": 0.5},
        "blocks": [{"heads": h, "mlp": m, "tokens": t} for h, m, t in zip(heads, mlp, tokens)]})


def test_zero_width_heads_zero_mlp_and_only_prefix_tokens_left():
    dense = make_vit("deit_small_distilled_patch16_224")  # two prefix tokens
    heads = [[list(range(0, 16, 3)), [], [5]], [[], [], []], [[1, 2, 3], list(range(16)), [0]]]
    mlp = [list(range(0, 192, 7)), [], [4, 9]]
    tokens = [list(range(16)), [1, 5, 6, 11], []]  # the last block keeps only the prefix tokens
    plan = _manual_plan(dense, heads, mlp, tokens)
    slim = vitslim.slim(dense, plan)
    x = images_for(dense)
    attn, mlp_g, tok, kept = plan_gates(plan, fold=False)
    expected = reference_forward(dense, x, attn, mlp_g, tok, kept_tokens=kept)
    out = slim(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert slim.blocks[1].attn.head_dims == (0, 0, 0) and slim.blocks[1].mlp.fc1.out_features == 0
    assert slim.blocks[2].gather_index.tolist() == [0, 1]
    # Training through empty branches works: every parameter that reaches the output gets a finite
    # gradient. Block 1 keeps no attention dim and no MLP unit, so its norms feed nothing.
    slim.train()
    slim(x).sum().backward()
    dead = {"blocks.1.norm1.weight", "blocks.1.norm1.bias", "blocks.1.norm2.weight", "blocks.1.norm2.bias"}
    for n, p in slim.named_parameters():
        if p.numel() == 0 or n in dead:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_slim_gradients_are_the_kept_slices_of_the_masked_model_gradients():
    # Retraining the slim model = retraining the paper's masked model, restricted to what is kept.
    model = searchable_copy(make_vit())
    randomize_gates(model)
    plan = vitslim.threshold(model, 0.5, 0.5, 0.6)
    slim = vitslim.slim(model, plan, fold_gates=False)
    x = images_for(model)
    attn, mlp, tok, kept = plan_gates(plan, fold=False)
    params = dict(model.named_parameters())
    ref = reference_forward(model, x, attn, mlp, tok, kept_tokens=kept)
    ref.sum().backward()
    slim(x).sum().backward()
    d = plan.head_dim
    for l, b in enumerate(plan.blocks):
        cols = [h * d + j for h, dims in enumerate(b.heads) for j in dims]
        rows = [part * plan.num_heads * d + c for part in range(3) for c in cols]
        sb, p = slim.blocks[l], f"blocks.{l}."
        torch.testing.assert_close(sb.attn.qkv.weight.grad, params[p + "attn.qkv.weight"].grad[rows])
        torch.testing.assert_close(sb.attn.qkv.bias.grad, params[p + "attn.qkv.bias"].grad[rows])
        torch.testing.assert_close(sb.attn.proj.weight.grad, params[p + "attn.proj.weight"].grad[:, cols])
        torch.testing.assert_close(sb.mlp.fc1.weight.grad, params[p + "mlp.fc1.weight"].grad[list(b.mlp)])
        torch.testing.assert_close(sb.mlp.fc2.weight.grad, params[p + "mlp.fc2.weight"].grad[:, list(b.mlp)])
        torch.testing.assert_close(sb.norm1.weight.grad, params[p + "norm1.weight"].grad)
    torch.testing.assert_close(slim.patch_embed.proj.weight.grad, params["patch_embed.proj.weight"].grad)


def test_slim_shapes_follow_the_plan_and_share_nothing_with_the_search_model():
    model = searchable_copy(make_vit())
    randomize_gates(model)
    plan = vitslim.threshold(model, 0.5, 0.5, 0.5)
    slim = vitslim.slim(model, plan)
    for sb, b in zip(slim.blocks, plan.blocks):
        assert sb.attn.head_dims == b.head_dims
        assert sb.attn.qkv.weight.shape == (3 * sum(b.head_dims), 48)
        assert sb.attn.proj.weight.shape == (48, sum(b.head_dims))
        assert sb.mlp.fc1.weight.shape == (len(b.mlp), 48) and sb.mlp.fc2.weight.shape == (48, len(b.mlp))
        assert not hasattr(sb, "gates")
    search_storage = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in search_storage for p in slim.parameters())
    assert slim.training == model.training and next(slim.parameters()).dtype == torch.float64


def test_slim_of_a_plain_timm_model_and_its_errors():
    dense = make_vit()
    search = searchable_copy(dense)
    randomize_gates(search)
    plan = vitslim.threshold(search, 0.5, 0.5, 1.0)
    slim = vitslim.slim(dense, plan)  # a plan applies to the plain model too (gates taken as 1)
    assert vitslim.count_params(slim) < vitslim.count_params(dense)
    with pytest.raises(ValueError, match="fold_gates=True needs a searchable model"):
        vitslim.slim(dense, plan, fold_gates=True)
    with pytest.raises(TypeError, match="plan must be a SlimPlan"):
        vitslim.slim(dense, plan.to_dict())
    other = make_vit(embed_dim=96)
    with pytest.raises(vitslim.PlanMismatchError, match="embed_dim=48 \\(model: 96\\)"):
        vitslim.slim(other, plan)
    deeper = make_vit(depth=4)
    with pytest.raises(vitslim.PlanMismatchError, match="depth=3 \\(model: 4\\)"):
        vitslim.slim(deeper, plan)


def test_implementation_keyword_of_slim_and_load_slim(tmp_path):
    """slim/load_slim take implementation="reference" | "fused" (fused=True is "fused"); each block's ragged
    attention then lets dispatch choose (None) or keeps the reference."""
    search = searchable_copy(make_vit())
    plan = vitslim.threshold(search, 0.5, 0.5, 1.0)
    attn = lambda m: {b.attn.implementation for b in m.blocks}  # noqa: E731
    assert attn(vitslim.slim(search, plan, implementation="fused")) == attn(vitslim.slim(search, plan, fused=True)) \
        == {None}
    model = vitslim.slim(search, plan)
    assert attn(model) == {"reference"}
    vitslim.save_slim(model, tmp_path / "slim")
    assert attn(vitslim.load_slim(tmp_path / "slim", implementation="fused")) == {None}
    with pytest.raises(ValueError, match="implementation must be one of 'reference', 'fused', got 'folded'"):
        vitslim.slim(search, plan, implementation="folded")

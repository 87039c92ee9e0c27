"""Parameter and MAC counts: the paper's tables, an analytic count from the plan, and torch's FLOP counter."""
import pytest
import timm
import torch

import vitslim

from .flop_counter import torch_flops
from .tiny_models import images_for, make_vit, randomize_gates, searchable_copy


@pytest.mark.parametrize("name, params, gmacs", [
    ("deit_small_patch16_224", 22.05e6, 4.6),    # paper: 22.0M / 4.6G (DeiT: 22M)
    ("deit_base_patch16_224", 86.6e6, 17.6),     # paper: 86.6M / 17.5-17.6G
])
def test_paper_counts(name, params, gmacs):
    with torch.device("meta"):  # counting needs shapes only
        model = timm.create_model(name)
    assert vitslim.count_params(model) == pytest.approx(params, rel=5e-4)
    assert vitslim.count_flops(model) / 1e9 == pytest.approx(gmacs, abs=0.05)
    # Searching adds gates but no deployable parameters or MACs.
    model = vitslim.make_searchable(model)
    assert vitslim.count_params(model) == pytest.approx(params, rel=5e-4)
    assert vitslim.count_flops(model, batch_size=2) == 2 * vitslim.count_flops(model)


def _analytic_from_plan(plan, arch):
    """Params and MACs of the slim model, from the plan alone."""
    C, R, P = arch.embed_dim, arch.num_prefix_tokens, arch.num_patches
    patch = arch.in_chans * arch.patch_size[0] * arch.patch_size[1]
    params = patch * C + C + C * (R + P) + C * arch.num_prefix_tokens  # patch embed, pos embed, prefix tokens
    params += 2 * C + (C + 1) * arch.num_classes * (2 if arch.distilled else 1)  # final norm, head(s)
    macs = P * patch * C + C * arch.num_classes * (2 if arch.distilled else 1)
    for b in plan.blocks:
        w, m, n = b.attn_width, len(b.mlp), R + len(b.tokens)
        params += 4 * C + (C * 3 * w + 3 * w) + (w * C + C) + (C * m + m) + (m * C + C)
        macs += n * (C * 3 * w + w * C + C * m + m * C) + 2 * n * n * w
    return params, macs


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_slim_counts_equal_the_analytic_count_from_the_plan(name):
    model = searchable_copy(make_vit(name))
    randomize_gates(model)
    plan = vitslim.threshold(model, 0.5, 0.7, 0.6)
    slim = vitslim.slim(model, plan)
    params, macs = _analytic_from_plan(plan, vitslim.families.vit.describe(make_vit(name)))
    assert vitslim.count_params(slim) == params
    assert vitslim.count_flops(slim, batch_size=3) == 3 * macs


@pytest.mark.parametrize("kind", ["dense", "searchable", "slim"])
def test_count_flops_agrees_with_torch_flop_counter(kind):
    model = make_vit()
    if kind != "dense":
        model = searchable_copy(model)
        randomize_gates(model)
    if kind == "slim":
        model = vitslim.slim(model, vitslim.threshold(model, 0.6, 0.6, 0.5))
    x = images_for(model, batch=2)
    assert torch_flops(model, x) == 2 * vitslim.count_flops(model, batch_size=2)  # FLOPs = 2 MACs


def test_count_flops_bad_input():
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        vitslim.count_flops(make_vit(), batch_size=0)
    with pytest.raises(ValueError, match="count_flops needs .*timm VisionTransformer.* got Linear"):
        vitslim.count_flops(torch.nn.Linear(2, 2))

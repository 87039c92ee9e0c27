"""The model-family seam (docs/design.md section 8): the registry, and what every registered family must do.

A new family (vitslim/families/<name>.py and its line in FAMILIES) adds its tiny model to SAMPLES; the contract
tests below then check it against the family-agnostic library: its arch round-trips and rebuilds, its blocks match
its widths, the plan cost (PlanCost: one formula) equals the slim model's counted MACs and parameters, and a plan
keeping everything gives a slim model that computes what the searchable model computes.
"""
from __future__ import annotations

import pytest
import torch

import vitslim
from vitslim.families import FAMILIES, Family, family_named, family_of
from vitslim.families.base import block_macs, block_terms
from vitslim.planning import PlanCost

from .tiny_models import images_for, make_swin, make_vit, randomize_gates, saturate_token_gates, searchable_copy

# A tiny real model of every registered family (float64, eval).
SAMPLES = {
    "vit": lambda: make_vit("deit_small_distilled_patch16_224"),
    "swin": make_swin,
}


def test_every_registered_family_has_a_sample_model():
    assert set(SAMPLES) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name and family_named(name) is family


def test_family_of_names_what_is_supported():
    with pytest.raises(vitslim.UnsupportedModelError,
                       match=r"vitslim supports timm VisionTransformer .*; timm SwinTransformer .* got Linear"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unknown model family 'swin2'; accepted: 'vit', 'swin'"):
        family_named("swin2")


def test_the_cost_formula():
    # T tokens, W attention width, M units, S keys per query: T * (4WC + 2MC) + 2 T S W.
    assert block_terms(10, 20, 7) == (7, 70, 140, 490)
    assert block_terms(10, 20, 7, window=3) == (7, 70, 140, 210)
    assert block_macs(4, 10, 20, 7) == 7 * (4 * 10 * 4 + 2 * 20 * 4) + 2 * 7 * 7 * 10
    assert block_macs(4, 10, 20, 7, window=3) == 7 * (4 * 10 * 4 + 2 * 20 * 4) + 2 * 7 * 3 * 10


@pytest.fixture(scope="module", params=sorted(SAMPLES))
def sample(request):
    dense = SAMPLES[request.param]()
    return FAMILIES[request.param], dense


def test_arch_round_trips_and_rebuilds(sample):
    family, dense = sample
    assert family_of(dense) is family
    arch = family.describe(dense)
    assert arch.family == family.name
    assert family.arch_from_dict(arch.to_dict()) == arch
    assert family.describe(family.build(arch)) == arch
    assert len(arch.block_widths()) == len(family.blocks(dense))
    meta = family.build_meta(arch)
    assert all(p.is_meta for p in meta.parameters())
    assert vitslim.count_flops(meta) == vitslim.count_flops(dense)


def test_plan_cost_is_what_the_slim_model_counts(sample):
    family, dense = sample
    model = searchable_copy(dense)
    assert family_of(model) is family and family.describe(model) == family.describe(dense)
    randomize_gates(model)
    cost = PlanCost(model, family.describe(model))
    assert cost.dense == {"flops": vitslim.count_flops(dense), "params": vitslim.count_params(dense)}
    token_gates = any("tokens" in w.gates for w in family.describe(model).block_widths())
    for budgets in ((1.0, 1.0, 1.0), (0.6, 0.5, 0.7), (0.2, 0.3, 0.4)):
        plan = vitslim.threshold(model, *budgets[:3 if token_gates else 2])
        assert plan.family == family.name
        small = vitslim.slim(model, plan)
        assert family_of(small) is family
        assert cost(plan) == {"flops": vitslim.count_flops(small), "params": vitslim.count_params(small)}, budgets


def test_a_plan_keeping_everything_computes_the_searchable_model(sample):
    family, dense = sample
    model = searchable_copy(dense)
    saturate_token_gates(model)
    plan = vitslim.threshold(model, 1.0, 1.0, 1.0)
    small = vitslim.slim(model, plan, fold_gates=True)
    x = images_for(dense)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-10)
        torch.testing.assert_close(small(x), dense(x), rtol=0, atol=1e-10)
    assert small.slim_plan == plan and small.slim_arch == family.describe(dense)

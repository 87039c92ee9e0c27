"""Targets and hardware-aligned widths (vitslim.plan_for, vitslim.align_plan), pinned against brute force on tiny
models: the analytic cost against count_flops / count_params of the built slim model, the target search against a
scan of every step, the alignment against every aligned allocation of the same size."""
import itertools
import json

import pytest
import torch

import vitslim
from vitslim.planning import Alignment, PlanCost, TargetError, align_plan, plan_for
from vitslim.threshold import gate_ranking

from .tiny_models import VARIANTS, make_vit, randomize_gates


def searchable(variant: str = "deit", search: str = "dims", seed: int = 0, **overrides):
    name, extra = VARIANTS[variant]
    model = vitslim.make_searchable(make_vit(name, dtype=torch.float32, seed=seed, **{**extra, **overrides}),
                                    search=search)
    randomize_gates(model, seed=seed + 5)
    return model


def slim_cost(model, plan) -> dict:
    slim = vitslim.slim(model, plan)
    return {"flops": vitslim.count_flops(slim), "params": vitslim.count_params(slim)}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("search", ["dims", "heads", "uniform"])
def test_analytic_cost_is_the_slim_models_count(variant, search):
    model = searchable(variant, search)
    cost = PlanCost(model, gate_ranking(model).arch)
    for budgets in ((1.0, 1.0, 1.0), (0.7, 0.7, 0.7), (0.3, 0.9, 0.5), (0.05, 0.05, 0.05)):
        plan = vitslim.threshold(model, *budgets)
        assert cost(plan) == slim_cost(model, plan), budgets


def _scan(model, kind: str, goal: float, mix=(1, 1, 1)):
    """The first step along the mix whose plan, built and counted, is within the goal: every step tried."""
    ranking = gate_ranking(model)
    counts = ranking.counts()
    mix = dict(zip(("attn", "mlp", "tokens"), mix))
    lead = max((k for k in mix if mix[k] > 0), key=lambda k: (mix[k], counts[k]))
    for step in range(counts[lead]):
        fraction = (step + 0.5) / counts[lead]
        budgets = [1.0 - fraction * mix[k] / mix[lead] if mix[k] else 1.0 for k in ("attn", "mlp", "tokens")]
        plan = vitslim.threshold(model, *budgets)
        if slim_cost(model, plan)[kind] <= goal:
            return step, plan
    raise AssertionError("no step meets the goal")


@pytest.mark.parametrize("kind,fraction,mix", [("flops", 0.6, (1, 1, 1)), ("params", 0.5, (1, 1, 1)),
                                               ("flops", 0.75, (1, 1, 0)), ("flops", 0.8, (0, 0, 1)),
                                               ("params", 0.7, (1, 0.5, 0))])
def test_a_target_gives_the_largest_plan_within_it(kind, fraction, mix):
    model = searchable(depth=2)
    dense = slim_cost(model, vitslim.threshold(model, 1.0, 1.0, 1.0))[kind]
    plan = plan_for(model, **{kind: fraction}, mix=mix)
    step, expected = _scan(model, kind, fraction * dense, mix)
    assert plan.blocks == expected.blocks and plan.target["step"] == step
    met = slim_cost(model, plan)
    assert met[kind] <= fraction * dense and plan.target["met"] == met[kind]
    assert plan.target["fraction_of_dense"] == pytest.approx(met[kind] / dense)
    for k, m in zip(("attn", "mlp", "tokens"), mix):  # a 0 in the mix keeps that kind whole
        if m == 0:
            assert plan.budgets[k] == 1.0 and plan.kept_fractions()[k] == 1.0
    # An absolute target is the same as its fraction.
    same = plan_for(model, **{kind: fraction * dense}, mix=mix)
    assert same.blocks == plan.blocks


def _brute_force_alignment(importance: list[torch.Tensor], rows_per_block: list[int], multiple: int,
                           chunks: int) -> float:
    """The most gate magnitude any aligned choice with `chunks` chunks keeps: each row keeps its top c*multiple
    entries for every combination of c."""
    rows = [imp.reshape(rows_per_block[b], -1)[r] for b, imp in enumerate(importance) for r in range(rows_per_block[b])]
    best = None
    width = rows[0].numel()
    for alloc in itertools.product(range(width // multiple + 1), repeat=len(rows)):
        if sum(alloc) != chunks:
            continue
        total = sum(float(row.sort(descending=True).values[: c * multiple].sum()) for row, c in zip(rows, alloc))
        best = total if best is None else max(best, total)
    return best


def test_alignment_keeps_the_most_gate_magnitude_of_any_aligned_plan():
    model = searchable(depth=2, embed_dim=8, num_heads=2, mlp_ratio=1.0)  # heads of 4 dims, MLP of 8 units
    ranking = gate_ranking(model)
    for budgets in ((0.7, 0.7, 1.0), (0.4, 0.55, 1.0), (0.9, 0.2, 1.0)):
        plan = vitslim.threshold(model, *budgets)
        aligned = align_plan(model, plan, Alignment(head=2, mlp=4))
        for block in aligned.blocks:
            assert all(w % 2 == 0 for w in block.head_dims) and len(block.mlp) % 4 == 0
        attn_kept = sum(b.attn_width for b in plan.blocks)
        mlp_kept = sum(len(b.mlp) for b in plan.blocks)
        assert sum(b.attn_width for b in aligned.blocks) == 2 * round(attn_kept / 2 + 1e-9)
        ours_attn = sum(float(ranking.attn[i][h, list(d)].sum()) for i, b in enumerate(aligned.blocks)
                        for h, d in enumerate(b.heads))
        ours_mlp = sum(float(ranking.mlp[i][list(b.mlp)].sum()) for i, b in enumerate(aligned.blocks))
        best_attn = _brute_force_alignment(ranking.attn, [2, 2], 2, sum(b.attn_width for b in aligned.blocks) // 2)
        best_mlp = _brute_force_alignment(ranking.mlp, [1, 1], 4, sum(len(b.mlp) for b in aligned.blocks) // 4)
        assert ours_attn == pytest.approx(best_attn, rel=1e-12) and ours_mlp == pytest.approx(best_mlp, rel=1e-12)
        assert abs(sum(len(b.mlp) for b in aligned.blocks) - mlp_kept) <= 2  # rounding only
        # What moved, recomputed from the two plans.
        before = {(i, h, d) for i, b in enumerate(plan.blocks) for h, ds in enumerate(b.heads) for d in ds}
        after = {(i, h, d) for i, b in enumerate(aligned.blocks) for h, ds in enumerate(b.heads) for d in ds}
        moved = sum(float(ranking.attn[i][h, d]) for i, h, d in before ^ after)
        kept = sum(float(ranking.attn[i][h, d]) for i, h, d in before)
        assert aligned.alignment["attn_moved_fraction"] == pytest.approx(moved / kept if kept else 0.0)
        assert aligned.blocks[0].tokens == plan.blocks[0].tokens  # tokens are not aligned


def test_aligned_target_still_holds_on_deit_small_shapes():
    model = vitslim.make_searchable(make_vit("deit_small_patch16_224", dtype=torch.float32, img_size=224,
                                             patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                             num_classes=1000))
    randomize_gates(model)
    plan = plan_for(model, flops=3.1e9, align=Alignment(8, 64))
    met = slim_cost(model, plan)
    assert met["flops"] <= 3.1e9 and plan.target["met"] == met["flops"]
    assert met["flops"] > 0.95 * 3.1e9  # within a few entries of the target, not far below it
    for block in plan.blocks:
        assert all(w % 8 == 0 for w in block.head_dims) and len(block.mlp) % 64 == 0
    assert 0 < plan.alignment["attn_moved_fraction"] < 0.2 and 0 < plan.alignment["mlp_moved_fraction"] < 0.2
    assert SlimPlan_roundtrip(plan) == plan


def SlimPlan_roundtrip(plan):
    again = vitslim.SlimPlan.from_json(plan.to_json())
    assert again.target == plan.target and again.alignment == plan.alignment
    return again


def test_heads_mode_widths_are_already_aligned():
    model = searchable(search="heads")
    plan = plan_for(model, flops=0.6, align=Alignment(8, 16))
    for block in plan.blocks:
        assert all(w in (0, 16) for w in block.head_dims) and len(block.mlp) % 16 == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(flops=0.5, params=0.5), "exactly one target"),
    (dict(), "exactly one target"),
    (dict(flops=1.0), "not below the dense model"),
    (dict(flops=1e12), "not below the dense model"),
    (dict(flops=1e-6), "below the smallest plan"),
    (dict(params=-1), "positive number"),
    (dict(flops=float("nan")), "positive number"),
    (dict(flops=0.5, mix=(0, 0, 0)), "mix must be"),
    (dict(flops=0.5, mix=(1, -1, 1)), "mix must be"),
    (dict(flops=0.5, align=Alignment(head=3)), "does not divide the head width 16"),
    (dict(flops=0.5, align=Alignment(mlp=7)), "does not divide the MLP width 192"),
    (dict(latency_ms=-2.0), "latency target must be a positive number of milliseconds"),
])
def test_bad_targets_are_one_clear_error(kwargs, match):
    with pytest.raises(TargetError, match=match):
        plan_for(searchable(), **kwargs)


def test_alignment_needs_positive_integers():
    for bad in (0, -8, 2.5, True):
        with pytest.raises(TargetError, match="Alignment.head must be a positive integer"):
            Alignment(head=bad)


def test_old_plan_json_without_target_still_loads():
    plan = vitslim.threshold(searchable(), 0.7, 0.7, 0.7)
    d = plan.to_dict()
    assert "target" not in d and "alignment" not in d
    assert vitslim.SlimPlan.from_json(json.dumps(d)) == plan

"""SlimPlan: JSON form (docs/design.md section 3; version 2 with per-block widths), validation, check_fits,
kept_fractions, summary."""
from __future__ import annotations

import copy
import functools
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import vitslim
from vitslim import BlockPlan, BlockWidths, PlanMismatchError, SlimPlan
from vitslim.families.vit import describe

TOP_KEYS = {"version", "embed_dim", "num_heads", "head_dim", "mlp_hidden", "num_prefix_tokens", "num_patches",
            "search", "budgets", "blocks"}
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)


def small_plan_dict() -> dict:
    """A hand-written valid plan: 3 heads of width 4, MLP 8, 5 patches, 2 blocks."""
    return {"version": 1, "embed_dim": 12, "num_heads": 3, "head_dim": 4, "mlp_hidden": 8,
            "num_prefix_tokens": 1, "num_patches": 5, "search": "dims",
            "budgets": {"attn": 0.7, "mlp": 0.5, "tokens": 0.6},
            "blocks": [{"heads": [[0, 2, 3], [1], []], "mlp": [0, 3, 7], "tokens": [0, 1, 2, 4]},
                       {"heads": [[0, 1, 2, 3], [], [3]], "mlp": [], "tokens": [1, 4]}]}


def small_plan_direct() -> SlimPlan:
    return SlimPlan(embed_dim=12, num_heads=3, head_dim=4, mlp_hidden=8, num_prefix_tokens=1, num_patches=5,
                    search="dims", budgets={"attn": 0.7, "mlp": 0.5, "tokens": 0.6},
                    blocks=(BlockPlan(heads=((0, 2, 3), (1,), ()), mlp=(0, 3, 7), tokens=(0, 1, 2, 4)),
                            BlockPlan(heads=((0, 1, 2, 3), (), (3,)), mlp=(), tokens=(1, 4))))


def _thresholded(search: str) -> SlimPlan:
    """A plan from vitslim.threshold on a tiny searchable ViT with random signed gates."""
    torch.manual_seed(0)
    model = vitslim.make_searchable(timm.create_model("vit_small_patch16_224", **VIT), search=search)
    rng = np.random.default_rng(0)
    for g in vitslim.gates(model):
        for p in (g.attn, g.mlp, g.tokens):
            p.data[...] = torch.as_tensor(rng.uniform(-2.0, 2.0, tuple(p.shape)))
    return vitslim.threshold(model, budget_attn=0.6, budget_mlp=0.45, budget_tokens=0.5)


@pytest.fixture(scope="module", params=["dims", "heads", "uniform"])
def thresholded(request) -> SlimPlan:
    return _thresholded(request.param)


@pytest.fixture(scope="module")
def dims_plan() -> SlimPlan:
    return _thresholded("dims")


# ---------------------------------------------------------------------------------------------------
# Round trips and JSON shape
# ---------------------------------------------------------------------------------------------------
def test_from_dict_builds_the_same_plan_as_the_constructor():
    assert SlimPlan.from_dict(small_plan_dict()) == small_plan_direct()


def test_to_dict_is_exactly_the_design_shape():
    d = small_plan_direct().to_dict()
    assert d == small_plan_dict()
    assert set(d) == TOP_KEYS
    assert d["version"] == 1 and type(d["version"]) is int
    assert d["budgets"] == {"attn": 0.7, "mlp": 0.5, "tokens": 0.6}
    for block in d["blocks"]:
        assert set(block) == {"heads", "mlp", "tokens"}
        assert type(block["heads"]) is list and all(type(h) is list for h in block["heads"])
        assert type(block["mlp"]) is list and type(block["tokens"]) is list


def test_dict_round_trip_is_exact():
    d = small_plan_dict()
    assert SlimPlan.from_dict(d).to_dict() == d
    plan = small_plan_direct()
    assert SlimPlan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("indent", [None, 2])
def test_json_round_trip_is_exact(indent):
    plan = small_plan_direct()
    text = plan.to_json(indent=indent)
    assert json.loads(text) == small_plan_dict()
    again = SlimPlan.from_json(text)
    assert again == plan
    assert again.to_json(indent=indent) == text


def test_thresholded_plan_round_trips_and_has_design_shape(thresholded):
    plan = thresholded
    d = plan.to_dict()
    assert set(d) == TOP_KEYS
    assert d["version"] == 1
    assert d["search"] == plan.search
    assert d["budgets"] == {"attn": 0.6, "mlp": 0.45, "tokens": 0.5}
    assert (d["embed_dim"], d["num_heads"], d["head_dim"], d["mlp_hidden"]) == (48, 3, 16, 192)
    assert (d["num_prefix_tokens"], d["num_patches"]) == (1, 16)
    assert len(d["blocks"]) == 3
    for block in d["blocks"]:
        assert len(block["heads"]) == 3
        for lst in [*block["heads"], block["mlp"], block["tokens"]]:
            assert all(type(i) is int for i in lst)
            assert lst == sorted(set(lst))  # ascending, no repeats
    # The random gates must have pruned something of every kind, or this test checks little.
    f = plan.kept_fractions()
    assert 0 < f["attn"] < 1 and 0 < f["mlp"] < 1 and 0 < f["tokens"] < 1

    assert SlimPlan.from_dict(d) == plan
    assert SlimPlan.from_dict(json.loads(json.dumps(d))).to_dict() == d
    assert SlimPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json()) == d


def test_to_dict_returns_a_copy_and_from_dict_does_not_alias_its_input():
    plan = small_plan_direct()
    d = plan.to_dict()
    d["budgets"]["attn"] = 0.1
    d["blocks"][0]["mlp"].append(5)
    assert plan.to_dict() == small_plan_dict()

    src = small_plan_dict()
    loaded = SlimPlan.from_dict(src)
    src["budgets"]["mlp"] = 0.9
    src["blocks"][1]["tokens"].clear()
    assert loaded.to_dict() == small_plan_dict()


def test_plan_is_frozen():
    plan = small_plan_direct()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.num_heads = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.blocks[0].mlp = ()  # type: ignore[misc]


def test_block_plan_widths():
    b = small_plan_direct().blocks
    assert b[0].head_dims == (3, 1, 0) and b[0].attn_width == 4
    assert b[1].head_dims == (4, 0, 1) and b[1].attn_width == 5


# ---------------------------------------------------------------------------------------------------
# Validation in from_dict
# ---------------------------------------------------------------------------------------------------
def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop(key):
    def mutate(d):
        del d[key]
    return mutate


def _drop_block_key(key):
    def mutate(d):
        del d["blocks"][0][key]
    return mutate


# (mutation, substrings the error message must contain)
INVALID = {
    "unsorted mlp": (_set(["blocks", 0, "mlp"], [3, 0, 7]), ["mlp", "[3, 0, 7]"]),
    "repeated mlp": (_set(["blocks", 0, "mlp"], [0, 3, 3]), ["mlp", "[0, 3, 3]"]),
    "unsorted head dims": (_set(["blocks", 0, "heads", 0], [2, 0, 3]), ["head", "[2, 0, 3]"]),
    "repeated head dims": (_set(["blocks", 1, "heads", 2], [3, 3]), ["head", "[3, 3]"]),
    "unsorted tokens": (_set(["blocks", 0, "tokens"], [0, 2, 1, 4]), ["token", "[0, 2, 1, 4]"]),
    "repeated tokens": (_set(["blocks", 0, "tokens"], [0, 1, 1, 4]), ["token", "[0, 1, 1, 4]"]),
    "mlp index == mlp_hidden": (_set(["blocks", 0, "mlp"], [0, 8]), ["mlp", "[0, 8]"]),
    "negative mlp index": (_set(["blocks", 0, "mlp"], [-1, 3]), ["mlp", "-1"]),
    "head dim == head_dim": (_set(["blocks", 0, "heads", 1], [1, 4]), ["head", "[1, 4]"]),
    "negative head dim": (_set(["blocks", 0, "heads", 2], [-2]), ["head", "-2"]),
    "token == num_patches": (_set(["blocks", 0, "tokens"], [0, 1, 2, 5]), ["token", "[0, 1, 2, 5]"]),
    "negative token": (_set(["blocks", 0, "tokens"], [-1, 0, 1]), ["token", "-1"]),
    "too few heads": (_set(["blocks", 0, "heads"], [[0], [1]]), ["heads", "3", "2"]),
    "too many heads": (_set(["blocks", 1, "heads"], [[0], [1], [], [2]]), ["heads", "3", "4"]),
    "version 3": (_set(["version"], 3), ["version", "3"]),
    "version 2 without a family": (_set(["version"], 2), ["family"]),
    "version 0": (_set(["version"], 0), ["version", "0"]),
    "version string": (_set(["version"], "1"), ["version", "'1'"]),
    "missing version": (_drop("version"), ["version"]),
    "missing blocks": (_drop("blocks"), ["blocks"]),
    "missing budgets": (_drop("budgets"), ["budgets"]),
    "missing num_heads": (_drop("num_heads"), ["num_heads"]),
    "missing head_dim": (_drop("head_dim"), ["head_dim"]),
    "block missing tokens": (_drop_block_key("tokens"), ["tokens"]),
    "block missing heads": (_drop_block_key("heads"), ["heads"]),
    "non-monotone tokens": (_set(["blocks", 1, "tokens"], [1, 3]), ["block 1", "token"]),
    "unknown search": (_set(["search"], "channels"), ["search", "'channels'"]),
    "no blocks": (_set(["blocks"], []), ["blocks"]),
    "zero heads": (_set(["num_heads"], 0), ["num_heads", "0"]),
    "non-integer mlp index": (_set(["blocks", 0, "mlp"], [0, 1.5, 7]), ["mlp", "1.5"]),
}


def _stage_widths(embed_dim: int, heads: int, grid: int) -> BlockWidths:
    """Blocks of a windowed model stage: no prefix or token gates, 4-token windows."""
    return BlockWidths(embed_dim=embed_dim, num_heads=heads, head_dim=4, mlp_hidden=2 * embed_dim,
                       num_prefix_tokens=0, num_patches=grid, window=4, gates=("attn", "mlp"))


def two_stage_plan_dict() -> dict:
    """A version 2 plan: a stage of 2 heads (width 8, 16 tokens), then one of 3 heads (width 12, 4 tokens)."""
    first, second = _stage_widths(8, 2, 16).to_dict(), _stage_widths(12, 3, 4).to_dict()
    return {"version": 2, "family": "windowed", "embed_dim": None, "num_heads": None, "head_dim": 4,
            "mlp_hidden": None, "num_prefix_tokens": 0, "num_patches": None, "search": "dims",
            "budgets": {"attn": 0.5, "mlp": 0.5},
            "blocks": [{"heads": [[0, 3], [1]], "mlp": [0, 5, 15], "tokens": [], "widths": first},
                       {"heads": [[], [0, 1, 2, 3], [2]], "mlp": list(range(12)), "tokens": [], "widths": second}]}


INVALID_V2 = {
    "tokens on a block without token gates": (_set(["blocks", 0, "tokens"], [0, 1]),
                                              ["block 0", "no token gates", "[0, 1]"]),
    "heads of the next stage's count": (_set(["blocks", 0, "heads"], [[0], [1], [2]]),
                                        ["block 0", "3 heads", "num_heads=2"]),
    "an mlp unit past its block's width": (_set(["blocks", 0, "mlp"], [0, 16]), ["block 0 mlp", "[0, 16]"]),
    "widths missing": (lambda d: d["blocks"][1].pop("widths"), ["widths"]),
    "widths without num_heads": (lambda d: d["blocks"][1]["widths"].pop("num_heads"), ["block 1 widths"]),
    "an unknown gate kind": (_set(["blocks", 1, "widths", "gates"], ["attn", "channels"]), ["gates", "channels"]),
    "a zero embedding width": (_set(["blocks", 1, "widths", "embed_dim"], 0), ["embed_dim", "0"]),
    "family not a name": (_set(["family"], 3), ["family", "3"]),
    "wrong model-wide width": (_set(["head_dim"], 8), ["head_dim=8", "disagrees"]),
}
CASES = [(small_plan_dict, *case) for case in INVALID.values()] + \
    [(two_stage_plan_dict, *case) for case in INVALID_V2.values()]


@pytest.mark.parametrize("plan_dict, mutate, expected", CASES, ids=list(INVALID) + [f"v2 {k}" for k in INVALID_V2])
def test_from_dict_rejects_invalid_plans(plan_dict, mutate, expected):
    d = plan_dict()
    mutate(d)
    with pytest.raises(ValueError) as info:
        SlimPlan.from_dict(d)
    msg = str(info.value)
    for part in expected:
        assert part in msg, f"{part!r} not in {msg!r}"


@pytest.mark.parametrize("mutate, expected", list(INVALID.values()), ids=list(INVALID))
def test_from_json_rejects_the_same_plans(mutate, expected):
    d = small_plan_dict()
    mutate(d)
    with pytest.raises(ValueError):
        SlimPlan.from_json(json.dumps(d))


def test_monotone_check_accepts_equal_and_shrinking_sets():
    d = small_plan_dict()
    d["blocks"].append(copy.deepcopy(d["blocks"][1]))  # equal to the previous block: allowed
    d["blocks"].append({"heads": [[], [], []], "mlp": [], "tokens": []})  # everything dropped: allowed
    plan = SlimPlan.from_dict(d)
    assert [b.tokens for b in plan.blocks] == [(0, 1, 2, 4), (1, 4), (1, 4), ()]


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", '"plan"'])
def test_from_json_rejects_non_plans(text):
    with pytest.raises(ValueError):
        SlimPlan.from_json(text)


# ---------------------------------------------------------------------------------------------------
# check_fits
# ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _arch_cached(name: str, overrides: tuple):
    return describe(timm.create_model(name, **{**VIT, **dict(overrides)}))


def _arch(name="vit_small_patch16_224", **overrides):
    return _arch_cached(name, tuple(sorted(overrides.items())))


def test_check_fits_accepts_the_model_it_was_made_for(dims_plan):
    assert dims_plan.check_fits(_arch()) is None


# (model overrides, fields the message must name, fields it must not name)
MISMATCHES = {
    "wider": (dict(embed_dim=96), ["embed_dim=48 (model: 96)", "head_dim=16 (model: 32)",
                                   "mlp_hidden=192 (model: 384)"], ["num_heads", "depth", "num_patches"]),
    "shallower": (dict(depth=2), ["depth=3 (model: 2)"], ["embed_dim", "num_heads", "num_patches"]),
    "bigger image": (dict(img_size=48), ["num_patches=16 (model: 36)"], ["embed_dim", "depth", "head_dim"]),
    "more heads": (dict(num_heads=4), ["num_heads=3 (model: 4)", "head_dim=16 (model: 12)"],
                   ["embed_dim", "mlp_hidden", "depth"]),
    "narrower mlp": (dict(mlp_ratio=2.0), ["mlp_hidden=192 (model: 96)"], ["embed_dim", "head_dim", "depth"]),
    "register tokens": (dict(reg_tokens=4), ["num_prefix_tokens=1 (model: 5)"], ["embed_dim", "num_patches"]),
}


@pytest.mark.parametrize("overrides, named, not_named", list(MISMATCHES.values()), ids=list(MISMATCHES))
def test_check_fits_names_the_differing_fields(dims_plan, overrides, named, not_named):
    with pytest.raises(PlanMismatchError) as info:
        dims_plan.check_fits(_arch(**overrides))
    msg = str(info.value)
    for part in named:
        assert part in msg, f"{part!r} not in {msg!r}"
    for field in not_named:
        assert field not in msg, f"{field!r} unexpectedly in {msg!r}"


def test_check_fits_distilled_deit_prefix_tokens(dims_plan):
    arch = _arch("deit_small_distilled_patch16_224")
    assert arch.num_prefix_tokens == 2
    with pytest.raises(PlanMismatchError, match=r"num_prefix_tokens=1 \(model: 2\)"):
        dims_plan.check_fits(arch)


def test_plan_mismatch_error_is_a_value_error():
    assert issubclass(PlanMismatchError, ValueError)
    assert vitslim.PlanMismatchError is PlanMismatchError


# ---------------------------------------------------------------------------------------------------
# kept_fractions and summary
# ---------------------------------------------------------------------------------------------------
def test_kept_fractions_hand_plan():
    f = small_plan_direct().kept_fractions()
    # attn: (3 + 1 + 0) + (4 + 0 + 1) of 2 * 3 * 4; mlp: 3 + 0 of 2 * 8; tokens: 4 + 2 of 2 * 5.
    assert f == {"attn": 9 / 24, "mlp": 3 / 16, "tokens": 6 / 10}


def test_kept_fractions_full_and_empty():
    full = SlimPlan(embed_dim=12, num_heads=3, head_dim=4, mlp_hidden=8, num_prefix_tokens=2, num_patches=5,
                    search="heads", budgets={"attn": 1.0, "mlp": 1.0, "tokens": 1.0},
                    blocks=(BlockPlan(heads=((0, 1, 2, 3),) * 3, mlp=tuple(range(8)), tokens=tuple(range(5))),))
    assert full.kept_fractions() == {"attn": 1.0, "mlp": 1.0, "tokens": 1.0}
    empty = dataclasses.replace(full, blocks=(BlockPlan(heads=((),) * 3, mlp=(), tokens=()),))
    assert empty.kept_fractions() == {"attn": 0.0, "mlp": 0.0, "tokens": 0.0}


def test_kept_fractions_thresholded(thresholded):
    d = thresholded.to_dict()
    attn = sum(len(h) for b in d["blocks"] for h in b["heads"])
    mlp = sum(len(b["mlp"]) for b in d["blocks"])
    tok = sum(len(b["tokens"]) for b in d["blocks"])
    assert thresholded.kept_fractions() == pytest.approx(
        {"attn": attn / (3 * 48), "mlp": mlp / (3 * 192), "tokens": tok / (3 * 16)}, rel=0, abs=1e-15)


def _block_rows(summary: str) -> list[list[str]]:
    """The summary lines that describe a block: those whose first field is an integer."""
    return [line.split() for line in summary.splitlines() if line.split() and line.split()[0].isdigit()]


def test_summary_has_one_line_per_block_hand_plan():
    plan = small_plan_direct()
    text = plan.summary()
    assert isinstance(text, str)
    assert _block_rows(text) == [["0", "3", "1", "0", "3", "4"], ["1", "4", "0", "1", "0", "2"]]


def test_summary_has_one_line_per_block_thresholded(thresholded):
    rows = _block_rows(thresholded.summary())
    assert len(rows) == thresholded.depth == 3
    for i, (row, b) in enumerate(zip(rows, thresholded.blocks)):
        assert row == [str(i), *map(str, b.head_dims), str(len(b.mlp)), str(len(b.tokens))]
    assert thresholded.search in thresholded.summary()


# ---------------------------------------------------------------------------------------------------
# Version 1 files (what earlier releases wrote) and version 2: per-block widths
# ---------------------------------------------------------------------------------------------------
STORED_V1 = Path(__file__).parent / "data" / "plan_v1.json"  # written by vitslim.threshold before version 2


def test_a_stored_version_1_file_loads_and_is_written_back_unchanged():
    text = STORED_V1.read_text()
    plan = SlimPlan.from_json(text)
    assert plan.version == 1 and plan.family == "vit" and plan.widths is None
    assert plan == _thresholded("dims")  # the plan the same threshold makes today
    assert plan.to_json(indent=1) + "\n" == text
    assert plan.block_widths == (BlockWidths(48, 3, 16, 192, 1, 16, 0, ("attn", "mlp", "tokens")),) * 3
    assert plan.block_widths == _arch().block_widths()


def test_version_2_round_trips_blocks_of_different_widths():
    d = two_stage_plan_dict()
    plan = SlimPlan.from_dict(d)
    assert plan.version == 2 and plan.family == "windowed"
    assert [w.embed_dim for w in plan.block_widths] == [8, 12] and plan.num_heads is None and plan.head_dim == 4
    assert plan.to_dict() == d
    assert SlimPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json(indent=2)) == d
    # Without token gates a block keeps every token: its sequence is the whole grid.
    assert [plan.tokens_in(i) for i in range(2)] == [16, 4]
    assert plan.kept_fractions() == {"attn": (3 + 5) / (8 + 12), "mlp": (3 + 12) / (16 + 24), "tokens": 1.0}
    rows = _block_rows(plan.summary())
    assert rows == [["0", "2", "1", "(of", "4)", "3/16", "all"], ["1", "0", "4", "1", "(of", "4)", "12/24", "all"]]


def test_the_constructor_keeps_one_form_of_the_widths():
    """Per-block widths that a version 1 plan holds become the model-wide fields, so a plan compares equal
    however it was made, and is written as version 1."""
    direct = small_plan_direct()
    given = SlimPlan(embed_dim=None, num_heads=None, head_dim=None, mlp_hidden=None, num_prefix_tokens=None,
                     num_patches=None, search=direct.search, budgets=direct.budgets, blocks=direct.blocks,
                     widths=direct.block_widths)
    assert given == direct and given.widths is None and given.version == 1
    assert given.to_dict() == small_plan_dict()
    with pytest.raises(ValueError, match=r"embed_dim=16 disagrees with its blocks' widths \(\[12, 12\]\)"):
        dataclasses.replace(given, embed_dim=16, widths=direct.block_widths)
    with pytest.raises(ValueError, match="a windowed plan needs its blocks' widths"):
        dataclasses.replace(direct, family="windowed")


def test_check_fits_compares_family_and_each_blocks_widths():
    plan = SlimPlan.from_dict(two_stage_plan_dict())

    @dataclasses.dataclass(frozen=True)
    class Arch:  # what a family's description of a model offers check_fits
        family: str
        widths: tuple

        def block_widths(self):
            return self.widths

    assert plan.check_fits(Arch("windowed", plan.block_widths)) is None
    with pytest.raises(PlanMismatchError, match="the plan is for a windowed model, the model is a vit model"):
        plan.check_fits(Arch("vit", plan.block_widths))
    other = (plan.block_widths[0], dataclasses.replace(plan.block_widths[1], mlp_hidden=48))
    with pytest.raises(PlanMismatchError, match=r"block 1 mlp_hidden=24 \(model: 48\)"):
        plan.check_fits(Arch("windowed", other))
    with pytest.raises(PlanMismatchError, match=r"plan is for a vit model, the model is a windowed model"):
        small_plan_direct().check_fits(Arch("windowed", plan.block_widths))

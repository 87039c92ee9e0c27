"""vitslim.threshold against an independent reference written from docs/design.md section 3.

The reference works on plain Python / numpy copies of the gate values and evaluates the budget
formula thr = sorted[floor((1 - budget) * n)] exactly (fractions.Fraction of the float budget), so a
float rounding slip in the library shows up as a difference instead of being reproduced.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import timm
import torch
from torch import nn

import vitslim

MODES = ("dims", "heads", "uniform")
# Tiny ViT: embed 48, 3 heads of width 16, MLP 192, 16 patches, 1 prefix token, 3 blocks.
VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=10)
H, D, M, P, DEPTH = 3, 16, 192, 16, 3
ATTN_SHAPE = {"dims": (H, D), "heads": (H, 1), "uniform": (1, D)}


def tiny_vit(**overrides) -> nn.Module:
    return timm.create_model("vit_small_patch16_224", **{**VIT, **overrides})


@pytest.fixture(scope="module")
def _cached_models() -> dict:
    torch.manual_seed(0)
    return {mode: vitslim.make_searchable(tiny_vit(), search=mode) for mode in MODES}


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def model(_cached_models, mode) -> nn.Module:
    """A searchable tiny ViT of `mode` with every gate reset to its documented init (1, 1, 3)."""
    m = _cached_models[mode]
    for g in vitslim.gates(m):
        g.attn.data.fill_(1.0)
        g.mlp.data.fill_(1.0)
        g.tokens.data.fill_(3.0)
    return m


# ---------------------------------------------------------------------------------------------------
# Independent reference (docs/design.md section 3)
# ---------------------------------------------------------------------------------------------------
def ref_kept_count_formula(n: int, budget: float) -> int:
    """Entries kept when all n importances are distinct: n - floor((1 - budget) * n), exactly."""
    return n - math.floor((1 - Fraction(budget)) * n)


def ref_keep(importances: list[np.ndarray], budget: float) -> list[np.ndarray]:
    """Global ranking over all blocks: keep importance >= sorted[floor((1 - budget) * n)]."""
    flat = sorted(float(v) for imp in importances for v in imp.ravel())
    thr = flat[math.floor((1 - Fraction(budget)) * len(flat))]
    return [imp >= thr for imp in importances]


def ref_blocks(model: nn.Module, b_attn: float, b_mlp: float, b_tok: float) -> list[dict]:
    """The expected plan "blocks" list, built from the gate values only."""
    gs = vitslim.gates(model)
    attn = [np.abs(g.attn.detach().double().numpy()) for g in gs]
    mlp = [np.abs(g.mlp.detach().double().numpy()) for g in gs]
    tok = [np.abs(np.tanh(g.tokens.detach().double().numpy())) for g in gs]
    ka, km, kt = ref_keep(attn, b_attn), ref_keep(mlp, b_mlp), ref_keep(tok, b_tok)
    heads_n, dims_n = gs[0].num_heads, gs[0].head_dim
    depth, patches = len(gs), tok[0].size
    out = []
    for l in range(depth):
        gate = ka[l]
        heads = []
        for h in range(heads_n):
            row = gate[0] if gate.shape[0] == 1 else gate[h]  # "uniform": one row shared by all heads
            heads.append([j for j in range(dims_n) if (row[0] if row.size == 1 else row[j])])  # "heads": one per head
        # Monotone tokens: patch p is kept at block l iff some block l' >= l keeps it on its own.
        tokens = [p for p in range(patches) if any(kt[m][p] for m in range(l, depth))]
        out.append({"heads": heads, "mlp": [u for u in range(mlp[l].size) if km[l][u]], "tokens": tokens})
    return out


def set_gates(model: nn.Module, attn=None, mlp=None, tokens=None) -> None:
    """Set raw gate values; each argument is a list (one array per block) or None to leave as is."""
    for l, g in enumerate(vitslim.gates(model)):
        if attn is not None:
            g.attn.data[...] = torch.as_tensor(np.asarray(attn[l], dtype=np.float64).reshape(g.attn.shape))
        if mlp is not None:
            g.mlp.data[...] = torch.as_tensor(np.asarray(mlp[l], dtype=np.float64))
        if tokens is not None:
            g.tokens.data[...] = torch.as_tensor(np.asarray(tokens[l], dtype=np.float64))


def distinct_signed(rng: np.random.Generator, shape_per_block: tuple, depth: int, step: float) -> list[np.ndarray]:
    """Gate values with pairwise distinct magnitudes over all blocks (multiples of `step`), random signs."""
    size = int(np.prod(shape_per_block))
    mags = (rng.permutation(size * depth) + 1) * step
    signs = rng.choice([-1.0, 1.0], size * depth)
    vals = mags * signs
    return [vals[l * size:(l + 1) * size].reshape(shape_per_block) for l in range(depth)]


def randomise(model: nn.Module, mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    set_gates(model,
              attn=distinct_signed(rng, ATTN_SHAPE[mode], DEPTH, 2.0 ** -8),
              mlp=distinct_signed(rng, (M,), DEPTH, 2.0 ** -10),
              tokens=distinct_signed(rng, (P,), DEPTH, 0.04))  # |raw| <= 1.92: tanh far from saturation


def blocks_of(plan) -> list[dict]:
    return plan.to_dict()["blocks"]


def all_kept(mode: str) -> list[dict]:
    return [{"heads": [list(range(D))] * H, "mlp": list(range(M)), "tokens": list(range(P))}] * DEPTH


def attn_entries(block: dict, mode: str) -> int:
    """Kept attention entries of a plan block in units of the mode's gate (dims, heads or shared dims)."""
    widths = [len(h) for h in block["heads"]]
    if mode == "heads":
        return sum(w == D for w in widths)
    if mode == "uniform":
        return widths[0]
    return sum(widths)


# ---------------------------------------------------------------------------------------------------
# Gate shapes and plan metadata
# ---------------------------------------------------------------------------------------------------
def test_gate_shapes_per_mode(model, mode):
    gs = vitslim.gates(model)
    assert len(gs) == DEPTH
    for g in gs:
        assert tuple(g.attn.shape) == ATTN_SHAPE[mode]
        assert tuple(g.mlp.shape) == (M,)
        assert tuple(g.tokens.shape) == (P,)


def test_plan_metadata(model, mode):
    plan = vitslim.threshold(model, budget_attn=0.7, budget_mlp=0.5, budget_tokens=0.25)
    assert isinstance(plan, vitslim.SlimPlan)
    assert (plan.embed_dim, plan.num_heads, plan.head_dim, plan.mlp_hidden) == (48, H, D, M)
    assert (plan.num_prefix_tokens, plan.num_patches, plan.depth) == (1, P, DEPTH)
    assert plan.search == mode
    assert plan.version == 1
    assert plan.budgets == {"attn": 0.7, "mlp": 0.5, "tokens": 0.25}


def test_budget_types_are_normalised_to_float(model):
    plan = vitslim.threshold(model, budget_attn=1, budget_mlp=np.float64(0.5), budget_tokens=np.float32(0.25))
    assert plan.budgets == {"attn": 1.0, "mlp": 0.5, "tokens": 0.25}
    assert all(type(v) is float for v in plan.budgets.values())


def test_threshold_leaves_gates_untouched(model, mode):
    randomise(model, mode, seed=7)
    before = [(g.attn.detach().clone(), g.mlp.detach().clone(), g.tokens.detach().clone())
              for g in vitslim.gates(model)]
    vitslim.threshold(model, 0.5, 0.5, 0.5)
    for (a, m, t), g in zip(before, vitslim.gates(model)):
        assert torch.equal(a, g.attn) and torch.equal(m, g.mlp) and torch.equal(t, g.tokens)


# ---------------------------------------------------------------------------------------------------
# Budgets, counts, ties
# ---------------------------------------------------------------------------------------------------
def test_budget_one_keeps_everything(model, mode):
    randomise(model, mode, seed=1)
    plan = vitslim.threshold(model, 1.0, 1.0, 1.0)
    assert blocks_of(plan) == all_kept(mode)


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.7, 0.95])
def test_equal_gates_keep_everything_at_any_budget(model, mode, budget):
    # Gates at their init values all tie, so the threshold equals every value and >= keeps them all.
    plan = vitslim.threshold(model, budget, budget, budget)
    assert blocks_of(plan) == all_kept(mode)


@pytest.mark.parametrize("budgets", [(0.7, 0.7, 0.7), (0.5, 0.3, 0.25), (0.25, 0.9, 0.5), (0.9, 0.05, 0.75)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_reference_and_count_formula(model, mode, budgets, seed):
    randomise(model, mode, seed)
    b_attn, b_mlp, b_tok = budgets
    plan = vitslim.threshold(model, budget_attn=b_attn, budget_mlp=b_mlp, budget_tokens=b_tok)
    got = blocks_of(plan)
    assert got == ref_blocks(model, b_attn, b_mlp, b_tok)

    # Distinct magnitudes: kept counts are exactly n - floor((1 - budget) * n) per kind.
    n_attn = DEPTH * int(np.prod(ATTN_SHAPE[mode]))
    assert sum(attn_entries(b, mode) for b in got) == ref_kept_count_formula(n_attn, b_attn)
    assert sum(len(b["mlp"]) for b in got) == ref_kept_count_formula(DEPTH * M, b_mlp)
    # Tokens: before the monotone fill the count follows the formula; the fill can only add.
    assert sum(len(b["tokens"]) for b in got) >= ref_kept_count_formula(DEPTH * P, b_tok)


def test_mode_structure_of_heads(model, mode):
    randomise(model, mode, seed=3)
    for block in blocks_of(vitslim.threshold(model, 0.5, 0.5, 0.5)):
        heads = block["heads"]
        assert len(heads) == H
        for dims in heads:
            assert dims == sorted(set(dims)) and all(0 <= j < D for j in dims)
        if mode == "heads":
            assert all(dims in ([], list(range(D))) for dims in heads)
        if mode == "uniform":
            assert heads[0] == heads[1] == heads[2]


def test_heads_mode_keeps_whole_heads_by_magnitude(_cached_models):
    model = _cached_models["heads"]
    # Per block (head 0, head 1, head 2); 9 distinct magnitudes, some negative.
    attn = [[0.1, -0.9, 0.5], [-0.2, 0.3, -0.8], [0.7, -0.4, 0.6]]
    set_gates(model, attn=attn, mlp=[np.ones(M)] * DEPTH, tokens=[np.full(P, 3.0)] * DEPTH)
    # n = 9, budget 0.5: floor(0.5 * 9) = 4 -> thr = 4th smallest |value| (0-based) = 0.5; keep >= 0.5.
    plan = vitslim.threshold(model, 0.5, 1.0, 1.0)
    full = list(range(D))
    assert [b["heads"] for b in blocks_of(plan)] == [
        [[], full, full],
        [[], [], full],
        [full, [], full],
    ]


def test_uniform_mode_shares_dims_across_heads(_cached_models):
    model = _cached_models["uniform"]
    # Block l: dim j has magnitude (l * 16 + j + 1) / 64; odd dims negative.
    attn = [np.array([(l * D + j + 1) / 64 * (-1) ** j for j in range(D)]) for l in range(DEPTH)]
    set_gates(model, attn=attn, mlp=[np.ones(M)] * DEPTH, tokens=[np.full(P, 3.0)] * DEPTH)
    # n = 48, budget 0.25: floor(0.75 * 48) = 36 -> keep the 12 largest: block 2 dims 4..15.
    plan = vitslim.threshold(model, 0.25, 1.0, 1.0)
    got = [b["heads"] for b in blocks_of(plan)]
    assert got == [[[]] * H, [[]] * H, [list(range(4, D))] * H]


@pytest.mark.parametrize("budget, expect_all", [(0.5, False), (0.9, True)])
def test_ties_at_the_threshold_are_all_kept(model, budget, expect_all):
    # 100 MLP units at 0.2 (spread over blocks 0 and 1), the other 476 at -1.0 (magnitude 1.0).
    flat = -np.ones(DEPTH * M)
    flat[np.arange(100) * 3 % 300] = 0.2
    mlp = [flat[l * M:(l + 1) * M] for l in range(DEPTH)]
    set_gates(model, mlp=mlp)
    plan = vitslim.threshold(model, 1.0, budget, 1.0)
    kept = [b["mlp"] for b in blocks_of(plan)]
    if expect_all:
        # floor(0.1 * 576) = 57 < 100: thr = 0.2, every unit ties or beats it.
        assert kept == [list(range(M))] * DEPTH
    else:
        # floor(0.5 * 576) = 288 >= 100: thr = 1.0, all 476 tied units kept (more than half).
        assert kept == [[u for u in range(M) if flat[l * M + u] == -1.0] for l in range(DEPTH)]
        assert sum(map(len, kept)) == 476


# ---------------------------------------------------------------------------------------------------
# Global ranking, magnitudes, empty heads / MLPs
# ---------------------------------------------------------------------------------------------------
def test_ranking_is_global_and_can_empty_a_block(model, mode):
    shape = ATTN_SHAPE[mode]
    size = int(np.prod(shape))
    # Block 0's attention and block 2's MLP are tiny compared with every other gate of their kind.
    attn = [np.full(shape, 1e-3), np.linspace(1.0, 2.0, size).reshape(shape), np.linspace(3.0, 4.0, size).reshape(shape)]
    mlp = [np.linspace(1.0, 2.0, M), np.linspace(3.0, 4.0, M), np.linspace(1e-4, 2e-4, M)]
    set_gates(model, attn=attn, mlp=mlp)
    # budget 2/3: floor((1 - 2/3) * n) = n / 3 exactly one block's worth of entries.
    plan = vitslim.threshold(model, 2 / 3, 2 / 3, 1.0)
    got = blocks_of(plan)
    full = [list(range(D))] * H
    assert [b["heads"] for b in got] == [[[]] * H, full, full]
    assert [b["mlp"] for b in got] == [list(range(M)), list(range(M)), []]
    assert got == ref_blocks(model, 2 / 3, 2 / 3, 1.0)


def test_block_keeps_only_its_single_large_entry(_cached_models):
    model = _cached_models["dims"]
    attn = [np.full((H, D), 0.01), np.full((H, D), 1.0), np.full((H, D), 1.0)]
    attn[0][2, 5] = -5.0  # one strong (negative) entry in an otherwise weak block
    mlp = [np.full(M, 1.0), np.full(M, 1.0), np.full(M, 0.01)]
    mlp[2][191] = 2.0
    set_gates(model, attn=attn, mlp=mlp, tokens=[np.full(P, 3.0)] * DEPTH)
    plan = vitslim.threshold(model, 0.5, 0.5, 1.0)
    got = blocks_of(plan)
    assert got[0]["heads"] == [[], [], [5]]
    assert got[1]["heads"] == got[2]["heads"] == [list(range(D))] * H
    assert [b["mlp"] for b in got] == [list(range(M)), list(range(M)), [191]]


def test_single_head_with_zero_dims_and_mlp_with_zero_units(_cached_models):
    model = _cached_models["dims"]
    rng = np.random.default_rng(5)
    attn = list((1.0 + rng.permutation(DEPTH * H * D) / 64).reshape(DEPTH, H, D))  # distinct over all blocks
    attn[1][2, :] = -np.arange(1, D + 1) / 1000  # head 2 of block 1: the 16 smallest magnitudes
    mlp = list((1.0 + rng.permutation(DEPTH * M) / 256).reshape(DEPTH, M))
    mlp[0][:] = np.arange(1, M + 1) / 1e4  # block 0: the 192 smallest MLP magnitudes
    set_gates(model, attn=attn, mlp=mlp, tokens=[np.full(P, 3.0)] * DEPTH)
    # attn: floor(0.85 * 144) = 122 dropped >= 16; mlp: floor(0.6 * 576) = 345 dropped >= 192.
    plan = vitslim.threshold(model, 0.15, 0.4, 1.0)
    got = blocks_of(plan)
    assert got[1]["heads"][2] == []
    assert got[0]["mlp"] == []
    assert plan.blocks[1].head_dims[2] == 0 and len(plan.blocks[0].mlp) == 0
    assert got == ref_blocks(model, 0.15, 0.4, 1.0)
    assert sum(len(h) for b in got for h in b["heads"]) == 144 - 122
    assert sum(len(b["mlp"]) for b in got) == 576 - 345


def test_magnitude_not_raw_value(model, mode):
    shape = ATTN_SHAPE[mode]
    size = int(np.prod(shape))
    # All gates negative, magnitude growing with the flat index k over (block, entry): raw-value
    # ranking would keep the smallest magnitudes, magnitude ranking keeps the largest.
    attn = [-(np.arange(size) + l * size + 1.0).reshape(shape) / 256 for l in range(DEPTH)]
    mlp = [-(np.arange(M) + l * M + 1.0) / 1024 for l in range(DEPTH)]
    # Tokens: block 0 has the largest |raw|, block 2 the smallest, so the monotone fill adds nothing.
    tokens = [-(np.arange(P) + (DEPTH - 1 - l) * P + 1.0) * 0.04 for l in range(DEPTH)]
    set_gates(model, attn=attn, mlp=mlp, tokens=tokens)
    plan = vitslim.threshold(model, 0.5, 0.5, 0.5)
    got = blocks_of(plan)
    # attn: keep flat k >= n/2; mlp: keep k >= 288 -> block 1 units 96..191 and all of block 2.
    n = DEPTH * size
    for l, b in enumerate(got):
        kept_entries = [k for k in range(size) if l * size + k >= n // 2]
        if mode == "dims":
            expect = [[j for j in range(D) if h * D + j in kept_entries] for h in range(H)]
        elif mode == "heads":
            expect = [list(range(D)) if h in kept_entries else [] for h in range(H)]
        else:
            expect = [kept_entries] * H
        assert b["heads"] == expect, f"block {l}"
    assert [b["mlp"] for b in got] == [[], list(range(96, M)), list(range(M))]
    # tokens: 48 entries, keep the 24 largest |tanh|: block 0 all, block 1 patches 8..15, block 2 none.
    assert [b["tokens"] for b in got] == [list(range(P)), list(range(8, P)), []]


# ---------------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------------
def test_tokens_are_made_monotone(model):
    big, small = 2.0, 0.1
    tokens = [np.full(P, small) for _ in range(DEPTH)]
    tokens[0][[0, 1, 2, 4, 5, 6, 7]] = big
    tokens[1][[0, 1, 2, 4, 5, 6, 7]] = -big
    tokens[2][3] = 2.5  # only the deepest block keeps patch 3 on its own
    set_gates(model, tokens=tokens)
    # 15 large, 33 small; budget 0.3: floor(0.7 * 48) = 33 -> thr = tanh(2.0), exactly the large ones.
    plan = vitslim.threshold(model, 1.0, 1.0, 0.3)
    got = [b["tokens"] for b in blocks_of(plan)]
    assert got == [list(range(8)), list(range(8)), [3]]


def test_kept_token_sets_shrink_with_depth(model, mode):
    for seed in range(3):
        randomise(model, mode, seed)
        plan = vitslim.threshold(model, 0.7, 0.7, 0.4)
        sets = [set(b.tokens) for b in plan.blocks]
        for shallow, deep in zip(sets, sets[1:]):
            assert deep <= shallow
        assert blocks_of(plan) == ref_blocks(model, 0.7, 0.7, 0.4)


def test_tokens_ranked_by_abs_tanh_saturation_ties(model):
    # Block 0: raw 20..35 (tanh == 1.0 exactly in float64: they tie); blocks 1, 2: distinct and smaller.
    tokens = [20.0 + np.arange(P), np.arange(1, P + 1) * 0.05, -np.arange(1, P + 1) * 0.06]
    set_gates(model, tokens=tokens)
    # budget 0.25: floor(0.75 * 48) = 36 lands among the 16 tied values -> all of block 0 kept,
    # where ranking raw values would keep only patches 4..15 of block 0.
    plan = vitslim.threshold(model, 1.0, 1.0, 0.25)
    assert [b["tokens"] for b in blocks_of(plan)] == [list(range(P)), [], []]


def test_float32_saturated_token_gates_still_keep_the_budget(model):
    # Raw 9.5, 10, ..., 17 in block 0: float32 tanh is exactly 1.0 for all of them (they would tie, and `>= thr`
    # keep all 16, as the paper's float32 ranking does), float64 tanh still orders them.
    raw = 9.5 + 0.5 * np.arange(P)
    assert model.blocks[0].gates.tokens.dtype == torch.float32
    assert (torch.tanh(torch.tensor(raw, dtype=torch.float32)) == 1.0).all()
    set_gates(model, tokens=[raw, np.arange(1, P + 1) * 0.05, np.arange(1, P + 1) * 0.06])
    # n = 48, budget 0.25: floor(0.75 * 48) = 36 -> the 12 largest are block 0's patches 4..15: the budget holds.
    plan = vitslim.threshold(model, 1.0, 1.0, 0.25)
    assert [b["tokens"] for b in blocks_of(plan)] == [list(range(4, P)), [], []]


def test_negative_token_gates_rank_by_magnitude(model):
    tokens = [np.full(P, 0.1) for _ in range(DEPTH)]
    tokens[0][[2, 9]] = -3.0   # |tanh| = 0.995: strongly kept
    tokens[0][[4, 11]] = 1.0   # |tanh| = 0.76
    tokens[0][[5]] = -0.5      # |tanh| = 0.46
    set_gates(model, tokens=tokens)
    # n = 48; budget 0.1: floor(0.9 * 48) = 43, sorted[43] is the 5th largest |tanh|:
    # {3, 3, 1, 1, 0.5} -> thr = tanh(0.5); exactly those 5 entries are kept.
    plan = vitslim.threshold(model, 1.0, 1.0, 0.1)
    assert [b["tokens"] for b in blocks_of(plan)] == [[2, 4, 5, 9, 11], [], []]


def test_token_indices_are_patch_indices(model, mode):
    # With the last patch the strongest gate everywhere, it must show up as index P - 1 (= 15), not 16.
    tokens = [np.where(np.arange(P) == P - 1, 3.0, 0.01 * (np.arange(P) + 1)) for _ in range(DEPTH)]
    set_gates(model, tokens=tokens)
    plan = vitslim.threshold(model, 1.0, 1.0, 0.05)  # floor(0.95 * 48) = 45 -> thr = 3.0 (3 ties)
    assert [b.tokens for b in plan.blocks] == [(P - 1,)] * DEPTH
    full = vitslim.threshold(model, 1.0, 1.0, 1.0)
    assert [b.tokens for b in full.blocks] == [tuple(range(P))] * DEPTH  # prefix token not listed


# ---------------------------------------------------------------------------------------------------
# Other models
# ---------------------------------------------------------------------------------------------------
def test_distilled_deit_has_two_prefix_tokens():
    torch.manual_seed(0)
    model = timm.create_model("deit_small_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                              depth=2, num_heads=3, num_classes=5)
    vitslim.make_searchable(model, search="dims")
    rng = np.random.default_rng(11)
    set_gates(model, attn=distinct_signed(rng, (H, D), 2, 2.0 ** -8),
              mlp=distinct_signed(rng, (M,), 2, 2.0 ** -10), tokens=distinct_signed(rng, (P,), 2, 0.04))
    plan = vitslim.threshold(model, 0.6, 0.6, 0.6)
    assert plan.num_prefix_tokens == 2
    assert plan.num_patches == P and plan.depth == 2
    assert blocks_of(plan) == ref_blocks(model, 0.6, 0.6, 0.6)
    assert vitslim.threshold(model, 1.0, 1.0, 1.0).blocks[0].tokens == tuple(range(P))


def test_register_tokens_count_as_prefix():
    model = vitslim.make_searchable(tiny_vit(depth=2, reg_tokens=2))
    plan = vitslim.threshold(model, 1.0, 1.0, 1.0)
    assert plan.num_prefix_tokens == 3
    assert [b.tokens for b in plan.blocks] == [tuple(range(P))] * 2


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------
BAD_BUDGETS = [0, -0.1, 1.5, float("nan"), True, "0.7", None, float("inf")]


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=repr)
@pytest.mark.parametrize("name", ["budget_attn", "budget_mlp", "budget_tokens"])
def test_bad_budget_raises_value_error_naming_it(_cached_models, name, bad):
    if name == "budget_tokens" and bad is None:
        pytest.skip("budget_tokens=None is the default (0.7 where the model has token gates): test_default_budgets")
    model = _cached_models["dims"]
    kwargs = dict(budget_attn=0.7, budget_mlp=0.7, budget_tokens=0.7)
    kwargs[name] = bad
    with pytest.raises(ValueError) as info:
        vitslim.threshold(model, **kwargs)
    msg = str(info.value)
    assert name in msg and "(0, 1]" in msg
    assert repr(bad) in msg
    others = {"budget_attn", "budget_mlp", "budget_tokens"} - {name}
    assert not any(o in msg for o in others)


def test_default_budgets(_cached_models):
    model = _cached_models["dims"]
    assert vitslim.threshold(model) == vitslim.threshold(model, 0.7, 0.7, 0.7)
    assert vitslim.threshold(model, budget_tokens=None).budgets == {"attn": 0.7, "mlp": 0.7, "tokens": 0.7}


def test_bad_budget_message_exact_example(_cached_models):
    with pytest.raises(ValueError, match=r"budget_attn must be in \(0, 1\], got 1\.5"):
        vitslim.threshold(_cached_models["dims"], budget_attn=1.5)


def test_tiny_positive_budget_keeps_the_strongest_entry(model, mode):
    # 1e-17 is a valid budget in (0, 1]: exactly, floor((1 - 1e-17) * n) = n - 1, so only the largest
    # entry (of each kind) survives. In float64, 1 - 1e-17 == 1.0 and the index must not run off the end.
    randomise(model, mode, seed=2)
    plan = vitslim.threshold(model, 1e-17, 1e-17, 1e-17)
    got = blocks_of(plan)
    assert got == ref_blocks(model, 1e-17, 1e-17, 1e-17)
    assert sum(attn_entries(b, mode) for b in got) == 1
    assert sum(len(b["mlp"]) for b in got) == 1


def test_non_searchable_timm_model_is_rejected():
    with pytest.raises(ValueError, match="make_searchable"):
        vitslim.threshold(tiny_vit(depth=1), 0.7, 0.7, 0.7)


def test_non_vit_module_is_rejected_with_value_error():
    with pytest.raises(ValueError, match="make_searchable"):
        vitslim.threshold(nn.Linear(4, 4), 0.7, 0.7, 0.7)

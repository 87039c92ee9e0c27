"""Token dropping during the search (vitslim.drop_tokens): dropped tokens are gone, as in the slim model.

Everything is checked against tests/reference_vit.py, which removes tokens by explicit indexing.
"""
import copy
import io
import math

import pytest
import torch

import vitslim
from vitslim.searchable import searchable_blocks
from vitslim.token_drop import alive_tokens

from .reference_vit import plan_gates, reference_forward
from .flop_counter import torch_flops
from .tiny_models import VARIANTS, images_for, make_vit, randomize_gates, searchable_copy

IMPLS = ("eager", "folded")
EPS = 0.4  # with token gates uniform in (-2, 2), |tanh| < 0.4 for about 21% of the slots of each block
# Prefix tokens: 1 (deit), 2 (distilled), 5 (class + 4 registers), 0 (average pooling, no class token).
DROP_VARIANTS = ["deit", "deit_distilled", "registers", "avgpool_no_cls"]


@pytest.fixture(params=DROP_VARIANTS)
def drop_variant(request):
    return VARIANTS[request.param]


def dropped_model(name="deit_small_patch16_224", overrides=None, search="dims", eps=EPS):
    model = searchable_copy(make_vit(name, **(overrides or {})), search=search)
    randomize_gates(model)
    dropped = vitslim.drop_tokens(model, eps)
    assert dropped > 0
    return model


def expected_alive(model, eps):
    """Independent of the library: p is alive in block l iff |tanh(raw_k[p])| >= eps for every k <= l."""
    alive, ok = [], None
    for g in vitslim.gates(model):
        small = g.tokens.detach().tanh().abs() < eps
        ok = ~small if ok is None else ok & ~small
        alive.append(torch.nonzero(ok).flatten().tolist())
    return alive


def grads_vs_reference(model, x, kept):
    """Outputs and gradients (every parameter and the input) of the model and of the reference."""
    gates = vitslim.gates(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = x.clone().requires_grad_(True)
    out = model(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * weights).sum(), params + [x])
    ref = reference_forward(model, x, [g.attn for g in gates], [g.mlp for g in gates], [g.tokens for g in gates],
                            kept_tokens=kept)
    expected = torch.autograd.grad((ref * weights).sum(), params + [x])
    names = [n for n, p in model.named_parameters() if p.requires_grad] + ["input"]
    return out, ref, list(zip(names, got, expected))


@pytest.mark.parametrize("impl", IMPLS)
def test_dropped_model_equals_reference_outputs_and_gradients(drop_variant, impl):
    name, overrides = drop_variant
    model = dropped_model(name, overrides)
    vitslim.set_implementation(model, impl)
    kept = alive_tokens(model)
    assert kept == expected_alive(model, EPS)
    assert len(kept[-1]) < len(kept[0]) < model.blocks[0].num_patches  # something gone in the first and later
    out, ref, grads = grads_vs_reference(model, images_for(model), kept)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for n, a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"gradient of {n}: {m}")
    # A dropped token's gate gets no gradient from the task: the token is gone.
    token_grads = {n: g for n, g, _ in grads if n.endswith("gates.tokens")}
    for l, alive in enumerate(kept):
        dead = sorted(set(range(model.blocks[0].num_patches)) - set(alive))
        assert torch.all(token_grads[f"blocks.{l}.gates.tokens"][dead] == 0)
        assert torch.all(token_grads[f"blocks.{l}.gates.tokens"][alive] != 0)


@pytest.mark.parametrize("search", ["heads", "uniform"])
def test_other_search_modes_after_dropping(search):
    model = dropped_model(search=search)
    out, ref, grads = grads_vs_reference(model, images_for(model), alive_tokens(model))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for n, a, b in grads:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"gradient of {n}: {m}")


@pytest.mark.parametrize("budgets", [(0.5, 0.6, 0.7), (0.3, 0.2, 0.4)])
@pytest.mark.parametrize("fold", [False, True])
def test_slim_after_dropping_equals_reference(drop_variant, budgets, fold):
    name, overrides = drop_variant
    model = dropped_model(name, overrides)
    plan = vitslim.threshold(model, *budgets)
    slim = vitslim.slim(model, plan, fold_gates=fold)
    x = images_for(model)
    attn, mlp, tok, kept = plan_gates(plan, vitslim.gates(model), fold=fold)
    expected = reference_forward(model, x, attn, mlp, tok, kept_tokens=kept)
    torch.testing.assert_close(slim(x), expected, rtol=0, atol=1e-12)


def test_full_budget_slim_is_the_dropped_search_model(drop_variant):
    # Budget 1 keeps every live entry; folded gates make the slim model compute the search model's function,
    # so both remove the same tokens the same way (same gathers, same FLOPs).
    name, overrides = drop_variant
    model = dropped_model(name, overrides)
    plan = vitslim.threshold(model, 1.0, 1.0, 1.0)
    assert [list(b.tokens) for b in plan.blocks] == alive_tokens(model)
    slim = vitslim.slim(model, plan, fold_gates=True)
    x = images_for(model)
    torch.testing.assert_close(slim(x), model(x), rtol=0, atol=1e-12)
    for sb, b in zip(slim.blocks, model.blocks):
        assert (sb.gather_index is None) == (b.gather_index is None)
        if b.gather_index is not None:
            assert torch.equal(sb.gather_index, b.gather_index)
    assert vitslim.count_flops(slim, batch_size=2) == vitslim.count_flops(model, batch_size=2)


def test_dropping_is_monotone_and_counts_new_slots():
    model = searchable_copy(make_vit())
    randomize_gates(model)
    P, L = model.blocks[0].num_patches, len(model.blocks)
    assert vitslim.drop_tokens(model, 0.0) == 0  # |tanh| < 0 never holds: nothing dropped
    assert all(b.gather_index is None and b.kept_patches is None for b in model.blocks)

    dropped = vitslim.drop_tokens(model, 0.3)
    alive = alive_tokens(model)
    assert alive == expected_alive(model, 0.3)
    assert dropped == L * P - sum(map(len, alive))
    for shallow, deep in zip(alive, alive[1:]):
        assert set(deep) <= set(shallow)
    # The same eps again drops nothing; a larger one drops the difference.
    assert vitslim.drop_tokens(model, 0.3) == 0
    more = vitslim.drop_tokens(model, 0.6)
    assert more == sum(map(len, alive)) - sum(map(len, expected_alive(model, 0.6))) > 0
    alive = alive_tokens(model)
    # A dropped token never returns, even when its gate grows again; eps = 0 keeps what is dropped dropped.
    with torch.no_grad():
        for g in vitslim.gates(model):
            g.tokens.fill_(3.0)
    assert vitslim.drop_tokens(model, 0.0) == 0 and vitslim.drop_tokens(model, 0.9) == 0
    assert alive_tokens(model) == alive


def test_a_patch_dropped_early_is_gone_from_every_later_block():
    model = searchable_copy(make_vit())
    with torch.no_grad():
        vitslim.gates(model)[0].tokens[[3, 7]] = 0.01  # small in block 0 only
        vitslim.gates(model)[1].tokens[5] = -0.02      # small (negative) in block 1 only
    assert vitslim.drop_tokens(model, 0.05) == 2 * 3 + 1 * 2
    P = model.blocks[0].num_patches
    assert alive_tokens(model) == [[p for p in range(P) if p not in (3, 7)]] + \
        [[p for p in range(P) if p not in (3, 5, 7)]] * 2
    R = model.num_prefix_tokens
    b0, b1, b2 = model.blocks
    assert b0.gather_index.tolist() == list(range(R)) + [R + p for p in range(P) if p not in (3, 7)]
    # Block 1's input holds patches 0, 1, 2, 4, 5, 6, 8, ...: patch 5 is at position 4 of them.
    assert b1.gather_index.tolist() == list(range(R)) + [R + i for i in range(P - 2) if i != 4]
    assert b2.gather_index is None and b2.input_tokens == R + P - 3
    assert b2.kept_patches.tolist() == [p for p in range(P) if p not in (3, 5, 7)]


@pytest.mark.parametrize("budget", [0.2, 0.5, 0.8, 1.0])
def test_threshold_never_keeps_dropped_tokens(budget):
    model = dropped_model()
    alive = alive_tokens(model)
    # Make the dropped slots the most important of all: they must still not be kept.
    with torch.no_grad():
        for g, kept in zip(vitslim.gates(model), alive):
            dead = torch.ones(g.tokens.shape, dtype=torch.bool)
            dead[kept] = False
            g.tokens[dead] = 10.0
    plan = vitslim.threshold(model, 1.0, 1.0, budget)
    tokens = [list(b.tokens) for b in plan.blocks]
    for t, a in zip(tokens, alive):
        assert set(t) <= set(a)
    for shallow, deep in zip(tokens, tokens[1:]):
        assert set(deep) <= set(shallow)
    # The budget is a fraction of all L x P slots, ranked by the global formula (distinct random gates),
    # where a dropped slot counts as importance 0 and is never kept.
    gates = vitslim.gates(model)
    P = gates[0].tokens.numel()
    imp = [[gates[l].tokens[p].tanh().abs().item() if p in a else 0.0 for p in range(P)]
           for l, a in enumerate(alive)]
    flat = sorted(v for row in imp for v in row)
    n = len(flat)
    thr = flat[min(math.floor((1 - budget) * n), n - 1)]
    ranked = [[p for p in a if imp[l][p] >= thr] for l, a in enumerate(alive)]
    for l in range(len(ranked) - 2, -1, -1):
        ranked[l] = sorted(set(ranked[l]) | set(ranked[l + 1]))
    assert tokens == ranked


def test_threshold_with_every_patch_dropped_keeps_only_prefix_tokens():
    model = searchable_copy(make_vit())
    assert vitslim.drop_tokens(model, 0.999) == 3 * 16  # tanh(3) = 0.995
    plan = vitslim.threshold(model, 0.7, 0.7, 0.7)
    assert all(b.tokens == () for b in plan.blocks)


@pytest.mark.parametrize("impl", IMPLS)
def test_count_flops_shrinks_and_agrees_with_torch_flop_counter(impl):
    model = searchable_copy(make_vit())
    randomize_gates(model)
    vitslim.set_implementation(model, impl)
    before = vitslim.count_flops(model, batch_size=2)
    vitslim.drop_tokens(model, EPS)
    after = vitslim.count_flops(model, batch_size=2)
    assert after < before
    x = images_for(model, batch=2)
    assert torch_flops(model, x) == 2 * after  # FLOPs = 2 MACs


def test_state_dict_round_trip():
    model = dropped_model()
    state = model.state_dict()
    assert state["blocks.0.token_alive"].dtype == torch.bool and state["blocks.0.token_alive"].shape == (16,)
    assert not any("gather_index" in k or "kept_patches" in k for k in state)  # derived, not saved
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = searchable_copy(make_vit(seed=5))  # other weights, nothing dropped
    x = images_for(model)
    assert not torch.allclose(fresh(x), model(x))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert alive_tokens(fresh) == alive_tokens(model)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert vitslim.count_flops(fresh) == vitslim.count_flops(model)
    # A compiled wrapper loads through to the model (and its hook) too.
    again = searchable_copy(make_vit(seed=5))
    torch.compile(again).load_state_dict({f"_orig_mod.{k}": v for k, v in state.items()})
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)


def test_checkpoints_without_token_alive_still_load():
    # Saved before token dropping existed: everything alive.
    model = dropped_model()
    old = {k: v for k, v in searchable_copy(make_vit()).state_dict().items() if not k.endswith("token_alive")}
    result = model.load_state_dict(old, strict=True)
    assert not result.missing_keys
    assert all(b.token_alive.all() and b.gather_index is None for b in model.blocks)
    x = images_for(model)
    torch.testing.assert_close(model(x), searchable_copy(make_vit())(x), rtol=0, atol=0)


def test_loading_inconsistent_token_alive_is_refused():
    model = dropped_model()
    state = model.state_dict()
    state["blocks.2.token_alive"] = torch.ones(16, dtype=torch.bool)  # revives what blocks 0 and 1 dropped
    with pytest.raises(ValueError, match="a dropped token never returns"):
        searchable_copy(make_vit()).load_state_dict(state)
    # Loading blocks one by one cannot re-derive the model's gathers: the forward says so until synced.
    fresh = searchable_copy(make_vit())
    for l, block in enumerate(fresh.blocks):
        block.load_state_dict({k[len(f"blocks.{l}."):]: v for k, v in model.state_dict().items()
                               if k.startswith(f"blocks.{l}.")})
    x = images_for(fresh)
    with pytest.raises(RuntimeError, match="sync_token_inputs"):
        fresh(x)
    vitslim.searchable.sync_token_inputs(fresh)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("eps", [-0.1, 1.0, 1.5, float("nan"), True, "0.1", None])
def test_bad_eps(eps):
    model = searchable_copy(make_vit())
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\), got " + repr(eps).replace("(", r"\(")):
        vitslim.drop_tokens(model, eps)
    assert all(b.token_alive.all() for b in model.blocks)


def test_drop_tokens_needs_a_searchable_model():
    with pytest.raises(ValueError, match="make_searchable"):
        vitslim.drop_tokens(make_vit(), 0.1)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_patch_dropped_in_a_block_leaves_only_prefix_tokens(impl):
    model = searchable_copy(make_vit("deit_small_distilled_patch16_224"))  # two prefix tokens
    randomize_gates(model)
    vitslim.set_implementation(model, impl)
    with torch.no_grad():
        gates = vitslim.gates(model)
        gates[0].tokens.clamp_(min=1.0)  # block 0 keeps every patch
        gates[1].tokens.zero_()          # block 1 drops every patch, hence block 2 too
    assert vitslim.drop_tokens(model, 0.5) == 2 * 16
    assert alive_tokens(model) == [list(range(16)), [], []]
    b0, b1, b2 = model.blocks
    assert b0.gather_index is None and b1.gather_index.tolist() == [0, 1] and b2.gather_index is None
    assert b2.input_tokens == 2 and b2.kept_patches.numel() == 0
    out, ref, grads = grads_vs_reference(model, images_for(model), alive_tokens(model))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for n, a, b in grads:
        assert torch.isfinite(a).all(), n
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"gradient of {n}: {m}")
    plan = vitslim.threshold(model, 0.6, 0.6, 1.0)
    assert [list(b.tokens) for b in plan.blocks] == [list(range(16)), [], []]
    slim = vitslim.slim(model, plan)
    x = images_for(model)
    attn, mlp, tok, kept = plan_gates(plan, fold=False)
    torch.testing.assert_close(slim(x), reference_forward(model, x, attn, mlp, tok, kept_tokens=kept),
                               rtol=0, atol=1e-12)
    assert torch_flops(model, x) == 2 * vitslim.count_flops(model, batch_size=x.shape[0])


def test_training_continues_after_dropping():
    # Optimiser steps and a second drop in the middle of training: the model keeps computing the reference.
    model = searchable_copy(make_vit(dtype=torch.float64))
    randomize_gates(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = images_for(model)
    for eps in (0.2, 0.0, 0.5):
        vitslim.drop_tokens(model, eps)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    frozen = copy.deepcopy(model).eval()
    gates = vitslim.gates(frozen)
    ref = reference_forward(frozen, x, [g.attn for g in gates], [g.mlp for g in gates], [g.tokens for g in gates],
                            kept_tokens=alive_tokens(frozen))
    torch.testing.assert_close(frozen(x), ref, rtol=0, atol=1e-12)
    assert len(alive_tokens(frozen)[-1]) < 16
    assert len(searchable_blocks(frozen)) == 3


def test_a_model_without_prefix_tokens_never_gets_an_empty_sequence():
    model = searchable_copy(make_vit("vit_small_patch16_224", class_token=False, global_pool="avg", fc_norm=True))
    with torch.no_grad():
        for g in vitslim.gates(model):
            g.tokens.uniform_(-0.01, 0.01, generator=torch.Generator().manual_seed(0))
        vitslim.gates(model)[0].tokens[7] = 0.5
    vitslim.drop_tokens(model, 0.9)  # every gate is below 0.9: block 0 keeps its strongest, and so do the others
    assert alive_tokens(model) == [[7]] * 3
    out = model(images_for(model))
    assert torch.isfinite(out).all()
    plan = vitslim.threshold(model, 1.0, 1.0, 0.01)
    assert all(len(b.tokens) == 1 for b in plan.blocks)
    assert torch.isfinite(vitslim.slim(model, plan)(images_for(model))).all()
    empty = vitslim.SlimPlan.from_dict({**plan.to_dict(), "blocks": [
        {**b, "tokens": []} for b in plan.to_dict()["blocks"]]})
    with pytest.raises(vitslim.PlanMismatchError, match="block 0 keeps no token"):
        vitslim.slim(model, empty)

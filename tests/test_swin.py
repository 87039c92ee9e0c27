"""The Swin family (vitslim/families/swin.py, docs/design.md section 8): what is supported and refused, the counts
against the paper's Table 7, the search model against timm's own forward with the gates multiplied into its weights,
threshold and targets over all stages, and the slim model's exactness (shifted and unshifted blocks, a stage of one
window, a grid that needs padding, a head pruned to width 0, a block's whole attention pruned)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitslim
from vitslim.families import family_of
from vitslim.families.swin import SWIN, SlimWindowAttention, SwinArch
from vitslim.planning import Alignment, PlanCost, align_plan, masks_of, plan_for
from vitslim.threshold import gate_ranking

from .tiny_models import images_for, make_swin, randomize_gates, searchable_copy

# img 40: 10x10 patches, windows of 7 -> padded to 14x14 in stage 1 (shifted), 5x5 (one window of 5) in stage 2.
PADDED = dict(img_size=40, depths=(2, 2), num_heads=(2, 3))


@pytest.fixture(scope="module")
def dense():
    return make_swin()


@pytest.fixture(scope="module")
def searched(dense):
    model = searchable_copy(dense)
    randomize_gates(model)
    return model


def _zeroed(model, plan):
    """The search model with every entry the plan prunes set to 0 (its attention and MLP gates)."""
    zeroed = copy.deepcopy(model)
    masks = masks_of(plan, gate_ranking(model))
    with torch.no_grad():
        for gates, attn, mlp in zip(vitslim.gates(zeroed), masks["attn"], masks["mlp"]):
            gates.attn.mul_(attn)
            gates.mlp.mul_(mlp)
    return zeroed


def _gates_in_weights(dense, searchable):
    """timm's dense Swin with each block's gates multiplied into its weights by hand: q, k and v rows (bias included)
    by the attention gate, fc2 columns by the MLP gate. An independent reference for the search model."""
    reference = copy.deepcopy(dense)
    blocks = [b for stage in reference.layers for b in stage.blocks]
    with torch.no_grad():
        for block, gates in zip(blocks, vitslim.gates(searchable)):
            rows = gates.attn_per_dim().reshape(-1).repeat(3)
            block.attn.qkv.weight.mul_(rows.unsqueeze(1))
            block.attn.qkv.bias.mul_(rows)
            block.mlp.fc2.weight.mul_(gates.mlp.unsqueeze(0))
    return reference


def test_swin_t_counts_are_the_papers():
    """Table 7's 100% row: 28.3M parameters, 4.5 GFLOPs (multiply-accumulates of matrix products)."""
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, device="meta")
    assert vitslim.count_params(model) == 28_288_354
    assert vitslim.count_flops(model) == 4_490_566_656
    arch = SWIN.describe(model)
    assert arch.embed_dims == (96, 192, 384, 768) and arch.num_heads == (3, 6, 12, 24)
    assert arch.head_dims == (32,) * 4 and arch.window_sizes == (7,) * 4
    assert [w.num_patches for w in arch.block_widths()] == [3136] * 2 + [784] * 2 + [196] * 6 + [49] * 2


@pytest.mark.parametrize("name", ["swinv2_tiny_window8_256", "swinv2_cr_tiny_224"])
def test_swin_v2_is_refused_with_the_reason(name):
    model = timm.create_model(name, pretrained=False, device="meta")
    with pytest.raises(vitslim.UnsupportedModelError, match=r"cosine attention normalises q and k per head, so a "
                                                            r"gate shared by q and k cancels"):
        vitslim.make_searchable(model)


def test_an_odd_grid_that_timm_rounds_down_is_refused():
    model = make_swin(img_size=56)  # 14x14 -> 7x7 -> 4x4 after patch merging: timm 1.0.25 builds stage 3 for 3x3
    built = tuple(model.layers[2].blocks[0].input_resolution)
    if built == (4, 4):
        assert SWIN.describe(model).grids[2] == (4, 4)  # later timm builds what patch merging gives
    else:
        with pytest.raises(vitslim.UnsupportedModelError, match=r"stage 2: this timm .* builds its blocks for a 3x3 "
                                                                r"grid, but patch merging gives 4x4"):
            SWIN.describe(model)


def test_dynamic_image_size_is_refused():
    model = make_swin(strict_img_size=False)
    with pytest.raises(vitslim.UnsupportedModelError, match="dynamic image size"):
        vitslim.make_searchable(model)


def test_arch_round_trips_with_padding_and_clamped_windows():
    for overrides in ({}, PADDED):
        model = make_swin(**overrides)
        arch = SWIN.describe(model)
        assert SwinArch.from_dict(arch.to_dict()) == arch == SWIN.describe(SWIN.build(arch))
    arch = SWIN.describe(make_swin())
    assert arch.window_sizes == (7, 7, 4) and arch.grids == ((16, 16), (8, 8), (4, 4))  # stage 3: one window of 4
    with pytest.raises(ValueError, match=r"unknown model settings \['depth'\]"):
        SwinArch.from_dict({**arch.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match=r"num_heads \(one per stage\) must be 3 positive integers, got \(2,\)"):
        SwinArch.from_dict({**arch.to_dict(), "num_heads": [2]})


@pytest.mark.parametrize("overrides", [{}, PADDED], ids=["shifted+one-window", "padded"])
def test_search_model_is_timm_with_its_gates_in_the_weights(overrides):
    dense = make_swin(**overrides)
    x = images_for(dense)
    for implementation in ("eager", "folded"):
        model = searchable_copy(dense, implementation=implementation)
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-12)  # neutral gates: timm's model
        randomize_gates(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), _gates_in_weights(dense, model)(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("search", ["heads", "uniform"])
def test_head_and_uniform_search_modes(dense, search):
    model = searchable_copy(dense, search=search)
    randomize_gates(model)
    x = images_for(dense)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _gates_in_weights(dense, model)(x), rtol=0, atol=1e-10)
    plan = vitslim.threshold(model, 0.5, 0.5)
    for b, w in zip(plan.blocks, SWIN.describe(model).block_widths()):
        if search == "heads":  # whole heads
            assert set(b.head_dims) <= {0, w.head_dim}
        else:  # the same dims in every head of a block
            assert len({dims for dims in b.heads}) == 1
    small = vitslim.slim(model, plan, fold_gates=True)
    with torch.no_grad():
        torch.testing.assert_close(small(x), _zeroed(model, plan)(x), rtol=0, atol=1e-9)


def test_gate_gradients_agree_between_eager_and_folded(dense):
    x = images_for(dense, batch=2)
    grads = {}
    for implementation in ("eager", "folded"):
        model = searchable_copy(dense, implementation=implementation)
        randomize_gates(model)
        model(x).square().mean().backward()
        gates = vitslim.gates(model)
        assert all(g.tokens.numel() == 0 for g in gates)  # no token gates
        grads[implementation] = [t.grad for g in gates for t in (g.attn, g.mlp)] + [
            model.layers[0].blocks[1].attn.relative_position_bias_table.grad, model.layers[1].blocks[0].mlp.fc1.weight.grad]
    for eager, folded in zip(grads["eager"], grads["folded"]):
        torch.testing.assert_close(folded, eager, rtol=1e-9, atol=1e-12)


def test_fused_without_triton_says_why_and_computes_the_same(dense, monkeypatch):
    # A CPU tensor without the interpreter: the folded path, with one warning naming the reason. (The kernels
    # themselves: tests/kernels/test_window_attention.py, under the interpreter.)
    monkeypatch.setattr(vitslim.implementations, "_fused_warnings", set())  # once per process and reason
    x = images_for(dense, batch=2)
    model = searchable_copy(dense, fused=True)
    with pytest.warns(UserWarning, match=r"fused search kernels not used \(.*\); using the folded PyTorch path"):
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-12)


def test_token_gates_are_refused_with_one_line(searched):
    assert vitslim.threshold(searched, 0.5, 0.5).budgets == {"attn": 0.5, "mlp": 0.5, "tokens": 1.0}
    assert vitslim.threshold(searched, 0.5, 0.5, 1.0) == vitslim.threshold(searched, 0.5, 0.5)
    with pytest.raises(ValueError, match=r"^budget_tokens=0\.7: swin models have no token gates \(windows and patch "
                                         r"merging need the whole grid\); leave it unset or give 1\.0$"):
        vitslim.threshold(searched, 0.5, 0.5, 0.7)
    with pytest.raises(ValueError, match="has no token gates"):
        vitslim.drop_tokens(copy.deepcopy(searched), 0.5)


def test_threshold_ranks_all_stages_together(searched):
    plan = vitslim.threshold(searched, 0.4, 0.3)
    ranking = gate_ranking(searched)
    attn = torch.cat([t.reshape(-1) for t in ranking.attn])
    thr = attn.sort().values[int(0.6 * attn.numel())]
    assert plan.family == "swin" and plan.version == 2
    assert [b.attn_width for b in plan.blocks] == [int((t >= thr).sum()) for t in ranking.attn]
    assert sum(len(b.mlp) for b in plan.blocks) == sum(int(k.sum()) for k in masks_of(plan, ranking)["mlp"])
    assert vitslim.SlimPlan.from_json(plan.to_json()) == plan
    assert "all" in plan.summary()


def test_targets_and_alignment(searched):
    cost = PlanCost(searched, SWIN.describe(searched))
    for kind in ("flops", "params"):
        plan = plan_for(searched, **{kind: 0.6})
        assert cost(plan)[kind] <= 0.6 * cost.dense[kind] and plan.budgets["tokens"] == 1.0
        assert plan.target["mix"][2] == 0.0  # no token gates: the mix prunes attention and MLP
    aligned = align_plan(searched, vitslim.threshold(searched, 0.5, 0.5), Alignment(8, 16))
    assert all(w % 8 == 0 for b in aligned.blocks for w in b.head_dims)
    assert all(len(b.mlp) % 16 == 0 for b in aligned.blocks)
    plan = plan_for(searched, flops=0.7, align=Alignment(8, 16))
    assert cost(plan)["flops"] <= 0.7 * cost.dense["flops"]


@pytest.mark.parametrize("overrides", [{}, PADDED], ids=["shifted+one-window", "padded"])
@pytest.mark.parametrize("fold_gates", [True, False])
def test_slim_equals_the_search_model_with_pruned_entries_zeroed(overrides, fold_gates):
    dense = make_swin(**overrides)
    model = searchable_copy(dense)
    randomize_gates(model)
    with torch.no_grad():
        vitslim.gates(model)[0].attn.fill_(0.0)  # block 0 (one head): its whole attention pruned
        vitslim.gates(model)[2].attn[1].fill_(0.0)  # block 2: head 1 pruned to width 0
    plan = vitslim.threshold(model, 0.6, 0.5)
    assert plan.blocks[0].attn_width == 0 and plan.blocks[2].head_dims[1] == 0
    small = vitslim.slim(model, plan, fold_gates=fold_gates)
    expected = _zeroed(model, plan)
    if not fold_gates:  # kept gates become 1
        with torch.no_grad():
            for gates in vitslim.gates(expected):
                gates.attn.copy_((gates.attn != 0).to(gates.attn.dtype))
                gates.mlp.copy_((gates.mlp != 0).to(gates.mlp.dtype))
    attn = small.layers[0].blocks[0].attn
    assert isinstance(attn, SlimWindowAttention) and attn.head_dims == () and attn.qkv.weight.shape == (0, 16)
    kept = [h for h, width in enumerate(plan.blocks[2].head_dims) if width]  # the table keeps these heads' columns
    assert 1 not in kept and torch.equal(small.layers[1].blocks[0].attn.relative_position_bias_table,
                                         dense.layers[1].blocks[0].attn.relative_position_bias_table[:, kept])
    x = images_for(dense)
    with torch.no_grad():
        torch.testing.assert_close(small(x), expected(x), rtol=0, atol=1e-9)
        for block in SWIN.blocks(small):
            block.attn.implementation = "per_head"  # the per-head reference, explicit bias and mask
        torch.testing.assert_close(small(x), expected(x), rtol=0, atol=1e-9)
    assert vitslim.count_flops(small) == PlanCost(model, SWIN.describe(model))(plan)["flops"]


def test_slim_keeping_everything_is_timm(dense):
    model = searchable_copy(dense)
    small = vitslim.slim(model, vitslim.threshold(model, 1.0, 1.0))
    x = images_for(dense)
    with torch.no_grad():
        torch.testing.assert_close(small(x), dense(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(small.forward_head(small.forward_features(x)), dense(x), rtol=0, atol=1e-12)
        for got, want in zip(small.forward_intermediates(x, intermediates_only=True),
                             dense.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert family_of(small) is SWIN and vitslim.count_params(small) == vitslim.count_params(dense)


def test_slim_keeps_its_image_size_and_round_trips(tmp_path, searched):
    plan = vitslim.threshold(searched, 0.5, 0.5)
    small = vitslim.slim(searched, plan, fold_gates=True)
    small.set_input_size(img_size=64)  # its own size: nothing changes
    with pytest.raises(ValueError, match=r"^set_input_size: this slim Swin's plan is for 64x64 images in 4x4 patches "
                                         r"with windows \[7, 7, 4\]; accepted: that size only$"):
        small.set_input_size(img_size=56)
    with pytest.raises(ValueError, match="keeps the 7x7 windows of its plan"):
        small.layers[0].blocks[0].attn.set_window_size(8)
    vitslim.save_slim(small, tmp_path / "slim")
    loaded = vitslim.load_slim(tmp_path / "slim").to(torch.float64)
    x = images_for(small)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert loaded.slim_plan == plan


def test_onnx_export_of_heads_of_equal_width_with_the_shift_mask(tmp_path):
    """Heads of one width form one SDPA group with the bias and shift mask: torch 2.14's ONNX exporter fails on that
    SDPA (its decomposition breaks the reshape after it), so an export computes the group's attention in plain ops."""
    pytest.importorskip("onnxscript")
    from vitslim.deploy.export import export_onnx, run_onnx
    dense = make_swin(dtype=torch.float32, embed_dim=96, depths=(2,), num_heads=(3,))  # 3 heads of 32, shifted
    model = searchable_copy(dense)
    small = vitslim.slim(model, vitslim.threshold(model, 1.0, 1.0)).eval()
    assert [g[2] for g in small.layers[0].blocks[1].attn._bucketed.groups] == [3]
    x = images_for(dense, batch=2, dtype=torch.float32)
    export_onnx(small, x, tmp_path / "swin.onnx", dynamic_batch=False)
    got, _ = run_onnx(tmp_path / "swin.onnx", x)
    with torch.no_grad():
        torch.testing.assert_close(got, dense(x), rtol=0, atol=1e-4)

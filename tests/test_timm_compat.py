"""Slim models stay timm citizens: timm's data config survives slim / save / load, forward_intermediates gives each
block's tokens (NLC) or its whole grid (NCHW) when tokens are dropped, blocks take timm's attention masks, and FX
feature extraction and TorchScript work as on timm's own ViTs."""

import pytest
import timm
import torch
from timm.data import resolve_data_config

import vitslim
import vitslim.digits  # noqa: F401 - registers vitslim_digits_vit with timm

from .tiny_models import TINY, VARIANTS, images_for, make_vit, randomize_gates, searchable_copy

# Models whose timm config differs from timm's defaults (224 px, ImageNet mean/std, crop 0.875): a slim model
# that lost its config would silently preprocess them wrongly.
NON_DEFAULT_CONFIGS = {
    "vit_tiny_patch16_384": dict(patch_size=32, embed_dim=48, depth=2, num_heads=3),   # 384 px, mean 0.5, crop 1
    "deit_small_distilled_patch16_224": dict(TINY, img_size=224, patch_size=32),     # crop 0.9
    "vitslim_digits_vit": dict(depth=2),                                              # the embedded data's
}


def _slim_of(model, budgets=(0.6, 0.6, 0.5), keep_first_block_tokens=False):
    searchable = searchable_copy(model)
    randomize_gates(searchable)
    if keep_first_block_tokens:
        with torch.no_grad():
            vitslim.gates(searchable)[0].tokens.fill_(5.0)  # the strongest patches of all: block 0 keeps them
    return vitslim.slim(searchable, vitslim.threshold(searchable, *budgets))


def _families():
    yield from ((name, overrides) for name, overrides in VARIANTS.values())
    for name, overrides in NON_DEFAULT_CONFIGS.items():
        yield name, {**overrides, "_real_size": True}


@pytest.mark.parametrize("name,overrides", list(_families()), ids=lambda v: v if isinstance(v, str) else "")
def test_slim_and_loaded_models_keep_timms_data_config(tmp_path, name, overrides):
    overrides = dict(overrides)
    if overrides.pop("_real_size", False):
        torch.manual_seed(0)
        dense = timm.create_model(name, pretrained=False, **overrides).double().eval()
    else:
        dense = make_vit(name, **overrides)
    expected = resolve_data_config(model=dense)
    slim = _slim_of(dense)
    assert resolve_data_config(model=slim) == expected
    assert slim.default_cfg == slim.pretrained_cfg == dense.pretrained_cfg
    loaded = vitslim.load_slim(vitslim.save_slim(slim, tmp_path / "slim"))
    assert resolve_data_config(model=loaded) == expected
    assert loaded.pretrained_cfg["num_classes"] == dense.pretrained_cfg["num_classes"]


def test_the_non_default_configs_are_really_non_default():
    # Guards the test above: were these timm's defaults, losing the config would go unnoticed.
    defaults = resolve_data_config(model=torch.nn.Linear(1, 1))
    for name in NON_DEFAULT_CONFIGS:
        cfg = resolve_data_config(model=timm.create_model(name, pretrained=False, **NON_DEFAULT_CONFIGS[name]))
        assert cfg != defaults, name
    assert resolve_data_config(model=timm.create_model("vit_tiny_patch16_384", pretrained=False))["input_size"] \
        == (3, 384, 384)


def test_a_model_without_a_timm_config_gives_a_slim_model_without_one(tmp_path):
    dense = make_vit()
    del dense.pretrained_cfg, dense.default_cfg
    slim = _slim_of(dense)
    assert not hasattr(slim, "pretrained_cfg")
    loaded = vitslim.load_slim(vitslim.save_slim(slim, tmp_path / "slim"))
    assert resolve_data_config(model=loaded) == resolve_data_config(model=dense)


def _token_dropped_slim():
    dense = make_vit()
    slim = _slim_of(dense, budgets=(0.7, 0.7, 0.6), keep_first_block_tokens=True)
    kept = [len(b.tokens) for b in slim.slim_plan.blocks]
    assert kept[0] == 16 and kept[-1] < 16, kept  # the first block keeps the grid, the last does not
    return dense, slim, kept


def test_forward_intermediates_nlc_on_a_token_dropped_slim_model():
    dense, slim, kept = _token_dropped_slim()
    x = images_for(slim, batch=2)
    final, intermediates = slim.forward_intermediates(x, output_fmt="NLC")
    assert [t.shape for t in intermediates] == [(2, n, 48) for n in kept]
    torch.testing.assert_close(final, slim.forward_features(x), rtol=0, atol=0)
    # The block outputs are the ones the slim model computes on its way.
    h = slim.norm_pre(slim._pos_embed(slim.patch_embed(x)))
    for block, t in zip(slim.blocks, intermediates):
        h = block(h)
        torch.testing.assert_close(t, h[:, slim.num_prefix_tokens:], rtol=0, atol=0)


def _full_grid_reference(model, x, kept_per_block: list[list[int]], norm: bool = False) -> list[torch.Tensor]:
    """Every block's whole grid, position by position: a patch takes a block's output where the block holds it and
    keeps its last value where it does not (the embedding if block 0 dropped it). (B, C, H, W) per block."""
    R = model.num_prefix_tokens
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    last = {p: h[:, R + p] for p in range(16)}
    maps = []
    for block, kept in zip(model.blocks, kept_per_block):
        h = block(h)
        for j, p in enumerate(kept):
            last[p] = h[:, R + j]
        grid = torch.stack([last[p] for p in range(16)], dim=1)  # (B, 16, C)
        grid = model.norm(grid) if norm else grid
        maps.append(grid.reshape(x.shape[0], 4, 4, -1).permute(0, 3, 1, 2))
    return maps


@pytest.mark.parametrize("norm", [False, True])
def test_forward_intermediates_nchw_gives_every_blocks_whole_grid_after_dropped_tokens(norm):
    _, slim, kept = _token_dropped_slim()
    x = images_for(slim, batch=2)
    kept_per_block = [list(b.tokens) for b in slim.slim_plan.blocks]
    expected = _full_grid_reference(slim, x, kept_per_block, norm)
    final, maps = slim.forward_intermediates(x, norm=norm)  # NCHW is timm's default
    assert [m.shape for m in maps] == [(2, 48, 4, 4)] * len(kept)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, slim.forward_features(x), rtol=0, atol=0)
    # Chosen blocks, prefix tokens, intermediates only: as timm gives them.
    last = slim.forward_intermediates(x, indices=[len(kept) - 1], intermediates_only=True, return_prefix_tokens=True,
                                      norm=norm)
    (grid, prefix), = last
    torch.testing.assert_close(grid, expected[-1], rtol=0, atol=1e-12)
    assert prefix.shape == (2, slim.num_prefix_tokens, 48)
    # Where the last block dropped patches, its map holds their values from the block before (not zeros).
    gone = sorted(set(range(16)) - set(kept_per_block[-1]))
    assert gone and kept_per_block[-2] != kept_per_block[-1]
    rows, cols = torch.tensor(gone) // 4, torch.tensor(gone) % 4
    torch.testing.assert_close(maps[-1][..., rows, cols], maps[-2][..., rows, cols], rtol=0, atol=0)
    assert maps[-1][..., rows, cols].abs().min() > 0


def test_forward_intermediates_on_a_search_model_after_drop_tokens():
    model = searchable_copy(make_vit())
    randomize_gates(model, token_range=1.0)
    assert vitslim.drop_tokens(model, 0.5) > 0
    x = images_for(model, batch=2)
    _, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    assert intermediates[-1].shape[1] < 16
    alive = [torch.nonzero(b.token_alive).flatten().tolist() for b in model.blocks]
    maps = model.forward_intermediates(x, intermediates_only=True)
    for got, want in zip(maps, _full_grid_reference(model, x, alive)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_features_only_on_a_token_dropped_slim_model():
    """timm's features_only wrapper of a ViT (FeatureGetterNet) takes NCHW intermediates: every block's grid."""
    from timm.models._features import FeatureGetterNet
    _, slim, kept = _token_dropped_slim()
    x = images_for(slim, batch=2)
    expected = _full_grid_reference(slim, x, [list(b.tokens) for b in slim.slim_plan.blocks])
    features = FeatureGetterNet(slim, out_indices=(0, len(kept) - 1))  # prunes what follows the last index
    got = features(x)
    assert len(got) == 2
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], expected[-1], rtol=0, atol=1e-12)


def test_checked_forward_intermediates_survives_copy_and_pickle(tmp_path):
    import copy
    import io

    _, slim, _ = _token_dropped_slim()
    x = images_for(slim, batch=1)
    expected = slim.forward_intermediates(x, intermediates_only=True)
    for other in (copy.deepcopy(slim), _pickled(slim, io)):
        assert other.forward_intermediates.args[0] is other  # bound to the copy, not the original
        for got, want in zip(other.forward_intermediates(x, intermediates_only=True), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def _pickled(model, io):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a test's own object; real files are safetensors


# ---------------------------------------------------------------------------------------------------------
# Attention masks, FX tracing and TorchScript, as timm's own ViTs have them (issue 26)
# ---------------------------------------------------------------------------------------------------------
def _keep_all_slim(name="deit_small_patch16_224", **overrides):
    """A dense model and the slim model of a plan keeping everything: the same function, block by block."""
    dense = make_vit(name, **overrides)
    searchable = searchable_copy(dense)
    return dense, vitslim.slim(searchable, vitslim.threshold(searchable, 1.0, 1.0, 1.0))


def _block_masks(B: int, N: int, H: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(B, 1, N, N, generator=g) < 0.5) | torch.eye(N, dtype=torch.bool)  # every query keeps itself
    return {"bool (B, 1, N, N)": keep, "bool (N, N)": keep[0, 0],
            "additive (B, H, N, N)": torch.randn(B, H, N, N, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("mask", list(_block_masks(2, 17, 3)))
def test_slim_blocks_apply_attention_masks_as_timms_blocks_do(mask):
    dense, slim = _keep_all_slim()
    attn_mask = _block_masks(2, 17, 3)[mask]
    h = torch.randn(2, 17, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for dense_block, slim_block in zip(dense.blocks, slim.blocks):
            expected = dense_block(h, attn_mask=attn_mask)
            torch.testing.assert_close(slim_block(h, attn_mask=attn_mask), expected, rtol=0, atol=1e-12)
            assert not torch.allclose(expected, dense_block(h))  # the mask mattered
            h = expected


def test_a_causal_slim_block_is_the_lower_triangle_mask():
    _, slim = _keep_all_slim()
    h = torch.randn(2, 17, 48, dtype=torch.float64)
    tril = torch.ones(17, 17, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(slim.blocks[0](h, is_causal=True), slim.blocks[0](h, attn_mask=tril),
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="give attn_mask or is_causal=True, not both"):
        slim.blocks[0](h, attn_mask=tril, is_causal=True)


def test_a_mask_follows_the_tokens_a_block_keeps():
    """A block that drops tokens cuts the mask to them: masking out a dropped token changes nothing, masking a kept
    one does what masking it in the block's own (shorter) sequence does."""
    _, slim, kept = _token_dropped_slim()
    i = next(i for i, b in enumerate(slim.blocks) if b.gather_index is not None)
    block, gather = slim.blocks[i], slim.blocks[i].gather_index
    n_in = slim.num_prefix_tokens + kept[i - 1]  # the previous block's output
    h = torch.randn(2, n_in, 48, dtype=torch.float64)
    dropped = sorted(set(range(n_in)) - set(gather.tolist()))
    keep = torch.ones(n_in, n_in, dtype=torch.bool)
    keep[:, dropped] = False
    with torch.no_grad():
        # A masked call runs the per-head reference, an unmasked one the grouped SDPA: equal to float64 rounding (a
        # dropped token that still counted would move the output by O(1))
        torch.testing.assert_close(block(h, attn_mask=keep), block(h), rtol=0, atol=1e-12)
        kept_key = int(gather[-1])
        keep[:, kept_key] = False
        inner = torch.ones(len(gather), len(gather), dtype=torch.bool)
        inner[:, -1] = False
        expected = block.drop_path1(block.ls1(block.attn(block._scale(block.norm1(h.index_select(1, gather))),
                                                         attn_mask=inner)))
        got = block(h, attn_mask=keep)
        x = h.index_select(1, gather) + expected
        torch.testing.assert_close(got, x + block.drop_path2(block.ls2(block.mlp(block._scale(block.norm2(x))))),
                                   rtol=0, atol=1e-12)


def test_a_model_level_mask_follows_every_blocks_tokens():
    """timm's forward_features gives every block the same mask over the full sequence: each block cuts it to the
    tokens it holds, after drops in earlier blocks too (the reference cuts it to each block's input first)."""
    _, slim, kept = _token_dropped_slim()
    R = slim.num_prefix_tokens
    x = images_for(slim, batch=2)
    full = R + 16
    mask = (torch.rand(full, full, generator=torch.Generator().manual_seed(5)) < 0.6) | torch.eye(full, dtype=torch.bool)
    with torch.no_grad():
        h0 = slim.norm_pre(slim._pos_embed(slim.patch_embed(x)))
        h, expected, positions = h0, h0, list(range(full))  # positions: the block input's, in the full sequence
        for block, b in zip(slim.blocks, slim.slim_plan.blocks):
            h = block(h, attn_mask=mask)
            expected = block(expected, attn_mask=mask[positions][:, positions])
            torch.testing.assert_close(h, expected, rtol=0, atol=1e-12)
            positions = list(range(R)) + [R + p for p in b.tokens]
        unmasked = h0
        for block in slim.blocks:
            unmasked = block(unmasked)
        assert not torch.allclose(h, unmasked)  # the mask mattered


def test_fx_feature_extraction_on_a_token_dropped_slim_model():
    """timm's FX feature extraction (detection and segmentation frameworks take ViT features so) traces through slim
    blocks, and its outputs and gradients are the eager model's."""
    from timm.models import create_feature_extractor
    _, slim, kept = _token_dropped_slim()
    x = images_for(slim, batch=2)
    nodes = {f"blocks.{i}": f"block{i}" for i in range(len(slim.blocks))} | {"head": "logits"}
    extractor = create_feature_extractor(slim, return_nodes=nodes)
    out = extractor(x)
    _, intermediates = slim.forward_intermediates(x, output_fmt="NLC")
    for i, t in enumerate(intermediates):
        torch.testing.assert_close(out[f"block{i}"][:, slim.num_prefix_tokens:], t, rtol=0, atol=1e-12)
    torch.testing.assert_close(out["logits"], slim(x), rtol=0, atol=1e-12)
    out["logits"].sum().backward()
    missing = [n for n, p in extractor.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("variant", ["deit", "deit_distilled", "registers", "avgpool_no_cls"])
def test_torchscript_slim_models_compute_the_eager_model(variant):
    """torch.jit.script works on slim models, as on timm's ViTs (the PyTorch path: kernels are not scripted), with
    dropped tokens and folded token scales too, and the scripted blocks take masks."""
    name, overrides = VARIANTS[variant]
    searchable = searchable_copy(make_vit(name, **overrides))
    randomize_gates(searchable)
    slim = vitslim.slim(searchable, vitslim.threshold(searchable, 0.6, 0.6, 0.5), fold_gates=True).eval()
    assert any(b.gather_index is not None for b in slim.blocks)
    scripted = torch.jit.script(slim)
    x = images_for(slim, batch=2)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), slim(x), rtol=0, atol=1e-12)
        block = slim.blocks[0]
        h = torch.randn(2, slim.num_prefix_tokens + 16, 48, dtype=torch.float64)
        mask = torch.randn(2, 3, h.shape[1], h.shape[1], dtype=torch.float64)
        torch.testing.assert_close(torch.jit.script(block)(h, attn_mask=mask), block(h, attn_mask=mask), rtol=0,
                                   atol=1e-12)

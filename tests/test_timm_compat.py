"""Slim models stay timm citizens: timm's data config survives slim / save / load, and forward_intermediates
works (NLC) or says why not (NCHW) when tokens are dropped."""
import re

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


def test_forward_intermediates_nchw_refuses_blocks_with_dropped_tokens_and_serves_the_others():
    _, slim, kept = _token_dropped_slim()
    x = images_for(slim, batch=2)
    short = [i for i, n in enumerate(kept) if n < 16]
    expected = rf"needs all 16 patches .* block\(s\) {re.escape(str(short))} .* use output_fmt='NLC'"
    with pytest.raises(ValueError, match=expected):
        slim.forward_intermediates(x)  # NCHW is timm's default
    full = [i for i, n in enumerate(kept) if n == 16]
    maps = slim.forward_intermediates(x, indices=full, intermediates_only=True)
    assert [m.shape for m in maps] == [(2, 48, 4, 4)] * len(full)


def test_forward_intermediates_on_a_search_model_after_drop_tokens():
    model = searchable_copy(make_vit())
    randomize_gates(model, token_range=1.0)
    assert vitslim.drop_tokens(model, 0.5) > 0
    x = images_for(model, batch=2)
    with pytest.raises(ValueError, match="use output_fmt='NLC'"):
        model.forward_intermediates(x)
    _, intermediates = model.forward_intermediates(x, output_fmt="NLC")
    assert intermediates[-1].shape[1] < 16


def test_checked_forward_intermediates_survives_copy_and_pickle(tmp_path):
    import copy
    import io

    _, slim, _ = _token_dropped_slim()
    for other in (copy.deepcopy(slim), _pickled(slim, io)):
        assert other.forward_intermediates.args[0] is other  # bound to the copy, not the original
        with pytest.raises(ValueError, match="use output_fmt='NLC'"):
            other.forward_intermediates(images_for(other, batch=1))


def _pickled(model, io):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a test's own object; real files are safetensors

"""save_slim / load_slim: safetensors + JSON, same outputs, clear errors on bad files."""
import json
import re

import pytest
import torch

import vitslim

from .tiny_models import images_for, make_vit, randomize_gates, searchable_copy


def _slim(fold, dtype=torch.float64, name="deit_small_distilled_patch16_224"):
    model = searchable_copy(make_vit(name, dtype=dtype))
    randomize_gates(model)
    plan = vitslim.threshold(model, 0.5, 0.6, 0.7)
    return vitslim.slim(model, plan, fold_gates=fold).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fold", [False, True])
def test_save_load_gives_the_same_outputs(tmp_path, fold, dtype):
    slim = _slim(fold, dtype)
    folder = vitslim.save_slim(slim, tmp_path / "slim")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no pickle
    loaded = vitslim.load_slim(folder)
    assert not loaded.training and next(loaded.parameters()).dtype == dtype
    x = images_for(slim, dtype=dtype)
    torch.testing.assert_close(loaded(x), slim(x), rtol=0, atol=0)
    assert loaded.slim_plan == slim.slim_plan
    assert vitslim.count_params(loaded) == vitslim.count_params(slim)
    vitslim.save_slim(loaded, tmp_path / "again")  # a loaded model saves again


def test_corrupted_and_mismatched_files(tmp_path):
    folder = vitslim.save_slim(_slim(True), tmp_path / "slim")
    weights, config = folder / "model.safetensors", folder / "config.json"
    original = config.read_text()

    cfg = json.loads(original)
    cfg["plan"]["blocks"][0]["mlp"] = cfg["plan"]["blocks"][0]["mlp"][:-1]  # plan no longer fits weights
    config.write_text(json.dumps(cfg))
    with pytest.raises(vitslim.SlimFileError, match=r"blocks\.0\.mlp\.fc1\.(weight|bias) has shape .* the plan needs"):
        vitslim.load_slim(folder)

    cfg = json.loads(original)
    cfg["plan"]["embed_dim"] = 64
    config.write_text(json.dumps(cfg))
    with pytest.raises(vitslim.SlimFileError, match="embed_dim=64"):
        vitslim.load_slim(folder)

    config.write_text("{not json")
    with pytest.raises(vitslim.SlimFileError, match="not valid JSON"):
        vitslim.load_slim(folder)

    config.write_text(original)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(vitslim.SlimFileError, match="not a readable safetensors file"):
        vitslim.load_slim(folder)

    with pytest.raises(vitslim.SlimFileError, match="does not exist"):
        vitslim.load_slim(tmp_path / "nowhere")


def test_save_needs_a_slim_model(tmp_path):
    with pytest.raises(ValueError, match="save_slim takes a model made by vitslim.slim"):
        vitslim.save_slim(make_vit(), tmp_path / "x")


@pytest.mark.parametrize("name,num_classes,pool", [
    ("deit_small_patch16_224", 7, None), ("deit_small_patch16_224", 0, None), ("deit_small_patch16_224", 5, "avg"),
    ("deit_small_distilled_patch16_224", 7, None), ("deit_small_distilled_patch16_224", 0, None)])  # timm: token pool only
def test_a_slim_model_with_a_reset_head_saves_and_loads(tmp_path, name, num_classes, pool):
    slim = _slim(True, name=name)
    slim.reset_classifier(num_classes, pool)  # fine-tuning on another data set
    slim.double()  # timm 1.0.25 makes the new head in the default dtype (float32), 1.0.31 in the model's
    loaded = vitslim.load_slim(vitslim.save_slim(slim, tmp_path / "slim"))
    assert loaded.num_classes == num_classes and loaded.global_pool == slim.global_pool
    x = images_for(slim)
    out = slim(x)
    assert out.shape[-1] == (num_classes or slim.embed_dim)
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)


def test_saved_files_get_the_usual_mode(tmp_path):
    import os
    old = os.umask(0o022)
    try:
        folder = vitslim.save_slim(_slim(False), tmp_path / "slim")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {oct(0o644)}  # not mkstemp's 0600


@pytest.mark.parametrize("field, value, message", [
    ("act", "relu", "act must be one of ['gelu', 'gelu_tanh'], got 'relu'"),
    ("qkv_bias", "yes", "qkv_bias must be true or false, got 'yes'"),
    ("depth", -1, "depth must be a non-negative integer, got -1"),
    ("global_pool", "map", "global_pool must be one of"),
    ("norm_eps", 0.0, "norm_eps must be > 0"),
])
def test_a_config_is_validated_field_by_field(tmp_path, field, value, message):
    folder = vitslim.save_slim(_slim(True), tmp_path / "slim")
    config = folder / "config.json"
    cfg = json.loads(config.read_text())
    cfg["arch"][field] = value
    config.write_text(json.dumps(cfg))
    with pytest.raises(vitslim.SlimFileError, match=re.escape(message)):
        vitslim.load_slim(folder)


def test_set_input_size_is_refused_unless_it_can_be_honoured():
    slim = _slim(False)
    size = slim.slim_arch.img_size
    slim.set_input_size(size)  # the plan's own size: nothing to change
    flops = vitslim.count_flops(slim)
    with pytest.raises(ValueError, match=r"plan is for 32x32 images in 8x8 patches .* accepted: that size only"):
        slim.set_input_size(48)
    assert vitslim.count_flops(slim) == flops
    x = images_for(slim)
    assert slim(x).shape[0] == x.shape[0]  # still works at its size


def test_set_input_size_resizes_a_plan_that_keeps_every_token(tmp_path):
    """No token dropped or scaled: timm's set_input_size (position embedding resampled) and a plan over the new
    grid; with every budget 1.0 the slim model stays the dense timm model, resized alike."""
    dense = make_vit("deit_small_distilled_patch16_224")
    model = searchable_copy(dense)
    slim = vitslim.slim(model, vitslim.threshold(model, 1.0, 1.0, 1.0)).eval()
    slim.set_input_size(48)
    dense.set_input_size(48)
    assert slim.slim_arch.img_size == (48, 48) and slim.slim_plan.num_patches == 36
    assert all(b.tokens == tuple(range(36)) for b in slim.slim_plan.blocks)
    x = images_for(slim)
    assert x.shape[-1] == 48
    with torch.no_grad():
        torch.testing.assert_close(slim(x), dense(x), rtol=1e-12, atol=1e-12)
    pruned = vitslim.slim(model, vitslim.threshold(model, 0.5, 0.6, 1.0)).eval()
    pruned.set_input_size(48)
    loaded = vitslim.load_slim(vitslim.save_slim(pruned, tmp_path / "slim"))
    assert loaded.slim_plan == pruned.slim_plan
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), pruned(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="its token scales .fold_gates. are per position"):
        vitslim.slim(model, vitslim.threshold(model, 0.5, 0.6, 1.0), fold_gates=True).set_input_size(48)

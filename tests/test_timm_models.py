"""timm's model checks, in our words, on slim models of every supported family (issue 26).

What timm's own tests/test_models.py asks of each of its models, asked of slim models (tokens kept, and dropped):
forward (shape, finite), backward (every parameter receives a gradient), the default config and head resets
(reset_classifier to features and to another class count, forward_features / forward_head), forward_intermediates
and features_only in NCHW, FX tracing forward and backward (timm's feature-extraction tracer), TorchScript.
"""
import pytest
import torch
from timm.models._features import FeatureGetterNet
from timm.models._features_fx import create_feature_extractor, get_graph_node_names

import vitslim

from .tiny_models import TINY, VARIANTS, images_for, make_vit, randomize_gates, searchable_copy

CASES = [(variant, drop) for variant in VARIANTS for drop in (False, True)]


def _slim(variant: str, drop: bool) -> torch.nn.Module:
    """A float32 slim model of a tiny timm ViT variant at 60/60 budgets: every patch kept, or 50% of them."""
    name, overrides = VARIANTS[variant]
    searchable = searchable_copy(make_vit(name, dtype=torch.float32, **overrides))
    randomize_gates(searchable)
    plan = vitslim.threshold(searchable, 0.6, 0.6, 0.5 if drop else 1.0)
    slim = vitslim.slim(searchable, plan)
    assert any(b.gather_index is not None for b in slim.blocks) == drop
    return slim


def _images(model, batch=2):
    return images_for(model, batch=batch, dtype=torch.float32)


@pytest.fixture(params=CASES, ids=[f"{v}-{'dropped' if d else 'kept'}" for v, d in CASES])
def slim(request):
    return _slim(*request.param)


def test_forward(slim):
    out = slim.eval()(_images(slim))
    assert out.shape == (2, TINY["num_classes"]) and torch.isfinite(out).all()


def test_backward_reaches_every_parameter(slim):
    out = slim.train()(_images(slim))
    out.mean().backward()
    missing = [n for n, p in slim.named_parameters() if p.grad is None]
    assert not missing, missing


def test_default_cfg_and_head_resets(slim):
    cfg = slim.pretrained_cfg  # the dense model's, naming modules the slim model has, as timm's check asks
    assert {"input_size", "mean", "std", "num_classes", "first_conv", "classifier"} <= set(cfg)
    assert isinstance(slim.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    classifiers = cfg["classifier"] if isinstance(cfg["classifier"], (tuple, list)) else (cfg["classifier"],)
    assert all(isinstance(slim.get_submodule(c), torch.nn.Linear) for c in classifiers)
    x = _images(slim)
    with torch.no_grad():
        features = slim.eval().forward_features(x)
        assert features.shape[0] == 2 and features.shape[-1] == slim.num_features
        pre_logits = slim.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, slim.num_features)
        torch.testing.assert_close(slim.forward_head(features), slim(x))
        slim.reset_classifier(0)
        assert slim(x).shape == (2, slim.num_features)
        torch.testing.assert_close(slim(x), pre_logits)
        slim.reset_classifier(5)
        assert slim(x).shape == (2, 5)


def test_forward_intermediates_and_features_only(slim):
    x = _images(slim)
    grid = tuple(slim.patch_embed.grid_size)
    with torch.no_grad():
        final, maps = slim.eval().forward_intermediates(x)
        assert [m.shape for m in maps] == [(2, slim.embed_dim, *grid)] * len(slim.blocks)
        torch.testing.assert_close(final, slim.forward_features(x))
        for info, m in zip(slim.feature_info, maps):
            assert m.shape[1] == info["num_chs"]
        features = FeatureGetterNet(slim, out_indices=(len(slim.blocks) - 1,))(x)
        torch.testing.assert_close(features[0], maps[-1])


@pytest.mark.parametrize("train", [False, True])
def test_fx_forward_and_backward(slim, train):
    x = _images(slim)
    slim.train(train)
    train_nodes, eval_nodes = get_graph_node_names(slim)
    nodes = train_nodes if train else eval_nodes
    fx = create_feature_extractor(slim, return_nodes=[nodes[-1]])
    out = fx.train(train)(x)[nodes[-1]]
    if not train:
        with torch.no_grad():
            torch.testing.assert_close(out, slim(x))
        return
    out.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript(slim):
    x = _images(slim)
    scripted = torch.jit.script(slim.eval())
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), slim(x))

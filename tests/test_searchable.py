"""The search model computes docs/design.md section 2, through both plain-PyTorch implementations."""
import pytest
import torch

import vitslim
from vitslim.gates import TOKEN_GATE_INIT

from .tiny_models import images_for, make_vit, randomize_gates, saturate_token_gates, searchable_copy
from .reference_vit import reference_forward

IMPLS = ("eager", "folded")


@pytest.mark.parametrize("search, attn_shape", [("dims", (3, 16)), ("heads", (3, 1)), ("uniform", (1, 16))])
def test_gate_shapes_and_init(search, attn_shape):
    model = searchable_copy(make_vit(), search=search)
    gates = vitslim.gates(model)
    assert len(gates) == 3
    for g in gates:
        assert isinstance(g.attn, torch.nn.Parameter) and g.attn.shape == attn_shape
        assert g.mlp.shape == (192,) and g.tokens.shape == (16,)
        assert torch.all(g.attn == 1.0) and torch.all(g.mlp == 1.0)
        assert torch.all(g.tokens == TOKEN_GATE_INIT) and TOKEN_GATE_INIT == 3.0
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.gates.attn", "blocks.0.gates.mlp", "blocks.0.gates.tokens", "blocks.0.attn.qkv.weight"} <= names


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("impl", IMPLS)
def test_neutral_gates_equal_timm(variant, impl, fused_attn):
    name, overrides = variant
    dense = make_vit(name, fused_attn=fused_attn, **overrides)
    x = images_for(dense)
    expected = dense(x)
    model = searchable_copy(dense)
    saturate_token_gates(model)
    vitslim.set_implementation(model, impl)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("search", ["dims", "heads", "uniform"])
@pytest.mark.parametrize("impl", IMPLS)
def test_random_gates_equal_reference_outputs_and_gradients(variant, impl, search):
    name, overrides = variant
    model = searchable_copy(make_vit(name, **overrides), search=search)
    randomize_gates(model)
    vitslim.set_implementation(model, impl)
    x = images_for(model).requires_grad_(True)
    gates = vitslim.gates(model)
    params = [p for p in model.parameters() if p.requires_grad]

    out = model(x)
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out * weights).sum(), params + [x])

    ref_out = reference_forward(model, x, [g.attn for g in gates], [g.mlp for g in gates],
                                [g.tokens for g in gates])
    expected = torch.autograd.grad((ref_out * weights).sum(), params + [x])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    names = [n for n, p in model.named_parameters() if p.requires_grad] + ["input"]
    assert any(n.endswith("gates.tokens") for n in names) and any(n.endswith("qkv.bias") or n.endswith("fc1.bias") for n in names)
    for n, a, b in zip(names, got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"gradient of {n}: {m}")


def test_eager_and_folded_agree_in_float32_training_mode():
    # Dropouts at 0 so both paths are deterministic; drop path is identity at rate 0.
    model = searchable_copy(make_vit(dtype=torch.float32))
    randomize_gates(model)
    model.train()
    x = images_for(model, dtype=torch.float32)
    grads = {}
    for impl in IMPLS:
        vitslim.set_implementation(model, impl)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        grads[impl] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (oa, ga), (ob, gb) = grads["eager"], grads["folded"]
    torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_sparsity_losses_are_the_unweighted_sums():
    model = searchable_copy(make_vit())
    randomize_gates(model)
    gates = vitslim.gates(model)
    attn_l1, mlp_l1, tok_l1 = vitslim.sparsity_losses(model)
    assert attn_l1.item() == pytest.approx(sum(g.attn.abs().sum().item() for g in gates), rel=1e-12)
    assert mlp_l1.item() == pytest.approx(sum(g.mlp.abs().sum().item() for g in gates), rel=1e-12)
    assert tok_l1.item() == pytest.approx(sum(g.tokens.tanh().abs().sum().item() for g in gates), rel=1e-12)
    (attn_l1 + mlp_l1 + tok_l1).backward()
    assert torch.equal(gates[0].attn.grad, gates[0].attn.detach().sign())


def test_fused_without_kernels_computes_the_same_function():
    dense = make_vit()
    x = images_for(dense)
    a = searchable_copy(dense, fused=True)
    b = searchable_copy(dense)
    for m in (a, b):
        randomize_gates(m)
    with pytest.warns(UserWarning, match="fused"):
        out = a(x)
    torch.testing.assert_close(out, b(x), rtol=0, atol=1e-12)


def test_make_searchable_is_in_place_and_refuses_twice():
    dense = make_vit()
    assert vitslim.make_searchable(dense) is dense
    with pytest.raises(ValueError, match="already searchable"):
        vitslim.make_searchable(dense)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"search must be one of 'dims', 'heads', 'uniform', got 'tokens'"):
        vitslim.make_searchable(make_vit(), search="tokens")
    with pytest.raises(ValueError, match="implementation must be one of .* got 'cuda'"):
        vitslim.set_implementation(searchable_copy(make_vit()), "cuda")
    with pytest.raises(ValueError, match="make_searchable"):
        vitslim.gates(make_vit())
    model = searchable_copy(make_vit())
    with pytest.raises(ValueError, match=r"expected input \(B, 17, C\)"):
        model.blocks[0](torch.zeros(1, 9, 48, dtype=torch.float64))


@pytest.mark.parametrize("training", [False, True])
def test_every_module_vitslim_builds_takes_the_mode_of_what_it_replaces(training, tmp_path):
    """With dropout and drop path on, a module left in training mode in an eval model changes its output from call
    to call: make_searchable, slim and set_fused keep the model's mode in every module; load_slim gives eval."""
    from vitslim.slim import set_fused
    model = make_vit(attn_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.1).train(training)

    def modes(m):
        return {name or "(model)": sub.training for name, sub in m.named_modules() if sub.training != training}
    vitslim.make_searchable(model)
    assert modes(model) == {}
    randomize_gates(model)
    x = images_for(model)
    if not training:
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
    plan = vitslim.threshold(model, budget_attn=0.7, budget_mlp=0.7, budget_tokens=0.7)
    for fold_gates in (False, True):
        slim = vitslim.slim(model, plan, fold_gates=fold_gates)
        assert modes(slim) == {}
        assert modes(set_fused(slim, True)) == {}
        if not training:
            with torch.no_grad():
                assert torch.equal(slim(x), slim(x))
    vitslim.save_slim(slim, tmp_path / "slim")
    loaded = vitslim.load_slim(tmp_path / "slim")
    assert not any(m.training for m in loaded.modules())


def test_one_keyword_picks_the_path_and_fused_stays_its_alias():
    """implementation= names the path (vitslim.implementations); fused=True is "fused"; a disagreement or an
    unknown name is refused, naming what is accepted."""
    model = make_vit()
    blocks = lambda m: {b.implementation for b in vitslim.searchable.searchable_blocks(m)}  # noqa: E731
    assert blocks(searchable_copy(model, implementation="eager")) == {"eager"}
    assert blocks(searchable_copy(model, fused=True)) == blocks(searchable_copy(model, implementation="fused")) == {
        "fused"}
    assert blocks(searchable_copy(model)) == {"folded"}
    with pytest.raises(ValueError, match="fused=True and implementation='eager' disagree"):
        searchable_copy(model, fused=True, implementation="eager")
    with pytest.raises(ValueError, match="implementation must be one of 'eager', 'folded', 'fused', got 'triton'"):
        searchable_copy(model, implementation="triton")

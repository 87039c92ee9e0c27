"""The fused search-path ops (issue 4) against their references: layernorm_token_scale, gated_linear,
gated_gelu_linear, gated_attention_branch and gated_mlp_branch. Outputs and the gradient of every input, weight,
bias and gate, run by Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET once, when it is imported (see test_ragged_attention_triton.py, whose pattern this
file copies): when this process imported triton with it, the CPU tests run here; otherwise they are skipped here
and `test_cpu_tests_under_the_interpreter` reruns this file in a fresh process with TRITON_INTERPRET=1.
"""
import contextlib
import functools
import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from vitslim_kernels import (dispatch, explain, gated_attention_branch, gated_attention_branch_ref,  # noqa: E402
                             gated_gelu_linear, gated_gelu_linear_ref, gated_linear, gated_linear_ref,
                             gated_mlp_branch, gated_mlp_branch_ref, layernorm_token_scale,
                             layernorm_token_scale_ref, select)

from .interpreter import INTERPRETED, poison_allocations, rerun_under_interpreter, require_interpreter  # noqa: E402
from .tolerance import assert_within_spec  # noqa: E402

EPS = 1e-6
KERNEL_MODULES = tuple(sorted({m for info in dispatch.op_infos() for m in info.kernel_modules if ".triton." in m}))
OPS = ("layernorm_token_scale", "gated_linear", "gated_gelu_linear", "gated_attention_branch", "gated_mlp_branch")

# Kernel error allowed on top of 2x the error of the reference run in the same dtype (docs/conventions.md), in units
# of the compute dtype's eps times the largest |expected| value of the tensor (at least 1). Measured over these
# tests with 5 seeds (the kernel's excess over 2x the reference's error, in those units):
# fp32: 8 eps. At most 3.0 (gated_attention_branch dqkv_bias: ragged_attention rescales its online softmax
# and recomputes P from the logsumexp in base 2, see its own test, which allows 32); 0.4 for every other
# gradient (LayerNorm dtoken_raw: the kernel sums dy * LN(x) per row before the batch, autograd the other way
# round; gated_linear dgate: the folding algebra sums dW' * W instead of dy * y). 8 leaves a 2.7x margin, while
# an indexing, masking or formula bug gives errors of order 1.
# fp16/bf16: at most 0.3 (LayerNorm output rounded to bf16); 4 eps as in the ragged-attention test (not yet
# measured on a GPU, where cuBLAS replaces the CPU matmuls in both the kernel path and the reference).
FLOOR_EPS = {torch.float32: 8, torch.float16: 4, torch.bfloat16: 4}


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


@pytest.fixture
def poisoned(monkeypatch):
    poison_allocations(monkeypatch, *(importlib.import_module(name) for name in KERNEL_MODULES))


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def _assert_within_spec(name, got, ref_same_dtype, expected, compute_dtype):
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    if got.numel() == 0:
        return
    assert_within_spec(name, got, ref_same_dtype, expected, FLOOR_EPS[compute_dtype], compute_dtype)


def _run(fn, inputs, dtype, grad_out, autocast=None):
    """Output of fn(**inputs) and the gradient of each floating input; inputs cast to dtype (None stays None)."""
    leaves = {k: v.detach().to(dtype).clone().requires_grad_() if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    device_type = next(v.device.type for v in leaves.values() if isinstance(v, torch.Tensor))
    with torch.autocast(device_type, dtype=autocast) if autocast else contextlib.nullcontext():
        out = fn(**leaves)
    out.backward(grad_out.to(out.device, out.dtype))
    return out.detach(), {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}


def _check(triton_fn, ref_fn, inputs, dtype=torch.float32, autocast=None, exact_fn=None):
    """triton_fn in dtype (under autocast if given) against ref_fn in the same setting and against exact_fn
    (default ref_fn) in float64."""
    inputs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    exact_fn = exact_fn or ref_fn
    grad_out = _grad_out(exact_fn, inputs)
    exp_out, exp_grads = _run(exact_fn, inputs, torch.float64, grad_out)
    out, grads = _run(triton_fn, inputs, dtype, grad_out, autocast)
    ref_out, ref_grads = _run(ref_fn, inputs, dtype, grad_out, autocast)
    assert out.dtype == ref_out.dtype, f"output dtype {out.dtype}, the reference gives {ref_out.dtype}"
    compute_dtype = max(autocast or dtype, out.dtype, key=lambda t: torch.finfo(t).eps)  # the coarser
    _assert_within_spec("out", out, ref_out, exp_out, compute_dtype)
    assert grads.keys() == exp_grads.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == ref_grads[name].dtype
        _assert_within_spec(f"d{name}", grads[name], ref_grads[name], exp_grads[name], compute_dtype)
    return out, grads


def _grad_out(ref_fn, inputs):
    with torch.no_grad():
        shape = ref_fn(**inputs).shape
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _triton(fn):
    return functools.partial(fn, implementation="triton")


def _gate(n, zero=slice(0, 0)):
    """A gate of n values in (-0.5, 1.5): mostly open, some negative (a gate may cross zero), zeros at `zero`."""
    g = 2 * torch.rand(n, dtype=torch.float64) - 0.5
    g[zero] = 0.0
    return g


def _ln_inputs(B, N_in, C, P_kept):
    return dict(x=2 * torch.randn(B, N_in, C, dtype=torch.float64) + 0.5,
                weight=1 + 0.5 * torch.randn(C, dtype=torch.float64),
                bias=0.5 * torch.randn(C, dtype=torch.float64),
                token_raw=torch.cat([torch.zeros(min(P_kept, 1), dtype=torch.float64),  # tanh(0) = 0: a closed gate
                                     1.5 * torch.randn(max(P_kept - 1, 0), dtype=torch.float64)]))


def _linear_inputs(B, N, C, O, bias=True):
    return dict(x=torch.randn(B, N, C, dtype=torch.float64),
                weight=2 * torch.randn(O, C, dtype=torch.float64) / C ** 0.5,  # pre-activations of order 2
                bias=0.5 * torch.randn(O, dtype=torch.float64) if bias else None)


# ---------------------------------------------------------------------------------------------------------
# LayerNorm + token scale + gather
# ---------------------------------------------------------------------------------------------------------

def _ln_fns(num_prefix, gather, out_dtype=None):
    """(Triton, reference) as functions of the tensors only."""
    def triton_fn(x, weight, bias, token_raw):
        return layernorm_token_scale(x, weight, bias, EPS, token_raw, num_prefix, gather, out_dtype=out_dtype,
                                     implementation="triton")

    def ref_fn(x, weight, bias, token_raw):
        return layernorm_token_scale_ref(x, weight, bias, EPS, token_raw, num_prefix, gather, out_dtype=out_dtype)
    return triton_fn, ref_fn


@pytest.mark.parametrize("N_in, gather, num_prefix", [
    (17, None, 1),                                   # no gather: every row, class token first
    (50, (0, 1, 3, 4, 10, 22, 23, 41, 49), 2),       # two prefix rows, 7 of 48 patches kept (last one too)
    (50, (0, 1), 2),                                 # every patch dropped but the prefix
    (17, "tensor", 0),                               # no prefix row (global-pool ViT); gather as a CPU tensor
])
def test_layernorm_token_scale(N_in, gather, num_prefix, poisoned):
    torch.manual_seed(0)
    if gather == "tensor":
        gather = torch.tensor([2, 3, 5, 16])
    n_out = N_in if gather is None else len(gather)
    fn, ref = _ln_fns(num_prefix, gather)
    _, grads = _check(fn, ref, _ln_inputs(3, N_in, 48, n_out - num_prefix))
    if gather is not None:  # rows the gather drops get an exact zero gradient (and are written: no NaN)
        kept = gather.tolist() if isinstance(gather, torch.Tensor) else list(gather)
        dropped = [n for n in range(N_in) if n not in kept]
        assert torch.equal(grads["x"][:, dropped], torch.zeros_like(grads["x"][:, dropped]))


@pytest.mark.parametrize("C", [32, 44, 40])
def test_layernorm_token_scale_column_slices(C, poisoned):
    # The kernels hold a row as power-of-two slices A + B: 32 = one slice; 44 = 32 + 16 with the last 4 columns
    # masked; 40 = 32 + 8 exactly (48, as above, is 32 + 16).
    from vitslim_kernels.triton.layernorm_token_scale import _column_slices
    assert {32: (32, 0), 44: (32, 16), 40: (32, 8)}[C] == _column_slices(C)
    torch.manual_seed(0)
    gather = (0, 1, 3, 4, 10, 16)
    fn, ref = _ln_fns(2, gather)
    _check(fn, ref, _ln_inputs(3, 17, C, len(gather) - 2))


def test_column_slices_cover_every_width_without_waste():
    from vitslim_kernels.triton.layernorm_token_scale import _column_slices
    assert [_column_slices(c) for c in (192, 384, 768, 1024, 1280, 448)] == [
        (128, 64), (256, 128), (512, 256), (1024, 0), (1024, 256), (512, 0)]
    for c in range(1, 2049):
        a, b = _column_slices(c)
        assert a + b >= c and a & (a - 1) == 0 and b & (b - 1) == 0 and b < a, c
        assert a + b <= triton.next_power_of_2(c), c  # never more lanes than one power-of-two tile


@pytest.mark.parametrize("dtype, out_dtype", [(torch.float16, None), (torch.float32, torch.bfloat16)])
def test_layernorm_token_scale_low_precision(dtype, out_dtype, poisoned):
    # (float32, bfloat16): fp32 residual stream in, bf16 out for the next matmul, as under autocast.
    torch.manual_seed(0)
    gather = (0, 1, 3, 4, 10, 22, 23, 41, 49)
    fn, ref = _ln_fns(2, gather, out_dtype)
    _, exact = _ln_fns(2, gather)
    out, _ = _check(fn, ref, _ln_inputs(3, 50, 48, len(gather) - 2), dtype=dtype, exact_fn=exact)
    assert out.dtype == (out_dtype or dtype)


# ---------------------------------------------------------------------------------------------------------
# gated_linear (qkv) and gated_gelu_linear (fc1)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N, H, d, bias", [(17, 3, 16, True), (50, 2, 24, False)])
def test_gated_linear(N, H, d, bias, poisoned):
    torch.manual_seed(0)
    C = 48
    inputs = _linear_inputs(3, N, C, 3 * H * d, bias)
    inputs["gate"] = _gate(H * d, zero=slice(d, 2 * d))  # head 1 fully pruned
    _check(_triton(gated_linear), gated_linear_ref, inputs)


@pytest.mark.parametrize("N, M, approximate, bias", [(17, 96, "none", True), (50, 192, "tanh", False)])
def test_gated_gelu_linear(N, M, approximate, bias, poisoned):
    torch.manual_seed(0)
    inputs = _linear_inputs(3, N, 48, M, bias)
    inputs["gate"] = _gate(M, zero=slice(0, M, 7))
    _check(functools.partial(_triton(gated_gelu_linear), approximate=approximate),
           functools.partial(gated_gelu_linear_ref, approximate=approximate), inputs)


def test_gated_linear_fp16(poisoned):
    torch.manual_seed(0)
    inputs = _linear_inputs(3, 17, 48, 144)
    inputs["gate"] = _gate(48, zero=slice(16, 32))
    out, _ = _check(_triton(gated_linear), gated_linear_ref, inputs, dtype=torch.float16)
    assert out.dtype == torch.float16


def test_gated_gelu_linear_fp16(poisoned):
    torch.manual_seed(0)
    inputs = _linear_inputs(3, 17, 48, 96)
    inputs["gate"] = _gate(96, zero=slice(0, 96, 7))
    _check(_triton(gated_gelu_linear), gated_gelu_linear_ref, inputs, dtype=torch.float16)


@pytest.mark.parametrize("op", ["gated_linear", "gated_gelu_linear"])
def test_autocast_bf16(op, poisoned):
    # The search recipe: fp32 parameters and activations under bf16 autocast. Outputs come in bf16, parameter
    # and gate gradients in fp32, all within the rule against the reference under the same autocast.
    torch.manual_seed(0)
    O = 144 if op == "gated_linear" else 96
    inputs = _linear_inputs(3, 17, 48, O)
    inputs["gate"] = _gate(48 if op == "gated_linear" else O)
    fn, ref = {"gated_linear": (gated_linear, gated_linear_ref),
               "gated_gelu_linear": (gated_gelu_linear, gated_gelu_linear_ref)}[op]
    out, grads = _check(_triton(fn), ref, inputs, dtype=torch.float32, autocast=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in grads.values())


# ---------------------------------------------------------------------------------------------------------
# The composed branches
# ---------------------------------------------------------------------------------------------------------

def _attention_inputs(N, H, d, C=48):
    inputs = dict(u_scaled=torch.randn(3, N, C, dtype=torch.float64),
                  qkv_weight=torch.randn(3 * H * d, C, dtype=torch.float64) / C ** 0.5,
                  qkv_bias=0.5 * torch.randn(3 * H * d, dtype=torch.float64),
                  attn_gate=_gate(H * d).view(H, d),
                  proj_weight=torch.randn(C, H * d, dtype=torch.float64) / (H * d) ** 0.5,
                  proj_bias=0.5 * torch.randn(C, dtype=torch.float64))
    inputs["attn_gate"][H - 1] = 0.0  # the last head fully pruned
    return inputs


@pytest.mark.parametrize("N, H, d", [(17, 3, 16), (50, 2, 24)])
def test_gated_attention_branch(N, H, d, poisoned):
    torch.manual_seed(0)
    args = dict(num_heads=H, scale=d ** -0.5)
    _check(functools.partial(_triton(gated_attention_branch), **args),
           functools.partial(gated_attention_branch_ref, **args), _attention_inputs(N, H, d))


@pytest.mark.parametrize("N, M, approximate", [(17, 96, "none"), (50, 192, "tanh")])
def test_gated_mlp_branch(N, M, approximate, poisoned):
    torch.manual_seed(0)
    C = 48
    inputs = dict(w_scaled=torch.randn(3, N, C, dtype=torch.float64),
                  fc1_weight=2 * torch.randn(M, C, dtype=torch.float64) / C ** 0.5,
                  fc1_bias=0.5 * torch.randn(M, dtype=torch.float64),
                  mlp_gate=_gate(M, zero=slice(0, M, 5)),
                  fc2_weight=torch.randn(C, M, dtype=torch.float64) / M ** 0.5,
                  fc2_bias=0.5 * torch.randn(C, dtype=torch.float64))
    _check(functools.partial(_triton(gated_mlp_branch), approximate=approximate),
           functools.partial(gated_mlp_branch_ref, approximate=approximate), inputs)


# ---------------------------------------------------------------------------------------------------------
# Custom ops, dispatch, errors
# ---------------------------------------------------------------------------------------------------------

def test_dispatch_prefers_triton_under_interpreter():
    x = torch.zeros(2, 17, 48)
    for op in OPS:
        assert explain(op, x) == [("triton", None), ("reference", None)], op
    assert select("gated_linear", x) is importlib.import_module("vitslim_kernels.ops.gated_linear") \
        .gated_linear_triton


def test_float64_and_cpu_without_interpreter_go_to_reference(monkeypatch):
    for op in OPS:
        reasons = dict(explain(op, torch.zeros(2, 17, 48, dtype=torch.float64)))
        assert "torch.float64" in reasons["triton"] and reasons["reference"] is None
    monkeypatch.delenv("TRITON_INTERPRET")
    for op in OPS:  # (every reason: this process imported triton interpreted, so unsetting it is a second one)
        assert dict(explain(op, torch.zeros(2, 17, 48))) == {
            "triton": "CPU tensor and TRITON_INTERPRET is not 1; TRITON_INTERPRET is not 1 but triton was imported "
                      "with it (triton reads it once, at import)", "reference": None}
    inputs = _linear_inputs(2, 17, 48, 96)
    inputs = {k: v.float() for k, v in inputs.items()}
    gate = torch.rand(96)
    assert torch.equal(gated_gelu_linear(**inputs, gate=gate), gated_gelu_linear_ref(**inputs, gate=gate))


def test_dropout_is_refused():
    a = _attention_inputs(17, 3, 16)
    with pytest.raises(ValueError, match="attn_drop=0.1"):
        gated_attention_branch(**a, num_heads=3, scale=0.25, attn_drop=0.1)
    with pytest.raises(ValueError, match="proj_drop=0.2"):
        gated_attention_branch(**a, num_heads=3, scale=0.25, proj_drop=0.2)
    w = torch.randn(96, 48)
    with pytest.raises(ValueError, match="drop=0.1"):
        gated_mlp_branch(torch.randn(1, 17, 48), w, None, torch.ones(96), w.t(), None, drop=0.1)


def test_bad_arguments():
    x, w, b = torch.randn(2, 17, 48), torch.randn(48), torch.randn(48)
    with pytest.raises(ValueError, match="strictly increasing"):
        layernorm_token_scale(x, w, b, EPS, torch.zeros(2), 1, (0, 5, 3))
    with pytest.raises(ValueError, match=r"lie in \[0, 17\)"):
        layernorm_token_scale(x, w, b, EPS, torch.zeros(2), 1, (0, 5, 17))
    with pytest.raises(ValueError, match="num_prefix \\+ len\\(token_raw\\) = 1 \\+ 15 = 16"):
        layernorm_token_scale(x, w, b, EPS, torch.zeros(15), 1)
    with pytest.raises(ValueError, match="length dividing out_features = 144"):
        gated_linear(x, torch.randn(144, 48), None, torch.ones(47))
    with pytest.raises(ValueError, match="approximate"):
        gated_gelu_linear(x, torch.randn(96, 48), None, torch.ones(96), "erf")
    with pytest.raises(ValueError, match="attn_gate must be"):
        gated_attention_branch(x, torch.randn(144, 48), None, torch.ones(48), torch.randn(48, 48), None, 3, 0.25)


# ---------------------------------------------------------------------------------------------------------
# GPU: compiled kernels, fp32 / bf16 / fp16, N = 197, deterministic backward
# ---------------------------------------------------------------------------------------------------------

def _gpu_case(op, autocast=None):
    """(triton fn, reference fn, exact fn, float64 inputs on the GPU) at DeiT-S-like shapes, N = 197, batch 3."""
    B, N, C, H, d, M = 3, 197, 384, 6, 64, 1536
    if op == "layernorm_token_scale":
        gather = tuple([0] + sorted(torch.randperm(196)[:137].add(1).tolist()))  # a 70% token budget
        inputs = _ln_inputs(B, N, C, len(gather) - 1)
        fn, ref = _ln_fns(1, gather, out_dtype=autocast)  # bf16 out under autocast, as the search block asks
        exact = _ln_fns(1, gather)[1]
    elif op == "gated_linear":
        inputs = dict(_linear_inputs(B, N, C, 3 * C), gate=_gate(C, zero=slice(64, 128)))
        fn, ref = _triton(gated_linear), gated_linear_ref
    elif op == "gated_gelu_linear":
        inputs = dict(_linear_inputs(B, N, C, M), gate=_gate(M, zero=slice(0, M, 7)))
        fn, ref = _triton(gated_gelu_linear), gated_gelu_linear_ref
    elif op == "gated_attention_branch":
        inputs = _attention_inputs(N, H, d, C)
        fn = functools.partial(_triton(gated_attention_branch), num_heads=H, scale=d ** -0.5)
        ref = functools.partial(gated_attention_branch_ref, num_heads=H, scale=d ** -0.5)
    else:
        inputs = dict(w_scaled=torch.randn(B, N, C, dtype=torch.float64),
                      fc1_weight=2 * torch.randn(M, C, dtype=torch.float64) / C ** 0.5,
                      fc1_bias=0.5 * torch.randn(M, dtype=torch.float64), mlp_gate=_gate(M, zero=slice(0, M, 5)),
                      fc2_weight=torch.randn(C, M, dtype=torch.float64) / M ** 0.5,
                      fc2_bias=0.5 * torch.randn(C, dtype=torch.float64))
        fn, ref = _triton(gated_mlp_branch), gated_mlp_branch_ref
    if op != "layernorm_token_scale":
        exact = ref
    return fn, ref, exact, {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def _compare_on_gpu(op, dtype, autocast, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    fn, ref, exact, inputs = _gpu_case(op, autocast)
    out, grads = _check(fn, ref, inputs, dtype=dtype, autocast=autocast, exact_fn=exact)
    # Deterministic backward: no atomics, so a second run is bit-identical (on a GPU this can fail).
    out_again, grads_again = _run(fn, inputs, dtype, _grad_out(exact, inputs), autocast)
    assert torch.equal(out, out_again)
    for name in grads:
        assert torch.equal(grads[name], grads_again[name]), f"d{name} differs between two identical runs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 for this run: the kernels are interpreted")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_compiled_on_gpu(op, dtype, monkeypatch, poisoned):
    _compare_on_gpu(op, dtype, None, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 for this run: the kernels are interpreted")
@pytest.mark.parametrize("op", OPS)
def test_compiled_on_gpu_under_bf16_autocast(op, monkeypatch, poisoned):
    _compare_on_gpu(op, torch.float32, torch.bfloat16, monkeypatch)

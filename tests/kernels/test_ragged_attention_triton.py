"""Triton ragged attention against the reference: outputs and dq, dk, dv, run by Triton's interpreter on CPU
(in a fresh process when this one imported triton compiled: see tests/kernels/interpreter.py)."""
import importlib
import itertools
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

from vitslim_kernels import explain, ragged_attention, ragged_attention_ref, select  # noqa: E402
from vitslim_kernels.ops.ragged_attention import ragged_attention_triton  # noqa: E402

from .interpreter import INTERPRETED, poison_allocations, rerun_under_interpreter, require_interpreter  # noqa: E402
from .tolerance import assert_within_spec  # noqa: E402

SCALE = 64 ** -0.5  # a pruned head keeps its original width's scale (docs/design.md section 4)

# Kernel error allowed on top of 2x the error of the reference run in the same dtype (docs/conventions.md), in
# units of the dtype's eps times the largest |expected| value of the tensor. fp32: the fp32 reference is
# itself very accurate while the kernel rescales its online softmax and recomputes P from the saved
# logsumexp in base 2; measured up to ~5x the reference's error (dk: 4.0e-6 vs 7.6e-7 at max |dk| = 4.2), so
# 32 eps (1.6e-5 there) leaves a 4x margin, while an indexing or masking bug gives errors of order 1.
# fp16: both errors are dominated by rounding P and O to fp16, so 2x the reference plus 4 eps.
FLOOR_EPS = {torch.float32: 32, torch.float16: 4, torch.bfloat16: 4}


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


@pytest.fixture
def kernels():
    return importlib.import_module("vitslim_kernels.triton.ragged_attention")


@pytest.fixture
def poisoned(monkeypatch, kernels):
    poison_allocations(monkeypatch, kernels)


def _assert_within_spec(name, got, ref_same_dtype, expected):
    assert_within_spec(name, got, ref_same_dtype, expected, FLOOR_EPS[got.dtype], got.dtype)


def _run(fn, qkv, grad_out, head_dims, dtype, layout):
    """Output and d(qkv) of fn on q, k, v taken from one (B, N, 3D) leaf tensor.

    layout "split": q, k, v are strided views (qkv.split), as a fused qkv projection gives them;
    layout "separate": three contiguous tensors.
    """
    leaf = qkv.detach().to(dtype).clone().requires_grad_()
    D = leaf.shape[-1] // 3
    if layout == "split":
        q, k, v = leaf.split(D, dim=-1)
    else:
        q, k, v = (t.contiguous() for t in leaf.split(D, dim=-1))
    out = fn(q, k, v, head_dims, SCALE)
    out.backward(grad_out.to(dtype).expand(out.shape))
    return out.detach(), leaf.grad


def _triton(q, k, v, head_dims, scale):
    return ragged_attention(q, k, v, head_dims, scale, implementation="triton")


def _check_against_reference(head_dims, N, B, dtype, layout, expanded_grad=False):
    torch.manual_seed(0)
    D = sum(head_dims)
    qkv = 1.5 * torch.randn(B, N, 3 * D, dtype=torch.float64)  # scores spread enough for a peaked softmax
    if expanded_grad:  # dO with zero strides (expanded in _run), as out.sum().backward() gives
        grad_out = torch.randn(1, 1, D, dtype=torch.float64)
    else:
        grad_out = torch.randn(B, N, D, dtype=torch.float64)
    out, dqkv = _run(_triton, qkv, grad_out, head_dims, dtype, layout)
    ref_out, ref_dqkv = _run(ragged_attention_ref, qkv, grad_out, head_dims, dtype, layout)
    exp_out, exp_dqkv = _run(ragged_attention_ref, qkv, grad_out, head_dims, torch.float64, layout)
    assert out.dtype == dtype and out.shape == (B, N, D)
    _assert_within_spec("out", out, ref_out, exp_out)
    for name, got, ref, exp in zip(("dq", "dk", "dv"), dqkv.split(D, -1), ref_dqkv.split(D, -1),
                                   exp_dqkv.split(D, -1)):
        _assert_within_spec(name, got, ref, exp)


@pytest.mark.parametrize("head_dims, N, layout, expanded_grad", [
    ((17, 0, 41, 1), 17, "split", False),    # odd widths, a fully pruned head, a width-1 head
    ((64, 63), 50, "split", False),          # full and nearly full heads, 4 key blocks with a partial one
    ((0, 0, 5, 0), 17, "split", False),      # every head pruned but one
    ((3, 1), 50, "separate", True),          # sum(head_dims) = 4; contiguous inputs; zero-stride dO
    ((16, 0, 16, 16), 50, "split", False),   # uniform kept width (the search's compile-time width path)
    ((8, 24, 0, 16), 50, "split", False),    # ragged, every offset and width a multiple of 8: aligned loads
    ((48, 0, 48), 17, "split", False),       # uniform width tiled as 32 + 16 columns (split-D)
    ((40, 80, 9), 17, "split", False),       # ragged split tiles 32 + 16 and 64 + 16 next to a single 16
])
def test_matches_reference_fp32(head_dims, N, layout, expanded_grad, poisoned):
    _check_against_reference(head_dims, N, B=3, dtype=torch.float32, layout=layout, expanded_grad=expanded_grad)


def test_matches_reference_fp16(poisoned):
    # bf16 is only tested on a GPU: Triton's interpreter computes tl.dot on bfloat16 operands wrongly
    # (triton 3.9: a 16x16 bf16 dot is off by ~1e10).
    _check_against_reference((17, 0, 41, 1), 17, B=2, dtype=torch.float16, layout="split")


@pytest.mark.parametrize("head_dims, N, split", [
    ((40, 80, 8), 17, (48, 80, 16)),     # aligned ragged: tiles 32 + 16 and 64 + 16 beside a single 16
    ((48, 0, 48), 50, (48, 48)),         # aligned uniform width, 32 + 16
])
def test_backward_takes_split_tiles_on_aligned_fp16(head_dims, N, split, monkeypatch, kernels, poisoned):
    """16-bit heads on 16-byte-aligned columns run the backward in split tiles (41 -> 32 + 16, not 64); within
    the kernel spec of the float64 reference."""
    launches = []
    wrap = kernels.wrap_triton

    def recording(kernel):
        def at(grid):
            def launch(*args, **kwargs):
                launches.append((kernel, args, kwargs))
                return wrap(kernel)[grid](*args, **kwargs)
            return launch
        return _Indexable(at)
    monkeypatch.setattr(kernels, "wrap_triton", recording)
    _check_against_reference(head_dims, N, B=2, dtype=torch.float16, layout="split")
    (bwd,) = [(args, kw) for kernel, args, kw in launches if kernel is kernels._ragged_attention_bwd_kernel]
    args, kw = bwd
    assert kw["SPLIT_D"] and kw["VEC"] == 8
    if kw["HEAD_D"]:
        assert (kw["UNIFORM_A"], kw["UNIFORM_B"]) == (32, 16)
    else:
        assert args[13].tolist() == list(split)  # the tile column of the head table


class _Indexable:
    def __init__(self, at):
        self._at = at

    def __getitem__(self, grid):
        return self._at(grid)


def test_alignment_is_proven_from_offsets_widths_and_strides(kernels):
    def vec(head_dims, dtype=torch.bfloat16, layout="split"):
        D = sum(head_dims)
        qkv = torch.zeros(2, 50, 3 * D, dtype=dtype)
        q = qkv[..., :D] if layout == "split" else torch.zeros(2, 50, D, dtype=dtype)
        return kernels._alignment(tuple(head_dims), (q,))

    assert vec((64, 64, 0, 64)) == 8                 # 16 bytes of bf16: v4 loads
    assert vec((64, 64), torch.float32) == 4         # 16 bytes of fp32
    assert vec((40, 0, 24, 8)) == 8                  # ragged but every offset and width a multiple of 8
    assert vec((40, 0, 20, 8)) == 4                  # a width of 20: 8 bytes
    assert vec((17, 0, 41, 1)) == 1                  # nothing to prove
    assert vec((24, 24), layout="separate") == 8     # row stride 48
    assert kernels._uniform_width((64, 0, 64)) == 64 and kernels._uniform_width((64, 32)) == 0
    assert kernels._uniform_width((0, 0)) == 0
    assert [kernels._tile_slices(w) for w in (1, 17, 41, 48, 63, 64, 80, 96, 112)] == [
        (16, 0), (32, 0), (32, 16), (32, 16), (64, 0), (64, 0), (64, 16), (64, 32), (128, 0)]


def test_all_heads_zero_width():
    q, k, v = (torch.randn(2, 17, 0, requires_grad=True) for _ in range(3))
    out = ragged_attention(q, k, v, (0, 0, 0), SCALE, implementation="triton")
    assert out.shape == (2, 17, 0)
    out.sum().backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == (2, 17, 0)


def test_dispatch_prefers_triton_under_interpreter(kernels):
    x = torch.zeros(2, 17, 18)
    assert explain("ragged_attention", x) == [("cuda", "CPU tensor: the CUDA kernel runs on CUDA tensors"),
                                              ("triton", None), ("reference", None)]
    assert select("ragged_attention", x) is ragged_attention_triton


def test_explain_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = (torch.randn(2, 17, 18) for _ in range(3))
    # Every reason: this process imported triton interpreted, so unsetting the variable is a second one.
    assert dict(explain("ragged_attention", q)) == {"cuda": "CPU tensor: the CUDA kernel runs on CUDA tensors",
                                                   "triton": "CPU tensor and TRITON_INTERPRET is not 1; "
                                                             "TRITON_INTERPRET is not 1 but triton was imported "
                                                             "with it (triton reads it once, at import)",
                                                   "reference": None}
    assert torch.equal(ragged_attention(q, k, v, (17, 1), SCALE), ragged_attention_ref(q, k, v, (17, 1), SCALE))


def test_float64_goes_to_reference():
    reasons = dict(explain("ragged_attention", torch.zeros(2, 17, 18, dtype=torch.float64)))
    assert "torch.float64" in reasons["triton"] and reasons["reference"] is None


def test_dropout_goes_to_reference():
    q, k, v = (torch.randn(2, 17, 18) for _ in range(3))
    torch.manual_seed(1)
    out = ragged_attention(q, k, v, (17, 1), SCALE, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(out, ragged_attention_ref(q, k, v, (17, 1), SCALE, dropout_p=0.5))
    with pytest.raises(ValueError, match="dropout"):
        ragged_attention(q, k, v, (17, 1), SCALE, dropout_p=0.5, implementation="triton")


def test_explain_names_a_late_interpreter_switch(monkeypatch):
    # triton was imported interpreted; on a CUDA tensor with the variable unset, compiled kernels would be
    # mixed with triton's interpreted library, so dispatch must refuse and say why.
    monkeypatch.delenv("TRITON_INTERPRET")
    from vitslim_kernels.runtime import triton_unavailable
    cuda_tensor = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # all the predicate reads
    assert triton_unavailable(cuda_tensor) == ("TRITON_INTERPRET is not 1 but triton was imported with it "
                                               "(triton reads it once, at import)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(INTERPRETED, reason="TRITON_INTERPRET=1 for this run: the kernels are interpreted")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N", [197, 50])
def test_compiled_on_gpu(dtype, N, monkeypatch, poisoned):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    head_dims = (41, 17, 52, 0, 64, 1)
    D = sum(head_dims)
    qkv = 1.5 * torch.randn(3, N, 3 * D, dtype=torch.float64, device="cuda")
    grad_out = torch.randn(3, N, D, dtype=torch.float64, device="cuda")
    out, dqkv = _run(_triton, qkv, grad_out, head_dims, dtype, "split")
    ref_out, ref_dqkv = _run(ragged_attention_ref, qkv, grad_out, head_dims, dtype, "split")
    exp_out, exp_dqkv = _run(ragged_attention_ref, qkv, grad_out, head_dims, torch.float64, "split")
    _assert_within_spec("out", out, ref_out, exp_out)
    _assert_within_spec("dqkv", dqkv, ref_dqkv, exp_dqkv)
    # Deterministic backward: no atomics, so a second run is bit-identical (on a GPU this can fail).
    _, dqkv_again = _run(_triton, qkv, grad_out, head_dims, dtype, "split")
    assert torch.equal(dqkv, dqkv_again)


def test_slim_attention_pads_heads_to_aligned_widths_exactly(monkeypatch):
    """SlimAttention hands the Triton kernel heads padded to multiples of 8 with zero weights (16-byte aligned
    loads); output and every gradient are within the kernel spec of the float64 unpadded reference path."""
    from vitslim.layers import SlimAttention

    torch.manual_seed(0)
    head_dims, C = (17, 0, 41, 1, 64), 48
    fused = SlimAttention(C, head_dims, head_dim=64, qkv_bias=True, proj_bias=True)
    with torch.no_grad():
        for p in fused.parameters():  # built uninitialised, as slim models are before their weights load
            p.copy_(0.3 * torch.randn(p.shape))
    assert fused._aligned.head_dims == (24, 0, 48, 8, 64)
    reference = SlimAttention(C, head_dims, head_dim=64, qkv_bias=True, proj_bias=True)
    reference.load_state_dict(fused.state_dict())
    reference.implementation = "reference"
    taken = []
    original = SlimAttention._forward_aligned
    monkeypatch.setattr(SlimAttention, "_forward_aligned", lambda self, x: taken.append(1) or original(self, x))
    x = torch.randn(3, 50, C, dtype=torch.float64)
    grad = torch.randn(3, 50, C, dtype=torch.float64)

    def run(module, dtype):
        module = module.to(dtype)
        module.zero_grad()
        xi = x.to(dtype).requires_grad_()
        out = module(xi)
        out.backward(grad.to(dtype))
        return [out.detach(), xi.grad] + [p.grad.clone() for p in module.parameters()]

    got = run(fused, torch.float32)
    assert taken == [1]
    ref32 = run(reference, torch.float32)
    expected = run(reference, torch.float64)
    names = ["out", "dx"] + [name for name, _ in fused.named_parameters()]
    for name, g, r, e in zip(names, got, ref32, expected):
        _assert_within_spec(name, g, r, e)


def test_slim_attention_keeps_padded_weights_for_inference_until_they_change():
    from vitslim.layers import SlimAttention

    torch.manual_seed(0)
    fused = SlimAttention(48, (17, 0, 41, 1, 64), head_dim=64, qkv_bias=True, proj_bias=True).eval()
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
    reference = SlimAttention(48, (17, 0, 41, 1, 64), head_dim=64, qkv_bias=True, proj_bias=True).eval()
    reference.implementation = "reference"
    x = torch.randn(2, 50, 48)
    with torch.no_grad():
        for step in range(2):
            if step == 1:
                fused.qkv.weight.mul_(-1.5)  # an in-place update: the kept padded copy must not be reused
            cached = fused._aligned._cached
            reference.load_state_dict(fused.state_dict())
            # The project's rule against the float64 reference (outputs reach ~20 here: fp32 rounding alone is
            # ~2e-5, so a fixed 1e-5 tolerance failed or passed with the BLAS's summation order). Stale padded
            # weights would be off by O(1).
            exact = reference.double()(x.double())
            _assert_within_spec("slim attention", fused(x), reference.float()(x), exact)
            assert fused._aligned._cached is not cached  # (re)built for these weights
        kept = fused._aligned._cached
        fused(x)
        assert fused._aligned._cached is kept  # unchanged weights: nothing gathered again


# ---------------------------------------------------------------------------------------------------------
# Autotune lists (VITSLIM_AUTOTUNE=1): the selection logic, with a stand-in timer (the timing needs a GPU)
# ---------------------------------------------------------------------------------------------------------

def test_tuned_picks_the_fastest_candidate_once_per_key(monkeypatch):
    import triton.testing
    from vitslim_kernels.triton import _launch as _common

    monkeypatch.setattr(_common, "_TUNED", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    times = {"a": 3.0, "b": 1.0, "c": 2.0, "broken": 0.5}
    benched, launched = [], []

    def do_bench(fn, warmup, rep):
        fn()
        return times[launched[-1]]
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)

    def launch(config):
        if config == "broken":
            raise RuntimeError("out of shared memory")  # a config the device cannot run is not chosen
        launched.append(config)
        benched.append(config)

    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    monkeypatch.delenv("VITSLIM_AUTOTUNE", raising=False)
    assert _common.tuned("k", 1, ["a", "b", "c"], launch, cuda) == "a" and not benched  # off by default
    monkeypatch.setenv("VITSLIM_AUTOTUNE", "1")
    assert _common.tuned("k", 1, ["a", "b", "broken", "c"], launch, cuda) == "b"
    assert benched == ["a", "b", "c"]
    assert _common.tuned("k", 1, ["a", "b", "broken", "c"], launch, cuda) == "b" and len(benched) == 3  # cached
    assert _common.tuned("k", 2, ["a", "c"], launch, cuda) == "c" and len(benched) == 5  # another key: timed
    assert _common.tuned_configs() == {("k", 1): 1, ("k", 2): 1}
    assert _common.tuned("k", 3, ["a", "b"], launch, torch.device("cpu")) == "a"  # CPU (interpreter): default
    monkeypatch.setattr(_common, "tracing", lambda: True)
    assert _common.tuned("k", 4, ["a", "b"], launch, cuda) == "a"  # torch.compile tracing: default, no timing
    assert len(benched) == 5


def test_autotune_candidates_are_short_and_start_with_the_default(kernels):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        fwd = kernels._fwd_candidates(False, dtype)
        assert fwd[0] == kernels._fwd_config(False, dtype) and 1 <= len(fwd) <= 3
        for aligned in (True, False):
            for arch in (80, 90):
                for bias_sum, ragged in itertools.product((True, False), (True, False)):
                    bwd = kernels._bwd_candidates(False, dtype, aligned, arch, bias_sum, ragged)
                    assert bwd[0] == kernels._bwd_config(False, dtype, aligned, arch, bias_sum, ragged)
                    assert 1 <= len(bwd) <= 3 and len({str(c) for c in bwd}) == len(bwd)
    assert kernels._fwd_candidates(True, torch.float16) == [kernels._fwd_config(True, torch.float16)]
    assert len(kernels._bwd_candidates(True, torch.float16, True)) == 1  # one config under the interpreter

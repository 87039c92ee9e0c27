"""Swin's window attention (vitslim_kernels.window_attention): the Triton kernels against the float64 reference
under Triton's interpreter (outputs and the gradients of q, k, v and the bias table), the packed op with the qkv
projection, the deterministic table gradient, the fused Swin search block (eager, folded and fused agree) and
the fused slim Swin, and the errors for bad arguments. (opcheck of the ops: test_opcheck.py.)"""
import copy
import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

import vitslim  # noqa: E402
from vitslim_kernels import explain, window_attention, window_attention_ref  # noqa: E402
from vitslim_kernels import window_qkv_attention, window_qkv_attention_ref  # noqa: E402
from vitslim_kernels.ops import window_attention as ops  # noqa: E402

from ..tiny_models import images_for, make_swin, randomize_gates  # noqa: E402
from .interpreter import INTERPRETED, poison_allocations, rerun_under_interpreter, require_interpreter  # noqa: E402
from .tolerance import assert_within_spec  # noqa: E402

# Error allowed on top of 2x the reference's own error in the same dtype, in eps of the dtype times the largest
# |expected| (docs/conventions.md). fp32: as for ragged attention (online softmax rescaled, p recomputed from the
# saved logsumexp in base 2; the table gradient sums dS over every window and pair: measured up to 9e-7 at
# max |dtable| ~ 8, i.e. ~1 eps); 32 eps. fp16: 4 eps, as for ragged attention.
FLOOR_EPS = {torch.float32: 32, torch.float16: 4, torch.bfloat16: 4}


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


@pytest.fixture
def kernels():
    return importlib.import_module("vitslim_kernels.triton.window_attention")


@pytest.fixture
def poisoned(monkeypatch, kernels):
    poison_allocations(monkeypatch, kernels)


@pytest.fixture
def launches(monkeypatch, kernels):
    """How often the forward and backward launchers ran (a fallback to PyTorch would leave them at 0)."""
    counts = {"fwd": 0, "bwd": 0}
    for name in counts:
        launcher = getattr(kernels, f"_{name}")

        def counted(*args, _launcher=launcher, _name=name, **kwargs):
            counts[_name] += 1
            return _launcher(*args, **kwargs)
        monkeypatch.setattr(kernels, f"_{name}", counted)
    return counts


def _run(fn, sample, dtype, grad_out, device="cpu"):
    """fn's output and the gradients of (qkv, table), q, k, v being views of one packed leaf cast to dtype."""
    q, k, v, dims, scale, table, index, mask = sample
    qkv = q._base.detach().to(device=device, dtype=dtype).requires_grad_()
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaf_table = table.detach().to(device=device, dtype=table_dtype).requires_grad_()
    index = index.to(device)
    mask = mask.to(device) if mask is not None else None
    D = sum(dims)
    out = fn(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], dims, scale, leaf_table, index, mask)
    out.backward(grad_out.to(device=device, dtype=dtype))
    return out.detach().cpu(), qkv.grad.cpu(), leaf_table.grad.cpu()


def _triton(q, k, v, dims, scale, table, index, mask):
    return window_attention(q, k, v, dims, scale, table, index, mask, implementation="triton")


def _check(window, dims, images, n_windows, shifted, dtype, device="cpu"):
    sample = ops._sample(window, dims, images, n_windows, shifted, device="cpu", dtype=torch.float64,
                         requires_grad=False, seed=3)
    g = torch.Generator().manual_seed(4)
    grad_out = torch.randn(sample[0].shape, generator=g, dtype=torch.float64)
    got = _run(_triton, sample, dtype, grad_out, device)
    ref = _run(window_attention_ref, sample, dtype, grad_out, device)
    expected = _run(window_attention_ref, sample, torch.float64, grad_out)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32  # the table keeps its own dtype
    for name, a, b, c in zip(("out", "dqkv", "dtable"), got, ref, expected):
        assert_within_spec(name, a, b, c, FLOOR_EPS[dtype], dtype)
    assert got[2].abs().sum() > 0


# (window, head widths, images, windows per image, shifted): under the interpreter windows above 16 tokens take
# 32-row tiles, so N = 49 and 144 run the backward's multi-block passes and N = 16 its one-block path; 2 windows
# per program, so an odd number of windows leaves a partial last group.
CASES = [
    (7, (0, 1, 17, 32), 1, 3, True),     # N = 49: odd widths, a pruned head, shifted, 3 windows
    (7, (17, 0, 32, 1), 2, 2, False),    # unshifted
    (12, (32, 17), 1, 3, True),          # N = 144: 5 x 5 tiles of 32 here (3 x 3 of 64 on a GPU)
    (4, (16, 0, 5), 3, 1, False),        # a stage of one window (nW = 1), one block
    (4, (8, 8), 1, 4, True),             # one block with the shift mask, uniform widths
]


@pytest.mark.parametrize("window, dims, images, n_windows, shifted", CASES)
def test_matches_reference_fp32(window, dims, images, n_windows, shifted, poisoned):
    _check(window, dims, images, n_windows, shifted, torch.float32)


def test_one_block_backward_without_the_held_bias(monkeypatch, kernels, poisoned):
    """sm_80's one-block backward gathers the bias per window instead of holding it (HOIST_BIAS False)."""
    config = kernels._config
    monkeypatch.setattr(kernels, "_config", lambda *a: {**config(*a), **({"HOIST_BIAS": False} if a[1] else {})})
    _check(4, (5, 1, 17), 1, 3, True, torch.float32)


@pytest.mark.parametrize("window, dims", [(7, (0, 1, 17, 32)), (4, (16, 0, 5))])
def test_matches_reference_fp16(window, dims, poisoned):
    # bf16 is only tested on a GPU: Triton's interpreter computes tl.dot on bfloat16 operands wrongly.
    _check(window, dims, 1, 3, True, torch.float16)


def test_table_gradient_is_deterministic_and_an_exact_scatter():
    g = torch.Generator().manual_seed(0)
    index = ops._sample(7, (8,), 1, 1, False, device="cpu", dtype=torch.float32, requires_grad=False)[6]
    table = torch.zeros(169, 3)
    dbias = torch.randn(2, 49, 49, generator=g, dtype=torch.float64)
    dims = (8, 0, 4)  # the middle head has no program: its column stays 0
    got = ops.table_grad(dbias.float(), index, table, dims)
    expected = torch.zeros(169, 3, dtype=torch.float64)
    for h, column in ((0, 0), (1, 2)):
        expected[:, column].index_add_(0, index.reshape(-1), dbias[h].reshape(-1))
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(got, ops.table_grad(dbias.float(), index, table, dims))
    torch.testing.assert_close(ops._table_scatter(dbias, index, table.double(), dims), expected, rtol=0, atol=1e-12)


def test_backward_is_bitwise_repeatable():
    q, k, v, dims, scale, table, index, mask = ops._sample(7, (17, 32), 1, 3, True, device="cpu",
                                                           dtype=torch.float32, requires_grad=True)
    grads = []
    for _ in range(2):
        table.grad = None
        out = window_attention(q, k, v, dims, scale, table, index, mask, implementation="triton")
        out.backward(torch.ones_like(out))
        grads.append(table.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("case", [0, 1])
def test_packed_op_matches_reference(case, poisoned):
    """window_qkv_attention: the projection (gate folded, bias summed by the kernel) and the attention as one op;
    every gradient (x, weight, bias, gate, table) against the float64 reference."""
    args, _ = ops.qkv_sample_inputs("cpu", torch.float64, requires_grad=False)[case]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()
               and not (a.dim() == 3 and a.shape[1:] == (16, 16))]  # not the mask

    def run(fn, dtype):
        leaves = list(args)
        for i in tensors:
            leaves[i] = args[i].detach().to(dtype if args[i].dim() != 2 or args[i].shape[0] != 49 else
                                            torch.float64 if dtype == torch.float64 else torch.float32)
            leaves[i].requires_grad_()
        out = fn(*leaves)
        g = torch.Generator().manual_seed(6)
        out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype))
        return [out.detach()] + [leaves[i].grad for i in tensors]

    got = run(lambda *a: window_qkv_attention(*a, implementation="triton"), torch.float32)
    ref = run(window_qkv_attention_ref, torch.float32)
    expected = run(window_qkv_attention_ref, torch.float64)
    for i, (a, b, c) in enumerate(zip(got, ref, expected)):
        assert_within_spec(f"output {i}", a, b, c, FLOOR_EPS[torch.float32], torch.float32)


def _grads(model):
    named = dict(model.named_parameters())
    return {name: p.grad for name, p in named.items() if p.grad is not None}


def test_fused_swin_search_block_agrees_with_eager_and_folded(launches):
    """A tiny Swin (window 7 over a padded 16 x 16 grid, shifted and unshifted blocks, a one-window stage): the
    fused search model (window_qkv_attention + gated_mlp_branch) against the eager one in float64, output and every
    gradient (gates, bias tables, weights), within the kernel spec of eager and folded run in float32."""
    dense = make_swin(dtype=torch.float64, drop_path_rate=0.0)  # no randomness in training mode
    x = images_for(dense, batch=1)
    results = {}
    for name, implementation, dtype in (("expected", "eager", torch.float64), ("eager", "eager", torch.float32),
                                        ("folded", "folded", torch.float32), ("fused", "fused", torch.float32)):
        model = vitslim.make_searchable(copy.deepcopy(dense).to(dtype), implementation=implementation)
        randomize_gates(model)
        out = model(x.to(dtype))
        out.square().sum().backward()
        results[name] = (out.detach(), _grads(model))
    assert launches == {"fwd": 6, "bwd": 6}  # every block's attention ran the kernels
    assert any("relative_position_bias_table" in n for n in results["fused"][1])
    assert any(n.endswith(".attn") for n in results["fused"][1]) and any(n.endswith(".mlp") for n in results["fused"][1])
    expected_out, expected_grads = results["expected"]
    for reference in ("eager", "folded"):
        ref_out, ref_grads = results[reference]
        assert_within_spec("out", results["fused"][0], ref_out, expected_out, FLOOR_EPS[torch.float32], torch.float32)
        for name, grad in results["fused"][1].items():
            assert_within_spec(name, grad, ref_grads[name], expected_grads[name], FLOOR_EPS[torch.float32],
                               torch.float32)


def test_fused_slim_swin_matches_the_reference_path(launches):
    """A slim Swin with fused=True runs window_qkv_attention on heads padded to multiples of 8 (here under the
    interpreter): output and retrain gradients against the PyTorch path in float64."""
    dense = make_swin(dtype=torch.float64, drop_path_rate=0.0)  # no randomness in training mode
    searched = vitslim.make_searchable(copy.deepcopy(dense))
    randomize_gates(searched)
    plan = vitslim.threshold(searched, 0.6, 0.7)
    x = images_for(dense, batch=1)
    results = {}
    for name, fused, dtype in (("expected", False, torch.float64), ("reference", False, torch.float32),
                               ("fused", True, torch.float32)):
        model = vitslim.slim(searched, plan, fused=fused).to(dtype).train()
        out = model(x.to(dtype))
        out.square().sum().backward()
        results[name] = (out.detach(), _grads(model))
    assert launches["fwd"] == launches["bwd"] > 0  # the kernels ran (blocks keeping no head have no attention)
    assert any(w % 8 for b in plan.blocks for w in b.head_dims if w)  # padding is exercised
    for i, (name, grad) in enumerate([("out", results["fused"][0])] + list(results["fused"][1].items())):
        ref = results["reference"][0] if i == 0 else results["reference"][1][name]
        exp = results["expected"][0] if i == 0 else results["expected"][1][name]
        assert_within_spec(name, grad, ref, exp, FLOOR_EPS[torch.float32], torch.float32)


def test_dispatch_prefers_triton_under_interpreter():
    q = torch.zeros(3, 49, 18)
    assert explain("window_attention", q) == [("triton", None), ("reference", None)]


def test_bad_arguments_name_the_value():
    q, k, v, dims, scale, table, index, mask = ops._sample(4, (5, 3), 1, 2, True, device="cpu", dtype=torch.float32,
                                                           requires_grad=False)
    with pytest.raises(ValueError, match=r"table must be a floating \(rows, heads = 2\) tensor"):
        window_attention(q, k, v, dims, scale, table[:, :1], index, mask)
    with pytest.raises(ValueError, match=r"index must be an integer \(N, N\) = \(16, 16\) tensor"):
        window_attention(q, k, v, dims, scale, table, index.float(), mask)
    with pytest.raises(ValueError, match=r"index holds rows 0\.\.48, the table has 10"):
        window_attention(q, k, v, dims, scale, table[:10], index, mask)
    with pytest.raises(ValueError, match=r"the number of windows 2 must be a multiple of the mask's nW = 3"):
        window_attention(q, k, v, dims, scale, table, index, torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"mask must be a floating \(nW, N, N\) tensor with N = 16"):
        window_attention(q, k, v, dims, scale, table, index, torch.zeros(2, 16, 15))


# -- on a GPU (compiled kernels; bfloat16 only here: the interpreter's bf16 dots are wrong) ------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU, kernels compiled")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("window, dims, images, n_windows, shifted", CASES + [(7, (32, 32, 32), 8, 64, True)])
def test_compiled_on_gpu(window, dims, images, n_windows, shifted, dtype, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _check(window, dims, images, n_windows, shifted, dtype, device="cuda")


@pytest.mark.gpu
@gpu
def test_table_gradient_is_bitwise_repeatable_on_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, dims, scale, table, index, mask = ops._sample(7, (32, 32, 32), 8, 64, True, device="cuda",
                                                           dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(2):
        table.grad = q._base.grad = None
        out = window_attention(q, k, v, dims, scale, table, index, mask, implementation="triton")
        out.backward(torch.ones_like(out))
        grads.append((table.grad.clone(), q._base.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@gpu
def test_fused_swin_search_step_on_gpu_matches_folded(monkeypatch):
    """Swin-T (2 stages cut from 4) under bf16 autocast: fused and folded search models give the same loss and
    gate gradients within bf16 rounding of the float64 eager model's."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import timm
    torch.manual_seed(0)
    dense = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, depths=(2, 2), num_heads=(3, 6),
                              drop_path_rate=0.0)
    x = torch.randn(4, 3, 224, 224)
    results = {}
    for name, implementation, dtype in (("expected", "eager", torch.float64), ("folded", "folded", torch.float32),
                                        ("fused", "fused", torch.float32)):
        model = vitslim.make_searchable(copy.deepcopy(dense), implementation=implementation).to("cuda", dtype)
        randomize_gates(model)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float64):
            out = model(x.to("cuda", dtype)).float()
        out.square().mean().backward()
        results[name] = (out.detach().cpu().double(),
                         torch.cat([g.attn.grad.flatten() for g in vitslim.gates(model)]).cpu().double())
    for i, what in enumerate(("output", "attention gate gradients")):
        expected = results["expected"][i]
        err = {n: (results[n][i] - expected).abs().max().item() for n in ("folded", "fused")}
        assert err["fused"] <= 2 * err["folded"] + 4 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item(), \
            (what, err)


# -- the op in graphs (triton imported compiled: the op's CPU path computes the reference math) ------------------
def test_fullgraph_compile_compiled_import():
    """torch.compile(fullgraph=True) sees through the op (no graph break), forward and backward."""
    q, k, v, dims, scale, table, index, mask = ops._sample(4, (5, 0, 8), 1, 2, True, device="cpu",
                                                           dtype=torch.float32, requires_grad=True)

    def fn(q, k, v, table):
        return ops.window_attention_triton(q, k, v, dims, scale, table, index, mask)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, lambda *a: window_attention_ref(*a[:3], dims, scale, a[3], index, mask)):
        out = f(q, k, v, table)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q._base, table))))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class _WindowOp(torch.nn.Module):
    def __init__(self, sample):
        super().__init__()
        _, _, _, self.dims, self.scale, table, index, mask = sample
        self.register_buffer("table", table.detach())
        self.register_buffer("index", index)
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return torch.ops.vitslim.window_attention_fwd(q, k, v, self.table, self.index, self.mask, list(self.dims),
                                                      self.scale)[0]


def test_export_and_onnx_translation_compiled_import(tmp_path):
    """torch.export keeps the op whole; the ONNX translation (bias gathered, the mask added per window, zero-width
    heads left out) runs in onnxruntime and matches the float64 reference."""
    sample = ops._sample(4, (5, 0, 8), 2, 2, True, device="cpu", dtype=torch.float32, requires_grad=False)
    q, k, v = (t.contiguous() for t in sample[:3])
    module = _WindowOp(sample).eval()
    program = torch.export.export(module, (q, k, v))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("vitslim.window_attention_fwd.default") == 1
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from vitslim_kernels.onnx import translation_table
    onnx_program = torch.onnx.export(module, (q, k, v), dynamo=True, verbose=False,
                                     custom_translation_table=translation_table())
    onnx_program.save(str(tmp_path / "window.onnx"))
    session = ort.InferenceSession(str(tmp_path / "window.onnx"), providers=["CPUExecutionProvider"])
    (o,) = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (q, k, v))})
    *_, dims, scale, table, index, mask = sample
    expected = window_attention_ref(q.double(), k.double(), v.double(), dims, scale, table.double(), index,
                                    mask.double())
    torch.testing.assert_close(torch.from_numpy(o).double(), expected, rtol=0, atol=1e-5)

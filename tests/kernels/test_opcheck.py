"""torch.library done the way torch expects, for every vitslim custom op.

- torch.library.opcheck with all its default tests (schema, autograd registration, fake tensor, AOT dispatch) on
  inputs that require grad, so each op's registered backward runs eagerly and under AOTAutograd, and each
  backward op's own backward (double backward) too.
- The double backward is right: each backward op computes exactly its plain-PyTorch formula (the ops/
  reference, as a function of ALL its inputs), whose VJP is the backward op's backward; and second derivatives
  of every public function match those of the reference in float64.
- Where triton compiles, the Triton-backed ops are triton_ops that AOTAutograd traces into (the kernels appear
  in the graph); under the interpreter they are opaque custom ops.

The Triton-backed ops run under Triton's interpreter (in a fresh process when this one imported triton compiled:
see tests/kernels/interpreter.py). Tests named `..._compiled_import` need triton imported compiled: they check
the ops' CPU path (plain PyTorch reference math, so that torch.export of a fused slim model runs on CPU) and the
triton_op tracing.
"""
import functools
import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from vitslim_kernels import dispatch  # noqa: E402
from vitslim_kernels import (gated_gelu_linear_ref, gated_linear_ref, layernorm_token_scale_ref,  # noqa: E402
                             ragged_attention_ref)
from vitslim_kernels.ops.gated_linear import gated_gelu_bwd_ref, gated_linear_fold_bwd_ref  # noqa: E402
from vitslim_kernels.ops.layernorm_token_scale import (gather_tensors,  # noqa: E402
                                                       layernorm_token_scale_bwd_ref)
from vitslim_kernels.ops.ragged_attention import ragged_attention_bwd_ref  # noqa: E402

from .interpreter import INTERPRETED, rerun_under_interpreter, require_interpreter  # noqa: E402

SCALE = 64 ** -0.5
HEAD_DIMS = [17, 0, 1]   # odd widths and a fully pruned head
EPS = 1e-6
GATHER = (0, 2, 3, 16)   # of 17 input rows: prefix row 0 and 3 patches, the last row too


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


@pytest.fixture(scope="module", autouse=True)
def ops():
    return torch.ops.vitslim  # every op module was imported (and its ops defined) with vitslim_kernels


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def _qkv(B, N, head_dims, dtype, seed=0):
    """q, k, v as strided views of one (B, N, 3D) leaf, as the qkv projection gives them."""
    D = sum(head_dims)
    qkv = _randn(B, N, 3 * D, dtype=dtype, seed=seed, scale=1.5)
    if D == 0:  # every head pruned: split(0) is refused
        return qkv, qkv[..., :0], qkv[..., :0]
    return qkv.split(D, dim=-1)


def _requiring_grad(args):
    """The op's arguments with every floating tensor a fresh leaf that requires grad."""
    return tuple(a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point()
                 else a for a in args)


def _opcheck(op, args):
    """opcheck with all default tests, inputs requiring grad; every test must report SUCCESS."""
    results = torch.library.opcheck(op, _requiring_grad(args))
    assert results and all(r == "SUCCESS" for r in results.values()), results
    return results


# ---------------------------------------------------------------------------------------------------------
# Arguments of each op (small odd shapes)
# ---------------------------------------------------------------------------------------------------------

def _ragged_fwd_args(dtype, head_dims=HEAD_DIMS, B=2, N=17):
    return (*_qkv(B, N, head_dims, dtype), list(head_dims), SCALE)


def _ragged_bwd_args(ops, dtype, head_dims=HEAD_DIMS, B=2, N=17):
    q, k, v = _qkv(B, N, head_dims, dtype)
    o, lse = ops.ragged_attention_fwd(q, k, v, list(head_dims), SCALE)
    return (_randn(*q.shape, dtype=dtype, seed=1), q, k, v, o, lse, list(head_dims), SCALE)


def _ragged_qkv_fwd_args(dtype, head_dims=HEAD_DIMS, B=2, N=17):
    return (_randn(B, N, 3 * sum(head_dims), dtype=dtype, scale=1.5), list(head_dims), SCALE)


def _ragged_qkv_bwd_args(ops, dtype, head_dims=HEAD_DIMS, B=2, N=17, bias_grad=False):
    qkv = _randn(B, N, 3 * sum(head_dims), dtype=dtype, scale=1.5)
    o, lse = ops.ragged_attention_qkv_fwd(qkv, list(head_dims), SCALE)
    return (_randn(*o.shape, dtype=dtype, seed=1), qkv, o, lse, list(head_dims), SCALE, bias_grad)


def _qkv_attention_args(dtype, gated=True, bias=True, head_dims=HEAD_DIMS, B=2, N=17, C=24):
    """x (B, N, C), the (3D, C) qkv weight and bias, a gate of one entry per q (k, v) row or None."""
    D = sum(head_dims)
    return (_randn(B, N, C, dtype=dtype), _randn(3 * D, C, dtype=dtype, seed=1) * 1.5 / C ** 0.5,
            _randn(3 * D, dtype=dtype, seed=2) if bias else None,
            1 + 0.5 * _randn(D, dtype=dtype, seed=3) if gated else None, list(head_dims), SCALE)


def _ln_fwd_args(dtype, out_dtype=None, gather=GATHER, num_prefix=1):
    x = _randn(3, 17, 24, dtype=dtype, scale=2.0) + 0.5
    gather, inverse = gather_tensors(gather, 17, x.device)
    n_out = 17 if gather is None else gather.numel()
    return (x, 1 + 0.5 * _randn(24, seed=1), 0.5 * _randn(24, seed=2), 1.5 * _randn(n_out - num_prefix, seed=3),
            gather, inverse, num_prefix, EPS, out_dtype or dtype)


def _ln_bwd_args(ops, dtype, out_dtype=None, gather=GATHER, num_prefix=1):
    x, w, b, raw, gather, inverse, num_prefix, eps, out_dtype = _ln_fwd_args(dtype, out_dtype, gather, num_prefix)
    y, mean, rstd = ops.layernorm_token_scale_fwd(x, w, b, raw, gather, inverse, num_prefix, eps, out_dtype)
    return (_randn(*y.shape, dtype=y.dtype, seed=4), x, w, b, raw, inverse, mean, rstd, num_prefix)


def _ln_bwd_shapes(dtype, out_dtype):
    """Arguments of layernorm_token_scale_bwd of the right shapes and dtypes, without running the forward."""
    x, w, b, raw, gather, inverse, num_prefix, _, _ = _ln_fwd_args(dtype, out_dtype)
    mean, rstd = _randn(3, len(GATHER), seed=5), 1 + _randn(3, len(GATHER), seed=6).abs()
    return (_randn(3, len(GATHER), 24, dtype=out_dtype, seed=4), x, w, b, raw, inverse, mean, rstd, num_prefix)


def _fold_args(dtype, bias=True):
    return (_randn(48, 17, dtype=dtype), _randn(48, dtype=dtype, seed=1) if bias else None,
            _randn(16, dtype=dtype, seed=2), torch.float16 if dtype == torch.float32 else dtype)


def _fold_bwd_args(dtype, bias=True):
    weight, b, gate, _ = _fold_args(dtype, bias)
    return (_randn(48, 17, seed=3), _randn(48, seed=4) if bias else None, weight, b, gate)


def _gelu_fwd_args(dtype, approximate="none", bias=True):
    return (_randn(17, 96, dtype=dtype, scale=2.0), _randn(96, dtype=dtype, seed=1) if bias else None,
            _randn(96, dtype=dtype, seed=2), approximate)


def _gelu_bwd_args(dtype, approximate="tanh", bias=False):
    pre, b, gate, approximate = _gelu_fwd_args(dtype, approximate, bias)
    return (_randn(17, 96, dtype=dtype, seed=3), pre, b, gate, approximate)


def _gated_linear_args(dtype, bias=True):
    return (_randn(17, 24, dtype=dtype), _randn(3 * 16, 24, dtype=dtype, seed=1) / 24 ** 0.5,
            _randn(48, dtype=dtype, seed=2) if bias else None, _randn(16, dtype=dtype, seed=3))


def _gated_gelu_linear_args(dtype, approximate="none", bias=True):
    return (_randn(17, 24, dtype=dtype), 2 * _randn(40, 24, dtype=dtype, seed=1) / 24 ** 0.5,
            _randn(40, dtype=dtype, seed=2) if bias else None, _randn(40, dtype=dtype, seed=3), approximate)


# ---------------------------------------------------------------------------------------------------------
# opcheck of the Triton ops under the interpreter
# ---------------------------------------------------------------------------------------------------------

# The torch.library ops that only run with the CUDA extension on a GPU, and where they are opchecked.
ELSEWHERE = {"ragged_attention_fwd_cuda": "test_ragged_attention_cuda.py"}
# "<library op> <label>" -> (library op, a function making its args): every case of every described op
# (dispatch.op_infos: each ops/<op>.py gives its library_samples). Args are made in the test, under the interpreter.
OPCHECK_CASES = {f"{op} {label}": (op, make_args) for info in dispatch.op_infos()
                 for label, op, make_args in info.library_samples()}


def test_every_library_op_of_the_registry_is_opchecked():
    """The torch.library ops every described op declares all have an opcheck case in its library_samples (the
    CUDA op: in test_ragged_attention_cuda.py), every case names a declared op, and every declared op exists."""
    declared = {name for info in dispatch.op_infos() for name in info.library_ops}
    assert all(hasattr(torch.ops.vitslim, name) for name in declared), declared
    checked = {op for op, _ in OPCHECK_CASES.values()}
    assert checked <= declared, checked - declared
    assert declared <= checked | set(ELSEWHERE), declared - checked - set(ELSEWHERE)


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(ops, case):
    op, make_args = OPCHECK_CASES[case]
    _opcheck(getattr(ops, op), make_args())


# ---------------------------------------------------------------------------------------------------------
# Each backward op is its formula, as a function of all its inputs (not only at the forward's outputs)
# ---------------------------------------------------------------------------------------------------------

def _assert_outputs_close(got, expected, atol):
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype, a.shape, b.shape)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"output {i}: {m}")


def test_backward_ops_are_their_formulas(ops):
    g = torch.Generator().manual_seed(5)
    # ragged attention: o and lse independent of q, k, v
    args = list(_ragged_bwd_args(ops, torch.float32))
    args[4] = torch.randn(args[4].shape, generator=g)
    args[5] = 2 + torch.rand(args[5].shape, generator=g)
    _assert_outputs_close(ops.ragged_attention_bwd(*args), ragged_attention_bwd_ref(*args), atol=1e-5)
    from vitslim_kernels.ops.ragged_attention import ragged_attention_qkv_bwd_ref
    for bias_grad in (False, True):
        args = list(_ragged_qkv_bwd_args(ops, torch.float32, bias_grad=bias_grad))
        args[2] = torch.randn(args[2].shape, generator=g)
        args[3] = 2 + torch.rand(args[3].shape, generator=g)
        _assert_outputs_close(ops.ragged_attention_qkv_bwd(*args), ragged_attention_qkv_bwd_ref(*args), atol=1e-5)
    # layernorm: mean and rstd independent of x
    for gather in (GATHER, None):
        args = list(_ln_bwd_args(ops, torch.float32, gather=gather))
        args[6] = torch.randn(args[6].shape, generator=g)
        args[7] = 0.5 + torch.rand(args[7].shape, generator=g)
        _assert_outputs_close(ops.layernorm_token_scale_bwd(*args), layernorm_token_scale_bwd_ref(*args),
                              atol=1e-4)
    for bias in (True, False):
        args = _fold_bwd_args(torch.float32, bias)
        _assert_outputs_close(ops.gated_linear_fold_bwd(*args), gated_linear_fold_bwd_ref(*args), atol=1e-5)
        for approximate in ("none", "tanh"):
            args = _gelu_bwd_args(torch.float32, approximate, bias)
            _assert_outputs_close(ops.gated_gelu_bwd(*args), gated_gelu_bwd_ref(*args), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Second derivatives of the public functions against the reference's in float64
# ---------------------------------------------------------------------------------------------------------

def _second_derivatives(fn, inputs, dtype, seed=7):
    """d/d(inputs) of <d/d(inputs) <fn(inputs), c1>, c2>: a Hessian-vector product through the double backward,
    every floating input cast to dtype; the cotangents c1, c2 are fixed random float64 tensors."""
    leaves = [t.detach().to(dtype).requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    out = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    c1 = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, c1, create_graph=True)
    c2 = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in tensors]
    inner = sum((d.double() * c).sum() for d, c in zip(grads, c2))
    return torch.autograd.grad(inner, tensors, allow_unused=True, materialize_grads=True)


def _check_second_derivatives(fn, ref, inputs, rel=1e-4):
    # The kernels compute in fp32 (and save lse, mean, rstd in fp32): the float32 second derivatives are within
    # a small multiple of fp32's eps (1.2e-7) of the float64 reference's; 1e-4 of the largest value leaves a
    # wide margin while any missing term (an output's gradient dropped, a formula wrong) is of order 1.
    got = _second_derivatives(fn, inputs, torch.float32)
    expected = _second_derivatives(ref, inputs, torch.float64)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert not torch.isnan(a).any()
        err, size = (a.double() - b).abs().max().item(), b.abs().max().item()
        assert size > 0 or a.numel() == 0, f"input {i}: the reference's second derivative is 0 (a weak test)"
        assert err <= rel * max(size, 1.0), f"input {i}: error {err:.3g} of {size:.3g}"


def test_ragged_attention_second_derivatives(ops):
    from vitslim_kernels.ops.ragged_attention import ragged_attention_triton
    inputs = [t.double() for t in _qkv(2, 17, HEAD_DIMS, torch.float64)]
    _check_second_derivatives(lambda q, k, v: ragged_attention_triton(q, k, v, HEAD_DIMS, SCALE),
                              lambda q, k, v: ragged_attention_ref(q, k, v, HEAD_DIMS, SCALE), inputs)


def test_packed_ragged_attention_second_derivatives(ops):
    from vitslim_kernels.ops.ragged_attention import ragged_attention_qkv_triton
    D = sum(HEAD_DIMS)
    inputs = [_randn(2, 17, 3 * D, dtype=torch.float64, scale=1.5)]
    _check_second_derivatives(lambda qkv: ragged_attention_qkv_triton(qkv, HEAD_DIMS, SCALE),
                              lambda qkv: ragged_attention_ref(*qkv.split(D, -1), HEAD_DIMS, SCALE), inputs)


def _qkv_attention_ref(x, weight, bias, gate, head_dims, scale):
    qkv = gated_linear_ref(x, weight, bias, gate) if gate is not None else torch.nn.functional.linear(x, weight, bias)
    D = sum(head_dims)
    return ragged_attention_ref(qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:], head_dims, scale)


@pytest.mark.parametrize("gated, bias", [(True, True), (False, True), (True, False)])
def test_qkv_attention_second_derivatives(ops, gated, bias):
    from vitslim_kernels.ops.qkv_attention import qkv_attention_triton
    *tensors, head_dims, scale = _qkv_attention_args(torch.float64, gated, bias)
    present = [t for t in tensors if t is not None]

    def call(fn):
        def of(*leaves):
            it = iter(leaves)
            return fn(*(next(it) if t is not None else None for t in tensors), head_dims, scale)
        return of
    _check_second_derivatives(call(qkv_attention_triton), call(_qkv_attention_ref), present)


def test_layernorm_token_scale_second_derivatives(ops):
    from vitslim_kernels.ops.layernorm_token_scale import layernorm_token_scale_triton
    x, w, b, raw, *_ = _ln_fwd_args(torch.float64)
    _check_second_derivatives(lambda *t: layernorm_token_scale_triton(*t[:3], EPS, t[3], 1, GATHER),
                              lambda *t: layernorm_token_scale_ref(*t[:3], EPS, t[3], 1, GATHER), [x, w, b, raw])


@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_second_derivatives(ops, bias):
    from vitslim_kernels.ops.gated_linear import gated_linear_triton
    _check_second_derivatives(gated_linear_triton, gated_linear_ref, list(_gated_linear_args(torch.float64, bias)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gated_gelu_linear_second_derivatives(ops, approximate):
    from vitslim_kernels.ops.gated_linear import gated_gelu_linear_triton
    *inputs, _ = _gated_gelu_linear_args(torch.float64, approximate)
    _check_second_derivatives(functools.partial(gated_gelu_linear_triton, approximate=approximate),
                              functools.partial(gated_gelu_linear_ref, approximate=approximate), inputs)


def test_window_attention_second_derivatives(ops):
    from vitslim_kernels.ops import window_attention as window
    q, k, v, dims, scale, table, index, mask = window._sample(4, (5, 0, 8), 1, 2, True, device="cpu",
                                                              dtype=torch.float64, requires_grad=False)
    _check_second_derivatives(
        lambda q, k, v, t: window.window_attention_triton(q, k, v, dims, scale, t, index, mask),
        lambda q, k, v, t: window.window_attention_ref(q, k, v, dims, scale, t, index, mask),
        [q.detach(), k.detach(), v.detach(), table])
    args, _ = window.qkv_sample_inputs("cpu", torch.float64)[0]
    x, weight, bias, gate, dims, scale, table, index, mask = args
    _check_second_derivatives(
        lambda *t: window.window_qkv_attention_triton(*t[:4], dims, scale, t[4], index, mask),
        lambda *t: window.window_qkv_attention_ref(*t[:4], dims, scale, t[4], index, mask),
        [x, weight, bias, gate, table])


def test_window_backward_ops_are_their_formulas(ops):
    from vitslim_kernels.ops.window_attention import window_attention_bwd_ref, window_attention_qkv_bwd_ref
    g = torch.Generator().manual_seed(5)
    args = list(OPCHECK_CASES["window_attention_bwd fp32"][1]())  # o and lse independent of q, k, v
    args[4] = torch.randn(args[4].shape, generator=g)
    args[5] = 2 + torch.rand(args[5].shape, generator=g)
    _assert_outputs_close(ops.window_attention_bwd(*args), window_attention_bwd_ref(*args), atol=1e-5)
    for case in ("window_attention_qkv_bwd fp32", "window_attention_qkv_bwd fp32 bias grad"):
        args = list(OPCHECK_CASES[case][1]())
        args[2] = torch.randn(args[2].shape, generator=g)
        args[3] = 2 + torch.rand(args[3].shape, generator=g)
        _assert_outputs_close(ops.window_attention_qkv_bwd(*args), window_attention_qkv_bwd_ref(*args), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# custom_op under the interpreter, triton_op where triton compiles
# ---------------------------------------------------------------------------------------------------------

def _aot_forward_graph(fn, *inputs):
    """The forward graph AOTAutograd traces for fn(*inputs) (real or fake tensors)."""
    from functorch.compile import aot_function
    graphs = []

    def capture(gm, _):
        graphs.append(gm)
        return gm
    aot_function(fn, fw_compiler=capture)(*inputs)
    return graphs[0]


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_opaque_custom_ops_under_the_interpreter(ops):
    # Interpreted kernels cannot be traced: AOTAutograd keeps the op whole and runs it.
    q, k, v = _qkv(2, 17, HEAD_DIMS, torch.float32)
    gm = _aot_forward_graph(lambda q, k, v: ops.ragged_attention_fwd(q, k, v, HEAD_DIMS, SCALE)[0], q, k, v)
    assert "vitslim.ragged_attention_fwd.default" in _targets(gm)


TRACED_CASES = {  # op name -> the op's arguments (fake CUDA tensors are made from them)
    "ragged_attention_fwd": lambda ops: _ragged_fwd_args(torch.float16),
    "ragged_attention_bwd": lambda ops: _ragged_bwd_args(ops, torch.float16),
    "ragged_attention_qkv_fwd": lambda ops: _ragged_qkv_fwd_args(torch.float16),
    "ragged_attention_qkv_bwd": lambda ops: _ragged_qkv_bwd_args(ops, torch.float16, bias_grad=True),
    "qkv_attention": lambda ops: _qkv_attention_args(torch.float16),
    "layernorm_token_scale_fwd": lambda ops: _ln_fwd_args(torch.float32, torch.bfloat16),
    "layernorm_token_scale_bwd": lambda ops: _ln_bwd_shapes(torch.float32, torch.bfloat16),
    "gated_linear_fold": lambda ops: _fold_args(torch.float32),
    "gated_linear_fold_bwd": lambda ops: _fold_bwd_args(torch.float32),
    "gated_gelu_fwd": lambda ops: _gelu_fwd_args(torch.float16),
    "gated_gelu_bwd": lambda ops: _gelu_bwd_args(torch.float16),
    "gated_linear": lambda ops: _gated_linear_args(torch.float16),
    "gated_gelu_linear": lambda ops: _gated_gelu_linear_args(torch.float16),
    "window_attention_fwd": lambda ops: _half(OPCHECK_CASES["window_attention_fwd fp32 shifted"][1]()),
    "window_attention_bwd": lambda ops: OPCHECK_CASES["window_attention_bwd fp16 shifted"][1](),
    "window_attention_qkv_bwd": lambda ops: _half(OPCHECK_CASES["window_attention_qkv_bwd fp32 bias grad"][1]()),
    "window_qkv_attention": lambda ops: _half(OPCHECK_CASES["window_qkv_attention fp32 gated"][1]()),
}


def _half(args: tuple) -> tuple:
    """A window op's args with the activations in fp16 (the table, mask and lse keep theirs, as in a model)."""
    return tuple(a.half() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.dim() == 3
                 and a.shape[1] != a.shape[2] else a for a in args)


@pytest.fixture
def no_sm_query(monkeypatch):
    """The launchers size some grids by the GPU's SM count and pick some configs by its architecture, which
    this machine may not have: an H100's."""
    common = importlib.import_module("vitslim_kernels.triton._launch")
    monkeypatch.setattr(common, "_cuda_sm_count", lambda device_index: 132)
    monkeypatch.setattr(common, "_cuda_arch", lambda device_index: 90)


@pytest.mark.parametrize("name", list(TRACED_CASES))
def test_triton_ops_are_traced_into_compiled_import(ops, name, no_sm_query):
    """AOTAutograd (torch.compile's) traces through each Triton-backed op to its kernel launches. On fake CUDA
    tensors, so it needs no GPU (Triton's mutation analysis then warns that it found no driver and assumes
    every argument is mutated: the traced graph is still the op's implementation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from vitslim_kernels.runtime import uses_triton_op
    assert uses_triton_op(False) == hasattr(torch.library, "triton_op")
    if not hasattr(torch.library, "triton_op"):
        pytest.skip(f"torch {torch.__version__} has no torch.library.triton_op: the ops are custom_ops")
    args = TRACED_CASES[name](ops)
    op = getattr(ops, name)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a).to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
        positions = [i for i, a in enumerate(fake) if isinstance(a, torch.Tensor)]

        def call(*tensors):
            full = list(fake)
            for i, t in zip(positions, tensors):
                full[i] = t
            return op(*full)
        gm = _aot_forward_graph(call, *(fake[i] for i in positions))
    targets = _targets(gm)
    assert "triton_kernel_wrapper_functional" in str(targets), targets
    assert not any(t.startswith("vitslim.") for t in targets), targets


# ---------------------------------------------------------------------------------------------------------
# The CPU path of vitslim::ragged_attention_fwd / _bwd (triton imported compiled)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dims", [HEAD_DIMS, [0, 0], [5]])
def test_cpu_forward_compiled_import(ops, dtype, head_dims):
    q, k, v = _qkv(3, 17, head_dims, dtype)
    o, lse = ops.ragged_attention_fwd(q, k, v, head_dims, SCALE)
    ref = ragged_attention_ref(q, k, v, head_dims, SCALE)
    assert o.dtype == dtype and o.shape == q.shape
    torch.testing.assert_close(o, ref, rtol=0, atol=8 * torch.finfo(dtype).eps)
    kept = [w for w in head_dims if w > 0]
    assert lse.dtype == torch.float32 and lse.shape == (3, len(kept), 17)
    offset, h = 0, 0
    for w in head_dims:  # the natural logsumexp of each kept head's scaled scores, as the Triton kernel writes
        if w > 0:
            cols = slice(offset, offset + w)
            scores = (q[..., cols].double() @ k[..., cols].double().transpose(-2, -1)) * SCALE
            torch.testing.assert_close(lse[:, h], torch.logsumexp(scores, -1).float(), rtol=0, atol=1e-5)
            h += 1
        offset += w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backward_compiled_import(ops, dtype):
    # At the forward's o and lse, the backward op is the gradient of attention.
    q, k, v = _qkv(3, 17, HEAD_DIMS, dtype)
    do = _randn(*q.shape, dtype=dtype, seed=1)
    o, lse = ops.ragged_attention_fwd(q, k, v, HEAD_DIMS, SCALE)
    grads = ops.ragged_attention_bwd(do, q, k, v, o, lse, HEAD_DIMS, SCALE)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(ragged_attention_ref(*leaves, HEAD_DIMS, SCALE), leaves, do.double())
    for got, exp in zip(grads, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=64 * torch.finfo(torch.float32).eps)


def test_cpu_opcheck_compiled_import(ops):
    # float64 only where it is a different path: the bwd op then computes in float64 (lse stays float32)
    _opcheck(ops.ragged_attention_fwd, _ragged_fwd_args(torch.float32))
    _opcheck(ops.ragged_attention_bwd, _ragged_bwd_args(ops, torch.float32))
    _opcheck(ops.ragged_attention_bwd, _ragged_bwd_args(ops, torch.float64))


def test_cpu_gradcheck_compiled_import(ops):
    """float64 gradcheck of the backward op with respect to all six inputs: its registered backward (the double
    backward of attention) against finite differences; and of the forward op's o."""
    head_dims = [3, 0, 1]
    q, k, v = (t.detach().clone().requires_grad_() for t in _qkv(2, 5, head_dims, torch.float64))
    o, lse = ops.ragged_attention_fwd(q, k, v, head_dims, 0.5)
    do = _randn(*o.shape, dtype=torch.float64, seed=1).requires_grad_()
    o, lse = o.detach().requires_grad_(), lse.detach().double().requires_grad_()  # lse as a float64 input
    assert torch.autograd.gradcheck(lambda *t: ops.ragged_attention_bwd(*t, head_dims, 0.5), (do, q, k, v, o, lse))
    assert torch.autograd.gradcheck(lambda *t: ops.ragged_attention_fwd(*t, head_dims, 0.5)[0], (q, k, v))


def test_cpu_second_derivatives_compiled_import(ops):
    # End to end on the CPU path in float64: only lse is float32 (the op's contract).
    q, k, v = _qkv(2, 17, HEAD_DIMS, torch.float64)
    got = _second_derivatives(lambda q, k, v: ops.ragged_attention_fwd(q, k, v, HEAD_DIMS, SCALE)[0], [q, k, v],
                              torch.float64)
    expected = _second_derivatives(lambda q, k, v: ragged_attention_ref(q, k, v, HEAD_DIMS, SCALE), [q, k, v],
                                   torch.float64)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())


def test_cuda_op_autograd_compiled_import(ops, monkeypatch):
    """vitslim::ragged_attention_fwd_cuda's registered backward (the Triton ops, here on their CPU path), with the
    extension's forward replaced by the reference: this machine may have no GPU (the real op's opcheck is in
    test_ragged_attention_cuda.py)."""
    cuda_module = importlib.import_module("vitslim_kernels.cuda.ragged_attention")
    monkeypatch.setattr(cuda_module, "_fwd", lambda q, k, v, head_dims, scale:
                        ragged_attention_ref(q, k, v, head_dims, scale).contiguous())
    _opcheck(ops.ragged_attention_fwd_cuda, _ragged_fwd_args(torch.float32))
    q, k, v = (t.detach().clone().requires_grad_() for t in _qkv(2, 5, [3, 0, 1], torch.float64))
    assert torch.autograd.gradcheck(lambda *t: ops.ragged_attention_fwd_cuda(*t, [3, 0, 1], 0.5), (q, k, v))

"""torch.library done the way torch expects, for every vitslim custom op: torch.library.opcheck with all its
default tests (schema, autograd registration, fake tensor, AOT dispatch) on inputs that require grad, so the
registered backward (and the backward ops' own backward, for double backward) is exercised too.

The Triton-backed ops run under Triton's interpreter (in a fresh process when this one imported triton
compiled: see tests/kernels/interpreter.py). Tests named `..._compiled_import` check the ops' CPU path,
which needs triton imported compiled: plain PyTorch reference math, so that torch.export of a fused slim model
runs on CPU.
"""
import importlib

import pytest
import torch

triton = pytest.importorskip("triton")

from vitslim_kernels.ops.ragged_attention import ragged_attention_ref  # noqa: E402

from .interpreter import INTERPRETED, rerun_under_interpreter, require_interpreter  # noqa: E402

SCALE = 64 ** -0.5
HEAD_DIMS = [17, 0, 1]  # odd widths and a fully pruned head


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    require_interpreter(request, monkeypatch)


@pytest.mark.skipif(INTERPRETED, reason="the CPU tests run in this process")
def test_cpu_tests_under_the_interpreter():
    rerun_under_interpreter(__file__)


@pytest.fixture(scope="module")
def ragged():
    return importlib.import_module("vitslim_kernels.triton.ragged_attention")


def _qkv(B, N, head_dims, dtype, requires_grad=False, seed=0):
    """q, k, v as strided views of one (B, N, 3D) tensor, as the qkv projection gives them."""
    g = torch.Generator().manual_seed(seed)
    D = sum(head_dims)
    qkv = (1.5 * torch.randn(B, N, 3 * D, generator=g, dtype=torch.float64)).to(dtype)
    qkv.requires_grad_(requires_grad)
    if D == 0:  # every head pruned: split(0) is refused
        return qkv, qkv[..., :0], qkv[..., :0]
    return qkv.split(D, dim=-1)


# ---------------------------------------------------------------------------------------------------------
# The CPU path of vitslim::ragged_attention_fwd / _bwd (triton imported compiled)
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head_dims", [HEAD_DIMS, [0, 0], [5]])
def test_cpu_forward_compiled_import(ragged, dtype, head_dims):
    q, k, v = _qkv(3, 17, head_dims, dtype)
    o, lse = torch.ops.vitslim.ragged_attention_fwd(q, k, v, head_dims, SCALE)
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
def test_cpu_backward_compiled_import(ragged, dtype):
    # At the forward's o and lse, the backward op is the gradient of attention.
    q, k, v = _qkv(3, 17, HEAD_DIMS, dtype)
    do = torch.randn(q.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    o, lse = torch.ops.vitslim.ragged_attention_fwd(q, k, v, HEAD_DIMS, SCALE)
    grads = torch.ops.vitslim.ragged_attention_bwd(do, q, k, v, o, lse, HEAD_DIMS, SCALE)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(ragged_attention_ref(*leaves, HEAD_DIMS, SCALE), leaves, do.double())
    for got, exp in zip(grads, expected):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=64 * torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------------------------------------------------
# The Triton ops under the interpreter
# ---------------------------------------------------------------------------------------------------------

def test_ragged_bwd_kernel_is_its_formula(ragged):
    # The backward op as a function of all its inputs (o and lse too, here not the forward's) is
    # ragged_attention_bwd_ref, whose derivatives are then the op's second derivatives.
    from vitslim_kernels.ops.ragged_attention import ragged_attention_bwd_ref
    q, k, v = _qkv(2, 17, HEAD_DIMS, torch.float32)
    g = torch.Generator().manual_seed(2)
    do, o = (torch.randn(q.shape, generator=g) for _ in range(2))
    lse = 2 + torch.rand(2, 2, 17, generator=g)
    got = torch.ops.vitslim.ragged_attention_bwd(do, q, k, v, o, lse, HEAD_DIMS, SCALE)
    expected = ragged_attention_bwd_ref(do, q, k, v, o, lse, HEAD_DIMS, SCALE)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
